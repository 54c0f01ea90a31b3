// Layers with explicit forward and backward. A layer owns no activations: the model passes in the
// tensors it keeps, so a pipeline can hold several microbatches' activations of the same layer.
// Parameters and their gradients are views into the model's flat buffers (bindParameters), which is
// what lets data parallelism all-reduce contiguous buckets of gradients.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tandem/common/random.h"
#include "tandem/tensor/tensor.h"

namespace tandem::model {

// Called during backward with an offset into the layer's own parameters: every parameter gradient at
// or after it is final. Offsets only decrease within one backward.
using GradientsReady = std::function<void(int64_t localOffset)>;

class Layer {
 public:
  virtual ~Layer() = default;
  virtual std::string name() const = 0;
  virtual int64_t inputFeatures() const = 0;
  virtual int64_t outputFeatures() const = 0;
  virtual int64_t parameterCount() const { return 0; }
  // Multiply-adds of forward per sample (for partitioning and FLOP reports).
  virtual int64_t forwardMacsPerSample() const { return 0; }
  // parameters/gradients point at parameterCount() floats inside the model's flat buffers.
  virtual void bindParameters(float* parameters, float* gradients) {}
  virtual void initialize(Random& random) {}

  // input (batch, in) -> output (batch, out); output is reshaped by the layer.
  virtual void forward(const Tensor& input, Tensor& output) = 0;
  // Writes (overwrites) this batch's parameter gradients and, when gradInput is not null, dL/dinput.
  // Reports finished parameter gradients through `ready` (may be empty) as soon as they are final.
  virtual void backward(const Tensor& input, const Tensor& output, const Tensor& gradOutput, Tensor* gradInput,
                        const GradientsReady& ready) = 0;
  // Lets a layer finish its parameter gradients in pieces of about this many floats, so that their
  // communication can start before the whole layer is done. The default: one piece.
  virtual void setGradientChunkFloats(int64_t floats) {}
  // The local offsets backward reports through `ready`, in the order it reports them (descending).
  virtual std::vector<int64_t> gradientReadyOffsets() const { return {0}; }
};

// y = x W^T + b, W (out, in), b (out). Initialised like PyTorch's nn.Linear: U(-1/sqrt(in), 1/sqrt(in)).
class Linear final : public Layer {
 public:
  Linear(int64_t inFeatures, int64_t outFeatures) : in_(inFeatures), out_(outFeatures), chunkRows_(outFeatures) {}
  std::string name() const override { return "linear(" + std::to_string(in_) + "->" + std::to_string(out_) + ")"; }
  int64_t inputFeatures() const override { return in_; }
  int64_t outputFeatures() const override { return out_; }
  int64_t parameterCount() const override { return in_ * out_ + out_; }
  int64_t forwardMacsPerSample() const override { return in_ * out_; }
  void bindParameters(float* parameters, float* gradients) override;
  void initialize(Random& random) override;
  void forward(const Tensor& input, Tensor& output) override;
  // Bias gradient first, then the weight gradient in row chunks from the last row up, then dL/dinput.
  void backward(const Tensor& input, const Tensor& output, const Tensor& gradOutput, Tensor* gradInput,
                const GradientsReady& ready) override;
  void setGradientChunkFloats(int64_t floats) override;
  std::vector<int64_t> gradientReadyOffsets() const override;

 private:
  int64_t in_, out_;
  int64_t chunkRows_;               // weight-gradient rows finished per piece
  float* weight_ = nullptr;       // (out, in)
  float* bias_ = nullptr;         // (out)
  float* weightGrad_ = nullptr;   // (out, in)
  float* biasGrad_ = nullptr;     // (out)
};

enum class ActivationKind { kRelu, kGelu };

class Activation final : public Layer {
 public:
  Activation(ActivationKind kind, int64_t features) : kind_(kind), features_(features) {}
  std::string name() const override { return kind_ == ActivationKind::kRelu ? "relu" : "gelu"; }
  int64_t inputFeatures() const override { return features_; }
  int64_t outputFeatures() const override { return features_; }
  void forward(const Tensor& input, Tensor& output) override;
  void backward(const Tensor& input, const Tensor& output, const Tensor& gradOutput, Tensor* gradInput,
                const GradientsReady& ready) override;

 private:
  ActivationKind kind_;
  int64_t features_;
};

}  // namespace tandem::model
