// tandem: the command line.
//   tandem run FILE [--workers N] [...]   runs the job's workers on this machine (no cluster needed)
//   tandem validate FILE                  checks a manifest and starts nothing
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <thread>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "tandem/common/exit_codes.h"
#include "tandem/common/flags.h"
#include "tandem/config.h"
#include "tandem/launch/local_job.h"
#include "tandem/manifest/job_spec.h"

namespace {

using namespace tandem;

const char* kUsage =
    "usage:\n"
    "  tandem run FILE [--workers N] [--max-steps N] [--dump-params FILE] [--loss-log FILE]\n"
    "                  [--rendezvous-timeout SECONDS] [--collective-timeout SECONDS] [--bucket-cap-mb MB]\n"
    "                  [--grace-seconds SECONDS] [--checkpoint-timeout SECONDS] [--bind-cores] [--quiet]\n"
    "  tandem validate FILE\n"
    "  tandem version\n";

int printErrors(const std::vector<manifest::FieldError>& errors) {
  for (const auto& error : errors) std::cerr << error.toString() << "\n";
  return kExitInvalidConfig;
}

// tandem-worker lives beside tandem (build tree and install tree alike).
std::string siblingBinary(const std::string& name) {
  char self[PATH_MAX];
  const ssize_t length = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (length <= 0) return name;
  self[length] = '\0';
  return (std::filesystem::path(self).parent_path() / name).string();
}

struct RunOutcome {
  launch::LocalJobResult last;
  int64_t restarts = 0;     // counted against backoffLimit
  int64_t preemptions = 0;  // SIGTERM exits (143): restarted without counting
  int64_t stepsLost = 0;    // steps trained again after restarts
  double wallSeconds = 0.0;
  std::string verdict;      // why the run was not restarted
};

// spec.runPolicy for local runs: a failed generation is stopped whole and restarted as the next
// generation (the workers resume from their checkpoint), unless the policy says otherwise.
RunOutcome runWithRestarts(launch::LocalJobOptions options) {
  const auto& policy = options.spec.runPolicy;
  RunOutcome outcome;
  launch::StepsLostCounter stepsLost;
  for (int64_t generation = 0;; ++generation) {
    options.generation = generation;
    outcome.last = launch::runLocalJob(options);
    const auto& result = outcome.last;
    options.previousFailure = result.failureDetected;
    outcome.wallSeconds += result.wallSeconds;
    stepsLost.addGeneration(result.resumedFromStep, result.lastStep);
    outcome.stepsLost = stepsLost.stepsLost();
    if (result.exitCode == 0 || result.interrupted) return outcome;
    const bool pastDeadline =
        options.activeDeadline && (result.deadlineExceeded || std::chrono::steady_clock::now() >= *options.activeDeadline);
    if (pastDeadline) {
      outcome.verdict = "DeadlineExceeded: not restarting";
      if (!result.deadlineExceeded) {  // failed on its own just before the deadline: the deadline still ends the job
        outcome.last.failure += "; spec.runPolicy.activeDeadlineSeconds has passed";
        outcome.last.exitCode = kExitDeadlineExceeded;
      }
      return outcome;
    }

    const bool preempted = result.exitCode == kExitTerminated;
    if (policy.restartPolicy == "Never") {
      outcome.verdict = "restartPolicy Never: not restarting";
      return outcome;
    }
    if (policy.restartPolicy == "ExitCode" && !isRetryableExit(result.exitCode)) {
      outcome.verdict = "restartPolicy ExitCode: exit code " + std::to_string(result.exitCode) +
                        " is permanent (1-127), not restarting";
      return outcome;
    }
    if (preempted) {
      ++outcome.preemptions;
    } else {
      if (outcome.restarts >= policy.backoffLimit) {
        outcome.verdict = "backoffLimit " + std::to_string(policy.backoffLimit) + " reached";
        return outcome;
      }
      ++outcome.restarts;
    }
    // Exponential back-off between generations, as Kubernetes does for failed pods.
    const auto delay = std::chrono::milliseconds(std::min<int64_t>(5000, 200LL << std::min<int64_t>(outcome.restarts, 5)));
    std::cerr << "tandem: " << (preempted ? "preempted (SIGTERM): " : "") << "restarting as generation " << generation + 1
              << " in " << delay.count() << " ms (restart " << outcome.restarts << " of backoffLimit "
              << policy.backoffLimit << (preempted ? ", preemptions do not count" : "") << ")" << std::endl;
    std::this_thread::sleep_for(delay);
    if (options.activeDeadline && std::chrono::steady_clock::now() >= *options.activeDeadline) {
      outcome.last.failure += "; spec.runPolicy.activeDeadlineSeconds passed during the back-off";
      outcome.last.exitCode = kExitDeadlineExceeded;
      outcome.verdict = "DeadlineExceeded: not restarting";
      return outcome;
    }
  }
}

int validate(const std::vector<std::string>& arguments) {
  if (arguments.size() != 1) {
    std::cerr << kUsage;
    return kExitInvalidConfig;
  }
  manifest::ParseResult parsed = manifest::loadManifest(arguments[0]);
  if (!parsed.ok()) return printErrors(parsed.errors);
  const auto& spec = parsed.spec;
  std::cout << arguments[0] << ": valid DistributedTrainingJob " << spec.jobKey() << " (" << spec.workers
            << " workers, " << spec.parallelism.pipelineStages << " pipeline stages, data-parallel degree "
            << spec.dataParallel() << ", config hash " << manifest::configHash(spec) << ")\n";
  return kExitOk;
}

int run(const std::vector<std::string>& arguments) {
  std::string file;
  int64_t workersOverride = 0;
  bool bindCores = false;
  double graceSeconds = 30;  // tandem-worker's default
  constexpr double kExitMarginSeconds = 5;
  launch::LocalJobOptions options;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const std::string& argument = arguments[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= arguments.size()) {
        std::cerr << argument << ": missing value\n" << kUsage;
        std::exit(kExitInvalidConfig);
      }
      return arguments[++i];
    };
    if (argument == "--workers") {
      const std::string text = value();
      char* end = nullptr;
      workersOverride = std::strtoll(text.c_str(), &end, 10);
      if (*end != '\0' || workersOverride < 1) {
        std::cerr << "--workers: expected a positive integer, got \"" << text << "\"\n";
        return kExitInvalidConfig;
      }
    } else if (argument == "--quiet") {
      options.quiet = true;
    } else if (argument == "--bind-cores") {
      bindCores = true;
    } else if (argument == "--grace-seconds") {
      const std::string text = value();
      StatusOr<double> seconds = parsePositiveFlag(argument, text, kMaxFlagSeconds);
      if (!seconds.ok()) {
        std::cerr << seconds.status().message() << "\n";
        return kExitInvalidConfig;
      }
      graceSeconds = *seconds;
      options.workerArguments.push_back(argument);
      options.workerArguments.push_back(text);
    } else if (argument == "--max-steps" || argument == "--dump-params" || argument == "--loss-log" ||
               argument == "--rendezvous-timeout" || argument == "--collective-timeout" ||
               argument == "--bucket-cap-mb" || argument == "--checkpoint-timeout") {
      // Checked here as the workers check them: a bad value is one error now, not one per worker and
      // restart (OnFailure restarts even a permanent exit).
      const std::string text = value();
      Status checked = Status::Ok();
      if (argument == "--max-steps")
        checked = parseIntegerFlag(argument, text, 0, INT64_MAX).status();
      else if (argument == "--bucket-cap-mb")
        checked = parsePositiveFlag(argument, text, 1e6).status();
      else if (argument != "--dump-params" && argument != "--loss-log")
        checked = parsePositiveFlag(argument, text, kMaxFlagSeconds).status();
      if (!checked.ok()) {
        std::cerr << checked.message() << "\n";
        return kExitInvalidConfig;
      }
      options.workerArguments.push_back(argument);
      options.workerArguments.push_back(text);
    } else if (!argument.empty() && argument[0] == '-') {
      std::cerr << "unknown option " << argument << "\n" << kUsage;
      return kExitInvalidConfig;
    } else if (file.empty()) {
      file = argument;
    } else {
      std::cerr << "only one manifest file, got " << file << " and " << argument << "\n";
      return kExitInvalidConfig;
    }
  }
  if (file.empty()) {
    std::cerr << kUsage;
    return kExitInvalidConfig;
  }
  // Workers finish their step and checkpoint within the grace period after SIGTERM, then exit: SIGKILL
  // only after that and a margin for exiting, as a kubelet does after terminationGracePeriodSeconds.
  options.stopGrace = std::chrono::milliseconds(std::llround((graceSeconds + kExitMarginSeconds) * 1000));
  manifest::ParseResult parsed = manifest::loadManifest(file);
  if (!parsed.ok()) return printErrors(parsed.errors);
  manifest::JobSpec spec = parsed.spec;
  if (workersOverride > 0) {
    spec.workers = workersOverride;
    auto errors = manifest::validateCombinations(spec);
    if (!errors.empty()) {
      for (auto& error : errors) error.message += " (with --workers " + std::to_string(workersOverride) + ")";
      return printErrors(errors);
    }
  }
  if (spec.model.present && spec.data.kind == "fashion-mnist" && !std::filesystem::is_directory(spec.data.path)) {
    std::cerr << "spec.data.path: dataset directory " << spec.data.path
              << " does not exist (Debian: apt-get install dataset-fashion-mnist)\n";
    return kExitInvalidConfig;
  }
  if (bindCores) {
    auto topology = launch::readCpuTopology();
    auto plan = topology.ok() ? launch::planCoreBinding(*topology, static_cast<int>(spec.workers))
                              : StatusOr<std::vector<launch::CoreSet>>(topology.status());
    if (!plan.ok()) {
      std::cerr << plan.status().message() << "\n";
      return kExitInvalidConfig;
    }
    options.coreSets = std::move(*plan);
  }
  options.spec = spec;
  options.configPath = std::filesystem::absolute(file).string();
  options.workerBinary = siblingBinary("tandem-worker");
  if (!spec.model.present && spec.hasCustomCommand) {
    // Custom mode (DESIGN.md §2): the template's command runs unchanged, with the same environment.
    options.workerBinary = spec.customCommand.front();
    std::cerr << "tandem: custom mode: running " << options.workerBinary << " in every worker\n";
    // The worker flags are tandem-worker's; the user's command takes its own arguments from the template.
    // (--grace-seconds still sets how long tandem waits for the workers to stop.)
    for (size_t i = 0; i + 1 < options.workerArguments.size(); i += 2)
      if (options.workerArguments[i] != "--grace-seconds")
        std::cerr << "tandem: " << options.workerArguments[i]
                  << " has no effect in custom mode (the template's command runs as it is)\n";
    options.workerArguments.assign(spec.customCommand.begin() + 1, spec.customCommand.end());
    options.customCommand = true;
  }
  if (spec.runPolicy.suspend) {
    std::cerr << "spec.runPolicy.suspend: true: nothing runs (the operator keeps a suspended job's workers "
                 "deleted); set it to false to run the job\n";
    return kExitInvalidConfig;
  }
  std::cerr << "tandem: running " << spec.jobKey() << " with " << spec.workers << " local worker"
            << (spec.workers == 1 ? "" : "s") << "\n";
  // As the operator counts it: from this start, across restarts (their back-off included).
  if (spec.runPolicy.activeDeadlineSeconds > 0)
    options.activeDeadline = std::chrono::steady_clock::now() +
                             std::chrono::seconds(std::min<int64_t>(spec.runPolicy.activeDeadlineSeconds, int64_t{1} << 32));
  const RunOutcome outcome = runWithRestarts(options);
  const launch::LocalJobResult& result = outcome.last;
  if (result.summary) {
    const auto& summary = *result.summary;
    const double accuracy = launch::numberOr(summary, "testAccuracy", NAN) * 100.0;
    std::printf("summary: %s  test accuracy %.2f%%  test loss %.4f  steps %lld  wall %.1f s  train %.1f s  %.0f samples/s"
                "  restarts %lld (%lld preemptions)  steps lost %lld\n",
                spec.jobKey().c_str(), accuracy, launch::numberOr(summary, "testLoss", NAN),
                static_cast<long long>(launch::integerOr(summary, "steps", 0)), outcome.wallSeconds,
                launch::numberOr(summary, "trainSeconds", NAN), launch::numberOr(summary, "samplesPerSecond", NAN),
                static_cast<long long>(outcome.restarts + outcome.preemptions),
                static_cast<long long>(outcome.preemptions), static_cast<long long>(outcome.stepsLost));
    std::fflush(stdout);
  }
  if (result.interrupted) {
    std::cerr << "tandem: interrupted; all workers stopped\n";
  } else if (result.exitCode != 0) {
    std::cerr << "tandem: job failed: " << result.failure << (outcome.verdict.empty() ? "" : "; " + outcome.verdict)
              << " (restarts " << outcome.restarts << " of backoffLimit " << options.spec.runPolicy.backoffLimit << ", "
              << outcome.preemptions << " preemptions, steps lost " << outcome.stepsLost << ")\n";
  }
  return result.exitCode;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return kExitInvalidConfig;
  }
  const std::string command = argv[1];
  std::vector<std::string> arguments(argv + 2, argv + argc);
  if (command == "validate") return validate(arguments);
  if (command == "run") return run(arguments);
  if (command == "version" || command == "--version") {
    std::cout << "tandem " << TANDEM_VERSION << "\n";
    return kExitOk;
  }
  if (command == "help" || command == "--help" || command == "-h") {
    std::cout << kUsage;
    return kExitOk;
  }
  std::cerr << "unknown command " << command << "\n" << kUsage;
  return kExitInvalidConfig;
}
