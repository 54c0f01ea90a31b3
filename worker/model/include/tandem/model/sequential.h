// Sequential: a stack of layers with one flat parameter buffer and one flat gradient buffer, laid out
// in layer order. Backward runs from the last layer to the first and reports, as it goes, the flat
// offset from which on every gradient is final, so a caller can start communicating those gradients
// while the rest of backward runs.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tandem/common/status.h"
#include "tandem/model/layer.h"

namespace tandem::model {

// What backward needs from one forward: the input and every layer's output. A pipeline stage keeps one
// per microbatch in flight.
struct Activations {
  const Tensor* input = nullptr;
  std::vector<Tensor> outputs;  // outputs[i] = output of layer i
  // Bytes of the activations held (the input belongs to the caller and is not counted).
  int64_t bytes() const;
};

class Sequential {
 public:
  // trailingGradientSlots: extra floats after the last gradient (e.g. a loss sum that rides along with
  // the first all-reduce bucket); they are not parameters and no optimizer touches them.
  explicit Sequential(std::vector<std::unique_ptr<Layer>> layers, int64_t trailingGradientSlots = 0);

  size_t layerCount() const { return layers_.size(); }
  const Layer& layer(size_t index) const { return *layers_[index]; }
  int64_t parameterCount() const { return parameterCount_; }
  // [offset, offset + count) of layer `index` in the flat buffers.
  std::pair<int64_t, int64_t> parameterRange(size_t index) const { return ranges_[index]; }
  float* parameters() { return parameters_.data(); }
  const float* parameters() const { return parameters_.data(); }
  float* gradients() { return gradients_.data(); }
  float* trailingGradientSlots() { return gradients_.data() + parameterCount_; }
  int64_t trailingGradientSlotCount() const { return gradients_.size() - parameterCount_; }
  int64_t forwardMacsPerSample() const;

  // Same seed, same parameters: every rank initialises identically. firstLayerIndex is this stack's
  // position in the whole model, so a pipeline stage draws exactly what the unsplit model would.
  void initialize(uint64_t seed, size_t firstLayerIndex = 0);
  void zeroGradients() { gradients_.zero(); }
  int64_t gradientBufferSize() const { return gradients_.size(); }  // parameters + trailing slots
  // Swaps the gradient buffer (gradientBufferSize() floats) for `other` and points the layers at the
  // new one: microbatch accumulation hands buffers around instead of copying them.
  // A buffer of another size is refused (InvalidArgument) and left as it was.
  Status exchangeGradients(FloatBuffer& other);

  // input (batch, in) -> output (batch, out). Keeps every activation for backward; `input` must stay
  // alive until backward returns.
  const Tensor& forward(const Tensor& input);
  // gradOutput: dL/doutput of the last forward. onGradientsReady(offset) says that every gradient at
  // flat offset >= offset is final; offsets only decrease, and the last call is 0.
  void backward(const Tensor& gradOutput, const std::function<void(int64_t)>& onGradientsReady = {});

  // The same with caller-held activations (one set per microbatch in flight). gradInput, when not
  // null, receives dL/dinput (a pipeline stage sends it to the previous stage).
  const Tensor& forward(const Tensor& input, Activations& activations);
  void backward(const Activations& activations, const Tensor& gradOutput,
                const std::function<void(int64_t)>& onGradientsReady, Tensor* gradInput);

  // Layers finish their gradients in pieces of about this many floats (see Layer::setGradientChunkFloats).
  void setGradientChunkFloats(int64_t floats);
  // Every flat offset backward reports, in the order it reports them (descending).
  std::vector<int64_t> gradientReadyOffsets() const;

  // One line per layer: name, parameters.
  std::string describe() const;

 private:
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<std::pair<int64_t, int64_t>> ranges_;
  int64_t parameterCount_ = 0;
  FloatBuffer parameters_;
  FloatBuffer gradients_;
  Activations activations_;      // for forward(input) / backward(gradOutput)
  Tensor gradientA_, gradientB_;  // ping-pong buffers for dL/dactivation
};

// The mlp family: in -> hidden... -> classes, an activation after every hidden linear layer.
std::unique_ptr<Sequential> buildMlp(int64_t inputFeatures, const std::vector<int64_t>& hidden, int64_t classes,
                                     ActivationKind activation, int64_t trailingGradientSlots = 0);

// Linear layers [firstLinear, endLinear) of that mlp, each with the activation that follows it in the
// whole model (the model's last linear layer has none). Layer i of the result is layer
// 2 * firstLinear + i of the whole model.
std::unique_ptr<Sequential> buildMlpSlice(int64_t inputFeatures, const std::vector<int64_t>& hidden, int64_t classes,
                                          ActivationKind activation, size_t firstLinear, size_t endLinear,
                                          int64_t trailingGradientSlots = 0);

}  // namespace tandem::model
