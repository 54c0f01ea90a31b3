// kernels: gemm vs a naive loop (all transposes, padded leading dimensions, alpha/beta), bias/relu/gelu
// forward+backward vs hand values, softmax cross-entropy vs a direct computation and finite differences,
// and the AdamW/SGD updates vs PyTorch's documented formulas over several steps.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "tandem/kernels/cross_entropy.h"
#include "tandem/kernels/elementwise.h"
#include "tandem/kernels/gemm.h"
#include "tandem/kernels/optimizer.h"

namespace tandem::kernels {
namespace {

std::vector<float> randomVector(size_t n, uint32_t seed, float low = -1.0f, float high = 1.0f) {
  std::mt19937 engine(seed);
  std::uniform_real_distribution<float> distribution(low, high);
  std::vector<float> values(n);
  for (float& value : values) value = distribution(engine);
  return values;
}

// ---------------------------------------------------------------- gemm

struct GemmCase {
  Transpose transposeA, transposeB;
  int64_t m, n, k;
  float alpha, beta;
  int64_t padding;  // extra columns in every leading dimension
};

class GemmTest : public ::testing::TestWithParam<GemmCase> {};

TEST_P(GemmTest, MatchesNaiveTripleLoop) {
  const GemmCase& c = GetParam();
  const bool ta = c.transposeA == Transpose::kYes, tb = c.transposeB == Transpose::kYes;
  // Stored shapes: A is (m, k) or, transposed, (k, m); B is (k, n) or (n, k). Row-major with padding.
  const int64_t aRows = ta ? c.k : c.m, aCols = ta ? c.m : c.k;
  const int64_t bRows = tb ? c.n : c.k, bCols = tb ? c.k : c.n;
  const int64_t lda = aCols + c.padding, ldb = bCols + c.padding, ldc = c.n + c.padding;
  const auto a = randomVector(aRows * lda, 1);
  const auto b = randomVector(bRows * ldb, 2);
  auto result = randomVector(c.m * ldc, 3);
  const auto initial = result;

  gemm(c.transposeA, c.transposeB, c.m, c.n, c.k, c.alpha, a.data(), lda, b.data(), ldb, c.beta, result.data(), ldc);

  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t j = 0; j < c.n; ++j) {
      double sum = 0.0;
      for (int64_t p = 0; p < c.k; ++p) {
        const double aValue = ta ? a[p * lda + i] : a[i * lda + p];
        const double bValue = tb ? b[j * ldb + p] : b[p * ldb + j];
        sum += aValue * bValue;
      }
      const double expected = c.alpha * sum + c.beta * initial[i * ldc + j];
      EXPECT_NEAR(result[i * ldc + j], expected, 1e-4 * (1.0 + std::abs(expected))) << "C[" << i << "," << j << "]";
    }
    // The padding columns of C are not part of the matrix: untouched.
    for (int64_t j = c.n; j < ldc; ++j) EXPECT_EQ(result[i * ldc + j], initial[i * ldc + j]);
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllTransposes, GemmTest,
    ::testing::Values(GemmCase{Transpose::kNo, Transpose::kNo, 5, 7, 3, 1.0f, 0.0f, 0},
                      GemmCase{Transpose::kNo, Transpose::kYes, 5, 7, 3, 1.0f, 0.0f, 0},
                      GemmCase{Transpose::kYes, Transpose::kNo, 5, 7, 3, 1.0f, 0.0f, 0},
                      GemmCase{Transpose::kYes, Transpose::kYes, 5, 7, 3, 1.0f, 0.0f, 0},
                      GemmCase{Transpose::kNo, Transpose::kNo, 17, 4, 33, 0.5f, 1.0f, 3},
                      GemmCase{Transpose::kNo, Transpose::kYes, 17, 4, 33, -2.0f, 0.25f, 3},
                      GemmCase{Transpose::kYes, Transpose::kNo, 4, 17, 33, 1.5f, -1.0f, 2},
                      GemmCase{Transpose::kYes, Transpose::kYes, 9, 1, 64, 0.75f, 2.0f, 1},
                      GemmCase{Transpose::kNo, Transpose::kNo, 1, 31, 1, 3.0f, 0.5f, 0},
                      GemmCase{Transpose::kNo, Transpose::kNo, 70, 65, 129, 1.0f, 1.0f, 0}),
    [](const auto& info) {
      const GemmCase& c = info.param;
      return std::string(c.transposeA == Transpose::kYes ? "T" : "N") + (c.transposeB == Transpose::kYes ? "T" : "N") +
             "_" + std::to_string(c.m) + "x" + std::to_string(c.n) + "x" + std::to_string(c.k) + "_" +
             std::to_string(info.index);
    });

TEST(GemmThreads, SetAndGet) {
  const int before = gemmThreads();
  setGemmThreads(1);
  EXPECT_EQ(gemmThreads(), 1);
  setGemmThreads(0);  // clamped to one thread
  EXPECT_EQ(gemmThreads(), 1);
  setGemmThreads(before);
}

// ---------------------------------------------------------------- bias and activations

TEST(BiasKernels, BroadcastRowsCopiesTheBiasIntoEveryRow) {
  const std::vector<float> bias = {1.0f, -2.0f, 3.5f};
  std::vector<float> out(2 * 3, 99.0f);
  broadcast_rows(2, 3, bias.data(), out.data());
  EXPECT_EQ(out, (std::vector<float>{1.0f, -2.0f, 3.5f, 1.0f, -2.0f, 3.5f}));
}

TEST(BiasKernels, BiasBackwardAccumulatesColumnSums) {
  const std::vector<float> gradOut = {1.0f, 2.0f, 3.0f,  //
                                      4.0f, 5.0f, 6.0f};
  std::vector<float> gradBias = {10.0f, 20.0f, 30.0f};
  bias_backward(2, 3, gradOut.data(), gradBias.data());
  EXPECT_EQ(gradBias, (std::vector<float>{15.0f, 27.0f, 39.0f}));  // += , not =
}

TEST(Relu, ForwardAndBackward) {
  const std::vector<float> in = {-2.0f, -0.0f, 0.0f, 0.5f, 3.0f};
  std::vector<float> out(in.size());
  relu_forward(5, in.data(), out.data());
  EXPECT_EQ(out, (std::vector<float>{0.0f, 0.0f, 0.0f, 0.5f, 3.0f}));

  const std::vector<float> gradOut = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f};
  std::vector<float> gradIn(in.size(), -1.0f);
  relu_backward(5, out.data(), gradOut.data(), gradIn.data());
  EXPECT_EQ(gradIn, (std::vector<float>{0.0f, 0.0f, 0.0f, 4.0f, 5.0f}));
}

