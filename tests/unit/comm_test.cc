// comm: the Gloo communicator with 2 and 4 ranks as threads over 127.0.0.1 and an in-memory store:
// all-reduce (sync and several async in flight), broadcast from a non-zero root, a send/recv ring,
// barrier, the memory store, a peer that never joins the collective turning into an error, not a hang,
// and an operation's own deadline outlasting the communicator's.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "gloo_ranks.h"
#include "tandem/comm/communicator.h"
#include "tandem/common/exit_codes.h"

namespace tandem::comm {
namespace {

using namespace std::chrono_literals;

// Connected communicators, one per thread rank (tests/unit/gloo_ranks.h).
std::vector<std::unique_ptr<Communicator>> connect(int size, std::chrono::milliseconds timeout = 20s) {
  return test_support::connectGlooRanks(size, timeout);
}
using test_support::runRanks;

class GlooWorld : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    communicators_ = connect(GetParam());
    ASSERT_EQ(communicators_.size(), static_cast<size_t>(GetParam()));
    for (int rank = 0; rank < GetParam(); ++rank) {
      EXPECT_EQ(communicators_[rank]->rank(), rank);
      EXPECT_EQ(communicators_[rank]->size(), GetParam());
    }
  }
  std::vector<std::unique_ptr<Communicator>> communicators_;
};

TEST_P(GlooWorld, AllReduceSumsClosedForm) {
  const int size = GetParam();
  for (int64_t count : {int64_t{1}, int64_t{1000}, int64_t{1} << 20}) {
    runRanks(communicators_, [&](int rank, Communicator& communicator) {
      // Rank r contributes (r + 1) * (1 + i % 7): the sum is size (size + 1) / 2 * (1 + i % 7).
      std::vector<float> data(count);
      for (int64_t i = 0; i < count; ++i) data[i] = static_cast<float>((rank + 1) * (1 + i % 7));
      const Status status = communicator.allReduce(data.data(), count);
      ASSERT_TRUE(status.ok()) << "rank " << rank << ": " << status.toString();
      const float triangle = static_cast<float>(size * (size + 1) / 2);
      int64_t wrong = 0;
      for (int64_t i = 0; i < count; ++i) wrong += data[i] != triangle * static_cast<float>(1 + i % 7);
      EXPECT_EQ(wrong, 0) << "rank " << rank << ", count " << count;
    });
  }
}

TEST_P(GlooWorld, SeveralAsyncAllReducesInFlight) {
  const int size = GetParam();
  runRanks(communicators_, [&](int rank, Communicator& communicator) {
    constexpr int kOperations = 5;
    std::vector<std::vector<float>> buffers(kOperations);
    std::vector<std::shared_ptr<Work>> pending;
    for (int op = 0; op < kOperations; ++op) {
      buffers[op].assign(100 + 37 * op, static_cast<float>((rank + 1) * (op + 1)));
      pending.push_back(communicator.allReduceAsync(buffers[op].data(), static_cast<int64_t>(buffers[op].size())));
    }
    for (int op = 0; op < kOperations; ++op) {
      const Status status = pending[op]->wait();
      ASSERT_TRUE(status.ok()) << "rank " << rank << " op " << op << ": " << status.toString();
      const float expected = static_cast<float>(size * (size + 1) / 2 * (op + 1));
      for (float value : buffers[op]) ASSERT_EQ(value, expected) << "rank " << rank << " op " << op;
    }
  });
}

TEST_P(GlooWorld, BroadcastFromNonZeroRoot) {
  const int size = GetParam();
  const int root = size - 1;
  runRanks(communicators_, [&](int rank, Communicator& communicator) {
    std::vector<int32_t> data(513, rank == root ? 0 : -1);
    if (rank == root) std::iota(data.begin(), data.end(), 1000);
    const Status status = communicator.broadcast(data.data(), static_cast<int64_t>(data.size() * sizeof(int32_t)), root);
    ASSERT_TRUE(status.ok()) << "rank " << rank << ": " << status.toString();
    for (size_t i = 0; i < data.size(); ++i) ASSERT_EQ(data[i], static_cast<int32_t>(1000 + i)) << "rank " << rank;
  });
}

TEST_P(GlooWorld, SendRecvRing) {
  const int size = GetParam();
  runRanks(communicators_, [&](int rank, Communicator& communicator) {
    const int next = (rank + 1) % size, previous = (rank + size - 1) % size;
    std::vector<float> outgoing(2048), incoming(2048, -1.0f);
    for (size_t i = 0; i < outgoing.size(); ++i) outgoing[i] = static_cast<float>(rank * 10000 + i);
    // Both posted before either is waited for: the ring only completes if neither blocks the other.
    auto send = communicator.sendAsync(outgoing.data(), static_cast<int64_t>(outgoing.size() * sizeof(float)), next, 7);
    auto recv = communicator.recvAsync(incoming.data(), static_cast<int64_t>(incoming.size() * sizeof(float)), previous, 7);
    const Status sent = send->wait();
    const Status received = recv->wait();
    ASSERT_TRUE(sent.ok()) << "rank " << rank << ": " << sent.toString();
    ASSERT_TRUE(received.ok()) << "rank " << rank << ": " << received.toString();
    for (size_t i = 0; i < incoming.size(); ++i)
      ASSERT_EQ(incoming[i], static_cast<float>(previous * 10000 + i)) << "rank " << rank;
  });
}

