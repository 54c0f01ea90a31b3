// operator reconcile: the pure decisions of tandem-operator (operator/include/tandem/operator/reconcile.h).
// Each test builds a world (a job and the pods, Services, Secrets and ConfigMaps the informers would see),
// reconciles it at a given time and checks the plan; `apply` plays the executor and the cluster so that
// multi-step stories (fail -> restart -> run, suspend -> resume, finish -> TTL) run end to end, and every
// plan is checked to be idempotent: reconciling the world it produces plans nothing more.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tandem/manifest/job_spec.h"
#include "tandem/operator/naming.h"
#include "tandem/operator/objects.h"
#include "tandem/operator/reconcile.h"

namespace tandem::operator_core {
namespace {

using nlohmann::json;
using std::chrono::seconds;

const Clock::time_point kT0 = Clock::from_time_t(1'700'000'000);
const char* const kUid = "0b6c3f1e-uid-fmnist";
const char* const kToken = "token-from-the-executor";

// ---------------------------------------------------------------------------------------------------------
// Worlds

struct JobOptions {
  int workers = 4;
  std::string restartPolicy = "OnFailure";
  int backoffLimit = 3;
  int activeDeadlineSeconds = 0;  // 0: not set
  int ttlSecondsAfterFinished = -1;  // -1: not set
  std::string cleanPodPolicy = "Running";
  bool suspend = false;
  bool model = true;
  std::string templateFlow;  // spec.template as one line of JSON/flow YAML; empty: no template
  std::string name = "fmnist";
};

std::string manifestText(const JobOptions& options) {
  std::string text = "apiVersion: tandem.dev/v1alpha1\nkind: DistributedTrainingJob\nmetadata:\n  name: " +
                     options.name + "\n  namespace: research\nspec:\n  workers: " + std::to_string(options.workers) + "\n";
  if (options.model) text += "  model:\n    kind: mlp\n    mlp: {hidden: [32, 16]}\n";
  text += "  data: {kind: synthetic}\n  training: {globalBatchSize: 64, epochs: 2}\n";
  text += "  checkpoint: {dir: /checkpoints, everySteps: 50, claimName: fmnist-ckpt}\n";
  text += "  runPolicy:\n    restartPolicy: " + options.restartPolicy +
          "\n    backoffLimit: " + std::to_string(options.backoffLimit) + "\n    cleanPodPolicy: " +
          options.cleanPodPolicy + "\n    suspend: " + (options.suspend ? "true" : "false") + "\n";
  if (options.activeDeadlineSeconds > 0)
    text += "    activeDeadlineSeconds: " + std::to_string(options.activeDeadlineSeconds) + "\n";
  if (options.ttlSecondsAfterFinished >= 0)
    text += "    ttlSecondsAfterFinished: " + std::to_string(options.ttlSecondsAfterFinished) + "\n";
  if (!options.templateFlow.empty()) text += "  template: " + options.templateFlow + "\n";
  return text;
}

JobObject makeJob(const std::string& text) {
  manifest::ParseResult parsed = manifest::parseManifest(text, "job.yaml");
  JobObject job;
  job.nameSpace = parsed.spec.nameSpace;
  job.name = parsed.spec.name;
  job.uid = kUid;
  job.generation = 1;
  job.creationTimestamp = kT0;
  job.spec = parsed.spec;
  job.specErrors = parsed.errors;
  job.manifestText = text;
  return job;
}

struct World {
  JobObject job;
  Observed observed;
  std::vector<EmitEvent> events;  // every event the executor emitted so far
};

World makeWorld(const JobOptions& options = {}) {
  World world{makeJob(manifestText(options)), {}, {}};
  EXPECT_TRUE(world.job.specErrors.empty()) << world.job.specErrors.front().toString();
  return world;
}

ReconcileOptions reconcileOptions() {
  ReconcileOptions options;
  options.rendezvousToken = kToken;
  return options;
}

Plan plan(const World& world, Clock::time_point now) {
  return reconcile(world.job, world.observed, now, reconcileOptions());
}

// Plays the executor and the API server: creations appear (pods as Pending), deletions mark the object
// terminating (force deletion removes it), status and job deletion are recorded.
void apply(World& world, const Plan& plan, Clock::time_point now) {
  // As the API server: a delete names the uid it observed (a precondition), and that pod must be there.
  auto deletedPod = [&](const std::string& name, const std::string& uid) -> ObservedPod* {
    for (ObservedPod& pod : world.observed.pods)
      if (pod.name == name && pod.uid == uid) return &pod;
    ADD_FAILURE() << "delete of pod " << name << " with uid '" << uid << "': no such pod";
    return nullptr;
  };
  auto markDeleted = [&](const std::string& name, const std::string& uid) {
    if (ObservedPod* pod = deletedPod(name, uid); pod != nullptr && !pod->deletionTimestamp) pod->deletionTimestamp = now;
  };
  for (const Action& action : plan.actions) {
    if (const auto* update = std::get_if<UpdateStatus>(&action)) world.job.status = update->status;
    if (const auto* create = std::get_if<CreateService>(&action))
      world.observed.services.push_back({{create->name, kUid, std::nullopt, "uid-of-service-" + create->name}});
    if (const auto* secret = std::get_if<CreateSecret>(&action)) {
      if (secret->recreation())
        world.observed.rendezvousSecretRecreatedAt = now;  // the controller's memory of it
      else
        world.observed.rendezvousSecretCreated = true;
    }
    if (const auto* create = std::get_if<CreateConfigMap>(&action)) {
      const bool taken = std::any_of(world.observed.configMaps.begin(), world.observed.configMaps.end(),
                                     [&](const ObservedConfigMap& configMap) { return configMap.name == create->name; });
      if (!taken) {  // (else the API server answers 409, which the executor counts as done)
        world.observed.configMaps.push_back(
            {{create->name, kUid, std::nullopt, "uid-of-configmap-" + create->name},
             create->object["metadata"]["annotations"][kRendezvousSecretAnnotation]});
        world.observed.rendezvousSecretCreated = false;  // the controller forgets once it sees the ConfigMap
      }
    }
    if (const auto* create = std::get_if<CreatePod>(&action)) {
      ObservedPod pod;
      pod.name = create->object["metadata"]["name"].get<std::string>();
      pod.uid = pod.name + "-g" + std::to_string(create->generation) + "-" + std::to_string(world.observed.pods.size());
      for (const auto& [key, value] : create->object["metadata"]["labels"].items()) pod.labels[key] = value.get<std::string>();
      pod.controllerUid = create->object["metadata"]["ownerReferences"][0]["uid"].get<std::string>();
      pod.phase = PodPhase::kPending;
      pod.creationTimestamp = now;
      world.observed.pods.push_back(pod);
    }
    if (const auto* remove = std::get_if<DeletePod>(&action)) {
      if (remove->force) {
        if (deletedPod(remove->name, remove->uid) != nullptr)
          std::erase_if(world.observed.pods, [&](const ObservedPod& pod) { return pod.uid == remove->uid && pod.name == remove->name; });
      } else {
        markDeleted(remove->name, remove->uid);
      }
    }
    if (const auto* remove = std::get_if<DeleteGeneration>(&action)) {
      for (const PodRef& pod : remove->pods) markDeleted(pod.name, pod.uid);
    }
    if (const auto* remove = std::get_if<DeleteChild>(&action)) {
      auto byName = [&](const ObservedChild& child) { return child.name == remove->name && child.uid == remove->uid; };
      if (remove->kind == ChildKind::kService) std::erase_if(world.observed.services, byName);
      if (remove->kind == ChildKind::kConfigMap) std::erase_if(world.observed.configMaps, byName);
    }
    if (std::holds_alternative<DeleteJob>(action)) world.job.deletionTimestamp = now;
    if (const auto* event = std::get_if<EmitEvent>(&action)) world.events.push_back(*event);
  }
}

// Reconciles and applies, returning the plan.
Plan step(World& world, Clock::time_point now) {
  Plan result = plan(world, now);
  apply(world, result, now);
  return result;
}

// Reconciling the world a plan produced must plan nothing more (no actions; a timer may remain).
void expectIdempotent(World world, const Plan& first, Clock::time_point now) {
  apply(world, first, now);
  Plan again = plan(world, now);
  EXPECT_TRUE(again.empty()) << "second reconcile planned:\n" << describe(again) << "after:\n" << describe(first);
}

// Kubelets finish: terminating pods on reachable nodes disappear.
void finishTerminations(World& world) {
  std::erase_if(world.observed.pods,
                [](const ObservedPod& pod) { return pod.deletionTimestamp && !pod.nodeUnreachable; });
}

ObservedPod& livePod(World& world, int rank) {
  const std::string name = workerPodName(world.job.name, rank);
  for (ObservedPod& pod : world.observed.pods)
    if (pod.name == name && !pod.deletionTimestamp) return pod;
  ADD_FAILURE() << "no live pod " << name;
  static ObservedPod none;
  return none;
}

void setAllPhases(World& world, PodPhase phase) {
  for (ObservedPod& pod : world.observed.pods) {
    if (pod.deletionTimestamp) continue;
    pod.phase = phase;
    pod.ready = phase == PodPhase::kRunning;
    if (phase == PodPhase::kSucceeded) pod.exitCode = 0;
  }
}

// A job whose generation-0 gang was created at kT0 and runs since kT0 + 10 s.
World runningWorld(const JobOptions& options = {}) {
  World world = makeWorld(options);
  step(world, kT0);
  setAllPhases(world, PodPhase::kRunning);
  const Plan running = step(world, kT0 + seconds(10));
  EXPECT_EQ(world.job.status.phase, JobPhase::kRunning) << describe(running);
  return world;
}

std::vector<std::string> eventReasons(const Plan& plan) {
  std::vector<std::string> reasons;
  for (const EmitEvent* event : plan.all<EmitEvent>()) reasons.push_back(event->reason);
  return reasons;
}

const EmitEvent* findEvent(const Plan& plan, const std::string& reason) {
  for (const EmitEvent* event : plan.all<EmitEvent>())
    if (event->reason == reason) return event;
  return nullptr;
}

std::set<std::string> deletedPodNames(const Plan& plan) {
  std::set<std::string> names;
  for (const DeletePod* remove : plan.all<DeletePod>()) names.insert(remove->name);
  for (const DeleteGeneration* remove : plan.all<DeleteGeneration>())
    for (const PodRef& pod : remove->pods) names.insert(pod.name);
  return names;
}

std::vector<std::string> createdPodNames(const Plan& plan) {
  std::vector<std::string> names;
  for (const CreatePod* create : plan.all<CreatePod>()) names.push_back(create->name);
  return names;
}

// Environment of the worker container as name -> entry.
std::map<std::string, json> environmentOf(const json& pod) {
  std::map<std::string, json> environment;
  for (const json& entry : pod["spec"]["containers"][0]["env"]) environment[entry["name"].get<std::string>()] = entry;
  return environment;
}

std::string envValue(const json& pod, const std::string& name) {
  auto environment = environmentOf(pod);
  return environment.count(name) && environment[name].contains("value") ? environment[name]["value"].get<std::string>()
                                                                        : "<absent>";
}

// ---------------------------------------------------------------------------------------------------------
// A fresh job: the Service, the Secret, the ConfigMap and the whole gang in one plan.

TEST(Reconcile, FreshJobCreatesServiceSecretConfigMapAndEveryWorker) {
  World world = makeWorld();
  const Plan result = plan(world, kT0);

  // UpdateStatus first, then the children, then the pods, then the events.
  ASSERT_FALSE(result.actions.empty());
  ASSERT_TRUE(std::holds_alternative<UpdateStatus>(result.actions.front())) << describe(result);

  ASSERT_EQ(result.all<CreateService>().size(), 1u);
  const json& service = result.all<CreateService>()[0]->object;
  EXPECT_EQ(service["metadata"]["name"], "fmnist");
  EXPECT_EQ(service["metadata"]["namespace"], "research");
  EXPECT_EQ(service["spec"]["clusterIP"], "None");
  EXPECT_EQ(service["spec"]["selector"], json({{"tandem.dev/job", "fmnist"}}));
  EXPECT_EQ(service["spec"]["publishNotReadyAddresses"], true);
  EXPECT_EQ(service["spec"]["ports"][0]["port"], 29400);

  const json owner{{"apiVersion", "tandem.dev/v1alpha1"}, {"kind", "DistributedTrainingJob"}, {"name", "fmnist"},
                   {"uid", kUid}, {"controller", true}, {"blockOwnerDeletion", true}};
  EXPECT_EQ(service["metadata"]["ownerReferences"], json::array({owner}));

  ASSERT_EQ(result.all<CreateSecret>().size(), 1u);
  const json& secret = result.all<CreateSecret>()[0]->object;
  EXPECT_EQ(secret["metadata"]["name"], std::string("fmnist-rendezvous-") + kUid);
  EXPECT_EQ(secret["stringData"]["token"], kToken);
  EXPECT_EQ(secret["metadata"]["ownerReferences"], json::array({owner}));

  // The ConfigMap holds a manifest that the worker's own parser accepts, with the same training config.
  ASSERT_EQ(result.all<CreateConfigMap>().size(), 1u);
  const json& configMap = result.all<CreateConfigMap>()[0]->object;
  EXPECT_EQ(configMap["metadata"]["name"], "fmnist-config");
  EXPECT_EQ(configMap["metadata"]["ownerReferences"], json::array({owner}));
  const manifest::ParseResult mounted = manifest::parseManifest(configMap["data"]["job.yaml"].get<std::string>(), "TANDEM_CONFIG");
  ASSERT_TRUE(mounted.ok()) << mounted.errors.front().toString();
  EXPECT_EQ(mounted.spec.jobKey(), "research/fmnist");
  EXPECT_EQ(mounted.spec.workers, 4);
  EXPECT_EQ(manifest::configHash(mounted.spec), manifest::configHash(world.job.spec));

  // Four pods of generation 0, each fully specified.
  const auto pods = result.all<CreatePod>();
  ASSERT_EQ(pods.size(), 4u);
  for (int rank = 0; rank < 4; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    const CreatePod& create = *pods[rank];
    const json& pod = create.object;
    const std::string name = "fmnist-worker-" + std::to_string(rank);
    EXPECT_EQ(create.name, name);
    EXPECT_EQ(create.rank, rank);
    EXPECT_EQ(create.generation, 0);
    EXPECT_EQ(pod["kind"], "Pod");
    EXPECT_EQ(pod["metadata"]["name"], name);
    EXPECT_EQ(pod["metadata"]["namespace"], "research");
    EXPECT_EQ(pod["metadata"]["labels"],
              json({{"tandem.dev/job", "fmnist"}, {"tandem.dev/rank", std::to_string(rank)}, {"tandem.dev/generation", "0"}}));
    EXPECT_EQ(pod["metadata"]["ownerReferences"], json::array({owner}));
    EXPECT_EQ(pod["metadata"]["annotations"],
              json({{"prometheus.io/scrape", "true"}, {"prometheus.io/port", "9400"}, {"prometheus.io/path", "/metrics"}}));
    EXPECT_EQ(pod["spec"]["restartPolicy"], "Never");
    EXPECT_EQ(pod["spec"]["hostname"], name);
    EXPECT_EQ(pod["spec"]["subdomain"], "fmnist");
    const json& container = pod["spec"]["containers"][0];
    EXPECT_EQ(pod["spec"]["containers"].size(), 1u);
    EXPECT_EQ(container["name"], "tandem-worker");
    EXPECT_EQ(container["image"], "tandem-worker:0.1.0");
    EXPECT_EQ(container["command"], json::array({"tandem-worker"}));
    const std::string r = std::to_string(rank);
    const json expectedEnvironment = json::array({
        {{"name", "TANDEM_JOB"}, {"value", "research/fmnist"}},
        {{"name", "TANDEM_RANK"}, {"value", r}},
        {{"name", "TANDEM_WORLD_SIZE"}, {"value", "4"}},
        {{"name", "TANDEM_GENERATION"}, {"value", "0"}},
        {{"name", "TANDEM_RDZV_ENDPOINT"}, {"value", "fmnist-worker-0.fmnist.research.svc:29400"}},
        {{"name", "TANDEM_RDZV_TOKEN"},
         {"valueFrom", {{"secretKeyRef", {{"name", std::string("fmnist-rendezvous-") + kUid}, {"key", "token"}}}}}},
        {{"name", "TANDEM_POD_IP"}, {"valueFrom", {{"fieldRef", {{"fieldPath", "status.podIP"}}}}}},
        {{"name", "TANDEM_CONFIG"}, {"value", "/etc/tandem/job.yaml"}},
        {{"name", "MASTER_ADDR"}, {"value", "fmnist-worker-0.fmnist.research.svc"}},
        {{"name", "MASTER_PORT"}, {"value", "29500"}},
        {{"name", "WORLD_SIZE"}, {"value", "4"}},
        {{"name", "RANK"}, {"value", r}},
        {{"name", "LOCAL_RANK"}, {"value", "0"}},
        {{"name", "NODE_RANK"}, {"value", r}},
    });
    EXPECT_EQ(container["env"], expectedEnvironment);
    EXPECT_EQ(pod["spec"]["volumes"],
              json::array({{{"name", "tandem-config"}, {"configMap", {{"name", "fmnist-config"}}}},
                           {{"name", "tandem-checkpoints"}, {"persistentVolumeClaim", {{"claimName", "fmnist-ckpt"}}}}}));
    EXPECT_EQ(container["volumeMounts"],
              json::array({{{"name", "tandem-config"}, {"mountPath", "/etc/tandem"}, {"readOnly", true}},
                           {{"name", "tandem-checkpoints"}, {"mountPath", "/checkpoints"}}}));
  }

  // Status: Created at kT0, the gang pending, events mirroring it.
  const JobStatus& status = result.status;
  EXPECT_EQ(status.phase, JobPhase::kCreated);
  EXPECT_EQ(status.generation, 0);
  EXPECT_EQ(status.restarts, 0);
  EXPECT_EQ(status.observedGeneration, 1);
  EXPECT_EQ(status.startTime, kT0);
  EXPECT_EQ(status.workers, (WorkerCounts{4, 0, 0, 0}));
  ASSERT_NE(status.condition(ConditionType::kCreated), nullptr);
  EXPECT_TRUE(status.condition(ConditionType::kCreated)->status);
  EXPECT_EQ(status.condition(ConditionType::kCreated)->reason, reasons::kJobCreated);
  EXPECT_EQ(status.condition(ConditionType::kCreated)->lastTransitionTime, kT0);
  EXPECT_EQ(eventReasons(result), (std::vector<std::string>{reasons::kCreatedWorkers, reasons::kJobCreated}));
  // JobCreated mirrors the status this plan writes: due even if the pod creations after it fail.
  // CreatedWorkers describes those creations: not.
  EXPECT_FALSE(result.all<EmitEvent>()[0]->ofStatus);
  EXPECT_TRUE(result.all<EmitEvent>()[1]->ofStatus);
  EXPECT_FALSE(result.requeueAfter);  // no deadline, no TTL

  expectIdempotent(world, result, kT0);
}

TEST(Reconcile, TemplateIsMergedIntoEveryWorker) {
  JobOptions options;
  options.templateFlow = R"({"metadata": {"labels": {"team": "vision", "tandem.dev/rank": "99"},
    "annotations": {"prometheus.io/port": "9500"}},
    "spec": {"nodeSelector": {"gpu": "a100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
      "terminationGracePeriodSeconds": 45, "restartPolicy": "Always", "hostname": "ignored",
      "containers": [{"name": "trainer", "image": "registry.example/tandem-worker:1.2",
        "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}},
        "env": [{"name": "OMP_NUM_THREADS", "value": "1"}, {"name": "MASTER_PORT", "value": "30000"}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        {"name": "sidecar", "image": "busybox", "command": ["sleep", "infinity"]}],
      "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "datasets"}}]}})";
  World world = makeWorld(options);
  const Plan result = plan(world, kT0);
  const auto pods = result.all<CreatePod>();
  ASSERT_EQ(pods.size(), 4u) << describe(result);
  const json& pod = pods[1]->object;

  // Our labels win over the template's; the template's annotations win over our defaults.
  EXPECT_EQ(pod["metadata"]["labels"]["team"], "vision");
  EXPECT_EQ(pod["metadata"]["labels"]["tandem.dev/rank"], "1");
  EXPECT_EQ(pod["metadata"]["annotations"]["prometheus.io/port"], "9500");
  EXPECT_EQ(pod["metadata"]["annotations"]["prometheus.io/scrape"], "true");
  // The template's scheduling and grace period are kept; restartPolicy and hostname are the operator's.
  EXPECT_EQ(pod["spec"]["nodeSelector"], json({{"gpu", "a100"}}));
  EXPECT_EQ(pod["spec"]["tolerations"][0]["key"], "gpu");
  EXPECT_EQ(pod["spec"]["terminationGracePeriodSeconds"], 45);
  EXPECT_EQ(pod["spec"]["restartPolicy"], "Never");
  EXPECT_EQ(pod["spec"]["hostname"], "fmnist-worker-1");

  const json& worker = pod["spec"]["containers"][0];
  EXPECT_EQ(worker["name"], "trainer");
  EXPECT_EQ(worker["image"], "registry.example/tandem-worker:1.2");
  EXPECT_EQ(worker["resources"]["limits"]["nvidia.com/gpu"], 1);
  EXPECT_EQ(worker["resources"]["limits"]["memory"], "8Gi");
  EXPECT_EQ(worker["command"], json::array({"tandem-worker"}));  // spec.model is set: built-in mode
  // The contract first, the template's env appended (a quoted "1" stays a string).
  const json& environment = worker["env"];
  ASSERT_EQ(environment.size(), 16u);
  EXPECT_EQ(environment[0]["name"], "TANDEM_JOB");
  EXPECT_EQ(environment[14], json({{"name", "OMP_NUM_THREADS"}, {"value", "1"}}));
  EXPECT_EQ(environment[15], json({{"name", "MASTER_PORT"}, {"value", "30000"}}));
  // Volumes: the template's first, then ours; mounts likewise.
  EXPECT_EQ(pod["spec"]["volumes"].size(), 3u);
  EXPECT_EQ(pod["spec"]["volumes"][0]["name"], "data");
  EXPECT_EQ(worker["volumeMounts"][0]["mountPath"], "/data");
  EXPECT_EQ(worker["volumeMounts"][1]["mountPath"], "/etc/tandem");
  EXPECT_EQ(worker["volumeMounts"][2]["mountPath"], "/checkpoints");
  // Other containers are passed through untouched.
  EXPECT_EQ(pod["spec"]["containers"][1], json({{"name", "sidecar"}, {"image", "busybox"}, {"command", {"sleep", "infinity"}}}));
}

TEST(Reconcile, TemplateFromApiServerJsonKeepsTypes) {
  // The executor hands over the object as JSON; JSON is read directly (no YAML typing guesses).
  const std::string text = R"({"apiVersion": "tandem.dev/v1alpha1", "kind": "DistributedTrainingJob",
    "metadata": {"name": "fmnist", "namespace": "research", "uid": "x", "resourceVersion": "7"},
    "spec": {"workers": 2, "model": {"kind": "mlp", "mlp": {"hidden": [8]}}, "data": {"kind": "synthetic"},
      "training": {"globalBatchSize": 64},
      "template": {"spec": {"containers": [{"name": "w", "env": [{"name": "YES", "value": "true"}]}]}}},
    "status": {"phase": "Running"}})";
  World world{makeJob(text), {}, {}};
  ASSERT_TRUE(world.job.specErrors.empty()) << world.job.specErrors.front().toString();
  const Plan result = plan(world, kT0);
  const auto pods = result.all<CreatePod>();
  ASSERT_EQ(pods.size(), 2u) << describe(result);
  EXPECT_EQ(pods[0]->object["spec"]["containers"][0]["env"].back(), json({{"name", "YES"}, {"value", "true"}}));
  // The mounted config leaves the server's status and metadata behind.
  const std::string mounted = result.all<CreateConfigMap>()[0]->object["data"]["job.yaml"].get<std::string>();
  EXPECT_EQ(json::parse(mounted).contains("status"), false);
  EXPECT_EQ(json::parse(mounted)["metadata"], json({{"name", "fmnist"}, {"namespace", "research"}}));
}

TEST(Reconcile, CustomModeKeepsTheTemplateCommand) {
  struct Case {
    const char* name;
    bool model;
    json expectedCommand;
  };
  const std::vector<Case> cases{
      {"custom mode: no model, command kept", false, json::array({"python", "train.py"})},
      {"model given: tandem-worker replaces the command", true, json::array({"tandem-worker"})},
  };
  for (const Case& testCase : cases) {
    SCOPED_TRACE(testCase.name);
    JobOptions options;
    options.model = testCase.model;
    options.templateFlow = R"({"spec": {"containers": [{"image": "pytorch/pytorch:2.3",
        "command": ["python", "train.py"], "args": ["--epochs", "3"]}]}})";
    World world = makeWorld(options);
    const Plan result = plan(world, kT0);
    const auto pods = result.all<CreatePod>();
    ASSERT_EQ(pods.size(), 4u) << describe(result);
    const json& container = pods[3]->object["spec"]["containers"][0];
    EXPECT_EQ(container["command"], testCase.expectedCommand);
    EXPECT_EQ(container["args"], json::array({"--epochs", "3"}));
    EXPECT_EQ(container["image"], "pytorch/pytorch:2.3");
    // The torchrun names and the Tandem contract are there in both modes.
    EXPECT_EQ(envValue(pods[3]->object, "MASTER_ADDR"), "fmnist-worker-0.fmnist.research.svc");
    EXPECT_EQ(envValue(pods[3]->object, "MASTER_PORT"), "29500");
    EXPECT_EQ(envValue(pods[3]->object, "WORLD_SIZE"), "4");
    EXPECT_EQ(envValue(pods[3]->object, "RANK"), "3");
    EXPECT_EQ(envValue(pods[3]->object, "LOCAL_RANK"), "0");
    EXPECT_EQ(envValue(pods[3]->object, "NODE_RANK"), "3");
    EXPECT_EQ(envValue(pods[3]->object, "TANDEM_RANK"), "3");
    EXPECT_EQ(environmentOf(pods[3]->object).count("TANDEM_RDZV_TOKEN"), 1u);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Phases from the pods

TEST(Reconcile, AllWorkersRunningMakesTheJobRunning) {
  World world = makeWorld();
  step(world, kT0);
  // Three running, one pending: still Created, nothing to say.
  setAllPhases(world, PodPhase::kRunning);
  livePod(world, 3).phase = PodPhase::kPending;
  livePod(world, 3).ready = false;
  const Plan partial = plan(world, kT0 + seconds(5));
  EXPECT_EQ(partial.status.phase, JobPhase::kCreated);
  EXPECT_EQ(partial.status.workers, (WorkerCounts{1, 3, 0, 0}));
  EXPECT_EQ(partial.status.readyWorkers, 3);
  EXPECT_TRUE(partial.all<EmitEvent>().empty());
  EXPECT_TRUE(partial.all<CreatePod>().empty());
  apply(world, partial, kT0 + seconds(5));

  livePod(world, 3).phase = PodPhase::kRunning;
  livePod(world, 3).ready = true;
  const Plan running = plan(world, kT0 + seconds(9));
  EXPECT_EQ(running.status.phase, JobPhase::kRunning);
  EXPECT_EQ(running.status.workers, (WorkerCounts{0, 4, 0, 0}));
  EXPECT_EQ(running.status.readyWorkers, 4);
  const Condition* condition = running.status.condition(ConditionType::kRunning);
  ASSERT_NE(condition, nullptr);
  EXPECT_TRUE(condition->status);
  EXPECT_EQ(condition->reason, reasons::kAllWorkersRunning);
  EXPECT_EQ(condition->lastTransitionTime, kT0 + seconds(9));
  EXPECT_TRUE(running.status.hasTrueCondition(ConditionType::kCreated));
  EXPECT_EQ(eventReasons(running), std::vector<std::string>{reasons::kAllWorkersRunning});
  EXPECT_EQ(running.all<UpdateStatus>().size(), 1u);
  EXPECT_EQ(running.actions.size(), 2u) << describe(running);  // status + event, nothing else
  expectIdempotent(world, running, kT0 + seconds(9));
}

TEST(Reconcile, AllWorkersSucceededCompletesTheJob) {
  World world = runningWorld();
  setAllPhases(world, PodPhase::kSucceeded);
  const Clock::time_point now = kT0 + seconds(600);
  const Plan result = plan(world, now);
  EXPECT_EQ(result.status.phase, JobPhase::kSucceeded);
  EXPECT_EQ(result.status.completionTime, now);
  EXPECT_EQ(result.status.workers, (WorkerCounts{0, 0, 4, 0}));
  EXPECT_TRUE(result.status.hasTrueCondition(ConditionType::kSucceeded));
  EXPECT_FALSE(result.status.hasTrueCondition(ConditionType::kRunning));
  EXPECT_EQ(result.status.condition(ConditionType::kRunning)->lastTransitionTime, now);
  EXPECT_EQ(eventReasons(result), std::vector<std::string>{reasons::kAllWorkersSucceeded});
  EXPECT_TRUE(deletedPodNames(result).empty());  // cleanPodPolicy Running: finished pods stay
  EXPECT_FALSE(result.requeueAfter);             // no TTL
  expectIdempotent(world, result, now);
}

TEST(Reconcile, RankZeroFinishingFirstKeepsTheJobRunning) {
  World world = runningWorld();
  livePod(world, 0).phase = PodPhase::kSucceeded;
  livePod(world, 0).exitCode = 0;
  const Plan result = plan(world, kT0 + seconds(60));
  EXPECT_EQ(result.status.phase, JobPhase::kRunning);
  EXPECT_EQ(result.status.workers, (WorkerCounts{0, 3, 1, 0}));
  EXPECT_TRUE(result.all<EmitEvent>().empty());
  EXPECT_TRUE(deletedPodNames(result).empty());
}

// ---------------------------------------------------------------------------------------------------------
// Failures: one pod of a running gang of 4 fails; what happens depends on the cause and restartPolicy.

struct FailureCase {
  const char* name;
  std::string restartPolicy;
  int backoffLimit;
  int restartsSoFar;
  std::function<void(ObservedPod&)> failPod;  // applied to rank 2
  bool restarts;                                 // true: gang restart; false: the job fails
  std::string reason;                            // Restarting or Failed condition reason
  int countedRestarts;                           // status.restarts after
  int preemptions;                               // status.preemptions after
};

void exitWith(ObservedPod& pod, int code) {
  pod.phase = PodPhase::kFailed;
  pod.exitCode = code;
  pod.ready = false;
}

std::vector<FailureCase> failureCases() {
  auto exit137 = [](ObservedPod& pod) { exitWith(pod, 137); };
  auto exit129 = [](ObservedPod& pod) { exitWith(pod, 129); };
  auto exit1 = [](ObservedPod& pod) { exitWith(pod, 1); };
  auto exit127 = [](ObservedPod& pod) { exitWith(pod, 127); };
  auto signal9 = [](ObservedPod& pod) {
    pod.phase = PodPhase::kFailed;
    pod.signal = 9;
  };
  auto evicted = [](ObservedPod& pod) {
    pod.phase = PodPhase::kFailed;
    pod.reason = "Evicted";
  };
  auto preemptedRunning = [](ObservedPod& pod) { pod.disruptionReason = "PreemptionByScheduler"; };
  auto preemptedAfterSigterm = [](ObservedPod& pod) {
    exitWith(pod, 143);
    pod.disruptionReason = "PreemptionByScheduler";
  };
  auto nodeUnreachable = [](ObservedPod& pod) { pod.nodeUnreachable = true; };
  auto taintManager = [](ObservedPod& pod) {
    pod.disruptionReason = "DeletionByTaintManager";
    // 20 s before `now`: within the force-delete bound (long after it, the pod is also force-deleted).
    pod.deletionTimestamp = kT0 + seconds(280);
  };
  auto deletedByUser = [](ObservedPod& pod) { pod.deletionTimestamp = kT0 + seconds(100); };

  using namespace reasons;
  return {
      // Retryable exit codes and signals restart under OnFailure and ExitCode, never under Never.
      {"retryable exit, OnFailure", "OnFailure", 3, 0, exit137, true, kWorkerFailed, 1, 0},
      {"retryable exit, ExitCode", "ExitCode", 3, 1, exit129, true, kWorkerFailed, 2, 0},
      {"retryable exit, Never", "Never", 3, 0, exit137, false, kWorkerFailed, 0, 0},
      {"signal, ExitCode", "ExitCode", 3, 0, signal9, true, kWorkerFailed, 1, 0},
      // Permanent exit codes (1-127) restart only under OnFailure.
      {"permanent exit, OnFailure", "OnFailure", 3, 0, exit1, true, kPermanentError, 1, 0},
      {"permanent exit, ExitCode", "ExitCode", 3, 0, exit1, false, kPermanentError, 0, 0},
      {"permanent exit 127, ExitCode", "ExitCode", 3, 0, exit127, false, kPermanentError, 0, 0},
      {"permanent exit, Never", "Never", 3, 0, exit1, false, kPermanentError, 0, 0},
      // Disruptions restart without consuming backoffLimit, even when it is exhausted.
      {"evicted, OnFailure, backoff exhausted", "OnFailure", 2, 2, evicted, true, kEvicted, 2, 1},
      {"evicted, ExitCode", "ExitCode", 3, 0, evicted, true, kEvicted, 0, 1},
      {"evicted, Never", "Never", 3, 0, evicted, false, kEvicted, 0, 0},
      {"preempted while running, ExitCode, backoffLimit 0", "ExitCode", 0, 0, preemptedRunning, true, kPreempted, 0, 1},
      {"preempted after SIGTERM exit 143", "OnFailure", 0, 0, preemptedAfterSigterm, true, kPreempted, 0, 1},
      {"node unreachable, OnFailure, backoffLimit 0", "OnFailure", 0, 0, nodeUnreachable, true, kNodeLost, 0, 1},
      {"deleted by the taint manager", "ExitCode", 1, 1, taintManager, true, kNodeLost, 1, 1},
      {"deleted by someone else", "OnFailure", 3, 0, deletedByUser, true, kPodDeleted, 0, 1},
      // backoffLimit counts restarts: the failure after the last allowed restart fails the job.
      {"backoff exhausted, retryable", "OnFailure", 2, 2, exit137, false, kBackoffLimitExceeded, 2, 0},
      {"backoff exhausted, permanent under OnFailure", "OnFailure", 1, 1, exit1, false, kBackoffLimitExceeded, 1, 0},
      {"backoffLimit 0, retryable", "ExitCode", 0, 0, exit137, false, kBackoffLimitExceeded, 0, 0},
  };
}

void PrintTo(const FailureCase& testCase, std::ostream* out) { *out << testCase.name; }

class OneWorkerFails : public ::testing::TestWithParam<FailureCase> {};

TEST_P(OneWorkerFails, RestartsOrFailsTheGang) {
  const FailureCase& testCase = GetParam();
  JobOptions options;
  options.restartPolicy = testCase.restartPolicy;
  options.backoffLimit = testCase.backoffLimit;
  World world = runningWorld(options);
  world.job.status.restarts = testCase.restartsSoFar;
  testCase.failPod(livePod(world, 2));
  const Clock::time_point now = kT0 + seconds(300);
  const Plan result = plan(world, now);
  const JobStatus& status = result.status;
  ASSERT_TRUE(std::holds_alternative<UpdateStatus>(result.actions.front())) << describe(result);
  EXPECT_EQ(status.restarts, testCase.countedRestarts);
  EXPECT_EQ(status.preemptions, testCase.preemptions);
  EXPECT_TRUE(result.all<CreatePod>().empty()) << "the next gang waits for the old one to be gone";
  const std::vector<std::string> events = eventReasons(result);
  ASSERT_EQ(events.size(), 1u) << describe(result);
  EXPECT_EQ(events[0], testCase.reason);
  EXPECT_EQ(result.all<EmitEvent>()[0]->type, EventType::kWarning);
  EXPECT_NE(result.all<EmitEvent>()[0]->message.find("fmnist-worker-2"), std::string::npos)
      << result.all<EmitEvent>()[0]->message;

  if (testCase.restarts) {
    EXPECT_EQ(status.phase, JobPhase::kRestarting);
    EXPECT_EQ(status.generation, 1);
    EXPECT_FALSE(status.completionTime);
    ASSERT_NE(status.condition(ConditionType::kRestarting), nullptr);
    EXPECT_TRUE(status.condition(ConditionType::kRestarting)->status);
    EXPECT_EQ(status.condition(ConditionType::kRestarting)->reason, testCase.reason);
    EXPECT_FALSE(status.hasTrueCondition(ConditionType::kRunning));
    // The whole generation goes, in one action (pods already terminating excepted).
    const auto generations = result.all<DeleteGeneration>();
    ASSERT_EQ(generations.size(), 1u) << describe(result);
    EXPECT_EQ(generations[0]->generation, 0);
    std::set<std::string> expected{"fmnist-worker-0", "fmnist-worker-1", "fmnist-worker-2", "fmnist-worker-3"};
    for (const ObservedPod& pod : world.observed.pods)
      if (pod.deletionTimestamp) expected.erase(pod.name);
    std::set<std::string> deleted;
    for (const PodRef& pod : generations[0]->pods) deleted.insert(pod.name);
    EXPECT_EQ(deleted, expected);
    EXPECT_TRUE(result.all<DeletePod>().empty());
  } else {
    EXPECT_EQ(status.phase, JobPhase::kFailed);
    EXPECT_EQ(status.generation, 0);
    EXPECT_EQ(status.completionTime, now);
    ASSERT_NE(status.condition(ConditionType::kFailed), nullptr);
    EXPECT_TRUE(status.condition(ConditionType::kFailed)->status);
    EXPECT_EQ(status.condition(ConditionType::kFailed)->reason, testCase.reason);
    EXPECT_FALSE(status.hasTrueCondition(ConditionType::kRunning));
    EXPECT_TRUE(result.all<DeleteGeneration>().empty());
    // cleanPodPolicy Running: the three running peers are stopped, the failed pod is kept for its logs.
    EXPECT_EQ(deletedPodNames(result), (std::set<std::string>{"fmnist-worker-0", "fmnist-worker-1", "fmnist-worker-3"}));
  }
  expectIdempotent(world, result, now);
}

INSTANTIATE_TEST_SUITE_P(Reconcile, OneWorkerFails, ::testing::ValuesIn(failureCases()),
                         [](const ::testing::TestParamInfo<FailureCase>& info) {
                           std::string name = info.param.name;
                           for (char& c : name)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return name;
                         });

TEST(Reconcile, RootCauseExplainsThePeersFailures) {
  // A disruption explains its peers' "peer lost" exits: the restart is not counted.
  {
    JobOptions options;
    options.backoffLimit = 0;
    World world = runningWorld(options);
    exitWith(livePod(world, 0), 129);
    livePod(world, 1).phase = PodPhase::kFailed;
    livePod(world, 1).reason = "Evicted";
    exitWith(livePod(world, 3), 129);
    const Plan result = plan(world, kT0 + seconds(100));
    EXPECT_EQ(result.status.phase, JobPhase::kRestarting) << describe(result);
    EXPECT_EQ(result.status.condition(ConditionType::kRestarting)->reason, reasons::kEvicted);
    EXPECT_EQ(result.status.restarts, 0);
    EXPECT_EQ(result.status.preemptions, 1);
  }
  // A permanent error explains the others: under ExitCode the job fails.
  {
    JobOptions options;
    options.restartPolicy = "ExitCode";
    World world = runningWorld(options);
    exitWith(livePod(world, 0), 129);
    exitWith(livePod(world, 2), 3);
    const Plan result = plan(world, kT0 + seconds(100));
    EXPECT_EQ(result.status.phase, JobPhase::kFailed) << describe(result);
    EXPECT_EQ(result.status.condition(ConditionType::kFailed)->reason, reasons::kPermanentError);
    EXPECT_NE(result.status.condition(ConditionType::kFailed)->message.find("exited with code 3"), std::string::npos);
  }
  // A worker's own retryable failure (its storage hung: 150) or a signal explains the lower ranks that
  // lost it as a peer (129), whichever the operator sees first.
  for (const auto& [fail, expected] : std::vector<std::pair<std::function<void(ObservedPod&)>, std::string>>{
           {[](ObservedPod& pod) { exitWith(pod, 150); }, "worker 2 (pod fmnist-worker-2) exited with code 150 (retryable)"},
           {[](ObservedPod& pod) {
              pod.phase = PodPhase::kFailed;
              pod.signal = 9;
            }, "worker 2 (pod fmnist-worker-2) was killed by signal 9"}}) {
    World world = runningWorld(JobOptions{});
    for (int64_t rank : {0, 3}) {  // as a kubelet reports them: with the time they exited
      exitWith(livePod(world, rank), 129);
      livePod(world, rank).finishedAt = kT0 + seconds(99);
    }
    fail(livePod(world, 2));
    const Plan result = plan(world, kT0 + seconds(100));
    ASSERT_EQ(result.status.phase, JobPhase::kRestarting) << describe(result);
    const std::string& message = result.status.condition(ConditionType::kRestarting)->message;
    EXPECT_NE(message.find(expected), std::string::npos) << message;
    EXPECT_EQ(message.find("code 129"), std::string::npos) << message;
  }
  // With no better cause (after the wait for one), the peer-lost exit is named, and said to be one.
  {
    World world = runningWorld(JobOptions{});
    exitWith(livePod(world, 1), 129);
    livePod(world, 1).finishedAt = kT0 + seconds(100);
    const Plan result = plan(world, kT0 + seconds(191));
    const std::string& message = result.status.condition(ConditionType::kRestarting)->message;
    EXPECT_NE(message.find("worker 1 (pod fmnist-worker-1) exited with code 129 (lost a peer; retryable)"), std::string::npos)
        << message;
  }
}

TEST(Reconcile, PeersOfASilentWorkerWaitForItsCauseBeforeACountedRestart) {
  {  // A pod kept Running by a sidecar after its worker exited is not a silent worker: no wait.
    World world = runningWorld(JobOptions{});
    for (int64_t rank = 0; rank < 4; ++rank) {
      exitWith(livePod(world, rank), 129);
      livePod(world, rank).finishedAt = kT0 + seconds(100);
    }
    livePod(world, 2).phase = PodPhase::kRunning;
    const Plan result = plan(world, kT0 + seconds(105));
    EXPECT_EQ(result.status.phase, JobPhase::kRestarting) << describe(result);
  }
  // A node dies silently: its pod still looks Running while the others exit 129 ("lost a peer") at
  // kT0 + 100 s; Kubernetes marks the node unreachable only ~40 s later.
  auto world = [] {
    World world = runningWorld(JobOptions{});
    for (int64_t rank : {0, 1, 3}) {
      exitWith(livePod(world, rank), 129);
      livePod(world, rank).finishedAt = kT0 + seconds(100 + rank);
    }
    return world;
  };
  {  // Soon after: no restart yet, and a reconcile comes back when the wait ends.
    World waiting = world();
    const Plan result = plan(waiting, kT0 + seconds(130));
    EXPECT_EQ(result.status.phase, JobPhase::kRunning) << describe(result);
    EXPECT_EQ(result.status.restarts, 0);
    EXPECT_TRUE(result.all<DeleteGeneration>().empty()) << describe(result);
    ASSERT_TRUE(result.requeueAfter.has_value());
    EXPECT_EQ(*result.requeueAfter, seconds(60));  // 100 s + 90 s - 130 s
  }
  {  // The node is then reported unreachable: a disruption, not counted against backoffLimit.
    World lost = world();
    livePod(lost, 2).nodeUnreachable = true;
    const Plan result = plan(lost, kT0 + seconds(145));
    EXPECT_EQ(result.status.phase, JobPhase::kRestarting) << describe(result);
    EXPECT_EQ(result.status.restarts, 0);
    EXPECT_EQ(result.status.preemptions, 1);
    EXPECT_EQ(result.status.condition(ConditionType::kRestarting)->reason, reasons::kNodeLost);
  }
  {  // No cause within the wait: a counted failure that says which worker went silent.
    World hung = world();
    const Plan result = plan(hung, kT0 + seconds(191));
    EXPECT_EQ(result.status.phase, JobPhase::kRestarting) << describe(result);
    EXPECT_EQ(result.status.restarts, 1);
    const std::string& message = result.status.condition(ConditionType::kRestarting)->message;
    EXPECT_NE(message.find("worker 2 still looks Running but stopped answering its peers"), std::string::npos) << message;
  }
  {  // Nobody left running: the 129s are all there is, and nothing is waited for.
    World alone = world();
    exitWith(livePod(alone, 2), 129);
    const Plan result = plan(alone, kT0 + seconds(105));
    EXPECT_EQ(result.status.phase, JobPhase::kRestarting) << describe(result);
  }
}

TEST(RunningSpec, OnlyRunPolicyEditsReachAJobThatHasStarted) {
  // The ConfigMap the job started with, and the live object after a `kubectl apply` of an edited file.
  const World world = makeWorld();
  StatusOr<json> configMap = buildConfigMap(world.job);
  ASSERT_TRUE(configMap.ok()) << configMap.status().toString();
  StatusOr<json> started = parseObjectText(world.job.manifestText);
  ASSERT_TRUE(started.ok());
  json live = *started;
  live["spec"]["workers"] = 2;
  live["spec"]["optimizer"] = {{"lr", 0.1}};           // a field the started spec did not have
  live["spec"]["runPolicy"]["suspend"] = true;         // applies
  live["spec"]["runPolicy"]["backoffLimit"] = 7;       // applies
  EXPECT_EQ(keepRunningSpec(live, *configMap), "spec.optimizer, spec.workers");
  EXPECT_EQ(live["spec"]["workers"], 4);
  EXPECT_FALSE(live["spec"].contains("optimizer"));
  EXPECT_EQ(live["spec"]["runPolicy"]["suspend"], true);
  EXPECT_EQ(live["spec"]["runPolicy"]["backoffLimit"], 7);
  EXPECT_EQ(live["spec"]["model"], (*started)["spec"]["model"]);

  // A field dropped by the edit is ignored too; an unedited job is left as it is.
  json dropped = *started;
  dropped["spec"].erase("checkpoint");
  EXPECT_EQ(keepRunningSpec(dropped, *configMap), "spec.checkpoint");
  EXPECT_EQ(dropped["spec"]["checkpoint"], (*started)["spec"]["checkpoint"]);
  json same = *started;
  same["spec"]["runPolicy"]["suspend"] = true;
  EXPECT_EQ(keepRunningSpec(same, *configMap), "");
  EXPECT_EQ(same["spec"]["runPolicy"]["suspend"], true);

  // A ConfigMap that cannot be read: the live spec stands.
  json unreadable = *configMap;
  unreadable["data"][kConfigKey] = "{not json: [";
  json edited = *started;
  edited["spec"]["workers"] = 2;
  EXPECT_EQ(keepRunningSpec(edited, unreadable), "");
  EXPECT_EQ(edited["spec"]["workers"], 2);
}

TEST(Reconcile, ClassifiesPodFailures) {
  struct Case {
    const char* name;
    std::function<void(ObservedPod&)> setUp;
    std::optional<FailureCause> expected;
  };
  const std::vector<Case> cases{
      {"pending", [](ObservedPod&) {}, std::nullopt},
      {"running", [](ObservedPod& pod) { pod.phase = PodPhase::kRunning; }, std::nullopt},
      {"succeeded", [](ObservedPod& pod) { pod.phase = PodPhase::kSucceeded; pod.exitCode = 0; }, std::nullopt},
      {"succeeded, then node unreachable",
       [](ObservedPod& pod) { pod.phase = PodPhase::kSucceeded; pod.nodeUnreachable = true; }, std::nullopt},
      {"exit 1", [](ObservedPod& pod) { exitWith(pod, 1); }, FailureCause::kPermanentExit},
      {"exit 127", [](ObservedPod& pod) { exitWith(pod, 127); }, FailureCause::kPermanentExit},
      {"exit 128", [](ObservedPod& pod) { exitWith(pod, 128); }, FailureCause::kRetryableExit},
      {"exit 143", [](ObservedPod& pod) { exitWith(pod, 143); }, FailureCause::kRetryableExit},
      {"signal", [](ObservedPod& pod) { pod.phase = PodPhase::kFailed; pod.signal = 11; }, FailureCause::kRetryableExit},
      {"failed without exit code",
       [](ObservedPod& pod) { pod.phase = PodPhase::kFailed; pod.reason = "UnexpectedAdmissionError"; },
       FailureCause::kRetryableExit},
      {"evicted", [](ObservedPod& pod) { pod.phase = PodPhase::kFailed; pod.reason = "Evicted"; }, FailureCause::kEvicted},
      {"eviction API", [](ObservedPod& pod) { pod.phase = PodPhase::kRunning; pod.disruptionReason = "EvictionByEvictionAPI"; },
       FailureCause::kEvicted},
      {"node-pressure eviction by the kubelet",
       [](ObservedPod& pod) { exitWith(pod, 137); pod.disruptionReason = "TerminationByKubelet"; }, FailureCause::kEvicted},
      {"preempted", [](ObservedPod& pod) { pod.phase = PodPhase::kRunning; pod.disruptionReason = "PreemptionByScheduler"; },
       FailureCause::kPreempted},
      {"preempting reason", [](ObservedPod& pod) { pod.phase = PodPhase::kFailed; pod.reason = "Preempting"; },
       FailureCause::kPreempted},
      {"node unreachable", [](ObservedPod& pod) { pod.phase = PodPhase::kRunning; pod.nodeUnreachable = true; },
       FailureCause::kNodeLost},
      {"phase unknown", [](ObservedPod& pod) { pod.phase = PodPhase::kUnknown; }, FailureCause::kNodeLost},
      {"NodeLost reason", [](ObservedPod& pod) { pod.phase = PodPhase::kFailed; pod.reason = "NodeLost"; },
       FailureCause::kNodeLost},
      {"pod GC", [](ObservedPod& pod) { pod.phase = PodPhase::kRunning; pod.disruptionReason = "DeletionByPodGC"; },
       FailureCause::kNodeLost},
      {"failed on an unreachable node keeps its exit code",
       [](ObservedPod& pod) { exitWith(pod, 2); pod.nodeUnreachable = true; }, FailureCause::kPermanentExit},
      {"deleted while running",
       [](ObservedPod& pod) { pod.phase = PodPhase::kRunning; pod.deletionTimestamp = kT0; }, FailureCause::kDeleted},
  };
  for (const Case& testCase : cases) {
    SCOPED_TRACE(testCase.name);
    ObservedPod pod;
    testCase.setUp(pod);
    EXPECT_EQ(classifyPod(pod), testCase.expected);
  }
}

TEST(Reconcile, MissingRankInRunningGangRestartsWithoutCounting) {
  World world = runningWorld();
  std::erase_if(world.observed.pods, [](const ObservedPod& pod) { return pod.name == "fmnist-worker-1"; });
  const Plan result = plan(world, kT0 + seconds(50));
  EXPECT_EQ(result.status.phase, JobPhase::kRestarting) << describe(result);
  EXPECT_EQ(result.status.condition(ConditionType::kRestarting)->reason, reasons::kPodDeleted);
  EXPECT_EQ(result.status.preemptions, 1);
  EXPECT_EQ(result.status.restarts, 0);
  EXPECT_TRUE(result.all<CreatePod>().empty());
  ASSERT_EQ(result.all<DeleteGeneration>().size(), 1u);
  EXPECT_EQ(result.all<DeleteGeneration>()[0]->pods.size(), 3u);
}

// ---------------------------------------------------------------------------------------------------------
// The gang restart end to end: delete generation 0, wait for it, create generation 1, run.

TEST(Reconcile, GangRestartCreatesTheNextGenerationOnceTheOldOneIsGone) {
  World world = runningWorld();
  exitWith(livePod(world, 1), 137);
  Clock::time_point now = kT0 + seconds(100);
  const Plan restart = step(world, now);
  EXPECT_EQ(world.job.status.generation, 1);
  EXPECT_EQ(world.job.status.restarts, 1);

  // The old pods are still terminating (writing their SIGTERM checkpoint): nothing is created yet.
  now += seconds(5);
  const Plan waiting = plan(world, now);
  EXPECT_TRUE(waiting.empty()) << describe(waiting);

  // Gone: generation 1 is created whole, with TANDEM_GENERATION=1.
  finishTerminations(world);
  now += seconds(20);
  const Plan create = plan(world, now);
  ASSERT_EQ(createdPodNames(create),
            (std::vector<std::string>{"fmnist-worker-0", "fmnist-worker-1", "fmnist-worker-2", "fmnist-worker-3"}))
      << describe(create);
  for (const CreatePod* pod : create.all<CreatePod>()) {
    EXPECT_EQ(pod->generation, 1);
    EXPECT_EQ(pod->object["metadata"]["labels"]["tandem.dev/generation"], "1");
    EXPECT_EQ(envValue(pod->object, "TANDEM_GENERATION"), "1");
  }
  EXPECT_EQ(create.status.phase, JobPhase::kRestarting);
  EXPECT_EQ(create.status.startTime, kT0);  // a restart keeps the job's start
  EXPECT_TRUE(create.all<CreateService>().empty());
  EXPECT_TRUE(create.all<CreateSecret>().empty());
  EXPECT_EQ(eventReasons(create), std::vector<std::string>{reasons::kCreatedWorkers});
  expectIdempotent(world, create, now);
  apply(world, create, now);

  // Running again: the Restarting condition goes False.
  setAllPhases(world, PodPhase::kRunning);
  now += seconds(30);
  const Plan running = step(world, now);
  EXPECT_EQ(world.job.status.phase, JobPhase::kRunning);
  EXPECT_FALSE(world.job.status.hasTrueCondition(ConditionType::kRestarting));
  EXPECT_EQ(world.job.status.condition(ConditionType::kRestarting)->lastTransitionTime, now);
  EXPECT_EQ(world.job.status.condition(ConditionType::kRunning)->lastTransitionTime, now);
  EXPECT_EQ(eventReasons(running), std::vector<std::string>{reasons::kAllWorkersRunning});
  EXPECT_EQ(restart.all<DeleteGeneration>().size(), 1u);
}

// ---------------------------------------------------------------------------------------------------------
// Never duplicate, never leak

TEST(Reconcile, OperatorRestartedHalfWayCreatesOnlyTheMissingRanks) {
  struct Case {
    const char* name;
    bool statusWritten;  // false: the operator died before its first status update
  };
  for (const Case& testCase : {Case{"status written", true}, Case{"status never written", false}}) {
    SCOPED_TRACE(testCase.name);
    World world = makeWorld();
    Plan first = plan(world, kT0);
    // The executor created the children and ranks 0 and 2, then died.
    std::erase_if(first.actions, [](const Action& action) {
      const auto* pod = std::get_if<CreatePod>(&action);
      return (pod != nullptr && (pod->rank == 1 || pod->rank == 3)) ||
             std::holds_alternative<EmitEvent>(action);
    });
    if (!testCase.statusWritten) std::erase_if(first.actions, [](const Action& action) {
      return std::holds_alternative<UpdateStatus>(action);
    });
    apply(world, first, kT0);
    livePod(world, 0).phase = PodPhase::kRunning;

    const Clock::time_point now = kT0 + seconds(30);
    const Plan result = plan(world, now);
    EXPECT_EQ(createdPodNames(result), (std::vector<std::string>{"fmnist-worker-1", "fmnist-worker-3"})) << describe(result);
    EXPECT_TRUE(deletedPodNames(result).empty());
    EXPECT_TRUE(result.all<CreateService>().empty());
    EXPECT_TRUE(result.all<CreateSecret>().empty());
    EXPECT_TRUE(result.all<CreateConfigMap>().empty());
    EXPECT_EQ(result.status.phase, JobPhase::kCreated);
    EXPECT_EQ(result.status.generation, 0);
    EXPECT_EQ(result.status.workers, (WorkerCounts{3, 1, 0, 0}));
    EXPECT_EQ(result.status.startTime, testCase.statusWritten ? kT0 : now);
    expectIdempotent(world, result, now);
  }
}

TEST(Reconcile, StalePodsAreDeletedBeforeTheGangIsCreated) {
  World world = makeWorld();
  world.job.status.phase = JobPhase::kRestarting;
  world.job.status.generation = 2;
  world.job.status.restarts = 2;
  world.job.status.startTime = kT0;
  world.job.status.observedGeneration = 1;
  world.observed.services.push_back({{"fmnist", kUid, std::nullopt, "uid-of-service-fmnist"}});
  world.observed.configMaps.push_back({{"fmnist-config", kUid, std::nullopt, "uid-of-configmap-fmnist-config"}, std::string("fmnist-rendezvous-") + kUid});
  auto pod = [](std::string name, std::string rank, std::string generation, std::string uid,
                std::string kind = kJobKind) {
    ObservedPod observed;
    observed.name = std::move(name);
    observed.labels = {{"tandem.dev/job", "fmnist"}, {"tandem.dev/rank", rank}, {"tandem.dev/generation", generation}};
    observed.controllerUid = std::move(uid);
    observed.controllerKind = std::move(kind);
    observed.phase = PodPhase::kRunning;
    return observed;
  };
  world.observed.pods = {
      pod("fmnist-worker-0", "0", "1", kUid),              // older generation
      pod("fmnist-worker-3", "3", "0", kUid),              // much older generation
      pod("fmnist-worker-7", "7", "2", kUid),              // rank >= workers
      pod("fmnist-worker-2", "2", "2", "uid-of-old-job"),  // a deleted job of the same name
      pod("fmnist-worker-x", "x", "2", kUid),              // unreadable rank
      pod("fmnist-debug", "0", "2", "uid-of-a-replicaset", "ReplicaSet"),  // another controller's: left alone
  };
  const Clock::time_point now = kT0 + seconds(40);
  const Plan result = plan(world, now);
  EXPECT_EQ(deletedPodNames(result), (std::set<std::string>{"fmnist-worker-0", "fmnist-worker-3", "fmnist-worker-7",
                                                            "fmnist-worker-2", "fmnist-worker-x"}))
      << describe(result);
  for (const DeletePod* remove : result.all<DeletePod>()) {
    EXPECT_FALSE(remove->force);
    EXPECT_FALSE(remove->gracePeriodSeconds);  // their own grace period: they may be checkpointing
  }
  EXPECT_TRUE(result.all<CreatePod>().empty()) << "names are reused: wait until the stale pods are gone";
  EXPECT_EQ(eventReasons(result), std::vector<std::string>{reasons::kDeletedStalePods});
  EXPECT_EQ(result.status.workers, (WorkerCounts{}));
  expectIdempotent(world, result, now);

  apply(world, result, now);
  finishTerminations(world);
  const Plan create = plan(world, now + seconds(10));
  EXPECT_EQ(createdPodNames(create).size(), 4u) << describe(create);
  for (const CreatePod* created : create.all<CreatePod>()) EXPECT_EQ(created->generation, 2);
  EXPECT_TRUE(deletedPodNames(create).empty());
}

// ---------------------------------------------------------------------------------------------------------
// Pods stuck terminating on an unreachable node

TEST(Reconcile, PodStuckTerminatingOnUnreachableNodeIsForceDeletedAfterTheBound) {
  struct Case {
    const char* name;
    int secondsAfterDeletion;
    bool unreachable;
    bool forced;
    std::optional<Clock::duration> requeue;
    std::string disruptionReason = "";
  };
  const std::vector<Case> cases{
      {"before the bound", 30, true, false, seconds(30)},
      {"just before the bound", 59, true, false, seconds(1)},
      {"at the bound", 60, true, true, std::nullopt},
      {"long after the bound", 600, true, true, std::nullopt},
      {"grace period not over yet", -20, true, false, seconds(80)},
      {"reachable node: the kubelet will finish", 600, false, false, std::nullopt},
      // A namespaced install reads no Nodes; the taint manager's eviction tells it the node is gone.
      // (a weaker hint: a maintenance taint evicts too, from a live kubelet), so five times the bound.
      {"evicted by the taint manager, node unknown: past the bound", 60, false, false, seconds(240),
       "DeletionByTaintManager"},
      {"evicted by the taint manager, node unknown: at five times the bound", 300, false, true, std::nullopt,
       "DeletionByTaintManager"},
  };
  for (const Case& testCase : cases) {
    SCOPED_TRACE(testCase.name);
    World world = runningWorld();
    exitWith(livePod(world, 0), 137);
    const Clock::time_point failedAt = kT0 + seconds(100);
    step(world, failedAt);  // generation 0 deleted: every pod terminating since failedAt
    finishTerminations(world);
    // Except rank 2, whose node went away.
    world.observed.pods.clear();
    ObservedPod stuck;
    stuck.name = "fmnist-worker-2";
    stuck.labels = {{"tandem.dev/job", "fmnist"}, {"tandem.dev/rank", "2"}, {"tandem.dev/generation", "0"}};
    stuck.controllerUid = kUid;
    stuck.phase = PodPhase::kRunning;
    stuck.nodeName = "node-b";
    stuck.nodeUnreachable = testCase.unreachable;
    stuck.disruptionReason = testCase.disruptionReason;
    stuck.deletionTimestamp = failedAt;
    world.observed.pods.push_back(stuck);

    const Clock::time_point now = failedAt + seconds(testCase.secondsAfterDeletion);
    const Plan result = plan(world, now);
    const auto deletes = result.all<DeletePod>();
    if (testCase.forced) {
      ASSERT_EQ(deletes.size(), 1u) << describe(result);
      EXPECT_EQ(deletes[0]->name, "fmnist-worker-2");
      EXPECT_TRUE(deletes[0]->force);
      EXPECT_EQ(deletes[0]->gracePeriodSeconds, 0);
      EXPECT_EQ(eventReasons(result), (std::vector<std::string>{reasons::kForceDeleted, reasons::kCreatedWorkers}));
      EXPECT_EQ(result.all<EmitEvent>()[0]->type, EventType::kWarning);
      EXPECT_NE(result.all<EmitEvent>()[0]->message.find("node-b"), std::string::npos);
    } else {
      EXPECT_TRUE(deletes.empty()) << describe(result);
      EXPECT_TRUE(result.all<EmitEvent>().empty());
    }
    if (testCase.forced) {
      // Gone as soon as the force deletion returns: generation 1 is created right after it, in this plan.
      EXPECT_EQ(createdPodNames(result).size(), 4u) << describe(result);
      for (const CreatePod* pod : result.all<CreatePod>()) EXPECT_EQ(pod->generation, 1);
    } else {
      EXPECT_TRUE(result.all<CreatePod>().empty()) << "the stuck pod still holds its name";
    }
    EXPECT_EQ(result.requeueAfter, testCase.requeue);
    expectIdempotent(world, result, now);
  }
}

TEST(Reconcile, AWorkerOnANodeThatStoppedReportingIsGivenTimeWhileItsPeersTrainOn) {
  // Node node-c's Ready condition went Unknown at kT0 + 100 s; worker 3 runs there, the others train on.
  auto world = [] {
    World world = runningWorld(JobOptions{});
    livePod(world, 3).nodeName = "node-c";
    livePod(world, 3).nodeUnreachable = true;
    livePod(world, 3).nodeUnreachableSince = kT0 + seconds(100);
    return world;
  };
  {  // Within the wait: no restart, and a reconcile comes back when it ends.
    World waiting = world();
    const Plan result = plan(waiting, kT0 + seconds(130));
    EXPECT_EQ(result.status.phase, JobPhase::kRunning) << describe(result);
    EXPECT_TRUE(result.all<DeleteGeneration>().empty()) << describe(result);
    ASSERT_TRUE(result.requeueAfter.has_value());
    EXPECT_EQ(*result.requeueAfter, seconds(30));  // 100 s + 60 s - 130 s
  }
  {  // The node reports again (Ready True): nothing happened.
    World back = world();
    livePod(back, 3).nodeUnreachable = false;
    livePod(back, 3).nodeUnreachableSince.reset();
    const Plan result = plan(back, kT0 + seconds(150));
    EXPECT_EQ(result.status.phase, JobPhase::kRunning) << describe(result);
    EXPECT_FALSE(result.requeueAfter.has_value()) << describe(result);
  }
  {  // A peer loses it meanwhile (exit 129): the lost node explains it, and the gang restarts at once.
    World peerFailed = world();
    exitWith(livePod(peerFailed, 0), 129);
    livePod(peerFailed, 0).finishedAt = kT0 + seconds(125);
    const Plan result = plan(peerFailed, kT0 + seconds(126));
    EXPECT_EQ(result.status.phase, JobPhase::kRestarting) << describe(result);
    EXPECT_EQ(result.status.condition(ConditionType::kRestarting)->reason, reasons::kNodeLost);
    EXPECT_EQ(result.status.restarts, 0);
  }
  {  // Silent for the whole wait: the gang restarts, not counted against backoffLimit, saying for how long.
    World silent = world();
    const Plan result = plan(silent, kT0 + seconds(160));
    EXPECT_EQ(result.status.phase, JobPhase::kRestarting) << describe(result);
    EXPECT_EQ(result.status.restarts, 0);
    EXPECT_EQ(result.status.preemptions, 1);
    const std::string& message = result.status.condition(ConditionType::kRestarting)->message;
    EXPECT_NE(message.find("node node-c stopped reporting 60s ago"), std::string::npos) << message;
  }
  {  // Pending there (never started): waited for alike.
    World pending = world();
    livePod(pending, 3).phase = PodPhase::kPending;
    EXPECT_EQ(plan(pending, kT0 + seconds(130)).status.phase, JobPhase::kRunning);
  }
  {  // Two silent nodes: the wait runs from the first, and the message names both.
    World two = world();
    livePod(two, 2).nodeName = "node-b";
    livePod(two, 2).nodeUnreachable = true;
    livePod(two, 2).nodeUnreachableSince = kT0 + seconds(110);
    EXPECT_EQ(*plan(two, kT0 + seconds(130)).requeueAfter, seconds(30));
    const Plan result = plan(two, kT0 + seconds(160));
    const std::string& message = result.status.condition(ConditionType::kRestarting)->message;
    EXPECT_NE(message.find("node node-b, node-c stopped reporting 60s ago"), std::string::npos) << message;
  }
  {  // A transition time far ahead of the operator's clock says nothing: no wait.
    World skewed = world();
    livePod(skewed, 3).nodeUnreachableSince = kT0 + seconds(1000);
    EXPECT_EQ(plan(skewed, kT0 + seconds(130)).status.phase, JobPhase::kRestarting);
  }
  {  // Evicted by the taint manager: no more waiting.
    World evicted = world();
    livePod(evicted, 3).disruptionReason = "DeletionByTaintManager";
    livePod(evicted, 3).deletionTimestamp = kT0 + seconds(120);
    EXPECT_EQ(plan(evicted, kT0 + seconds(121)).status.phase, JobPhase::kRestarting);
  }
}

TEST(Reconcile, NodeLossRestartsThenForceDeletesThenRecreates) {
  World world = runningWorld();
  livePod(world, 3).nodeUnreachable = true;
  livePod(world, 3).nodeName = "node-c";
  Clock::time_point now = kT0 + seconds(200);
  const Plan lost = step(world, now);
  EXPECT_EQ(world.job.status.phase, JobPhase::kRestarting);
  EXPECT_EQ(world.job.status.condition(ConditionType::kRestarting)->reason, reasons::kNodeLost);
  EXPECT_EQ(world.job.status.preemptions, 1);
  EXPECT_EQ(world.job.status.restarts, 0);
  ASSERT_EQ(lost.all<DeleteGeneration>().size(), 1u);
  // Deleting it started the force-delete timer of the pod on node-c.
  EXPECT_EQ(plan(world, now).requeueAfter, seconds(60));
  finishTerminations(world);  // ranks 0-2 are gone, rank 3 is stuck
  ASSERT_EQ(world.observed.pods.size(), 1u);

  const Plan early = plan(world, now + seconds(59));
  EXPECT_TRUE(early.empty()) << describe(early);
  EXPECT_EQ(early.requeueAfter, seconds(1));

  now += seconds(60);
  const Plan forced = plan(world, now);
  ASSERT_EQ(forced.all<DeletePod>().size(), 1u);
  EXPECT_TRUE(forced.all<DeletePod>()[0]->force);
  // Deletions come before creations in a plan, so generation 1 follows in the same plan.
  const auto deleteAt = std::find_if(forced.actions.begin(), forced.actions.end(),
                                     [](const Action& action) { return std::holds_alternative<DeletePod>(action); });
  const auto createAt = std::find_if(forced.actions.begin(), forced.actions.end(),
                                     [](const Action& action) { return std::holds_alternative<CreatePod>(action); });
  EXPECT_LT(deleteAt, createAt);
  EXPECT_EQ(createdPodNames(forced).size(), 4u) << describe(forced);
  EXPECT_EQ(forced.all<CreatePod>()[3]->generation, 1);
  expectIdempotent(world, forced, now);
}

// ---------------------------------------------------------------------------------------------------------
// activeDeadlineSeconds

TEST(Reconcile, DeadlineNotYetPassedRequeuesForTheRemainingTime) {
  JobOptions options;
  options.activeDeadlineSeconds = 3600;
  World world = makeWorld(options);
  const Plan fresh = plan(world, kT0);
  EXPECT_EQ(fresh.requeueAfter, seconds(3600));
  apply(world, fresh, kT0);
  setAllPhases(world, PodPhase::kRunning);
  const Plan running = plan(world, kT0 + seconds(1000));
  EXPECT_EQ(running.status.phase, JobPhase::kRunning);
  EXPECT_EQ(running.requeueAfter, seconds(2600));
  EXPECT_TRUE(running.all<DeletePod>().empty());
}

TEST(Reconcile, DeadlinePassedStopsEveryWorkerAndFailsTheJob) {
  for (const std::string cleanPodPolicy : {"Running", "None", "All"}) {
    SCOPED_TRACE("cleanPodPolicy " + cleanPodPolicy);
    JobOptions options;
    options.activeDeadlineSeconds = 3600;
    options.cleanPodPolicy = cleanPodPolicy;
    World world = runningWorld(options);
    livePod(world, 3).phase = PodPhase::kSucceeded;  // finished early
    const Clock::time_point now = kT0 + seconds(3600);
    const Plan result = plan(world, now);
    EXPECT_EQ(result.status.phase, JobPhase::kFailed) << describe(result);
    EXPECT_EQ(result.status.condition(ConditionType::kFailed)->reason, reasons::kDeadlineExceeded);
    EXPECT_EQ(result.status.completionTime, now);
    // Running workers are stopped whatever cleanPodPolicy says; the finished one follows the policy.
    std::set<std::string> expected{"fmnist-worker-0", "fmnist-worker-1", "fmnist-worker-2"};
    if (cleanPodPolicy == "All") expected.insert("fmnist-worker-3");
    EXPECT_EQ(deletedPodNames(result), expected);
    EXPECT_EQ(eventReasons(result), std::vector<std::string>{reasons::kDeadlineExceeded});
    EXPECT_FALSE(result.requeueAfter);
    expectIdempotent(world, result, now);
  }
}

// ---------------------------------------------------------------------------------------------------------
// suspend / resume

TEST(Reconcile, SuspendDeletesTheGangAndResumeRecreatesIt) {
  JobOptions options;
  options.activeDeadlineSeconds = 3600;
  World world = runningWorld(options);
  world.job.spec.runPolicy.suspend = true;
  Clock::time_point now = kT0 + seconds(500);
  const Plan suspend = plan(world, now);
  EXPECT_EQ(suspend.status.phase, JobPhase::kSuspended) << describe(suspend);
  EXPECT_TRUE(suspend.status.hasTrueCondition(ConditionType::kSuspended));
  EXPECT_EQ(suspend.status.condition(ConditionType::kSuspended)->reason, reasons::kJobSuspended);
  EXPECT_FALSE(suspend.status.hasTrueCondition(ConditionType::kRunning));
  EXPECT_EQ(suspend.status.restarts, 0);
  EXPECT_EQ(suspend.status.preemptions, 0);
  EXPECT_EQ(suspend.status.generation, 1);
  ASSERT_EQ(suspend.all<DeleteGeneration>().size(), 1u);
  EXPECT_EQ(suspend.all<DeleteGeneration>()[0]->pods.size(), 4u);
  EXPECT_TRUE(suspend.all<DeleteChild>().empty()) << "Service, Secret and ConfigMap are kept";
  EXPECT_TRUE(suspend.all<CreatePod>().empty());
  EXPECT_EQ(eventReasons(suspend), std::vector<std::string>{reasons::kJobSuspended});
  EXPECT_FALSE(suspend.requeueAfter) << "no deadline while suspended";
  expectIdempotent(world, suspend, now);
  apply(world, suspend, now);

  // Suspended for an hour: still nothing to do, and the deadline does not fire.
  finishTerminations(world);
  now += seconds(4000);
  const Plan idle = plan(world, now);
  EXPECT_TRUE(idle.empty()) << describe(idle);

  // Resume: the gang comes back as generation 1; the deadline counts from the resume.
  world.job.spec.runPolicy.suspend = false;
  const Plan resume = plan(world, now);
  EXPECT_EQ(resume.status.phase, JobPhase::kCreated);
  EXPECT_FALSE(resume.status.hasTrueCondition(ConditionType::kSuspended));
  EXPECT_EQ(resume.status.condition(ConditionType::kSuspended)->reason, reasons::kJobResumed);
  EXPECT_EQ(resume.status.startTime, now);
  EXPECT_EQ(resume.requeueAfter, seconds(3600));
  EXPECT_EQ(createdPodNames(resume).size(), 4u) << describe(resume);
  for (const CreatePod* pod : resume.all<CreatePod>()) EXPECT_EQ(envValue(pod->object, "TANDEM_GENERATION"), "1");
  EXPECT_EQ(eventReasons(resume), (std::vector<std::string>{reasons::kJobResumed, reasons::kCreatedWorkers}));
  expectIdempotent(world, resume, now);
}

TEST(Reconcile, JobCreatedSuspendedGetsItsChildrenButNoPods) {
  JobOptions options;
  options.suspend = true;
  World world = makeWorld(options);
  const Plan result = plan(world, kT0);
  EXPECT_EQ(result.status.phase, JobPhase::kSuspended);
  EXPECT_EQ(result.status.generation, 0);
  EXPECT_EQ(result.all<CreateService>().size(), 1u);
  // Not the ConfigMap: it fixes the spec the job trains by, and edits made while it waits still apply.
  // Nor the Secret, which comes just before the ConfigMap that names it.
  EXPECT_TRUE(result.all<CreateConfigMap>().empty());
  EXPECT_TRUE(result.all<CreateSecret>().empty());
  EXPECT_TRUE(result.all<CreatePod>().empty());
  EXPECT_FALSE(result.status.startTime);
  expectIdempotent(world, result, kT0);
}

TEST(Reconcile, AWorkerNameHeldByAnotherControllersPodIsWaitedForNotDeleted) {
  World world = makeWorld();
  ObservedPod squatter;
  squatter.name = "fmnist-worker-1";
  squatter.labels = {{"tandem.dev/job", "fmnist"}};
  squatter.controllerUid = "uid-of-a-statefulset";
  squatter.controllerKind = "StatefulSet";
  squatter.phase = PodPhase::kRunning;
  world.observed.pods.push_back(squatter);
  const Plan waiting = plan(world, kT0);
  EXPECT_TRUE(waiting.all<DeletePod>().empty()) << describe(waiting);
  EXPECT_TRUE(waiting.all<CreatePod>().empty()) << "a gang is created whole" << describe(waiting);
  bool said = false;
  for (const EmitEvent* event : waiting.all<EmitEvent>())
    said |= event->type == EventType::kWarning && event->reason == reasons::kWorkerNameTaken &&
            event->message.find("pod fmnist-worker-1 is controlled by a StatefulSet, not by this job") != std::string::npos;
  EXPECT_TRUE(said) << describe(waiting);
  ASSERT_TRUE(waiting.requeueAfter.has_value());
  world.observed.pods.clear();  // its owner removed it
  EXPECT_EQ(plan(world, kT0 + seconds(30)).all<CreatePod>().size(), 4u);
}

TEST(Reconcile, ARecreatedJobWaitsForThePreviousJobsChildrenToGo) {
  // Deleted and re-created under the same name: the old job's ConfigMap and Service are still there, owned
  // by the old uid, and a create of ours would find them "already there". The old Secret cannot be in the
  // way: its name holds the old uid, so ours is created at once.
  World world = makeWorld();
  ObservedChild old;
  old.controllerUid = "uid-of-the-deleted-job";
  old.name = "fmnist-config";
  world.observed.configMaps.push_back(ObservedConfigMap{old, ""});
  old.name = "fmnist";
  world.observed.services.push_back(ObservedService{old});
  const Plan waiting = plan(world, kT0);
  EXPECT_TRUE(waiting.all<CreatePod>().empty()) << describe(waiting);
  const std::vector<std::string> reasons = eventReasons(waiting);
  EXPECT_EQ(std::count(reasons.begin(), reasons.end(), reasons::kWaitingForPreviousJob), 2) << describe(waiting);
  ASSERT_EQ(waiting.all<CreateSecret>().size(), 1u) << describe(waiting);
  EXPECT_EQ(waiting.all<CreateSecret>()[0]->name, std::string("fmnist-rendezvous-") + kUid);
  ASSERT_TRUE(waiting.requeueAfter.has_value());
  EXPECT_LE(*waiting.requeueAfter, seconds(5));
  // Once the garbage collector removed them: ours are created, and the gang with them.
  world.observed.configMaps.clear();
  world.observed.services.clear();
  const Plan created = plan(world, kT0 + seconds(5));
  EXPECT_EQ(created.all<CreateConfigMap>().size(), 1u);
  EXPECT_EQ(created.all<CreatePod>().size(), 4u) << describe(created);
}

// ---------------------------------------------------------------------------------------------------------
// Finished jobs: cleanPodPolicy and ttlSecondsAfterFinished

TEST(Reconcile, CleanPodPolicyDecidesWhichPodsOutliveTheJob) {
  struct Case {
    std::string policy;
    bool succeeded;  // the job succeeds (all pods Succeeded) or fails (rank 0 exit 1 under Never)
    std::set<std::string> deleted;
  };
  const std::vector<Case> cases{
      {"All", false, {"fmnist-worker-0", "fmnist-worker-1", "fmnist-worker-2", "fmnist-worker-3"}},
      {"Running", false, {"fmnist-worker-1", "fmnist-worker-3"}},
      {"None", false, {}},
      {"All", true, {"fmnist-worker-0", "fmnist-worker-1", "fmnist-worker-2", "fmnist-worker-3"}},
      {"Running", true, {}},
      {"None", true, {}},
  };
  for (const Case& testCase : cases) {
    SCOPED_TRACE(testCase.policy + (testCase.succeeded ? " after success" : " after failure"));
    JobOptions options;
    options.cleanPodPolicy = testCase.policy;
    options.restartPolicy = "Never";
    World world = runningWorld(options);
    if (testCase.succeeded) {
      setAllPhases(world, PodPhase::kSucceeded);
    } else {
      exitWith(livePod(world, 0), 1);                  // failed
      livePod(world, 2).phase = PodPhase::kSucceeded;  // finished
      livePod(world, 3).phase = PodPhase::kPending;    // never started
    }
    const Clock::time_point now = kT0 + seconds(900);
    const Plan result = plan(world, now);
    EXPECT_EQ(result.status.phase, testCase.succeeded ? JobPhase::kSucceeded : JobPhase::kFailed) << describe(result);
    EXPECT_EQ(deletedPodNames(result), testCase.deleted);
    for (const DeletePod* remove : result.all<DeletePod>()) EXPECT_FALSE(remove->force);
    EXPECT_TRUE(result.all<DeleteChild>().empty());
    expectIdempotent(world, result, now);
  }
}

TEST(Reconcile, TtlAfterFinishedDeletesTheJobOnceElapsed) {
  JobOptions options;
  options.ttlSecondsAfterFinished = 100;
  options.cleanPodPolicy = "None";
  World world = runningWorld(options);
  setAllPhases(world, PodPhase::kSucceeded);
  const Clock::time_point completed = kT0 + seconds(1000);
  const Plan done = step(world, completed);
  EXPECT_EQ(world.job.status.phase, JobPhase::kSucceeded);
  EXPECT_EQ(done.requeueAfter, seconds(100));

  // Not yet: requeue for the rest, delete nothing.
  const Plan early = plan(world, completed + seconds(40));
  EXPECT_TRUE(early.empty()) << describe(early);
  EXPECT_EQ(early.requeueAfter, seconds(60));

  // Elapsed: pods, Service, ConfigMap and the job itself (its Secret goes with it: the operator may not
  // delete Secrets).
  const Clock::time_point now = completed + seconds(100);
  const Plan expired = plan(world, now);
  EXPECT_EQ(deletedPodNames(expired),
            (std::set<std::string>{"fmnist-worker-0", "fmnist-worker-1", "fmnist-worker-2", "fmnist-worker-3"}));
  // Each delete carries the uid it observed, a precondition: an object made again under the name since
  // (by a user) is not deleted.
  std::set<std::string> children;
  for (const DeleteChild* child : expired.all<DeleteChild>())
    children.insert(std::string(childKindName(child->kind)) + "/" + child->name + "@" + child->uid);
  EXPECT_EQ(children, (std::set<std::string>{"Service/fmnist@uid-of-service-fmnist",
                                             "ConfigMap/fmnist-config@uid-of-configmap-fmnist-config"}));
  EXPECT_EQ(expired.all<DeleteJob>().size(), 1u);
  EXPECT_EQ(eventReasons(expired), std::vector<std::string>{reasons::kTtlExpired});
  EXPECT_FALSE(expired.requeueAfter);
  apply(world, expired, now);

  // The job is being deleted: nothing more to decide.
  const Plan after = plan(world, now + seconds(1));
  EXPECT_TRUE(after.empty()) << describe(after);
}

TEST(Reconcile, TtlZeroAppliesToFailedJobsToo) {
  JobOptions options;
  options.ttlSecondsAfterFinished = 0;
  options.restartPolicy = "Never";
  World world = runningWorld(options);
  exitWith(livePod(world, 1), 2);
  const Plan result = plan(world, kT0 + seconds(70));
  EXPECT_EQ(result.status.phase, JobPhase::kFailed);
  EXPECT_EQ(result.all<DeleteJob>().size(), 1u) << describe(result);
  EXPECT_EQ(deletedPodNames(result).size(), 4u);
}

TEST(Reconcile, TtlDeletesOnlyWhatTheJobControls) {
  // The job ran beside a Service of its name that a user made (no owner: it was used, not created) and a
  // StatefulSet's pod that carries its label. TTL clean-up deletes the job's pods and ConfigMap, not those.
  JobOptions options;
  options.ttlSecondsAfterFinished = 0;
  options.cleanPodPolicy = "None";
  World world = runningWorld(options);
  for (ObservedService& service : world.observed.services) service.controllerUid.clear();
  ObservedPod other;
  other.name = "cache-0";
  other.labels = {{"tandem.dev/job", "fmnist"}};
  other.controllerUid = "uid-of-a-statefulset";
  other.controllerKind = "StatefulSet";
  other.phase = PodPhase::kRunning;
  world.observed.pods.push_back(other);
  setAllPhases(world, PodPhase::kSucceeded);
  world.observed.pods.back().phase = PodPhase::kRunning;
  const Plan expired = plan(world, kT0 + seconds(1000));
  EXPECT_EQ(expired.status.phase, JobPhase::kSucceeded);
  ASSERT_EQ(expired.all<DeleteJob>().size(), 1u) << describe(expired);
  EXPECT_EQ(deletedPodNames(expired),
            (std::set<std::string>{"fmnist-worker-0", "fmnist-worker-1", "fmnist-worker-2", "fmnist-worker-3"}));
  ASSERT_EQ(expired.all<DeleteChild>().size(), 1u) << describe(expired);
  EXPECT_EQ(expired.all<DeleteChild>()[0]->kind, ChildKind::kConfigMap);
}

// ---------------------------------------------------------------------------------------------------------
// Jobs that cannot run, and jobs going away

TEST(Reconcile, InvalidSpecFailsWithTheFieldPath) {
  struct Case {
    const char* name;
    std::function<void(JobObject&)> breakIt;
    std::string messagePart;
  };
  const std::vector<Case> cases{
      {"manifest errors", [](JobObject& job) { job.specErrors.push_back({"spec.workers", "0 is below the minimum 1"}); },
       "spec.workers: 0 is below the minimum 1"},
      {"containers is not a list",
       [](JobObject& job) { job.manifestText += "  template: {spec: {containers: {name: x}}}\n"; },
       "spec.template.spec.containers: expected a list"},
      {"name too long for a hostname",
       [](JobObject& job) { job.name = std::string(60, 'a'); },
       "is too long"},
  };
  for (const Case& testCase : cases) {
    SCOPED_TRACE(testCase.name);
    World world = makeWorld();
    testCase.breakIt(world.job);
    const Plan result = plan(world, kT0);
    EXPECT_EQ(result.status.phase, JobPhase::kFailed) << describe(result);
    const Condition* failed = result.status.condition(ConditionType::kFailed);
    ASSERT_NE(failed, nullptr);
    EXPECT_EQ(failed->reason, reasons::kInvalidSpec);
    EXPECT_NE(failed->message.find(testCase.messagePart), std::string::npos) << failed->message;
    EXPECT_TRUE(result.all<CreatePod>().empty());
    EXPECT_TRUE(result.all<CreateService>().empty());
    EXPECT_EQ(eventReasons(result), std::vector<std::string>{reasons::kInvalidSpec});
    expectIdempotent(world, result, kT0);
  }
}

TEST(Reconcile, MissingTokenStartsNothing) {
  World world = makeWorld();
  const Plan result = reconcile(world.job, world.observed, kT0, ReconcileOptions{});
  EXPECT_TRUE(result.all<CreateSecret>().empty());
  EXPECT_TRUE(result.all<CreatePod>().empty());
  EXPECT_EQ(result.all<CreateService>().size(), 1u);
  ASSERT_NE(findEvent(result, reasons::kMissingRendezvousToken), nullptr);
  EXPECT_EQ(findEvent(result, reasons::kMissingRendezvousToken)->type, EventType::kWarning);
  // Once the ConfigMap (created just after the Secret, and naming it) exists, no token is needed.
  world.observed.configMaps.push_back({{"fmnist-config", kUid, std::nullopt, "uid-of-configmap-fmnist-config"}, std::string("fmnist-rendezvous-") + kUid});
  EXPECT_EQ(reconcile(world.job, world.observed, kT0, ReconcileOptions{}).all<CreatePod>().size(), 4u);
}

std::string tokenSecretOf(const CreatePod& pod) {
  return environmentOf(pod.object).at("TANDEM_RDZV_TOKEN")["valueFrom"]["secretKeyRef"]["name"].get<std::string>();
}

TEST(Reconcile, TheSecretIsCreatedJustBeforeTheConfigMapThatNamesIt) {
  // The operator may create Secrets but not read them. It watches ConfigMaps, and the executor stops at
  // the first failed create: so our ConfigMap existing is what says our Secret does.
  World world = makeWorld();
  const Plan first = step(world, kT0);
  const std::string secret = std::string("fmnist-rendezvous-") + kUid;
  std::vector<std::string> creations;
  for (const Action& action : first.actions) {
    if (const auto* create = std::get_if<CreateSecret>(&action)) creations.push_back("Secret " + create->name);
    if (const auto* create = std::get_if<CreateConfigMap>(&action)) {
      creations.push_back("ConfigMap " + create->name);
      EXPECT_EQ(create->object["metadata"]["annotations"][kRendezvousSecretAnnotation], secret);
    }
    if (const auto* create = std::get_if<CreatePod>(&action)) {
      creations.push_back("Pod");
      EXPECT_EQ(tokenSecretOf(*create), secret);
    }
  }
  ASSERT_GE(creations.size(), 3u) << describe(first);
  EXPECT_EQ(creations[0], "Secret " + secret) << describe(first);
  EXPECT_EQ(creations[1], "ConfigMap fmnist-config") << describe(first);
  // The ConfigMap is there: nothing is created again, whatever became of the Secret (it is not watched).
  world.job.status.phase = JobPhase::kRunning;
  setAllPhases(world, PodPhase::kRunning);
  const Plan later = plan(world, kT0 + seconds(600));
  EXPECT_TRUE(later.all<CreateSecret>().empty()) << describe(later);
  EXPECT_TRUE(later.all<CreateConfigMap>().empty()) << describe(later);
}

TEST(Reconcile, ASecretAlreadyMadeIsNotCreatedAgainWhenOnlyItsConfigMapIsMissing) {
  // The Secret's create succeeded and the ConfigMap's then failed: creating the Secret again could be
  // refused (403) by the quota our own Secret fills, before the API server would say 409.
  World world = makeWorld();
  world.observed.rendezvousSecretCreated = true;
  const Plan result = plan(world, kT0);
  EXPECT_TRUE(result.all<CreateSecret>().empty()) << describe(result);
  ASSERT_EQ(result.all<CreateConfigMap>().size(), 1u) << describe(result);
  ASSERT_EQ(result.all<CreatePod>().size(), 4u) << describe(result);
  EXPECT_EQ(tokenSecretOf(*result.all<CreatePod>()[0]), std::string("fmnist-rendezvous-") + kUid);
}

TEST(Reconcile, AnOwnerlessConfigMapOfTheJobsNameIsWaitedForNotTakenAsOurs) {
  // Made by hand, or orphaned by `kubectl delete --cascade=orphan` of an earlier job: it proves nothing
  // about our Secret and holds someone else's manifest.
  World world = makeWorld();
  world.observed.configMaps.push_back({{"fmnist-config", "", std::nullopt, "uid-of-a-users-configmap"}, ""});
  const Plan waiting = step(world, kT0);
  EXPECT_TRUE(waiting.all<CreatePod>().empty()) << describe(waiting);
  ASSERT_NE(findEvent(waiting, reasons::kConfigMapNameTaken), nullptr) << describe(waiting);
  EXPECT_EQ(findEvent(waiting, reasons::kConfigMapNameTaken)->type, EventType::kWarning);
  ASSERT_TRUE(waiting.requeueAfter.has_value());
  // Deleted: ours is created, with the Secret it names, and the gang reads that Secret.
  std::erase_if(world.observed.configMaps, [](const ObservedConfigMap& configMap) { return configMap.controllerUid.empty(); });
  const Plan created = plan(world, kT0 + seconds(30));
  EXPECT_TRUE(created.all<CreateSecret>().empty()) << "made in the first pass:\n" << describe(created);
  ASSERT_EQ(created.all<CreateConfigMap>().size(), 1u) << describe(created);
  ASSERT_EQ(created.all<CreatePod>().size(), 4u) << describe(created);
  EXPECT_EQ(tokenSecretOf(*created.all<CreatePod>()[0]), std::string("fmnist-rendezvous-") + kUid);
}

TEST(Reconcile, AJobCreatedSuspendedGetsItsSecretWithItsConfigMapWhenLetRun) {
  JobOptions options;
  options.suspend = true;
  World world = makeWorld(options);
  step(world, kT0);  // the Service only (JobCreatedSuspendedGetsItsChildrenButNoPods)
  world.job.spec.runPolicy.suspend = false;
  const Plan resumed = plan(world, kT0 + seconds(60));
  EXPECT_EQ(resumed.all<CreateSecret>().size(), 1u) << describe(resumed);
  EXPECT_EQ(resumed.all<CreateConfigMap>().size(), 1u) << describe(resumed);
  EXPECT_EQ(resumed.all<CreatePod>().size(), 4u) << describe(resumed);
}

TEST(Reconcile, AJobAnEarlierOperatorStartedKeepsReadingItsSecret) {
  // Operators before uid-named Secrets made <job>-rendezvous and a ConfigMap without the annotation. A gang
  // they started, restarted by this one, must read the same token: no new Secret, the old name.
  World world = runningWorld();
  for (ObservedConfigMap& configMap : world.observed.configMaps) configMap.rendezvousSecret.clear();
  livePod(world, 2).phase = PodPhase::kFailed;
  livePod(world, 2).exitCode = 137;
  step(world, kT0 + seconds(20));
  finishTerminations(world);
  const Plan restarted = plan(world, kT0 + seconds(40));
  ASSERT_EQ(restarted.all<CreatePod>().size(), 4u) << describe(restarted);
  for (const CreatePod* pod : restarted.all<CreatePod>()) EXPECT_EQ(tokenSecretOf(*pod), "fmnist-rendezvous");
  EXPECT_TRUE(restarted.all<CreateSecret>().empty()) << describe(restarted);
}

// The kubelet's words for a worker whose token Secret is gone (its watch cache says "secret", a GET
// "secrets").
void waitForSecret(ObservedPod& pod, const std::string& secret, const char* resource = "secret") {
  pod.phase = PodPhase::kPending;
  pod.ready = false;
  pod.waitingReason = "CreateContainerConfigError";
  pod.waitingMessage = std::string(resource) + " \"" + secret + "\" not found";
}

TEST(Reconcile, ASecretDeletedBeforeTheGangStartedIsCreatedAgain) {
  World world = makeWorld();
  step(world, kT0);  // the gang, Pending
  const std::string secret = std::string("fmnist-rendezvous-") + kUid;
  for (int rank : {0, 2}) waitForSecret(livePod(world, rank), secret);
  const int64_t generation = world.job.status.generation;
  const Plan result = plan(world, kT0 + seconds(30));
  ASSERT_EQ(result.all<CreateSecret>().size(), 1u) << describe(result);
  EXPECT_EQ(result.all<CreateSecret>()[0]->name, secret);
  EXPECT_EQ(result.all<CreateSecret>()[0]->object["stringData"]["token"], kToken);
  EXPECT_EQ(result.all<CreateSecret>()[0]->object["metadata"]["ownerReferences"][0]["uid"], kUid);
  EXPECT_TRUE(result.all<DeletePod>().empty() && result.all<DeleteGeneration>().empty()) << describe(result);
  EXPECT_EQ(result.status.generation, generation);
  // The Warning is the executor's, once the Secret was made anew (Controller tests); the plan says why.
  EXPECT_EQ(findEvent(result, reasons::kRendezvousSecretRecreated), nullptr) << describe(result);
  EXPECT_TRUE(result.all<CreateSecret>()[0]->recreation());
  EXPECT_EQ(result.all<CreateSecret>()[0]->recreatedBecause, "worker fmnist-worker-0 cannot start");
  apply(world, result, kT0 + seconds(30));
  // The kubelet starts rank 0 first; rank 2 still shows its earlier wait. Rank 0 read the new token: no
  // restart, and no second Secret, until the kubelet has had time to retry.
  livePod(world, 0).phase = PodPhase::kRunning;
  livePod(world, 0).waitingReason.clear();
  const Plan settling = plan(world, kT0 + seconds(31));
  EXPECT_TRUE(settling.all<CreateSecret>().empty()) << describe(settling);
  EXPECT_TRUE(settling.all<DeleteGeneration>().empty()) << describe(settling);
  EXPECT_EQ(settling.status.generation, generation);
  ASSERT_TRUE(settling.requeueAfter.has_value());
  EXPECT_LE(*settling.requeueAfter, seconds(59));
  // The kubelet started them: nothing more, also once the minute is over.
  setAllPhases(world, PodPhase::kRunning);
  for (ObservedPod& pod : world.observed.pods) pod.waitingReason.clear(), pod.waitingMessage.clear();
  EXPECT_TRUE(step(world, kT0 + seconds(40)).all<CreateSecret>().empty());  // (Running, now)
  world.observed.rendezvousSecretRecreatedAt.reset();  // forgotten after kSecretRecreationSettle
  EXPECT_TRUE(plan(world, kT0 + seconds(100)).empty());
}

TEST(Reconcile, AGangPartlyStartedWithTheOldTokenRestartsWhenItsSecretIsCreatedAgain) {
  // Ranks 0, 1 and 3 started with the old token; rank 2's node was slower, and the Secret was deleted
  // before it started. The new token would split the gang: it restarts, counted nowhere.
  World world = makeWorld();
  step(world, kT0);
  for (int rank : {0, 1, 3}) livePod(world, rank).phase = PodPhase::kRunning;
  const std::string secret = std::string("fmnist-rendezvous-") + kUid;
  waitForSecret(livePod(world, 2), secret, "secrets");
  const JobStatus before = world.job.status;
  const Plan result = step(world, kT0 + seconds(30));
  ASSERT_EQ(result.all<CreateSecret>().size(), 1u) << describe(result);
  EXPECT_EQ(result.all<CreateSecret>()[0]->name, secret);
  ASSERT_EQ(result.all<DeleteGeneration>().size(), 1u) << describe(result);
  EXPECT_EQ(result.all<DeleteGeneration>()[0]->pods.size(), 4u);
  EXPECT_EQ(result.status.phase, JobPhase::kRestarting);
  EXPECT_EQ(result.status.generation, before.generation + 1);
  EXPECT_EQ(result.status.restarts, before.restarts);
  EXPECT_EQ(result.status.preemptions, before.preemptions);
  EXPECT_NE(findEvent(result, reasons::kRendezvousSecretRecreated), nullptr) << describe(result);
  // The old gang gone, the new one is created whole, reading the same Secret name.
  finishTerminations(world);
  const Plan created = plan(world, kT0 + seconds(40));
  ASSERT_EQ(created.all<CreatePod>().size(), 4u) << describe(created);
  for (const CreatePod* pod : created.all<CreatePod>()) EXPECT_EQ(tokenSecretOf(*pod), secret);
  EXPECT_TRUE(created.all<CreateSecret>().empty()) << describe(created);
}

TEST(Reconcile, AWaitPastTheSettleMinuteIsTakenForANewDeletion) {
  // The Secret was made anew at T+10 s; ranks 0, 1 and 3 started on its token, rank 2 was not yet
  // scheduled. Then someone deleted it again, and rank 2 now waits. Within the minute the wait is taken
  // for the kubelet's earlier one; past it, for a new deletion (the operator cannot read Secrets to tell):
  // made anew again, and the gang, whose token is gone, restarts. (Had the kubelet been that slow, the
  // restart was needless, and counted nowhere; a gang split across two tokens would fail the job.)
  World world = makeWorld();
  step(world, kT0);
  const std::string secret = std::string("fmnist-rendezvous-") + kUid;
  world.observed.rendezvousSecretRecreatedAt = kT0 + seconds(10);
  for (int rank : {0, 1, 3}) livePod(world, rank).phase = PodPhase::kRunning;
  waitForSecret(livePod(world, 2), secret);
  const Plan settling = plan(world, kT0 + seconds(40));
  EXPECT_TRUE(settling.all<CreateSecret>().empty()) << describe(settling);
  EXPECT_TRUE(settling.all<DeleteGeneration>().empty()) << describe(settling);
  EXPECT_EQ(settling.requeueAfter, seconds(30));
  const JobStatus before = world.job.status;
  const Plan late = plan(world, kT0 + seconds(75));
  ASSERT_EQ(late.all<CreateSecret>().size(), 1u) << describe(late);
  EXPECT_TRUE(late.all<CreateSecret>()[0]->recreation());
  ASSERT_EQ(late.all<DeleteGeneration>().size(), 1u) << describe(late);
  EXPECT_EQ(late.status.phase, JobPhase::kRestarting);
  EXPECT_EQ(late.status.generation, before.generation + 1);
  EXPECT_EQ(late.status.restarts, before.restarts);
}

TEST(Reconcile, ASecretDeletedWithItsConfigMapIsCreatedAgainAsARecreation) {
  // Both deleted by hand while the gang waited: the Secret ensureChildren creates before the ConfigMap is
  // the re-creation (the executor then remembers it for the settle minute), made once, not twice.
  World world = makeWorld();
  step(world, kT0);
  const std::string secret = std::string("fmnist-rendezvous-") + kUid;
  for (int rank : {0, 2}) waitForSecret(livePod(world, rank), secret);
  world.observed.configMaps.clear();
  world.observed.rendezvousSecretCreated = false;
  const Plan result = plan(world, kT0 + seconds(30));
  ASSERT_EQ(result.all<CreateSecret>().size(), 1u) << describe(result);
  EXPECT_TRUE(result.all<CreateSecret>()[0]->recreation());
  EXPECT_EQ(result.all<CreateSecret>()[0]->recreatedBecause, "worker fmnist-worker-0 cannot start");
  EXPECT_EQ(result.all<CreateConfigMap>().size(), 1u) << describe(result);
  EXPECT_TRUE(result.all<DeleteGeneration>().empty()) << describe(result);
}

TEST(Reconcile, AFailedWorkerBesideOneWaitingForTheSecretRestartsByTheFailureRules) {
  // Rank 1 exited permanently under restartPolicy Never while rank 2 waits for the deleted Secret: the
  // job fails for rank 1's exit, not restarted (uncounted) for the Secret.
  JobOptions options;
  options.restartPolicy = "Never";
  World world = runningWorld(options);
  exitWith(livePod(world, 1), 2);
  waitForSecret(livePod(world, 2), std::string("fmnist-rendezvous-") + kUid);
  const Plan result = plan(world, kT0 + seconds(70));
  EXPECT_EQ(result.status.phase, JobPhase::kFailed) << describe(result);
  EXPECT_TRUE(result.all<DeleteGeneration>().empty()) << describe(result);
  EXPECT_EQ(findEvent(result, reasons::kRendezvousSecretRecreated), nullptr) << describe(result);
}

TEST(Reconcile, OnlyTheJobsOwnMissingSecretIsCreatedAgain) {
  World world = makeWorld();
  step(world, kT0);
  // Another Secret the user's template reads, and an image that cannot be pulled: not ours to create.
  waitForSecret(livePod(world, 0), "registry-credentials");
  livePod(world, 1).waitingReason = "ImagePullBackOff";
  livePod(world, 1).waitingMessage = std::string("secret \"fmnist-rendezvous-") + kUid + "\" not found";
  livePod(world, 2).waitingReason = "CreateContainerConfigError";  // a ConfigMap of the same name
  livePod(world, 2).waitingMessage = std::string("configmap \"fmnist-rendezvous-") + kUid + "\" not found";
  EXPECT_TRUE(plan(world, kT0 + seconds(30)).all<CreateSecret>().empty());
  // A job an earlier operator started reads <job>-rendezvous: that is the one created again.
  World legacy = makeWorld();
  step(legacy, kT0);
  for (ObservedConfigMap& configMap : legacy.observed.configMaps) configMap.rendezvousSecret.clear();
  waitForSecret(livePod(legacy, 3), "fmnist-rendezvous");
  const Plan result = plan(legacy, kT0 + seconds(30));
  ASSERT_EQ(result.all<CreateSecret>().size(), 1u) << describe(result);
  EXPECT_EQ(result.all<CreateSecret>()[0]->name, "fmnist-rendezvous");
  EXPECT_EQ(result.all<CreateSecret>()[0]->object["metadata"]["name"], "fmnist-rendezvous");
}

TEST(Reconcile, JobBeingDeletedOnlyForceDeletesStuckPods) {
  World world = runningWorld();
  world.job.deletionTimestamp = kT0 + seconds(100);
  EXPECT_TRUE(plan(world, kT0 + seconds(101)).empty());
  livePod(world, 1).nodeUnreachable = true;
  livePod(world, 1).deletionTimestamp = kT0 + seconds(100);
  const Plan result = plan(world, kT0 + seconds(200));
  ASSERT_EQ(result.all<DeletePod>().size(), 1u) << describe(result);
  EXPECT_TRUE(result.all<DeletePod>()[0]->force);
  EXPECT_TRUE(result.all<UpdateStatus>().empty());
}

// ---------------------------------------------------------------------------------------------------------
// A whole life, checking that every transition is announced once and only once.

TEST(Reconcile, EveryTransitionEmitsOneEvent) {
  JobOptions options;
  options.ttlSecondsAfterFinished = 60;
  World world = makeWorld(options);
  Clock::time_point now = kT0;
  auto settle = [&]() {  // reconcile until nothing is planned, as the work queue would
    for (int round = 0; round < 5; ++round) {
      const Plan next = step(world, now);
      if (next.empty()) return;
    }
    ADD_FAILURE() << "did not settle";
  };
  settle();
  setAllPhases(world, PodPhase::kRunning);
  now += seconds(10);
  settle();
  exitWith(livePod(world, 2), 134);
  now += seconds(10);
  settle();
  finishTerminations(world);
  now += seconds(10);
  settle();
  setAllPhases(world, PodPhase::kRunning);
  now += seconds(10);
  settle();
  livePod(world, 0).disruptionReason = "PreemptionByScheduler";
  now += seconds(10);
  settle();
  finishTerminations(world);
  now += seconds(10);
  settle();
  setAllPhases(world, PodPhase::kRunning);
  now += seconds(10);
  settle();
  world.job.spec.runPolicy.suspend = true;
  now += seconds(10);
  settle();
  finishTerminations(world);
  world.job.spec.runPolicy.suspend = false;
  now += seconds(10);
  settle();
  setAllPhases(world, PodPhase::kRunning);
  now += seconds(10);
  settle();
  setAllPhases(world, PodPhase::kSucceeded);
  now += seconds(10);
  settle();
  now += seconds(60);
  settle();

  std::vector<std::string> reasonsSeen;
  for (const EmitEvent& event : world.events) reasonsSeen.push_back(event.reason);
  using namespace reasons;
  EXPECT_EQ(reasonsSeen, (std::vector<std::string>{
                             kCreatedWorkers, kJobCreated,  // generation 0
                             kAllWorkersRunning,
                             kWorkerFailed,    // exit 134: restart 1
                             kCreatedWorkers,  // generation 1
                             kAllWorkersRunning,
                             kPreempted,       // not counted
                             kCreatedWorkers,  // generation 2
                             kAllWorkersRunning,
                             kJobSuspended,    // generation 3 is the next
                             kJobResumed, kCreatedWorkers,
                             kAllWorkersRunning,
                             kAllWorkersSucceeded,
                             kTtlExpired,
                         }));
  EXPECT_EQ(world.job.status.generation, 3);
  EXPECT_EQ(world.job.status.restarts, 1);
  EXPECT_EQ(world.job.status.preemptions, 1);
  EXPECT_TRUE(world.job.deletionTimestamp.has_value());
  // Conditions: Created stays True; exactly one of the others is True at the end.
  const JobStatus& status = world.job.status;
  EXPECT_TRUE(status.hasTrueCondition(ConditionType::kCreated));
  EXPECT_TRUE(status.hasTrueCondition(ConditionType::kSucceeded));
  for (ConditionType type : {ConditionType::kRunning, ConditionType::kRestarting, ConditionType::kSuspended}) {
    ASSERT_NE(status.condition(type), nullptr) << conditionTypeName(type);
    EXPECT_FALSE(status.condition(type)->status) << conditionTypeName(type);
  }
}

}  // namespace
}  // namespace tandem::operator_core
