#include "tandem/kernels/gpu_info.h"

#include "tandem/kernels/cuda/runtime.h"

#include <cstdio>

namespace tandem::kernels {

bool builtWithCuda() { return true; }

int gpuCount() { return cuda::deviceCount(); }

void useGpu(int device) {
  const int count = gpuCount();
  if (device < 0 || device >= count)
    throw std::runtime_error("GPU " + std::to_string(device) + " requested, but " + std::to_string(count) +
                             " visible (CUDA_VISIBLE_DEVICES=" +
                             (getenv("CUDA_VISIBLE_DEVICES") ? getenv("CUDA_VISIBLE_DEVICES") : "unset") + ")");
  TANDEM_CUDA_CHECK(cudaSetDevice(device));
}

int64_t gpuMemoryUsedBytes() {
  if (gpuCount() == 0) return 0;
  size_t free = 0, total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return static_cast<int64_t>(total - free);
}

std::string gpuDescription(int device) {
  if (device < 0 || device >= gpuCount()) return {};
  cudaDeviceProp properties{};
  if (cudaGetDeviceProperties(&properties, device) != cudaSuccess) return {};
  char text[320];
  std::snprintf(text, sizeof text, "%s, %.1f GiB, sm_%d%d", properties.name,
                properties.totalGlobalMem / double(1 << 30), properties.major, properties.minor);
  return text;
}

}  // namespace tandem::kernels