TEST(Relu, InPlace) {
  std::vector<float> values = {-1.0f, 2.0f};
  relu_forward(2, values.data(), values.data());
  EXPECT_EQ(values, (std::vector<float>{0.0f, 2.0f}));
  std::vector<float> grad = {7.0f, 8.0f};
  relu_backward(2, values.data(), grad.data(), grad.data());
  EXPECT_EQ(grad, (std::vector<float>{0.0f, 8.0f}));
}

// Values of the tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) and its derivative,
// computed in double precision outside the code under test.
TEST(Gelu, ForwardAndBackwardMatchHandValues) {
  const std::vector<float> x = {-3.0f, -1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 2.0f, 3.0f};
  const std::vector<double> value = {-0.0036373920817729943, -0.15880800939172324, -0.15428599017485606, 0.0,
                                     0.34571400982514394,    0.8411919906082768,   1.954597694087775,    2.996362607918227};
  const std::vector<double> slope = {-0.011584166630969516, -0.08296408384578255, 0.13263009646535764, 0.5,
                                     0.8673699035346424,    1.0829640838457826,   1.0860992566236183,  1.0115841666309695};
  std::vector<float> out(x.size());
  gelu_forward(static_cast<int64_t>(x.size()), x.data(), out.data());
  const std::vector<float> gradOut(x.size(), 2.0f);
  std::vector<float> gradIn(x.size());
  gelu_backward(static_cast<int64_t>(x.size()), x.data(), gradOut.data(), gradIn.data());
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_NEAR(out[i], value[i], 1e-6) << "gelu(" << x[i] << ")";
    EXPECT_NEAR(gradIn[i], 2.0 * slope[i], 2e-6) << "gelu'(" << x[i] << ")";
  }
}

// ---------------------------------------------------------------- softmax cross-entropy

double directCrossEntropy(int64_t rows, int64_t classes, const std::vector<float>& logits,
                          const std::vector<int32_t>& labels) {
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    double denominator = 0.0;
    for (int64_t c = 0; c < classes; ++c) denominator += std::exp(static_cast<double>(logits[r * classes + c]));
    total += -std::log(std::exp(static_cast<double>(logits[r * classes + labels[r]])) / denominator);
  }
  return total;
}

TEST(SoftmaxCrossEntropy, LossMatchesDirectComputation) {
  const int64_t rows = 6, classes = 5;
  const auto logits = randomVector(rows * classes, 11, -3.0f, 3.0f);
  const std::vector<int32_t> labels = {0, 4, 2, 2, 1, 3};
  const double loss = softmax_cross_entropy(rows, classes, logits.data(), labels.data(), 1.0f, nullptr, nullptr);
  const double direct = directCrossEntropy(rows, classes, logits, labels);
  // The kernel subtracts the row maximum in float: agreement to float precision.
  EXPECT_NEAR(loss, direct, 1e-6 * direct);
}

