// CUDA plumbing shared by the kernels: error checks that name the call, device queries, and the one
// caching allocator every device buffer comes from (no cudaMalloc once a training step is warm, so a
// step can be captured in a CUDA graph).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

namespace tandem::kernels::cuda {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Throws CudaError("<what> at <file>:<line>: <cuda message>") when status is not cudaSuccess.
void check(cudaError_t status, const char* what, const char* file, int line);
#define TANDEM_CUDA_CHECK(call) ::tandem::kernels::cuda::check((call), #call, __FILE__, __LINE__)

// Devices the driver reports; 0 (never an exception) where there is no driver or no GPU.
int deviceCount();

// Device memory from size-classed free lists: a freed block goes back to its list and the next request
// of that class reuses it. Blocks are rounded to 512 bytes (small) or 2 MiB (large) so sizes that vary a
// little share blocks. Thread-safe; one instance per device (forDevice).
class CachingAllocator {
 public:
  static CachingAllocator& forDevice(int device);

  void* allocate(size_t bytes);
  void release(void* pointer);
  // Returns cached (unused) blocks to the driver.
  void emptyCache();

  size_t bytesInUse() const;
  size_t bytesReserved() const;  // in use + cached
  int64_t driverAllocations() const;  // cudaMalloc calls so far: flat once a step is warm

 private:
  explicit CachingAllocator(int device) : device_(device) {}
  static size_t roundUp(size_t bytes);

  int device_;
  mutable std::mutex mutex_;
  std::multimap<size_t, void*> free_;      // size -> block
  std::map<void*, size_t> allocated_;      // block -> size
  size_t inUse_ = 0;
  size_t reserved_ = 0;
  int64_t driverAllocations_ = 0;
};

// A typed device buffer from the current device's caching allocator, released on destruction.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) : count_(count) {
    int device = 0;
    TANDEM_CUDA_CHECK(cudaGetDevice(&device));
    device_ = device;
    data_ = static_cast<T*>(CachingAllocator::forDevice(device).allocate(count * sizeof(T)));
  }
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = other.data_;
      count_ = other.count_;
      device_ = other.device_;
      other.data_ = nullptr;
      other.count_ = 0;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* data() const { return data_; }
  size_t size() const { return count_; }

 private:
  void reset() {
    if (data_ != nullptr) CachingAllocator::forDevice(device_).release(data_);
    data_ = nullptr;
    count_ = 0;
  }
  T* data_ = nullptr;
  size_t count_ = 0;
  int device_ = 0;
};

}  // namespace tandem::kernels::cuda
