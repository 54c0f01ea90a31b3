// An informer keeps a cache of one kind of object (list, then watch from the list's resourceVersion with
// bookmarks) and calls a handler for every change. A watch the server ends is resumed from the last
// resourceVersion seen; a 410 Gone (the version was compacted away) relists and reports the objects that
// disappeared meanwhile as deleted; errors back off with jitter. Every wait has a deadline and stop()
// ends the watch in flight.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <set>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "tandem/kube/client.h"

namespace tandem::operator_core {

class Informer {
 public:
  struct Options {
    std::string name;            // "pods", for logs
    std::string collectionPath;  // e.g. /api/v1/pods or /api/v1/namespaces/ns/pods
    std::string labelSelector;
    int watchTimeoutSeconds = 300;  // the server ends each watch after about this long (jittered)
    // Trims an object before it is cached (drop managedFields and what the controller never reads).
    std::function<void(nlohmann::json&)> trim;
    // Optional: without permission to list (403) it counts as synced with an empty cache and retries slowly,
    // so that the operator still runs where RBAC does not grant it (e.g. nodes under a namespaced Role).
    bool optional = false;
    // Named indexes: each maps an object to a value ("" = not indexed), and listByIndex(name, value) finds
    // the objects with that value without scanning the cache (e.g. a job's pods, a node's pods).
    std::map<std::string, std::function<std::string(const nlohmann::json&)>> indexers;
  };
  // deleted: the object is gone (its last known state is passed).
  using Handler = std::function<void(const nlohmann::json& object, bool deleted)>;

  Informer(kube::KubeClient& client, Options options, Handler handler);
  ~Informer();
  Informer(const Informer&) = delete;
  Informer& operator=(const Informer&) = delete;

  void start();
  void stop();
  bool waitForSync(std::chrono::milliseconds timeout);
  bool synced() const { return synced_.load(); }

  std::optional<nlohmann::json> get(const std::string& key) const;  // key: "namespace/name"
  std::vector<nlohmann::json> list(const std::function<bool(const nlohmann::json&)>& filter = nullptr) const;
  // The cached objects whose indexer `index` gives `value`, in key order; empty for an unknown index.
  std::vector<nlohmann::json> listByIndex(const std::string& index, const std::string& value) const;
  // Visits every cached object under the cache's lock, without copies; `visit` must not call back into it.
  void forEach(const std::function<void(const nlohmann::json&)>& visit) const;
  size_t size() const;
  // The object a write returned, so that the next reconcile does not act on an older copy. Ignored when the
  // cache already holds a newer resourceVersion (both parse as integers, as etcd-backed servers issue them),
  // and when the watch has already reported the object deleted: a DELETE's response can arrive after the
  // DELETED event, and must not bring back a pod that will never be reported again.
  void upsertIfNewer(nlohmann::json object);

  int64_t relists() const { return relists_.load(); }

  static std::string keyOf(const nlohmann::json& object);

 private:
  void run();
  Status relist();
  void apply(const std::string& type, nlohmann::json object);
  // Caches `object` unless the cache holds a newer version of it. Requires cacheMutex_.
  void storeLocked(const std::string& key, nlohmann::json object);
  // Adds `key` to (or removes it from) every index under `object`'s values. Requires cacheMutex_.
  void indexLocked(const std::string& key, const nlohmann::json& object, bool add);

  kube::KubeClient& client_;
  Options options_;
  Handler handler_;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> synced_{false};
  std::atomic<int64_t> relists_{0};
  std::mutex waitMutex_;
  std::condition_variable waitChanged_;

  mutable std::mutex cacheMutex_;
  std::map<std::string, nlohmann::json> cache_;
  // index name -> value -> keys of the cached objects with that value
  std::map<std::string, std::map<std::string, std::set<std::string>>> indexes_;
  // Keys the watch reported deleted: the resourceVersion of the deletion and when it was seen (pruned after
  // a few minutes; a later relist replaces the cache anyway).
  struct Tombstone {
    long long resourceVersion = 0;
    std::chrono::steady_clock::time_point seen;
  };
  std::map<std::string, Tombstone> tombstones_;
  std::string resourceVersion_;
};

// Drops metadata.managedFields and the last-applied annotation: large and never read.
void trimMetadata(nlohmann::json& object);

}  // namespace tandem::operator_core
