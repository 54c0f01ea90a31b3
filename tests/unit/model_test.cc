// model: finite-difference gradient checks of Linear (weights, bias, input), Activation relu/gelu (input)
// and a whole mlp with softmax cross-entropy (every parameter); the backward hook order; the flat
// parameter layout with trailing gradient slots; seeded initialisation.
#include <gtest/gtest.h>

#include <algorithm>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "tandem/kernels/cross_entropy.h"
#include "tandem/model/layer.h"
#include "tandem/model/sequential.h"

namespace tandem::model {
namespace {

constexpr float kEps = 1e-3f;

void fillRandom(float* data, int64_t n, uint32_t seed, float low = -1.0f, float high = 1.0f) {
  std::mt19937 engine(seed);
  std::uniform_real_distribution<float> distribution(low, high);
  for (int64_t i = 0; i < n; ++i) data[i] = distribution(engine);
}

// Central difference of `loss` with respect to *value, using the perturbations float actually holds.
template <typename Loss>
double centralDifference(float* value, Loss loss) {
  const float original = *value;
  *value = original + kEps;
  const float up = *value;
  const double lossUp = loss();
  *value = original - kEps;
  const float down = *value;
  const double lossDown = loss();
  *value = original;
  return (lossUp - lossDown) / (static_cast<double>(up) - static_cast<double>(down));
}

// Relative tolerance 1e-2 with a small absolute floor for gradients near zero.
void expectGradientNear(double analytic, double numeric, const std::string& what) {
  EXPECT_NEAR(analytic, numeric, 1e-2 * std::max(std::abs(analytic), std::abs(numeric)) + 2e-4) << what;
}

// L = sum(output * weights): dL/doutput = weights, a generic upstream gradient.
double projectedSum(const Tensor& output, const Tensor& weights) {
  double sum = 0.0;
  for (int64_t i = 0; i < output.size(); ++i) sum += static_cast<double>(output.data()[i]) * weights.data()[i];
  return sum;
}

TEST(LinearGradient, WeightsBiasAndInputMatchFiniteDifferences) {
  const int64_t batch = 5, in = 4, out = 3;
  Linear layer(in, out);
  FloatBuffer parameters(layer.parameterCount()), gradients(layer.parameterCount());
  layer.bindParameters(parameters.data(), gradients.data());
  Random random(3);
  layer.initialize(random);

  Tensor input({batch, in}), output, upstream({batch, out}), gradInput;
  fillRandom(input.data(), input.size(), 1);
  fillRandom(upstream.data(), upstream.size(), 2);
  layer.forward(input, output);
  ASSERT_EQ(output.shape(), (std::vector<int64_t>{batch, out}));
  layer.backward(input, output, upstream, &gradInput, {});
  ASSERT_EQ(gradInput.shape(), (std::vector<int64_t>{batch, in}));

  auto loss = [&] {
    Tensor probe;
    layer.forward(input, probe);
    return projectedSum(probe, upstream);
  };
  for (int64_t i = 0; i < layer.parameterCount(); ++i)
    expectGradientNear(gradients.data()[i], centralDifference(parameters.data() + i, loss),
                       (i < in * out ? "weight " : "bias ") + std::to_string(i));
  for (int64_t i = 0; i < input.size(); ++i)
    expectGradientNear(gradInput.data()[i], centralDifference(input.data() + i, loss), "input " + std::to_string(i));
}

TEST(LinearGradient, BackwardOverwritesParameterGradients) {
  Linear layer(2, 2);
  FloatBuffer parameters(layer.parameterCount()), gradients(layer.parameterCount());
  layer.bindParameters(parameters.data(), gradients.data());
  Random random(4);
  layer.initialize(random);
  Tensor input({3, 2}), output, upstream({3, 2});
  fillRandom(input.data(), input.size(), 5);
  fillRandom(upstream.data(), upstream.size(), 6);
  layer.forward(input, output);
  layer.backward(input, output, upstream, nullptr, {});
  const std::vector<float> once(gradients.data(), gradients.data() + gradients.size());
  // Whatever the buffer held before (a spare from the microbatch accumulator, last step's gradients),
  // backward replaces it: the same bits as into a zeroed buffer.
  std::fill_n(gradients.data(), gradients.size(), std::numeric_limits<float>::quiet_NaN());
  layer.backward(input, output, upstream, nullptr, {});
  EXPECT_EQ(std::vector<float>(gradients.data(), gradients.data() + gradients.size()), once);
}

TEST(LinearForward, ComputesXWTransposePlusBias) {
  Linear layer(2, 3);
  // W (3, 2) then b (3).
  std::vector<float> parameters = {1, 2, 3, 4, 5, 6, 0.5f, -1, 2};
  std::vector<float> gradients(parameters.size());
  layer.bindParameters(parameters.data(), gradients.data());
  Tensor input({2, 2}), output;
  const float x[] = {1, -1, 2, 0.5f};
  std::memcpy(input.data(), x, sizeof(x));
  layer.forward(input, output);
  const std::vector<float> expected = {1 - 2 + 0.5f, 3 - 4 - 1, 5 - 6 + 2, 2 + 1 + 0.5f, 6 + 2 - 1, 10 + 3 + 2};
  EXPECT_EQ(std::vector<float>(output.data(), output.data() + output.size()), expected);
}

class ActivationGradient : public ::testing::TestWithParam<ActivationKind> {};

TEST_P(ActivationGradient, InputMatchesFiniteDifferences) {
  const int64_t batch = 4, features = 6;
  Activation layer(GetParam(), features);
  Tensor input({batch, features}), output, upstream({batch, features}), gradInput;
  fillRandom(input.data(), input.size(), 7, -2.0f, 2.0f);
  // Keep ReLU inputs away from its kink so a +-eps step never crosses zero.
  for (int64_t i = 0; i < input.size(); ++i)
    if (std::abs(input.data()[i]) < 0.05f) input.data()[i] = 0.3f;
  fillRandom(upstream.data(), upstream.size(), 8);
  layer.forward(input, output);
  layer.backward(input, output, upstream, &gradInput, {});
  ASSERT_EQ(gradInput.shape(), input.shape());
  auto loss = [&] {
    Tensor probe;
    layer.forward(input, probe);
    return projectedSum(probe, upstream);
  };
  for (int64_t i = 0; i < input.size(); ++i)
    expectGradientNear(gradInput.data()[i], centralDifference(input.data() + i, loss), "input " + std::to_string(i));
}

INSTANTIATE_TEST_SUITE_P(ReluAndGelu, ActivationGradient,
                         ::testing::Values(ActivationKind::kRelu, ActivationKind::kGelu),
                         [](const auto& info) { return info.param == ActivationKind::kRelu ? "Relu" : "Gelu"; });

class MlpGradient : public ::testing::TestWithParam<ActivationKind> {};

// Mean softmax cross-entropy of a small mlp: every parameter's gradient against central differences.
TEST_P(MlpGradient, EveryParameterMatchesFiniteDifferences) {
  const int64_t batch = 4, features = 5, classes = 3;
  auto network = buildMlp(features, {6, 4}, classes, GetParam());
  network->initialize(11);
  Tensor input({batch, features});
  fillRandom(input.data(), input.size(), 12, -2.0f, 2.0f);
  const std::vector<int32_t> labels = {0, 2, 1, 2};

  auto loss = [&] {
    const Tensor& logits = network->forward(input);
    return kernels::softmax_cross_entropy(batch, classes, logits.data(), labels.data(), 0.0f, nullptr, nullptr) / batch;
  };
  const Tensor& logits = network->forward(input);
  Tensor gradLogits({batch, classes});
  kernels::softmax_cross_entropy(batch, classes, logits.data(), labels.data(), 1.0f / batch, gradLogits.data(), nullptr);
  network->zeroGradients();
  network->backward(gradLogits);
  const std::vector<float> analytic(network->gradients(), network->gradients() + network->parameterCount());

  double largest = 0.0;
  for (int64_t i = 0; i < network->parameterCount(); ++i) {
    const double numeric = centralDifference(network->parameters() + i, loss);
    largest = std::max(largest, std::abs(numeric));
    expectGradientNear(analytic[i], numeric, "parameter " + std::to_string(i));
  }
  EXPECT_GT(largest, 1e-2);  // the check compared real gradients, not zeros
}

INSTANTIATE_TEST_SUITE_P(ReluAndGelu, MlpGradient, ::testing::Values(ActivationKind::kRelu, ActivationKind::kGelu),
                         [](const auto& info) { return info.param == ActivationKind::kRelu ? "Relu" : "Gelu"; });

TEST(Sequential, BackwardReportsReadyOffsetsInDescendingOrderEndingAtZero) {
  auto network = buildMlp(4, {5, 3}, 2, ActivationKind::kRelu);
  network->initialize(1);
  network->setGradientChunkFloats(8);  // linear(4->5) in 2-row chunks, linear(5->3) 1 row, linear(3->2) 2 rows
  Tensor input({2, 4});
  fillRandom(input.data(), input.size(), 2);
  const Tensor& output = network->forward(input);
  Tensor gradOutput(output.shape());
  fillRandom(gradOutput.data(), gradOutput.size(), 3);
  std::vector<int64_t> reported;
  network->backward(gradOutput, [&](int64_t offset) { reported.push_back(offset); });
  // Exactly the promised pieces, in order, then the final 0.
  std::vector<int64_t> expected = network->gradientReadyOffsets();
  expected.push_back(0);
  EXPECT_EQ(reported, expected);
  EXPECT_TRUE(std::is_sorted(reported.rbegin(), reported.rend()));
  // Layers: 25 + 18 + 8 parameters; the last layer's bias starts at 25 + 18 + 6.
  EXPECT_EQ(reported.front(), 49);
}

TEST(Sequential, ChunkedBackwardComputesTheSameGradients) {
  auto whole = buildMlp(6, {7, 5}, 3, ActivationKind::kGelu);
  auto chunked = buildMlp(6, {7, 5}, 3, ActivationKind::kGelu);
  whole->initialize(4);
  chunked->initialize(4);
  chunked->setGradientChunkFloats(6);
  Tensor input({3, 6});
  fillRandom(input.data(), input.size(), 5);
  Tensor gradOutput({3, 3});
  fillRandom(gradOutput.data(), gradOutput.size(), 6);
  whole->forward(input);
  whole->backward(gradOutput);
  // Each chunk overwrites its rows: nothing of what the buffer held survives.
  std::fill_n(chunked->gradients(), chunked->parameterCount(), std::numeric_limits<float>::quiet_NaN());
  chunked->forward(input);
  chunked->backward(gradOutput);
  for (int64_t i = 0; i < whole->parameterCount(); ++i)
    EXPECT_FLOAT_EQ(chunked->gradients()[i], whole->gradients()[i]) << "parameter " << i;
}

TEST(Sequential, ParameterLayoutIsContiguousWithTrailingSlots) {
  auto network = buildMlp(7, {5, 3}, 2, ActivationKind::kGelu, /*trailingGradientSlots=*/2);
  // linear(7->5), gelu, linear(5->3), gelu, linear(3->2)
  const std::vector<int64_t> counts = {7 * 5 + 5, 0, 5 * 3 + 3, 0, 3 * 2 + 2};
  ASSERT_EQ(network->layerCount(), counts.size());
  int64_t offset = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    EXPECT_EQ(network->parameterRange(i), std::make_pair(offset, counts[i])) << "layer " << i;
    EXPECT_EQ(network->layer(i).parameterCount(), counts[i]);
    offset += counts[i];
  }
  EXPECT_EQ(network->parameterCount(), offset);
  EXPECT_EQ(network->trailingGradientSlotCount(), 2);
  EXPECT_EQ(network->trailingGradientSlots(), network->gradients() + offset);
  EXPECT_EQ(network->forwardMacsPerSample(), 7 * 5 + 5 * 3 + 3 * 2);

