// reconcile(): the operator's decisions (reconcile.h lists them in order). JobReconciler holds one
// reconcile's working state; each step appends actions to buckets that finish() puts in executor order.
#include "tandem/operator/reconcile.h"

#include <algorithm>
#include <set>

#include "tandem/common/exit_codes.h"
#include "tandem/operator/naming.h"
#include "tandem/operator/objects.h"

namespace tandem::operator_core {

const char* failureReason(FailureCause cause) {
  switch (cause) {
    case FailureCause::kRetryableExit: return reasons::kWorkerFailed;
    case FailureCause::kPermanentExit: return reasons::kPermanentError;
    case FailureCause::kPreempted: return reasons::kPreempted;
    case FailureCause::kEvicted: return reasons::kEvicted;
    case FailureCause::kNodeLost: return reasons::kNodeLost;
    case FailureCause::kDeleted: return reasons::kPodDeleted;
  }
  return "";
}

std::optional<FailureCause> classifyPod(const ObservedPod& pod) {
  if (pod.phase == PodPhase::kSucceeded) return std::nullopt;
  // Disruptions first: a preempted worker also exits (143 after SIGTERM), but that is not its fault.
  const std::string& disruption = pod.disruptionReason;
  if (disruption == "PreemptionByScheduler" || disruption == "PreemptionByKubeScheduler" || pod.reason == "Preempting" ||
      pod.reason == "Preempted")
    return FailureCause::kPreempted;
  if (disruption == "DeletionByTaintManager" || disruption == "DeletionByPodGC" || pod.reason == "NodeLost")
    return FailureCause::kNodeLost;
  if (disruption == "EvictionByEvictionAPI" || disruption == "TerminationByKubelet" || pod.reason == "Evicted")
    return FailureCause::kEvicted;
  if (pod.phase == PodPhase::kFailed) {
    if (pod.signal || (pod.exitCode && *pod.exitCode >= 128)) return FailureCause::kRetryableExit;
    if (pod.exitCode && *pod.exitCode >= 1) return FailureCause::kPermanentExit;
    return FailureCause::kRetryableExit;  // failed before or without an exit code (admission, image, ...)
  }
  if (pod.nodeUnreachable || pod.phase == PodPhase::kUnknown) return FailureCause::kNodeLost;
  if (pod.terminating()) return FailureCause::kDeleted;  // we never delete a pod of the current generation
  return std::nullopt;
}

namespace {

using std::chrono::seconds;

constexpr size_t kMaxDnsLabel = 63;
// How far ahead of the operator's clock another component's timestamp may be and still be believed.
constexpr seconds kClockSkewTolerance{30};

std::optional<int64_t> numericLabel(const ObservedPod& pod, const char* key) {
  auto found = pod.labels.find(key);
  if (found == pod.labels.end()) return std::nullopt;
  const std::string& text = found->second;
  if (text.empty() || text.size() > 18 || !std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return std::nullopt;
  return std::stoll(text);
}

std::string secondsText(Clock::duration duration) {
  return std::to_string(std::chrono::duration_cast<seconds>(duration).count()) + "s";
}

std::string joinNames(const std::vector<std::string>& names) {
  std::string text;
  for (size_t i = 0; i < names.size(); ++i) text += (i ? ", " : "") + names[i];
  return text;
}

ConditionType conditionFor(JobPhase phase) {
  switch (phase) {
    case JobPhase::kRunning: return ConditionType::kRunning;
    case JobPhase::kRestarting: return ConditionType::kRestarting;
    case JobPhase::kSucceeded: return ConditionType::kSucceeded;
    case JobPhase::kFailed: return ConditionType::kFailed;
    case JobPhase::kSuspended: return ConditionType::kSuspended;
    case JobPhase::kNone:
    case JobPhase::kCreated: break;
  }
  return ConditionType::kCreated;
}

bool lostAPeer(const ObservedPod& pod) { return !pod.signal && pod.exitCode == kExitPeerLost; }

struct Failure {
  FailureCause cause;
  int64_t rank;
  std::string detail;  // "worker 1 (pod fmnist-worker-1) exited with code 137"
  bool lostAPeer = false;
};

// 0 is the most telling: a permanent error explains its peers' failures; a disruption, a signal or a
// worker's own retryable failure (its disk, its port) explains the "peer lost" exits (129) of the ranks
// that were training with it.
int causePriority(const Failure& failure) {
  if (failure.cause == FailureCause::kPermanentExit) return 0;
  if (isDisruption(failure.cause)) return 1;
  return failure.lostAPeer ? 3 : 2;
}

std::string describeFailure(const ObservedPod& pod, int64_t rank, FailureCause cause) {
  std::string text = "worker " + std::to_string(rank) + " (pod " + pod.name + ") ";
  const std::string onNode = pod.nodeName.empty() ? "" : " on node " + pod.nodeName;
  switch (cause) {
    case FailureCause::kRetryableExit:
      if (pod.signal) return text + "was killed by signal " + std::to_string(*pod.signal);
      if (lostAPeer(pod)) return text + "exited with code " + std::to_string(*pod.exitCode) + " (lost a peer; retryable)";
      if (pod.exitCode) return text + "exited with code " + std::to_string(*pod.exitCode) + " (retryable)";
      return text + "failed" + (pod.reason.empty() ? "" : " (" + pod.reason + ")");
    case FailureCause::kPermanentExit:
      return text + "exited with code " + std::to_string(*pod.exitCode) + " (permanent error)";
    case FailureCause::kPreempted: return text + "was preempted" + onNode;
    case FailureCause::kEvicted: return text + "was evicted" + onNode;
    case FailureCause::kNodeLost: return text + "was lost with its node" + (pod.nodeName.empty() ? "" : " " + pod.nodeName);
    case FailureCause::kDeleted: return text + "was deleted";
  }
  return text;
}

class JobReconciler {
 public:
  JobReconciler(const JobObject& job, const Observed& observed, Clock::time_point now, const ReconcileOptions& options)
      : job_(job), observed_(observed), now_(now), options_(options), status_(job.status) {}

  Plan run() {
    if (job_.deletionTimestamp) {  // owner references let the garbage collector remove the children
      forceDeleteStuckPods();
      return finish(/*writeStatus=*/false);
    }
    status_.observedGeneration = job_.generation;
    sortPods();
    forceDeleteStuckPods();
    deleteStalePods();
    if (isFinished(status_.phase)) return finished();
    if (!checkSpec()) return finished();
    ensureChildren();
    if (job_.spec.runPolicy.suspend) {
      suspend();
      return finish();
    }
    if (status_.phase == JobPhase::kSuspended) resume();
    if (deadlinePassed()) return finished();
    if (std::optional<Failure> failure = rootFailure()) {
      if (waitForSilentPeerCause(*failure) || waitForUnreachableNode(*failure)) return finish();
      handleFailure(*failure);
      return isFinished(status_.phase) ? finished() : finish();
    }
    if (recreateDeletedSecret()) return finish();
    createMissingWorkers();
    phaseFromPods();
    return isFinished(status_.phase) ? finished() : finish();
  }

 private:
  int64_t workers() const { return std::max<int64_t>(0, job_.spec.workers); }

  // A pod is current when it is ours, of the current generation, with a rank below spec.workers and the
  // name that rank gets; everything else the label selector found is stale.
  void sortPods() {
    current_.assign(static_cast<size_t>(workers()), nullptr);
    for (const ObservedPod& pod : observed_.pods) {
      // Another controller's pod that carries our label is not ours to delete (a job of our kind with
      // another uid is a deleted namesake: its leftovers are stale).
      if (!pod.controllerUid.empty() && pod.controllerUid != job_.uid && pod.controllerKind != kJobKind) {
        foreign_.push_back(&pod);
        continue;
      }
      const bool ours = pod.controllerUid.empty() || pod.controllerUid == job_.uid;
      auto jobLabel = pod.labels.find(kJobLabel);
      const std::optional<int64_t> rank = numericLabel(pod, kRankLabel);
      const std::optional<int64_t> generation = numericLabel(pod, kGenerationLabel);
      const bool isCurrent = ours && jobLabel != pod.labels.end() && jobLabel->second == job_.name && rank &&
                             generation && *generation == status_.generation && *rank < workers() &&
                             pod.name == workerPodName(job_.name, *rank) && current_[*rank] == nullptr;
      if (isCurrent)
        current_[*rank] = &pod;
      else
        stale_.push_back(&pod);
    }
  }

  bool anyCurrent() const {
    return std::any_of(current_.begin(), current_.end(), [](const ObservedPod* pod) { return pod != nullptr; });
  }

  void deletePod(const ObservedPod& pod, std::string why) {
    if (pod.terminating() || deleting_.count(pod.name)) return;
    deleting_.insert(pod.name);
    deletions_.push_back(DeletePod{pod.name, std::nullopt, false, std::move(why), pod.uid});
  }

  void event(EventType type, std::string reason, std::string message) {
    events_.push_back(EmitEvent{type, std::move(reason), std::move(message)});
  }

  void requeueIn(Clock::duration delay) {
    if (!requeue_ || delay < *requeue_) requeue_ = delay;
  }

  // Conditions follow Kubernetes: lastTransitionTime moves only when the status flips.
  void setCondition(ConditionType type, bool value, const std::string& reason, const std::string& message) {
    for (Condition& condition : status_.conditions) {
      if (condition.type != type) continue;
      if (condition.status != value) condition.lastTransitionTime = now_;
      condition.status = value;
      condition.reason = reason;
      condition.message = message;
      return;
    }
    status_.conditions.push_back(Condition{type, value, reason, message, now_});
  }

  // Enters `phase`: its condition goes True, the other live ones (Running, Restarting, Suspended) False,
  // and an Event with the same reason mirrors it. Created stays True once set.
  void transition(JobPhase phase, const std::string& reason, const std::string& message, EventType eventType) {
    status_.phase = phase;
    const ConditionType type = conditionFor(phase);
    setCondition(type, true, reason, message);
    for (ConditionType other : {ConditionType::kRunning, ConditionType::kRestarting, ConditionType::kSuspended})
      if (other != type && status_.hasTrueCondition(other)) setCondition(other, false, reason, message);
    event(eventType, reason, message);
    events_.back().ofStatus = true;
  }

  void fail(const std::string& reason, const std::string& message) {
    status_.completionTime = now_;
    transition(JobPhase::kFailed, reason, message, EventType::kWarning);
  }

  // A pod still terminating on an unreachable node after forceDeleteAfter will never be confirmed gone by
  // its kubelet; until it is, its name (and rank 0's DNS name) cannot be reused. Without the nodes
  // informer (a namespaced install may not read Nodes) the taint manager's eviction is the only hint, and
  // a weaker one (it also evicts for a maintenance taint, from a node whose kubelet is alive and may
  // still be stopping a stuck container): such a pod gets five times the bound.
  void forceDeleteStuckPods() {
    for (const ObservedPod& pod : observed_.pods) {
      const bool evictedByTaint = pod.disruptionReason == "DeletionByTaintManager";
      if (!pod.terminating() || !(pod.nodeUnreachable || evictedByTaint)) continue;
      const Clock::duration bound = pod.nodeUnreachable ? Clock::duration(options_.forceDeleteAfter)
                                                        : Clock::duration(options_.forceDeleteAfter * 5);
      const Clock::duration stuck = now_ - *pod.deletionTimestamp;
      if (stuck < bound) {
        requeueIn(bound - stuck);
        continue;
      }
      const std::string why = "terminating for " + secondsText(stuck) +
                              (pod.nodeUnreachable ? " on unreachable node " : " after the taint manager evicted it from node ") +
                              pod.nodeName + " (bound " + secondsText(bound) + ")";
      deleting_.insert(pod.name);
      forceDeleted_.insert(pod.name);
      deletions_.push_back(DeletePod{pod.name, 0, true, why, pod.uid});
      event(EventType::kWarning, reasons::kForceDeleted, "pod " + pod.name + " " + why + ": force-deleted");
    }
  }

  void deleteStalePods() {
    std::vector<std::string> names;
    for (const ObservedPod* pod : stale_) {
      if (pod->terminating() || deleting_.count(pod->name)) continue;
      deletePod(*pod, "not a worker of generation " + std::to_string(status_.generation));
      names.push_back(pod->name);
    }
    if (!names.empty())
      event(EventType::kNormal, reasons::kDeletedStalePods,
            "deleting " + std::to_string(names.size()) + " pod(s) outside generation " +
                std::to_string(status_.generation) + " ranks 0-" + std::to_string(workers() - 1) + ": " +
                joinNames(names));
  }

  // Rejects what cannot run: manifest errors, an unreadable template, names that DNS cannot carry.
  bool checkSpec() {
    std::vector<std::string> problems;
    for (const manifest::FieldError& error : job_.specErrors) problems.push_back(error.toString());
    if (problems.empty()) {
      StatusOr<nlohmann::json> podTemplate = readPodTemplate(job_);
      StatusOr<nlohmann::json> configMap = buildConfigMap(job_);
      if (!podTemplate.ok()) problems.push_back(podTemplate.status().message());
      if (!configMap.ok()) problems.push_back(configMap.status().message());
      if (podTemplate.ok() && configMap.ok()) {
        podTemplate_ = std::move(podTemplate).value();
        configMap_ = std::move(configMap).value();
      }
      const std::string longest = workerHostname(job_.name, std::max<int64_t>(0, workers() - 1));
      if (longest.size() > kMaxDnsLabel)
        problems.push_back("metadata.name: \"" + job_.name + "\" is too long: the worker hostname " + longest +
                           " must fit in " + std::to_string(kMaxDnsLabel) + " characters");
    }
    if (problems.empty()) return true;
    std::string message = "the job cannot run: ";
    for (size_t i = 0; i < problems.size(); ++i) message += (i ? "; " : "") + problems[i];
    fail(reasons::kInvalidSpec, message);
    return false;
  }

  // Ours only when it says so: an owner-less <job>-config (a user's, or one orphaned by a deletion with
  // --cascade=orphan) must not pass for the proof that our Secret exists, nor lend the workers its manifest.
  const ObservedConfigMap* ownConfigMap() const { return ownChild(observed_.configMaps, configMapName(job_.name)); }

  // Controlled by this job: the only children TTL clean-up may delete.
  template <typename Child>
  const Child* ownChild(const std::vector<Child>& children, const std::string& name) const {
    for (const Child& child : children)
      if (child.name == name && child.controllerUid == job_.uid) return &child;
    return nullptr;
  }

  // A Service of our name with no owner serves the workers as well as ours would (it is not created again),
  // but it stays the user's: TTL clean-up leaves it.
  template <typename Child>
  bool hasChild(const std::vector<Child>& children, const std::string& name) const {
    return std::any_of(children.begin(), children.end(), [&](const Child& child) {
      return child.name == name && (child.controllerUid.empty() || child.controllerUid == job_.uid);
    });
  }

  void ensureChildren() {
    if (!hasChild(observed_.services, serviceName(job_.name)))
      childCreations_.push_back(CreateService{serviceName(job_.name), buildService(job_)});
    // The ConfigMap fixes the spec the job trains by (keepRunningSpec): a job created suspended gets it
    // when it is first let run, so that edits made while it waits (a queue's, say) still apply. The
    // Secret is created just before it, and the ConfigMap names it: the operator cannot read Secrets, but
    // the executor stops at the first failed create, so our ConfigMap existing means our Secret does.
    const ObservedConfigMap* configMap = ownConfigMap();
    if (configMap == nullptr && !job_.spec.runPolicy.suspend) {
      if (options_.rendezvousToken.empty()) {
        missingToken_ = true;
        event(EventType::kWarning, reasons::kMissingRendezvousToken,
              "ConfigMap " + configMapName(job_.name) + " (and with it Secret " + secretName(job_.name, job_.uid) +
                  ") is missing and no token was supplied: not starting workers");
      } else {
        // Not again once made (a ConfigMap create that failed after it): our own Secret may be what fills
        // the namespace's quota, and quota admission refuses (403) before the API server would say 409.
        if (!observed_.rendezvousSecretCreated)
          childCreations_.push_back(
              CreateSecret{secretName(job_.name, job_.uid),
                           buildSecret(job_, secretName(job_.name, job_.uid), options_.rendezvousToken), {}});
        childCreations_.push_back(CreateConfigMap{configMapName(job_.name), configMap_});
      }
    }
    if (configMap != nullptr)
      rendezvousSecret_ =
          configMap->rendezvousSecret.empty() ? legacySecretName(job_.name) : configMap->rendezvousSecret;
    // A same-named child of a deleted job (the garbage collector has not removed it yet) makes our create
    // find it "already there": the workers would mount the old manifest or token. Wait for it to go.
    for (const std::string& name : foreignChildren()) {
      waitingForForeign_ = true;
      event(EventType::kNormal, reasons::kWaitingForPreviousJob,
            name + " still belongs to a previous job of this name: creating workers once it is deleted");
      requeueIn(std::chrono::seconds(5));
    }
    for (const ObservedConfigMap& other : observed_.configMaps)
      if (other.name == configMapName(job_.name) && other.controllerUid.empty()) {
        waitingForForeign_ = true;
        event(EventType::kWarning, reasons::kConfigMapNameTaken,
              "ConfigMap " + other.name + " has no owner (made by hand, or orphaned by a deletion with "
              "--cascade=orphan): creating workers once it is deleted");
        requeueIn(std::chrono::seconds(30));
      }
  }

  // A Secret deleted by hand: the operator may not read Secrets and learns it from the kubelet, which cannot
  // start a worker whose token it names (CreateContainerConfigError, `secret "<name>" not found`, or
  // `secrets "<name>"` from a kubelet that asks the API server). The Secret is created again with a new
  // token. Workers that have started hold a token that is gone, and a gang split across two tokens
  // refuses itself at the rendezvous (a permanent error): if any current worker has started, the gang
  // restarts, counted nowhere, as a suspension is. For kSecretRecreationSettle after this operator made
  // the Secret anew a wait is taken for the kubelet's earlier one (it retries every ten seconds or so);
  // past it, for a new deletion: without reading Secrets the two cannot be told apart, and only taking a
  // new deletion for a slow kubelet costs the job (a split gang), while the other way costs one restart.
  // Runs after failure handling: a failed worker restarts the gang by its own rules. True when it
  // restarted (the plan is then complete).
  bool recreateDeletedSecret() {
    if (rendezvousSecret_.empty()) return false;
    const std::string notFound = "\"" + rendezvousSecret_ + "\" not found";
    std::string waiting;  // the first worker that waits for it
    bool started = false;
    for (const ObservedPod* pod : current_) {
      if (pod == nullptr || pod->terminating()) continue;
      if (pod->waitingReason == "CreateContainerConfigError" && pod->waitingMessage.find("secret") != std::string::npos &&
          pod->waitingMessage.find(notFound) != std::string::npos) {
        if (waiting.empty()) waiting = pod->name;
      } else if (pod->phase != PodPhase::kPending) {
        started = true;
      }
    }
    if (waiting.empty()) return false;
    if (const auto& recreatedAt = observed_.rendezvousSecretRecreatedAt;
        recreatedAt && now_ - *recreatedAt < kSecretRecreationSettle) {
      requeueIn(*recreatedAt + kSecretRecreationSettle - now_);
      return false;
    }
    CreateSecret* queued = nullptr;  // ensureChildren's, when the ConfigMap is missing too
    for (Action& creation : childCreations_)
      if (auto* secret = std::get_if<CreateSecret>(&creation); secret != nullptr && secret->name == rendezvousSecret_)
        queued = secret;
    const std::string because = "worker " + waiting + " cannot start";
    if (queued != nullptr) {
      queued->recreatedBecause = because;
    } else {
      if (options_.rendezvousToken.empty()) {
        missingToken_ = true;
        event(EventType::kWarning, reasons::kMissingRendezvousToken,
              "Secret " + rendezvousSecret_ + " is missing (worker " + waiting +
                  " cannot start) and no token was supplied to create it again");
        return false;
      }
      childCreations_.push_back(CreateSecret{rendezvousSecret_,
                                             buildSecret(job_, rendezvousSecret_, options_.rendezvousToken),
                                             because});
    }
    if (!started) return false;  // (the executor's Warning says it once the Secret is made anew)
    const std::string missing = "Secret " + rendezvousSecret_ + " is missing (deleted?): " + because +
                                "; creating it again with a new token";
    const int64_t split = status_.generation;
    retireGeneration(missing);
    transition(JobPhase::kRestarting, reasons::kRendezvousSecretRecreated,
               missing + "; part of the gang started with the old token: deleting generation " +
                   std::to_string(split) + " and starting generation " + std::to_string(status_.generation) +
                   " (not counted against backoffLimit)",
               EventType::kWarning);
    return true;
  }

  // Our children's names held by an object another owner controls.
  std::vector<std::string> foreignChildren() const {
    std::vector<std::string> names;
    auto check = [&](const auto& children, const std::string& name, const char* kind) {
      for (const auto& child : children)
        if (child.name == name && !child.controllerUid.empty() && child.controllerUid != job_.uid)
          names.push_back(std::string(kind) + " " + name);
    };
    check(observed_.services, serviceName(job_.name), "Service");  // (the Secret's name holds our uid)
    check(observed_.configMaps, configMapName(job_.name), "ConfigMap");
    return names;
  }

  // Deletes the current gang and moves to the next generation: its pods become stale from here on.
  void retireGeneration(const std::string& why) {
    DeleteGeneration action{status_.generation, {}, why};
    for (const ObservedPod* pod : current_) {
      if (pod == nullptr || pod->terminating() || deleting_.count(pod->name)) continue;
      deleting_.insert(pod->name);
      action.pods.push_back({pod->name, pod->uid});
    }
    if (!action.pods.empty()) deletions_.push_back(std::move(action));
    ++status_.generation;
    std::fill(current_.begin(), current_.end(), nullptr);
  }

  void suspend() {
    const std::string gang = "generation " + std::to_string(status_.generation);
    const bool hadGang = anyCurrent();
    if (hadGang) retireGeneration("spec.runPolicy.suspend is true");
    if (status_.phase != JobPhase::kSuspended)
      transition(JobPhase::kSuspended, reasons::kJobSuspended,
                 std::string("spec.runPolicy.suspend is true: ") +
                     (hadGang ? "deleted the worker pods of " + gang : "no worker pods") +
                     "; the Service, Secret, ConfigMap and checkpoints are kept",
                 EventType::kNormal);
  }

  // The deadline restarts with the run, as it does for a resumed Kubernetes Job.
  void resume() {
    status_.phase = JobPhase::kCreated;
    status_.startTime = now_;
    const std::string message = "spec.runPolicy.suspend is false: starting generation " +
                                std::to_string(status_.generation) + "; the workers resume from their checkpoint";
    setCondition(ConditionType::kSuspended, false, reasons::kJobResumed, message);
    if (!status_.hasTrueCondition(ConditionType::kCreated))
      setCondition(ConditionType::kCreated, true, reasons::kJobCreated, message);
    event(EventType::kNormal, reasons::kJobResumed, message);
  }

  bool deadlinePassed() {
    const int64_t limit = job_.spec.runPolicy.activeDeadlineSeconds;
    if (limit <= 0 || !status_.startTime) return false;
    if (now_ < *status_.startTime + seconds(limit)) return false;
    int64_t stopped = 0;
    for (const ObservedPod* pod : current_) {
      if (pod == nullptr || pod->finished() || pod->terminating()) continue;
      deletePod(*pod, "activeDeadlineSeconds passed");
      ++stopped;
    }
    fail(reasons::kDeadlineExceeded, "activeDeadlineSeconds " + std::to_string(limit) + " passed " +
                                         secondsText(now_ - *status_.startTime) + " after the start: deleting " +
                                         std::to_string(stopped) + " pending or running worker pod(s)");
    return true;
  }

  std::optional<Failure> rootFailure() const {
    std::optional<Failure> root;
    for (int64_t rank = 0; rank < workers(); ++rank) {
      const ObservedPod* pod = current_[rank];
      std::optional<Failure> failure;
      if (pod != nullptr) {
        if (std::optional<FailureCause> cause = classifyPod(*pod))
          failure = Failure{*cause, rank, describeFailure(*pod, rank, *cause), lostAPeer(*pod)};
      } else if (status_.phase == JobPhase::kRunning) {
        // Every rank existed when the gang went Running: a missing one was deleted behind our back.
        failure = Failure{FailureCause::kDeleted, rank,
                          "worker " + std::to_string(rank) + " (pod " + workerPodName(job_.name, rank) +
                              ") disappeared from the running gang"};
      }
      if (failure && (!root || causePriority(*failure) < causePriority(*root))) root = failure;
    }
    return root;
  }

  // True while a "lost a peer" failure waits for its cause (ReconcileOptions::silentPeerWait): some
  // current worker still looks Running, and the first such exit is recent.
  bool waitForSilentPeerCause(Failure& failure) {
    if (!failure.lostAPeer) return false;
    std::optional<Clock::time_point> first;
    std::optional<int64_t> silent;
    for (int64_t rank = 0; rank < workers(); ++rank) {
      const ObservedPod* pod = current_[rank];
      if (pod == nullptr) continue;
      // Running with its worker container not yet exited (a sidecar keeps an exited worker's pod Running).
      if (pod->phase == PodPhase::kRunning && !pod->terminating() && !pod->exitCode) silent = silent.value_or(rank);
      if (lostAPeer(*pod) && pod->finishedAt && (!first || *pod->finishedAt < *first)) first = pod->finishedAt;
    }
    if (!silent || !first) return false;
    const Clock::time_point until = *first + options_.silentPeerWait;
    if (now_ < until) {
      requeueIn(until - now_);
      return true;
    }
    failure.detail += "; worker " + std::to_string(*silent) + " still looks Running but stopped answering its peers (no "
                      "other cause showed within " + std::to_string(options_.silentPeerWait.count()) + " s)";
    return false;
  }

  // True while the only failures are workers on nodes that stopped reporting less than
  // unreachableNodeWait ago (ReconcileOptions), still Running or Pending there as far as the API knows.
  bool waitForUnreachableNode(Failure& failure) {
    if (failure.cause != FailureCause::kNodeLost) return false;
    std::optional<Clock::time_point> earliest;
    std::set<std::string> nodes;
    for (int64_t rank = 0; rank < workers(); ++rank) {
      const ObservedPod* pod = current_[rank];
      if (pod == nullptr) {
        if (status_.phase == JobPhase::kRunning) return false;  // deleted from the running gang
        continue;
      }
      if (!classifyPod(*pod)) continue;
      const bool onlyItsNode = pod->nodeUnreachableSince && !pod->terminating() && pod->disruptionReason.empty() &&
                               pod->reason != "NodeLost" &&
                               (pod->phase == PodPhase::kRunning || pod->phase == PodPhase::kPending);
      if (!onlyItsNode) return false;  // a failure of its own: act now
      // A time well ahead of ours (the node controller's clock runs ahead) says nothing: no wait.
      const Clock::time_point since =
          *pod->nodeUnreachableSince > now_ + kClockSkewTolerance ? Clock::time_point{} : *pod->nodeUnreachableSince;
      if (!earliest || since < *earliest) earliest = since;
      nodes.insert(pod->nodeName);
    }
    if (!earliest) return false;
    const Clock::time_point until = *earliest + options_.unreachableNodeWait;
    if (now_ < until) {
      requeueIn(until - now_);
      return true;
    }
    if (*earliest > Clock::time_point{})
      failure.detail += "; node " + joinNames(std::vector<std::string>(nodes.begin(), nodes.end())) +
                        " stopped reporting " + secondsText(now_ - *earliest) + " ago";
    return false;
  }

  void handleFailure(const Failure& failure) {
    const auto& policy = job_.spec.runPolicy;
    const bool restart = policy.restartPolicy == "OnFailure" ||
                         (policy.restartPolicy == "ExitCode" && failure.cause != FailureCause::kPermanentExit);
    if (!restart) {
      fail(failureReason(failure.cause),
           failure.detail + "; restartPolicy " + policy.restartPolicy +
               (policy.restartPolicy == "Never" ? " never restarts" : " does not restart permanent errors"));
      return;
    }
    const bool counted = !isDisruption(failure.cause);
    if (counted && status_.restarts >= policy.backoffLimit) {
      fail(reasons::kBackoffLimitExceeded, failure.detail + "; backoffLimit " + std::to_string(policy.backoffLimit) +
                                               " reached after " + std::to_string(status_.restarts) + " restart(s)");
      return;
    }
    const int64_t failed = status_.generation;
    retireGeneration(failure.detail);
    std::string message = failure.detail + "; deleting generation " + std::to_string(failed) +
                          " and starting generation " + std::to_string(status_.generation);
    if (counted) {
      ++status_.restarts;
      message += " (restart " + std::to_string(status_.restarts) + " of backoffLimit " +
                 std::to_string(policy.backoffLimit) + ")";
    } else {
      ++status_.preemptions;
      message += " (" + std::string(failureReason(failure.cause)) + " does not count against backoffLimit)";
    }
    transition(JobPhase::kRestarting, failureReason(failure.cause), message, EventType::kWarning);
  }

  // Gang creation: all missing ranks at once, and only once the previous generation is entirely gone.
  void createMissingWorkers() {
    std::vector<int64_t> missing;
    for (int64_t rank = 0; rank < workers(); ++rank)
      if (current_[rank] == nullptr) missing.push_back(rank);
    // A force-deleted pod is gone as soon as its deletion returns, and the executor creates after deleting.
    const bool staleLeft = std::any_of(stale_.begin(), stale_.end(),
                                       [&](const ObservedPod* pod) { return !forceDeleted_.count(pod->name); });
    // A worker's name held by another controller's pod: never deleted, so the gang waits, and says why.
    bool nameTaken = false;
    for (const ObservedPod* pod : foreign_)
      for (int64_t rank : missing)
        if (pod->name == workerPodName(job_.name, rank)) {
          nameTaken = true;
          event(EventType::kWarning, reasons::kWorkerNameTaken,
                "pod " + pod->name + " is controlled by a " + (pod->controllerKind.empty() ? "controller" : pod->controllerKind) +
                    ", not by this job: not touching it; creating the workers once it is gone");
          requeueIn(std::chrono::seconds(30));
        }
    if (!missing.empty() && !staleLeft && !missingToken_ && !waitingForForeign_ && !nameTaken) {
      std::vector<std::string> names;
      for (int64_t rank : missing) {
        const std::string name = workerPodName(job_.name, rank);
        podCreations_.push_back(CreatePod{
            name, rank, status_.generation,
            buildWorkerPod(job_, podTemplate_, rank, status_.generation, options_.defaultWorkerImage,
                           rendezvousSecret_)});
        names.push_back(name);
      }
      plannedPods_ = static_cast<int64_t>(missing.size());
      event(EventType::kNormal, reasons::kCreatedWorkers,
            "creating " + std::to_string(missing.size()) + " of " + std::to_string(workers()) +
                " worker pod(s) of generation " + std::to_string(status_.generation) + ": " + joinNames(names));
    }
    if (plannedPods_ == 0 && !anyCurrent()) return;
    if (!status_.startTime) status_.startTime = now_;
    if (status_.phase == JobPhase::kNone)
      transition(JobPhase::kCreated, reasons::kJobCreated,
                 "Service " + serviceName(job_.name) + ", Secret " + rendezvousSecret_ + ", ConfigMap " +
                     configMapName(job_.name) + " and " + std::to_string(workers()) + " worker pod(s) of generation " +
                     std::to_string(status_.generation),
                 EventType::kNormal);
  }

  void phaseFromPods() {
    if (workers() == 0 || !std::all_of(current_.begin(), current_.end(), [](const ObservedPod* pod) { return pod; }))
      return;
    auto all = [&](PodPhase phase) {
      return std::all_of(current_.begin(), current_.end(),
                         [&](const ObservedPod* pod) { return pod->phase == phase && !pod->terminating(); });
    };
    const std::string gang = std::to_string(workers()) + " worker(s) of generation " + std::to_string(status_.generation);
    if (std::all_of(current_.begin(), current_.end(), [](const ObservedPod* pod) { return pod->phase == PodPhase::kSucceeded; })) {
      status_.completionTime = now_;
      transition(JobPhase::kSucceeded, reasons::kAllWorkersSucceeded, "all " + gang + " succeeded", EventType::kNormal);
    } else if (all(PodPhase::kRunning) && status_.phase != JobPhase::kRunning) {
      transition(JobPhase::kRunning, reasons::kAllWorkersRunning, "all " + gang + " are running", EventType::kNormal);
    }
  }

  // Succeeded or Failed: cleanPodPolicy on the current pods, then ttlSecondsAfterFinished.
  Plan finished() {
    const auto& policy = job_.spec.runPolicy;
    for (const ObservedPod* pod : current_) {
      if (pod == nullptr) continue;
      if (policy.cleanPodPolicy == "All" || (policy.cleanPodPolicy == "Running" && !pod->finished()))
        deletePod(*pod, "cleanPodPolicy " + policy.cleanPodPolicy + " after the job " + jobPhaseName(status_.phase));
    }
    const int64_t ttl = policy.ttlSecondsAfterFinished;
    if (ttl >= 0 && status_.completionTime) {
      const Clock::time_point expiry = *status_.completionTime + seconds(ttl);
      if (now_ < expiry) {
        requeueIn(expiry - now_);
      } else {
        const std::string why = "ttlSecondsAfterFinished " + std::to_string(ttl) + " elapsed";
        // Ours and stale pods, never another controller's that carries our label (sortPods' foreign_).
        for (const ObservedPod* pod : current_)
          if (pod != nullptr) deletePod(*pod, why);
        for (const ObservedPod* pod : stale_) deletePod(*pod, why);
        if (const ObservedService* service = ownChild(observed_.services, serviceName(job_.name)))
          deletions_.push_back(DeleteChild{ChildKind::kService, service->name, service->uid});
        if (const ObservedConfigMap* configMap = ownConfigMap())
          deletions_.push_back(DeleteChild{ChildKind::kConfigMap, configMap->name, configMap->uid});
        deleteJob_ = DeleteJob{why};
        event(EventType::kNormal, reasons::kTtlExpired,
              why + " since completion: deleting the job and the pods, Service and ConfigMap it controls (its "
                    "Secret goes with the job)");
      }
    }
    return finish();
  }

  // Counts, the deadline timer, and the actions in executor order.
  Plan finish(bool writeStatus = true) {
    WorkerCounts counts;
    int64_t ready = 0;
    for (const ObservedPod* pod : current_) {
      if (pod == nullptr) continue;
      switch (pod->phase) {
        case PodPhase::kPending: ++counts.pending; break;
        case PodPhase::kRunning: ++counts.running; break;
        case PodPhase::kSucceeded: ++counts.succeeded; break;
        case PodPhase::kFailed: ++counts.failed; break;
        case PodPhase::kUnknown: break;
      }
      if (pod->ready) ++ready;
    }
    counts.pending += plannedPods_;  // so the status already describes the world this plan makes
    status_.workers = counts;
    status_.readyWorkers = ready;

    const int64_t limit = job_.spec.runPolicy.activeDeadlineSeconds;
    if (!isFinished(status_.phase) && status_.phase != JobPhase::kSuspended && limit > 0 && status_.startTime)
      requeueIn(*status_.startTime + seconds(limit) - now_);

    Plan plan;
    plan.status = writeStatus ? status_ : job_.status;
    if (writeStatus && status_ != job_.status) plan.actions.push_back(UpdateStatus{status_});
    for (auto* bucket : {&childCreations_, &deletions_, &podCreations_})
      for (Action& action : *bucket) plan.actions.push_back(std::move(action));
    if (deleteJob_) plan.actions.push_back(*deleteJob_);
    for (EmitEvent& action : events_) plan.actions.push_back(std::move(action));
    plan.requeueAfter = requeue_;
    return plan;
  }

  const JobObject& job_;
  const Observed& observed_;
  const Clock::time_point now_;
  const ReconcileOptions& options_;
  JobStatus status_;

  std::vector<const ObservedPod*> current_;  // by rank; nullptr where the rank has no pod
  std::vector<const ObservedPod*> stale_;
  std::vector<const ObservedPod*> foreign_;  // labelled ours but controlled by another kind: left alone
  std::set<std::string> deleting_;      // pods this plan deletes
  std::set<std::string> forceDeleted_;  // of which force-deleted: gone once the deletion returns
  nlohmann::json podTemplate_ = nlohmann::json::object();
  nlohmann::json configMap_;
  std::string rendezvousSecret_ = secretName(job_.name, job_.uid);  // what the workers read (ensureChildren)
  bool missingToken_ = false;
  bool waitingForForeign_ = false;  // a child's name is still held by a previous job's object
  int64_t plannedPods_ = 0;

  std::vector<Action> childCreations_, deletions_, podCreations_;
  std::optional<DeleteJob> deleteJob_;
  std::vector<EmitEvent> events_;
  std::optional<Clock::duration> requeue_;
};

}  // namespace

Plan reconcile(const JobObject& job, const Observed& observed, Clock::time_point now, const ReconcileOptions& options) {
  return JobReconciler(job, observed, now, options).run();
}

}  // namespace tandem::operator_core
