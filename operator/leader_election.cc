#include "tandem/operator/leader_election.h"

#include <condition_variable>
#include <ctime>
#include <mutex>
#include <optional>
#include <thread>

#include "tandem/common/log.h"
#include "tandem/operator/controller.h"

namespace tandem::operator_core {
namespace {
using json = nlohmann::json;
using std::chrono::steady_clock;

// Sleeps `duration` in 50 ms steps, returning early once `stop` is set.
void sleepUnless(const std::atomic<bool>& stop, std::chrono::milliseconds duration) {
  for (auto slept = std::chrono::milliseconds(0); slept < duration && !stop; slept += std::chrono::milliseconds(50))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
}
}  // namespace

std::string formatMicroTime(std::chrono::system_clock::time_point time) {
  const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(time.time_since_epoch()).count();
  const std::time_t seconds = static_cast<std::time_t>(micros / 1000000);
  std::tm utc{};
  gmtime_r(&seconds, &utc);
  char text[48];
  const size_t length = std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S", &utc);
  std::snprintf(text + length, sizeof text - length, ".%06lldZ", static_cast<long long>(micros % 1000000));
  return text;
}

LeaderElector::LeaderElector(kube::KubeClient& client, LeaderElectionOptions options)
    : client_(client), options_(std::move(options)) {}

LeaderElector::Attempt LeaderElector::tryAcquireOrRenew() {
  const std::string path = resources::kLeases.objectPath(options_.nameSpace, options_.name);
  const std::string now = formatMicroTime(std::chrono::system_clock::now());
  const int64_t durationSeconds =
      std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::seconds>(options_.leaseDuration).count());
  auto current = client_.get(path);
  if (!current.ok()) {
    if (!kube::isNotFound(current.status())) {
      log::warning() << "leader election: reading lease " << options_.nameSpace << "/" << options_.name << ": "
                     << current.status().message();
      return Attempt::kError;
    }
    json lease = {{"apiVersion", "coordination.k8s.io/v1"},
                  {"kind", "Lease"},
                  {"metadata", {{"name", options_.name}, {"namespace", options_.nameSpace}}},
                  {"spec",
                   {{"holderIdentity", options_.identity},
                    {"leaseDurationSeconds", durationSeconds},
                    {"acquireTime", now},
                    {"renewTime", now},
                    {"leaseTransitions", 0}}}};
    auto created = client_.create(resources::kLeases.collectionPath(options_.nameSpace), lease);
    if (!created.ok()) return kube::isAlreadyExists(created.status()) ? Attempt::kHeldByOther : Attempt::kError;
    observedHolder_ = options_.identity;
    observedRenewTime_ = now;
    observedAt_ = steady_clock::now();
    return Attempt::kLeading;
  }
  json lease = std::move(current).value();
  json& spec = lease["spec"];
  const std::string holder = spec.value("holderIdentity", "");
  const std::string renewTime = spec.value("renewTime", "");
  if (holder != observedHolder_ || renewTime != observedRenewTime_) {
    // Expiry is measured from when *we* saw the record change, not from the holder's clock.
    observedHolder_ = holder;
    observedRenewTime_ = renewTime;
    observedAt_ = steady_clock::now();
  }
  const auto heldFor = std::chrono::seconds(spec.value("leaseDurationSeconds", durationSeconds));
  const bool expired = steady_clock::now() > observedAt_ + heldFor;
  if (!holder.empty() && holder != options_.identity && !expired) {
    if (lastReported_ != holder) {
      log::info() << "leader election: lease " << options_.nameSpace << "/" << options_.name << " is held by " << holder
                  << "; standing by";
      lastReported_ = holder;
    }
    return Attempt::kHeldByOther;
  }
  if (holder != options_.identity) {
    spec["acquireTime"] = now;
    spec["leaseTransitions"] = spec.value("leaseTransitions", 0) + (holder.empty() ? 0 : 1);
  }
  spec["holderIdentity"] = options_.identity;
  spec["leaseDurationSeconds"] = durationSeconds;
  spec["renewTime"] = now;
  auto updated = client_.update(path, lease);  // carries resourceVersion: a concurrent winner makes this 409
  if (!updated.ok()) {
    if (!kube::isConflict(updated.status()))
      log::warning() << "leader election: updating lease: " << updated.status().message();
    return Attempt::kError;
  }
  observedHolder_ = options_.identity;
  observedRenewTime_ = now;
  observedAt_ = steady_clock::now();
  return Attempt::kLeading;
}

