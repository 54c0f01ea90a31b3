#include "tandem/kube/config.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <openssl/evp.h>
#include <yaml-cpp/yaml.h>

namespace tandem::kube {
namespace {

StatusOr<std::string> readFile(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return TANDEM_ERROR(StatusCode::kNotFound, what + ": cannot read " + path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string trim(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) text.pop_back();
  return text;
}

// kubeconfig file references are relative to the kubeconfig's own directory.
std::string resolvePath(const std::string& path, const std::filesystem::path& base) {
  if (path.empty() || std::filesystem::path(path).is_absolute()) return path;
  return (base / path).string();
}

// The named entry of a kubeconfig list (clusters, users, contexts): [{name: x, <field>: {...}}].
StatusOr<YAML::Node> namedEntry(const YAML::Node& root, const std::string& list, const std::string& field,
                                 const std::string& name, const std::string& file) {
  const YAML::Node entries = root[list];
  if (entries && entries.IsSequence()) {
    for (const auto& entry : entries)
      if (entry["name"] && entry["name"].as<std::string>() == name) {
        if (!entry[field] || !entry[field].IsMap())
          return TANDEM_ERROR(StatusCode::kInvalidArgument, file + ": " + list + "[" + name + "]." + field + " is missing");
        return entry[field];
      }
  }
  return TANDEM_ERROR(StatusCode::kInvalidArgument, file + ": no " + list + " entry named \"" + name + "\"");
}

std::string scalar(const YAML::Node& map, const char* key) {
  const YAML::Node value = map[key];
  return value && value.IsScalar() ? value.as<std::string>() : std::string();
}

// A PEM given either inline as base64 (<key>-data) or as a file (<key>).
StatusOr<std::string> pemField(const YAML::Node& map, const std::string& key, const std::filesystem::path& base,
                               const std::string& where) {
  const std::string data = scalar(map, (key + "-data").c_str());
  if (!data.empty()) {
    auto decoded = decodeBase64(data);
    if (!decoded.ok())
      return TANDEM_ERROR(StatusCode::kInvalidArgument, where + "." + key + "-data: " + decoded.status().message());
    return decoded;
  }
  const std::string file = scalar(map, key.c_str());
  if (file.empty()) return std::string();
  return readFile(resolvePath(file, base), where + "." + key);
}

}  // namespace

StatusOr<std::string> decodeBase64(const std::string& text) {
  std::string compact;
  for (char c : text)
    if (c != '\n' && c != '\r' && c != ' ') compact.push_back(c);
  if (compact.size() % 4 != 0) return TANDEM_ERROR(StatusCode::kInvalidArgument, "base64 length is not a multiple of 4");
  std::string out(compact.size() / 4 * 3, '\0');
  const int written = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                      reinterpret_cast<const unsigned char*>(compact.data()), static_cast<int>(compact.size()));
  if (written < 0) return TANDEM_ERROR(StatusCode::kInvalidArgument, "not valid base64");
  size_t padding = 0;  // EVP_DecodeBlock counts the bytes that '=' padding stands for
  for (auto it = compact.rbegin(); it != compact.rend() && *it == '='; ++it) ++padding;
  out.resize(static_cast<size_t>(written) - padding);
  return out;
}

std::string encodeBase64(const std::string& bytes) {
  std::string out((bytes.size() + 2) / 3 * 4 + 1, '\0');  // EVP_EncodeBlock adds a NUL
  const int written = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                      reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<int>(bytes.size()));
  out.resize(static_cast<size_t>(written));
  return out;
}

StatusOr<KubeConfig> loadInCluster(const std::string& serviceAccountDir) {
  const char* host = std::getenv("KUBERNETES_SERVICE_HOST");
  const char* port = std::getenv("KUBERNETES_SERVICE_PORT");
  if (host == nullptr || port == nullptr || *host == '\0')
    return TANDEM_ERROR(StatusCode::kNotFound,
                        "not in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set (pass --kubeconfig)");
  KubeConfig config;
  const std::string hostText = host;
  config.server = "https://" + (hostText.find(':') != std::string::npos ? "[" + hostText + "]" : hostText) + ":" + port;
  config.tokenFile = serviceAccountDir + "/token";
  TANDEM_ASSIGN_OR_RETURN(config.caPem, readFile(serviceAccountDir + "/ca.crt", "in-cluster CA"));
  auto nameSpace = readFile(serviceAccountDir + "/namespace", "in-cluster namespace");
  if (nameSpace.ok()) config.nameSpace = trim(*nameSpace);
  config.source = "in-cluster";
  return config;
}

StatusOr<KubeConfig> loadKubeconfig(const std::string& path, const std::string& contextName) {
  TANDEM_ASSIGN_OR_RETURN(const std::string text, readFile(path, "kubeconfig"));
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& error) {
    return TANDEM_ERROR(StatusCode::kInvalidArgument, path + ": not YAML: " + error.what());
  }
  const std::filesystem::path base = std::filesystem::path(path).parent_path();
  std::string name = contextName.empty() ? scalar(root, "current-context") : contextName;
  if (name.empty()) return TANDEM_ERROR(StatusCode::kInvalidArgument, path + ": current-context is not set");
  try {
    TANDEM_ASSIGN_OR_RETURN(const YAML::Node context, namedEntry(root, "contexts", "context", name, path));
    const std::string clusterName = scalar(context, "cluster");
    const std::string userName = scalar(context, "user");
    TANDEM_ASSIGN_OR_RETURN(const YAML::Node cluster, namedEntry(root, "clusters", "cluster", clusterName, path));
    KubeConfig config;
    config.source = path;
    config.server = scalar(cluster, "server");
    if (config.server.empty())
      return TANDEM_ERROR(StatusCode::kInvalidArgument, path + ": clusters[" + clusterName + "].cluster.server is missing");
    config.insecureSkipTlsVerify = scalar(cluster, "insecure-skip-tls-verify") == "true";
    TANDEM_ASSIGN_OR_RETURN(config.caPem,
                            pemField(cluster, "certificate-authority", base, path + ": clusters[" + clusterName + "]"));
    if (!scalar(context, "namespace").empty()) config.nameSpace = scalar(context, "namespace");
    if (!userName.empty()) {
      TANDEM_ASSIGN_OR_RETURN(const YAML::Node user, namedEntry(root, "users", "user", userName, path));
      const std::string where = path + ": users[" + userName + "]";
      config.token = scalar(user, "token");
      config.tokenFile = resolvePath(scalar(user, "tokenFile"), base);
      TANDEM_ASSIGN_OR_RETURN(config.clientCertPem, pemField(user, "client-certificate", base, where));
      TANDEM_ASSIGN_OR_RETURN(config.clientKeyPem, pemField(user, "client-key", base, where));
      if (config.clientCertPem.empty() != config.clientKeyPem.empty())
        return TANDEM_ERROR(StatusCode::kInvalidArgument, where + ": client-certificate and client-key go together");
    }
    return config;
  } catch (const YAML::Exception& error) {
    return TANDEM_ERROR(StatusCode::kInvalidArgument, path + ": " + error.what());
  }
}

StatusOr<KubeConfig> resolveConfig(const std::string& kubeconfigFlag) {
  if (!kubeconfigFlag.empty()) return loadKubeconfig(kubeconfigFlag);
  if (const char* env = std::getenv("KUBECONFIG"); env != nullptr && *env != '\0') {
    std::string first = env;  // a list: the first file is enough for us
    first = first.substr(0, first.find(':'));
    return loadKubeconfig(first);
  }
  return loadInCluster();
}

}  // namespace tandem::kube
