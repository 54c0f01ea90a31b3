// The operator's runtime pieces that need no API server: kubeconfig loading, the REST client against a
// local HTTP server (retries, error mapping, paging, watch streams), JSON <-> reconcile values, the
// Controller's executor over a fake API server (delete preconditions, 409 as done, the first failure
// stopping the plan), and the work queue's semantics.
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>

#include "tandem/kube/client.h"
#include "tandem/kube/config.h"
#include "tandem/operator/api_convert.h"
#include "tandem/operator/controller.h"
#include "tandem/operator/event_recorder.h"
#include "tandem/operator/informer.h"
#include "tandem/operator/leader_election.h"
#include "tandem/operator/work_queue.h"

namespace tandem {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;
using operator_core::WorkQueue;

std::filesystem::path tempDir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("tandem-operator-test-" + name + "-" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

void writeFile(const std::filesystem::path& path, const std::string& text) { std::ofstream(path) << text; }

// ---------------------------------------------------------------------------------------------- config

TEST(KubeConfig, DecodesBase64WithAndWithoutPadding) {
  EXPECT_EQ(kube::decodeBase64("aGVsbG8=").value(), "hello");
  EXPECT_EQ(kube::decodeBase64("aGVsbG8h").value(), "hello!");
  EXPECT_EQ(kube::decodeBase64("aGk=").value(), "hi");
  EXPECT_EQ(kube::decodeBase64("aA==").value(), "h");
  EXPECT_EQ(kube::decodeBase64("aGVs\nbG8=").value(), "hello");
  EXPECT_FALSE(kube::decodeBase64("abc").ok());
}

TEST(KubeConfig, EncodesBase64AsDecodeReadsIt) {
  for (const std::string& bytes : std::vector<std::string>{"", "a", "ab", "abc", "abcd", std::string("\0\xff\x10token", 8)}) {
    const std::string encoded = kube::encodeBase64(bytes);
    EXPECT_EQ(encoded.size() % 4, 0u) << encoded;
    auto decoded = kube::decodeBase64(encoded);
    ASSERT_TRUE(decoded.ok()) << decoded.status().message();
    EXPECT_EQ(*decoded, bytes);
  }
  EXPECT_EQ(kube::encodeBase64("token"), "dG9rZW4=");
}

TEST(KubeSecrets, RefusalMessagesLoseEveryValueOfTheSecretPlainOrEncoded) {
  const std::string token = "5f0c1d2e3a4b5c6d7e8f9a0b1c2d3e4f";
  const json secret = {{"kind", "Secret"},
                       {"metadata", {{"name", "job-rendezvous"}}},
                       {"stringData", {{"token", token}}},
                       {"data", {{"extra", kube::encodeBase64("hunter22")}}}};
  const std::string message = "admission webhook \"deny.example\" denied the request: Secret job-rendezvous: token " + token +
                              " (data.token: " + kube::encodeBase64(token) + "), extra hunter22 / " +
                              kube::encodeBase64("hunter22") + "; exceeded quota: secrets=1";
  const std::string redacted = kube::redactSecretValues(message, secret);
  for (const std::string& value : {token, kube::encodeBase64(token), std::string("hunter22"), kube::encodeBase64("hunter22")})
    EXPECT_EQ(redacted.find(value), std::string::npos) << redacted;
  EXPECT_EQ(redacted,
            "admission webhook \"deny.example\" denied the request: Secret job-rendezvous: token [redacted] (data.token: "
            "[redacted]), extra [redacted] / [redacted]; exceeded quota: secrets=1");
  // Other objects' messages, and a Secret without values, pass unchanged.
  EXPECT_EQ(kube::redactSecretValues("exceeded quota: secrets=1", json{{"kind", "Secret"}}), "exceeded quota: secrets=1");
}

TEST(KubeConfig, ReadsTheCurrentContextWithRelativeFilesAndInlineData) {
  const auto dir = tempDir("kubeconfig");
  writeFile(dir / "ca.crt", "CA PEM");
  writeFile(dir / "config", R"(apiVersion: v1
kind: Config
current-context: prod
contexts:
  - {name: dev, context: {cluster: dev, user: dev}}
  - {name: prod, context: {cluster: prod, user: admin, namespace: training}}
clusters:
  - {name: dev, cluster: {server: "https://dev:6443"}}
  - {name: prod, cluster: {server: "https://10.0.0.1:6443", certificate-authority: ca.crt}}
users:
  - {name: dev, user: {token: dev-token}}
  - name: admin
    user:
      client-certificate-data: Q0VSVA==
      client-key-data: S0VZ
)");
  auto config = kube::loadKubeconfig((dir / "config").string());
  ASSERT_TRUE(config.ok()) << config.status().message();
  EXPECT_EQ(config->server, "https://10.0.0.1:6443");
  EXPECT_EQ(config->caPem, "CA PEM");
  EXPECT_EQ(config->clientCertPem, "CERT");
  EXPECT_EQ(config->clientKeyPem, "KEY");
  EXPECT_EQ(config->nameSpace, "training");

  auto dev = kube::loadKubeconfig((dir / "config").string(), "dev");
  ASSERT_TRUE(dev.ok());
  EXPECT_EQ(dev->token, "dev-token");
  EXPECT_EQ(dev->nameSpace, "default");
}

TEST(KubeConfig, ErrorsNameTheFileAndTheField) {
  const auto dir = tempDir("kubeconfig-bad");
  writeFile(dir / "config", R"(current-context: c
contexts: [{name: c, context: {cluster: missing, user: u}}]
clusters: [{name: other, cluster: {server: "https://x"}}]
users: [{name: u, user: {client-certificate-data: Q0VSVA==}}]
)");
  auto config = kube::loadKubeconfig((dir / "config").string());
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("no clusters entry named \"missing\""), std::string::npos);
  EXPECT_NE(config.status().message().find((dir / "config").string()), std::string::npos);

  writeFile(dir / "config2", R"(current-context: c
contexts: [{name: c, context: {cluster: k, user: u}}]
clusters: [{name: k, cluster: {server: "https://x"}}]
users: [{name: u, user: {client-certificate-data: Q0VSVA==}}]
)");
  auto halfCert = kube::loadKubeconfig((dir / "config2").string());
  ASSERT_FALSE(halfCert.ok());
  EXPECT_NE(halfCert.status().message().find("client-certificate and client-key go together"), std::string::npos);
  EXPECT_FALSE(kube::loadKubeconfig((dir / "absent").string()).ok());
}

TEST(KubeConfig, InClusterNeedsTheServiceEnvironment) {
  const auto dir = tempDir("in-cluster");
  writeFile(dir / "token", "sa-token\n");
  writeFile(dir / "ca.crt", "CA");
  writeFile(dir / "namespace", "tandem-system\n");
  setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1", 1);
  setenv("KUBERNETES_SERVICE_PORT", "443", 1);
  auto config = kube::loadInCluster(dir.string());
  unsetenv("KUBERNETES_SERVICE_HOST");
  unsetenv("KUBERNETES_SERVICE_PORT");
  ASSERT_TRUE(config.ok()) << config.status().message();
  EXPECT_EQ(config->server, "https://10.96.0.1:443");
  EXPECT_EQ(config->tokenFile, (dir / "token").string());
  EXPECT_EQ(config->caPem, "CA");
  EXPECT_EQ(config->nameSpace, "tandem-system");
  EXPECT_FALSE(kube::loadInCluster(dir.string()).ok());
}

// ---------------------------------------------------------------------------------------------- client

// A local HTTP server on a free port, serving until destroyed.
class LocalServer {
 public:
  LocalServer() {
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    while (!server_.is_running()) std::this_thread::sleep_for(1ms);
  }
  ~LocalServer() {
    server_.stop();
    thread_.join();
  }
  httplib::Server& server() { return server_; }
  kube::KubeConfig config() const {
    kube::KubeConfig config;
    config.server = "http://127.0.0.1:" + std::to_string(port_);
    return config;
  }

