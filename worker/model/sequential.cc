#include "tandem/model/sequential.h"

#include <sstream>

namespace tandem::model {

Sequential::Sequential(std::vector<std::unique_ptr<Layer>> layers, int64_t trailingGradientSlots)
    : layers_(std::move(layers)) {
  for (const auto& layer : layers_) {
    ranges_.emplace_back(parameterCount_, layer->parameterCount());
    parameterCount_ += layer->parameterCount();
  }
  parameters_.resize(parameterCount_);
  gradients_.resize(parameterCount_ + trailingGradientSlots);
  for (size_t i = 0; i < layers_.size(); ++i)
    layers_[i]->bindParameters(parameters_.data() + ranges_[i].first, gradients_.data() + ranges_[i].first);
  activations_.resize(layers_.size());
}

int64_t Sequential::forwardMacsPerSample() const {
  int64_t macs = 0;
  for (const auto& layer : layers_) macs += layer->forwardMacsPerSample();
  return macs;
}

void Sequential::initialize(uint64_t seed) {
  for (size_t i = 0; i < layers_.size(); ++i) {
    Random random(seed, /*stream=*/1000 + i);
    layers_[i]->initialize(random);
  }
}

const Tensor& Sequential::forward(const Tensor& input) {
  input_ = &input;
  const Tensor* current = &input;
  for (size_t i = 0; i < layers_.size(); ++i) {
    layers_[i]->forward(*current, activations_[i]);
    current = &activations_[i];
  }
  return *current;
}

void Sequential::backward(const Tensor& gradOutput, const std::function<void(int64_t)>& onGradientsReady) {
  const Tensor* gradient = &gradOutput;
  for (size_t i = layers_.size(); i-- > 0;) {
    const Tensor& layerInput = i == 0 ? *input_ : activations_[i - 1];
    // The first layer's input gradient is never needed: skip that GEMM.
    Tensor* gradInput = i == 0 ? nullptr : (gradient == &gradientA_ ? &gradientB_ : &gradientA_);
    const int64_t layerOffset = ranges_[i].first;
    GradientsReady ready;
    if (onGradientsReady && ranges_[i].second > 0)
      ready = [&](int64_t localOffset) { onGradientsReady(layerOffset + localOffset); };
    layers_[i]->backward(layerInput, activations_[i], *gradient, gradInput, ready);
    gradient = gradInput;
  }
  if (onGradientsReady) onGradientsReady(0);
}

void Sequential::setGradientChunkFloats(int64_t floats) {
  for (auto& layer : layers_) layer->setGradientChunkFloats(floats);
}

std::vector<int64_t> Sequential::gradientReadyOffsets() const {
  std::vector<int64_t> offsets;
  for (size_t i = layers_.size(); i-- > 0;) {
    if (ranges_[i].second == 0) continue;
    for (int64_t local : layers_[i]->gradientReadyOffsets()) offsets.push_back(ranges_[i].first + local);
  }
  if (offsets.empty() || offsets.back() != 0) offsets.push_back(0);
  return offsets;
}

std::string Sequential::describe() const {
  std::ostringstream out;
  for (size_t i = 0; i < layers_.size(); ++i)
    out << "  layer " << i << ": " << layers_[i]->name() << ", " << layers_[i]->parameterCount() << " parameters\n";
  out << "  total: " << parameterCount_ << " parameters";
  return out.str();
}

std::unique_ptr<Sequential> buildMlp(int64_t inputFeatures, const std::vector<int64_t>& hidden, int64_t classes,
                                     ActivationKind activation, int64_t trailingGradientSlots) {
  std::vector<std::unique_ptr<Layer>> layers;
  int64_t features = inputFeatures;
  for (int64_t width : hidden) {
    layers.push_back(std::make_unique<Linear>(features, width));
    layers.push_back(std::make_unique<Activation>(activation, width));
    features = width;
  }
  layers.push_back(std::make_unique<Linear>(features, classes));
  return std::make_unique<Sequential>(std::move(layers), trailingGradientSlots);
}

}  // namespace tandem::model
