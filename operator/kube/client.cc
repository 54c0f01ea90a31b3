#include "tandem/kube/client.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include <httplib.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "tandem/common/log.h"

namespace tandem::kube {
namespace {

using json = nlohmann::json;

constexpr const char* kUserAgent = "tandem-operator/0.1.0";
constexpr time_t kConnectTimeoutSeconds = 5;
constexpr time_t kReadTimeoutSeconds = 30;

// Query strings: Kubernetes selectors contain '=', ',' and '!' which must be escaped.
std::string escapeQuery(const std::string& text) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : text) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

std::string withQuery(const std::string& path, const std::vector<std::pair<std::string, std::string>>& query) {
  std::string out = path;
  char separator = path.find('?') == std::string::npos ? '?' : '&';
  for (const auto& [key, value] : query) {
    if (value.empty()) continue;
    out += separator + key + "=" + escapeQuery(value);
    separator = '&';
  }
  return out;
}

// An error from the HTTP status and the server's Status body (kind: Status, reason, message).
void replaceAll(std::string& text, const std::string& what, const std::string& with) {
  if (what.empty()) return;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + with.size()))
    text.replace(at, what.size(), with);
}

Status apiError(int code, const std::string& method, const std::string& path, const std::string& rawBody,
                const json* secret = nullptr) {
  // Before anything is cut: a value cut in two would no longer be found.
  const std::string body = secret != nullptr ? redactSecretValues(rawBody, *secret) : rawBody;
  std::string reason;
  std::string message = body.substr(0, 300);
  try {
    const json status = json::parse(body);
    reason = status.value("reason", "");
    message = status.value("message", message);
    if (secret != nullptr) {  // a value with characters JSON escapes is found only once unescaped
      reason = redactSecretValues(reason, *secret);
      message = redactSecretValues(message, *secret);
    }
  } catch (const json::exception&) {
  }
  const std::string text =
      "HTTP " + std::to_string(code) + (reason.empty() ? "" : " " + reason) + " for " + method + " " + path + ": " + message;
  StatusCode statusCode = StatusCode::kInternal;
  if (code == 404) statusCode = StatusCode::kNotFound;
  else if (code == 409) statusCode = reason == "AlreadyExists" ? StatusCode::kAlreadyExists : StatusCode::kAborted;
  else if (code == 410) statusCode = StatusCode::kFailedPrecondition;
  else if (code == 400 || code == 422) statusCode = StatusCode::kInvalidArgument;
  else if (code == 401 || code == 403) statusCode = StatusCode::kPermissionDenied;
  else if (code == 429 || code >= 500) statusCode = StatusCode::kUnavailable;
  return TANDEM_ERROR(statusCode, text);
}

httplib::Headers requestHeaders(const std::string& token) {
  httplib::Headers headers = {{"Accept", "application/json"}, {"User-Agent", kUserAgent}};
  if (!token.empty()) headers.emplace("Authorization", "Bearer " + token);
  return headers;
}

bool retryableCode(int code) { return code == 429 || code >= 500; }

std::chrono::milliseconds backoffFor(int attempt, const RetryPolicy& policy) {
  // Full jitter: a random wait in [0, min(max, initial * 2^attempt)] so that many clients spread out.
  thread_local std::mt19937_64 random{std::random_device{}()};
  const int64_t cap = std::min<int64_t>(policy.maxBackoff.count(), policy.initialBackoff.count() << std::min(attempt, 20));
  return std::chrono::milliseconds(std::uniform_int_distribution<int64_t>(cap / 4, cap)(random));
}

// The OpenSSL objects behind a PEM text, owned until handed to httplib.
X509_STORE* storeFromPem(const std::string& pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  X509_STORE* store = X509_STORE_new();
  while (X509* cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr)) {
    X509_STORE_add_cert(store, cert);
    X509_free(cert);
  }
  BIO_free(bio);
  return store;
}

}  // namespace

bool isNotFound(const Status& status) { return status.code() == StatusCode::kNotFound; }
bool isAlreadyExists(const Status& status) { return status.code() == StatusCode::kAlreadyExists; }
bool isConflict(const Status& status) { return status.code() == StatusCode::kAborted; }
bool isGone(const Status& status) { return status.code() == StatusCode::kFailedPrecondition; }

std::string Resource::collectionPath(const std::string& nameSpace) const {
  std::string path = group.empty() ? "/api/" + version : "/apis/" + group + "/" + version;
  if (namespaced && !nameSpace.empty()) path += "/namespaces/" + nameSpace;
  return path + "/" + plural;
}

std::string Resource::objectPath(const std::string& nameSpace, const std::string& name) const {
  return collectionPath(nameSpace) + "/" + name;
}

