// optim: learningRate for the constant, warm-up, linear and cosine schedules at key steps (closed form),
// and the Optimizer class counting steps for AdamW bias correction and SGD's first momentum step.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "tandem/optim/optimizer.h"

namespace tandem::optim {
namespace {

ScheduleOptions schedule(const std::string& kind, double baseLr, int64_t warmupSteps, int64_t totalSteps) {
  ScheduleOptions options;
  options.kind = kind;
  options.baseLr = baseLr;
  options.warmupSteps = warmupSteps;
  options.totalSteps = totalSteps;
  return options;
}

struct LrCase {
  std::string name;
  ScheduleOptions options;
  int64_t step;
  double expected;
};

class LearningRateTest : public ::testing::TestWithParam<LrCase> {};

TEST_P(LearningRateTest, ClosedForm) {
  const LrCase& c = GetParam();
  EXPECT_NEAR(learningRate(c.options, c.step), c.expected, 1e-12);
}

const double kPi = std::acos(-1.0);

INSTANTIATE_TEST_SUITE_P(
    Schedules, LearningRateTest,
    ::testing::Values(
        // constant: the base rate at every step, before and after "total".
        LrCase{"ConstantFirst", schedule("constant", 0.1, 0, 100), 0, 0.1},
        LrCase{"ConstantLate", schedule("constant", 0.1, 0, 100), 500, 0.1},
        // warm-up: base * (step + 1) / warmup, reaching base on the last warm-up step.
        LrCase{"WarmupFirst", schedule("constant", 0.1, 4, 100), 0, 0.025},
        LrCase{"WarmupMiddle", schedule("constant", 0.1, 4, 100), 1, 0.05},
        LrCase{"WarmupLast", schedule("constant", 0.1, 4, 100), 3, 0.1},
        LrCase{"WarmupThenConstant", schedule("constant", 0.1, 4, 100), 4, 0.1},
        // linear: base * (1 - progress), progress = (step - warmup) / (total - warmup), clamped.
        LrCase{"LinearStart", schedule("linear", 2.0, 0, 10), 0, 2.0},
        LrCase{"LinearQuarter", schedule("linear", 2.0, 0, 8), 2, 1.5},
        LrCase{"LinearHalf", schedule("linear", 2.0, 0, 10), 5, 1.0},
        LrCase{"LinearEnd", schedule("linear", 2.0, 0, 10), 10, 0.0},
        LrCase{"LinearPastEnd", schedule("linear", 2.0, 0, 10), 25, 0.0},
        LrCase{"LinearAfterWarmup", schedule("linear", 1.0, 2, 12), 2, 1.0},
        LrCase{"LinearWarmupHalf", schedule("linear", 1.0, 2, 12), 7, 0.5},
        LrCase{"LinearWarmupFirst", schedule("linear", 1.0, 2, 12), 0, 0.5},
        // cosine: base * (1 + cos(pi * progress)) / 2.
        LrCase{"CosineStart", schedule("cosine", 1.0, 0, 10), 0, 1.0},
        LrCase{"CosineQuarter", schedule("cosine", 1.0, 0, 8), 2, 0.5 * (1 + std::cos(kPi / 4))},
        LrCase{"CosineHalf", schedule("cosine", 1.0, 0, 10), 5, 0.5},
        LrCase{"CosineEnd", schedule("cosine", 1.0, 0, 10), 10, 0.0},
        LrCase{"CosinePastEnd", schedule("cosine", 1.0, 0, 10), 11, 0.0},
        LrCase{"CosineWarmupFirst", schedule("cosine", 3e-4, 3, 13), 0, 1e-4},
        LrCase{"CosineAfterWarmup", schedule("cosine", 3e-4, 3, 13), 3, 3e-4},
        LrCase{"CosineWarmupHalf", schedule("cosine", 3e-4, 3, 13), 8, 1.5e-4}),
    [](const auto& info) { return info.param.name; });

TEST(LearningRate, CosineDecreasesMonotonically) {
  const auto options = schedule("cosine", 1.0, 5, 50);
  for (int64_t step = 5; step < 50; ++step)
    EXPECT_GT(learningRate(options, step), learningRate(options, step + 1)) << "step " << step;
}

TEST(Optimizer, AdamWCountsStepsForBiasCorrection) {
  // With bias correction every step of a constant gradient moves each parameter by lr (eps = 0), and
  // the moments start at zero: three steps move it by exactly 3 lr.
  OptimizerOptions options;
  options.kind = "adamw";
  options.eps = 0.0;
  Optimizer optimizer(options, 2);
  EXPECT_EQ(optimizer.stateSize(), 4);  // exp_avg and exp_avg_sq
  std::vector<float> parameters = {1.0f, 2.0f};
  const std::vector<float> gradients = {0.5f, -4.0f};
  for (int i = 0; i < 3; ++i) optimizer.step(parameters.data(), gradients.data(), 0.01);
  EXPECT_EQ(optimizer.stepsTaken(), 3);
  EXPECT_NEAR(parameters[0], 0.97f, 1e-5);
  EXPECT_NEAR(parameters[1], 2.03f, 1e-5);
}

TEST(Optimizer, SgdMomentumStartsFromTheFirstGradient) {
  OptimizerOptions options;
  options.kind = "sgd";
  options.momentum = 0.5;
  Optimizer optimizer(options, 1);
  EXPECT_EQ(optimizer.stateSize(), 1);
  float parameter = 1.0f;
  const float gradient = 1.0f;
  // buffer 1, 1.5, 1.75 with lr 0.1.
  optimizer.step(&parameter, &gradient, 0.1);
  EXPECT_NEAR(parameter, 0.9f, 1e-6);
  optimizer.step(&parameter, &gradient, 0.1);
  EXPECT_NEAR(parameter, 0.75f, 1e-6);
  optimizer.step(&parameter, &gradient, 0.1);
  EXPECT_NEAR(parameter, 0.575f, 1e-6);
}

TEST(Optimizer, PlainSgdHasNoState) {
  OptimizerOptions options;
  options.kind = "sgd";
  options.momentum = 0.0;
  options.weightDecay = 0.1;
  Optimizer optimizer(options, 1);
  EXPECT_EQ(optimizer.stateSize(), 0);
  float parameter = 2.0f;
  const float gradient = 1.0f;
  optimizer.step(&parameter, &gradient, 0.5);  // 2 - 0.5 * (1 + 0.1 * 2)
  EXPECT_NEAR(parameter, 1.4f, 1e-6);
}

}  // namespace
}  // namespace tandem::optim
