#include "tandem/operator/controller.h"

#include <malloc.h>

#include <map>

#include "tandem/common/log.h"
#include "tandem/common/random.h"
#include "tandem/operator/api_convert.h"
#include "tandem/operator/naming.h"
#include "tandem/operator/objects.h"

namespace tandem::operator_core {

namespace resources {
const kube::Resource kJobs{"tandem.dev", "v1alpha1", "distributedtrainingjobs", true};
const kube::Resource kPods{"", "v1", "pods", true};
const kube::Resource kServices{"", "v1", "services", true};
const kube::Resource kSecrets{"", "v1", "secrets", true};
const kube::Resource kConfigMaps{"", "v1", "configmaps", true};
const kube::Resource kEvents{"", "v1", "events", true};
const kube::Resource kLeases{"coordination.k8s.io", "v1", "leases", true};
const kube::Resource kNodes{"", "v1", "nodes", false};
}  // namespace resources

namespace {

using json = nlohmann::json;
using std::chrono::steady_clock;

// Pods: what podFromJson reads, nothing more (a gang of 512 pods stays small in memory).
void trimPod(json& pod) {
  trimMetadata(pod);
  json kept = {{"metadata", pod["metadata"]}, {"status", pod.value("status", json::object())}};
  kept["metadata"].erase("annotations");
  json spec = json::object();
  if (pod.contains("/spec/nodeName"_json_pointer)) spec["nodeName"] = pod["spec"]["nodeName"];
  if (pod.contains("/spec/containers/0/name"_json_pointer))
    spec["containers"] = json::array({{{"name", pod["spec"]["containers"][0]["name"]}}});
  kept["spec"] = std::move(spec);
  pod = std::move(kept);
}

// Services: only their metadata matters.
void trimToMetadata(json& object) {
  trimMetadata(object);
  json metadata = std::move(object["metadata"]);
  metadata.erase("annotations");
  object = {{"metadata", std::move(metadata)}};
}

// The ConfigMap's kRendezvousSecretAnnotation: the Secret its job's workers read; "" when absent.
std::string rendezvousSecretOf(const json& configMap) {
  const json* annotations = configMap.contains("metadata") && configMap["metadata"].is_object() &&
                                    configMap["metadata"].contains("annotations")
                                ? &configMap["metadata"]["annotations"]
                                : nullptr;
  if (annotations == nullptr || !annotations->is_object()) return "";
  const auto found = annotations->find(kRendezvousSecretAnnotation);
  return found != annotations->end() && found->is_string() ? found->get<std::string>() : "";
}

// ConfigMaps: their metadata, the name of the job's Secret and the manifest the workers train by
// (keepRunningSpec reads it).
void trimConfigMap(json& object) {
  json data = object.value("data", json::object());
  const std::string secret = rendezvousSecretOf(object);
  trimToMetadata(object);
  if (!secret.empty()) object["metadata"]["annotations"] = {{kRendezvousSecretAnnotation, secret}};
  if (data.contains(kConfigKey)) object["data"] = {{kConfigKey, std::move(data[kConfigKey])}};
}

std::string jobKey(const std::string& nameSpace, const std::string& name) { return nameSpace + "/" + name; }

// The pod informer's indexes.
constexpr const char* kPodsByJob = "job";    // "namespace/job name"
constexpr const char* kPodsByNode = "node";  // spec.nodeName

// The tandem.dev/job label of a child; "" when absent.
std::string jobLabelOf(const json& object) {
  const json::json_pointer labels("/metadata/labels");
  if (!object.contains(labels) || !object.at(labels).is_object()) return "";
  const json& label = object.at(labels).value(kJobLabel, json());
  return label.is_string() ? label.get<std::string>() : "";
}

// Runs fn(i) for i in [0, count) on up to `parallelism` threads; returns the first failure in index order.
Status parallelFor(size_t count, int parallelism, const std::function<Status(size_t)>& fn) {
  if (count == 0) return Status::Ok();
  std::vector<Status> results(count, Status::Ok());
  std::atomic<size_t> next{0};
  auto run = [&] {
    for (size_t i = next++; i < count; i = next++) results[i] = fn(i);
  };
  std::vector<std::thread> threads;
  const size_t extra = std::min<size_t>(count, static_cast<size_t>(std::max(1, parallelism))) - 1;
  for (size_t t = 0; t < extra; ++t) threads.emplace_back(run);
  run();
  for (auto& thread : threads) thread.join();
  for (Status& status : results)
    if (!status.ok()) return status;
  return Status::Ok();
}

// 400, 403, 422: the API server will not take the object as it is (quota, admission, validation).
bool isRefusal(const Status& status) {
  return status.code() == StatusCode::kInvalidArgument || status.code() == StatusCode::kPermissionDenied;
}

}  // namespace

Controller::Controller(kube::KubeClient& client, ControllerOptions options, OperatorMetrics& metrics)
    : client_(client), options_(std::move(options)), metrics_(metrics), events_(client_, options_.identity) {
  queue_.setDepthObserver([this](size_t depth) { metrics_.setWorkqueueDepth(static_cast<double>(depth)); });
  auto informer = [&](const char* name, const kube::Resource& resource, std::string selector,
                      std::function<void(json&)> trim, Informer::Handler handler, bool optional = false,
                      decltype(Informer::Options::indexers) indexers = {}) {
    return std::make_unique<Informer>(
        client_,
        Informer::Options{name, resource.collectionPath(options_.nameSpace), std::move(selector),
                          options_.watchTimeoutSeconds, std::move(trim), optional, std::move(indexers)},
        std::move(handler));
  };
  jobs_ = informer("distributedtrainingjobs", resources::kJobs, "", trimMetadata, [this](const json& job, bool) {
    queue_.add(Informer::keyOf(job));
    refreshJobCounts();
  });
  auto child = [this](const json& object, bool) { enqueueOwner(object); };
  // Indexed by job and by node: a reconcile and a node event each read their own pods, not the whole cache.
  pods_ = informer("pods", resources::kPods, kJobLabel, trimPod, child, /*optional=*/false,
                   {{kPodsByJob,
                     [](const json& pod) {
                       const std::string job = jobLabelOf(pod);
                       return job.empty() ? job : jobKey(pod["metadata"].value("namespace", ""), job);
                     }},
                    {kPodsByNode, [](const json& pod) { return pod.value("/spec/nodeName"_json_pointer, std::string()); }}});
  services_ = informer("services", resources::kServices, kJobLabel, trimToMetadata, child);
  configMaps_ = informer("configmaps", resources::kConfigMaps, kJobLabel, trimConfigMap, child);
  // A node becoming unreachable changes the decision for every job with a pod there.
  nodes_ = informer(
      "nodes", resources::kNodes, "", trimNode,
      [this](const json& node, bool) {
        const std::string name = node["metadata"].value("name", "");
        for (const json& pod : pods_->listByIndex(kPodsByNode, name)) enqueueOwner(pod);
      },
      /*optional=*/true);
}

std::vector<Informer*> Controller::informers() const {
  return {jobs_.get(), pods_.get(), services_.get(), configMaps_.get(), nodes_.get()};
}

Controller::~Controller() { stop(); }

void Controller::startInformers() {
  for (Informer* informer : informers()) informer->start();
}

bool Controller::waitForSync(std::chrono::milliseconds timeout) {
  const auto deadline = steady_clock::now() + timeout;
  for (Informer* informer : informers()) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - steady_clock::now());
    if (!informer->waitForSync(std::max(left, std::chrono::milliseconds(0)))) return false;
  }
  return true;
}

