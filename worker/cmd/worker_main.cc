// tandem-worker: one training process of a job (DESIGN.md §3). Reads its identity from the environment
// the operator or `tandem run` sets, rendezvous with its peers, trains, and exits with a code from
// tandem/common/exit_codes.h. Rank 0 prints machine-readable progress to stdout:
//   @progress {"step":..,"totalSteps":..,"epoch":..,"loss":..,"samplesPerSecond":..,"etaSeconds":..}
//   @eval {"step":..,"accuracy":..,"loss":..}
//   @summary {"steps":..,"testAccuracy":..,"samplesPerSecond":..,...}
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "tandem/comm/communicator.h"
#include "tandem/common/cpu_limit.h"
#include "tandem/common/exit_codes.h"
#include "tandem/common/flags.h"
#include "tandem/common/log.h"
#include "tandem/data/dataset.h"
#include "tandem/engine/trainer.h"
#include "tandem/kernels/gemm.h"
#include "tandem/kernels/gpu_info.h"
#include "tandem/launch/core_binding.h"
#include "tandem/manifest/job_spec.h"
#include "tandem/metrics/worker_metrics.h"
#include "tandem/rendezvous/heartbeat.h"
#include "tandem/rendezvous/rendezvous.h"

namespace {

using namespace tandem;

std::atomic<bool> stopRequested{false};
std::atomic<int> stopSignal{0};

void onStopSignal(int signal) {
  stopSignal = signal;
  stopRequested = true;
}

struct WorkerArguments {
  std::string configPath;
  int64_t maxSteps = 0;
  std::string dumpParametersPath;
  std::string lossLogPath;
  double rendezvousTimeoutSeconds = 120;
  double collectiveTimeoutSeconds = 30;
  double bucketCapMegabytes = 25;  // PyTorch DDP's default bucket_cap_mb
  double graceSeconds = 30;        // after SIGTERM: time to finish the step and checkpoint
  double checkpointTimeoutSeconds = 600;  // a checkpoint write in flight longer is hung storage
  int64_t metricsPort = 9400;      // 0: no metrics endpoint; TANDEM_METRICS_PORT overrides
  parallel::GradientAccumulator::Summing gradientSums = parallel::GradientAccumulator::Summing::kBackground;
};

const char* kUsage =
    "usage: tandem-worker [--config FILE] [--max-steps N] [--dump-params FILE] [--loss-log FILE]\n"
    "                     [--rendezvous-timeout SECONDS] [--collective-timeout SECONDS] [--bucket-cap-mb MB]\n"
    "                     [--grace-seconds SECONDS] [--checkpoint-timeout SECONDS] [--metrics-port PORT]\n"
    "Identity comes from TANDEM_RANK, TANDEM_WORLD_SIZE, TANDEM_GENERATION, TANDEM_RDZV_ENDPOINT,\n"
    "TANDEM_RDZV_TOKEN, TANDEM_POD_IP and TANDEM_CONFIG (DESIGN.md §3); TANDEM_LOG_LEVEL=debug adds\n"
    "per-step detail (a pipeline stage's timeline). TANDEM_COLLECTIVE_TIMEOUT_SECONDS and\n"
    "TANDEM_CHECKPOINT_TIMEOUT_SECONDS set those timeouts too (the flags win). TANDEM_GRADIENT_SUMS=inline\n"
    "sums microbatch gradients on the training thread instead of a thread of their own (for measurements).\n";

std::optional<std::string> environment(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

StatusOr<int64_t> parsePort(const std::string& name, const std::string& text) {
  return parseIntegerFlag(name, text, 0, 65535);
}

StatusOr<double> parseSeconds(const std::string& name, const std::string& text) {
  return parsePositiveFlag(name, text, kMaxFlagSeconds);
}

StatusOr<WorkerArguments> parseArguments(int argc, char** argv) {
  WorkerArguments arguments;
  if (auto config = environment("TANDEM_CONFIG")) arguments.configPath = *config;
  if (auto timeout = environment("TANDEM_RDZV_TIMEOUT_SECONDS")) {
    TANDEM_ASSIGN_OR_RETURN(arguments.rendezvousTimeoutSeconds, parseSeconds("TANDEM_RDZV_TIMEOUT_SECONDS", *timeout));
  }
  if (auto port = environment("TANDEM_METRICS_PORT")) {
    TANDEM_ASSIGN_OR_RETURN(arguments.metricsPort, parsePort("TANDEM_METRICS_PORT", *port));
  }
  if (auto level = environment("TANDEM_LOG_LEVEL")) {
    log::Level parsed;
    if (!log::parseLevel(*level, &parsed))
      return TANDEM_ERROR(StatusCode::kInvalidArgument,
                          "TANDEM_LOG_LEVEL: expected debug, info, warning or error, got \"" + *level + "\"");
    log::setMinimumLevel(parsed);
  }
  if (auto sums = environment("TANDEM_GRADIENT_SUMS")) {
    if (*sums == "inline")
      arguments.gradientSums = parallel::GradientAccumulator::Summing::kInline;
    else if (*sums != "background")
      return TANDEM_ERROR(StatusCode::kInvalidArgument,
                          "TANDEM_GRADIENT_SUMS: expected background or inline, got \"" + *sums + "\"");
  }
  if (auto timeout = environment("TANDEM_COLLECTIVE_TIMEOUT_SECONDS")) {
    TANDEM_ASSIGN_OR_RETURN(arguments.collectiveTimeoutSeconds, parseSeconds("TANDEM_COLLECTIVE_TIMEOUT_SECONDS", *timeout));
  }
  if (auto timeout = environment("TANDEM_CHECKPOINT_TIMEOUT_SECONDS")) {
    TANDEM_ASSIGN_OR_RETURN(arguments.checkpointTimeoutSeconds, parseSeconds("TANDEM_CHECKPOINT_TIMEOUT_SECONDS", *timeout));
  }
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (i + 1 >= argc) return TANDEM_ERROR(StatusCode::kInvalidArgument, flag + ": missing value\n" + kUsage);
    const std::string value = argv[++i];
    if (flag == "--config") {
      arguments.configPath = value;
    } else if (flag == "--max-steps") {
      TANDEM_ASSIGN_OR_RETURN(arguments.maxSteps, parseIntegerFlag(flag, value, 0, INT64_MAX));
    } else if (flag == "--dump-params") {
      arguments.dumpParametersPath = value;
    } else if (flag == "--loss-log") {
      arguments.lossLogPath = value;
    } else if (flag == "--rendezvous-timeout") {
      TANDEM_ASSIGN_OR_RETURN(arguments.rendezvousTimeoutSeconds, parseSeconds(flag, value));
    } else if (flag == "--collective-timeout") {
      TANDEM_ASSIGN_OR_RETURN(arguments.collectiveTimeoutSeconds, parseSeconds(flag, value));
    } else if (flag == "--metrics-port") {
      TANDEM_ASSIGN_OR_RETURN(arguments.metricsPort, parsePort(flag, value));
    } else if (flag == "--grace-seconds") {
      TANDEM_ASSIGN_OR_RETURN(arguments.graceSeconds, parseSeconds(flag, value));
    } else if (flag == "--checkpoint-timeout") {
      TANDEM_ASSIGN_OR_RETURN(arguments.checkpointTimeoutSeconds, parseSeconds(flag, value));
    } else if (flag == "--bucket-cap-mb") {
      TANDEM_ASSIGN_OR_RETURN(arguments.bucketCapMegabytes, parsePositiveFlag(flag, value, 1e6));
    } else {
      return TANDEM_ERROR(StatusCode::kInvalidArgument, "unknown option " + flag + "\n" + kUsage);
    }
  }
  if (arguments.configPath.empty())
    return TANDEM_ERROR(StatusCode::kInvalidArgument, "no job spec: set TANDEM_CONFIG or pass --config FILE");
  return arguments;
}

struct Identity {
  int rank = 0;
  int worldSize = 1;
  int64_t generation = 0;
  std::string endpoint;
  std::string token;
  std::string podAddress = "127.0.0.1";
  // Listeners (rank 0's rendezvous, /metrics) bind to the pod IP when one is given, so that pods sharing
  // one network (the test tier's pod runner, hostNetwork) do not collide; otherwise to every address.
  std::string listenHost = "0.0.0.0";
};

// host:port with IPv6 addresses bracketed, as gRPC and the metrics server expect.
std::string hostPort(const std::string& host, const std::string& port) {
  return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + port;
}

// TANDEM_WORLD_SIZE wins over spec.workers (`tandem run --workers N`); the combination is re-checked.
StatusOr<Identity> readIdentity(manifest::JobSpec& spec) {
  Identity identity;
  if (auto rank = environment("TANDEM_RANK")) {
    TANDEM_ASSIGN_OR_RETURN(int64_t value, parseIntegerFlag("TANDEM_RANK", *rank, INT64_MIN, INT64_MAX));
    if (value < 0 || value >= manifest::kMaxWorkers)  // before narrowing: 2^32 must not read as rank 0
      return TANDEM_ERROR(StatusCode::kInvalidArgument, "TANDEM_RANK " + *rank + " is outside 0.." +
                                                            std::to_string(manifest::kMaxWorkers - 1));
    identity.rank = static_cast<int>(value);
  }
  identity.worldSize = static_cast<int>(spec.workers);
  if (auto worldSize = environment("TANDEM_WORLD_SIZE")) {
    TANDEM_ASSIGN_OR_RETURN(int64_t value, parseIntegerFlag("TANDEM_WORLD_SIZE", *worldSize, INT64_MIN, INT64_MAX));
    if (value < 1) return TANDEM_ERROR(StatusCode::kInvalidArgument, "TANDEM_WORLD_SIZE must be at least 1");
    if (value != spec.workers) {
      spec.workers = value;
      const auto errors = manifest::validateCombinations(spec);
      if (!errors.empty())
        return TANDEM_ERROR(StatusCode::kInvalidArgument,
                            errors.front().toString() + " (with TANDEM_WORLD_SIZE " + std::to_string(value) + ")");
    }
    identity.worldSize = static_cast<int>(value);
  }
  if (identity.rank < 0 || identity.rank >= identity.worldSize)
    return TANDEM_ERROR(StatusCode::kInvalidArgument, "TANDEM_RANK " + std::to_string(identity.rank) +
                                                          " is outside 0.." + std::to_string(identity.worldSize - 1));
  if (auto generation = environment("TANDEM_GENERATION")) {
    TANDEM_ASSIGN_OR_RETURN(identity.generation, parseIntegerFlag("TANDEM_GENERATION", *generation, 0, INT64_MAX));
  }
  if (auto address = environment("TANDEM_POD_IP"); address && !address->empty()) {
    identity.podAddress = *address;
    identity.listenHost = *address;
  }
  if (identity.worldSize > 1) {
    auto endpoint = environment("TANDEM_RDZV_ENDPOINT");
    auto token = environment("TANDEM_RDZV_TOKEN");
    if (!endpoint) return TANDEM_ERROR(StatusCode::kInvalidArgument, "TANDEM_RDZV_ENDPOINT is not set (host:port of rank 0)");
    if (!token) return TANDEM_ERROR(StatusCode::kInvalidArgument, "TANDEM_RDZV_TOKEN is not set");
    identity.endpoint = *endpoint;
    identity.token = *token;
  }
  return identity;
}

// Adapts the rendezvous' store RPCs to the communicator's bootstrap store.
class RendezvousStore final : public comm::KeyValueStore {
 public:
  RendezvousStore(std::shared_ptr<rendezvous::RendezvousClient> client, std::chrono::milliseconds timeout)
      : client_(std::move(client)), timeout_(timeout) {}
  Status set(const std::string& key, const std::string& value) override { return client_->storeSet(key, value, timeout_); }
  StatusOr<std::string> get(const std::string& key, std::chrono::milliseconds timeout) override {
    return client_->storeGet(key, timeout);
  }

