// The Kubernetes objects the operator creates for a job, built as nlohmann::json: the headless Service,
// the rendezvous Secret, the ConfigMap behind TANDEM_CONFIG and the worker pods (the user's
// spec.template merged with the process contract of DESIGN.md §3). Pure functions of their arguments.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "tandem/common/status.h"
#include "tandem/operator/job.h"

namespace tandem::operator_core {

// Reads an object's text: JSON (what the API server sends) or, failing that, YAML (a manifest file).
// YAML scalars are typed as YAML 1.2's core schema does, and quoted scalars stay strings.
StatusOr<nlohmann::json> parseObjectText(const std::string& text);

// The job's spec.template (a PodTemplateSpec; {} when absent) read from job.manifestText, with the shapes
// the pod builder relies on checked: an error names the field (spec.template.spec.containers: ...).
StatusOr<nlohmann::json> readPodTemplate(const JobObject& job);

// {apiVersion, kind, name, uid, controller: true, blockOwnerDeletion: true} pointing at the job.
nlohmann::json ownerReference(const JobObject& job);

// Headless Service <job> selecting tandem.dev/job=<job>, publishing not-ready addresses so that rank 0's
// name resolves while the gang is still starting.
nlohmann::json buildService(const JobObject& job);
// Secret `name` (<job>-rendezvous-<job uid>; an earlier operator's job keeps <job>-rendezvous) with the
// token under key "token".
nlohmann::json buildSecret(const JobObject& job, const std::string& name, const std::string& token);
// ConfigMap <job>-config holding the manifest (apiVersion, kind, metadata name/namespace, spec) as JSON
// text under "job.yaml", which the worker's parseManifest reads from TANDEM_CONFIG, and the Secret's name
// in annotation kRendezvousSecretAnnotation.
StatusOr<nlohmann::json> buildConfigMap(const JobObject& job);

// A job's spec is fixed once its ConfigMap exists (the workers train by it): an edit of the live object
// (`kubectl apply` of a changed file) would otherwise reach only the pods of the next generation, with
// the old manifest and a new template or world size. Only spec.runPolicy (suspend, deadlines, TTL,
// backoffLimit) applies to a job that has started. Given the live job object and its ConfigMap (as the
// cache holds it: data included), puts the running spec, with the live runPolicy, into `jobObject` and
// returns the spec fields whose edits are ignored ("spec.optimizer, spec.workers"); "" when none are,
// or when the ConfigMap cannot be read (then the live spec stands).
std::string keepRunningSpec(nlohmann::json& jobObject, const nlohmann::json& configMap);

// Custom mode (DESIGN.md §2): no spec.model and the template's first container has a command.
bool isCustomMode(const JobObject& job, const nlohmann::json& podTemplate);

// Worker pod <job>-worker-<rank> of `generation`: the template's metadata and spec, with
//  - labels tandem.dev/job, /rank, /generation (ours win) and prometheus.io annotations (the template's win),
//  - a controller owner reference to the job, restartPolicy Never, hostname <job>-worker-<rank>, subdomain <job>,
//  - the first container as the worker: image from the template (else defaultImage), command unchanged in
//    custom mode (else tandem-worker), the §3 environment followed by the template's env, the config
//    volume at /etc/tandem and the checkpoint claim at spec.checkpoint.dir (when claimName is set),
//  - TANDEM_RDZV_TOKEN from Secret `rendezvousSecret`.
// Precondition: podTemplate came from readPodTemplate.
nlohmann::json buildWorkerPod(const JobObject& job, const nlohmann::json& podTemplate, int64_t rank,
                              int64_t generation, const std::string& defaultImage, const std::string& rendezvousSecret);

}  // namespace tandem::operator_core
