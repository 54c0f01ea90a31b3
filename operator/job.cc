// Names of the status, pod and action enums, and the one-line descriptions of plans.
#include <sstream>

#include "tandem/operator/job.h"
#include "tandem/operator/observed.h"
#include "tandem/operator/plan.h"

namespace tandem::operator_core {

const char* jobPhaseName(JobPhase phase) {
  switch (phase) {
    case JobPhase::kNone: return "";
    case JobPhase::kCreated: return "Created";
    case JobPhase::kRunning: return "Running";
    case JobPhase::kRestarting: return "Restarting";
    case JobPhase::kSucceeded: return "Succeeded";
    case JobPhase::kFailed: return "Failed";
    case JobPhase::kSuspended: return "Suspended";
  }
  return "";
}

const char* conditionTypeName(ConditionType type) {
  switch (type) {
    case ConditionType::kCreated: return "Created";
    case ConditionType::kRunning: return "Running";
    case ConditionType::kRestarting: return "Restarting";
    case ConditionType::kSucceeded: return "Succeeded";
    case ConditionType::kFailed: return "Failed";
    case ConditionType::kSuspended: return "Suspended";
  }
  return "";
}

const char* podPhaseName(PodPhase phase) {
  switch (phase) {
    case PodPhase::kPending: return "Pending";
    case PodPhase::kRunning: return "Running";
    case PodPhase::kSucceeded: return "Succeeded";
    case PodPhase::kFailed: return "Failed";
    case PodPhase::kUnknown: return "Unknown";
  }
  return "";
}

const char* childKindName(ChildKind kind) {
  switch (kind) {
    case ChildKind::kService: return "Service";
    case ChildKind::kConfigMap: return "ConfigMap";
  }
  return "";
}

const char* eventTypeName(EventType type) { return type == EventType::kWarning ? "Warning" : "Normal"; }

const Condition* JobStatus::condition(ConditionType type) const {
  for (const Condition& entry : conditions)
    if (entry.type == type) return &entry;
  return nullptr;
}

namespace {
struct Describer {
  std::string operator()(const UpdateStatus& action) const {
    const JobStatus& status = action.status;
    std::ostringstream out;
    out << "UpdateStatus phase=" << jobPhaseName(status.phase) << " generation=" << status.generation
        << " restarts=" << status.restarts << " preemptions=" << status.preemptions;
    return out.str();
  }
  std::string operator()(const CreateService& action) const { return "CreateService " + action.name; }
  std::string operator()(const CreateSecret& action) const { return "CreateSecret " + action.name; }
  std::string operator()(const CreateConfigMap& action) const { return "CreateConfigMap " + action.name; }
  std::string operator()(const DeleteChild& action) const {
    return std::string("Delete") + childKindName(action.kind) + " " + action.name;
  }
  std::string operator()(const DeletePod& action) const {
    std::string text = "DeletePod " + action.name;
    if (action.force) text += " (force)";
    if (action.gracePeriodSeconds) text += " grace=" + std::to_string(*action.gracePeriodSeconds) + "s";
    return text + ": " + action.why;
  }
  std::string operator()(const DeleteGeneration& action) const {
    std::string text = "DeleteGeneration " + std::to_string(action.generation) + " [";
    for (size_t i = 0; i < action.pods.size(); ++i) text += (i ? " " : "") + action.pods[i].name;
    return text + "]: " + action.why;
  }
  std::string operator()(const CreatePod& action) const {
    return "CreatePod " + action.name + " rank=" + std::to_string(action.rank) +
           " generation=" + std::to_string(action.generation);
  }
  std::string operator()(const DeleteJob& action) const { return "DeleteJob: " + action.why; }
  std::string operator()(const EmitEvent& action) const {
    return std::string("Event ") + eventTypeName(action.type) + " " + action.reason + ": " + action.message;
  }
};
}  // namespace

std::string describe(const Action& action) { return std::visit(Describer{}, action); }

std::string describe(const Plan& plan) {
  std::string text;
  for (const Action& action : plan.actions) text += describe(action) + "\n";
  if (plan.requeueAfter)
    text += "requeueAfter " +
            std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(*plan.requeueAfter).count()) + " ms\n";
  return text.empty() ? "(empty plan)\n" : text;
}

}  // namespace tandem::operator_core