  // Backward writes parameter gradients only: the trailing slots keep what the caller put there.
  network->initialize(5);
  network->zeroGradients();
  network->trailingGradientSlots()[0] = 42.0f;
  network->trailingGradientSlots()[1] = -1.0f;
  Tensor input({3, 7});
  fillRandom(input.data(), input.size(), 6);
  const Tensor& output = network->forward(input);
  Tensor gradOutput(output.shape());
  fillRandom(gradOutput.data(), gradOutput.size(), 7);
  network->backward(gradOutput);
  EXPECT_EQ(network->trailingGradientSlots()[0], 42.0f);
  EXPECT_EQ(network->trailingGradientSlots()[1], -1.0f);
}

TEST(Sequential, LayerGradientsLandInTheirParameterRange) {
  // Every linear layer's backward writes a non-zero gradient into its own range of the flat buffer.
  auto network = buildMlp(3, {4}, 2, ActivationKind::kGelu);
  network->initialize(9);
  network->zeroGradients();
  Tensor input({2, 3});
  fillRandom(input.data(), input.size(), 10);
  const Tensor& output = network->forward(input);
  Tensor gradOutput(output.shape());
  fillRandom(gradOutput.data(), gradOutput.size(), 11);
  network->backward(gradOutput);
  for (size_t layer : {size_t{0}, size_t{2}}) {
    const auto [offset, count] = network->parameterRange(layer);
    double norm = 0.0;
    for (int64_t i = offset; i < offset + count; ++i) norm += std::abs(network->gradients()[i]);
    EXPECT_GT(norm, 0.0) << "layer " << layer;
  }
}

TEST(Sequential, SameSeedSameInitialisationDifferentSeedDifferent) {
  auto first = buildMlp(10, {8}, 4, ActivationKind::kRelu);
  auto second = buildMlp(10, {8}, 4, ActivationKind::kRelu);
  auto third = buildMlp(10, {8}, 4, ActivationKind::kRelu);
  first->initialize(123);
  second->initialize(123);
  third->initialize(124);
  const int64_t n = first->parameterCount();
  EXPECT_EQ(std::memcmp(first->parameters(), second->parameters(), sizeof(float) * n), 0);
  int64_t differing = 0;
  for (int64_t i = 0; i < n; ++i) differing += first->parameters()[i] != third->parameters()[i];
  EXPECT_GT(differing, n * 9 / 10);
  // PyTorch's nn.Linear bound: U(-1/sqrt(in), 1/sqrt(in)), and not all equal.
  const auto [offset, count] = first->parameterRange(0);
  for (int64_t i = offset; i < offset + count; ++i) EXPECT_LE(std::abs(first->parameters()[i]), 1.0 / std::sqrt(10.0));
  EXPECT_NE(first->parameters()[0], first->parameters()[1]);
}

}  // namespace
}  // namespace tandem::model
