// Liveness through rank 0's rendezvous server (DESIGN.md §4). Every rank tells the server it is alive
// from a thread of its own, so a long step, evaluation or checkpoint never makes a rank look silent;
// only a stopped, hung or cut-off process goes quiet. A rank whose collective timed out then asks the
// server who went quiet, and its error names that rank instead of "a peer".
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "tandem/rendezvous/rendezvous.h"

namespace tandem::rendezvous {

// Runs `tick` at once and then every `interval` on a thread of its own, until `tick` returns false or
// this is destroyed (which waits for a tick in progress). `stopping()`: the destructor has begun.
class PeriodicThread {
 public:
  PeriodicThread(std::chrono::milliseconds interval, std::function<bool()> tick);
  ~PeriodicThread();
  PeriodicThread(const PeriodicThread&) = delete;
  PeriodicThread& operator=(const PeriodicThread&) = delete;
  bool stopping();

 private:
  const std::chrono::milliseconds interval_;
  std::function<bool()> tick_;
  std::mutex mutex_;
  std::condition_variable stop_;
  bool stopping_ = false;
  std::thread thread_;
};

class HeartbeatSender {
 public:
  // Sends a heartbeat every `interval` (each with that deadline; failures are ignored: the server
  // judges silence, not the sender) until destroyed.
  HeartbeatSender(std::shared_ptr<RendezvousClient> client, int rank, std::chrono::milliseconds interval);

 private:
  std::shared_ptr<RendezvousClient> client_;
  PeriodicThread thread_;  // last: it starts beating with the members above
};

// For a wait allowed to run longer than a collective timeout (a resume waiting on the checkpoint writers'
// reads), which would notice a hung peer only at its own deadline: while it exists, asks rank 0's server
// every `interval` who has gone silent (silent: not heard from for `silentAfter`) and calls `onSilent`
// once, from its own thread, with "rank 3 has been silent for over 30 s (...)" when a peer has stayed
// silent for `limit` in all. A server that stops answering counts as rank 0 gone silent.
class SilenceWatch {
 public:
  SilenceWatch(std::shared_ptr<RendezvousClient> client, int rank, std::chrono::milliseconds silentAfter,
               std::chrono::milliseconds limit, std::chrono::milliseconds interval,
               std::function<void(const std::string&)> onSilent);

 private:
  bool check();  // false once it has reported

  std::shared_ptr<RendezvousClient> client_;
  const int rank_;
  const std::chrono::milliseconds silentAfter_, limit_, interval_;
  std::function<void(const std::string&)> onSilent_;
  std::optional<std::chrono::steady_clock::time_point> silentSince_;  // on the thread only
  PeriodicThread thread_;  // last
};

// For an error after a collective timed out: "rank 3 has been silent for over 15 s (stopped, hung or cut
// off)", or that the server (rank 0) did not answer either. Empty when the server heard from everyone.
// silentAfter is the server's heartbeat timeout; the query waits at most `deadline`.
std::string describeSilentPeers(RendezvousClient& client, int rank, std::chrono::milliseconds silentAfter,
                                std::chrono::milliseconds deadline);

}  // namespace tandem::rendezvous
