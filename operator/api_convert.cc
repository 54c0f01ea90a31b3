#include "tandem/operator/api_convert.h"

#include <cstdio>
#include <cstdlib>
#include <ctime>

#include "tandem/manifest/job_spec.h"

namespace tandem::operator_core {
namespace {

using json = nlohmann::json;

std::string stringAt(const json& object, const char* pointer) {
  const json::json_pointer path(pointer);
  if (!object.contains(path) || !object.at(path).is_string()) return "";
  return object.at(path).get<std::string>();
}

int64_t integerAt(const json& object, const char* key) {
  auto it = object.find(key);
  return it != object.end() && it->is_number_integer() ? it->get<int64_t>() : 0;
}

std::optional<Clock::time_point> timeAt(const json& object, const char* pointer) {
  const std::string text = stringAt(object, pointer);
  if (text.empty()) return std::nullopt;
  return parseTime(text);
}

std::optional<JobPhase> phaseFromName(const std::string& name) {
  for (JobPhase phase : {JobPhase::kCreated, JobPhase::kRunning, JobPhase::kRestarting, JobPhase::kSucceeded,
                         JobPhase::kFailed, JobPhase::kSuspended})
    if (name == jobPhaseName(phase)) return phase;
  return std::nullopt;
}

std::optional<ConditionType> conditionFromName(const std::string& name) {
  for (ConditionType type : {ConditionType::kCreated, ConditionType::kRunning, ConditionType::kRestarting,
                             ConditionType::kSucceeded, ConditionType::kFailed, ConditionType::kSuspended})
    if (name == conditionTypeName(type)) return type;
  return std::nullopt;
}

// The ownerReference with controller=true, or null.
const json* controllerOf(const json& object) {
  const json::json_pointer path("/metadata/ownerReferences");
  if (!object.contains(path) || !object.at(path).is_array()) return nullptr;
  for (const json& owner : object.at(path))
    if (owner.is_object() && owner.value("controller", false)) return &owner;
  return nullptr;
}

std::string controllerUidOf(const json& object) {
  const json* owner = controllerOf(object);
  return owner != nullptr ? owner->value("uid", "") : "";
}

}  // namespace

std::string formatTime(Clock::time_point time) {
  const std::time_t seconds = Clock::to_time_t(time);
  std::tm utc{};
  gmtime_r(&seconds, &utc);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

std::optional<Clock::time_point> parseTime(const std::string& text) {
  std::tm utc{};
  const char* rest = strptime(text.c_str(), "%Y-%m-%dT%H:%M:%S", &utc);
  if (rest == nullptr) return std::nullopt;
  double fraction = 0;
  if (*rest == '.') {
    char* end = nullptr;
    fraction = std::strtod(rest, &end);
    rest = end;
  }
  long offset = 0;  // seconds east of UTC
  if (*rest == '+' || *rest == '-') {
    int hours = 0, minutes = 0;
    if (std::sscanf(rest + 1, "%d:%d", &hours, &minutes) != 2) return std::nullopt;
    offset = (hours * 3600L + minutes * 60L) * (*rest == '-' ? -1 : 1);
  } else if (*rest != 'Z') {
    return std::nullopt;
  }
  const std::time_t seconds = timegm(&utc) - offset;
  return Clock::from_time_t(seconds) +
         std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(fraction));
}

JobStatus statusFromJson(const json& status) {
  JobStatus out;
  if (!status.is_object()) return out;
  if (auto phase = phaseFromName(status.value("phase", ""))) out.phase = *phase;
  if (status.contains("conditions") && status["conditions"].is_array()) {
    for (const json& entry : status["conditions"]) {
      if (!entry.is_object()) continue;
      auto type = conditionFromName(entry.value("type", ""));
      if (!type) continue;
      Condition condition;
      condition.type = *type;
      condition.status = entry.value("status", "") == "True";
      condition.reason = entry.value("reason", "");
      condition.message = entry.value("message", "");
      condition.lastTransitionTime = timeAt(entry, "/lastTransitionTime").value_or(Clock::time_point{});
      out.conditions.push_back(std::move(condition));
    }
  }
  out.restarts = integerAt(status, "restarts");
  out.preemptions = integerAt(status, "preemptions");
  out.generation = integerAt(status, "generation");
  out.observedGeneration = integerAt(status, "observedGeneration");
  out.startTime = timeAt(status, "/startTime");
  out.completionTime = timeAt(status, "/completionTime");
  if (status.contains("workers") && status["workers"].is_object()) {
    const json& workers = status["workers"];
    out.workers = {integerAt(workers, "pending"), integerAt(workers, "running"), integerAt(workers, "succeeded"),
                   integerAt(workers, "failed")};
  }
  out.readyWorkers = integerAt(status, "readyWorkers");
  return out;
}

json statusToJson(const JobStatus& status) {
  json out = json::object();
  if (status.phase != JobPhase::kNone) out["phase"] = jobPhaseName(status.phase);
  json conditions = json::array();
  for (const Condition& condition : status.conditions) {
    json entry = {{"type", conditionTypeName(condition.type)}, {"status", condition.status ? "True" : "False"}};
    if (!condition.reason.empty()) entry["reason"] = condition.reason;
    if (!condition.message.empty()) entry["message"] = condition.message;
    if (condition.lastTransitionTime != Clock::time_point{})
      entry["lastTransitionTime"] = formatTime(condition.lastTransitionTime);
    conditions.push_back(std::move(entry));
  }
  out["conditions"] = std::move(conditions);
  out["restarts"] = status.restarts;
  out["preemptions"] = status.preemptions;
  out["generation"] = status.generation;
  out["observedGeneration"] = status.observedGeneration;
  if (status.startTime) out["startTime"] = formatTime(*status.startTime);
  if (status.completionTime) out["completionTime"] = formatTime(*status.completionTime);
  out["workers"] = {{"pending", status.workers.pending},
                    {"running", status.workers.running},
                    {"succeeded", status.workers.succeeded},
                    {"failed", status.workers.failed}};
  out["readyWorkers"] = status.readyWorkers;
  return out;
}

json mergeStatus(const json& existing, const JobStatus& status) {
  json merged = existing.is_object() ? existing : json::object();
  for (const char* owned : {"phase", "startTime", "completionTime"}) merged.erase(owned);
  const json owned = statusToJson(status);  // named: items() of a temporary would dangle
  for (const auto& [key, value] : owned.items()) merged[key] = value;
  return merged;
}

JobObject jobFromJson(const json& object) {
  JobObject job;
  job.nameSpace = stringAt(object, "/metadata/namespace");
  job.name = stringAt(object, "/metadata/name");
  job.uid = stringAt(object, "/metadata/uid");
  if (object.contains("metadata")) job.generation = integerAt(object["metadata"], "generation");
  job.resourceVersion = stringAt(object, "/metadata/resourceVersion");
  job.creationTimestamp = timeAt(object, "/metadata/creationTimestamp").value_or(Clock::time_point{});
  job.deletionTimestamp = timeAt(object, "/metadata/deletionTimestamp");
  job.manifestText = object.dump();
  manifest::ParseResult parsed = manifest::parseManifest(job.manifestText, job.nameSpace + "/" + job.name);
  job.spec = std::move(parsed.spec);
  job.specErrors = std::move(parsed.errors);
  job.status = statusFromJson(object.value("status", json::object()));
  return job;
}

ObservedPod podFromJson(const json& pod) {
  ObservedPod out;
  out.name = stringAt(pod, "/metadata/name");
  out.uid = stringAt(pod, "/metadata/uid");
  if (pod.contains("/metadata/labels"_json_pointer) && pod["metadata"]["labels"].is_object())
    for (const auto& [key, value] : pod["metadata"]["labels"].items())
      if (value.is_string()) out.labels[key] = value.get<std::string>();
  out.controllerUid = controllerUidOf(pod);
  if (const json* owner = controllerOf(pod)) out.controllerKind = owner->value("kind", "");
  const std::string phase = stringAt(pod, "/status/phase");
  if (phase == "Running") out.phase = PodPhase::kRunning;
  else if (phase == "Succeeded") out.phase = PodPhase::kSucceeded;
  else if (phase == "Failed") out.phase = PodPhase::kFailed;
  else if (phase == "Unknown") out.phase = PodPhase::kUnknown;
  else out.phase = PodPhase::kPending;
  const json status = pod.value("status", json::object());
  if (status.contains("conditions") && status["conditions"].is_array()) {
    for (const json& condition : status["conditions"]) {
      const std::string type = condition.value("type", "");
      const bool isTrue = condition.value("status", "") == "True";
      if (type == "Ready") out.ready = isTrue;
      if (type == "DisruptionTarget" && isTrue) out.disruptionReason = condition.value("reason", "");
    }
  }
  const std::string worker = stringAt(pod, "/spec/containers/0/name");
  if (status.contains("containerStatuses") && status["containerStatuses"].is_array()) {
    for (const json& container : status["containerStatuses"]) {
      if (!worker.empty() && container.value("name", "") != worker) continue;
      out.waitingReason = stringAt(container, "/state/waiting/reason");
      out.waitingMessage = stringAt(container, "/state/waiting/message");
      const json::json_pointer terminated("/state/terminated");
      if (container.contains(terminated)) {
        const json& state = container.at(terminated);
        if (state.contains("exitCode") && state["exitCode"].is_number_integer()) out.exitCode = state["exitCode"].get<int>();
        if (state.contains("signal") && state["signal"].is_number_integer() && state["signal"].get<int>() != 0)
          out.signal = state["signal"].get<int>();
        if (state.contains("finishedAt") && state["finishedAt"].is_string())
          out.finishedAt = parseTime(state["finishedAt"].get<std::string>());
      }
      break;
    }
  }
  out.reason = status.value("reason", "");
  out.deletionTimestamp = timeAt(pod, "/metadata/deletionTimestamp");
  out.nodeName = stringAt(pod, "/spec/nodeName");
  out.nodeUnreachable = out.reason == "NodeLost";
  out.creationTimestamp = timeAt(pod, "/metadata/creationTimestamp").value_or(Clock::time_point{});
  return out;
}

std::optional<Clock::time_point> nodeUnreachableSince(const json& node) {
  bool unreachable = false;
  std::optional<Clock::time_point> since;  // the first of the two that says when
  const json::json_pointer conditions("/status/conditions");
  if (node.contains(conditions) && node.at(conditions).is_array())
    for (const json& condition : node.at(conditions))
      if (stringAt(condition, "/type") == "Ready" && stringAt(condition, "/status") == "Unknown") {
        unreachable = true;
        since = timeAt(condition, "/lastTransitionTime");
      }
  const json::json_pointer taints("/spec/taints");
  if (node.contains(taints) && node.at(taints).is_array())
    for (const json& taint : node.at(taints))
      if (stringAt(taint, "/key") == "node.kubernetes.io/unreachable") {
        unreachable = true;
        if (!since) since = timeAt(taint, "/timeAdded");
      }
  if (!unreachable) return std::nullopt;
  return since.value_or(Clock::time_point{});
}

bool nodeUnreachable(const json& node) { return nodeUnreachableSince(node).has_value(); }

// Nodes: their name, Ready condition (its status and when it last changed) and taints: all that
// nodeUnreachableSince reads. Heartbeats, which change every few seconds, are dropped.
void trimNode(json& node) {
  // A field that is absent, null (a zero time) or not a string reads as "" (stringAt): a Node is anyone's
  // to write, and a throw here would end the informer's thread.
  json metadata = {{"name", stringAt(node, "/metadata/name")},
                   {"resourceVersion", stringAt(node, "/metadata/resourceVersion")}};
  json conditions = json::array();
  if (node.contains("/status/conditions"_json_pointer) && node["status"]["conditions"].is_array())
    for (const json& condition : node["status"]["conditions"])
      if (stringAt(condition, "/type") == "Ready")
        conditions.push_back({{"type", "Ready"},
                              {"status", stringAt(condition, "/status")},
                              {"lastTransitionTime", stringAt(condition, "/lastTransitionTime")}});
  json kept = {{"metadata", std::move(metadata)}, {"status", {{"conditions", std::move(conditions)}}}};
  if (node.contains("/spec/taints"_json_pointer)) kept["spec"] = {{"taints", node["spec"]["taints"]}};
  node = std::move(kept);
}

ObservedChild childFromJson(const json& object) {
  ObservedChild out;
  out.name = stringAt(object, "/metadata/name");
  out.uid = stringAt(object, "/metadata/uid");
  out.controllerUid = controllerUidOf(object);
  out.deletionTimestamp = timeAt(object, "/metadata/deletionTimestamp");
  return out;
}

}  // namespace tandem::operator_core
