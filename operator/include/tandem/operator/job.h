// What the reconciler sees of a DistributedTrainingJob (JobObject) and what it writes back (JobStatus):
// plain values, no JSON and no HTTP. The executor fills a JobObject from the API server's object.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tandem/manifest/job_spec.h"

namespace tandem::operator_core {

// Kubernetes timestamps are wall-clock times; the reconciler never reads a clock, it is handed `now`.
using Clock = std::chrono::system_clock;

// status.phase. kNone: the operator has not written a status yet.
enum class JobPhase { kNone, kCreated, kRunning, kRestarting, kSucceeded, kFailed, kSuspended };
const char* jobPhaseName(JobPhase phase);  // "Created", ...; "" for kNone
inline bool isFinished(JobPhase phase) { return phase == JobPhase::kSucceeded || phase == JobPhase::kFailed; }

enum class ConditionType { kCreated, kRunning, kRestarting, kSucceeded, kFailed, kSuspended };
const char* conditionTypeName(ConditionType type);

// One entry of status.conditions. lastTransitionTime moves only when `status` flips.
struct Condition {
  ConditionType type = ConditionType::kCreated;
  bool status = false;  // "True" / "False"
  std::string reason;   // CamelCase, the same word as the Event that mirrors it
  std::string message;
  Clock::time_point lastTransitionTime;
  bool operator==(const Condition&) const = default;
};

// Worker pods of the current generation, by pod phase (pods in phase Unknown are in none of them).
struct WorkerCounts {
  int64_t pending = 0;
  int64_t running = 0;
  int64_t succeeded = 0;
  int64_t failed = 0;
  bool operator==(const WorkerCounts&) const = default;
};

struct JobStatus {
  JobPhase phase = JobPhase::kNone;
  std::vector<Condition> conditions;
  int64_t restarts = 0;     // gang restarts counted against spec.runPolicy.backoffLimit
  int64_t preemptions = 0;  // gang restarts after preemption, eviction, node loss or deletion: not counted
  int64_t generation = 0;   // TANDEM_GENERATION of the current gang
  int64_t observedGeneration = 0;  // metadata.generation this status was computed from
  std::optional<Clock::time_point> startTime;       // first gang created (reset when resumed)
  std::optional<Clock::time_point> completionTime;  // set on Succeeded and Failed
  WorkerCounts workers;
  int64_t readyWorkers = 0;

  const Condition* condition(ConditionType type) const;
  bool hasTrueCondition(ConditionType type) const {
    const Condition* found = condition(type);
    return found != nullptr && found->status;
  }
  bool operator==(const JobStatus&) const = default;
};

// A DistributedTrainingJob as the reconciler sees it.
struct JobObject {
  std::string nameSpace = "default";
  std::string name;
  std::string uid;  // owner references on every child point at it
  int64_t generation = 0;       // metadata.generation
  std::string resourceVersion;  // carried for the executor's status update; the reconciler ignores it
  Clock::time_point creationTimestamp;
  std::optional<Clock::time_point> deletionTimestamp;

  manifest::JobSpec spec;                    // typed spec (parseManifest of manifestText)
  std::vector<manifest::FieldError> specErrors;  // non-empty: the job fails with reason InvalidSpec
  // The object's text as received (JSON from the API server, or the YAML file). spec.template is taken
  // from it rather than from spec.templateYaml, which went through a YAML dump that drops quoting
  // (env value "1" would become the integer 1); the ConfigMap behind TANDEM_CONFIG is built from it too.
  std::string manifestText;

  JobStatus status;
};

}  // namespace tandem::operator_core
