#include "tandem/kernels/gpu_info.h"

#include <stdexcept>

namespace tandem::kernels {

bool builtWithCuda() { return false; }
int gpuCount() { return 0; }
void useGpu(int device) {
  throw std::runtime_error("GPU " + std::to_string(device) + " requested, but this build has no CUDA (TANDEM_CUDA=OFF)");
}
int64_t gpuMemoryUsedBytes() { return 0; }
std::string gpuDescription(int) { return {}; }

}  // namespace tandem::kernels