TEST(SoftmaxCrossEntropy, UniformLogitsGiveLogClasses) {
  const std::vector<float> logits(3 * 4, 0.7f);
  const std::vector<int32_t> labels = {0, 1, 3};
  EXPECT_NEAR(softmax_cross_entropy(3, 4, logits.data(), labels.data(), 1.0f, nullptr, nullptr), 3.0 * std::log(4.0),
              1e-9);
}

TEST(SoftmaxCrossEntropy, StableForLargeLogits) {
  const std::vector<float> logits = {1000.0f, 0.0f, -1000.0f, 2000.0f};
  const std::vector<int32_t> labels = {1, 0};
  const double loss = softmax_cross_entropy(2, 2, logits.data(), labels.data(), 1.0f, nullptr, nullptr);
  // Row 0: -log softmax = 1000 exactly; row 1: 3000.
  EXPECT_NEAR(loss, 4000.0, 1e-6);
}

TEST(SoftmaxCrossEntropy, GradientMatchesFiniteDifferences) {
  const int64_t rows = 4, classes = 6;
  auto logits = randomVector(rows * classes, 21, -2.0f, 2.0f);
  const std::vector<int32_t> labels = {5, 0, 3, 3};
  const float gradScale = 0.25f;  // mean over the 4 rows
  std::vector<float> grad(rows * classes);
  softmax_cross_entropy(rows, classes, logits.data(), labels.data(), gradScale, grad.data(), nullptr);

  for (int64_t i = 0; i < rows * classes; ++i) {
    const float original = logits[i];
    logits[i] = original + 1e-3f;
    const float up = logits[i];
    const double lossUp = softmax_cross_entropy(rows, classes, logits.data(), labels.data(), 1.0f, nullptr, nullptr);
    logits[i] = original - 1e-3f;
    const float down = logits[i];
    const double lossDown = softmax_cross_entropy(rows, classes, logits.data(), labels.data(), 1.0f, nullptr, nullptr);
    logits[i] = original;
    const double numeric = gradScale * (lossUp - lossDown) / (static_cast<double>(up) - down);
    EXPECT_NEAR(grad[i], numeric, 1e-2 * std::abs(numeric) + 1e-5) << "logit " << i;
  }
  // Each row of softmax - onehot sums to zero.
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0.0;
    for (int64_t c = 0; c < classes; ++c) sum += grad[r * classes + c];
    EXPECT_NEAR(sum, 0.0, 1e-6);
  }
}

TEST(SoftmaxCrossEntropy, CountsCorrectArgmax) {
  const std::vector<float> logits = {0.1f, 0.9f, 0.0f,    // argmax 1
                                     2.0f, -1.0f, 1.0f,   // argmax 0
                                     0.0f, 0.0f, 5.0f,    // argmax 2
                                     -1.0f, 3.0f, 2.9f};  // argmax 1
  const std::vector<int32_t> labels = {1, 2, 2, 2};
  int64_t correct = -1;
  softmax_cross_entropy(4, 3, logits.data(), labels.data(), 1.0f, nullptr, &correct);
  EXPECT_EQ(correct, 2);
}

// ---------------------------------------------------------------- optimizers

// torch.optim.AdamW: p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
TEST(AdamW, MatchesPyTorchFormulaOverSeveralSteps) {
  const int64_t n = 7;
  auto param = randomVector(n, 31);
  std::vector<double> referenceParam(param.begin(), param.end());
  std::vector<float> expAvg(n, 0.0f), expAvgSq(n, 0.0f);
  std::vector<double> m(n, 0.0), v(n, 0.0);
  AdamWParams params;
  params.lr = 0.01f;
  params.beta1 = 0.8f;
  params.beta2 = 0.95f;
  params.eps = 1e-6f;
  params.weight_decay = 0.1f;
  for (int64_t step = 1; step <= 5; ++step) {
    const auto grad = randomVector(n, 100 + static_cast<uint32_t>(step), -2.0f, 2.0f);
    params.step = step;
    adamw_step(n, param.data(), grad.data(), expAvg.data(), expAvgSq.data(), params);
    const double b1 = params.beta1, b2 = params.beta2, lr = params.lr;
    for (int64_t i = 0; i < n; ++i) {
      referenceParam[i] -= lr * params.weight_decay * referenceParam[i];
      m[i] = b1 * m[i] + (1 - b1) * grad[i];
      v[i] = b2 * v[i] + (1 - b2) * grad[i] * grad[i];
      const double denominator = std::sqrt(v[i]) / std::sqrt(1 - std::pow(b2, step)) + params.eps;
      referenceParam[i] -= lr / (1 - std::pow(b1, step)) * m[i] / denominator;
    }
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_NEAR(param[i], referenceParam[i], 1e-5) << "step " << step << " param " << i;
      EXPECT_NEAR(expAvg[i], m[i], 1e-6);
      EXPECT_NEAR(expAvgSq[i], v[i], 1e-6);
    }
  }
}

