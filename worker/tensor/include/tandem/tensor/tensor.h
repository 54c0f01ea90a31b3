// Tensor: an owning, 64-byte aligned float32 buffer with a shape (row-major). The engine keeps activations
// as (batch, features) tensors; parameters live in one flat buffer per model and layers see views of it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <vector>

namespace tandem {

// Aligned float storage that survives moves without reallocating.
class FloatBuffer {
 public:
  FloatBuffer() = default;
  explicit FloatBuffer(int64_t size) { resize(size); }
  // Grows only; contents are zeroed whenever storage is (re)allocated.
  void resize(int64_t size) {
    if (size <= capacity_) {
      size_ = size;
      return;
    }
    const size_t bytes = ((static_cast<size_t>(size) * sizeof(float) + 63) / 64) * 64;
    float* memory = static_cast<float*>(std::aligned_alloc(64, bytes));
    std::fill(memory, memory + size, 0.0f);
    data_.reset(memory);
    size_ = capacity_ = size;
  }
  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  int64_t size() const { return size_; }
  void zero() { std::fill(data_.get(), data_.get() + size_, 0.0f); }

 private:
  struct Free {
    void operator()(float* memory) const { std::free(memory); }
  };
  std::unique_ptr<float, Free> data_;
  int64_t size_ = 0;
  int64_t capacity_ = 0;
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::vector<int64_t> shape) { reshape(std::move(shape)); }

  // Changes the shape, reusing storage when it is large enough (per-step tensors never reallocate).
  void reshape(std::vector<int64_t> shape) {
    shape_ = std::move(shape);
    buffer_.resize(std::accumulate(shape_.begin(), shape_.end(), int64_t{1}, std::multiplies<int64_t>()));
  }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(size_t axis) const { return shape_.at(axis); }
  int64_t size() const { return buffer_.size(); }
  // For (rows, cols) tensors: rows = product of all leading axes.
  int64_t rows() const { return shape_.empty() ? 0 : size() / shape_.back(); }
  int64_t cols() const { return shape_.empty() ? 0 : shape_.back(); }
  float* data() { return buffer_.data(); }
  const float* data() const { return buffer_.data(); }
  void zero() { buffer_.zero(); }

 private:
  std::vector<int64_t> shape_;
  FloatBuffer buffer_;
};

}  // namespace tandem
