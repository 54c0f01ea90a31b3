// tandem: the command line.
//   tandem run FILE [--workers N] [...]   runs the job's workers on this machine (no cluster needed)
//   tandem validate FILE                  checks a manifest and starts nothing
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "tandem/common/exit_codes.h"
#include "tandem/config.h"
#include "tandem/launch/local_job.h"
#include "tandem/manifest/job_spec.h"

namespace {

using namespace tandem;

const char* kUsage =
    "usage:\n"
    "  tandem run FILE [--workers N] [--max-steps N] [--dump-params FILE] [--loss-log FILE]\n"
    "                  [--rendezvous-timeout SECONDS] [--collective-timeout SECONDS] [--bucket-cap-mb MB] [--quiet]\n"
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
    } else if (argument == "--max-steps" || argument == "--dump-params" || argument == "--loss-log" ||
               argument == "--rendezvous-timeout" || argument == "--collective-timeout" ||
               argument == "--bucket-cap-mb") {
      options.workerArguments.push_back(argument);
      options.workerArguments.push_back(value());
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
  if (spec.data.kind == "fashion-mnist" && !std::filesystem::is_directory(spec.data.path)) {
    std::cerr << "spec.data.path: dataset directory " << spec.data.path
              << " does not exist (Debian: apt-get install dataset-fashion-mnist)\n";
    return kExitInvalidConfig;
  }
  options.spec = spec;
  options.configPath = std::filesystem::absolute(file).string();
  options.workerBinary = siblingBinary("tandem-worker");
  std::cerr << "tandem: running " << spec.jobKey() << " with " << spec.workers << " local worker"
            << (spec.workers == 1 ? "" : "s") << "\n";
  launch::LocalJobResult result = launch::runLocalJob(options);
  if (result.summary) {
    const auto& summary = *result.summary;
    const double accuracy = summary.value("testAccuracy", 0.0) * 100.0;
    std::printf("summary: %s  test accuracy %.2f%%  test loss %.4f  steps %lld  wall %.1f s  train %.1f s  %.0f samples/s\n",
                spec.jobKey().c_str(), accuracy, summary.value("testLoss", 0.0),
                static_cast<long long>(summary.value("steps", int64_t{0})), result.wallSeconds,
                summary.value("trainSeconds", 0.0), summary.value("samplesPerSecond", 0.0));
    std::fflush(stdout);
  }
  if (result.interrupted) {
    std::cerr << "tandem: interrupted; all workers stopped\n";
  } else if (result.exitCode != 0) {
    std::cerr << "tandem: job failed: " << result.failure << "\n";
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
