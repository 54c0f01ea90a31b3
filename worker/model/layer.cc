#include "tandem/model/layer.h"

#include <cmath>

#include "tandem/kernels/elementwise.h"
#include "tandem/kernels/gemm.h"

namespace tandem::model {

using kernels::Transpose;

void Linear::bindParameters(float* parameters, float* gradients) {
  weight_ = parameters;
  bias_ = parameters + in_ * out_;
  weightGrad_ = gradients;
  biasGrad_ = gradients + in_ * out_;
}

void Linear::initialize(Random& random) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
  for (int64_t i = 0; i < in_ * out_; ++i) weight_[i] = static_cast<float>(random.uniform(-bound, bound));
  for (int64_t i = 0; i < out_; ++i) bias_[i] = static_cast<float>(random.uniform(-bound, bound));
}

void Linear::forward(const Tensor& input, Tensor& output) {
  const int64_t batch = input.rows();
  output.reshape({batch, out_});
  // Start from the bias and let the GEMM accumulate onto it: no separate bias pass.
  kernels::broadcast_rows(batch, out_, bias_, output.data());
  kernels::gemm(Transpose::kNo, Transpose::kYes, batch, out_, in_, 1.0f, input.data(), in_, weight_, in_, 1.0f,
                output.data(), out_);
}

void Linear::backward(const Tensor& input, const Tensor& output, const Tensor& gradOutput, Tensor* gradInput) {
  const int64_t batch = input.rows();
  // dW (out, in) += dY^T (out, batch) * X (batch, in)
  kernels::gemm(Transpose::kYes, Transpose::kNo, out_, in_, batch, 1.0f, gradOutput.data(), out_, input.data(), in_,
                1.0f, weightGrad_, in_);
  kernels::bias_backward(batch, out_, gradOutput.data(), biasGrad_);
  if (gradInput != nullptr) {
    gradInput->reshape({batch, in_});
    // dX (batch, in) = dY (batch, out) * W (out, in)
    kernels::gemm(Transpose::kNo, Transpose::kNo, batch, in_, out_, 1.0f, gradOutput.data(), out_, weight_, in_, 0.0f,
                  gradInput->data(), in_);
  }
}

void Activation::forward(const Tensor& input, Tensor& output) {
  output.reshape(input.shape());
  if (kind_ == ActivationKind::kRelu)
    kernels::relu_forward(input.size(), input.data(), output.data());
  else
    kernels::gelu_forward(input.size(), input.data(), output.data());
}

void Activation::backward(const Tensor& input, const Tensor& output, const Tensor& gradOutput, Tensor* gradInput) {
  if (gradInput == nullptr) return;
  gradInput->reshape(input.shape());
  if (kind_ == ActivationKind::kRelu)
    kernels::relu_backward(input.size(), output.data(), gradOutput.data(), gradInput->data());
  else
    kernels::gelu_backward(input.size(), input.data(), gradOutput.data(), gradInput->data());
}

}  // namespace tandem::model
