// Liveness through rank 0's rendezvous server (DESIGN.md §4). Every rank tells the server it is alive
// from a thread of its own, so a long step, evaluation or checkpoint never makes a rank look silent;
// only a stopped, hung or cut-off process goes quiet. A rank whose collective timed out then asks the
// server who went quiet, and its error names that rank instead of "a peer".
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "tandem/rendezvous/rendezvous.h"

namespace tandem::rendezvous {

class HeartbeatSender {
 public:
  // Sends a heartbeat every `interval` (each with that deadline; failures are ignored: the server
  // judges silence, not the sender) until destroyed.
  HeartbeatSender(std::shared_ptr<RendezvousClient> client, int rank, std::chrono::milliseconds interval);
  ~HeartbeatSender();
  HeartbeatSender(const HeartbeatSender&) = delete;
  HeartbeatSender& operator=(const HeartbeatSender&) = delete;

 private:
  void run();

  std::shared_ptr<RendezvousClient> client_;
  const int rank_;
  const std::chrono::milliseconds interval_;
  std::mutex mutex_;
  std::condition_variable stop_;
  bool stopping_ = false;
  std::thread thread_;
};

// For an error after a collective timed out: "rank 3 has been silent for over 15 s (stopped, hung or cut
// off)", or that the server (rank 0) did not answer either. Empty when the server heard from everyone.
// silentAfter is the server's heartbeat timeout; the query waits at most `deadline`.
std::string describeSilentPeers(RendezvousClient& client, int rank, std::chrono::milliseconds silentAfter,
                                std::chrono::milliseconds deadline);

}  // namespace tandem::rendezvous
