#include "tandem/rendezvous/heartbeat.h"

#include <optional>
#include <sstream>
#include <vector>

namespace tandem::rendezvous {

PeriodicThread::PeriodicThread(std::chrono::milliseconds interval, std::function<bool()> tick)
    : interval_(interval), tick_(std::move(tick)), thread_([this] {
        std::unique_lock<std::mutex> lock(mutex_);
        while (!stopping_) {
          lock.unlock();
          if (!tick_()) return;
          lock.lock();
          stop_.wait_for(lock, interval_, [&] { return stopping_; });
        }
      }) {}

PeriodicThread::~PeriodicThread() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  stop_.notify_all();
  thread_.join();
}

bool PeriodicThread::stopping() {
  std::lock_guard<std::mutex> lock(mutex_);
  return stopping_;
}

HeartbeatSender::HeartbeatSender(std::shared_ptr<RendezvousClient> client, int rank, std::chrono::milliseconds interval)
    : client_(std::move(client)), thread_(interval, [this, rank, interval] {
        (void)client_->heartbeat(rank, 0, interval);
        return true;
      }) {}

namespace {

// The answer to a heartbeat, in words: who has been silent for over `silentFor`; empty when nobody.
// `afterATimeout`: said after a collective timed out, so the server's silence is a second symptom.
std::string describeAnswer(const StatusOr<std::vector<int>>& silent, std::chrono::milliseconds silentFor,
                           bool afterATimeout) {
  std::ostringstream text;
  const double seconds = std::chrono::duration<double>(silentFor).count();
  if (!silent.ok()) {
    text << "the rendezvous server (rank 0) did not answer a heartbeat" << (afterATimeout ? " either" : "") << " ("
         << silent.status().message()
         << "): rank 0 may be the one stopped, hung or cut off";
    return text.str();
  }
  if (silent->empty()) return "";
  text << (silent->size() == 1 ? "rank " : "ranks ");
  for (size_t i = 0; i < silent->size(); ++i) text << (i == 0 ? "" : ", ") << silent->at(i);
  text << (silent->size() == 1 ? " has" : " have") << " been silent for over " << seconds
       << " s (stopped, hung or cut off)";
  return text.str();
}

}  // namespace

std::string describeSilentPeers(RendezvousClient& client, int rank, std::chrono::milliseconds silentAfter,
                                std::chrono::milliseconds deadline) {
  return describeAnswer(client.heartbeat(rank, 0, deadline), silentAfter, /*afterATimeout=*/true);
}

SilenceWatch::SilenceWatch(std::shared_ptr<RendezvousClient> client, int rank, std::chrono::milliseconds silentAfter,
                           std::chrono::milliseconds limit, std::chrono::milliseconds interval,
                           std::function<void(const std::string&)> onSilent)
    : client_(std::move(client)),
      rank_(rank),
      silentAfter_(silentAfter),
      limit_(limit),
      interval_(interval),
      onSilent_(std::move(onSilent)),
      thread_(interval, [this] { return check(); }) {}

bool SilenceWatch::check() {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point asked = Clock::now();
  const StatusOr<std::vector<int>> silent = client_->heartbeat(rank_, 0, interval_);
  const Clock::time_point answered = Clock::now();
  const bool quiet = !silent.ok() || !silent->empty();
  // A peer the server calls silent was last heard at least silentAfter before the answer (never more:
  // the server's moment lies between asking and the answer); a server that does not answer, from the
  // question on.
  if (!quiet)
    silentSince_.reset();
  else if (!silentSince_)
    silentSince_ = silent.ok() ? answered - silentAfter_ : asked;
  if (!quiet || Clock::now() - *silentSince_ < limit_ || thread_.stopping()) return true;
  onSilent_(describeAnswer(silent, limit_, /*afterATimeout=*/false));
  return false;
}

}  // namespace tandem::rendezvous
