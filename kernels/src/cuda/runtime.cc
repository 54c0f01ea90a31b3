#include "tandem/kernels/cuda/runtime.h"

#include <memory>
#include <vector>

namespace tandem::kernels::cuda {

void check(cudaError_t status, const char* what, const char* file, int line) {
  if (status == cudaSuccess) return;
  throw CudaError(std::string(what) + " at " + file + ":" + std::to_string(line) + ": " +
                  cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

int deviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later calls start clean
    return 0;
  }
  return count;
}

CachingAllocator& CachingAllocator::forDevice(int device) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<CachingAllocator>> allocators;
  std::lock_guard lock(mutex);
  if (device < 0) throw CudaError("CachingAllocator: negative device " + std::to_string(device));
  if (allocators.size() <= static_cast<size_t>(device)) allocators.resize(device + 1);
  if (!allocators[device]) allocators[device].reset(new CachingAllocator(device));
  return *allocators[device];
}

size_t CachingAllocator::roundUp(size_t bytes) {
  constexpr size_t kSmall = 512, kLarge = 2 << 20, kSmallLimit = 1 << 20;
  if (bytes == 0) bytes = 1;
  const size_t unit = bytes <= kSmallLimit ? kSmall : kLarge;
  return (bytes + unit - 1) / unit * unit;
}

void* CachingAllocator::allocate(size_t bytes) {
  const size_t size = roundUp(bytes);
  std::lock_guard lock(mutex_);
  // Best fit within the same class, but never a block more than twice the request (it would pin memory).
  auto it = free_.lower_bound(size);
  if (it != free_.end() && it->first <= 2 * size) {
    void* block = it->second;
    allocated_[block] = it->first;
    inUse_ += it->first;
    free_.erase(it);
    return block;
  }
  int previous = 0;
  TANDEM_CUDA_CHECK(cudaGetDevice(&previous));
  if (previous != device_) TANDEM_CUDA_CHECK(cudaSetDevice(device_));
  void* block = nullptr;
  cudaError_t status = cudaMalloc(&block, size);
  if (status == cudaErrorMemoryAllocation && !free_.empty()) {
    // Out of memory with blocks cached: give them back and try once more.
    cudaGetLastError();
    for (auto& [cachedSize, cached] : free_) {
      cudaFree(cached);
      reserved_ -= cachedSize;
    }
    free_.clear();
    status = cudaMalloc(&block, size);
  }
  if (previous != device_) cudaSetDevice(previous);
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw CudaError("cudaMalloc of " + std::to_string(size) + " bytes on device " + std::to_string(device_) +
                    " failed: " + cudaGetErrorString(status) + " (" + std::to_string(inUse_) + " bytes in use)");
  }
  ++driverAllocations_;
  reserved_ += size;
  inUse_ += size;
  allocated_[block] = size;
  return block;
}

void CachingAllocator::release(void* pointer) {
  if (pointer == nullptr) return;
  std::lock_guard lock(mutex_);
  auto it = allocated_.find(pointer);
  if (it == allocated_.end()) throw CudaError("CachingAllocator::release: pointer was not allocated here");
  inUse_ -= it->second;
  free_.emplace(it->second, pointer);
  allocated_.erase(it);
}

void CachingAllocator::emptyCache() {
  std::lock_guard lock(mutex_);
  for (auto& [size, block] : free_) {
    cudaFree(block);
    reserved_ -= size;
  }
  free_.clear();
}

size_t CachingAllocator::bytesInUse() const {
  std::lock_guard lock(mutex_);
  return inUse_;
}

size_t CachingAllocator::bytesReserved() const {
  std::lock_guard lock(mutex_);
  return reserved_;
}

int64_t CachingAllocator::driverAllocations() const {
  std::lock_guard lock(mutex_);
  return driverAllocations_;
}

}  // namespace tandem::kernels::cuda
