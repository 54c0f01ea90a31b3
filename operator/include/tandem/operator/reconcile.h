// reconcile(job, observed, now, options) -> Plan: every decision of tandem-operator (DESIGN.md §9) as one
// pure function. No I/O, no clock, no randomness: time and the rendezvous token are arguments, so a table
// of (world, now) -> plan cases tests it completely. A thin executor applies the Plan.
//
// The decisions, in the order they are taken:
//  1. A job being deleted: nothing but force-deleting stuck pods (owner references clean up the rest).
//  2. Pods: a pod is *current* when it is this job's (controller uid), has the current generation
//     (status.generation) and a rank < spec.workers under its expected name; every other pod is *stale*
//     and is deleted. A pod terminating on an unreachable node for longer than forceDeleteAfter (counted
//     from its deletionTimestamp, i.e. after its grace period ran out) is force-deleted.
//  3. Finished jobs (Succeeded/Failed): cleanPodPolicy (All | Running | None) on the current pods, then
//     ttlSecondsAfterFinished: delete the job's pods, its Service and ConfigMap (those it controls: not a
//     user's of the same name, nor another controller's pod with our label) and the job (the Secret goes
//     with it) once it has elapsed since completionTime, requeue until then.
//  4. Invalid spec (specErrors, unreadable template, names too long for DNS): Failed, reason InvalidSpec.
//  5. The Service is created when missing (also while suspended); the Secret and, just after it, the
//     ConfigMap that names it (kRendezvousSecretAnnotation) when the ConfigMap is missing and the job is
//     not suspended. Secrets are not read: our ConfigMap existing is what says our Secret does. A
//     <job>-config with no owner is not ours: the gang waits for it to go (Warning ConfigMapNameTaken).
//  6. spec.runPolicy.suspend: the current gang is deleted (generation + 1, counted nowhere), phase
//     Suspended; Service, Secret, ConfigMap and checkpoints stay. Resuming resets startTime and creates
//     the gang again; the workers resume from their checkpoint.
//  7. activeDeadlineSeconds (from startTime): past -> every pending or running pod is deleted, Failed with
//     reason DeadlineExceeded; not yet -> requeueAfter the time left.
//  8. Failures of the current gang, the root cause first (permanent exit > disruption > retryable exit):
//       - exit code 1-127: permanent; exit code >= 128 or a signal: retryable; a failed pod without an
//         exit code counts as retryable;
//       - disruptions: preemption, eviction, node loss (pod on an unreachable node, or deleted by the taint
//         manager / pod GC) and deletion by someone else (also: a rank vanished from a Running gang).
//     restartPolicy OnFailure restarts on any of them, ExitCode on all but permanent exit codes, Never on
//     none (like `tandem run`). A restart deletes the generation and records generation + 1 with
//     restarts + 1, or preemptions + 1 for disruptions, which never consume backoffLimit; a counted
//     restart beyond backoffLimit fails the job with reason BackoffLimitExceeded instead.
//  9. A Secret deleted by hand shows as current pods waiting in CreateContainerConfigError (`secret
//     "<name>" not found`): it is created again with a new token, and when part of the gang has started
//     (with a token that is gone) the gang restarts (generation + 1, counted nowhere) so that all read the
//     same. For a minute after the operator made it anew a wait is taken for the kubelet's earlier one.
// 10. Gang creation: the missing ranks of the current generation are created together, but only once no
//     stale pod is left (old workers may still be writing their SIGTERM checkpoint, and names are
//     reused); a pod force-deleted in the same plan counts as gone, since the executor deletes before it
//     creates. An operator restarted half-way creates only the missing ranks.
// 11. Phase from the pods: all running -> Running; all succeeded -> Succeeded (completionTime).
// Every phase change sets its condition (the previous one goes False) and emits an Event with the
// condition's reason; pod creation, stale deletion and force deletion emit Events too.
#pragma once

#include <chrono>
#include <optional>
#include <string>

#include "tandem/operator/job.h"
#include "tandem/operator/observed.h"
#include "tandem/operator/plan.h"