 private:
  httplib::Server server_;
  int port_ = 0;
  std::thread thread_;
};

kube::RetryPolicy fastRetries() { return kube::RetryPolicy{5, 5ms, 20ms}; }

TEST(KubeClient, RetriesServerErrorsAndSendsTheToken) {
  LocalServer local;
  std::atomic<int> calls{0};
  std::string authorization;
  local.server().Get("/api/v1/namespaces/ns/pods/p", [&](const httplib::Request& request, httplib::Response& response) {
    authorization = request.get_header_value("Authorization");
    if (++calls < 3) {
      response.status = 503;
      response.set_content(R"({"kind":"Status","reason":"ServiceUnavailable","message":"busy"})", "application/json");
      return;
    }
    response.set_content(R"({"kind":"Pod","metadata":{"name":"p"}})", "application/json");
  });
  auto config = local.config();
  config.token = "secret-token";
  kube::KubeClient client(config, fastRetries());
  auto pod = client.get("/api/v1/namespaces/ns/pods/p");
  ASSERT_TRUE(pod.ok()) << pod.status().message();
  EXPECT_EQ((*pod)["metadata"]["name"], "p");
  EXPECT_EQ(calls.load(), 3);
  EXPECT_EQ(authorization, "Bearer secret-token");
}

TEST(KubeClient, GivesUpAfterTheLastAttemptWithTheServersMessage) {
  LocalServer local;
  std::atomic<int> calls{0};
  local.server().Get("/x", [&](const httplib::Request&, httplib::Response& response) {
    ++calls;
    response.status = 500;
    response.set_content(R"({"kind":"Status","reason":"InternalError","message":"etcd is down"})", "application/json");
  });
  kube::KubeClient client(local.config(), fastRetries());
  auto result = client.get("/x");
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(calls.load(), 5);
  EXPECT_EQ(result.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(result.status().message().find("etcd is down"), std::string::npos);
}

TEST(KubeClient, MapsApiErrorsWithoutRetrying) {
  LocalServer local;
  std::atomic<int> calls{0};
  auto reply = [&](int code, const std::string& reason) {
    return [&calls, code, reason](const httplib::Request&, httplib::Response& response) {
      ++calls;
      response.status = code;
      response.set_content(json{{"kind", "Status"}, {"reason", reason}, {"message", reason + " happened"}, {"code", code}}.dump(),
                           "application/json");
    };
  };
  local.server().Post("/exists", reply(409, "AlreadyExists"));
  local.server().Put("/conflict", reply(409, "Conflict"));
  local.server().Get("/missing", reply(404, "NotFound"));
  local.server().Get("/gone", reply(410, "Expired"));
  local.server().Post("/invalid", reply(422, "Invalid"));
  local.server().Get("/forbidden", reply(403, "Forbidden"));
  kube::KubeClient client(local.config(), fastRetries());
  EXPECT_TRUE(kube::isAlreadyExists(client.create("/exists", json::object()).status()));
  EXPECT_TRUE(kube::isConflict(client.update("/conflict", json::object()).status()));
  EXPECT_TRUE(kube::isNotFound(client.get("/missing").status()));
  EXPECT_TRUE(kube::isGone(client.get("/gone").status()));
  auto invalid = client.create("/invalid", json::object());
  EXPECT_EQ(invalid.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(invalid.status().message().find("Invalid happened"), std::string::npos);
  EXPECT_EQ(client.get("/forbidden").status().code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(calls.load(), 6);  // one call each: none of these is retried
}

TEST(KubeClient, PatchesAndDeletesSendTheirContentTypesAndOptions) {
  LocalServer local;
  std::vector<std::string> seen;
  local.server().Patch("/o", [&](const httplib::Request& request, httplib::Response& response) {
    seen.push_back(request.get_header_value("Content-Type") + " " + request.body);
    response.set_content(request.body, "application/json");
  });
  local.server().Delete("/o", [&](const httplib::Request& request, httplib::Response& response) {
    seen.push_back(request.body);
    response.set_content(R"({"kind":"Status","status":"Success"})", "application/json");
  });
  kube::KubeClient client(local.config(), fastRetries());
  ASSERT_TRUE(client.mergePatch("/o", {{"spec", {{"suspend", true}}}}).ok());
  ASSERT_TRUE(client.jsonPatch("/o", json::array({{{"op", "remove"}, {"path", "/a"}}})).ok());
  kube::DeleteOptions options;
  options.gracePeriodSeconds = 0;
  options.propagationPolicy = "Background";
  options.preconditionUid = "u-1";
  ASSERT_TRUE(client.remove("/o", options).ok());
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[0], R"(application/merge-patch+json {"spec":{"suspend":true}})");
  EXPECT_EQ(seen[1], R"(application/json-patch+json [{"op":"remove","path":"/a"}])");
  const json deleteOptions = json::parse(seen[2]);
  EXPECT_EQ(deleteOptions["gracePeriodSeconds"], 0);
  EXPECT_EQ(deleteOptions["propagationPolicy"], "Background");
  EXPECT_EQ(deleteOptions["preconditions"]["uid"], "u-1");
}

TEST(KubeClient, HonoursRetryAfterOn429) {
  LocalServer local;
  std::atomic<int> calls{0};
  local.server().Get("/limited", [&](const httplib::Request&, httplib::Response& response) {
    if (++calls == 1) {
      response.status = 429;
      response.set_header("Retry-After", "1");
      return;
    }
    response.set_content("{}", "application/json");
  });
  kube::KubeClient client(local.config(), fastRetries());
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(client.get("/limited").ok());
  EXPECT_GE(std::chrono::steady_clock::now() - start, 950ms);
  EXPECT_EQ(calls.load(), 2);
}

TEST(KubeClient, ListFollowsContinueTokensAndEscapesSelectors) {
  LocalServer local;
  std::vector<std::string> selectors;
  local.server().Get("/api/v1/pods", [&](const httplib::Request& request, httplib::Response& response) {
    selectors.push_back(request.get_param_value("labelSelector"));
    const bool first = request.get_param_value("continue").empty();
    json page = {{"kind", "PodList"},
                 {"metadata", {{"resourceVersion", first ? "10" : "11"}, {"continue", first ? "next" : ""}}},
                 {"items", json::array({{{"metadata", {{"name", first ? "a" : "b"}}}}})}};
    response.set_content(page.dump(), "application/json");
  });
  kube::KubeClient client(local.config(), fastRetries());
  auto listed = client.list("/api/v1/pods", {"tandem.dev/job in (a,b),!x", "", 1});
  ASSERT_TRUE(listed.ok()) << listed.status().message();
  ASSERT_EQ(listed->items.size(), 2u);
  EXPECT_EQ(listed->items[1]["metadata"]["name"], "b");
  EXPECT_EQ(listed->resourceVersion, "11");
  EXPECT_EQ(selectors, (std::vector<std::string>{"tandem.dev/job in (a,b),!x", "tandem.dev/job in (a,b),!x"}));
}

TEST(KubeClient, WatchParsesEventsSplitAcrossChunksAndReports410) {
  LocalServer local;
  std::string sentVersion;
  local.server().Get("/api/v1/pods", [&](const httplib::Request& request, httplib::Response& response) {
    sentVersion = request.get_param_value("resourceVersion");
    EXPECT_EQ(request.get_param_value("watch"), "1");
    EXPECT_EQ(request.get_param_value("allowWatchBookmarks"), "true");
    response.set_chunked_content_provider("application/json", [](size_t, httplib::DataSink& sink) {
      const std::string stream =
          R"({"type":"ADDED","object":{"metadata":{"name":"a","resourceVersion":"5"}}})" "\n"
          R"({"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"7"}}})" "\n"
          R"J({"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired","message":"too old resource version: 1 (7)"}})J" "\n";
      // Uneven pieces, so that lines straddle chunk boundaries.
      for (size_t at = 0; at < stream.size(); at += 17) sink.write(stream.data() + at, std::min<size_t>(17, stream.size() - at));
      sink.done();
      return true;
    });
  });
  kube::KubeClient client(local.config(), fastRetries());
  std::vector<std::string> seen;
  Status status = client.watch("/api/v1/pods", {}, "4", 30, [&](const kube::WatchEvent& event) {
    seen.push_back(event.type + ":" + event.object["metadata"].value("resourceVersion", ""));
    return true;
  });
  EXPECT_EQ(sentVersion, "4");
  EXPECT_EQ(seen, (std::vector<std::string>{"ADDED:5", "BOOKMARK:7"}));
  EXPECT_TRUE(kube::isGone(status)) << status.message();
  EXPECT_NE(status.message().find("too old resource version"), std::string::npos);
}

TEST(KubeClient, CancelAtAnyMomentEndsAWatchAtOnce) {
  LocalServer local;
  // A watch stream with nothing to say for 20 s (the server's own timeout would end it).
  local.server().Get("/api/v1/pods", [](const httplib::Request&, httplib::Response& response) {
    response.set_chunked_content_provider("application/json", [](size_t, httplib::DataSink& sink) {
      for (int waited = 0; waited < 2000 && sink.is_writable(); ++waited) std::this_thread::sleep_for(10ms);
      sink.done();
      return true;
    });
  });
  // Cancelled before the watch starts, while it connects, and while it streams.
  for (const auto delay : {0ms, 1ms, 5ms, 50ms, 200ms}) {
    kube::KubeClient client(local.config(), fastRetries());
    std::atomic<bool> returned{false};
    std::thread watcher([&] {
      (void)client.watch("/api/v1/pods", {}, "1", 30, [](const kube::WatchEvent&) { return true; });
      returned = true;
    });
    std::this_thread::sleep_for(delay);
    const auto cancelled = std::chrono::steady_clock::now();
    client.cancel();
    while (!returned && std::chrono::steady_clock::now() - cancelled < 3s) std::this_thread::sleep_for(5ms);
    EXPECT_TRUE(returned) << "cancelled after " << delay.count() << " ms: the watch went on streaming";
    watcher.join();
  }
}

