// Where the API server is and how to authenticate to it: in-cluster (service-account token and CA mounted
// into the pod) or a kubeconfig file (token or client certificate).
#pragma once

#include <string>

#include "tandem/common/status.h"

namespace tandem::kube {

struct KubeConfig {
  std::string server;  // https://host:port (http:// only for tests)
  std::string caPem;   // CA bundle for the server certificate; empty: the system's default CAs
  bool insecureSkipTlsVerify = false;
  std::string token;      // bearer token given inline
  std::string tokenFile;  // bearer token read from a file, re-read when it changes (rotated SA tokens)
  std::string clientCertPem;
  std::string clientKeyPem;
  std::string nameSpace = "default";  // the context's (or the pod's) namespace
  std::string source;                 // "in-cluster" or the kubeconfig path, for messages
};

inline constexpr const char* kServiceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount";

// KUBERNETES_SERVICE_HOST/PORT plus <serviceAccountDir>/{token,ca.crt,namespace}.
StatusOr<KubeConfig> loadInCluster(const std::string& serviceAccountDir = kServiceAccountDir);

// A kubeconfig's context (its current-context when `context` is empty). File references are relative to
// the kubeconfig's directory; *-data fields are base64. Errors name the file and the field.
StatusOr<KubeConfig> loadKubeconfig(const std::string& path, const std::string& context = "");

// --kubeconfig when given, else $KUBECONFIG, else in-cluster.
StatusOr<KubeConfig> resolveConfig(const std::string& kubeconfigFlag);

// Standard base64 (with padding), as kubeconfig *-data fields and Secret data use.
StatusOr<std::string> decodeBase64(const std::string& text);
std::string encodeBase64(const std::string& bytes);

}  // namespace tandem::kube
