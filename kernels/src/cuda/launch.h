// Launch geometry shared by the .cu files.
#pragma once

#include "tandem/kernels/cuda/runtime.h"

#include <algorithm>
#include <cstdint>

// for (i over [0, n)), strided by the whole grid.
#define TANDEM_GRID_STRIDE(i, n)                                                          \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

namespace tandem::kernels::cuda::detail {

constexpr int kThreads = 256;

// Enough blocks to fill the GPU a few times over; kernels loop grid-stride past that.
inline unsigned blocksFor(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, 132 * 32));
}

inline void checkLaunch(const char* kernel) { check(cudaGetLastError(), kernel, __FILE__, __LINE__); }

// Queues a grid-stride kernel whose first parameter is the element count n (nothing when n is 0) and
// names it in any launch error.
template <typename... Params, typename... Args>
void launchOver(const char* name, void (*kernel)(int64_t, Params...), int64_t n, cudaStream_t stream,
                Args... args) {
  if (n == 0) return;
  kernel<<<blocksFor(n), kThreads, 0, stream>>>(n, args...);
  checkLaunch(name);
}

}  // namespace tandem::kernels::cuda::detail