bool Controller::synced() const {
  for (Informer* informer : informers())
    if (!informer->synced()) return false;
  return true;
}

void Controller::startWorkers() {
  const int count = std::max(1, options_.workers);
  {
    std::lock_guard<std::mutex> lock(workersMutex_);
    runningWorkers_ += count;
  }
  for (int i = 0; i < count; ++i)
    workers_.emplace_back([this] {
      worker();
      std::lock_guard<std::mutex> lock(workersMutex_);
      if (--runningWorkers_ == 0) workersDone_.notify_all();
    });
  resync_ = std::thread([this] { resyncLoop(); });
  enqueueAllJobs();
}

void Controller::stopWorkers(std::chrono::milliseconds grace) {
  {
    std::lock_guard<std::mutex> lock(resyncMutex_);  // so that the resync loop cannot miss the wake-up
    stopping_ = true;
  }
  queue_.shutDown();
  resyncWake_.notify_all();
  {
    std::unique_lock<std::mutex> lock(workersMutex_);
    if (!workersDone_.wait_for(lock, grace, [this] { return runningWorkers_ == 0; })) {
      log::warning() << runningWorkers_ << " reconcile(s) still waiting on the API server after "
                     << std::chrono::duration_cast<std::chrono::milliseconds>(grace).count()
                     << " ms of shutdown: cancelling their calls";
      lock.unlock();
      client_.cancel();
    }
  }
  for (auto& thread : workers_)
    if (thread.joinable()) thread.join();
  if (resync_.joinable()) resync_.join();
}

