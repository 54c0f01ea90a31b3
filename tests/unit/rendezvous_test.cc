// rendezvous: an in-process gRPC RendezvousServer on 127.0.0.1 and RendezvousClients on threads: a full
// join, every refusal (token, config hash, generation, duplicate rank), a missing rank and an absent
// server turning into bounded errors, barrier, heartbeat and the key-value store.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tandem/rendezvous/heartbeat.h"
#include "tandem/rendezvous/rendezvous.h"

namespace tandem::rendezvous {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr char kJob[] = "default/unit";
constexpr char kToken[] = "s3cret";
constexpr char kHash[] = "0123456789abcdef";

double secondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

class RendezvousTest : public ::testing::Test {
 protected:
  void startServer(int worldSize, int64_t generation = 0, std::chrono::milliseconds heartbeatTimeout = 300ms) {
    ServerOptions options;
    options.listenAddress = "127.0.0.1:0";
    options.job = kJob;
    options.generation = generation;
    options.worldSize = worldSize;
    options.token = kToken;
    options.configHash = kHash;
    options.ncclUniqueId = "nccl-id-bytes";
    options.heartbeatTimeout = heartbeatTimeout;
    auto server = RendezvousServer::start(options);
    ASSERT_TRUE(server.ok()) << server.status().toString();
    server_ = std::move(server).value();
    ASSERT_GT(server_->port(), 0);
    endpoint_ = "127.0.0.1:" + std::to_string(server_->port());
  }

  void TearDown() override {
    if (server_ != nullptr) server_->shutdown();
  }

  JoinRequest request(int rank, int worldSize) const {
    JoinRequest join;
    join.job = kJob;
    join.generation = 0;
    join.rank = rank;
    join.worldSize = worldSize;
    join.address = "10.0.0." + std::to_string(rank + 1);
    join.configHash = kHash;
    return join;
  }

  std::unique_ptr<RendezvousClient> client(const std::string& token = kToken, int64_t generation = 0) const {
    return std::make_unique<RendezvousClient>(endpoint_, token, generation);
  }

  std::unique_ptr<RendezvousServer> server_;
  std::string endpoint_;
};

TEST_F(RendezvousTest, ASecondServerOnTheSamePortIsRefusedNotServedBeside) {
  // gRPC's default SO_REUSEPORT would let a second job's rank 0 listen on the port too, and the kernel
  // would split the workers' connections between the two; a refused bind is retryable instead.
  startServer(2);
  ServerOptions options;
  options.listenAddress = endpoint_;
  options.job = "another/job";
  options.worldSize = 2;
  options.token = "another-token";
  auto second = RendezvousServer::start(options);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kResourceUnavailable);
  EXPECT_NE(second.status().message().find(endpoint_), std::string::npos) << second.status().toString();
}

TEST_F(RendezvousTest, ThreeRanksJoinAndAllGetTheSamePeerList) {
  startServer(3);
  std::vector<std::future<StatusOr<JoinResult>>> joins;
  for (int rank = 0; rank < 3; ++rank)
    joins.push_back(std::async(std::launch::async, [this, rank] { return client()->join(request(rank, 3), 10s); }));
  const std::vector<std::string> expected = {"10.0.0.1", "10.0.0.2", "10.0.0.3"};
  for (int rank = 0; rank < 3; ++rank) {
    auto result = joins[rank].get();
    ASSERT_TRUE(result.ok()) << "rank " << rank << ": " << result.status().toString();
    EXPECT_EQ(result->peerAddresses, expected) << "rank " << rank;
    EXPECT_EQ(result->ncclUniqueId, "nccl-id-bytes");
  }
}

TEST_F(RendezvousTest, RejoiningFromTheSameAddressIsIdempotent) {
  startServer(1);
  auto first = client()->join(request(0, 1), 5s);
  ASSERT_TRUE(first.ok()) << first.status().toString();
  auto again = client()->join(request(0, 1), 5s);
  ASSERT_TRUE(again.ok()) << again.status().toString();
  EXPECT_EQ(again->peerAddresses, std::vector<std::string>{"10.0.0.1"});
}

TEST_F(RendezvousTest, WrongTokenIsPermissionDenied) {
  startServer(2);
  auto result = client("guess")->join(request(0, 2), 5s);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), StatusCode::kPermissionDenied) << result.status().toString();
  EXPECT_EQ(result.status().message().find(kToken), std::string::npos) << "the token leaked into the message";
}