TEST(KubeClient, CancelEndsARequestWaitingOnAStalledServerAndABackoff) {
  std::atomic<bool> testOver{false};  // outlives the server, whose handler it ends
  LocalServer local;
  // A server that accepts and then says nothing for 20 s (the client's read timeout is 30 s).
  local.server().Get("/stalled", [&](const httplib::Request&, httplib::Response& response) {
    for (int waited = 0; waited < 2000 && !testOver; ++waited) std::this_thread::sleep_for(10ms);
    response.set_content("{}", "application/json");
  });
  // And one that is always busy, so the client sleeps between retries (up to 10 s here).
  local.server().Get("/busy", [](const httplib::Request&, httplib::Response& response) {
    response.status = 503;
    response.set_content(R"({"kind":"Status","message":"busy"})", "application/json");
  });
  for (const std::string path : {"/stalled", "/busy"}) {
    kube::KubeClient client(local.config(), kube::RetryPolicy{5, 10s, 10s});
    std::atomic<bool> returned{false};
    Status status;
    std::thread caller([&] {
      status = client.get(path).status();
      returned = true;
    });
    std::this_thread::sleep_for(300ms);  // into the read, or into the first backoff
    ASSERT_FALSE(returned) << path;
    const auto cancelled = std::chrono::steady_clock::now();
    client.cancel();
    while (!returned && std::chrono::steady_clock::now() - cancelled < 3s) std::this_thread::sleep_for(5ms);
    EXPECT_TRUE(returned) << path << ": the call went on waiting after cancel()";
    caller.join();
    EXPECT_EQ(status.code(), StatusCode::kCancelled) << path << ": " << status.toString();
    EXPECT_NE(status.message().find("GET " + path + ": client shut down"), std::string::npos) << status.message();
    // Later calls fail at once.
    EXPECT_EQ(client.get("/busy").status().code(), StatusCode::kCancelled);
  }
  testOver = true;
}

TEST(KubeSecrets, TheClientNeverPutsASecretsValueInAnError) {
  LocalServer local;
  const std::string token = "0123456789abcdef0123456789abcdef";
  // A webhook that quotes the request: as JSON (422), and as plain text whose first 300 characters, all
  // a message keeps, end inside the token (500, retried and logged on every attempt).
  local.server().Post("/api/v1/namespaces/ns/secrets", [&](const httplib::Request& request, httplib::Response& response) {
    if (request.body.find("\"quote") != std::string::npos) {
      response.status = 422;
      response.set_content(json{{"kind", "Status"}, {"reason", "Invalid"}, {"message", "denied: " + request.body}}.dump(),
                           "application/json");
    } else {
      response.status = 500;
      response.set_content(std::string(288, '.') + " token " + token + " " + kube::encodeBase64(token), "text/plain");
    }
  });
  kube::KubeClient client(local.config(), fastRetries());
  json secret = {{"apiVersion", "v1"}, {"kind", "Secret"}, {"metadata", {{"name", "quote"}}}, {"stringData", {{"token", token}}}};
  const Status invalid = client.create("/api/v1/namespaces/ns/secrets", secret).status();
  EXPECT_EQ(invalid.code(), StatusCode::kInvalidArgument) << invalid.toString();
  EXPECT_NE(invalid.message().find("denied: "), std::string::npos) << invalid.message();
  EXPECT_NE(invalid.message().find("[redacted]"), std::string::npos) << invalid.message();
  secret["metadata"]["name"] = "plain";
  const Status failed = client.create("/api/v1/namespaces/ns/secrets", secret).status();
  EXPECT_EQ(failed.code(), StatusCode::kUnavailable) << failed.toString();
  // A value with characters that JSON escapes (a PEM key's newlines, quotes) is quoted escaped.
  const std::string pem = "-----BEGIN KEY-----\n\"abc<def>\"\n-----END KEY-----";
  json pemSecret = {{"kind", "Secret"}, {"metadata", {{"name", "quote-pem"}}}, {"stringData", {{"key", pem}}}};
  const Status pemInvalid = client.create("/api/v1/namespaces/ns/secrets", pemSecret).status();
  EXPECT_EQ(pemInvalid.code(), StatusCode::kInvalidArgument) << pemInvalid.toString();
  EXPECT_EQ(pemInvalid.message().find("abc<def>"), std::string::npos) << pemInvalid.message();
  for (const Status& status : {invalid, failed})
    for (const std::string& leak : {token, token.substr(0, 4), kube::encodeBase64(token)})
      EXPECT_EQ(status.message().find(leak), std::string::npos) << leak << " in " << status.message();
}

TEST(KubeClient, ReReadsARotatedTokenFile) {
  LocalServer local;
  std::vector<std::string> tokens;
  local.server().Get("/x", [&](const httplib::Request& request, httplib::Response& response) {
    tokens.push_back(request.get_header_value("Authorization"));
    response.set_content("{}", "application/json");
  });
  const auto dir = tempDir("token");
  writeFile(dir / "token", "first\n");
  auto config = local.config();
  config.tokenFile = (dir / "token").string();
  kube::KubeClient client(config, fastRetries());
  ASSERT_TRUE(client.get("/x").ok());
  writeFile(dir / "token", "second\n");
  // mtime has a one-second resolution on some filesystems: make the change visible.
  std::filesystem::last_write_time(dir / "token", std::filesystem::last_write_time(dir / "token") + 2s);
  ASSERT_TRUE(client.get("/x").ok());
  EXPECT_EQ(tokens, (std::vector<std::string>{"Bearer first", "Bearer second"}));
}

TEST(KubeClient, ConnectionRefusedIsUnavailableAfterRetries) {
  kube::KubeConfig config;
  config.server = "http://127.0.0.1:1";
  kube::KubeClient client(config, kube::RetryPolicy{2, 1ms, 2ms});
  auto result = client.get("/x");
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(result.status().message().find("127.0.0.1:1"), std::string::npos);
}

TEST(Informer, ListsWatchesAndNeverRevivesAnObjectTheWatchDeleted) {
  LocalServer local;
  std::atomic<int> watches{0};
  local.server().Get("/api/v1/pods", [&](const httplib::Request& request, httplib::Response& response) {
    if (request.get_param_value("watch") != "1") {
      response.set_content(R"({"kind":"PodList","metadata":{"resourceVersion":"5"},
        "items":[{"metadata":{"name":"a","namespace":"ns","resourceVersion":"5","managedFields":[{"manager":"x"}]}}]})",
                           "application/json");
      return;
    }
    if (++watches == 1) {
      EXPECT_EQ(request.get_param_value("resourceVersion"), "5");
      response.set_content(R"({"type":"DELETED","object":{"metadata":{"name":"a","namespace":"ns","resourceVersion":"7"}}})" "\n",
                           "application/json");
      return;
    }
    std::this_thread::sleep_for(100ms);  // later watches: quiet streams the server ends
    response.set_content("", "application/json");
  });
  kube::KubeClient client(local.config(), fastRetries());
  std::vector<std::string> seen;
  std::mutex seenMutex;
  operator_core::Informer informer(client, {"pods", "/api/v1/pods", "", 10, operator_core::trimMetadata, false, {}},
                                   [&](const json& object, bool deleted) {
                                     std::lock_guard<std::mutex> lock(seenMutex);
                                     seen.push_back(std::string(deleted ? "-" : "+").append(object["metadata"].value("name", "")));
                                   });
  informer.start();
  ASSERT_TRUE(informer.waitForSync(5s));
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (informer.get("ns/a") && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
  EXPECT_FALSE(informer.get("ns/a").has_value());
  // A DELETE's response (older than the deletion) arriving late must not bring the object back...
  informer.upsertIfNewer(json::parse(R"({"metadata":{"name":"a","namespace":"ns","resourceVersion":"6"}})"));
  EXPECT_FALSE(informer.get("ns/a").has_value());
  // ...but a new object of the same name (a newer version) is taken.
  informer.upsertIfNewer(json::parse(R"({"metadata":{"name":"a","namespace":"ns","resourceVersion":"9"}})"));
  ASSERT_TRUE(informer.get("ns/a").has_value());
  EXPECT_FALSE(informer.get("ns/a")->at("metadata").contains("managedFields"));
  client.cancel();
  informer.stop();
  std::lock_guard<std::mutex> lock(seenMutex);
  EXPECT_EQ(seen, (std::vector<std::string>{"+a", "-a"}));
}

TEST(Informer, TheDeletionOfAnObjectLeavesANewerOneOfTheSameNameCached) {
  LocalServer local;
  std::atomic<int> watches{0};
  std::atomic<bool> replaced{false};
  local.server().Get("/api/v1/pods", [&](const httplib::Request& request, httplib::Response& response) {
    if (request.get_param_value("watch") != "1") {
      response.set_content(R"({"kind":"PodList","metadata":{"resourceVersion":"5"},
        "items":[{"metadata":{"name":"a","namespace":"ns","uid":"old","resourceVersion":"5"}}]})", "application/json");
      return;
    }
    if (++watches == 1) {
      // The old pod's DELETED event comes after the new pod (same name) was cached from its create.
      for (int i = 0; i < 500 && !replaced; ++i) std::this_thread::sleep_for(10ms);
      response.set_content(
          R"({"type":"DELETED","object":{"metadata":{"name":"a","namespace":"ns","uid":"old","resourceVersion":"7"}}})" "\n",
          "application/json");
      return;
    }
    std::this_thread::sleep_for(100ms);
    response.set_content("", "application/json");
  });
  kube::KubeClient client(local.config(), fastRetries());
  std::atomic<int> deletions{0};
  operator_core::Informer informer(client, {"pods", "/api/v1/pods", "", 10, operator_core::trimMetadata, false, {}},
                                   [&](const json&, bool deleted) { deletions += deleted ? 1 : 0; });
  informer.start();
  ASSERT_TRUE(informer.waitForSync(5s));
  informer.upsertIfNewer(json::parse(R"({"metadata":{"name":"a","namespace":"ns","uid":"new","resourceVersion":"8"}})"));
  replaced = true;
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (deletions == 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
  EXPECT_EQ(deletions, 1);
  const auto cached = informer.get("ns/a");
  ASSERT_TRUE(cached.has_value()) << "the new pod was dropped with the old one";
  EXPECT_EQ(cached->at("metadata").value("uid", ""), "new");
  client.cancel();
  informer.stop();
}

