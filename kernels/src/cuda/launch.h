// Launch geometry shared by the .cu files.
#pragma once

#include "tandem/kernels/cuda/runtime.h"

#include <algorithm>
#include <cstdint>

namespace tandem::kernels::cuda::detail {

constexpr int kThreads = 256;

// Enough blocks to fill the GPU a few times over; kernels loop grid-stride past that.
inline unsigned blocksFor(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, 132 * 32));
}

inline void checkLaunch(const char* kernel) { check(cudaGetLastError(), kernel, __FILE__, __LINE__); }

}  // namespace tandem::kernels::cuda::detail
