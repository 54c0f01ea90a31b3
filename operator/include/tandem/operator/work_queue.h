// A rate-limited work queue of job keys ("namespace/name"), with the semantics of client-go's: a key is
// queued at most once, never processed by two workers at once (added again while processing, it runs once
// more after done()), delayed adds for deadlines and TTLs, and per-key exponential backoff for failures.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>

namespace tandem::operator_core {

class WorkQueue {
 public:
  using Clock = std::chrono::steady_clock;
  struct Options {
    std::chrono::milliseconds baseBackoff{200};
    std::chrono::milliseconds maxBackoff{60000};
  };
  WorkQueue();
  explicit WorkQueue(Options options);

  void add(const std::string& key);
  void addAfter(const std::string& key, Clock::duration delay);
  // After a failure: backoff base * 2^(failures so far), capped.
  void addRateLimited(const std::string& key);
  // After a success: the key's failure count starts again from zero.
  void forget(const std::string& key);
  int64_t failures(const std::string& key) const;

  // Blocks until a key is ready or the queue shuts down (nullopt). The caller must call done(key).
  std::optional<std::string> get();
  void done(const std::string& key);
  void shutDown();

  size_t depth() const;  // keys ready to be processed (not counting delayed ones)
  // Called (outside the lock) whenever the depth changes, for the workqueue_depth gauge.
  void setDepthObserver(std::function<void(size_t)> observer);

 private:
  void addLocked(const std::string& key);
  void promoteDueLocked(Clock::time_point now);
  void notifyDepth();

  Options options_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::string> queue_;
  std::set<std::string> dirty_;       // queued or to be queued again after done()
  std::set<std::string> processing_;
  std::multimap<Clock::time_point, std::string> delayed_;
  std::map<std::string, int64_t> failures_;
  bool shuttingDown_ = false;
  std::function<void(size_t)> depthObserver_;
};

}  // namespace tandem::operator_core