TEST(Informer, IndexesFollowListsUpdatesAndDeletions) {
  LocalServer local;
  std::atomic<int> watches{0};
  auto pod = [](const char* name, const char* job, const char* node, int version) {
    return json{{"metadata", {{"name", name}, {"namespace", "ns"}, {"resourceVersion", std::to_string(version)},
                              {"labels", {{"tandem.dev/job", job}}}}},
                {"spec", {{"nodeName", node}}}};
  };
  local.server().Get("/api/v1/pods", [&](const httplib::Request& request, httplib::Response& response) {
    if (request.get_param_value("watch") != "1") {
      const json list = {{"kind", "PodList"}, {"metadata", {{"resourceVersion", "5"}}},
                         {"items", {pod("a", "j1", "n1", 3), pod("b", "j1", "n2", 4), pod("c", "j2", "n1", 5)}}};
      response.set_content(list.dump(), "application/json");
      return;
    }
    if (++watches == 1) {  // b moves to n1, then a is deleted
      response.set_content(json{{"type", "MODIFIED"}, {"object", pod("b", "j1", "n1", 7)}}.dump() + "\n" +
                               json{{"type", "DELETED"}, {"object", pod("a", "j1", "n1", 8)}}.dump() + "\n",
                           "application/json");
      return;
    }
    std::this_thread::sleep_for(100ms);
    response.set_content("", "application/json");
  });
  kube::KubeClient client(local.config(), fastRetries());
  std::atomic<bool> watchedAll{false};
  operator_core::Informer::Options options{"pods", "/api/v1/pods", "", 10, operator_core::trimMetadata, false, {}};
  options.indexers["job"] = [](const json& object) {
    return object["metadata"]["labels"].value("tandem.dev/job", std::string());
  };
  options.indexers["node"] = [](const json& object) { return object["spec"].value("nodeName", std::string()); };
  operator_core::Informer informer(client, options, [&](const json& object, bool deleted) {
    if (deleted && object["metadata"]["name"] == "a") watchedAll = true;
  });
  auto names = [&](const char* index, const char* value) {
    std::vector<std::string> out;
    for (const json& object : informer.listByIndex(index, value)) out.push_back(object["metadata"]["name"]);
    return out;
  };
  informer.start();
  ASSERT_TRUE(informer.waitForSync(5s));
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (!watchedAll && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
  ASSERT_TRUE(watchedAll);
  EXPECT_EQ(names("job", "j1"), (std::vector<std::string>{"b"}));
  EXPECT_EQ(names("job", "j2"), (std::vector<std::string>{"c"}));
  EXPECT_EQ(names("node", "n1"), (std::vector<std::string>{"b", "c"}));
  EXPECT_TRUE(names("node", "n2").empty());  // b left it
  EXPECT_TRUE(names("nodes", "n1").empty());  // no such index
  // A write's newer response re-indexes the object; an older one changes nothing.
  informer.upsertIfNewer(pod("c", "j2", "n2", 9));
  informer.upsertIfNewer(pod("b", "j1", "n2", 6));
  EXPECT_EQ(names("node", "n1"), (std::vector<std::string>{"b"}));
  EXPECT_EQ(names("node", "n2"), (std::vector<std::string>{"c"}));
  client.cancel();
  informer.stop();
}

// ---------------------------------------------------------------------------------------------- events

// An events endpoint that names what it creates job.1, job.2, ... and remembers every write.
struct EventsServer {
  LocalServer local;
  std::mutex mutex;
  std::vector<json> created;
  std::vector<std::pair<std::string, json>> patches;  // (event name, patch)
  std::atomic<int> patchFailure{0};  // an HTTP status the next patches fail with (0: they succeed)

  EventsServer() {
    local.server().Post("/api/v1/namespaces/ns/events", [this](const httplib::Request& request, httplib::Response& response) {
      std::lock_guard<std::mutex> lock(mutex);
      json event = json::parse(request.body);
      event["metadata"]["name"] = "job." + std::to_string(created.size() + 1);
      created.push_back(event);
      response.status = 201;
      response.set_content(event.dump(), "application/json");
    });
    local.server().Patch(R"(/api/v1/namespaces/ns/events/([^/]+))", [this](const httplib::Request& request,
                                                                           httplib::Response& response) {
      if (const int failure = patchFailure.load(); failure != 0) {
        response.status = failure;
        response.set_content(json{{"kind", "Status"}, {"code", failure}, {"message", "refused"}}.dump(), "application/json");
        return;
      }
      std::lock_guard<std::mutex> lock(mutex);
      patches.emplace_back(request.matches[1], json::parse(request.body));
      response.set_content("{}", "application/json");
    });
  }
};

operator_core::JobObject eventJob() {
  operator_core::JobObject job;
  job.nameSpace = "ns";
  job.name = "job";
  job.uid = "uid-1";
  return job;
}

TEST(EventRecorder, RepeatsBumpOneEventsCountAndNewMessagesGetTheirOwn) {
  EventsServer events;
  kube::KubeClient client(events.local.config(), fastRetries());
  operator_core::EventRecorder recorder(client, "replica-a");
  const operator_core::EmitEvent refused{operator_core::EventType::kWarning, "FailedCreate", "pod job-worker-0: quota"};
  for (int i = 0; i < 3; ++i) recorder.record(eventJob(), refused);
  recorder.record(eventJob(), {operator_core::EventType::kWarning, "FailedCreate", "pod job-worker-0: admission"});
  ASSERT_EQ(events.created.size(), 2u);
  EXPECT_EQ(events.created[0]["reason"], "FailedCreate");
  EXPECT_EQ(events.created[0]["type"], "Warning");
  EXPECT_EQ(events.created[0]["count"], 1);
  EXPECT_EQ(events.created[0]["involvedObject"]["uid"], "uid-1");
  EXPECT_EQ(events.created[0]["reportingInstance"], "replica-a");
  EXPECT_EQ(events.created[1]["message"], "pod job-worker-0: admission");
  ASSERT_EQ(events.patches.size(), 2u);
  EXPECT_EQ(events.patches[0].first, "job.1");
  EXPECT_EQ(events.patches[0].second["count"], 2);
  EXPECT_EQ(events.patches[1].second["count"], 3);
  EXPECT_TRUE(events.patches[1].second.contains("lastTimestamp"));
  EXPECT_EQ(recorder.remembered(), 2u);
  // Another job with the same words is another Event.
  operator_core::JobObject other = eventJob();
  other.uid = "uid-2";
  recorder.record(other, refused);
  EXPECT_EQ(events.created.size(), 3u);
}

TEST(EventRecorder, AnEventGoneFromTheServerOrOlderThanTheWindowIsWrittenAfresh) {
  EventsServer events;
  kube::KubeClient client(events.local.config(), fastRetries());
  const operator_core::EmitEvent event{operator_core::EventType::kNormal, "CreatedWorkers", "created 2 pods"};
  {
    operator_core::EventRecorder recorder(client, "replica-a");
    recorder.record(eventJob(), event);
    events.patchFailure = 404;  // the API server's event TTL removed it
    recorder.record(eventJob(), event);
    EXPECT_EQ(events.created.size(), 2u);
    events.patchFailure = 403;  // any other failure: uncounted, but never a duplicate
    recorder.record(eventJob(), event);
    EXPECT_EQ(events.created.size(), 2u);
    events.patchFailure = 0;
    recorder.record(eventJob(), event);  // the new one is bumped
    ASSERT_EQ(events.patches.size(), 1u);
    EXPECT_EQ(events.patches[0].first, "job.2");
  }
  operator_core::EventRecorder forgetful(client, "replica-a", std::chrono::seconds(0));
  forgetful.record(eventJob(), event);
  std::this_thread::sleep_for(2ms);
  forgetful.record(eventJob(), event);
  EXPECT_EQ(events.created.size(), 4u);
  EXPECT_EQ(events.patches.size(), 1u);
}

TEST(EventRecorder, LongMessagesAreCutToWhatTheApiKeeps) {
  EventsServer events;
  kube::KubeClient client(events.local.config(), fastRetries());
  operator_core::EventRecorder recorder(client, "replica-a");
  recorder.record(eventJob(), {operator_core::EventType::kWarning, "FailedCreate", std::string(5000, 'x')});
  ASSERT_EQ(events.created.size(), 1u);
  const std::string message = events.created[0]["message"];
  EXPECT_EQ(message.size(), 1024u);
  EXPECT_EQ(message.substr(1021), "...");
  // Two-byte characters: the cut falls between characters, never inside one (JSON needs valid UTF-8).
  std::string accents;
  for (int i = 0; i < 600; ++i) accents += "\xC3\xA9";  // U+00E9
  recorder.record(eventJob(), {operator_core::EventType::kWarning, "FailedCreate", accents});
  ASSERT_EQ(events.created.size(), 2u);
  const std::string cut = events.created[1]["message"];
  EXPECT_EQ(cut.size(), 1023u);  // byte 1021 continues a character: 510 characters, "..."
  EXPECT_EQ(cut.substr(cut.size() - 5), "\xC3\xA9...");
}

// ---------------------------------------------------------------------------------------------- leases

// Lease ns/tandem-operator as the API server returns it: held by "me", renewed now.
json leaseHeldByMe(int durationSeconds) {
  return {{"apiVersion", "coordination.k8s.io/v1"}, {"kind", "Lease"},
          {"metadata", {{"name", "tandem-operator"}, {"namespace", "ns"}, {"resourceVersion", "7"}}},
          {"spec", {{"holderIdentity", "me"}, {"leaseDurationSeconds", durationSeconds},
                    {"renewTime", operator_core::formatMicroTime(std::chrono::system_clock::now())}}}};
}

operator_core::LeaderElectionOptions electionAsMe(std::chrono::milliseconds leaseDuration,
                                                  std::chrono::milliseconds renewDeadline,
                                                  std::chrono::milliseconds retryPeriod) {
  operator_core::LeaderElectionOptions options;
  options.nameSpace = "ns";
  options.identity = "me";
  options.leaseDuration = leaseDuration;
  options.renewDeadline = renewDeadline;
  options.retryPeriod = retryPeriod;
  return options;
}

TEST(LeaderElector, AStalledRenewalIsNoticedWhileItIsStillWaiting) {
  LocalServer local;
  const std::string path = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/tandem-operator";
  std::atomic<bool> stall{false};
  local.server().Get(path, [&](const httplib::Request&, httplib::Response& response) {
    response.set_content(leaseHeldByMe(1).dump(), "application/json");
  });
  local.server().Put(path, [&](const httplib::Request& request, httplib::Response& response) {
    if (stall) std::this_thread::sleep_for(2s);  // an API server that stopped answering
    response.set_content(request.body, "application/json");
  });
  kube::KubeClient client(local.config(), fastRetries());
  auto options = electionAsMe(1000ms, 400ms, 100ms);
  std::atomic<bool> missed{false};
  options.onRenewDeadlineMissed = [&] { missed = true; };
  operator_core::LeaderElector elector(client, options);
  std::atomic<bool> stop{false};
  std::thread holder([&] { elector.holdUntil(stop); });
  std::this_thread::sleep_for(300ms);  // renewing fine
  EXPECT_FALSE(missed);
  stall = true;
  const auto stalled = std::chrono::steady_clock::now();
  while (!missed && std::chrono::steady_clock::now() - stalled < 1500ms) std::this_thread::sleep_for(10ms);
  EXPECT_TRUE(missed) << "the watchdog did not fire while the renewal hung";
  EXPECT_LT(std::chrono::steady_clock::now() - stalled, 1500ms);  // the hung call takes 2 s
  stop = true;  // the operator would have exited in the callback
  holder.join();
}

TEST(LeaderElector, AStopDuringAStalledRenewalCancelsItWithinASecond) {
  std::atomic<bool> stall{false};
  std::atomic<bool> testOver{false};  // outlives the server, whose stalled handler it ends
  LocalServer local;
  const std::string path = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/tandem-operator";
  local.server().Get(path, [&](const httplib::Request&, httplib::Response& response) {
    for (int waited = 0; stall && waited < 2000 && !testOver; ++waited) std::this_thread::sleep_for(10ms);
    response.set_content(leaseHeldByMe(60).dump(), "application/json");
  });
  local.server().Put(path, [&](const httplib::Request& request, httplib::Response& response) {
    response.set_content(request.body, "application/json");
  });
  kube::KubeClient client(local.config(), fastRetries());
  auto options = electionAsMe(60s, 30s, 100ms);  // the renew deadline is far away: only the stop ends the wait
  std::atomic<bool> missed{false};
  options.onRenewDeadlineMissed = [&] { missed = true; };
  operator_core::LeaderElector elector(client, options);
  std::atomic<bool> stop{false};
  std::atomic<bool> returned{false};
  bool stillLeading = false;
  std::thread holder([&] {
    stillLeading = elector.holdUntil(stop);
    returned = true;
  });
  std::this_thread::sleep_for(300ms);  // renewing fine
  stall = true;
  std::this_thread::sleep_for(300ms);  // a renewal now waits on the server (20 s)
  stop = true;
  const auto stopped = std::chrono::steady_clock::now();
  while (!returned && std::chrono::steady_clock::now() - stopped < 5s) std::this_thread::sleep_for(10ms);
  EXPECT_TRUE(returned) << "holdUntil waited on the stalled renewal";
  EXPECT_LT(std::chrono::steady_clock::now() - stopped, 3s);
  testOver = true;
  holder.join();
  EXPECT_TRUE(stillLeading);  // stopped, not deposed
  EXPECT_FALSE(missed);
  EXPECT_TRUE(client.cancelled());
}

TEST(LeaderElector, ReleaseClearsTheHolderAndGivesUpOnAStalledServer) {
  std::atomic<bool> stall{false};
  std::atomic<bool> testOver{false};  // outlives the server, whose stalled handler it ends
  LocalServer local;
  const std::string path = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/tandem-operator";
  std::mutex mutex;
  json stored = leaseHeldByMe(15);
  local.server().Get(path, [&](const httplib::Request&, httplib::Response& response) {
    for (int waited = 0; stall && waited < 2000 && !testOver; ++waited) std::this_thread::sleep_for(10ms);
    std::lock_guard<std::mutex> lock(mutex);
    response.set_content(stored.dump(), "application/json");
  });
  local.server().Put(path, [&](const httplib::Request& request, httplib::Response& response) {
    std::lock_guard<std::mutex> lock(mutex);
    stored = json::parse(request.body);
    response.set_content(request.body, "application/json");
  });
  const auto options = electionAsMe(15s, 10s, 2s);
  {
    kube::KubeClient client(local.config(), fastRetries());
    operator_core::LeaderElector(client, options).release(2s);
    std::lock_guard<std::mutex> lock(mutex);
    EXPECT_EQ(stored["spec"]["holderIdentity"], "");
    EXPECT_EQ(stored["spec"]["leaseDurationSeconds"], 1);
  }
  // An API server that stopped answering: release gives up after its bound (the read timeout is 30 s).
  stall = true;
  kube::KubeClient client(local.config(), fastRetries());
  const auto start = std::chrono::steady_clock::now();
  operator_core::LeaderElector(client, options).release(300ms);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
  EXPECT_TRUE(client.cancelled());
  testOver = true;
}

// ------------------------------------------------------------------------------------------ conversion

TEST(ApiConvert, TimesRoundTripAndAcceptFractionsAndOffsets) {
  const auto time = operator_core::parseTime("2026-11-27T04:05:06Z");
  ASSERT_TRUE(time.has_value());
  EXPECT_EQ(operator_core::formatTime(*time), "2026-11-27T04:05:06Z");
  EXPECT_EQ(operator_core::formatTime(*operator_core::parseTime("2026-11-27T06:05:06.250000+02:00")),
            "2026-11-27T04:05:06Z");
  EXPECT_FALSE(operator_core::parseTime("yesterday").has_value());
}

TEST(ApiConvert, StatusRoundTripsAndMergeKeepsForeignFields) {
  using namespace operator_core;
  JobStatus status;
  status.phase = JobPhase::kRunning;
  status.restarts = 2;
  status.preemptions = 1;
  status.generation = 3;
  status.observedGeneration = 4;
  status.startTime = parseTime("2026-11-27T04:00:00Z");
  status.workers = {1, 2, 3, 4};
  status.readyWorkers = 2;
  status.conditions.push_back({ConditionType::kCreated, false, "JobCreated", "created", *parseTime("2026-11-27T03:00:00Z")});
  status.conditions.push_back({ConditionType::kRunning, true, "AllWorkersRunning", "2 of 2", *parseTime("2026-11-27T04:00:00Z")});
  EXPECT_EQ(statusFromJson(statusToJson(status)), status);

  const json existing = {{"step", 120}, {"phase", "Succeeded"}, {"completionTime", "2026-11-27T05:00:00Z"}};
  const json merged = mergeStatus(existing, status);
  EXPECT_EQ(merged["step"], 120);
  EXPECT_EQ(merged["phase"], "Running");
  EXPECT_FALSE(merged.contains("completionTime"));  // ours, and unset now
  EXPECT_EQ(merged["conditions"][1]["status"], "True");
}

TEST(ApiConvert, PodsCarryExitCodesDisruptionsAndNodeLoss) {
  using namespace operator_core;
  const json pod = json::parse(R"({
    "metadata": {"name": "j-worker-1", "uid": "pod-uid", "labels": {"tandem.dev/job": "j", "tandem.dev/rank": "1"},
                 "ownerReferences": [{"uid": "other", "kind": "ReplicaSet", "controller": false},
                                     {"uid": "job-uid", "kind": "DistributedTrainingJob", "controller": true}],
                 "creationTimestamp": "2026-11-27T04:00:00Z", "deletionTimestamp": "2026-11-27T04:10:00Z"},
    "spec": {"nodeName": "n1", "containers": [{"name": "worker"}, {"name": "sidecar"}]},
    "status": {"phase": "Failed", "reason": "NodeLost",
               "conditions": [{"type": "Ready", "status": "False"},
                              {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
               "containerStatuses": [{"name": "sidecar", "state": {"terminated": {"exitCode": 0}}},
                                     {"name": "worker", "state": {"terminated": {"exitCode": 137, "signal": 9,
                                                                                  "finishedAt": "2026-11-27T04:05:00Z"}}}]}})");
  const ObservedPod observed = podFromJson(pod);
  EXPECT_EQ(observed.name, "j-worker-1");
  EXPECT_EQ(observed.uid, "pod-uid");  // each delete's precondition
  EXPECT_EQ(observed.labels.at("tandem.dev/rank"), "1");
  EXPECT_EQ(observed.controllerUid, "job-uid");
  EXPECT_EQ(observed.controllerKind, "DistributedTrainingJob");
  EXPECT_EQ(observed.phase, PodPhase::kFailed);
  EXPECT_FALSE(observed.ready);
  EXPECT_EQ(observed.exitCode, 137);  // the worker container's, not the sidecar's
  EXPECT_EQ(observed.signal, 9);
  EXPECT_EQ(observed.finishedAt, parseTime("2026-11-27T04:05:00Z"));
  EXPECT_EQ(observed.disruptionReason, "PreemptionByScheduler");
  EXPECT_TRUE(observed.nodeUnreachable);
  EXPECT_TRUE(observed.terminating());
  EXPECT_EQ(observed.nodeName, "n1");

  const ObservedPod pending = podFromJson(json::parse(R"({"metadata": {"name": "p"}})"));
  EXPECT_EQ(pending.phase, PodPhase::kPending);
  EXPECT_FALSE(pending.exitCode.has_value());
  EXPECT_TRUE(pending.waitingReason.empty());

  // A worker the kubelet cannot start: its container's waiting state, not a sidecar's.
  const ObservedPod waiting = podFromJson(json::parse(R"({
    "metadata": {"name": "j-worker-0"},
    "spec": {"containers": [{"name": "worker"}, {"name": "sidecar"}]},
    "status": {"phase": "Pending",
               "containerStatuses": [{"name": "sidecar", "state": {"waiting": {"reason": "ImagePullBackOff"}}},
                                     {"name": "worker", "state": {"waiting": {"reason": "CreateContainerConfigError",
                                       "message": "secret \"j-rendezvous-uid\" not found"}}}]}})"));
  EXPECT_EQ(waiting.waitingReason, "CreateContainerConfigError");
  EXPECT_EQ(waiting.waitingMessage, "secret \"j-rendezvous-uid\" not found");
  const ObservedPod running = podFromJson(json::parse(R"({"metadata": {"name": "j-worker-0"},
    "status": {"phase": "Running", "containerStatuses": [{"state": {"running": {"startedAt": "2026-11-27T04:01:00Z"}}}]}})"));
  EXPECT_TRUE(running.waitingReason.empty());
}

TEST(ApiConvert, ChildrenCarryTheirUidAndTheirController) {
  using namespace operator_core;
  const ObservedChild child = childFromJson(json::parse(R"({"metadata": {"name": "j-config", "uid": "cm-uid",
    "deletionTimestamp": "2026-11-27T04:10:00Z",
    "ownerReferences": [{"uid": "job-uid", "kind": "DistributedTrainingJob", "controller": true}]}})"));
  EXPECT_EQ(child.name, "j-config");
  EXPECT_EQ(child.uid, "cm-uid");  // TTL clean-up's delete precondition
  EXPECT_EQ(child.controllerUid, "job-uid");
  EXPECT_EQ(child.deletionTimestamp, parseTime("2026-11-27T04:10:00Z"));
}

TEST(ApiConvert, NodesAreUnreachableByReadyUnknownOrTheUnreachableTaint) {
  using operator_core::nodeUnreachable;
  EXPECT_FALSE(nodeUnreachable(json::parse(R"({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})")));
  EXPECT_FALSE(nodeUnreachable(json::parse(R"({"status": {"conditions": [{"type": "Ready", "status": "False"}]}})")));
  EXPECT_TRUE(nodeUnreachable(json::parse(R"({"status": {"conditions": [{"type": "MemoryPressure", "status": "False"},
                                                                          {"type": "Ready", "status": "Unknown"}]}})")));
  EXPECT_TRUE(nodeUnreachable(json::parse(
      R"({"spec": {"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]}})")));
  EXPECT_FALSE(nodeUnreachable(json::parse(R"({"spec": {"taints": [{"key": "gpu", "effect": "NoSchedule"}]}})")));
  // Since when: the condition's transition, else the taint's; the epoch when neither says.
  using operator_core::nodeUnreachableSince;
  using operator_core::parseTime;
  EXPECT_EQ(nodeUnreachableSince(json::parse(R"({"status": {"conditions": [{"type": "Ready", "status": "Unknown",
      "lastTransitionTime": "2026-11-27T04:05:00Z"}]}, "spec": {"taints": [{"key": "node.kubernetes.io/unreachable",
      "effect": "NoExecute", "timeAdded": "2026-11-27T04:05:06Z"}]}})")), parseTime("2026-11-27T04:05:00Z"));
  EXPECT_EQ(nodeUnreachableSince(json::parse(R"({"spec": {"taints": [{"key": "node.kubernetes.io/unreachable",
      "effect": "NoExecute", "timeAdded": "2026-11-27T04:05:06Z"}]}})")), parseTime("2026-11-27T04:05:06Z"));
  EXPECT_EQ(nodeUnreachableSince(json::parse(R"({"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}})")),
            operator_core::Clock::time_point{});
  EXPECT_FALSE(nodeUnreachableSince(json::parse(R"({"status": {"conditions": [{"type": "Ready", "status": "True",
      "lastTransitionTime": "2026-11-27T04:05:00Z"}]}})")).has_value());
  // A condition that does not say when (a zero time is null): the taint's time, when it has one.
  EXPECT_EQ(nodeUnreachableSince(json::parse(R"({"status": {"conditions": [{"type": "Ready", "status": "Unknown",
      "lastTransitionTime": null}]}, "spec": {"taints": [{"key": "node.kubernetes.io/unreachable",
      "effect": "NoExecute", "timeAdded": "2026-11-27T04:05:06Z"}]}})")), parseTime("2026-11-27T04:05:06Z"));
}

