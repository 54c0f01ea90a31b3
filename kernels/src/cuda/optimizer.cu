#include "tandem/kernels/cuda/ops.h"

#include "launch.h"

namespace tandem::kernels::cuda {
namespace {

// The arithmetic of adamw_step in optimizer_cpu.cc, element for element (same float operations, in the
// same order), so CPU and GPU trajectories compare closely.
__global__ void adamwKernel(int64_t n, float* __restrict__ param, const float* __restrict__ grad,
                            float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq, AdamWParams p,
                            const int64_t* step_counter) {
  const int64_t step = step_counter != nullptr ? *step_counter : p.step;
  const float biasCorrection1 = 1.0f - static_cast<float>(pow(static_cast<double>(p.beta1), static_cast<double>(step)));
  const float biasCorrection2 = 1.0f - static_cast<float>(pow(static_cast<double>(p.beta2), static_cast<double>(step)));
  const float stepSize = p.lr / biasCorrection1;
  const float inverseSqrtBc2 = 1.0f / sqrtf(biasCorrection2);
  const float decay = 1.0f - p.lr * p.weight_decay;
  TANDEM_GRID_STRIDE(i, n) {
    const float g = grad[i];
    const float m = __fadd_rn(__fmul_rn(p.beta1, exp_avg[i]), __fmul_rn(1.0f - p.beta1, g));
    const float v = __fadd_rn(__fmul_rn(p.beta2, exp_avg_sq[i]), __fmul_rn(__fmul_rn(1.0f - p.beta2, g), g));
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    const float denominator = __fadd_rn(__fmul_rn(sqrtf(v), inverseSqrtBc2), p.eps);
    param[i] = __fsub_rn(__fmul_rn(param[i], decay), __fdiv_rn(__fmul_rn(stepSize, m), denominator));
  }
}

__global__ void advanceStep(int64_t* step_counter) { ++*step_counter; }

__global__ void sgdKernel(int64_t n, float* __restrict__ param, const float* __restrict__ grad,
                          float* __restrict__ momentum_buffer, SgdParams p) {
  TANDEM_GRID_STRIDE(i, n) {
    float g = __fadd_rn(grad[i], __fmul_rn(p.weight_decay, param[i]));
    if (p.momentum != 0.0f) {
      const float buf = p.first_step ? g : __fadd_rn(__fmul_rn(p.momentum, momentum_buffer[i]), g);
      momentum_buffer[i] = buf;
      g = p.nesterov ? __fadd_rn(g, __fmul_rn(p.momentum, buf)) : buf;
    }
    param[i] = __fsub_rn(param[i], __fmul_rn(p.lr, g));
  }
}

}  // namespace

void adamw_step(int64_t n, float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                const AdamWParams& params, int64_t* step_counter, cudaStream_t stream) {
  detail::launchOver("adamw_step", adamwKernel, n, stream, param, grad, exp_avg, exp_avg_sq, params,
                     static_cast<const int64_t*>(step_counter));
  if (step_counter != nullptr) {
    advanceStep<<<1, 1, 0, stream>>>(step_counter);
    detail::checkLaunch("adamw_step (advance step)");
  }
}

void sgd_step(int64_t n, float* param, const float* grad, float* momentum_buffer, const SgdParams& params,
              cudaStream_t stream) {
  detail::launchOver("sgd_step", sgdKernel, n, stream, param, grad, momentum_buffer, params);
}

}  // namespace tandem::kernels::cuda