bool LeaderElector::acquire(const std::atomic<bool>& stop) {
  log::info() << "leader election: " << options_.identity << " trying to acquire lease " << options_.nameSpace << "/"
              << options_.name;
  while (!stop) {
    if (tryAcquireOrRenew() == Attempt::kLeading) {
      log::info() << "leader election: " << options_.identity << " acquired lease " << options_.nameSpace << "/"
                  << options_.name;
      return true;
    }
    // Wake up right when the observed lease expires if that comes before the next retry.
    auto wait = options_.retryPeriod;
    if (!observedHolder_.empty()) {
      const auto expiresIn = std::chrono::duration_cast<std::chrono::milliseconds>(
          observedAt_ + options_.leaseDuration - steady_clock::now() + std::chrono::milliseconds(50));
      if (expiresIn > std::chrono::milliseconds(0) && expiresIn < wait) wait = expiresIn;
    }
    sleepUnless(stop, wait);
  }
  return false;
}

bool LeaderElector::holdUntil(const std::atomic<bool>& stop) {
  std::atomic<steady_clock::rep> lastRenewal{steady_clock::now().time_since_epoch().count()};
  auto sinceRenewal = [&] {
    return steady_clock::now() - steady_clock::time_point(steady_clock::duration(lastRenewal.load()));
  };
  // The loop below checks the deadline only between calls; the watchdog also sees a call that hangs,
  // and a stop that comes while one hangs: it cancels the call after a second, so that a SIGTERM'd
  // operator does not wait on the API server (release() then fails fast; the Lease expires by itself).
  constexpr auto kStopPatience = std::chrono::seconds(1);
  std::atomic<bool> holding{true};
  std::mutex callMutex;      // so that a renewal that just returned is not cancelled after the fact
  bool callInFlight = false;  // under callMutex
  std::optional<steady_clock::time_point> stopSeen;
  std::thread watchdog([&] {
    while (holding) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      if (!holding) return;
      if (options_.onRenewDeadlineMissed && sinceRenewal() > options_.renewDeadline) {
        log::error() << "leader election: no renewal for "
                     << std::chrono::duration_cast<std::chrono::milliseconds>(options_.renewDeadline).count()
                     << " ms while the API server has not answered";
        options_.onRenewDeadlineMissed();
        return;
      }
      if (stop && !stopSeen) stopSeen = steady_clock::now();
      if (stopSeen && steady_clock::now() - *stopSeen > kStopPatience) {
        std::lock_guard<std::mutex> lock(callMutex);
        if (!callInFlight) continue;
        log::warning() << "leader election: stopping while a renewal still waits on the API server: cancelling it";
        client_.cancel();
        return;
      }
    }
  });
  bool stillLeading = true;
  while (!stop) {
    sleepUnless(stop, options_.retryPeriod);
    if (stop) break;
    {
      std::lock_guard<std::mutex> lock(callMutex);
      if (stop) break;
      callInFlight = true;
    }
    const Attempt attempt = tryAcquireOrRenew();
    {
      std::lock_guard<std::mutex> lock(callMutex);  // waits for a cancel() already under way
      callInFlight = false;
    }
    if (attempt == Attempt::kLeading) {
      lastRenewal = steady_clock::now().time_since_epoch().count();
    } else if (attempt == Attempt::kHeldByOther) {
      log::error() << "leader election: lease taken over by " << observedHolder_;
      stillLeading = false;
      break;
    } else if (sinceRenewal() > options_.renewDeadline) {
      log::error() << "leader election: could not renew the lease for "
                   << std::chrono::duration_cast<std::chrono::seconds>(options_.renewDeadline).count() << " s";
      stillLeading = false;
      break;
    }
  }
  holding = false;
  watchdog.join();
  return stillLeading;
}

void LeaderElector::release(std::chrono::milliseconds within) {
  std::mutex mutex;
  std::condition_variable finished;
  bool done = false;
  std::thread guard([&] {
    std::unique_lock<std::mutex> lock(mutex);
    if (!finished.wait_for(lock, within, [&] { return done; })) {
      log::warning() << "leader election: the API server did not answer within "
                     << std::chrono::duration_cast<std::chrono::milliseconds>(within).count()
                     << " ms; the lease expires by itself";
      client_.cancel();
    }
  });
  releaseNow();
  {
    std::lock_guard<std::mutex> lock(mutex);
    done = true;
  }
  finished.notify_all();
  guard.join();
}

void LeaderElector::releaseNow() {
  const std::string path = resources::kLeases.objectPath(options_.nameSpace, options_.name);
  auto current = client_.get(path);
  if (!current.ok()) return;
  json lease = std::move(current).value();
  if (lease["spec"].value("holderIdentity", "") != options_.identity) return;
  lease["spec"]["holderIdentity"] = "";
  lease["spec"]["leaseDurationSeconds"] = 1;
  lease["spec"]["renewTime"] = formatMicroTime(std::chrono::system_clock::now());
  auto updated = client_.update(path, lease);
  if (updated.ok())
    log::info() << "leader election: released lease " << options_.nameSpace << "/" << options_.name;
  else
    log::warning() << "leader election: releasing lease: " << updated.status().message();
}

}  // namespace tandem::operator_core
