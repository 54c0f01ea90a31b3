#include "tandem/parallel/gradient_accumulator.h"

#include <utility>

namespace tandem::parallel {
namespace {

void addInto(float* __restrict left, const float* __restrict right, int64_t size) {
  for (int64_t i = 0; i < size; ++i) left[i] = left[i] + right[i];
}

}  // namespace

GradientAccumulator::GradientAccumulator(int64_t size) : size_(size), thread_([this] { run(); }) {}

GradientAccumulator::~GradientAccumulator() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

FloatBuffer GradientAccumulator::zeroedBuffer() {
  FloatBuffer buffer;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!zeroed_.empty()) {
      buffer = std::move(zeroed_.back());
      zeroed_.pop_back();
      return buffer;
    }
    if (dirty_.empty()) {  // every buffer is in use: one more, allocated zeroed
      ++allocated_;
      return FloatBuffer(size_);
    }
    // The thread has not got round to zeroing: do it here rather than grow the pool.
    buffer = std::move(dirty_.back());
    dirty_.pop_back();
  }
  buffer.zero();
  return buffer;
}

void GradientAccumulator::add(FloatBuffer gradients) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    added_.push_back(std::move(gradients));
  }
  changed_.notify_all();
}

void GradientAccumulator::recycle(FloatBuffer buffer) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    dirty_.push_back(std::move(buffer));
  }
  changed_.notify_all();
}

FloatBuffer GradientAccumulator::finish() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return added_.empty() && !working_; });
  // The thread is idle until the next add(): the tree is ours.
  for (size_t depth = tree_.size(); depth >= 2; --depth) {
    addInto(tree_[depth - 2].data(), tree_[depth - 1].data(), size_);
    dirty_.push_back(std::move(tree_[depth - 1]));
    tree_.pop_back();
  }
  if (tree_.empty()) {
    ++allocated_;
    tree_.emplace_back(size_);
  }
  FloatBuffer total = std::move(tree_.front());
  tree_.clear();
  levels_.clear();
  lock.unlock();
  changed_.notify_all();
  return total;
}

void GradientAccumulator::mergeEqualLevels() {
  while (tree_.size() >= 2 && levels_[tree_.size() - 1] == levels_[tree_.size() - 2]) {
    addInto(tree_[tree_.size() - 2].data(), tree_.back().data(), size_);
    ++levels_[tree_.size() - 2];
    FloatBuffer merged = std::move(tree_.back());
    tree_.pop_back();
    levels_.pop_back();
    merged.zero();
    std::lock_guard<std::mutex> lock(mutex_);
    zeroed_.push_back(std::move(merged));
  }
}

void GradientAccumulator::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [&] { return stopping_ || !added_.empty() || !dirty_.empty(); });
    if (stopping_) return;
    working_ = true;
    if (!added_.empty()) {
      FloatBuffer next = std::move(added_.front());
      added_.pop_front();
      lock.unlock();
      tree_.push_back(std::move(next));
      levels_.push_back(0);
      mergeEqualLevels();
    } else {
      FloatBuffer next = std::move(dirty_.front());
      dirty_.pop_front();
      lock.unlock();
      next.zero();
      lock.lock();
      zeroed_.push_back(std::move(next));
      lock.unlock();
    }
    lock.lock();
    working_ = false;
    changed_.notify_all();
  }
}

}  // namespace tandem::parallel
