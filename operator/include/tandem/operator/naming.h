// The names the operator gives to everything it creates for a DistributedTrainingJob, and the labels,
// ports and paths of the process contract (DESIGN.md §3). One place, so that the reconciler, the
// executor and the tests agree.
#pragma once

#include <cstdint>
#include <string>

namespace tandem::operator_core {

inline constexpr const char* kJobApiVersion = "tandem.dev/v1alpha1";
inline constexpr const char* kJobKind = "DistributedTrainingJob";

// Labels on every worker pod. The Service selects on kJobLabel only, so all generations resolve.
inline constexpr const char* kJobLabel = "tandem.dev/job";
inline constexpr const char* kRankLabel = "tandem.dev/rank";
inline constexpr const char* kGenerationLabel = "tandem.dev/generation";

inline constexpr int kRendezvousPort = 29400;  // rank 0 serves Rendezvous here (DESIGN.md §4)
inline constexpr int kMasterPort = 29500;      // MASTER_PORT for torchrun-style scripts (custom mode)
inline constexpr int kMetricsPort = 9400;      // worker /metrics (DESIGN.md §8)

inline constexpr const char* kWorkerContainerName = "tandem-worker";  // when the template names none
inline constexpr const char* kWorkerCommand = "tandem-worker";
inline constexpr const char* kConfigVolumeName = "tandem-config";
inline constexpr const char* kConfigMountPath = "/etc/tandem";
inline constexpr const char* kConfigKey = "job.yaml";            // TANDEM_CONFIG = /etc/tandem/job.yaml
inline constexpr const char* kCheckpointVolumeName = "tandem-checkpoints";
inline constexpr const char* kTokenKey = "token";                 // key of the rendezvous Secret

// Headless Service: the job's own name, so pods are <job>-worker-<rank>.<job>.<ns>.svc.
inline std::string serviceName(const std::string& job) { return job; }
// The rendezvous Secret carries the job's uid, so a deleted namesake's Secret that the garbage collector
// has yet to remove is never in its way: the operator may create Secrets but not read them, and could not
// tell whose a 409 found.
inline std::string secretName(const std::string& job, const std::string& uid) { return job + "-rendezvous-" + uid; }
// The name operators before uid-named Secrets gave it; their jobs' pods still read it (see
// kRendezvousSecretAnnotation).
inline std::string legacySecretName(const std::string& job) { return job + "-rendezvous"; }
// On the job's ConfigMap: the name of the Secret its workers read, created just before the ConfigMap. The
// operator cannot read Secrets but watches ConfigMaps, so this is how it knows the Secret exists. A
// ConfigMap without it was made by an earlier operator, whose Secret was legacySecretName.
inline constexpr const char* kRendezvousSecretAnnotation = "tandem.dev/rendezvous-secret";
inline std::string configMapName(const std::string& job) { return job + "-config"; }

// Pod name and hostname are both <job>-worker-<rank>, in every generation: a generation is only created
// once every pod of the previous one is gone (see reconcile.h), so names never clash and the stable
// hostname of §3 is also the pod's name (kubectl logs fmnist-worker-0 always means the live rank 0).
inline std::string workerPodName(const std::string& job, int64_t rank) {
  return job + "-worker-" + std::to_string(rank);
}
inline std::string workerHostname(const std::string& job, int64_t rank) { return workerPodName(job, rank); }

// <job>-worker-0.<job>.<ns>.svc: rank 0's stable DNS name under the headless Service.
inline std::string rankZeroAddress(const std::string& job, const std::string& nameSpace) {
  return workerHostname(job, 0) + "." + serviceName(job) + "." + nameSpace + ".svc";
}
inline std::string rendezvousEndpoint(const std::string& job, const std::string& nameSpace) {
  return rankZeroAddress(job, nameSpace) + ":" + std::to_string(kRendezvousPort);
}
inline std::string configPath() { return std::string(kConfigMountPath) + "/" + kConfigKey; }

}  // namespace tandem::operator_core