TEST(AdamW, FirstStepMovesEachParameterByLrTimesSignOfGradient) {
  // With bias correction, step 1 gives m/sqrt(v) = g/|g|: every parameter moves by lr (eps aside).
  std::vector<float> param = {1.0f, -1.0f, 0.5f};
  const std::vector<float> grad = {3.0f, -0.001f, 40.0f};
  std::vector<float> expAvg(3, 0.0f), expAvgSq(3, 0.0f);
  AdamWParams params;
  params.lr = 0.1f;
  params.eps = 0.0f;
  adamw_step(3, param.data(), grad.data(), expAvg.data(), expAvgSq.data(), params);
  EXPECT_NEAR(param[0], 0.9f, 1e-6);
  EXPECT_NEAR(param[1], -0.9f, 1e-6);
  EXPECT_NEAR(param[2], 0.4f, 1e-6);
}

struct SgdCase {
  float momentum, weightDecay;
  bool nesterov;
};

class SgdTest : public ::testing::TestWithParam<SgdCase> {};

// torch.optim.SGD (dampening 0): g += wd p; buf = g on the first step, else momentum buf + g;
// g = nesterov ? g + momentum buf : buf; p -= lr g.
TEST_P(SgdTest, MatchesPyTorchFormulaOverSeveralSteps) {
  const SgdCase& c = GetParam();
  const int64_t n = 5;
  auto param = randomVector(n, 41);
  std::vector<double> reference(param.begin(), param.end());
  std::vector<float> buffer(n, 123.0f);  // garbage: the first step must not read it
  std::vector<double> referenceBuffer(n, 0.0);
  SgdParams params;
  params.lr = 0.05f;
  params.momentum = c.momentum;
  params.weight_decay = c.weightDecay;
  params.nesterov = c.nesterov;
  for (int step = 0; step < 6; ++step) {
    const auto grad = randomVector(n, 200 + step, -1.0f, 1.0f);
    params.first_step = step == 0;
    sgd_step(n, param.data(), grad.data(), buffer.data(), params);
    for (int64_t i = 0; i < n; ++i) {
      double g = grad[i] + static_cast<double>(c.weightDecay) * reference[i];
      if (c.momentum != 0.0f) {
        referenceBuffer[i] = step == 0 ? g : c.momentum * referenceBuffer[i] + g;
        g = c.nesterov ? g + c.momentum * referenceBuffer[i] : referenceBuffer[i];
      }
      reference[i] -= params.lr * g;
    }
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_NEAR(param[i], reference[i], 1e-5) << "step " << step << " param " << i;
      if (c.momentum != 0.0f) {
        EXPECT_NEAR(buffer[i], referenceBuffer[i], 1e-5);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, SgdTest,
                         ::testing::Values(SgdCase{0.0f, 0.0f, false}, SgdCase{0.0f, 0.01f, false},
                                           SgdCase{0.9f, 0.0f, false}, SgdCase{0.9f, 0.0f, true},
                                           SgdCase{0.8f, 0.05f, false}, SgdCase{0.8f, 0.05f, true}),
                         [](const auto& info) {
                           const SgdCase& c = info.param;
                           std::string name = c.momentum == 0.0f ? "Plain" : (c.nesterov ? "Nesterov" : "Momentum");
                           return name + (c.weightDecay != 0.0f ? "WeightDecay" : "");
                         });

TEST(Sgd, HandComputedMomentumSteps) {
  // p = 1, g = 1 each step, lr 0.1, momentum 0.5: buf 1, 1.5, 1.75 -> p 0.9, 0.75, 0.575.
  float param = 1.0f, buffer = 0.0f;
  const float grad = 1.0f;
  SgdParams params;
  params.lr = 0.1f;
  params.momentum = 0.5f;
  const float expected[] = {0.9f, 0.75f, 0.575f};
  for (int step = 0; step < 3; ++step) {
    params.first_step = step == 0;
    sgd_step(1, &param, &grad, &buffer, params);
    EXPECT_NEAR(param, expected[step], 1e-6) << "step " << step;
  }
}

}  // namespace
}  // namespace tandem::kernels