KubeClient::KubeClient(KubeConfig config, RetryPolicy retry) : config_(std::move(config)), retry_(retry) {
  std::string rest = config_.server;
  if (rest.rfind("https://", 0) == 0) {
    rest = rest.substr(8);
  } else if (rest.rfind("http://", 0) == 0) {
    rest = rest.substr(7);
    tls_ = false;
    port_ = 80;
  }
  rest = rest.substr(0, rest.find('/'));
  const auto colon = rest.rfind(':');
  if (colon != std::string::npos && rest.find(']', colon) == std::string::npos) {
    port_ = std::atoi(rest.c_str() + colon + 1);
    rest = rest.substr(0, colon);
  }
  if (rest.size() > 2 && rest.front() == '[') rest = rest.substr(1, rest.size() - 2);
  host_ = rest;
}

KubeClient::~KubeClient() = default;

std::unique_ptr<httplib::ClientImpl> KubeClient::connect() const {
  std::unique_ptr<httplib::ClientImpl> client;
  if (!tls_) {
    client = std::make_unique<httplib::ClientImpl>(host_, port_);
  } else {
    X509* cert = nullptr;
    EVP_PKEY* key = nullptr;
    if (!config_.clientCertPem.empty()) {
      BIO* certBio = BIO_new_mem_buf(config_.clientCertPem.data(), static_cast<int>(config_.clientCertPem.size()));
      cert = PEM_read_bio_X509(certBio, nullptr, nullptr, nullptr);
      BIO_free(certBio);
      BIO* keyBio = BIO_new_mem_buf(config_.clientKeyPem.data(), static_cast<int>(config_.clientKeyPem.size()));
      key = PEM_read_bio_PrivateKey(keyBio, nullptr, nullptr, nullptr);
      BIO_free(keyBio);
    }
    auto ssl = std::make_unique<httplib::SSLClient>(host_, port_, cert, key);
    if (cert != nullptr) X509_free(cert);  // the SSL context holds its own references
    if (key != nullptr) EVP_PKEY_free(key);
    if (!config_.caPem.empty()) ssl->set_ca_cert_store(storeFromPem(config_.caPem));  // the context owns it
    ssl->enable_server_certificate_verification(!config_.insecureSkipTlsVerify);
    client = std::move(ssl);
  }
  client->set_connection_timeout(kConnectTimeoutSeconds);
  client->set_read_timeout(kReadTimeoutSeconds);
  client->set_write_timeout(kReadTimeoutSeconds);
  client->set_keep_alive(true);
  return client;
}

std::shared_ptr<httplib::ClientImpl> KubeClient::acquire() {
  {
    std::lock_guard<std::mutex> lock(poolMutex_);
    if (!idle_.empty()) {
      auto client = std::move(idle_.back());
      idle_.pop_back();
      return client;
    }
  }
  return connect();
}

void KubeClient::release(std::shared_ptr<httplib::ClientImpl> client) {
  std::lock_guard<std::mutex> lock(poolMutex_);
  if (idle_.size() < 12) idle_.push_back(std::move(client));  // each keeps its own TLS context
}

std::string KubeClient::bearerToken() {
  if (config_.tokenFile.empty()) return config_.token;
  std::lock_guard<std::mutex> lock(tokenMutex_);
  struct stat info {};
  if (::stat(config_.tokenFile.c_str(), &info) == 0 && info.st_mtime != tokenMtime_) {
    std::ifstream in(config_.tokenFile);
    std::ostringstream text;
    text << in.rdbuf();
    std::string token = text.str();
    while (!token.empty() && (token.back() == '\n' || token.back() == '\r')) token.pop_back();
    if (!token.empty()) {
      fileToken_ = token;  // rotated service-account tokens are picked up without a restart
      tokenMtime_ = info.st_mtime;
    }
  }
  return fileToken_.empty() ? config_.token : fileToken_;
}