void Controller::stop() {
  if (stopped_.exchange(true)) return;
  stopWorkers();
  client_.cancel();
  for (Informer* informer : informers()) informer->stop();
}

void Controller::enqueueOwner(const json& child) {
  const std::string job = jobLabelOf(child);
  if (!job.empty()) queue_.add(jobKey(child["metadata"].value("namespace", ""), job));
}

void Controller::refreshJobCounts() {
  std::map<std::string, int64_t> counts;
  jobs_->forEach([&](const json& job) {
    const std::string phase = job.value("/status/phase"_json_pointer, std::string());
    ++counts[phase.empty() ? "Pending" : phase];
  });
  metrics_.setJobsByPhase(counts);
}

void Controller::enqueueAllJobs() {
  jobs_->forEach([this](const json& job) { queue_.add(Informer::keyOf(job)); });
}

void Controller::resyncLoop() {
  constexpr auto kTrimPeriod = std::chrono::seconds(30);
  auto nextResync = steady_clock::now() + options_.resyncPeriod;
  while (!stopping_) {
    std::unique_lock<std::mutex> lock(resyncMutex_);
    resyncWake_.wait_for(lock, std::min<steady_clock::duration>(kTrimPeriod, options_.resyncPeriod),
                         [this] { return stopping_.load(); });
    if (stopping_) break;
    // Freed cache entries (deleted jobs and pods) go back to the system rather than staying in the heap.
    malloc_trim(0);
    if (steady_clock::now() < nextResync) continue;
    nextResync = steady_clock::now() + options_.resyncPeriod;
    // Periodic resync: catches anything a lost event or a failed write left behind.
    enqueueAllJobs();
  }
}

void Controller::worker() {
  while (auto key = queue_.get()) {
    const auto started = steady_clock::now();
    Status status = reconcileKey(*key);
    metrics_.observeReconcile(std::chrono::duration<double>(steady_clock::now() - started).count());
    if (status.ok()) {
      queue_.forget(*key);
    } else if (stopping_) {
      log::info() << "reconcile " << *key << " cut short by shutdown: " << status.message();
    } else {
      log::warning() << "reconcile " << *key << ": " << status.message() << " (attempt " << queue_.failures(*key) + 1
                     << ", retrying with backoff)";
      queue_.addRateLimited(*key);
    }
    queue_.done(*key);
  }
}

Observed Controller::observe(const JobObject& job) const {
  Observed observed;
  for (const json& pod : pods_->listByIndex(kPodsByJob, jobKey(job.nameSpace, job.name))) {
    ObservedPod observedPod = podFromJson(pod);
    if (!observedPod.nodeName.empty())
      if (auto node = nodes_->get("/" + observedPod.nodeName))
        if (const auto since = nodeUnreachableSince(*node)) {
          observedPod.nodeUnreachable = true;
          observedPod.nodeUnreachableSince = since;
        }
    observed.pods.push_back(std::move(observedPod));
  }
  if (auto service = services_->get(jobKey(job.nameSpace, serviceName(job.name))))
    observed.services.push_back(ObservedService{childFromJson(*service)});
  if (auto configMap = configMaps_->get(jobKey(job.nameSpace, configMapName(job.name))))
    observed.configMaps.push_back(ObservedConfigMap{childFromJson(*configMap), rendezvousSecretOf(*configMap)});
  return observed;
}

