// Runs a job's workers as local processes, the way `tandem run` does: the environment of DESIGN.md §3,
// logs prefixed with the rank, one progress display, a summary, and a supervisor that stops the whole
// group when any worker dies or the user presses Ctrl-C (no orphans: children also die with us).
#pragma once

#include <algorithm>

#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tandem/launch/core_binding.h"
#include "tandem/manifest/job_spec.h"

namespace tandem::launch {

struct LocalJobOptions {
  manifest::JobSpec spec;            // validated, with spec.workers already overridden
  std::string configPath;            // absolute path handed to workers as TANDEM_CONFIG
  std::string workerBinary;          // tandem-worker
  std::vector<std::string> workerArguments;  // extra flags for every worker
  // On Ctrl-C or SIGTERM: SIGTERM to the workers, then SIGKILL after this (their grace period and a
  // margin). The rest of a group whose worker failed gets at most 5 s: no collective can succeed there.
  std::chrono::milliseconds stopGrace{5000};
  bool quiet = false;                // no progress display (logs still flow)
  bool customCommand = false;        // workerBinary is the user's command (custom mode): no metrics port
  int64_t generation = 0;            // TANDEM_GENERATION: the job's restart count
  // --bind-cores: rank r runs on coreSets[r].cpus with coreSets[r].cores GEMM threads; empty: no binding.
  std::vector<CoreSet> coreSets;
  // When the previous generation failed: the first step of this one reports the recovery time.
  std::optional<std::chrono::steady_clock::time_point> previousFailure;
  // spec.runPolicy.activeDeadlineSeconds from the run's start: the group is then stopped as on SIGTERM
  // (the workers checkpoint within their grace period) and the result says so.
  std::optional<std::chrono::steady_clock::time_point> activeDeadline;
};

// "Steps lost" over a restarted run: the steps a generation trains that an earlier generation had
// already finished, i.e. its (resumedFromStep, lastStep] overlapping (0, the furthest step so far]. A
// generation that failed before training (a port taken, a peer lost at the rendezvous) adds nothing,
// whatever it reported, and does not hide the next generation's loss.
class StepsLostCounter {
 public:
  void addGeneration(int64_t resumedFromStep, int64_t lastStep) {
    lost_ += std::max<int64_t>(0, std::min(lastStep, furthest_) - resumedFromStep);
    furthest_ = std::max(furthest_, lastStep);
  }
  int64_t stepsLost() const { return lost_; }

 private:
  int64_t furthest_ = 0;  // the furthest step any generation finished
  int64_t lost_ = 0;
};

struct LocalJobResult {
  int exitCode = 0;                  // the job's: 0, or the first failed worker's
  int failedRank = -1;
  std::string failure;               // "worker rank 2 exited with code 137 (killed by signal 9)"
  bool interrupted = false;          // Ctrl-C / SIGTERM to tandem itself
  bool deadlineExceeded = false;     // stopped at options.activeDeadline
  double wallSeconds = 0.0;
  std::optional<nlohmann::json> summary;  // rank 0's @summary
  int64_t lastStep = 0;              // the last step rank 0 reported finished
  int64_t resumedFromStep = 0;       // the checkpoint step rank 0 resumed from (0: fresh start)
  std::optional<std::chrono::steady_clock::time_point> failureDetected;  // when the first worker died
  std::optional<double> recoverySeconds;  // previousFailure to this generation's first step
};

// A number from a worker's @progress or @summary line, or `fallback` when it is missing or not a number
// (a NaN loss travels as null; a custom command may print anything).
double numberOr(const nlohmann::json& object, const char* key, double fallback);
int64_t integerOr(const nlohmann::json& object, const char* key, int64_t fallback);

// The kernel's ephemeral port range (net.ipv4.ip_local_port_range; Linux's default when unreadable).
struct EphemeralPortRange {
  int low = 32768;
  int high = 60999;
};
EphemeralPortRange ephemeralPortRange();

// Whether nothing listens on, or is bound to, TCP `port` on any IPv4 or IPv6 address.
bool portFree(int port);

// A TCP port free on every address for a worker to listen on moments later (rendezvous, metrics):
// below the ephemeral range when there is room, so no outgoing connection can take it in between, and
// never one this process handed out before. -1 when none can be bound.
int freePort();

// Blocks until every worker has exited.
LocalJobResult runLocalJob(const LocalJobOptions& options);

// Human form of a wait() status: "exited with code 3", "killed by signal 9".
std::string describeExit(int waitStatus);

}  // namespace tandem::launch
