#include "tandem/parallel/gradient_accumulator.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <utility>

namespace tandem::parallel {
namespace {

// buffers[0] = buffers[0] + (buffers[1] + (... + (buffers[n-2] + buffers[n-1]))): the tree's order of
// adds, in one pass over memory instead of one pass per add. Blocks stay in L1 between the adds.
void foldInto(const std::vector<float*>& buffers, int64_t size) {
  constexpr int64_t kBlock = 512;
  alignas(64) float partial[kBlock];
  const int count = static_cast<int>(buffers.size());
  for (int64_t begin = 0; begin < size; begin += kBlock) {
    const int64_t length = std::min(kBlock, size - begin);
    const float* last = buffers[count - 1] + begin;
    for (int64_t i = 0; i < length; ++i) partial[i] = last[i];
    for (int b = count - 2; b >= 0; --b) {
      const float* __restrict left = buffers[b] + begin;
      for (int64_t i = 0; i < length; ++i) partial[i] = left[i] + partial[i];
    }
    float* __restrict out = buffers[0] + begin;
    for (int64_t i = 0; i < length; ++i) out[i] = partial[i];
  }
}

}  // namespace

GradientAccumulator::GradientAccumulator(int64_t size, Summing summing) : size_(size), summing_(summing) {
  if (summing_ == Summing::kBackground) thread_ = std::thread([this] { run(); });
}

GradientAccumulator::~GradientAccumulator() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  if (thread_.joinable()) thread_.join();
}

FloatBuffer GradientAccumulator::spareBuffer() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (spare_.empty()) {  // every buffer is in use: one more
    ++allocated_;
    return FloatBuffer(size_);
  }
  FloatBuffer buffer = std::move(spare_.back());
  spare_.pop_back();
  return buffer;
}

void GradientAccumulator::add(FloatBuffer gradients) {
  if (summing_ == Summing::kInline) {  // no thread: the tree is the caller's
    addToTree(std::move(gradients));
    return;
  }
  std::unique_lock<std::mutex> lock(mutex_);
  added_.push_back(std::move(gradients));
  if (added_.size() > kMaxQueued) {
    // The thread is behind: the sums are done here, at the caller's priority, in the same order.
    std::deque<FloatBuffer> queued = takeOverQueue(lock);
    lock.unlock();
    for (FloatBuffer& next : queued) addToTree(std::move(next));
    lock.lock();
    callerOwnsTree_ = false;
  }
  lock.unlock();
  changed_.notify_all();
}

std::deque<FloatBuffer> GradientAccumulator::takeOverQueue(std::unique_lock<std::mutex>& lock) {
  callerOwnsTree_ = true;
  changed_.wait(lock, [&] { return !working_; });
  std::deque<FloatBuffer> queued;
  queued.swap(added_);
  return queued;
}

void GradientAccumulator::recycle(FloatBuffer buffer) {
  std::lock_guard<std::mutex> lock(mutex_);
  spare_.push_back(std::move(buffer));
}

FloatBuffer GradientAccumulator::finish() {
  std::deque<FloatBuffer> queued;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    queued = takeOverQueue(lock);
  }
  // The thread takes nothing new while callerOwnsTree_: the tree is ours.
  for (FloatBuffer& gradients : queued) addToTree(std::move(gradients));
  if (tree_.size() >= 2) foldTop(tree_.size());
  FloatBuffer total;
  if (tree_.empty()) {
    ++allocated_;
    total = FloatBuffer(size_);  // starts zeroed
  } else {
    total = std::move(tree_.front());
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = 1; i < tree_.size(); ++i) spare_.push_back(std::move(tree_[i]));
  tree_.clear();
  levels_.clear();
  callerOwnsTree_ = false;
  return total;
}

void GradientAccumulator::foldTop(size_t count) {
  std::vector<float*> buffers;
  for (size_t i = tree_.size() - count; i < tree_.size(); ++i) buffers.push_back(tree_[i].data());
  foldInto(buffers, size_);
}

void GradientAccumulator::addToTree(FloatBuffer gradients) {
  tree_.push_back(std::move(gradients));
  levels_.push_back(0);
  mergeEqualLevels();
}

void GradientAccumulator::mergeEqualLevels() {
  // The newest sum (level 0) carries up like a binary counter: it merges with the sums of levels 0, 1,
  // 2, ... sitting right below it, all in one fold.
  const size_t newest = tree_.size() - 1;
  size_t merges = 0;
  while (merges < newest && levels_[newest - 1 - merges] == static_cast<int>(merges)) ++merges;
  if (merges == 0) return;
  foldTop(merges + 1);
  levels_[newest - merges] = static_cast<int>(merges);
  std::vector<FloatBuffer> merged;
  for (size_t i = newest - merges + 1; i <= newest; ++i) merged.push_back(std::move(tree_[i]));
  tree_.resize(newest - merges + 1);
  levels_.resize(newest - merges + 1);
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& buffer : merged) spare_.push_back(std::move(buffer));
}

void GradientAccumulator::run() {
  // The sums are background work: where this thread shares a core with the stage's compute (one core
  // per stage, or more ranks than cores), it runs only while the stage waits on a neighbour, and what
  // is left waits for finish(), after the pipeline's flush, instead of stretching the microbatches the
  // neighbours wait for. With a core to spare it changes nothing. Failure (no SCHED_IDLE) is harmless.
  sched_param lowest{};
  pthread_setschedparam(pthread_self(), SCHED_IDLE, &lowest);
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [&] { return stopping_ || (!added_.empty() && !callerOwnsTree_); });
    if (stopping_) return;
    working_ = true;
    FloatBuffer next = std::move(added_.front());
    added_.pop_front();
    lock.unlock();
    addToTree(std::move(next));
    lock.lock();
    working_ = false;
    changed_.notify_all();
  }
}

}  // namespace tandem::parallel
