#include "tandem/optim/optimizer.h"

#include <algorithm>
#include <cmath>

#include "tandem/kernels/optimizer.h"

namespace tandem::optim {

double learningRate(const ScheduleOptions& options, int64_t step) {
  if (options.warmupSteps > 0 && step < options.warmupSteps)
    return options.baseLr * static_cast<double>(step + 1) / static_cast<double>(options.warmupSteps);
  if (options.kind == "constant") return options.baseLr;
  const int64_t decaySteps = std::max<int64_t>(1, options.totalSteps - options.warmupSteps);
  const double progress = std::clamp(static_cast<double>(step - options.warmupSteps) / decaySteps, 0.0, 1.0);
  if (options.kind == "linear") return options.baseLr * (1.0 - progress);
  return options.baseLr * 0.5 * (1.0 + std::cos(M_PI * progress));  // cosine
}

Optimizer::Optimizer(const OptimizerOptions& options, int64_t parameterCount)
    : options_(options), parameterCount_(parameterCount) {
  if (options_.kind == "adamw")
    state_.resize(2 * parameterCount);
  else if (options_.momentum != 0.0)
    state_.resize(parameterCount);
}

void Optimizer::step(float* parameters, const float* gradients, double lr) {
  ++steps_;
  if (options_.kind == "adamw") {
    kernels::AdamWParams params;
    params.lr = static_cast<float>(lr);
    params.beta1 = static_cast<float>(options_.beta1);
    params.beta2 = static_cast<float>(options_.beta2);
    params.eps = static_cast<float>(options_.eps);
    params.weight_decay = static_cast<float>(options_.weightDecay);
    params.step = steps_;
    kernels::adamw_step(parameterCount_, parameters, gradients, state_.data(), state_.data() + parameterCount_, params);
    return;
  }
  kernels::SgdParams params;
  params.lr = static_cast<float>(lr);
  params.momentum = static_cast<float>(options_.momentum);
  params.weight_decay = static_cast<float>(options_.weightDecay);
  params.nesterov = options_.nesterov;
  params.first_step = steps_ == 1;
  kernels::sgd_step(parameterCount_, parameters, gradients, state_.data(), params);
}

}  // namespace tandem::optim