TEST_P(GlooWorld, TagsKeepPointToPointMessagesApart) {
  const int size = GetParam();
  runRanks(communicators_, [&](int rank, Communicator& communicator) {
    const int next = (rank + 1) % size, previous = (rank + size - 1) % size;
    int32_t outA = rank * 2, outB = rank * 2 + 1, inA = -1, inB = -1;
    // Received in the opposite order of sending: the tags, not the order, pair them up.
    auto recvB = communicator.recvAsync(&inB, sizeof(inB), previous, 2);
    auto sendA = communicator.sendAsync(&outA, sizeof(outA), next, 1);
    auto sendB = communicator.sendAsync(&outB, sizeof(outB), next, 2);
    auto recvA = communicator.recvAsync(&inA, sizeof(inA), previous, 1);
    for (auto* work : {&recvB, &sendA, &sendB, &recvA}) {
      const Status status = (*work)->wait();
      ASSERT_TRUE(status.ok()) << "rank " << rank << ": " << status.toString();
    }
    EXPECT_EQ(inA, previous * 2);
    EXPECT_EQ(inB, previous * 2 + 1);
  });
}

TEST_P(GlooWorld, BarrierWaitsForEveryRank) {
  const int size = GetParam();
  std::atomic<int> arrived{0};
  runRanks(communicators_, [&](int rank, Communicator& communicator) {
    if (rank == size - 1) std::this_thread::sleep_for(200ms);  // the late rank holds everyone
    arrived.fetch_add(1);
    const Status status = communicator.barrier();
    ASSERT_TRUE(status.ok()) << "rank " << rank << ": " << status.toString();
    EXPECT_EQ(arrived.load(), size) << "rank " << rank << " left the barrier early";
  });
}

TEST_P(GlooWorld, MixedOperationsKeepIssueOrder) {
  const int size = GetParam();
  runRanks(communicators_, [&](int rank, Communicator& communicator) {
    float value = static_cast<float>(rank + 1);
    auto first = communicator.allReduceAsync(&value, 1);
    int32_t token = rank == 0 ? 42 : 0;
    // broadcast is synchronous and queued behind the all-reduce.
    ASSERT_TRUE(communicator.broadcast(&token, sizeof(token), 0).ok());
    ASSERT_TRUE(first->wait().ok());
    EXPECT_EQ(value, static_cast<float>(size * (size + 1) / 2));
    EXPECT_EQ(token, 42);
    ASSERT_TRUE(communicator.barrier().ok());
  });
}

INSTANTIATE_TEST_SUITE_P(TwoAndFourRanks, GlooWorld, ::testing::Values(2, 4),
                         [](const auto& info) { return std::to_string(info.param) + "Ranks"; });

TEST(GlooTimeout, AllReduceWithAnAbsentPeerFailsWithinTheTimeout) {
  auto communicators = connect(2, /*timeout=*/1000ms);
  ASSERT_EQ(communicators.size(), 2u);
  std::promise<void> rankZeroDone;
  // Rank 1 is connected but never calls allReduce; it keeps its communicator open until rank 0 gave up,
  // so rank 0 sees a peer that is silent, not one that hung up.
  std::thread silentPeer([&] { rankZeroDone.get_future().wait(); });

  const auto start = std::chrono::steady_clock::now();
  std::vector<float> data(1000, 1.0f);
  auto pending = std::async(std::launch::async, [&] { return communicators[0]->allReduce(data.data(), 1000); });
  const bool finished = pending.wait_for(20s) == std::future_status::ready;
  rankZeroDone.set_value();
  silentPeer.join();
  ASSERT_TRUE(finished) << "allReduce hung instead of timing out";
  const Status status = pending.get();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_FALSE(status.ok());
  // The peer is alive but silent: a timeout (retryable), not a broken connection.
  EXPECT_EQ(status.code(), StatusCode::kDeadlineExceeded) << status.toString();
  EXPECT_NE(status.message().find("all-reduce"), std::string::npos) << status.toString();
  EXPECT_GE(elapsed, 0.5);
  EXPECT_LT(elapsed, 5.0) << status.toString();
  communicators.clear();  // both communicators shut down cleanly after the failure
}

// A rank that comes to the collective later than the communicator's timeout: an operation given a
// deadline of its own waits for it (a resume waits so for the checkpoint writers' reads), and the
// communicator goes on working afterwards. 2 and 4 ranks take Tandem's own all-reduce (on 4, 3 floats
// take recursive doubling and 128 Ki floats, over its 256 KiB limit, halving-doubling), 3 ranks Gloo's.
class GlooOwnDeadline : public ::testing::TestWithParam<int> {};

