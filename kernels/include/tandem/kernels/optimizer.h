// Optimizer updates over flat parameter buffers (PyTorch's semantics, so trajectories compare).
#pragma once

#include <cstdint>

namespace tandem::kernels {

struct AdamWParams {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  int64_t step = 1;  // 1-based, for bias correction
};

// Decoupled weight decay, then Adam: param -= lr * wd * param; m, v moments; bias-corrected update.
void adamw_step(int64_t n, float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                const AdamWParams& params);

struct SgdParams {
  float lr = 1e-2f;
  float momentum = 0.0f;
  float weight_decay = 0.0f;
  bool nesterov = false;
  bool first_step = true;  // the momentum buffer starts as the first gradient
};

// grad += wd * param; buf = momentum * buf + grad; param -= lr * (nesterov ? grad + momentum * buf : buf).
void sgd_step(int64_t n, float* param, const float* grad, float* momentum_buffer, const SgdParams& params);

}  // namespace tandem::kernels
