// Leader election on a coordination.k8s.io/v1 Lease, with client-go's rules: a candidate takes the Lease
// when it is free or when its holder has not renewed it for leaseDuration, measured on the candidate's own
// clock from when it last saw the record change (so clocks need not agree); the leader renews every
// retryPeriod and gives up leading when it could not renew for renewDeadline. Updates carry the Lease's
// resourceVersion, so two candidates never both win. release() hands the Lease over at once on shutdown.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "tandem/kube/client.h"

namespace tandem::operator_core {

struct LeaderElectionOptions {
  std::string nameSpace;
  std::string name = "tandem-operator";
  std::string identity;
  std::chrono::milliseconds leaseDuration{15000};
  std::chrono::milliseconds renewDeadline{10000};
  std::chrono::milliseconds retryPeriod{2000};
  // Called from a watchdog thread once renewDeadline has passed since the last renewal while a renewal
  // is still waiting on a stalled API server (each call retries for up to minutes): by then another
  // replica may hold the Lease, so the caller must stop acting at once (the operator exits). Without it,
  // holdUntil notices only when the call returns.
  std::function<void()> onRenewDeadlineMissed;
};

class LeaderElector {
 public:
  LeaderElector(kube::KubeClient& client, LeaderElectionOptions options);

  // Blocks until this candidate holds the Lease (true) or `stop` is set (false).
  bool acquire(const std::atomic<bool>& stop);
  // While leading: renews every retryPeriod; returns false as soon as leadership is lost (no renewal for
  // renewDeadline, or another holder), true when `stop` was set. A renewal still waiting on the API server
  // a second after `stop` is cancelled, which ends the client for good (release() then does nothing).
  bool holdUntil(const std::atomic<bool>& stop);
  // Gives the Lease up (holder cleared) so that another replica takes over without waiting. Best effort
  // and bounded: calls still waiting after `within` are cancelled, which ends the client for good (give
  // the elector a client of its own), and the Lease then expires by itself.
  void release(std::chrono::milliseconds within = std::chrono::seconds(2));

  const LeaderElectionOptions& options() const { return options_; }

 private:
  enum class Attempt { kLeading, kHeldByOther, kError };
  Attempt tryAcquireOrRenew();
  void releaseNow();

  kube::KubeClient& client_;
  LeaderElectionOptions options_;
  std::string observedHolder_;
  std::string observedRenewTime_;
  std::chrono::steady_clock::time_point observedAt_{};
  std::string lastReported_;
};

// Lease times are MicroTime: RFC 3339 with exactly six fractional digits.
std::string formatMicroTime(std::chrono::system_clock::time_point time);

}  // namespace tandem::operator_core
