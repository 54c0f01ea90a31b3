// One MLP training step on the GPU built from Tandem's CUDA kernels (tandem/kernels/cuda/ops.h): forward
// GEMMs with fused bias+ReLU epilogues, fused softmax cross-entropy, backward GEMMs, AdamW over one flat
// buffer. fp32, or bf16 compute with fp32 master weights (weights and activations cast to bf16 for the
// GEMMs, fp32 accumulation, fp32 gradients and optimizer). Timed eagerly and as one CUDA graph replay.
//
//   gpu_mlp_step --hidden 256,128 --batch 256 --precision fp32 [--steps 200]
// Prints one JSON line: step milliseconds (eager and graph), samples/s and model TFLOP/s.
#include "tandem/kernels/cuda/ops.h"
#include "tandem/kernels/cuda/runtime.h"
#include "tandem/kernels/gpu_info.h"

#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace cuda = tandem::kernels::cuda;
using tandem::kernels::Transpose;

namespace {

struct Options {
  std::vector<int64_t> widths{784, 256, 128, 10};
  int64_t batch = 256;
  bool bf16 = false;
  int steps = 200;
};

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--hidden") {
      options.widths = {784};
      std::stringstream list(value);
      for (std::string item; std::getline(list, item, ',');) options.widths.push_back(std::stoll(item));
      options.widths.push_back(10);
    } else if (flag == "--batch") {
      options.batch = std::stoll(value);
    } else if (flag == "--precision") {
      if (value != "fp32" && value != "bf16") throw std::invalid_argument("--precision: fp32 or bf16, not " + value);
      options.bf16 = value == "bf16";
    } else if (flag == "--steps") {
      options.steps = std::stoi(value);
    } else {
      throw std::invalid_argument("unknown flag " + flag);
    }
  }
  return options;
}

class MlpStep {
 public:
  explicit MlpStep(const Options& options) : o_(options), layers_(static_cast<int>(options.widths.size()) - 1) {
    for (int l = 0; l < layers_; ++l) {
      weightOffset_.push_back(weightCount_);
      weightCount_ += o_.widths[l] * o_.widths[l + 1];
    }
    int64_t biasCount = 0;
    for (int l = 0; l < layers_; ++l) {
      biasOffset_.push_back(weightCount_ + biasCount);
      biasCount += o_.widths[l + 1];
    }
    parameterCount_ = weightCount_ + biasCount;
    params_ = cuda::DeviceBuffer<float>(parameterCount_);
    grads_ = cuda::DeviceBuffer<float>(parameterCount_);
    m_ = cuda::DeviceBuffer<float>(parameterCount_);
    v_ = cuda::DeviceBuffer<float>(parameterCount_);
    weightsLow_ = cuda::DeviceBuffer<__nv_bfloat16>(weightCount_);
    std::mt19937 engine(1);
    std::vector<float> host(parameterCount_, 0.0f);
    for (int l = 0; l < layers_; ++l) {
      std::uniform_real_distribution<float> uniform(-1.0f / std::sqrt(float(o_.widths[l])), 1.0f / std::sqrt(float(o_.widths[l])));
      for (int64_t i = 0; i < o_.widths[l] * o_.widths[l + 1]; ++i) host[weightOffset_[l] + i] = uniform(engine);
    }
    copyIn(params_.data(), host);
    TANDEM_CUDA_CHECK(cudaMemset(m_.data(), 0, parameterCount_ * 4));
    TANDEM_CUDA_CHECK(cudaMemset(v_.data(), 0, parameterCount_ * 4));
    std::normal_distribution<float> normal;
    std::vector<float> x(o_.batch * o_.widths[0]);
    for (auto& value : x) value = normal(engine);
    input_ = cuda::DeviceBuffer<float>(x.size());
    copyIn(input_.data(), x);
    inputLow_ = cuda::DeviceBuffer<__nv_bfloat16>(x.size());
    cuda::cast_to_bf16(x.size(), input_.data(), inputLow_.data(), nullptr);
    std::vector<int32_t> labels(o_.batch);
    for (int64_t i = 0; i < o_.batch; ++i) labels[i] = static_cast<int32_t>(engine() % 10);
    labels_ = cuda::DeviceBuffer<int32_t>(labels.size());
    TANDEM_CUDA_CHECK(cudaMemcpy(labels_.data(), labels.data(), labels.size() * 4, cudaMemcpyHostToDevice));
    for (int l = 0; l < layers_; ++l) {
      outputs_.emplace_back(o_.batch * o_.widths[l + 1]);
      outputsLow_.emplace_back(o_.batch * o_.widths[l + 1]);
      gradOutputs_.emplace_back(o_.batch * o_.widths[l + 1]);
      gradOutputsLow_.emplace_back(o_.batch * o_.widths[l + 1]);
    }
    loss_ = cuda::DeviceBuffer<double>(1);
    stepCounter_ = cuda::DeviceBuffer<int64_t>(1);
    const int64_t one = 1;
    TANDEM_CUDA_CHECK(cudaMemcpy(stepCounter_.data(), &one, sizeof one, cudaMemcpyHostToDevice));
  }

