// Writes a job's Events the way `kubectl describe` expects them, and without flooding etcd: an Event that
// repeats (same job, type, reason and message) within `window` of its last write bumps the existing
// object's count and lastTimestamp instead of creating another, as client-go's recorder does. A failing
// pod creation retried with backoff is one Event with a growing count, not hundreds.
// Events are best effort: a write that fails is logged and never stops the caller.
#pragma once

#include <chrono>
#include <map>
#include <mutex>
#include <string>

#include "tandem/kube/client.h"
#include "tandem/operator/job.h"
#include "tandem/operator/plan.h"

namespace tandem::operator_core {

class EventRecorder {
 public:
  // reportingInstance: this replica's identity. Entries older than `window` are forgotten.
  EventRecorder(kube::KubeClient& client, std::string reportingInstance,
                std::chrono::seconds window = std::chrono::minutes(10));

  void record(const JobObject& job, const EmitEvent& event);
  // Distinct Events remembered for aggregation (bounded: old ones are forgotten).
  size_t remembered() const;

 private:
  struct Written {
    std::string nameSpace, name;  // the Event object
    int64_t count = 0;
    std::chrono::steady_clock::time_point lastWritten;
  };
  enum class Bumped { kYes, kGone, kFailed };  // kGone: create a new one instead
  Bumped bump(Written& written, const std::string& now);
  void write(const JobObject& job, const EmitEvent& event);
  void forgetOlderThanWindow(std::chrono::steady_clock::time_point now);

  kube::KubeClient& client_;
  const std::string reportingInstance_;
  const std::chrono::seconds window_;
  mutable std::mutex mutex_;
  std::map<std::string, Written> written_;  // by job uid, type, reason and message
};

}  // namespace tandem::operator_core
