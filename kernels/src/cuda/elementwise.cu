#include "tandem/kernels/cuda/ops.h"

#include "launch.h"

namespace tandem::kernels::cuda {
namespace {

using detail::blocksFor;
using detail::checkLaunch;
using detail::kThreads;
using detail::launchOver;

constexpr float kSqrtTwoOverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

__global__ void broadcastRowsKernel(int64_t rows, int64_t cols, const float* bias, float* out) {
  TANDEM_GRID_STRIDE(i, rows * cols) out[i] = bias[i % cols];
}

// Block (32 columns x 16 row lanes): each lane sums every 16th row of its column, then the 16 partial
// sums are added in a fixed order. Reads are coalesced across the 32 columns.
constexpr int kBiasCols = 32, kBiasLanes = 16;
__global__ void biasBackwardKernel(int64_t rows, int64_t cols, const float* grad_out, float* grad_bias) {
  __shared__ float partial[kBiasLanes][kBiasCols];
  const int64_t col = blockIdx.x * static_cast<int64_t>(kBiasCols) + threadIdx.x;
  float sum = 0.0f;
  if (col < cols)
    for (int64_t r = threadIdx.y; r < rows; r += kBiasLanes) sum += grad_out[r * cols + col];
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.0f;
    for (int lane = 0; lane < kBiasLanes; ++lane) total += partial[lane][threadIdx.x];
    grad_bias[col] += total;
  }
}

__global__ void reluForwardKernel(int64_t n, const float* in, float* out) {
  TANDEM_GRID_STRIDE(i, n) out[i] = fmaxf(in[i], 0.0f);
}

__global__ void reluBackwardKernel(int64_t n, const float* out, const float* grad_out, float* grad_in) {
  TANDEM_GRID_STRIDE(i, n) grad_in[i] = out[i] > 0.0f ? grad_out[i] : 0.0f;
}

__global__ void geluForwardKernel(int64_t n, const float* in, float* out) {
  TANDEM_GRID_STRIDE(i, n) {
    const float x = in[i];
    out[i] = 0.5f * x * (1.0f + tanhf(kSqrtTwoOverPi * (x + kGeluCubic * x * x * x)));
  }
}

__global__ void geluBackwardKernel(int64_t n, const float* in, const float* grad_out, float* grad_in) {
  TANDEM_GRID_STRIDE(i, n) {
    const float x = in[i];
    const float t = tanhf(kSqrtTwoOverPi * (x + kGeluCubic * x * x * x));
    const float dinner = kSqrtTwoOverPi * (1.0f + 3.0f * kGeluCubic * x * x);
    grad_in[i] = grad_out[i] * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * dinner);
  }
}

__global__ void toBf16Kernel(int64_t n, const float* in, __nv_bfloat16* out) {
  TANDEM_GRID_STRIDE(i, n) out[i] = __float2bfloat16_rn(in[i]);
}

__global__ void toFp32Kernel(int64_t n, const __nv_bfloat16* in, float* out) {
  TANDEM_GRID_STRIDE(i, n) out[i] = __bfloat162float(in[i]);
}

// Pointers and extents travel by value in the kernel's parameter space (no device copy of the list).
struct BucketList {
  float* tensors[kMaxBucketTensors];
  int64_t sizes[kMaxBucketTensors];
  int64_t offsets[kMaxBucketTensors];
};

// blockIdx.y picks the tensor; the x dimension strides over its elements.
template <bool kFlatten>
__global__ void bucketKernel(BucketList list, float* bucket) {
  const int t = blockIdx.y;
  float* tensor = list.tensors[t];
  float* slice = bucket + list.offsets[t];
  TANDEM_GRID_STRIDE(i, list.sizes[t]) {
    if constexpr (kFlatten) slice[i] = tensor[i];
    else tensor[i] = slice[i];
  }
}

template <bool kFlatten>
void copyBucket(int count, float* const* tensors, const int64_t* sizes, const int64_t* offsets, float* bucket,
                cudaStream_t stream) {
  for (int start = 0; start < count; start += kMaxBucketTensors) {
    const int chunk = std::min(kMaxBucketTensors, count - start);
    BucketList list{};
    int64_t largest = 1;
    for (int i = 0; i < chunk; ++i) {
      list.tensors[i] = tensors[start + i];
      list.sizes[i] = sizes[start + i];
      list.offsets[i] = offsets[start + i];
      largest = std::max(largest, sizes[start + i]);
    }
    const dim3 grid(std::min(blocksFor(largest), 1024u), chunk);
    bucketKernel<kFlatten><<<grid, kThreads, 0, stream>>>(list, bucket);
    checkLaunch(kFlatten ? "flatten_bucket" : "unflatten_bucket");
  }
}

}  // namespace

void broadcast_rows(int64_t rows, int64_t cols, const float* bias, float* out, cudaStream_t stream) {
  if (rows * cols == 0) return;
  broadcastRowsKernel<<<blocksFor(rows * cols), kThreads, 0, stream>>>(rows, cols, bias, out);
  checkLaunch("broadcast_rows");
}

void bias_backward(int64_t rows, int64_t cols, const float* grad_out, float* grad_bias, cudaStream_t stream) {
  if (cols == 0) return;
  const dim3 block(kBiasCols, kBiasLanes);
  const unsigned grid = static_cast<unsigned>((cols + kBiasCols - 1) / kBiasCols);
  biasBackwardKernel<<<grid, block, 0, stream>>>(rows, cols, grad_out, grad_bias);
  checkLaunch("bias_backward");
}

void relu_forward(int64_t n, const float* in, float* out, cudaStream_t stream) {
  launchOver("relu_forward", reluForwardKernel, n, stream, in, out);
}

void relu_backward(int64_t n, const float* out, const float* grad_out, float* grad_in, cudaStream_t stream) {
  launchOver("relu_backward", reluBackwardKernel, n, stream, out, grad_out, grad_in);
}

void gelu_forward(int64_t n, const float* in, float* out, cudaStream_t stream) {
  launchOver("gelu_forward", geluForwardKernel, n, stream, in, out);
}

void gelu_backward(int64_t n, const float* in, const float* grad_out, float* grad_in, cudaStream_t stream) {
  launchOver("gelu_backward", geluBackwardKernel, n, stream, in, grad_out, grad_in);
}

void cast_to_bf16(int64_t n, const float* in, __nv_bfloat16* out, cudaStream_t stream) {
  launchOver("cast_to_bf16", toBf16Kernel, n, stream, in, out);
}

void cast_to_fp32(int64_t n, const __nv_bfloat16* in, float* out, cudaStream_t stream) {
  launchOver("cast_to_fp32", toFp32Kernel, n, stream, in, out);
}

void flatten_bucket(int count, const float* const* tensors, const int64_t* sizes, const int64_t* offsets,
                    float* bucket, cudaStream_t stream) {
  copyBucket<true>(count, const_cast<float* const*>(tensors), sizes, offsets, bucket, stream);
}

void unflatten_bucket(int count, const float* bucket, float* const* tensors, const int64_t* sizes,
                      const int64_t* offsets, cudaStream_t stream) {
  copyBucket<false>(count, tensors, sizes, offsets, const_cast<float*>(bucket), stream);
}

}  // namespace tandem::kernels::cuda
