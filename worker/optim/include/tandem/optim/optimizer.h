// Optimizers over one flat parameter buffer (AdamW, SGD with momentum) and learning-rate schedules.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "tandem/tensor/tensor.h"

namespace tandem::optim {

struct ScheduleOptions {
  std::string kind = "constant";  // constant | linear | cosine
  double baseLr = 1e-3;
  int64_t warmupSteps = 0;
  int64_t totalSteps = 1;
};

// Learning rate for 0-based `step`: linear warm-up from baseLr/warmupSteps to baseLr over warmupSteps, then
// constant, linear decay to 0, or cosine decay to 0 at totalSteps.
double learningRate(const ScheduleOptions& options, int64_t step);

struct OptimizerOptions {
  std::string kind = "adamw";  // adamw | sgd
  double weightDecay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // adamw
  double momentum = 0.0;                          // sgd
  bool nesterov = false;                          // sgd
};

class Optimizer {
 public:
  Optimizer(const OptimizerOptions& options, int64_t parameterCount);
  // Applies one update with learning rate lr; counts steps for bias correction.
  void step(float* parameters, const float* gradients, double lr);
  int64_t stepsTaken() const { return steps_; }
  // Optimizer state (moments, momentum buffer) for checkpoints: stateSize() floats.
  int64_t stateSize() const { return state_.size(); }
  float* state() { return state_.data(); }
  void setStepsTaken(int64_t steps) { steps_ = steps; }

 private:
  OptimizerOptions options_;
  int64_t parameterCount_;
  int64_t steps_ = 0;
  FloatBuffer state_;  // adamw: [exp_avg | exp_avg_sq]; sgd: [momentum buffer]
};

}  // namespace tandem::optim