  void run(cudaStream_t stream) {
    const auto precision = o_.bf16 ? cuda::GemmPrecision::kBf16 : cuda::GemmPrecision::kFp32;
    const int64_t batch = o_.batch;
    // Weight gradients are written whole by their GEMMs (beta 0); only the bias gradients accumulate.
    TANDEM_CUDA_CHECK(cudaMemsetAsync(grads_.data() + weightCount_, 0, (parameterCount_ - weightCount_) * 4, stream));
    if (o_.bf16) cuda::cast_to_bf16(weightCount_, params_.data(), weightsLow_.data(), stream);
    auto weights = [&](int l) -> const void* {
      return o_.bf16 ? static_cast<const void*>(weightsLow_.data() + weightOffset_[l]) : params_.data() + weightOffset_[l];
    };
    auto layerInput = [&](int l) -> const void* {
      if (l == 0) return o_.bf16 ? static_cast<const void*>(inputLow_.data()) : input_.data();
      return o_.bf16 ? static_cast<const void*>(outputsLow_[l - 1].data()) : outputs_[l - 1].data();
    };
    for (int l = 0; l < layers_; ++l) {
      const int64_t in = o_.widths[l], out = o_.widths[l + 1];
      const bool last = l + 1 == layers_;
      cuda::gemm(Transpose::kNo, Transpose::kYes, batch, out, in, 1.0f, layerInput(l), in, weights(l), in, 0.0f,
                 outputs_[l].data(), out, precision, last ? cuda::Epilogue::kBias : cuda::Epilogue::kBiasRelu,
                 params_.data() + biasOffset_[l], stream);
      if (o_.bf16 && !last) cuda::cast_to_bf16(batch * out, outputs_[l].data(), outputsLow_[l].data(), stream);
    }
    cuda::softmax_cross_entropy(batch, 10, outputs_[layers_ - 1].data(), labels_.data(), 1.0f / batch,
                                gradOutputs_[layers_ - 1].data(), loss_.data(), nullptr, stream);
    for (int l = layers_ - 1; l >= 0; --l) {
      const int64_t in = o_.widths[l], out = o_.widths[l + 1];
      float* grad = gradOutputs_[l].data();
      if (l + 1 < layers_) cuda::relu_backward(batch * out, outputs_[l].data(), grad, grad, stream);
      cuda::bias_backward(batch, out, grad, grads_.data() + biasOffset_[l], stream);
      const void* gradForGemm = grad;
      if (o_.bf16) {
        cuda::cast_to_bf16(batch * out, grad, gradOutputsLow_[l].data(), stream);
        gradForGemm = gradOutputsLow_[l].data();
      }
      cuda::gemm(Transpose::kYes, Transpose::kNo, out, in, batch, 1.0f, gradForGemm, out, layerInput(l), in, 0.0f,
                 grads_.data() + weightOffset_[l], in, precision, cuda::Epilogue::kNone, nullptr, stream);
      if (l > 0)  // the first layer needs no input gradient
        cuda::gemm(Transpose::kNo, Transpose::kNo, batch, in, out, 1.0f, gradForGemm, out, weights(l), in, 0.0f,
                   gradOutputs_[l - 1].data(), in, precision, cuda::Epilogue::kNone, nullptr, stream);
    }
    tandem::kernels::AdamWParams adamw;
    adamw.lr = 1e-3f;
    cuda::adamw_step(parameterCount_, params_.data(), grads_.data(), m_.data(), v_.data(), adamw, stepCounter_.data(),
                     stream);
  }

