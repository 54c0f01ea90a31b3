// CUDA versions of the kernels in tandem/kernels/*.h: the same arguments and semantics (pointers are
// device pointers), plus the stream they are queued on. Nothing here synchronises with the host or
// allocates from the driver once warm, so a training step built from these can be captured in a CUDA
// graph. Results that the CPU versions return (loss, correct count) are written to device memory.
#pragma once

#include "tandem/kernels/gemm.h"
#include "tandem/kernels/optimizer.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tandem::kernels::cuda {

// --- GEMM through cuBLASLt (gemm_cublaslt.cc) ---
enum class GemmPrecision {
  kFp32,  // fp32 inputs, fp32 accumulate: matches the CPU reference to ~1e-6
  kTf32,  // fp32 inputs, TF32 tensor cores, fp32 accumulate
  kBf16,  // bf16 inputs, fp32 accumulate, fp32 output
};
// Fused epilogues cuBLASLt applies to the output before it is stored: + bias[col], then ReLU or GELU
// (tanh approximation, as gelu_forward).
enum class Epilogue { kNone, kBias, kBiasRelu, kBiasGelu };

// Row-major C (m, n) = alpha * op(A) * op(B) + beta * C (+ epilogue), as kernels::gemm. a and b are
// float* for kFp32/kTf32 and __nv_bfloat16* for kBf16; c and bias are always float*.
void gemm(Transpose transposeA, Transpose transposeB, int64_t m, int64_t n, int64_t k, float alpha, const void* a,
          int64_t lda, const void* b, int64_t ldb, float beta, float* c, int64_t ldc, GemmPrecision precision,
          Epilogue epilogue, const float* bias, cudaStream_t stream);

// --- bias and activations (elementwise.cu) ---
void broadcast_rows(int64_t rows, int64_t cols, const float* bias, float* out, cudaStream_t stream);
// Deterministic column sums (no atomics): the same input gives the same bits on every run.
void bias_backward(int64_t rows, int64_t cols, const float* grad_out, float* grad_bias, cudaStream_t stream);
void relu_forward(int64_t n, const float* in, float* out, cudaStream_t stream);
void relu_backward(int64_t n, const float* out, const float* grad_out, float* grad_in, cudaStream_t stream);
void gelu_forward(int64_t n, const float* in, float* out, cudaStream_t stream);
void gelu_backward(int64_t n, const float* in, const float* grad_out, float* grad_in, cudaStream_t stream);

// --- casts and gradient buckets (elementwise.cu) ---
void cast_to_bf16(int64_t n, const float* in, __nv_bfloat16* out, cudaStream_t stream);
void cast_to_fp32(int64_t n, const __nv_bfloat16* in, float* out, cudaStream_t stream);
// One launch copies `count` tensors into (flatten) or out of (unflatten) a contiguous bucket, tensor i
// at offsets[i] of the bucket. pointers/sizes/offsets are host arrays; they travel as kernel arguments
// (up to kMaxBucketTensors per launch; longer lists take several launches).
constexpr int kMaxBucketTensors = 64;
void flatten_bucket(int count, const float* const* tensors, const int64_t* sizes, const int64_t* offsets,
                    float* bucket, cudaStream_t stream);
void unflatten_bucket(int count, const float* bucket, float* const* tensors, const int64_t* sizes,
                      const int64_t* offsets, cudaStream_t stream);

// --- softmax cross-entropy fused with its backward (cross_entropy.cu) ---
// loss_sum (device, one double) receives the summed loss over rows, summed in a fixed order;
// correct (device, optional) the number of rows whose arg-max (first maximum) equals the label.
void softmax_cross_entropy(int64_t rows, int64_t classes, const float* logits, const int32_t* labels,
                           float grad_scale, float* grad_logits, double* loss_sum, int64_t* correct,
                           cudaStream_t stream);

// --- optimizers over flat buffers, one fused launch each (optimizer.cu) ---
// step_counter (device, optional): when given, the 1-based step is read from it and incremented by the
// kernel, so a captured graph replays with the right bias correction; else params.step is used.
void adamw_step(int64_t n, float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                const AdamWParams& params, int64_t* step_counter, cudaStream_t stream);
void sgd_step(int64_t n, float* param, const float* grad, float* momentum_buffer, const SgdParams& params,
              cudaStream_t stream);

}  // namespace tandem::kernels::cuda
