// The API server's JSON to the reconciler's plain values and back: DistributedTrainingJob objects and
// their status, pods, and the other children. Pure functions, unit-tested without a server.
#pragma once

#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "tandem/operator/job.h"
#include "tandem/operator/observed.h"

namespace tandem::operator_core {

// RFC 3339 as the API server writes it: seconds, UTC, "Z". parseTime also takes fractions and offsets.
std::string formatTime(Clock::time_point time);
std::optional<Clock::time_point> parseTime(const std::string& text);

// status as the CRD declares it (phase, conditions, restarts, readyWorkers, workers, startTime, ...);
// unknown and malformed fields are ignored: the status is ours, a newer operator may add fields.
JobStatus statusFromJson(const nlohmann::json& status);
// Every field this operator owns; optional times that are unset are absent (see mergeStatus).
nlohmann::json statusToJson(const JobStatus& status);
// `existing` (the object's status) with every field this operator owns replaced, and fields it does not
// own (e.g. a step written by someone else) kept.
nlohmann::json mergeStatus(const nlohmann::json& existing, const JobStatus& status);

// A DistributedTrainingJob object: metadata, the spec parsed by the worker's own manifest parser (errors
// land in specErrors), the status, and the object's JSON text as manifestText.
JobObject jobFromJson(const nlohmann::json& object);

// A pod as reconcile sees it. The worker container is spec.containers[0]; nodeUnreachable is read from
// status.reason NodeLost here (set on pods evicted from a lost node); the controller also sets it from the
// pod's Node (nodeUnreachable below).
ObservedPod podFromJson(const nlohmann::json& pod);
ObservedChild childFromJson(const nlohmann::json& object);

// A Node the node lifecycle controller has given up on: its Ready condition is Unknown, or it carries the
// node.kubernetes.io/unreachable taint. Only then may a pod stuck terminating there be force-deleted.
bool nodeUnreachable(const nlohmann::json& node);
// Since when: the Ready condition's lastTransitionTime when it is Unknown, else the taint's timeAdded;
// the epoch when neither says (long ago: nothing to wait for). nullopt for a node that is not unreachable.
std::optional<Clock::time_point> nodeUnreachableSince(const nlohmann::json& node);
// What the operator's Node informer keeps of a Node (in place): its name, resourceVersion, Ready condition
// (status, lastTransitionTime) and taints. Fields that are absent, null or of another type read as "".
void trimNode(nlohmann::json& node);

}  // namespace tandem::operator_core
