#include "tandem/kernels/optimizer.h"

#include <cmath>

namespace tandem::kernels {

void adamw_step(int64_t n, float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                const AdamWParams& p) {
  const float bias_correction1 = 1.0f - static_cast<float>(std::pow(p.beta1, p.step));
  const float bias_correction2 = 1.0f - static_cast<float>(std::pow(p.beta2, p.step));
  const float step_size = p.lr / bias_correction1;
  const float inverse_sqrt_bc2 = 1.0f / std::sqrt(bias_correction2);
  const float decay = 1.0f - p.lr * p.weight_decay;
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i];
    const float m = p.beta1 * exp_avg[i] + (1.0f - p.beta1) * g;
    const float v = p.beta2 * exp_avg_sq[i] + (1.0f - p.beta2) * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    const float denominator = std::sqrt(v) * inverse_sqrt_bc2 + p.eps;
    param[i] = param[i] * decay - step_size * m / denominator;
  }
}

void sgd_step(int64_t n, float* param, const float* grad, float* momentum_buffer, const SgdParams& p) {
  for (int64_t i = 0; i < n; ++i) {
    float g = grad[i] + p.weight_decay * param[i];
    if (p.momentum != 0.0f) {
      const float buf = p.first_step ? g : p.momentum * momentum_buffer[i] + g;
      momentum_buffer[i] = buf;
      g = p.nesterov ? g + p.momentum * buf : buf;
    }
    param[i] -= p.lr * g;
  }
}

}  // namespace tandem::kernels
