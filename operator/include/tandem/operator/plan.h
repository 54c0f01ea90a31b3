// What reconcile decides: an ordered list of actions, the new status and when to look again.
// The executor applies the actions in order and stops at the first failure (the next reconcile re-plans
// from what it then observes). UpdateStatus, when present, is first: it records decisions such as the
// next generation and the restart count before any pod is deleted, so a decision is never taken twice.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "tandem/operator/job.h"

namespace tandem::operator_core {

// The `object` members are complete Kubernetes objects (apiVersion, kind, metadata with owner reference,
// spec) ready to POST to the namespace of the job.
struct CreateService {
  std::string name;
  nlohmann::json object;
};
// Carries the rendezvous token in object.stringData: never log `object`.
struct CreateSecret {
  std::string name;
  nlohmann::json object;
  // Set for a re-creation (the workers' Secret was deleted), to what showed it missing ("worker <pod>
  // cannot start"): the executor remembers when (Observed) and says it in a Warning
  // RendezvousSecretRecreated, once the Secret was made anew (not when it was there: 409).
  std::string recreatedBecause;
  bool recreation() const { return !recreatedBecause.empty(); }
};
struct CreateConfigMap {
  std::string name;
  nlohmann::json object;
};
struct CreatePod {
  std::string name;
  int64_t rank = 0;
  int64_t generation = 0;
  nlohmann::json object;
};

struct DeletePod {
  std::string name;
  // nullopt: the pod's own terminationGracePeriodSeconds (a worker writes its checkpoint on SIGTERM).
  std::optional<int64_t> gracePeriodSeconds;
  // Grace 0 and no wait for the kubelet: for pods stuck terminating on an unreachable node.
  bool force = false;
  std::string why;
  // The observed pod's uid, a precondition of the delete: pod names repeat across generations, and a
  // stale view must not delete the next gang's pod of the same name.
  std::string uid;
};

// A pod by name and the uid observed, a precondition of its delete (as DeletePod's).
struct PodRef {
  std::string name;
  std::string uid;
};
// Deletes every pod of one generation (labels tandem.dev/job=<job>, tandem.dev/generation=<n>); pods
// lists the ones observed, for executors that delete one by one.
struct DeleteGeneration {
  int64_t generation = 0;
  std::vector<PodRef> pods;
  std::string why;
};

enum class ChildKind { kService, kConfigMap };  // (Secrets go with their job: the operator may not delete them)
const char* childKindName(ChildKind kind);
struct DeleteChild {
  ChildKind kind = ChildKind::kService;
  std::string name;
  // The observed object's uid, a precondition of the delete: one made again under the name since (by a
  // user, say) is not ours and stays.
  std::string uid;
};
// Deletes the DistributedTrainingJob itself (ttlSecondsAfterFinished elapsed).
struct DeleteJob {
  std::string why;
};

enum class EventType { kNormal, kWarning };
const char* eventTypeName(EventType type);
// A Kubernetes Event on the job object.
struct EmitEvent {
  EventType type = EventType::kNormal;
  std::string reason;
  std::string message;
  // It mirrors a phase change of this plan's status: once that status is written the Event is due even
  // if a later action fails (the next pass sees no change and would never send it).
  bool ofStatus = false;
};

// Writes `status` through the status subresource.
struct UpdateStatus {
  JobStatus status;
};

using Action = std::variant<UpdateStatus, CreateService, CreateSecret, CreateConfigMap, DeleteChild, DeletePod,
                            DeleteGeneration, CreatePod, DeleteJob, EmitEvent>;

struct Plan {
  std::vector<Action> actions;
  JobStatus status;  // the status after this plan (equal to the job's when nothing changed)
  // Look again after this long even if nothing changes: deadlines, TTLs, force-delete bounds.
  std::optional<Clock::duration> requeueAfter;

  // The actions of one kind, in order.
  template <typename T>
  std::vector<const T*> all() const {
    std::vector<const T*> found;
    for (const Action& action : actions)
      if (const T* typed = std::get_if<T>(&action)) found.push_back(typed);
    return found;
  }
  bool empty() const { return actions.empty(); }
};

// One line per action, for logs and test failure messages (Secret contents are not printed).
std::string describe(const Action& action);
std::string describe(const Plan& plan);

}  // namespace tandem::operator_core
