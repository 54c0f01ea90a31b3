#include "tandem/operator/work_queue.h"

#include <algorithm>

namespace tandem::operator_core {

WorkQueue::WorkQueue() : WorkQueue(Options{}) {}
WorkQueue::WorkQueue(Options options) : options_(options) {}

void WorkQueue::addLocked(const std::string& key) {
  if (shuttingDown_ || dirty_.count(key) != 0) return;
  dirty_.insert(key);
  if (processing_.count(key) != 0) return;  // queued again by done()
  queue_.push_back(key);
  changed_.notify_one();
}

void WorkQueue::add(const std::string& key) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    addLocked(key);
  }
  notifyDepth();
}

void WorkQueue::addAfter(const std::string& key, Clock::duration delay) {
  if (delay <= Clock::duration::zero()) return add(key);
  std::lock_guard<std::mutex> lock(mutex_);
  if (shuttingDown_) return;
  const auto due = Clock::now() + delay;
  // One pending delay per key is enough: keep the earliest.
  for (auto it = delayed_.begin(); it != delayed_.end(); ++it) {
    if (it->second != key) continue;
    if (it->first <= due) return;
    delayed_.erase(it);
    break;
  }
  delayed_.emplace(due, key);
  changed_.notify_all();  // a sleeping get() may have to wake earlier
}

void WorkQueue::addRateLimited(const std::string& key) {
  int64_t failures;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    failures = failures_[key]++;
  }
  const int64_t base = options_.baseBackoff.count();
  const int64_t delay = std::min<int64_t>(options_.maxBackoff.count(), base << std::min<int64_t>(failures, 30));
  addAfter(key, std::chrono::milliseconds(delay));
}

void WorkQueue::forget(const std::string& key) {
  std::lock_guard<std::mutex> lock(mutex_);
  failures_.erase(key);
}

int64_t WorkQueue::failures(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = failures_.find(key);
  return it == failures_.end() ? 0 : it->second;
}

void WorkQueue::promoteDueLocked(Clock::time_point now) {
  while (!delayed_.empty() && delayed_.begin()->first <= now) {
    const std::string key = delayed_.begin()->second;
    delayed_.erase(delayed_.begin());
    addLocked(key);
  }
}

std::optional<std::string> WorkQueue::get() {
  std::optional<std::string> key;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      promoteDueLocked(Clock::now());
      if (shuttingDown_) return std::nullopt;
      if (!queue_.empty()) break;
      if (delayed_.empty())
        changed_.wait(lock);
      else
        changed_.wait_until(lock, delayed_.begin()->first);
    }
    key = queue_.front();
    queue_.pop_front();
    dirty_.erase(*key);
    processing_.insert(*key);
  }
  notifyDepth();
  return key;
}

void WorkQueue::done(const std::string& key) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    processing_.erase(key);
    if (dirty_.count(key) != 0 && !shuttingDown_) {
      queue_.push_back(key);
      changed_.notify_one();
    }
  }
  notifyDepth();
}

void WorkQueue::shutDown() {
  std::lock_guard<std::mutex> lock(mutex_);
  shuttingDown_ = true;
  changed_.notify_all();
}

size_t WorkQueue::depth() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return queue_.size();
}

void WorkQueue::setDepthObserver(std::function<void(size_t)> observer) {
  std::lock_guard<std::mutex> lock(mutex_);
  depthObserver_ = std::move(observer);
}

void WorkQueue::notifyDepth() {
  std::function<void(size_t)> observer;
  size_t depth;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    observer = depthObserver_;
    depth = queue_.size();
  }
  if (observer) observer(depth);
}

}  // namespace tandem::operator_core
