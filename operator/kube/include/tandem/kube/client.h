// A small Kubernetes REST client (DESIGN.md §9) on cpp-httplib + OpenSSL + nlohmann-json: get, list (paged),
// watch (streamed, bookmarks), create, patch (merge / JSON patch), update, delete (grace, propagation), the
// status subresource. Retries with exponential backoff and full jitter on network errors, 429 (honouring
// Retry-After) and 5xx; the caller handles 409 (it re-reads). Thread-safe: a pool of keep-alive connections.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tandem/common/status.h"
#include "tandem/kube/config.h"

namespace httplib {
class ClientImpl;
}

namespace tandem::kube {

// An API error keeps the HTTP code and the server's Status reason (AlreadyExists, Conflict, NotFound,
// Expired, Invalid, ...). Codes map onto StatusCode: 404 kNotFound, 409 AlreadyExists kAlreadyExists,
// 409 Conflict kAborted, 410 kFailedPrecondition, 400/422 kInvalidArgument, 401/403 kPermissionDenied,
// 429/5xx/network kUnavailable.
bool isNotFound(const Status& status);
bool isAlreadyExists(const Status& status);
bool isConflict(const Status& status);
bool isGone(const Status& status);  // 410: the resourceVersion is too old, relist

// `text` (an API server's or a webhook's message about `secret`) with every value of the Secret's
// stringData and data, as given and base64-encoded, replaced by "[redacted]": refusals are logged and
// become Events, which more people may read than the Secret. KubeClient does it to every error of a
// create or update of a Secret, before any log line or truncation.
std::string redactSecretValues(std::string text, const nlohmann::json& secret);

// API paths. group "" is the core API (/api/v1); nameSpace "" means all namespaces (collections) or a
// cluster-scoped resource.
struct Resource {
  std::string group;  // "", "tandem.dev", "coordination.k8s.io"
  std::string version;
  std::string plural;
  bool namespaced = true;
  std::string collectionPath(const std::string& nameSpace) const;
  std::string objectPath(const std::string& nameSpace, const std::string& name) const;
};

struct ListOptions {
  std::string labelSelector;
  std::string fieldSelector;
  int64_t limit = 500;  // page size; `continue` is followed
};

struct ListResult {
  std::vector<nlohmann::json> items;
  std::string resourceVersion;  // of the list: where a watch starts
};

struct WatchEvent {
  std::string type;  // ADDED, MODIFIED, DELETED, BOOKMARK (ERROR ends the watch with its status)
  nlohmann::json object;
};

struct DeleteOptions {
  std::optional<int64_t> gracePeriodSeconds;
  std::string propagationPolicy;  // Background | Foreground | Orphan; "" = server default
  std::string preconditionUid;
};

struct RetryPolicy {
  int maxAttempts = 8;
  std::chrono::milliseconds initialBackoff{100};
  std::chrono::milliseconds maxBackoff{5000};
};

class KubeClient {
 public:
  explicit KubeClient(KubeConfig config, RetryPolicy retry = {});
  ~KubeClient();
  KubeClient(const KubeClient&) = delete;
  KubeClient& operator=(const KubeClient&) = delete;

  const KubeConfig& config() const { return config_; }

  StatusOr<nlohmann::json> get(const std::string& path);
  StatusOr<ListResult> list(const std::string& collectionPath, const ListOptions& options = {});
  StatusOr<nlohmann::json> create(const std::string& collectionPath, const nlohmann::json& object);
  StatusOr<nlohmann::json> update(const std::string& objectPath, const nlohmann::json& object);  // PUT
  StatusOr<nlohmann::json> mergePatch(const std::string& objectPath, const nlohmann::json& patch);
  StatusOr<nlohmann::json> jsonPatch(const std::string& objectPath, const nlohmann::json& operations);
  // The deleted object (with deletionTimestamp while it terminates) or the server's Status.
  StatusOr<nlohmann::json> remove(const std::string& objectPath, const DeleteOptions& options = {});

  // Streams events from `resourceVersion` until the server ends the stream (timeoutSeconds), onEvent
  // returns false, cancel() is called, or an error: a 410 (as HTTP status or as an ERROR event) returns a
  // status for which isGone() holds. Not retried: the informer decides between re-watch and relist.
  Status watch(const std::string& collectionPath, const ListOptions& options, const std::string& resourceVersion,
               int timeoutSeconds, const std::function<bool(const WatchEvent&)>& onEvent);

  // Ends every request and watch in flight (they return CANCELLED, a watch OK), cuts short a retry's
  // backoff, and makes later calls fail fast: shutdown, or a caller's deadline.
  void cancel();
  bool cancelled() const { return cancelled_.load(); }

  int64_t requestCount() const { return requests_.load(); }

 private:
  struct Call {
    std::string method;
    std::string path;
    std::string body;
    std::string contentType;
    const nlohmann::json* secret = nullptr;  // a Secret being written: its values never reach a message
  };
  StatusOr<nlohmann::json> send(const Call& call);
  std::shared_ptr<httplib::ClientImpl> acquire();
  void release(std::shared_ptr<httplib::ClientImpl> client);
  std::unique_ptr<httplib::ClientImpl> connect() const;
  std::string bearerToken();

  KubeConfig config_;
  RetryPolicy retry_;
  std::string host_;
  int port_ = 443;
  bool tls_ = true;

  std::mutex poolMutex_;
  std::vector<std::shared_ptr<httplib::ClientImpl>> idle_;
  // Requests and watches that cancel() must stop. Shared: cancel() stops them outside poolMutex_ (httplib's
  // stop() waits while a connection is being made) and one may return meanwhile.
  std::set<std::shared_ptr<httplib::ClientImpl>> inFlight_;
  std::condition_variable cancelledWake_;     // a retry's backoff waits on it
  std::atomic<bool> cancelled_{false};
  std::atomic<int64_t> requests_{0};

  std::mutex tokenMutex_;
  std::string fileToken_;
  int64_t tokenMtime_ = -1;
};

}  // namespace tandem::kube