TEST(ApiConvert, NodesAreTrimmedToWhatReconcileReadsWhateverTheirFieldsHold) {
  json node = json::parse(R"({"metadata": {"name": "n1", "resourceVersion": "7", "labels": {"zone": "a"}},
      "status": {"conditions": [{"type": "MemoryPressure", "status": "False"},
                                {"type": "Ready", "status": "Unknown", "lastTransitionTime": "2026-11-27T04:05:00Z",
                                 "lastHeartbeatTime": "2026-11-27T04:04:20Z"}], "capacity": {"cpu": "16"}},
      "spec": {"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]}})");
  operator_core::trimNode(node);
  EXPECT_EQ(node, json::parse(R"({"metadata": {"name": "n1", "resourceVersion": "7"},
      "status": {"conditions": [{"type": "Ready", "status": "Unknown", "lastTransitionTime": "2026-11-27T04:05:00Z"}]},
      "spec": {"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]}})"));
  // Nulls (a zero time), numbers and missing objects read as "" instead of throwing on the informer's thread.
  json odd = json::parse(R"({"metadata": {"name": null}, "status": {"conditions": [{"type": "Ready",
      "status": "Unknown", "lastTransitionTime": null}, 42, {"type": 7}]}})");
  EXPECT_NO_THROW(operator_core::trimNode(odd));
  EXPECT_EQ(odd["status"]["conditions"], json::parse(R"([{"type": "Ready", "status": "Unknown", "lastTransitionTime": ""}])"));
  EXPECT_EQ(odd["metadata"]["name"], "");
  json bare = json::object();
  EXPECT_NO_THROW(operator_core::trimNode(bare));
}

