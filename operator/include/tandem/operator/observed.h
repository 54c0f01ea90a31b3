// What the informers observed of a job's children, as plain values. The executor lists pods by the
// tandem.dev/job=<name> label in the job's namespace and Services/ConfigMaps by name. Secrets are not
// watched (the operator may not read them): the ConfigMap names the Secret created just before it.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "tandem/operator/job.h"

namespace tandem::operator_core {

enum class PodPhase { kPending, kRunning, kSucceeded, kFailed, kUnknown };
const char* podPhaseName(PodPhase phase);

struct ObservedPod {
  std::string name;
  std::string uid;
  std::map<std::string, std::string> labels;  // tandem.dev/job, tandem.dev/rank, tandem.dev/generation
  std::string controllerUid;  // uid of the ownerReference with controller=true; empty when none
  std::string controllerKind;  // its kind (DistributedTrainingJob for ours and a deleted namesake's)
  PodPhase phase = PodPhase::kPending;
  bool ready = false;  // the pod's Ready condition
  // The worker container's state.terminated, when it has terminated.
  std::optional<int> exitCode;
  std::optional<int> signal;
  std::optional<Clock::time_point> finishedAt;  // when the worker container terminated
  std::string reason;            // status.reason: Evicted, NodeLost, Preempting, UnexpectedAdmissionError, ...
  std::string disruptionReason;  // reason of a DisruptionTarget=True condition: PreemptionByScheduler,
                                 // DeletionByTaintManager, EvictionByEvictionAPI, DeletionByPodGC, TerminationByKubelet
  std::optional<Clock::time_point> deletionTimestamp;  // set: the pod is terminating
  std::string nodeName;
  // The worker container's state.waiting, while it has not started: CreateContainerConfigError with
  // `secret "<name>" not found` says the Secret its token comes from is gone.
  std::string waitingReason;
  std::string waitingMessage;
  bool nodeUnreachable = false;  // its node's Ready condition is Unknown (node.kubernetes.io/unreachable)
  // When that node stopped reporting, read from the Node; unset when only the pod's status.reason
  // (NodeLost) said so.
  std::optional<Clock::time_point> nodeUnreachableSince;
  Clock::time_point creationTimestamp;

  bool terminating() const { return deletionTimestamp.has_value(); }
  bool finished() const { return phase == PodPhase::kSucceeded || phase == PodPhase::kFailed; }
};

// A child object identified by name; controllerUid tells ours from a same-named leftover of a deleted job.
struct ObservedChild {
  std::string name;
  std::string controllerUid;
  std::optional<Clock::time_point> deletionTimestamp;
  std::string uid;
};
struct ObservedService : ObservedChild {};
struct ObservedConfigMap : ObservedChild {
  std::string rendezvousSecret;  // its kRendezvousSecretAnnotation; empty on an earlier operator's
};

struct Observed {
  std::vector<ObservedPod> pods;
  std::vector<ObservedService> services;
  std::vector<ObservedConfigMap> configMaps;
  // This operator created the job's Secret (or found it there) and has not seen its ConfigMap since.
  bool rendezvousSecretCreated = false;
  // When this operator last made the job's deleted Secret anew, for kSecretRecreationSettle: pods may
  // still show the kubelet's earlier wait for it until the kubelet tries again.
  std::optional<Clock::time_point> rendezvousSecretRecreatedAt;
};

inline constexpr std::chrono::seconds kSecretRecreationSettle{60};

}  // namespace tandem::operator_core