 private:
  std::shared_ptr<rendezvous::RendezvousClient> client_;
  std::chrono::milliseconds timeout_;
};

std::string portOf(const std::string& endpoint) {
  const auto colon = endpoint.rfind(':');
  return colon == std::string::npos ? "29400" : endpoint.substr(colon + 1);
}

void emit(const char* kind, const nlohmann::json& payload) {
  std::cout << '@' << kind << ' ' << payload.dump() << std::endl;
}

int fail(const Status& status) {
  log::error() << status.toString();
  return exitCodeFor(status);
}

// Not fatal: unplaced threads train as fast as before, only less evenly.
void placeThreadsOnOwnCpus() {
  // Several GEMM threads already spread the stage's compute over its CPUs (and OpenMP builds of OpenBLAS
  // start theirs at the first GEMM, from the compute thread: they would all inherit its one CPU).
  if (kernels::gemmThreads() > 1) {
    log::info() << kernels::gemmThreads() << " GEMM threads share the worker's CPUs: its threads are not placed";
    return;
  }
  StatusOr<launch::CpuTopology> topology = launch::readCpuTopology();
  if (!topology.ok()) {
    log::warning() << "threads not placed: " << topology.status().message();
    return;
  }
  const std::optional<launch::ThreadPlacement> placement = launch::planThreadPlacement(*topology);
  if (!placement) {
    log::info() << "one CPU: the compute thread shares it with the worker's other threads";
    return;
  }
  if (Status placed = launch::placeThreads(*placement); !placed.ok()) {
    log::warning() << "threads not all placed: " << placed.message();
    return;
  }
  log::info() << "compute thread alone on CPU " << placement->computeCpu << ", the worker's other threads on CPUs "
              << launch::describeCpuList(placement->otherCpus);
}

int run(int argc, char** argv) {
  auto arguments = parseArguments(argc, argv);
  if (!arguments.ok()) return fail(arguments.status());

  manifest::ParseResult parsed = manifest::loadManifest(arguments->configPath);
  if (!parsed.ok()) {
    for (const auto& error : parsed.errors) std::cerr << error.toString() << "\n";
    return kExitInvalidConfig;
  }
  manifest::JobSpec& spec = parsed.spec;
  auto identity = readIdentity(spec);
  if (!identity.ok()) return fail(identity.status());
  log::setJob(spec.jobKey());
  log::setRank(identity->rank);

  std::signal(SIGTERM, onStopSignal);
  std::signal(SIGINT, onStopSignal);

  const auto rendezvousTimeout =
      std::chrono::milliseconds(static_cast<int64_t>(arguments->rendezvousTimeoutSeconds * 1000));
  // Heartbeats let a rank whose collective timed out name the peer that went silent: silent after half
  // the collective timeout, so that by the time a collective gives up the culprit is already silent.
  const auto collectiveTimeout =
      std::chrono::milliseconds(static_cast<int64_t>(arguments->collectiveTimeoutSeconds * 1000));
  const auto silentAfter = std::max<std::chrono::milliseconds>(collectiveTimeout / 2, std::chrono::seconds(1));
  const auto heartbeatInterval = std::min<std::chrono::milliseconds>(silentAfter / 3, std::chrono::seconds(1));
  std::unique_ptr<rendezvous::RendezvousServer> server;
  std::shared_ptr<rendezvous::RendezvousClient> rendezvousClient;
  std::unique_ptr<comm::Communicator> communicator;
  std::unique_ptr<rendezvous::HeartbeatSender> heartbeats;
  const std::string configHash = manifest::configHash(spec);
  // Rank 0 holds its rendezvous port before anything slow (the dataset): `tandem run` found the port free
  // a moment ago, and another process could take it in between (its peers would then be refused).
  if (identity->worldSize > 1 && identity->rank == 0) {
    rendezvous::ServerOptions serverOptions;
    serverOptions.listenAddress = hostPort(identity->listenHost, portOf(identity->endpoint));
    serverOptions.job = spec.jobKey();
    serverOptions.generation = identity->generation;
    serverOptions.worldSize = identity->worldSize;
    serverOptions.token = identity->token;
    serverOptions.configHash = configHash;
    serverOptions.heartbeatTimeout = silentAfter;
    auto started = rendezvous::RendezvousServer::start(serverOptions);
    if (!started.ok()) return fail(started.status());
    server = std::move(started).value();
  }

  StatusOr<data::TrainTest> dataset = data::TrainTest{};
  if (spec.data.kind == "synthetic")
    dataset = data::makeSynthetic(spec.data.samples, static_cast<uint64_t>(spec.training.seed));
  else
    dataset = data::loadFashionMnist(spec.data.path);
  if (!dataset.ok()) return fail(dataset.status());

  if (identity->worldSize > 1) {
    rendezvousClient =
        std::make_shared<rendezvous::RendezvousClient>(identity->endpoint, identity->token, identity->generation);
    rendezvous::JoinRequest join{spec.jobKey(), identity->generation, identity->rank, identity->worldSize,
                                 identity->podAddress, configHash};
    log::info() << "joining rendezvous at " << identity->endpoint << " (generation " << identity->generation << ", "
                << identity->worldSize << " ranks, deadline " << arguments->rendezvousTimeoutSeconds << "s)";
    auto joined = rendezvousClient->join(join, rendezvousTimeout, &stopSignal);
    if (!joined.ok() && joined.status().code() == StatusCode::kCancelled && stopSignal.load() != 0) {
      log::warning() << "stopping: " << joined.status().message();
      return 128 + stopSignal.load();
    }
    if (!joined.ok()) return fail(joined.status());

    // Beating from the join on: the server's last word of a rank is its join until then, and ranks
    // finish connecting at different moments.
    heartbeats = std::make_unique<rendezvous::HeartbeatSender>(rendezvousClient, identity->rank, heartbeatInterval);
    comm::GlooOptions glooOptions;
    glooOptions.rank = identity->rank;
    glooOptions.size = identity->worldSize;
    glooOptions.hostAddress = identity->podAddress;
    glooOptions.keyPrefix = "generation-" + std::to_string(identity->generation) + "/gloo";
    glooOptions.timeout = collectiveTimeout;
    auto created =
        comm::createGlooCommunicator(glooOptions, std::make_shared<RendezvousStore>(rendezvousClient, rendezvousTimeout));
    if (!created.ok()) return fail(created.status());
    communicator = std::move(created).value();
    log::info() << "connected to " << identity->worldSize - 1 << " peers";
  }

  std::unique_ptr<metrics::WorkerMetrics> workerMetrics;
  if (arguments->metricsPort > 0) {
    auto started = metrics::WorkerMetrics::start(hostPort(identity->listenHost, std::to_string(arguments->metricsPort)), spec.jobKey(),
                                                 identity->rank,
                                                 identity->rank % static_cast<int>(spec.parallelism.pipelineStages));
    if (!started.ok()) return fail(started.status());
    workerMetrics = std::move(started).value();
    workerMetrics->setRestarts(identity->generation);
    workerMetrics->setGpuMemoryBytes(0);
    log::info() << "metrics at http://" << identity->podAddress << ":" << workerMetrics->port() << "/metrics";
  }

  engine::TrainerOptions options;
  options.spec = spec;
  options.metrics = workerMetrics.get();
  options.rank = identity->rank;
  options.worldSize = identity->worldSize;
  options.communicator = communicator.get();
  options.maxSteps = arguments->maxSteps;
  options.bucketCapFloats = std::max<int64_t>(1, static_cast<int64_t>(arguments->bucketCapMegabytes * 1024 * 1024 / 4));
  options.dumpParametersPath = arguments->dumpParametersPath;
  options.lossLogPath = arguments->lossLogPath;
  options.stopRequested = &stopRequested;
  options.graceSeconds = arguments->graceSeconds;
  options.checkpointTimeoutSeconds = arguments->checkpointTimeoutSeconds;
  options.gradientSums = arguments->gradientSums;
  options.onResume = [](int64_t step) { emit("resume", {{"step", step}}); };
  // A resume's exchanges wait as long as the checkpoint writers' reads may take, several collective
  // timeouts: a peer that hangs meanwhile (stopped, its node cut off) ends the wait once it has been
  // silent for one collective timeout. The blocked collective cannot be interrupted, hence _Exit.
  std::unique_ptr<rendezvous::SilenceWatch> resumeWatch;
  options.onResumeWait = [&](bool waiting) {
    resumeWatch.reset();
    if (!waiting || rendezvousClient == nullptr) return;
    // One collective timeout, but never less than the server's own silence plus two questions: one
    // answer must not be enough (a short timeout makes silentAfter, at least 1 s, the larger).
    const auto limit = std::max(collectiveTimeout, silentAfter + 2 * heartbeatInterval);
    resumeWatch = std::make_unique<rendezvous::SilenceWatch>(
        rendezvousClient, identity->rank, silentAfter, limit, heartbeatInterval, [](const std::string& who) {
          log::error() << "while resuming from the checkpoint, " << who << ": giving up the resume";
          std::_Exit(kExitPeerLost);
        });
  };
  options.onProgress = [](const engine::Progress& progress) {
    emit("progress", {{"step", progress.step},
                      {"totalSteps", progress.totalSteps},
                      {"epoch", progress.epoch},
                      {"epochs", progress.epochs},
                      {"loss", progress.loss},
                      {"learningRate", progress.learningRate},
                      {"samplesPerSecond", progress.samplesPerSecond},
                      {"etaSeconds", progress.etaSeconds}});
  };
  options.onEval = [](const engine::EvalResult& eval) {
    log::info() << "eval after step " << eval.step << ": accuracy " << eval.accuracy * 100 << "%, loss " << eval.loss;
    emit("eval", {{"step", eval.step}, {"accuracy", eval.accuracy}, {"loss", eval.loss}});
  };
  // A container's CPU limit is a quota over every CPU of the node: OpenBLAS would start a thread per CPU
  // and spend most of each period throttled. Unless told how many, use as many as the limit allows.
  if (std::getenv("OPENBLAS_NUM_THREADS") == nullptr && std::getenv("OMP_NUM_THREADS") == nullptr) {
    if (const std::optional<double> limit = cgroupCpuLimit()) {
      const int threads = cpusWithin(limit);
      if (threads < kernels::gemmThreads()) {
        kernels::setGemmThreads(threads);
        log::info() << "cgroup CPU limit " << *limit << " CPUs: " << threads << " GEMM threads";
      }
    }
  }
  log::info() << "training on cpu with " << kernels::gemmThreads() << " GEMM threads, OpenBLAS " << kernels::gemmCore()
              << " kernels";
  // Device queries only: no CUDA context (and none of its GPU memory) is taken while the engine trains on
  // the CPU.
  if (kernels::builtWithCuda()) {
    const int gpus = kernels::gpuCount();
    if (gpus == 0)
      log::info() << "CUDA build: no GPU visible";
    else
      log::info() << "CUDA build: " << gpus << " GPU(s) visible, GPU 0 " << kernels::gpuDescription(0)
                  << "; spec.training.device auto trains on the cpu until the CUDA engine lands";
  }
  // CPUs of its own (`tandem run --bind-cores` sets TANDEM_PIN_COMPUTE_THREAD=1): the compute thread
  // gets one to itself once the trainer's threads are running.
  if (const char* pin = std::getenv("TANDEM_PIN_COMPUTE_THREAD"); pin != nullptr && std::string(pin) == "1")
    options.onThreadsStarted = placeThreadsOnOwnCpus;
  auto summary = engine::train(options, *dataset);
  if (!summary.ok()) {
    if (summary.status().code() == StatusCode::kCancelled) {
      log::warning() << "stopping: " << summary.status().message();
      return 128 + (stopSignal.load() == 0 ? SIGTERM : stopSignal.load());
    }
    if (summary.status().code() == StatusCode::kDeadlineExceeded && rendezvousClient != nullptr) {
      // "A peer did not answer in time": ask rank 0's server which one.
      const std::string silent = rendezvous::describeSilentPeers(*rendezvousClient, identity->rank, silentAfter,
                                                                 std::chrono::seconds(2));
      if (!silent.empty()) log::error() << "while that collective waited, " << silent;
    }
    return fail(summary.status());
  }
  if (identity->rank == 0) {
    emit("summary", {{"steps", summary->steps},
                     {"resumedFromStep", summary->resumedFromStep},
                     {"checkpointsWritten", summary->checkpointsWritten},
                     {"finalLoss", summary->finalLoss},
                     {"testAccuracy", summary->finalEval.accuracy},
                     {"testLoss", summary->finalEval.loss},
                     {"trainSeconds", summary->trainSeconds},
                     {"samplesPerSecond", summary->samplesPerSecond},
                     {"exposedAllReduceSeconds", summary->exposedAllReduceSeconds},
                     {"allReduceBytes", summary->allReduceBytes}});
  }
  // Every rank leaves together so rank 0's rendezvous server outlives its clients' last calls.
  if (communicator) {
    Status status = communicator->barrier();
    if (!status.ok()) log::warning() << "final barrier: " << status.toString();
  }
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  kernels::restartWithBetterGemmCore(argv);  // before anything else: a restart must not repeat side effects
  try {
    return run(argc, argv);
  } catch (const std::bad_alloc&) {
    // Not the kernel's OOM killer (that is SIGKILL): one allocation larger than the machine allows, i.e.
    // a size in the manifest. A restart would ask for the same size: permanent.
    log::error() << "out of memory: an allocation failed (is spec.data.samples or a width in "
                    "spec.model.mlp.hidden too large for this machine?)";
    return kExitInvalidConfig;
  }  // anything else ends in std::terminate (SIGABRT, 134): retryable, as a crash is
}