bool Controller::secretCreatedSinceConfigMap(const JobObject& job, const Observed& observed) {
  std::lock_guard<std::mutex> lock(secretsCreatedMutex_);
  const auto created = secretsCreated_.find(jobKey(job.nameSpace, job.name));
  if (created == secretsCreated_.end()) return false;
  const bool configMapSeen =
      std::any_of(observed.configMaps.begin(), observed.configMaps.end(),
                  [&](const ObservedConfigMap& configMap) { return configMap.controllerUid == job.uid; });
  if (!configMapSeen && created->second == job.uid) return true;
  secretsCreated_.erase(created);  // from here the ConfigMap says it (or another job holds the name)
  return false;
}

std::optional<Clock::time_point> Controller::secretRecreatedAt(const JobObject& job) {
  std::lock_guard<std::mutex> lock(secretsCreatedMutex_);
  const auto recreated = secretsRecreated_.find(jobKey(job.nameSpace, job.name));
  if (recreated == secretsRecreated_.end()) return std::nullopt;
  const auto& [uid, when] = recreated->second;
  if (uid == job.uid && Clock::now() - when < kSecretRecreationSettle) return when;
  secretsRecreated_.erase(recreated);
  return std::nullopt;
}

void Controller::forgetSecrets(const std::string& key) {
  std::lock_guard<std::mutex> lock(secretsCreatedMutex_);
  secretsCreated_.erase(key);
  secretsRecreated_.erase(key);
}

Status Controller::reconcileKey(const std::string& key) {
  const auto object = jobs_->get(key);
  if (!object) {  // deleted: owner references let the garbage collector remove the rest
    forgetSecrets(key);
    return Status::Ok();
  }
  // Once started, a job trains by the spec in its ConfigMap; only runPolicy edits apply.
  json effective = *object;
  std::string ignoredEdits;
  const std::string uid = object->value("/metadata/uid"_json_pointer, std::string());
  if (auto configMap = configMaps_->get(jobKey(object->value("/metadata/namespace"_json_pointer, std::string()),
                                               configMapName(object->value("/metadata/name"_json_pointer, std::string())))))
    if (childFromJson(*configMap).controllerUid == uid) ignoredEdits = keepRunningSpec(effective, *configMap);
  const JobObject job = jobFromJson(effective);
  if (!ignoredEdits.empty() && firstWarningOf(job)) {
    emitEvent(job, EmitEvent{EventType::kWarning, reasons::kSpecChangeIgnored,
                             "edits of " + ignoredEdits + " do not apply to a job that has started (only spec.runPolicy "
                             "does): delete and re-create the job to apply them"});
  }
  ReconcileOptions options = options_.reconcile;
  options.rendezvousToken = secureRandomHex(32);  // used only when the ConfigMap (and Secret) is missing
  Observed observed = observe(job);
  observed.rendezvousSecretCreated = secretCreatedSinceConfigMap(job, observed);
  observed.rendezvousSecretRecreatedAt = secretRecreatedAt(job);
  const Plan plan = reconcile(job, observed, Clock::now(), options);
  if (!plan.empty()) log::info() << "reconcile " << key << ":\n" << describe(plan);
  TANDEM_RETURN_IF_ERROR(execute(job, *object, plan));
  if (plan.requeueAfter)
    queue_.addAfter(key, std::chrono::duration_cast<WorkQueue::Clock::duration>(*plan.requeueAfter));
  return Status::Ok();
}

Status Controller::createChild(const kube::Resource& resource, const JobObject& job, const json& object,
                               Informer* cache, bool* madeAnew) {
  auto created = client_.create(resource.collectionPath(job.nameSpace), object);
  if (madeAnew != nullptr) *madeAnew = created.ok();
  if (!created.ok()) {
    // Already there (an earlier pass, or another replica before it lost the lease): nothing to do.
    if (kube::isAlreadyExists(created.status())) return Status::Ok();
    const std::string kind = resource.plural.substr(0, resource.plural.size() - 1);  // "services" -> "service"
    // (A Secret's values are already cut out of the message by the client: a webhook may quote them.)
    reportRefusedCreate(job, kind + " " + object.value("/metadata/name"_json_pointer, std::string()), created.status());
    return created.status();
  }
  if (cache != nullptr) cache->upsertIfNewer(std::move(created).value());
  return Status::Ok();
}

