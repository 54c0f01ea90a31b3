#include "tandem/model/layer.h"

#include <algorithm>
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

void Linear::setGradientChunkFloats(int64_t floats) { chunkRows_ = std::clamp<int64_t>(floats / in_, 1, out_); }

std::vector<int64_t> Linear::gradientReadyOffsets() const {
  std::vector<int64_t> offsets{in_ * out_};  // the bias
  for (int64_t end = out_; end > 0; end -= chunkRows_) offsets.push_back(std::max<int64_t>(0, end - chunkRows_) * in_);
  return offsets;
}

void Linear::backward(const Tensor& input, const Tensor& output, const Tensor& gradOutput, Tensor* gradInput,
                      const GradientsReady& ready) {
  const int64_t batch = input.rows();
  // Gradients are overwritten, so nobody zeroes them between backwards: the bias sum starts from zero
  // here, in cache, and the GEMM's beta = 0 replaces the weight gradient.
  std::fill_n(biasGrad_, out_, 0.0f);
  kernels::bias_backward(batch, out_, gradOutput.data(), biasGrad_);
  if (ready) ready(in_ * out_);
  // dW[rows] (rows, in) = dY[:, rows]^T (rows, batch) * X (batch, in), last rows first.
  for (int64_t end = out_; end > 0; end -= chunkRows_) {
    const int64_t begin = std::max<int64_t>(0, end - chunkRows_);
    kernels::gemm(Transpose::kYes, Transpose::kNo, end - begin, in_, batch, 1.0f, gradOutput.data() + begin, out_,
                  input.data(), in_, 0.0f, weightGrad_ + begin * in_, in_);
    if (ready) ready(begin * in_);
  }
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

void Activation::backward(const Tensor& input, const Tensor& output, const Tensor& gradOutput, Tensor* gradInput,
                          const GradientsReady&) {
  if (gradInput == nullptr) return;
  gradInput->reshape(input.shape());
  if (kind_ == ActivationKind::kRelu)
    kernels::relu_backward(input.size(), output.data(), gradOutput.data(), gradInput->data());
  else
    kernels::gelu_backward(input.size(), input.data(), gradOutput.data(), gradInput->data());
}

}  // namespace tandem::model