TEST(ApiConvert, JobsParseWithServerMetadataAndStatus) {
  using namespace operator_core;
  const json object = json::parse(R"({
    "apiVersion": "tandem.dev/v1alpha1", "kind": "DistributedTrainingJob",
    "metadata": {"name": "fmnist", "namespace": "team", "uid": "u-1", "generation": 2, "resourceVersion": "99",
                 "creationTimestamp": "2026-11-27T04:00:00Z", "managedFields": [{"manager": "kubectl"}]},
    "spec": {"workers": 2, "model": {"kind": "mlp", "mlp": {"hidden": [16]}},
             "data": {"kind": "synthetic", "samples": 512},
             "training": {"globalBatchSize": 32, "epochs": 1}},
    "status": {"phase": "Running", "restarts": 1, "generation": 1}})");
  const JobObject job = jobFromJson(object);
  EXPECT_TRUE(job.specErrors.empty()) << job.specErrors.front().toString();
  EXPECT_EQ(job.nameSpace, "team");
  EXPECT_EQ(job.name, "fmnist");
  EXPECT_EQ(job.uid, "u-1");
  EXPECT_EQ(job.generation, 2);
  EXPECT_EQ(job.spec.workers, 2);
  EXPECT_EQ(job.status.phase, JobPhase::kRunning);
  EXPECT_EQ(job.status.restarts, 1);

  json invalid = object;
  invalid["spec"]["workers"] = 0;
  EXPECT_FALSE(jobFromJson(invalid).specErrors.empty());

  // A valid custom-resource name that cannot name the job's Service (a dot, a leading digit) is an
  // invalid spec, not a job stuck at Created behind a refused CreateService.
  for (const char* name : {"gpt.v2", "7b-run"}) {
    json badName = object;
    badName["metadata"]["name"] = name;
    const auto errors = jobFromJson(badName).specErrors;
    ASSERT_FALSE(errors.empty()) << name;
    EXPECT_EQ(errors.front().path, "metadata.name") << errors.front().toString();
  }
  // A template that is a scalar where Tandem reads a mapping is reported, not thrown (which crashed the
  // operator on every reconcile of the job).
  json badTemplate = object;
  badTemplate["spec"]["template"] = json::parse(R"({"spec": {"containers": ["busybox"]}})");
  const auto errors = jobFromJson(badTemplate).specErrors;
  ASSERT_FALSE(errors.empty());
  EXPECT_EQ(errors.front().path, "spec.template.spec.containers[0]") << errors.front().toString();
}

