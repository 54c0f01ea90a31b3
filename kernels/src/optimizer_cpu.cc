#include "tandem/kernels/optimizer.h"

#include "vector_clones.h"

#include <cmath>

namespace tandem::kernels {

TANDEM_VECTOR_CLONES void adamw_step(int64_t n, float* __restrict param, const float* __restrict grad,
                                      float* __restrict exp_avg, float* __restrict exp_avg_sq, const AdamWParams& p) {
  const float bias_correction1 = 1.0f - static_cast<float>(std::pow(p.beta1, p.step));
  const float bias_correction2 = 1.0f - static_cast<float>(std::pow(p.beta2, p.step));
  const float step_size = p.lr / bias_correction1;
  const float inverse_sqrt_bc2 = 1.0f / std::sqrt(bias_correction2);
  const float decay = 1.0f - p.lr * p.weight_decay;
  const float beta1 = p.beta1, beta2 = p.beta2, eps = p.eps;
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i];
    const float m = beta1 * exp_avg[i] + (1.0f - beta1) * g;
    const float v = beta2 * exp_avg_sq[i] + (1.0f - beta2) * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    const float denominator = std::sqrt(v) * inverse_sqrt_bc2 + eps;
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