TEST_P(GlooOwnDeadline, WaitsForALatePeerBeyondTheCommunicatorsTimeout) {
  const int size = GetParam();
  auto communicators = connect(size, /*timeout=*/1000ms);
  ASSERT_EQ(communicators.size(), static_cast<size_t>(size));
  EXPECT_EQ(communicators[0]->timeout(), 1000ms);
  const int late = size - 1;
  for (const int64_t count : {int64_t{3}, int64_t{1} << 17}) {
    std::vector<Status> reduced(size), broadcast(size);
    std::vector<std::vector<float>> values(size);
    std::vector<int64_t> received(size, -1);
    const auto start = std::chrono::steady_clock::now();
    runRanks(communicators, [&](int rank, Communicator& communicator) {
      if (rank == late) std::this_thread::sleep_for(2000ms);
      values[rank].assign(count, static_cast<float>(rank + 1));
      reduced[rank] = communicator.allReduceWithin(values[rank].data(), count, 20s);
      if (rank == late) std::this_thread::sleep_for(2000ms);
      int64_t step = rank == late ? 4242 : 0;
      broadcast[rank] = communicator.broadcastWithin(&step, sizeof(step), late, 20s);
      received[rank] = step;
    });
    EXPECT_GE(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 4.0);
    const float sum = static_cast<float>(size * (size + 1) / 2);
    for (int rank = 0; rank < size; ++rank) {
      ASSERT_TRUE(reduced[rank].ok()) << "rank " << rank << ", " << count << " floats: " << reduced[rank].toString();
      ASSERT_TRUE(broadcast[rank].ok()) << "rank " << rank << ": " << broadcast[rank].toString();
      EXPECT_EQ(values[rank].front(), sum);
      EXPECT_EQ(values[rank].back(), sum);
      EXPECT_EQ(received[rank], 4242);
    }
  }
  // The communicator goes on working for the operations without a deadline of their own.
  std::vector<float> one(size, 1.0f);
  runRanks(communicators, [&](int rank, Communicator& communicator) {
    EXPECT_TRUE(communicator.allReduce(&one[rank], 1).ok());
  });
  EXPECT_EQ(one[0], static_cast<float>(size));
}

INSTANTIATE_TEST_SUITE_P(TwoThreeAndFourRanks, GlooOwnDeadline, ::testing::Values(2, 3, 4),
                         [](const auto& info) { return std::to_string(info.param) + "Ranks"; });

TEST(GlooTimeout, ConnectingWithoutPeersFailsWithDeadlineExceeded) {
  auto store = makeMemoryStore();
  GlooOptions options;
  options.rank = 0;
  options.size = 2;
  options.timeout = 500ms;
  const auto start = std::chrono::steady_clock::now();
  auto communicator = createGlooCommunicator(options, store);
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_FALSE(communicator.ok());
  EXPECT_EQ(communicator.status().code(), StatusCode::kDeadlineExceeded) << communicator.status().toString();
  EXPECT_LT(elapsed, 5.0);
}

TEST(GlooConnect, AnAddressThisMachineDoesNotHaveIsARetryableFailureOfThisWorker) {
  // 192.0.2.1 (TEST-NET-1) is nobody's: binding to it fails. That is this worker's network (a stale pod
  // IP, an interface not up yet), not a bug: retryable, and this worker is the cause.
  auto store = makeMemoryStore();
  GlooOptions options;
  options.rank = 0;
  options.size = 2;
  options.hostAddress = "192.0.2.1";
  options.timeout = 500ms;
  auto communicator = createGlooCommunicator(options, store);
  ASSERT_FALSE(communicator.ok());
  EXPECT_EQ(communicator.status().code(), StatusCode::kResourceUnavailable) << communicator.status().toString();
  EXPECT_GE(exitCodeFor(communicator.status()), 128);
}

TEST(GlooSingleRank, OperationsAreIdentity) {
  auto communicators = connect(1);
  ASSERT_EQ(communicators.size(), 1u);
  std::vector<float> data = {1.5f, -2.0f};
  ASSERT_TRUE(communicators[0]->allReduce(data.data(), 2).ok());
  EXPECT_EQ(data, (std::vector<float>{1.5f, -2.0f}));
  ASSERT_TRUE(communicators[0]->barrier().ok());
}

TEST(MemoryStore, GetWaitsForALaterSetAndTimesOut) {
  auto store = makeMemoryStore();
  auto missing = store->get("absent", 50ms);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kDeadlineExceeded);

  std::thread setter([&] {
    std::this_thread::sleep_for(100ms);
    ASSERT_TRUE(store->set("key", "value").ok());
  });
  auto value = store->get("key", 5s);
  setter.join();
  ASSERT_TRUE(value.ok()) << value.status().toString();
  EXPECT_EQ(*value, "value");
}

}  // namespace
}  // namespace tandem::comm
