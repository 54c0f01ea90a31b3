#include "tandem/operator/informer.h"

#include <cstdlib>
#include <iterator>
#include <limits>
#include <random>

#include "tandem/common/log.h"

namespace tandem::operator_core {
namespace {

using json = nlohmann::json;

std::optional<long long> numericVersion(const json& object) {
  const std::string text = object.value("/metadata/resourceVersion"_json_pointer, std::string());
  if (text.empty()) return std::nullopt;
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (end == nullptr || *end != '\0') return std::nullopt;
  return value;
}

}  // namespace

void trimMetadata(json& object) {
  if (!object.contains("metadata")) return;
  json& metadata = object["metadata"];
  metadata.erase("managedFields");
  if (metadata.contains("annotations")) {
    metadata["annotations"].erase("kubectl.kubernetes.io/last-applied-configuration");
    if (metadata["annotations"].empty()) metadata.erase("annotations");
  }
}

std::string Informer::keyOf(const json& object) {
  const json& metadata = object["metadata"];
  return metadata.value("namespace", "") + "/" + metadata.value("name", "");
}

Informer::Informer(kube::KubeClient& client, Options options, Handler handler)
    : client_(client), options_(std::move(options)), handler_(std::move(handler)) {}

Informer::~Informer() { stop(); }

void Informer::start() { thread_ = std::thread([this] { run(); }); }

void Informer::stop() {
  {
    // Under the waiters' mutex: set between a waiter's check and its wait, the wake-up would be lost and
    // the waiter would sleep out its backoff.
    std::lock_guard<std::mutex> lock(waitMutex_);
    stopping_ = true;
  }
  waitChanged_.notify_all();
  if (thread_.joinable()) thread_.join();
}

bool Informer::waitForSync(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(waitMutex_);
  return waitChanged_.wait_for(lock, timeout, [this] { return synced_.load() || stopping_.load(); }) && synced_;
}

std::optional<json> Informer::get(const std::string& key) const {
  std::lock_guard<std::mutex> lock(cacheMutex_);
  auto it = cache_.find(key);
  if (it == cache_.end()) return std::nullopt;
  return it->second;
}

std::vector<json> Informer::list(const std::function<bool(const json&)>& filter) const {
  std::lock_guard<std::mutex> lock(cacheMutex_);
  std::vector<json> out;
  for (const auto& [key, object] : cache_)
    if (!filter || filter(object)) out.push_back(object);
  return out;
}

std::vector<json> Informer::listByIndex(const std::string& index, const std::string& value) const {
  std::lock_guard<std::mutex> lock(cacheMutex_);
  std::vector<json> out;
  const auto byValue = indexes_.find(index);
  if (byValue == indexes_.end()) return out;
  const auto keys = byValue->second.find(value);
  if (keys == byValue->second.end()) return out;
  for (const std::string& key : keys->second) out.push_back(cache_.at(key));
  return out;
}

void Informer::indexLocked(const std::string& key, const json& object, bool add) {
  for (const auto& [index, valueOf] : options_.indexers) {
    const std::string value = valueOf(object);
    if (value.empty()) continue;
    auto& keys = indexes_[index][value];
    if (add) {
      keys.insert(key);
    } else {
      keys.erase(key);
      if (keys.empty()) indexes_[index].erase(value);
    }
  }
}

size_t Informer::size() const {
  std::lock_guard<std::mutex> lock(cacheMutex_);
  return cache_.size();
}

void Informer::forEach(const std::function<void(const json&)>& visit) const {
  std::lock_guard<std::mutex> lock(cacheMutex_);
  for (const auto& [key, object] : cache_) visit(object);
}

void Informer::storeLocked(const std::string& key, json object) {
  auto it = cache_.find(key);
  if (it != cache_.end()) {
    // A write's response may already be cached; what arrives later can be older than that, never newer.
    const auto cached = numericVersion(it->second);
    const auto offered = numericVersion(object);
    if (cached && offered && *cached > *offered) return;
    indexLocked(key, it->second, /*add=*/false);
  }
  indexLocked(key, object, /*add=*/true);
  cache_[key] = std::move(object);
}

void Informer::upsertIfNewer(json object) {
  if (options_.trim) options_.trim(object);
  const std::string key = keyOf(object);
  std::lock_guard<std::mutex> lock(cacheMutex_);
  if (auto tomb = tombstones_.find(key); tomb != tombstones_.end()) {
    const auto offered = numericVersion(object);
    // Deleted at or after this version (or versions are not comparable): the watch has the last word.
    if (!offered || *offered <= tomb->second.resourceVersion) return;
  }
  storeLocked(key, std::move(object));
}

namespace {
// Same uid, or a uid missing on either side (nothing to tell them apart by).
bool sameObject(const json& cached, const json& other) {
  const std::string a = cached.value("/metadata/uid"_json_pointer, std::string());
  const std::string b = other.value("/metadata/uid"_json_pointer, std::string());
  return a.empty() || b.empty() || a == b;
}
}  // namespace

void Informer::apply(const std::string& type, json object) {
  if (type == "BOOKMARK") {  // only a newer resourceVersion to resume from
    std::lock_guard<std::mutex> lock(cacheMutex_);
    resourceVersion_ = object.value("/metadata/resourceVersion"_json_pointer, resourceVersion_);
    return;
  }
  if (options_.trim) options_.trim(object);
  const std::string key = keyOf(object);
  {
    std::lock_guard<std::mutex> lock(cacheMutex_);
    resourceVersion_ = object.value("/metadata/resourceVersion"_json_pointer, resourceVersion_);
    if (type == "DELETED") {
      // Only the object deleted: a force delete then a create of the same name can put the new pod in the
      // cache (from the create's response) before the old one's DELETED event arrives.
      if (auto it = cache_.find(key); it != cache_.end() && sameObject(it->second, object)) {
        indexLocked(key, it->second, /*add=*/false);
        cache_.erase(it);
      }
      const auto now = std::chrono::steady_clock::now();
      for (auto tomb = tombstones_.begin(); tomb != tombstones_.end();)
        tomb = now - tomb->second.seen > std::chrono::minutes(5) ? tombstones_.erase(tomb) : std::next(tomb);
      tombstones_[key] = Tombstone{numericVersion(object).value_or(std::numeric_limits<long long>::max()), now};
    } else {
      storeLocked(key, object);
    }
  }
  handler_(object, type == "DELETED");
}

Status Informer::relist() {
  TANDEM_ASSIGN_OR_RETURN(kube::ListResult listed,
                          client_.list(options_.collectionPath, kube::ListOptions{options_.labelSelector, "", 500}));
  std::map<std::string, json> fresh;
  for (json& item : listed.items) {
    if (options_.trim) options_.trim(item);
    std::string key = keyOf(item);  // first: json's operator= takes its argument by value, moved before the key
    fresh[key] = std::move(item);
  }
  std::vector<json> gone;
  {
    std::lock_guard<std::mutex> lock(cacheMutex_);
    for (auto& [key, object] : cache_)
      if (fresh.count(key) == 0) gone.push_back(std::move(object));
    cache_ = fresh;
    indexes_.clear();
    for (const auto& [key, object] : cache_) indexLocked(key, object, /*add=*/true);
    resourceVersion_ = listed.resourceVersion;
  }
  ++relists_;
  for (const json& object : gone) handler_(object, true);
  for (const auto& [key, object] : fresh) handler_(object, false);
  if (!synced_) {
    synced_ = true;
    waitChanged_.notify_all();
  }
  log::info() << "informer " << options_.name << ": listed " << fresh.size() << " at resourceVersion "
              << listed.resourceVersion;
  return Status::Ok();
}

void Informer::run() {
  std::mt19937_64 random{std::random_device{}()};
  int failures = 0;
  bool needList = true;
  auto pause = [&](std::chrono::milliseconds wait) {
    std::unique_lock<std::mutex> lock(waitMutex_);
    waitChanged_.wait_for(lock, wait, [this] { return stopping_.load(); });
  };
  auto backoff = [&]() {
    const int64_t cap = std::min<int64_t>(30000, 200LL << std::min(failures, 10));
    ++failures;
    return std::chrono::milliseconds(std::uniform_int_distribution<int64_t>(cap / 2, cap)(random));
  };
  while (!stopping_) {
    if (needList) {
      Status listed = relist();
      if (!listed.ok()) {
        if (stopping_ || listed.code() == StatusCode::kCancelled) break;  // the client was shut down
        if (options_.optional && listed.code() == StatusCode::kPermissionDenied) {
          if (!synced_) {
            log::warning() << "informer " << options_.name << ": not permitted (" << listed.message()
                           << "); carrying on without it, retrying every 5 minutes";
            synced_ = true;
            waitChanged_.notify_all();
          }
          pause(std::chrono::minutes(5));
          continue;
        }
        const auto wait = backoff();
        log::warning() << "informer " << options_.name << ": list failed: " << listed.message() << "; retrying in "
                    << wait.count() << " ms";
        pause(wait);
        continue;
      }
      needList = false;
    }
    std::string from;
    {
      std::lock_guard<std::mutex> lock(cacheMutex_);
      from = resourceVersion_;
    }
    // Jittered so that the informers of many replicas do not all reconnect at once.
    const int timeout = std::uniform_int_distribution<int>(options_.watchTimeoutSeconds / 2 + 1,
                                                           options_.watchTimeoutSeconds)(random);
    Status watched = client_.watch(options_.collectionPath, kube::ListOptions{options_.labelSelector, "", 0}, from,
                                   timeout, [this](const kube::WatchEvent& event) {
                                     apply(event.type, event.object);
                                     return !stopping_.load();
                                   });
    if (stopping_ || watched.code() == StatusCode::kCancelled) break;
    if (watched.ok()) {
      failures = 0;
      continue;  // the server ended the stream: resume from the last resourceVersion
    }
    if (kube::isGone(watched)) {
      log::warning() << "informer " << options_.name << ": watch expired (410 Gone at resourceVersion " << from
                  << "), relisting";
      needList = true;
      continue;
    }
    const auto wait = backoff();
    log::warning() << "informer " << options_.name << ": watch failed: " << watched.message() << "; retrying in "
                << wait.count() << " ms";
    pause(wait);
  }
}

}  // namespace tandem::operator_core
