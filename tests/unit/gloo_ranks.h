// Test scaffolding shared by the unit tests of comm, parallel and pipeline code: N ranks as threads of
// one process, connected over loopback Gloo through an in-memory store.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "tandem/comm/communicator.h"

namespace tandem::test_support {

// Creates `size` connected communicators, one per thread (the full mesh needs every rank at once).
// Returns an empty vector (after a failed expectation) when any rank could not connect.
inline std::vector<std::unique_ptr<comm::Communicator>> connectGlooRanks(
    int size, std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  auto store = comm::makeMemoryStore();
  std::vector<std::unique_ptr<comm::Communicator>> communicators(size);
  std::vector<Status> statuses(size);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < size; ++rank) {
    threads.emplace_back([&, rank] {
      comm::GlooOptions options;
      options.rank = rank;
      options.size = size;
      options.timeout = timeout;
      auto communicator = comm::createGlooCommunicator(options, store);
      if (communicator.ok())
        communicators[rank] = std::move(communicator).value();
      else
        statuses[rank] = communicator.status();
    });
  }
  for (auto& thread : threads) thread.join();
  for (int rank = 0; rank < size; ++rank) {
    EXPECT_TRUE(statuses[rank].ok()) << "rank " << rank << ": " << statuses[rank].toString();
    if (communicators[rank] == nullptr) return {};
  }
  return communicators;
}

// Runs body(rank, communicator) on one thread per rank and joins them all.
inline void runRanks(std::vector<std::unique_ptr<comm::Communicator>>& communicators,
                     const std::function<void(int, comm::Communicator&)>& body) {
  std::vector<std::thread> threads;
  for (size_t rank = 0; rank < communicators.size(); ++rank)
    threads.emplace_back([&, rank] { body(static_cast<int>(rank), *communicators[rank]); });
  for (auto& thread : threads) thread.join();
}

}  // namespace tandem::test_support
