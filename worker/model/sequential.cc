#include "tandem/model/sequential.h"

#include <sstream>
#include <utility>

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
  activations_.outputs.resize(layers_.size());
}

Status Sequential::exchangeGradients(FloatBuffer& other) {
  if (other.size() != gradients_.size())
    return TANDEM_ERROR(StatusCode::kInvalidArgument, "exchangeGradients: a buffer of " + std::to_string(other.size()) +
                                                          " floats for a model with " + std::to_string(gradients_.size()));
  std::swap(gradients_, other);
  for (size_t i = 0; i < layers_.size(); ++i)
    layers_[i]->bindParameters(parameters_.data() + ranges_[i].first, gradients_.data() + ranges_[i].first);
  return Status::Ok();
}

int64_t Activations::bytes() const {
  int64_t total = 0;
  for (const auto& output : outputs) total += output.size() * static_cast<int64_t>(sizeof(float));
  return total;
}

int64_t Sequential::forwardMacsPerSample() const {
  int64_t macs = 0;
  for (const auto& layer : layers_) macs += layer->forwardMacsPerSample();
  return macs;
}

void Sequential::initialize(uint64_t seed, size_t firstLayerIndex) {
  for (size_t i = 0; i < layers_.size(); ++i) {
    Random random(seed, /*stream=*/1000 + firstLayerIndex + i);
    layers_[i]->initialize(random);
  }
}

const Tensor& Sequential::forward(const Tensor& input) { return forward(input, activations_); }

const Tensor& Sequential::forward(const Tensor& input, Activations& activations) {
  activations.input = &input;
  activations.outputs.resize(layers_.size());
  const Tensor* current = &input;
  for (size_t i = 0; i < layers_.size(); ++i) {
    layers_[i]->forward(*current, activations.outputs[i]);
    current = &activations.outputs[i];
  }
  return *current;
}

void Sequential::backward(const Tensor& gradOutput, const std::function<void(int64_t)>& onGradientsReady) {
  backward(activations_, gradOutput, onGradientsReady, nullptr);
}

void Sequential::backward(const Activations& activations, const Tensor& gradOutput,
                          const std::function<void(int64_t)>& onGradientsReady, Tensor* gradInput) {
  const Tensor* gradient = &gradOutput;
  for (size_t i = layers_.size(); i-- > 0;) {
    const Tensor& layerInput = i == 0 ? *activations.input : activations.outputs[i - 1];
    // The first layer's input gradient is only computed when the caller wants it.
    Tensor* layerGradInput = i == 0 ? gradInput : (gradient == &gradientA_ ? &gradientB_ : &gradientA_);
    const int64_t layerOffset = ranges_[i].first;
    GradientsReady ready;
    if (onGradientsReady && ranges_[i].second > 0)
      ready = [&](int64_t localOffset) { onGradientsReady(layerOffset + localOffset); };
    layers_[i]->backward(layerInput, activations.outputs[i], *gradient, layerGradInput, ready);
    gradient = layerGradInput;
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
  return buildMlpSlice(inputFeatures, hidden, classes, activation, 0, hidden.size() + 1, trailingGradientSlots);
}

std::unique_ptr<Sequential> buildMlpSlice(int64_t inputFeatures, const std::vector<int64_t>& hidden, int64_t classes,
                                          ActivationKind activation, size_t firstLinear, size_t endLinear,
                                          int64_t trailingGradientSlots) {
  const size_t linearCount = hidden.size() + 1;
  std::vector<std::unique_ptr<Layer>> layers;
  for (size_t k = firstLinear; k < endLinear && k < linearCount; ++k) {
    const int64_t in = k == 0 ? inputFeatures : hidden[k - 1];
    const int64_t out = k + 1 == linearCount ? classes : hidden[k];
    layers.push_back(std::make_unique<Linear>(in, out));
    if (k + 1 < linearCount) layers.push_back(std::make_unique<Activation>(activation, out));
  }
  return std::make_unique<Sequential>(std::move(layers), trailingGradientSlots);
}

}  // namespace tandem::model