Status Controller::deletePod(const JobObject& job, const std::string& name, const std::string& uid,
                             std::optional<int64_t> grace) {
  kube::DeleteOptions options;
  options.gracePeriodSeconds = grace;
  options.preconditionUid = uid;
  auto deleted = client_.remove(resources::kPods.objectPath(job.nameSpace, name), options);
  // 404: gone already. 409: the uid precondition failed, a newer pod holds the name (the next pass sees it).
  if (!deleted.ok())
    return kube::isNotFound(deleted.status()) || kube::isConflict(deleted.status()) ? Status::Ok() : deleted.status();
  json pod = std::move(deleted).value();
  if (pod.value("kind", "") == "Pod") {
    // Mark it terminating in the cache at once, so that the next pass waits for it instead of deleting again.
    if (!pod.contains("/metadata/deletionTimestamp"_json_pointer)) pod["metadata"]["deletionTimestamp"] = formatTime(Clock::now());
    pods_->upsertIfNewer(std::move(pod));
  }
  return Status::Ok();
}

void Controller::emitEvent(const JobObject& job, const EmitEvent& event) { events_.record(job, event); }

bool Controller::firstWarningOf(const JobObject& job) {
  std::lock_guard<std::mutex> lock(warnedMutex_);
  if (warnedEdits_.size() >= 4096) warnedEdits_.clear();  // bounded: a repeat only costs one more Event
  return warnedEdits_.insert(job.uid + "/" + std::to_string(job.generation)).second;
}

void Controller::reportRefusedCreate(const JobObject& job, const std::string& what, const Status& status) {
  if (!isRefusal(status)) return;  // unavailable, conflicts: transient, retried without telling the user
  emitEvent(job, EmitEvent{EventType::kWarning, reasons::kFailedCreate, "creating " + what + ": " + status.message()});
}

Status Controller::createGang(const JobObject& job, const std::vector<const CreatePod*>& gang) {
  std::atomic<int64_t> created{0};
  std::vector<Status> results(gang.size());
  Status status = parallelFor(gang.size(), options_.createParallelism, [&](size_t index) {
    auto result = client_.create(resources::kPods.collectionPath(job.nameSpace), gang[index]->object);
    if (!result.ok()) {
      results[index] = kube::isAlreadyExists(result.status()) ? Status::Ok() : result.status();
      return results[index];
    }
    ++created;
    pods_->upsertIfNewer(std::move(result).value());
    return Status::Ok();
  });
  metrics_.addPodsCreated(static_cast<double>(created.load()));
  // The lowest refused rank speaks for the gang: the same refusal on every retry reads the same.
  for (size_t index = 0; index < gang.size(); ++index) {
    if (!isRefusal(results[index])) continue;
    reportRefusedCreate(job, "pod " + gang[index]->name, results[index]);
    break;
  }
  return status;
}

Status Controller::execute(const JobObject& job, const json& jobJson, const Plan& plan) {
  bool statusWritten = false;
  Status status = executeActions(job, jobJson, plan, statusWritten);
  if (!status.ok() && statusWritten) {
    // The phase change is recorded; its Event must be too, though an action after it failed.
    for (const EmitEvent* event : plan.all<EmitEvent>())
      if (event->ofStatus) emitEvent(job, *event);
  }
  return status;
}