TEST_F(RendezvousTest, DifferentConfigHashIsFailedPreconditionNamingBothHashes) {
  startServer(2);
  JoinRequest join = request(1, 2);
  join.configHash = "fedcba9876543210";
  auto result = client()->join(join, 5s);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), StatusCode::kFailedPrecondition) << result.status().toString();
  EXPECT_NE(result.status().message().find("fedcba9876543210"), std::string::npos) << result.status().message();
  EXPECT_NE(result.status().message().find(kHash), std::string::npos) << result.status().message();
}

TEST_F(RendezvousTest, DifferentGenerationIsFailedPrecondition) {
  startServer(2, /*generation=*/3);
  JoinRequest join = request(0, 2);
  join.generation = 2;
  auto result = client("s3cret", 2)->join(join, 5s);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), StatusCode::kFailedPrecondition) << result.status().toString();
  EXPECT_NE(result.status().message().find("generation 2"), std::string::npos) << result.status().message();
}

TEST_F(RendezvousTest, DifferentWorldSizeIsFailedPrecondition) {
  startServer(2);
  auto result = client()->join(request(0, 3), 5s);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), StatusCode::kFailedPrecondition) << result.status().toString();
}

TEST_F(RendezvousTest, DuplicateRankFromAnotherAddressIsAlreadyExists) {
  startServer(2);
  // Rank 0 joins and waits for rank 1, which never comes; meanwhile an impostor claims rank 0.
  auto first = std::async(std::launch::async, [this] { return client()->join(request(0, 2), 3s); });
  std::this_thread::sleep_for(300ms);
  JoinRequest impostor = request(0, 2);
  impostor.address = "10.9.9.9";
  auto second = client()->join(impostor, 5s);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kAlreadyExists) << second.status().toString();
  EXPECT_NE(second.status().message().find("10.0.0.1"), std::string::npos) << second.status().message();
  EXPECT_FALSE(first.get().ok());  // rank 1 never joined
}

TEST_F(RendezvousTest, MissingRankTimesOutNamingIt) {
  startServer(3);
  auto rank0 = std::async(std::launch::async, [this] { return client()->join(request(0, 3), 2s); });
  const auto start = Clock::now();
  auto rank2 = client()->join(request(2, 3), 2s);
  const double elapsed = secondsSince(start);
  auto result0 = rank0.get();
  for (const auto* result : {&rank2, &result0}) {
    ASSERT_FALSE(result->ok());
    EXPECT_EQ(result->status().code(), StatusCode::kDeadlineExceeded) << result->status().toString();
    EXPECT_NE(result->status().message().find("missing ranks: 1"), std::string::npos) << result->status().message();
  }
  EXPECT_GE(elapsed, 1.0);
  EXPECT_LT(elapsed, 2.5);
}

// A port that was free a moment ago and that nobody listens on.
int unusedPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  socklen_t length = sizeof(address);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  ::close(fd);
  return ntohs(address.sin_port);
}

TEST(RendezvousUnreachable, JoinFailsWithUnavailableWithinItsDeadline) {
  const std::string endpoint = "127.0.0.1:" + std::to_string(unusedPort());
  RendezvousClient client(endpoint, kToken, 0);
  JoinRequest join;
  join.job = kJob;
  join.address = "10.0.0.1";
  join.configHash = kHash;
  const auto timeout = 1500ms;
  const auto start = Clock::now();
  auto result = client.join(join, timeout);
  const double elapsed = secondsSince(start);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), StatusCode::kUnavailable) << result.status().toString();
  EXPECT_NE(result.status().message().find("cannot reach the rendezvous"), std::string::npos)
      << result.status().message();
  EXPECT_NE(result.status().message().find(endpoint), std::string::npos) << result.status().message();
  EXPECT_LT(elapsed, 1.5 + 3.0);
}

TEST(RendezvousUnreachable, StoreGetFailsWithUnavailableWithinItsDeadline) {
  RendezvousClient client("127.0.0.1:" + std::to_string(unusedPort()), kToken, 0);
  const auto start = Clock::now();
  auto value = client.storeGet("key", 1000ms);
  ASSERT_FALSE(value.ok());
  EXPECT_EQ(value.status().code(), StatusCode::kUnavailable) << value.status().toString();
  EXPECT_LT(secondsSince(start), 1.0 + 3.0);
}

TEST_F(RendezvousTest, ClientStartedBeforeTheServerWaitsForIt) {
  // Rank 0 may come up after the others: a join issued first still succeeds within its deadline.
  const int port = unusedPort();
  endpoint_ = "127.0.0.1:" + std::to_string(port);
  auto early = std::async(std::launch::async, [this] { return client()->join(request(0, 1), 10s); });
  std::this_thread::sleep_for(500ms);
  ServerOptions options;
  options.listenAddress = endpoint_;
  options.job = kJob;
  options.worldSize = 1;
  options.token = kToken;
  options.configHash = kHash;
  auto server = RendezvousServer::start(options);
  ASSERT_TRUE(server.ok()) << server.status().toString();
  server_ = std::move(server).value();
  auto result = early.get();
  ASSERT_TRUE(result.ok()) << result.status().toString();
  EXPECT_EQ(result->peerAddresses, std::vector<std::string>{"10.0.0.1"});
}