// ---------------------------------------------------------------------------------------------- controller

// An API server for one Controller pass: lists from fixed collections (watches are quiet streams it
// ends), answers each DELETE by the status set for its path (200 when none), and records the DELETEs
// with their bodies in order. Status writes and Events are accepted and echoed.
class FakeApiServer {
 public:
  FakeApiServer() {
    local_.server().Get(R"(/.*)", [this](const httplib::Request& request, httplib::Response& response) {
      if (request.get_param_value("watch") == "1") {
        std::this_thread::sleep_for(100ms);
        response.set_content("", "application/json");
        return;
      }
      json list = {{"kind", "List"}, {"metadata", {{"resourceVersion", "10"}}}, {"items", json::array()}};
      std::lock_guard<std::mutex> lock(mutex_);
      if (auto found = collections_.find(request.path); found != collections_.end()) list["items"] = found->second;
      response.set_content(list.dump(), "application/json");
    });
    local_.server().Delete(R"(/.*)", [this](const httplib::Request& request, httplib::Response& response) {
      std::lock_guard<std::mutex> lock(mutex_);
      deletes_.emplace_back(request.path, request.body.empty() ? json::object() : json::parse(request.body));
      const auto answer = answers_.find(request.path);
      response.status = answer == answers_.end() ? 200 : answer->second;
      const std::string reason = response.status == 409 ? "Conflict" : response.status == 403 ? "Forbidden" : "";
      response.set_content(response.status == 200 ? R"({"kind":"Status","status":"Success"})"
                                                  : json{{"kind", "Status"}, {"status", "Failure"}, {"reason", reason},
                                                         {"code", response.status}, {"message", "refused here"}}.dump(),
                           "application/json");
    });
    auto echo = [this](const httplib::Request& request, httplib::Response& response) {
      std::lock_guard<std::mutex> lock(mutex_);
      response.status = request.method == "POST" ? 201 : 200;
      if (request.method == "POST") {
        posts_.push_back(request.path);
        if (request.path.find("/events") != std::string::npos) events_.push_back(json::parse(request.body));
        if (auto answer = answers_.find("POST " + request.path); answer != answers_.end()) {
          response.status = answer->second;
          response.set_content(json{{"kind", "Status"}, {"status", "Failure"}, {"reason", "AlreadyExists"},
                                    {"code", response.status}, {"message", "already there"}}.dump(),
                               "application/json");
          return;
        }
      }
      response.set_content(request.body.empty() ? "{}" : request.body, "application/json");
    };
    local_.server().Post(R"(/.*)", echo);
    local_.server().Put(R"(/.*)", echo);
    local_.server().Patch(R"(/.*)", echo);
  }
  void serve(const std::string& collection, json items) {
    std::lock_guard<std::mutex> lock(mutex_);
    collections_[collection] = std::move(items);
  }
  void answerDelete(const std::string& path, int status) {
    std::lock_guard<std::mutex> lock(mutex_);
    answers_[path] = status;
  }
  void answerPost(const std::string& path, int status) {
    std::lock_guard<std::mutex> lock(mutex_);
    answers_["POST " + path] = status;
  }
  // The Events posted, as sent.
  std::vector<json> events() {
    std::lock_guard<std::mutex> lock(mutex_);
    return events_;
  }
  // How many POSTs went to `path`.
  int posts(const std::string& path) {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int>(std::count(posts_.begin(), posts_.end(), path));
  }
  std::vector<std::pair<std::string, json>> deletes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return deletes_;
  }
  kube::KubeConfig config() const { return local_.config(); }

 private:
  LocalServer local_;
  std::mutex mutex_;
  std::map<std::string, json> collections_;
  std::map<std::string, int> answers_;  // DELETE by path, POST by "POST <path>"
  std::vector<std::pair<std::string, json>> deletes_;
  std::vector<std::string> posts_;
  std::vector<json> events_;
};

