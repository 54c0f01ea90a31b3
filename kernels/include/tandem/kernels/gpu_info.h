// What the worker asks of the GPU whether or not the build has CUDA: present in every build (the CPU
// build answers "no GPU"), so callers need no #if.
#pragma once

#include <cstdint>
#include <string>

namespace tandem::kernels {

// True when this binary was built with CUDA.
bool builtWithCuda();
// Visible CUDA devices (0 in a CPU build, without a driver or without a GPU).
int gpuCount();
// Makes `device` current for the calling thread; throws with the device count when out of range.
void useGpu(int device);
// Device memory in use on the current device as the driver reports it (total - free), 0 without a GPU.
int64_t gpuMemoryUsedBytes();
// "NVIDIA H100 80GB HBM3, 79.1 GiB, sm_90" for logs; empty without a GPU.
std::string gpuDescription(int device);

}  // namespace tandem::kernels