namespace tandem::operator_core {

struct ReconcileOptions {
  // Value of a new rendezvous Secret; used only when the ConfigMap is missing. The executor draws it from a
  // CSPRNG before each reconcile, so reconcile stays pure.
  std::string rendezvousToken;
  // Image of the worker container when spec.template names none.
  std::string defaultWorkerImage = "tandem-worker:0.1.0";
  // A pod terminating on an unreachable node this long after its deletionTimestamp is force-deleted.
  std::chrono::seconds forceDeleteAfter{60};
  // When the only failures are "lost a peer" exits (129) while another worker still looks Running, that
  // worker went silent: its node may be dying, which Kubernetes reports only after the node monitor's
  // grace period (40-50 s). The restart waits this long after the first such exit for that cause (a
  // disruption, not counted against backoffLimit) or another to show, then counts it as a failure.
  std::chrono::seconds silentPeerWait{90};
  // A worker whose node stopped reporting (Ready Unknown) while no other worker failed may well be
  // training on: the kubelet's link to the API server can fail alone. The gang restarts once the node
  // has been silent this long (counted from the condition's lastTransitionTime), or as soon as another
  // worker fails: a lost worker's peers exit within their collective timeout.
  std::chrono::seconds unreachableNodeWait{60};
};

// Condition and Event reasons.
namespace reasons {
inline constexpr const char* kJobCreated = "JobCreated";
inline constexpr const char* kAllWorkersRunning = "AllWorkersRunning";
inline constexpr const char* kAllWorkersSucceeded = "AllWorkersSucceeded";
inline constexpr const char* kJobSuspended = "JobSuspended";
inline constexpr const char* kJobResumed = "JobResumed";
inline constexpr const char* kWorkerFailed = "WorkerFailed";      // retryable exit code or signal
inline constexpr const char* kPermanentError = "PermanentError";  // exit code 1-127
inline constexpr const char* kPreempted = "Preempted";
inline constexpr const char* kEvicted = "Evicted";
inline constexpr const char* kNodeLost = "NodeLost";
inline constexpr const char* kPodDeleted = "PodDeleted";
inline constexpr const char* kBackoffLimitExceeded = "BackoffLimitExceeded";
inline constexpr const char* kDeadlineExceeded = "DeadlineExceeded";
inline constexpr const char* kInvalidSpec = "InvalidSpec";
// Events that mirror no condition.
inline constexpr const char* kCreatedWorkers = "CreatedWorkers";
inline constexpr const char* kDeletedStalePods = "DeletedStalePods";
inline constexpr const char* kForceDeleted = "ForceDeleted";
inline constexpr const char* kTtlExpired = "TTLExpired";
inline constexpr const char* kMissingRendezvousToken = "MissingRendezvousToken";
// Written by the executor, not planned: the API server refused to create a child object.
inline constexpr const char* kFailedCreate = "FailedCreate";
inline constexpr const char* kSpecChangeIgnored = "SpecChangeIgnored";  // an edit of a started job's spec
inline constexpr const char* kWaitingForPreviousJob = "WaitingForPreviousJob";  // its children not yet collected
inline constexpr const char* kWorkerNameTaken = "WorkerNameTaken";  // by a pod another controller owns
inline constexpr const char* kConfigMapNameTaken = "ConfigMapNameTaken";  // by a ConfigMap with no owner
// The Secret the workers read their token from was deleted: created again (the Restarting condition's
// reason too, when part of the gang had started with the old token).
inline constexpr const char* kRendezvousSecretRecreated = "RendezvousSecretRecreated";
}  // namespace reasons

// Why a pod of the current gang failed.
enum class FailureCause { kRetryableExit, kPermanentExit, kPreempted, kEvicted, kNodeLost, kDeleted };
const char* failureReason(FailureCause cause);  // the reasons:: word
// Disruptions are not the workload's fault: they restart under OnFailure and ExitCode without counting.
inline bool isDisruption(FailureCause cause) {
  return cause != FailureCause::kRetryableExit && cause != FailureCause::kPermanentExit;
}
// nullopt: the pod has not failed (pending, running, succeeded, or terminating after success).
std::optional<FailureCause> classifyPod(const ObservedPod& pod);

// Precondition: job.spec is the parse of job.manifestText (or specErrors says why not).
Plan reconcile(const JobObject& job, const Observed& observed, Clock::time_point now, const ReconcileOptions& options);

}  // namespace tandem::operator_core
