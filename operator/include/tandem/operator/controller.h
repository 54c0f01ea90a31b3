// The operator's control loop: informers for jobs and their children (all but Secrets, which it may not
// read) feed job keys into a rate-limited work queue; workers turn a key into (JobObject, Observed) from
// the caches, call the pure reconcile(), and apply the Plan through the API server in order, stopping at
// the first failure (the key is retried with backoff; the next reconcile plans again from what it then
// sees). Writes are idempotent: a create that finds the object already there, or a delete that finds it
// gone, counts as done, so a restarted operator or a stale cache never duplicates pods. The status goes through the status subresource with
// the object's resourceVersion, so a decision taken on a stale copy is refused (409) and retaken.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "tandem/kube/client.h"
#include "tandem/operator/event_recorder.h"
#include "tandem/operator/informer.h"
#include "tandem/operator/operator_metrics.h"
#include "tandem/operator/plan.h"
#include "tandem/operator/reconcile.h"
#include "tandem/operator/work_queue.h"

namespace tandem::operator_core {

struct ControllerOptions {
  std::string nameSpace;  // "": every namespace
  int workers = 4;        // keys reconciled concurrently
  int createParallelism = 8;  // concurrent pod creations within one gang (each holds a TLS connection)
  std::chrono::seconds resyncPeriod{300};
  int watchTimeoutSeconds = 300;
  std::string identity;  // reportingInstance of Events
  ReconcileOptions reconcile;
};

class Controller {
 public:
  Controller(kube::KubeClient& client, ControllerOptions options, OperatorMetrics& metrics);
  ~Controller();

  void startInformers();
  bool waitForSync(std::chrono::milliseconds timeout);
  bool synced() const;
  // Starts the workers and the resync timer (once this replica leads).
  void startWorkers();
  // Stops the workers (before the Lease is released): running reconciles get `grace` to finish, then
  // their API calls are cancelled, so a stalled API server cannot hold the shutdown. Reconciling is
  // level-triggered: the next leader redoes whatever was cut short. Cancelling ends the client for good.
  void stopWorkers(std::chrono::milliseconds grace = std::chrono::seconds(5));
  // stopWorkers(), then ends the watches and stops the informers.
  void stop();

  Status reconcileKey(const std::string& key);  // one pass, for tests and the workers

 private:
  void worker();
  void resyncLoop();
  void enqueueOwner(const nlohmann::json& child);
  void refreshJobCounts();
  void enqueueAllJobs();
  Observed observe(const JobObject& job) const;
  // Whether this operator created the job's Secret and has not seen its ConfigMap since (then forgets it).
  bool secretCreatedSinceConfigMap(const JobObject& job, const Observed& observed);
  // When this operator made the job's deleted Secret anew, within kSecretRecreationSettle (then forgets).
  std::optional<Clock::time_point> secretRecreatedAt(const JobObject& job);
  // A deleted job's entries in both Secret memories (they would otherwise stay until a job of its name).
  void forgetSecrets(const std::string& key);
  Status execute(const JobObject& job, const nlohmann::json& jobJson, const Plan& plan);
  // The plan's actions in order, stopping at the first failure; statusWritten: its UpdateStatus landed.
  Status executeActions(const JobObject& job, const nlohmann::json& jobJson, const Plan& plan, bool& statusWritten);
  // madeAnew (optional): set when the API server created it (false when it was already there: 409).
  Status createChild(const kube::Resource& resource, const JobObject& job, const nlohmann::json& object,
                     Informer* cache, bool* madeAnew = nullptr);
  Status createGang(const JobObject& job, const std::vector<const CreatePod*>& gang);
  // A create the API server refused (quota, admission, validation): a Warning Event, since the job's
  // status cannot say why it makes no progress. Retries of the same refusal aggregate into one Event.
  void reportRefusedCreate(const JobObject& job, const std::string& what, const Status& status);
  // uid (empty: none) is a precondition: the API server refuses (409) to delete a newer pod of the name.
  Status deletePod(const JobObject& job, const std::string& name, const std::string& uid,
                   std::optional<int64_t> grace);
  void emitEvent(const JobObject& job, const EmitEvent& event);
  // True once per job uid and metadata.generation: one SpecChangeIgnored Event per edit, not per pass.
  bool firstWarningOf(const JobObject& job);

  kube::KubeClient& client_;
  ControllerOptions options_;
  OperatorMetrics& metrics_;
  EventRecorder events_;
  WorkQueue queue_;
  std::unique_ptr<Informer> jobs_;
  std::unique_ptr<Informer> pods_;
  std::unique_ptr<Informer> services_;
  std::unique_ptr<Informer> configMaps_;
  std::unique_ptr<Informer> nodes_;  // optional: where the pods run, to recognise unreachable nodes
  // Jobs (namespace/name -> uid) whose Secret this operator created and whose ConfigMap it has not yet
  // seen: a ConfigMap create that failed must not make the next pass create the Secret again.
  std::map<std::string, std::string> secretsCreated_;
  // Jobs whose deleted Secret this operator made anew: (uid, when), for kSecretRecreationSettle.
  std::map<std::string, std::pair<std::string, Clock::time_point>> secretsRecreated_;
  std::mutex secretsCreatedMutex_;  // both maps
  std::set<std::string> warnedEdits_;  // "<uid>/<generation>" whose ignored edit was reported
  std::mutex warnedMutex_;
  std::vector<Informer*> informers() const;
  std::vector<std::thread> workers_;
  int runningWorkers_ = 0;  // worker threads not yet returned, under workersMutex_
  std::mutex workersMutex_;
  std::condition_variable workersDone_;
  std::thread resync_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> stopped_{false};
  std::mutex resyncMutex_;
  std::condition_variable resyncWake_;
};

// The API resources the operator touches.
namespace resources {
extern const kube::Resource kJobs;
extern const kube::Resource kPods;
extern const kube::Resource kServices;
extern const kube::Resource kSecrets;
extern const kube::Resource kConfigMaps;
extern const kube::Resource kEvents;
extern const kube::Resource kLeases;
extern const kube::Resource kNodes;
}  // namespace resources

}  // namespace tandem::operator_core