TEST_F(RendezvousTest, StoreSetThenGetRoundTrips) {
  startServer(2);
  auto writer = client();
  ASSERT_TRUE(writer->storeSet("gloo/0", std::string("\x00\x01binary", 8), 5s).ok());
  auto value = client()->storeGet("gloo/0", 5s);
  ASSERT_TRUE(value.ok()) << value.status().toString();
  EXPECT_EQ(*value, std::string("\x00\x01binary", 8));
}

TEST_F(RendezvousTest, StoreGetWaitsForALaterSet) {
  startServer(2);
  const auto start = Clock::now();
  auto reader = std::async(std::launch::async, [this] { return client()->storeGet("late", 5s); });
  std::this_thread::sleep_for(300ms);
  ASSERT_TRUE(client()->storeSet("late", "here", 5s).ok());
  auto value = reader.get();
  ASSERT_TRUE(value.ok()) << value.status().toString();
  EXPECT_EQ(*value, "here");
  EXPECT_GE(secondsSince(start), 0.25);
  EXPECT_LT(secondsSince(start), 4.0);
}

TEST_F(RendezvousTest, StoreGetOfANeverSetKeyIsDeadlineExceeded) {
  startServer(2);
  const auto start = Clock::now();
  auto value = client()->storeGet("never", 1s);
  ASSERT_FALSE(value.ok());
  EXPECT_EQ(value.status().code(), StatusCode::kDeadlineExceeded) << value.status().toString();
  EXPECT_LT(secondsSince(start), 3.0);
}

TEST_F(RendezvousTest, StoreWithWrongTokenIsPermissionDenied) {
  startServer(2);
  EXPECT_EQ(client("guess")->storeSet("k", "v", 5s).code(), StatusCode::kPermissionDenied);
  auto value = client("guess")->storeGet("k", 5s);
  ASSERT_FALSE(value.ok());
  EXPECT_EQ(value.status().code(), StatusCode::kPermissionDenied);
}

TEST_F(RendezvousTest, BarrierReleasesWhenEveryRankArrives) {
  startServer(2);
  const auto start = Clock::now();
  auto rank0 = std::async(std::launch::async, [this] { return client()->barrier(0, "checkpoint-1", 5s); });
  std::this_thread::sleep_for(300ms);
  const Status rank1 = client()->barrier(1, "checkpoint-1", 5s);
  EXPECT_TRUE(rank1.ok()) << rank1.toString();
  const Status status0 = rank0.get();
  EXPECT_TRUE(status0.ok()) << status0.toString();
  EXPECT_GE(secondsSince(start), 0.25);  // rank 0 waited for rank 1
}

TEST_F(RendezvousTest, ABarrierNameCanBeUsedAgain) {
  startServer(2);
  for (int round = 0; round < 2; ++round) {
    auto rank0 = std::async(std::launch::async, [this] { return client()->barrier(0, "epoch", 5s); });
    const Status rank1 = client()->barrier(1, "epoch", 5s);
    EXPECT_TRUE(rank1.ok()) << round << ": " << rank1.toString();
    EXPECT_TRUE(rank0.get().ok()) << round;
  }
  // A third round with one rank is not passed by the earlier rounds' arrivals.
  EXPECT_EQ(client()->barrier(0, "epoch", 500ms).code(), StatusCode::kDeadlineExceeded);
}

TEST_F(RendezvousTest, ABarrierEndedByShutdownIsNotPassed) {
  startServer(2);
  auto waiting = std::async(std::launch::async, [this] { return client()->barrier(0, "x", 10s); });
  std::this_thread::sleep_for(300ms);
  server_->shutdown();
  const Status status = waiting.get();
  EXPECT_FALSE(status.ok());
  EXPECT_EQ(status.code(), StatusCode::kUnavailable) << status.toString();
}

TEST_F(RendezvousTest, BarrierWithAMissingRankTimesOut) {
  startServer(2);
  const Status status = client()->barrier(0, "lonely", 1s);
  EXPECT_EQ(status.code(), StatusCode::kDeadlineExceeded) << status.toString();
}