Status Controller::executeActions(const JobObject& job, const json& jobJson, const Plan& plan, bool& statusWritten) {
  const auto& actions = plan.actions;
  for (size_t i = 0; i < actions.size(); ++i) {
    const Action& action = actions[i];
    if (const auto* update = std::get_if<UpdateStatus>(&action)) {
      json object = jobJson;
      object["status"] = mergeStatus(jobJson.value("status", json::object()), update->status);
      auto written = client_.update(resources::kJobs.objectPath(job.nameSpace, job.name) + "/status", object);
      if (!written.ok()) return written.status();  // 409: decided on a stale copy; the next pass decides again
      jobs_->upsertIfNewer(std::move(written).value());
      statusWritten = true;
      const int64_t restarted = (update->status.restarts + update->status.preemptions) -
                                (job.status.restarts + job.status.preemptions);
      if (restarted > 0) metrics_.addJobRestarts(static_cast<double>(restarted));
    } else if (const auto* service = std::get_if<CreateService>(&action)) {
      TANDEM_RETURN_IF_ERROR(createChild(resources::kServices, job, service->object, services_.get()));
    } else if (const auto* secret = std::get_if<CreateSecret>(&action)) {
      // Created, or there already (409): its name holds the job's uid, so it is ours either way. Until
      // the ConfigMap after it is seen, the next pass must not create it again (observe).
      bool madeAnew = false;
      TANDEM_RETURN_IF_ERROR(createChild(resources::kSecrets, job, secret->object, nullptr, &madeAnew));
      // A re-creation settles only when the Secret was made anew (409: it was there, the waits were stale).
      const bool recreated = secret->recreation() && madeAnew;
      {
        std::lock_guard<std::mutex> lock(secretsCreatedMutex_);
        secretsCreated_[jobKey(job.nameSpace, job.name)] = job.uid;  // (forgotten once the ConfigMap is seen)
        if (recreated) secretsRecreated_[jobKey(job.nameSpace, job.name)] = {job.uid, Clock::now()};
      }
      if (recreated) {
        emitEvent(job, EmitEvent{EventType::kWarning, reasons::kRendezvousSecretRecreated,
                                 "Secret " + secret->name + " was missing (deleted?): " + secret->recreatedBecause +
                                     "; created it again with a new token"});
      } else if (secret->recreation()) {
        log::info() << "Secret " << secret->name << " of " << job.nameSpace << "/" << job.name
                    << " is there (409): the pods' wait for it was from before it was created again";
      }
    } else if (const auto* configMap = std::get_if<CreateConfigMap>(&action)) {
      TANDEM_RETURN_IF_ERROR(createChild(resources::kConfigMaps, job, configMap->object, configMaps_.get()));
    } else if (std::holds_alternative<CreatePod>(action)) {
      // A gang: the consecutive CreatePod actions go out together.
      std::vector<const CreatePod*> gang;
      while (i < actions.size() && std::holds_alternative<CreatePod>(actions[i])) gang.push_back(&std::get<CreatePod>(actions[i++]));
      --i;
      TANDEM_RETURN_IF_ERROR(createGang(job, gang));
    } else if (const auto* remove = std::get_if<DeletePod>(&action)) {
      TANDEM_RETURN_IF_ERROR(deletePod(job, remove->name, remove->uid, remove->force ? std::optional<int64_t>(0) : remove->gracePeriodSeconds));
    } else if (const auto* generation = std::get_if<DeleteGeneration>(&action)) {
      TANDEM_RETURN_IF_ERROR(parallelFor(generation->pods.size(), options_.createParallelism, [&](size_t index) {
        return deletePod(job, generation->pods[index].name, generation->pods[index].uid, std::nullopt);
      }));
    } else if (const auto* child = std::get_if<DeleteChild>(&action)) {
      const kube::Resource& resource =
          child->kind == ChildKind::kService ? resources::kServices : resources::kConfigMaps;
      kube::DeleteOptions options;
      options.preconditionUid = child->uid;
      auto deleted = client_.remove(resource.objectPath(job.nameSpace, child->name), options);
      // 409: the uid precondition failed, another object holds the name now (not ours: it stays).
      if (!deleted.ok() && !kube::isNotFound(deleted.status()) && !kube::isConflict(deleted.status()))
        return deleted.status();
    } else if (std::holds_alternative<DeleteJob>(action)) {
      kube::DeleteOptions options;
      options.propagationPolicy = "Background";
      options.preconditionUid = job.uid;
      auto deleted = client_.remove(resources::kJobs.objectPath(job.nameSpace, job.name), options);
      if (!deleted.ok() && !kube::isNotFound(deleted.status())) return deleted.status();
    } else if (const auto* event = std::get_if<EmitEvent>(&action)) {
      emitEvent(job, *event);
    }
  }
  return Status::Ok();
}

}  // namespace tandem::operator_core