// A job that succeeded long ago with ttlSecondsAfterFinished 0, its two pods kept (cleanPodPolicy None),
// its Service and ConfigMap: one pass deletes them all, then the job.
void serveFinishedJob(FakeApiServer& api) {
  const json owner = json::array({{{"apiVersion", "tandem.dev/v1alpha1"}, {"kind", "DistributedTrainingJob"},
                                   {"name", "done"}, {"uid", "job-uid"}, {"controller", true}}});
  api.serve("/apis/tandem.dev/v1alpha1/distributedtrainingjobs", json::array({json::parse(R"({
    "apiVersion": "tandem.dev/v1alpha1", "kind": "DistributedTrainingJob",
    "metadata": {"name": "done", "namespace": "ns", "uid": "job-uid", "generation": 1, "resourceVersion": "3",
                 "creationTimestamp": "2026-11-27T04:00:00Z"},
    "spec": {"workers": 2, "model": {"kind": "mlp", "mlp": {"hidden": [16]}},
             "data": {"kind": "synthetic", "samples": 512}, "training": {"globalBatchSize": 32, "epochs": 1},
             "runPolicy": {"ttlSecondsAfterFinished": 0, "cleanPodPolicy": "None"}},
    "status": {"phase": "Succeeded", "generation": 0, "startTime": "2026-11-27T04:00:01Z",
               "completionTime": "2026-11-27T04:10:00Z"}})")}));
  json pods = json::array();
  for (int rank = 0; rank < 2; ++rank) {
    const std::string name = "done-worker-" + std::to_string(rank);
    pods.push_back({{"metadata", {{"name", name}, {"namespace", "ns"}, {"uid", "pod-uid-" + std::to_string(rank)},
                                  {"resourceVersion", "4"}, {"creationTimestamp", "2026-11-27T04:00:02Z"},
                                  {"labels", {{"tandem.dev/job", "done"}, {"tandem.dev/rank", std::to_string(rank)},
                                              {"tandem.dev/generation", "0"}}},
                                  {"ownerReferences", owner}}},
                    {"status", {{"phase", "Succeeded"}}}});
  }
  api.serve("/api/v1/pods", pods);
  api.serve("/api/v1/services", json::array({{{"metadata", {{"name", "done"}, {"namespace", "ns"}, {"uid", "svc-uid"},
                                                            {"resourceVersion", "2"}, {"labels", {{"tandem.dev/job", "done"}}},
                                                            {"ownerReferences", owner}}}}}));
  api.serve("/api/v1/configmaps", json::array({{{"metadata", {{"name", "done-config"}, {"namespace", "ns"},
                                                              {"uid", "cm-uid"}, {"resourceVersion", "2"},
                                                              {"labels", {{"tandem.dev/job", "done"}}},
                                                              {"ownerReferences", owner}}}}}));
}

// `passes` reconciles of `key` by one Controller over `api`; returns the first failure, else Ok.
Status reconcile(FakeApiServer& api, const std::string& key = "ns/done", int passes = 1) {
  kube::KubeClient client(api.config(), fastRetries());
  operator_core::OperatorMetrics metrics;
  operator_core::ControllerOptions options;
  options.watchTimeoutSeconds = 10;
  operator_core::Controller controller(client, options, metrics);
  controller.startInformers();
  EXPECT_TRUE(controller.waitForSync(5s));
  Status status = Status::Ok();
  for (int pass = 0; pass < passes && status.ok(); ++pass) status = controller.reconcileKey(key);
  controller.stop();
  return status;
}

TEST(Controller, DeletesNameTheUidTheyObservedAndAConflictCountsAsDone) {
  // Rank 0's name now belongs to a newer pod (the uid precondition fails: 409): not ours to delete, and
  // the clean-up goes on to the job itself.
  FakeApiServer api;
  serveFinishedJob(api);
  api.answerDelete("/api/v1/namespaces/ns/pods/done-worker-0", 409);
  ASSERT_TRUE(reconcile(api).ok());
  std::map<std::string, std::string> preconditions;  // path -> uid
  for (const auto& [path, body] : api.deletes())
    preconditions[path] = body.value("/preconditions/uid"_json_pointer, std::string("(none)"));
  EXPECT_EQ(preconditions, (std::map<std::string, std::string>{
                               {"/api/v1/namespaces/ns/pods/done-worker-0", "pod-uid-0"},
                               {"/api/v1/namespaces/ns/pods/done-worker-1", "pod-uid-1"},
                               {"/api/v1/namespaces/ns/services/done", "svc-uid"},
                               {"/api/v1/namespaces/ns/configmaps/done-config", "cm-uid"},
                               {"/apis/tandem.dev/v1alpha1/namespaces/ns/distributedtrainingjobs/done", "job-uid"}}));
  EXPECT_EQ(api.deletes().back().first, "/apis/tandem.dev/v1alpha1/namespaces/ns/distributedtrainingjobs/done");
}

TEST(Controller, AFailedDeleteStopsThePlanBeforeTheJobIsDeleted) {
  // The ConfigMap's delete is refused (403): the pass fails and the job stays, for the next pass to retry.
  FakeApiServer api;
  serveFinishedJob(api);
  api.answerDelete("/api/v1/namespaces/ns/configmaps/done-config", 403);
  EXPECT_FALSE(reconcile(api).ok());
  for (const auto& [path, body] : api.deletes())
    EXPECT_EQ(path.find("/distributedtrainingjobs/"), std::string::npos) << "deleted " << path;
  EXPECT_FALSE(api.deletes().empty());
}

// A gang of two, Pending: rank 0 waits for its rendezvous Secret, which someone deleted.
void serveGangWaitingForItsSecret(FakeApiServer& api) {
  const json owner = json::array({{{"apiVersion", "tandem.dev/v1alpha1"}, {"kind", "DistributedTrainingJob"},
                                   {"name", "lost"}, {"uid", "job-uid"}, {"controller", true}}});
  api.serve("/apis/tandem.dev/v1alpha1/distributedtrainingjobs", json::array({json::parse(R"({
    "apiVersion": "tandem.dev/v1alpha1", "kind": "DistributedTrainingJob",
    "metadata": {"name": "lost", "namespace": "ns", "uid": "job-uid", "generation": 1, "resourceVersion": "3",
                 "creationTimestamp": "2026-11-27T04:00:00Z"},
    "spec": {"workers": 2, "model": {"kind": "mlp", "mlp": {"hidden": [16]}},
             "data": {"kind": "synthetic", "samples": 512}, "training": {"globalBatchSize": 32, "epochs": 1}},
    "status": {"phase": "Created", "generation": 0}})")}));
  json pods = json::array();
  for (int rank = 0; rank < 2; ++rank) {
    json pod = {{"metadata", {{"name", "lost-worker-" + std::to_string(rank)}, {"namespace", "ns"},
                              {"uid", "pod-uid-" + std::to_string(rank)}, {"resourceVersion", "4"},
                              {"creationTimestamp", "2026-11-27T04:00:02Z"},
                              {"labels", {{"tandem.dev/job", "lost"}, {"tandem.dev/rank", std::to_string(rank)},
                                          {"tandem.dev/generation", "0"}}},
                              {"ownerReferences", owner}}},
                {"status", {{"phase", "Pending"}}}};
    if (rank == 0)
      pod["status"]["containerStatuses"] = {{{"name", "worker"}, {"state", {{"waiting", {
          {"reason", "CreateContainerConfigError"}, {"message", "secret \"lost-rendezvous-job-uid\" not found"}}}}}}};
    pods.push_back(pod);
  }
  api.serve("/api/v1/pods", pods);
  api.serve("/api/v1/services", json::array({{{"metadata", {{"name", "lost"}, {"namespace", "ns"}, {"uid", "svc-uid"},
                                                            {"resourceVersion", "2"}, {"labels", {{"tandem.dev/job", "lost"}}},
                                                            {"ownerReferences", owner}}}}}));
  api.serve("/api/v1/configmaps", json::array({{{"metadata", {{"name", "lost-config"}, {"namespace", "ns"},
                                                              {"uid", "cm-uid"}, {"resourceVersion", "2"},
                                                              {"labels", {{"tandem.dev/job", "lost"}}},
                                                              {"annotations", {{"tandem.dev/rendezvous-secret",
                                                                                "lost-rendezvous-job-uid"}}},
                                                              {"ownerReferences", owner}}}}}));
}

TEST(Controller, ASecretMadeAnewIsNotMadeAgainWhileThePodsCatchUp) {
  // Made anew (201): the next pass, with rank 0 still showing the kubelet's earlier wait, leaves it be.
  const std::string secrets = "/api/v1/namespaces/ns/secrets";
  FakeApiServer made;
  serveGangWaitingForItsSecret(made);
  ASSERT_TRUE(reconcile(made, "ns/lost", 2).ok());
  EXPECT_EQ(made.posts(secrets), 1);
  auto recreatedEvents = [](FakeApiServer& api) {
    std::vector<std::string> messages;
    for (const json& event : api.events())
      if (event.value("reason", "") == "RendezvousSecretRecreated") messages.push_back(event.value("message", event.value("note", "")));
    return messages;
  };
  EXPECT_EQ(recreatedEvents(made), (std::vector<std::string>{
      "Secret lost-rendezvous-job-uid was missing (deleted?): worker lost-worker-0 cannot start; created it "
      "again with a new token"}));
  // There already (409): its token is not new, nothing to wait for; the next pass asks again.
  FakeApiServer there;
  serveGangWaitingForItsSecret(there);
  there.answerPost(secrets, 409);
  ASSERT_TRUE(reconcile(there, "ns/lost", 2).ok());
  EXPECT_EQ(there.posts(secrets), 2);
  EXPECT_TRUE(recreatedEvents(there).empty()) << "a Secret that was there was not created again";
}

// ---------------------------------------------------------------------------------------------- queue

TEST(WorkQueue, DeduplicatesAndNeverHandsOutAKeyTwiceAtOnce) {
  WorkQueue queue;
  queue.add("a");
  queue.add("a");
  queue.add("b");
  EXPECT_EQ(queue.depth(), 2u);
  EXPECT_EQ(*queue.get(), "a");
  queue.add("a");  // changed while being processed: once more after done(), not now
  EXPECT_EQ(*queue.get(), "b");
  EXPECT_EQ(queue.depth(), 0u);
  queue.done("b");
  queue.done("a");
  EXPECT_EQ(queue.depth(), 1u);
  EXPECT_EQ(*queue.get(), "a");
  queue.done("a");
  EXPECT_EQ(queue.depth(), 0u);
}

TEST(WorkQueue, DelayedKeysComeDueInOrder) {
  WorkQueue queue;
  const auto start = std::chrono::steady_clock::now();
  queue.addAfter("late", 150ms);
  queue.addAfter("early", 50ms);
  queue.addAfter("late", 400ms);  // the earlier due time is kept
  EXPECT_EQ(*queue.get(), "early");
  EXPECT_GE(std::chrono::steady_clock::now() - start, 50ms);
  EXPECT_EQ(*queue.get(), "late");
  EXPECT_GE(std::chrono::steady_clock::now() - start, 150ms);
}

TEST(WorkQueue, BacksOffPerKeyUntilForgotten) {
  WorkQueue queue(WorkQueue::Options{20ms, 1000ms});
  std::vector<std::chrono::steady_clock::duration> waits;
  for (int i = 0; i < 3; ++i) {
    const auto start = std::chrono::steady_clock::now();
    queue.addRateLimited("k");
    ASSERT_EQ(*queue.get(), "k");
    waits.push_back(std::chrono::steady_clock::now() - start);
    queue.done("k");
  }
  EXPECT_EQ(queue.failures("k"), 3);
  EXPECT_GE(waits[0], 20ms);
  EXPECT_GE(waits[1], 40ms);
  EXPECT_GE(waits[2], 80ms);
  queue.forget("k");
  EXPECT_EQ(queue.failures("k"), 0);
}

TEST(WorkQueue, ShutDownWakesBlockedWorkers) {
  WorkQueue queue;
  std::atomic<bool> returned{false};
  std::thread worker([&] {
    EXPECT_FALSE(queue.get().has_value());
    returned = true;
  });
  std::this_thread::sleep_for(20ms);
  queue.shutDown();
  worker.join();
  EXPECT_TRUE(returned.load());
}

}  // namespace
}  // namespace tandem