TEST_F(RendezvousTest, HeartbeatReportsSilentRanks) {
  startServer(2);
  auto first = client()->heartbeat(0, 1, 5s);
  ASSERT_TRUE(first.ok()) << first.status().toString();
  ASSERT_TRUE(client()->heartbeat(1, 1, 5s).ok());
  std::this_thread::sleep_for(500ms);  // longer than the server's 300 ms heartbeat timeout
  auto later = client()->heartbeat(0, 2, 5s);
  ASSERT_TRUE(later.ok()) << later.status().toString();
  EXPECT_EQ(*later, std::vector<int>{1});
}

TEST_F(RendezvousTest, HeartbeatSendersKeepRanksAliveAndTheSilentOneIsNamed) {
  startServer(3, 0, 1s);
  std::shared_ptr<RendezvousClient> shared = client();
  {
    HeartbeatSender rank1(shared, 1, 50ms);
    HeartbeatSender rank2(shared, 2, 50ms);
    std::this_thread::sleep_for(200ms);
    // rank 2 stops (a SIGSTOP, a hung node): rank 1 goes on beating, about 20 times per timeout.
  }
  HeartbeatSender rank1(shared, 1, 50ms);
  std::this_thread::sleep_for(1500ms);  // longer than the server's 1 s heartbeat timeout
  EXPECT_EQ(describeSilentPeers(*shared, 0, 1s, 2s), "rank 2 has been silent for over 1 s (stopped, hung or cut off)");
}

TEST_F(RendezvousTest, EveryoneAliveDescribesNothingAndAnUnreachableServerIsNamed) {
  startServer(2);
  std::shared_ptr<RendezvousClient> shared = client();
  HeartbeatSender rank1(shared, 1, 50ms);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(describeSilentPeers(*shared, 0, 300ms, 2s), "");
  server_->shutdown();
  server_.reset();
  const std::string described = describeSilentPeers(*shared, 1, 300ms, 500ms);
  EXPECT_NE(described.find("the rendezvous server (rank 0) did not answer a heartbeat either"), std::string::npos)
      << described;
}

// What a SilenceWatch reported and when, for the tests below.
struct SilenceReport {
  std::mutex mutex;
  std::vector<std::pair<std::string, double>> calls;  // text, seconds after `start`
  Clock::time_point start = Clock::now();
  std::function<void(const std::string&)> callback() {
    return [this](const std::string& who) {
      std::lock_guard<std::mutex> lock(mutex);
      calls.emplace_back(who, secondsSince(start));
    };
  }
};

TEST_F(RendezvousTest, ASilenceWatchNamesAPeerSilentForItsLimitOnceAndNotBefore) {
  startServer(3, 0, 300ms);
  std::shared_ptr<RendezvousClient> shared = client();
  SilenceReport report;
  HeartbeatSender rank1(shared, 1, 50ms);
  std::optional<HeartbeatSender> rank2(std::in_place, shared, 2, 50ms);
  SilenceWatch watch(shared, 0, 300ms, 1s, 50ms, report.callback());
  std::this_thread::sleep_for(1500ms);  // everyone beats: nothing to say
  {
    std::lock_guard<std::mutex> lock(report.mutex);
    EXPECT_TRUE(report.calls.empty());
  }
  const Clock::time_point stopped = Clock::now();
  rank2.reset();  // rank 2 stops
  std::this_thread::sleep_for(2500ms);
  std::lock_guard<std::mutex> lock(report.mutex);
  ASSERT_EQ(report.calls.size(), 1u);
  EXPECT_EQ(report.calls[0].first, "rank 2 has been silent for over 1 s (stopped, hung or cut off)");
  const double afterStop = report.calls[0].second - std::chrono::duration<double>(stopped - report.start).count();
  EXPECT_GE(afterStop, 0.85);  // its limit, less at most one 50 ms beat before the stop
  EXPECT_LT(afterStop, 2.0);
}

TEST_F(RendezvousTest, ASilenceWatchTakesAServerThatStoppedAnsweringForRankZeroGoneSilent) {
  startServer(2, 0, 300ms);
  std::shared_ptr<RendezvousClient> shared = client();
  SilenceReport report;
  SilenceWatch watch(shared, 1, 300ms, 1s, 50ms, report.callback());
  std::this_thread::sleep_for(300ms);
  const double stopped = secondsSince(report.start);
  server_->shutdown();
  server_.reset();
  std::this_thread::sleep_for(2500ms);
  std::lock_guard<std::mutex> lock(report.mutex);
  ASSERT_EQ(report.calls.size(), 1u);
  EXPECT_NE(report.calls[0].first.find("the rendezvous server (rank 0) did not answer"), std::string::npos)
      << report.calls[0].first;
  EXPECT_GE(report.calls[0].second - stopped, 0.9);
}

}  // namespace
}  // namespace tandem::rendezvous