  double flopsPerStep() const {
    double flops = 0;
    for (int l = 0; l < layers_; ++l) flops += 2.0 * o_.batch * o_.widths[l] * o_.widths[l + 1] * (l == 0 ? 2 : 3);
    return flops;
  }
  double loss() const {
    double value = 0;
    TANDEM_CUDA_CHECK(cudaMemcpy(&value, loss_.data(), sizeof value, cudaMemcpyDeviceToHost));
    return value / o_.batch;
  }

 private:
  static void copyIn(float* device, const std::vector<float>& host) {
    TANDEM_CUDA_CHECK(cudaMemcpy(device, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
  }

  Options o_;
  int layers_;
  std::vector<int64_t> weightOffset_, biasOffset_;
  int64_t weightCount_ = 0, parameterCount_ = 0;
  cuda::DeviceBuffer<float> params_, grads_, m_, v_, input_;
  cuda::DeviceBuffer<__nv_bfloat16> weightsLow_, inputLow_;
  cuda::DeviceBuffer<int32_t> labels_;
  std::vector<cuda::DeviceBuffer<float>> outputs_, gradOutputs_;
  std::vector<cuda::DeviceBuffer<__nv_bfloat16>> outputsLow_, gradOutputsLow_;
  cuda::DeviceBuffer<double> loss_;
  cuda::DeviceBuffer<int64_t> stepCounter_;
};

double timeMs(cudaStream_t stream, int steps, const std::function<void()>& body) {
  cudaEvent_t start, stop;
  TANDEM_CUDA_CHECK(cudaEventCreate(&start));
  TANDEM_CUDA_CHECK(cudaEventCreate(&stop));
  TANDEM_CUDA_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < steps; ++i) body();
  TANDEM_CUDA_CHECK(cudaEventRecord(stop, stream));
  TANDEM_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  TANDEM_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms / steps;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options options = parse(argc, argv);
    if (tandem::kernels::gpuCount() == 0) {
      std::fprintf(stderr, "gpu_mlp_step: no CUDA GPU visible\n");
      return 1;
    }
    tandem::kernels::useGpu(0);
    MlpStep step(options);
    cudaStream_t stream;
    TANDEM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    for (int i = 0; i < 5; ++i) step.run(stream);  // plans, workspace, pool blocks
    TANDEM_CUDA_CHECK(cudaStreamSynchronize(stream));
    const double firstLoss = step.loss();
    const double eagerMs = timeMs(stream, options.steps, [&] { step.run(stream); });
    cudaGraph_t graph;
    cudaGraphExec_t executable;
    TANDEM_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    step.run(stream);
    TANDEM_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    TANDEM_CUDA_CHECK(cudaGraphInstantiate(&executable, graph, 0));
    TANDEM_CUDA_CHECK(cudaGraphLaunch(executable, stream));
    const double graphMs = timeMs(stream, options.steps, [&] { TANDEM_CUDA_CHECK(cudaGraphLaunch(executable, stream)); });
    const double lastLoss = step.loss();
    std::string widths;
    for (size_t i = 0; i < options.widths.size(); ++i) {
      if (i > 0) widths += '-';
      widths += std::to_string(options.widths[i]);
    }
    const double bestMs = std::min(eagerMs, graphMs);
    std::printf("{\"impl\": \"tandem\", \"model\": \"%s\", \"batch\": %lld, \"precision\": \"%s\", \"eager_ms\": %.4f, "
                "\"graph_ms\": %.4f, \"samples_per_s\": %.0f, \"tflops\": %.1f, \"loss_first\": %.4f, \"loss_last\": %.4f, "
                "\"gpu\": \"%s\"}\n",
                widths.c_str(), static_cast<long long>(options.batch), options.bf16 ? "bf16" : "fp32", eagerMs, graphMs,
                options.batch / (bestMs / 1000.0), step.flopsPerStep() / (bestMs / 1000.0) / 1e12, firstLoss, lastLoss,
                tandem::kernels::gpuDescription(0).c_str());
    cudaGraphExecDestroy(executable);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "gpu_mlp_step: %s\n", error.what());
    return 1;
  }
}
