#include "tandem/rendezvous/heartbeat.h"

#include <sstream>

namespace tandem::rendezvous {

HeartbeatSender::HeartbeatSender(std::shared_ptr<RendezvousClient> client, int rank, std::chrono::milliseconds interval)
    : client_(std::move(client)), rank_(rank), interval_(interval), thread_([this] { run(); }) {}

HeartbeatSender::~HeartbeatSender() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  stop_.notify_all();
  thread_.join();
}

void HeartbeatSender::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    lock.unlock();
    (void)client_->heartbeat(rank_, 0, interval_);
    lock.lock();
    stop_.wait_for(lock, interval_, [&] { return stopping_; });
  }
}

std::string describeSilentPeers(RendezvousClient& client, int rank, std::chrono::milliseconds silentAfter,
                                std::chrono::milliseconds deadline) {
  auto silent = client.heartbeat(rank, 0, deadline);
  std::ostringstream text;
  const double seconds = std::chrono::duration<double>(silentAfter).count();
  if (!silent.ok()) {
    text << "the rendezvous server (rank 0) did not answer a heartbeat either (" << silent.status().message()
         << "): rank 0 may be the one stopped, hung or cut off";
    return text.str();
  }
  if (silent->empty()) return "";
  text << (silent->size() == 1 ? "rank " : "ranks ");
  for (size_t i = 0; i < silent->size(); ++i) text << (i == 0 ? "" : ", ") << (*silent)[i];
  text << (silent->size() == 1 ? " has" : " have") << " been silent for over " << seconds
       << " s (stopped, hung or cut off)";
  return text.str();
}

}  // namespace tandem::rendezvous