StatusOr<json> KubeClient::send(const Call& call) {
  Status last = TANDEM_ERROR(StatusCode::kUnavailable, "no attempt made");
  for (int attempt = 0; attempt < retry_.maxAttempts; ++attempt) {
    if (cancelled_) return TANDEM_ERROR(StatusCode::kCancelled, call.method + " " + call.path + ": client shut down");
    httplib::Request request;
    request.method = call.method;
    request.path = call.path;
    request.body = call.body;
    request.headers = requestHeaders(bearerToken());
    if (!call.body.empty()) request.headers.emplace("Content-Type", call.contentType);
    auto client = acquire();
    {
      std::lock_guard<std::mutex> lock(poolMutex_);
      // Checked under the lock that cancel() takes: it either sees this request in inFlight_ or is seen here.
      if (cancelled_) return TANDEM_ERROR(StatusCode::kCancelled, call.method + " " + call.path + ": client shut down");
      inFlight_.insert(client);
    }
    ++requests_;
    httplib::Result result = client->send(request);
    {
      std::lock_guard<std::mutex> lock(poolMutex_);
      inFlight_.erase(client);
    }
    if (cancelled_) return TANDEM_ERROR(StatusCode::kCancelled, call.method + " " + call.path + ": client shut down");
    std::chrono::milliseconds wait = backoffFor(attempt, retry_);
    if (!result) {
      last = TANDEM_ERROR(StatusCode::kUnavailable,
                          call.method + " " + call.path + ": " + httplib::to_string(result.error()) + " (" + config_.server + ")");
      // A broken keep-alive connection is dropped, not returned to the pool.
    } else {
      const int code = result->status;
      release(std::move(client));
      if (code >= 200 && code < 300) {
        if (result->body.empty()) return json::object();
        try {
          return json::parse(result->body);
        } catch (const json::exception& error) {
          return TANDEM_ERROR(StatusCode::kInternal, call.method + " " + call.path + ": response is not JSON: " + error.what());
        }
      }
      last = apiError(code, call.method, call.path, result->body, call.secret);
      if (!retryableCode(code)) return last;
      if (code == 429 && result->has_header("Retry-After"))
        wait = std::chrono::seconds(std::max(1, std::atoi(result->get_header_value("Retry-After").c_str())));
    }
    if (attempt + 1 < retry_.maxAttempts) {
      log::warning() << last.message() << "; retrying in " << wait.count() << " ms";
      std::unique_lock<std::mutex> lock(poolMutex_);
      cancelledWake_.wait_for(lock, wait, [this] { return cancelled_.load(); });
    }
  }
  return last;
}

StatusOr<json> KubeClient::get(const std::string& path) { return send({"GET", path, "", ""}); }

StatusOr<ListResult> KubeClient::list(const std::string& collectionPath, const ListOptions& options) {
  ListResult result;
  std::string continueToken;
  do {
    TANDEM_ASSIGN_OR_RETURN(
        json page, send({"GET",
                         withQuery(collectionPath, {{"labelSelector", options.labelSelector},
                                                    {"fieldSelector", options.fieldSelector},
                                                    {"limit", options.limit > 0 ? std::to_string(options.limit) : ""},
                                                    {"continue", continueToken}}),
                         "", ""}));
    for (auto& item : page["items"]) result.items.push_back(std::move(item));
    const json& metadata = page["metadata"];
    result.resourceVersion = metadata.value("resourceVersion", "");
    continueToken = metadata.value("continue", "");
  } while (!continueToken.empty());
  return result;
}

namespace {
const json* secretOrNull(const json& object) { return object.value("kind", "") == "Secret" ? &object : nullptr; }
}  // namespace

StatusOr<json> KubeClient::create(const std::string& collectionPath, const json& object) {
  return send({"POST", collectionPath, object.dump(), "application/json", secretOrNull(object)});
}

StatusOr<json> KubeClient::update(const std::string& objectPath, const json& object) {
  return send({"PUT", objectPath, object.dump(), "application/json", secretOrNull(object)});
}

StatusOr<json> KubeClient::mergePatch(const std::string& objectPath, const json& patch) {
  return send({"PATCH", objectPath, patch.dump(), "application/merge-patch+json"});
}

StatusOr<json> KubeClient::jsonPatch(const std::string& objectPath, const json& operations) {
  return send({"PATCH", objectPath, operations.dump(), "application/json-patch+json"});
}

StatusOr<json> KubeClient::remove(const std::string& objectPath, const DeleteOptions& options) {
  json body = {{"apiVersion", "v1"}, {"kind", "DeleteOptions"}};
  if (options.gracePeriodSeconds) body["gracePeriodSeconds"] = *options.gracePeriodSeconds;
  if (!options.propagationPolicy.empty()) body["propagationPolicy"] = options.propagationPolicy;
  if (!options.preconditionUid.empty()) body["preconditions"] = {{"uid", options.preconditionUid}};
  return send({"DELETE", objectPath, body.dump(), "application/json"});
}

Status KubeClient::watch(const std::string& collectionPath, const ListOptions& options,
                         const std::string& resourceVersion, int timeoutSeconds,
                         const std::function<bool(const WatchEvent&)>& onEvent) {
  if (cancelled_) return TANDEM_ERROR(StatusCode::kCancelled, "watch " + collectionPath + ": client shut down");
  httplib::Request request;
  request.method = "GET";
  request.path = withQuery(collectionPath, {{"watch", "1"},
                                            {"allowWatchBookmarks", "true"},
                                            {"resourceVersion", resourceVersion},
                                            {"timeoutSeconds", std::to_string(timeoutSeconds)},
                                            {"labelSelector", options.labelSelector},
                                            {"fieldSelector", options.fieldSelector}});
  request.headers = requestHeaders(bearerToken());

  std::string pending;  // one JSON event per line; a line may span chunks
  std::string errorBody;
  Status streamStatus = Status::Ok();
  bool stopped = false;
  request.content_receiver = [&](const char* data, size_t length, uint64_t, uint64_t) {
    pending.append(data, length);
    size_t newline;
    while ((newline = pending.find('\n')) != std::string::npos) {
      const std::string line = pending.substr(0, newline);
      pending.erase(0, newline + 1);
      if (line.empty()) continue;
      json event;
      try {
        event = json::parse(line);
      } catch (const json::exception&) {
        errorBody += line;  // a non-200 response body, or garbage
        continue;
      }
      if (!event.contains("type") || !event.contains("object")) {
        errorBody += line;  // an HTTP error's Status body
        continue;
      }
      WatchEvent parsed{event["type"].get<std::string>(), std::move(event["object"])};
      if (parsed.type == "ERROR") {
        streamStatus = apiError(parsed.object.value("code", 500), "WATCH", collectionPath, parsed.object.dump());
        return false;
      }
      if (!onEvent(parsed) || cancelled_) {
        stopped = true;
        return false;
      }
    }
    return true;
  };

  std::shared_ptr<httplib::ClientImpl> client = connect();
  client->set_keep_alive(false);
  client->set_read_timeout(timeoutSeconds + 30);  // the server ends the stream at timeoutSeconds
  {
    std::lock_guard<std::mutex> lock(poolMutex_);
    // Checked again under the lock: a cancel() that came after the first check either sees this watch
    // in inFlight_ or is seen here.
    if (cancelled_) return TANDEM_ERROR(StatusCode::kCancelled, "watch " + collectionPath + ": client shut down");
    inFlight_.insert(client);
  }
  ++requests_;
  httplib::Result result = client->send(request);
  {
    std::lock_guard<std::mutex> lock(poolMutex_);
    inFlight_.erase(client);
  }
  if (!streamStatus.ok()) return streamStatus;
  if (stopped || cancelled_) return Status::Ok();
  if (!result) {
    return TANDEM_ERROR(StatusCode::kUnavailable,
                        "watch " + collectionPath + ": " + httplib::to_string(result.error()) + " (" + config_.server + ")");
  }
  if (result->status != 200) return apiError(result->status, "WATCH", collectionPath, errorBody + pending);
  return Status::Ok();
}

std::string redactSecretValues(std::string text, const json& secret) {
  std::vector<std::string> values;
  auto collect = [&](const std::string& value) {
    // Values too short to be secret would blank out ordinary words of the message.
    if (value.size() < 4) return;
    // Also as quoted inside JSON text (a webhook may quote the request body): escaped, and escaped as Go
    // also escapes HTML characters. Forms that coincide are replaced twice, harmlessly.
    const std::string quoted = json(value).dump();
    const std::string escaped = quoted.substr(1, quoted.size() - 2);
    std::string goEscaped = escaped;
    for (const auto& [from, to] : {std::pair<std::string, std::string>{"<", "\\u003c"}, {">", "\\u003e"}, {"&", "\\u0026"}})
      replaceAll(goEscaped, from, to);
    values.insert(values.end(), {value, encodeBase64(value), escaped, goEscaped});
  };
  if (const auto plain = secret.find("stringData"); plain != secret.end() && plain->is_object())
    for (const auto& [key, value] : plain->items())
      if (value.is_string()) collect(value.get<std::string>());
  if (const auto encoded = secret.find("data"); encoded != secret.end() && encoded->is_object())
    for (const auto& [key, value] : encoded->items()) {
      if (!value.is_string()) continue;
      collect(value.get<std::string>());
      if (auto decoded = decodeBase64(value.get<std::string>()); decoded.ok()) collect(*decoded);
    }
  // Longest first: a value that contains another is found whole before the shorter one cuts into it.
  std::sort(values.begin(), values.end(), [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  for (const std::string& value : values) replaceAll(text, value, "[redacted]");
  return text;
}

void KubeClient::cancel() {
  {
    std::lock_guard<std::mutex> lock(poolMutex_);
    cancelled_ = true;
  }
  cancelledWake_.notify_all();
  // httplib's stop() only interrupts a request whose socket exists: a watch that was just starting
  // would stream on until its timeout (minutes), a request until the read timeout. Repeat until every
  // one has returned.
  for (;;) {
    std::vector<std::shared_ptr<httplib::ClientImpl>> running;
    {
      std::lock_guard<std::mutex> lock(poolMutex_);
      if (inFlight_.empty()) return;
      running.assign(inFlight_.begin(), inFlight_.end());
    }
    for (const auto& client : running) client->stop();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace tandem::kube
