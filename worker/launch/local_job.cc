#include "tandem/launch/local_job.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <deque>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "tandem/common/cpu_limit.h"
#include "tandem/common/exit_codes.h"
#include "tandem/common/random.h"

namespace tandem::launch {
namespace {

using Clock = std::chrono::steady_clock;

volatile sig_atomic_t interruptSignal = 0;
volatile sig_atomic_t interruptCount = 0;  // a second Ctrl-C kills at once instead of waiting out the grace
void onInterrupt(int signal) {
  interruptSignal = signal;
  interruptCount = interruptCount + 1;
}

// Binds a TCP socket of `family` to `port` on every address of it and releases it; `port` 0 lets the
// kernel pick. Returns the port, or -1 with errno set.
int bindAndRelease(int family, int port) {
  const int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_storage storage{};
  socklen_t length = 0;
  if (family == AF_INET6) {
    const int no = 0;  // dual stack: an IPv4 listener on the port conflicts too
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &no, sizeof(no));
    auto* address = reinterpret_cast<sockaddr_in6*>(&storage);
    address->sin6_family = AF_INET6;
    address->sin6_addr = in6addr_any;
    address->sin6_port = htons(static_cast<uint16_t>(port));
    length = sizeof(*address);
  } else {
    auto* address = reinterpret_cast<sockaddr_in*>(&storage);
    address->sin_family = AF_INET;
    address->sin_addr.s_addr = htonl(INADDR_ANY);
    address->sin_port = htons(static_cast<uint16_t>(port));
    length = sizeof(*address);
  }
  const bool bound = bind(fd, reinterpret_cast<sockaddr*>(&storage), length) == 0 &&
                     getsockname(fd, reinterpret_cast<sockaddr*>(&storage), &length) == 0;
  const int saved = errno;
  close(fd);
  errno = saved;
  if (!bound) return -1;
  return ntohs(family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&storage)->sin6_port
                                  : reinterpret_cast<sockaddr_in*>(&storage)->sin_port);
}

// `port` free on every address, IPv6 and IPv4 (custom commands' stores may listen on either); IPv4 alone
// where the machine has no IPv6. Returns the port (the kernel's pick for 0), or -1.
int bindAndRelease(int port) {
  const int bound = bindAndRelease(AF_INET6, port);
  if (bound >= 0 || errno == EADDRINUSE) return bound;
  return bindAndRelease(AF_INET, port);  // no usable IPv6 here (EAFNOSUPPORT, EADDRNOTAVAIL, a policy's EACCES)
}

std::string formatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long total = std::lround(seconds);
  char text[32];
  if (total >= 3600)
    std::snprintf(text, sizeof(text), "%ldh%02ldm", total / 3600, (total % 3600) / 60);
  else
    std::snprintf(text, sizeof(text), "%ldm%02lds", total / 60, total % 60);
  return text;
}

struct Worker {
  int rank = 0;
  pid_t pid = -1;
  int stdoutFd = -1;
  int stderrFd = -1;
  std::string stdoutPartial, stderrPartial;
  bool exited = false;
  int waitStatus = 0;
};

// Renders rank 0's progress: in place on a terminal, as a plain line every 10% or 15 s otherwise.
class ProgressDisplay {
 public:
  explicit ProgressDisplay(bool quiet) : quiet_(quiet), terminal_(isatty(STDOUT_FILENO) == 1) {}

  void update(const nlohmann::json& progress) {
    if (quiet_) return;
    const int64_t step = integerOr(progress, "step", 0);
    const int64_t total = std::max<int64_t>(1, integerOr(progress, "totalSteps", 1));
    char line[256];
    std::snprintf(line, sizeof(line), "epoch %lld/%lld  step %lld/%lld  loss %.4f  %.0f samples/s  ETA %s",
                  static_cast<long long>(integerOr(progress, "epoch", 0)),
                  static_cast<long long>(integerOr(progress, "epochs", 0)), static_cast<long long>(step),
                  static_cast<long long>(total), numberOr(progress, "loss", NAN), numberOr(progress, "samplesPerSecond", 0.0),
                  formatDuration(numberOr(progress, "etaSeconds", NAN)).c_str());
    current_ = line;
    if (terminal_) {
      // At most ten redraws a second: fast steps would otherwise flood the terminal.
      if (Clock::now() - lastPrinted_ >= std::chrono::milliseconds(100) || step == total) {
        std::cout << "\r\033[K" << current_ << std::flush;
        lastPrinted_ = Clock::now();
      }
      return;
    }
    const int64_t decile = step * 10 / total;
    if (decile != lastDecile_ || Clock::now() - lastPrinted_ > std::chrono::seconds(15) || step == total) {
      std::cout << current_ << std::endl;
      lastDecile_ = decile;
      lastPrinted_ = Clock::now();
    }
  }
  // Clears the in-place line before other output, and draws it again after.
  void beforeOutput() {
    if (terminal_ && !current_.empty()) std::cout << "\r\033[K" << std::flush;
  }
  void afterOutput() {
    if (terminal_ && !current_.empty()) std::cout << current_ << std::flush;
  }
  void finish() {
    if (terminal_ && !current_.empty()) std::cout << std::endl;
    current_.clear();
  }

 private:
  bool quiet_;
  bool terminal_;
  std::string current_;
  int64_t lastDecile_ = -1;
  Clock::time_point lastPrinted_ = Clock::now();
};

// How long a worker that only lost a peer (exit 129) waits to be named, in case the peer's own death shows up.
constexpr std::chrono::milliseconds kCauseWait{300};
// How long the rest of a group whose worker failed gets between SIGTERM and SIGKILL.
constexpr std::chrono::milliseconds kFailedGroupGrace{5000};
// How long processes a worker left behind may go on holding its output once every worker has exited.
constexpr std::chrono::milliseconds kLeftoversGrace{2000};

pid_t spawnWorker(const LocalJobOptions& options, int rank, const std::map<std::string, std::string>& environment,
                  int stdoutPipe[2], int stderrPipe[2]) {
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid != 0) return pid;
  // Child: die with tandem, whatever kills it; no orphans.
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(kExitInternal);
  // A process group of its own, so that tandem's signals also reach whatever the worker starts (a
  // custom command's children, which would otherwise outlive it holding its output open).
  setpgid(0, 0);
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);
  signal(SIGHUP, SIG_DFL);
  signal(SIGPIPE, SIG_DFL);  // an ignored signal would stay ignored across exec
  // Not tandem's terminal: a worker in a background process group that read it would be stopped
  // (SIGTTIN) and hang the job. A custom command that reads stdin sees end of file instead.
  const int devNull = open("/dev/null", O_RDONLY | O_CLOEXEC);  // the dup2'd copy stays open, not this one
  if (devNull >= 0) dup2(devNull, STDIN_FILENO);
  dup2(stdoutPipe[1], STDOUT_FILENO);
  dup2(stderrPipe[1], STDERR_FILENO);
  close(stdoutPipe[0]);
  close(stderrPipe[0]);
  close(stdoutPipe[1]);
  close(stderrPipe[1]);
  for (const auto& [name, value] : environment) setenv(name.c_str(), value.c_str(), 1);
  if (!options.coreSets.empty()) {
    const cpu_set_t cpus = cpuSetOf(options.coreSets[rank].cpus);
    if (sched_setaffinity(0, sizeof(cpus), &cpus) != 0) {
      std::fprintf(stderr, "--bind-cores: cannot bind rank %d to its CPUs: %s\n", rank, std::strerror(errno));
      _exit(kExitInternal);
    }
  }
  std::vector<std::string> arguments{options.workerBinary};
  arguments.insert(arguments.end(), options.workerArguments.begin(), options.workerArguments.end());
  std::vector<char*> argv;
  for (auto& argument : arguments) argv.push_back(argument.data());
  argv.push_back(nullptr);
  // A custom command is looked up in PATH, like a container's command; tandem-worker is a full path.
  execvp(options.workerBinary.c_str(), argv.data());
  std::fprintf(stderr, "cannot start %s: %s\n", options.workerBinary.c_str(), std::strerror(errno));
  _exit(kExitInternal);
}

// Ends the workers' process groups when the run ends, however tandem ends. The kernel's parent-death
// signal reaches tandem's own children only: what a worker started (a custom command's children) would
// outlive a tandem that was SIGKILLed or crashed, holding ports, GPUs and files. So a small process of
// its own process group (a kill of tandem's group does not reach it), which holds nothing of tandem's but
// two pipes, learns each worker's process group; when the first pipe closes (this object's destructor, or
// tandem's death) it SIGKILLs whatever is left in them, as a kubelet ends a container's processes with its
// main one, and exits, which closes the second. It is not tandem's child (forked through a short-lived
// intermediate): tandem's children are its workers.
class OrphanWatchdog {
 public:
  OrphanWatchdog() {
    int groups[2], done[2];
    if (pipe2(groups, O_CLOEXEC) != 0) return;  // watching nothing: the direct children still die with tandem
    if (pipe2(done, O_CLOEXEC) != 0) {
      close(groups[0]);
      close(groups[1]);
      return;
    }
    const pid_t intermediate = fork();
    if (intermediate == 0) {
      const pid_t watchdog = fork();
      if (watchdog == 0) {
        close(groups[1]);
        close(done[0]);
        watchAndKill(groups[0], done[1]);  // never returns
      }
      _exit(watchdog > 0 ? 0 : 1);
    }
    close(groups[0]);
    close(done[1]);
    int status = 0;
    if (intermediate < 0 || waitpid(intermediate, &status, 0) != intermediate || !WIFEXITED(status) ||
        WEXITSTATUS(status) != 0) {
      close(groups[1]);  // no watchdog (out of processes): nothing is watched, as before it existed
      close(done[0]);
      return;
    }
    groupsFd_ = groups[1];
    doneFd_ = done[0];
  }
  OrphanWatchdog(const OrphanWatchdog&) = delete;
  OrphanWatchdog& operator=(const OrphanWatchdog&) = delete;

  // Returns once the leftovers are killed (the watchdog exited), or after 5 s at most.
  ~OrphanWatchdog() {
    if (groupsFd_ < 0) return;
    close(groupsFd_);
    const auto deadline = Clock::now() + std::chrono::seconds(5);
    pollfd exited{doneFd_, POLLIN, 0};
    char byte;
    while (Clock::now() < deadline) {
      const int waitMs = static_cast<int>(
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count()) + 1;
      if (poll(&exited, 1, waitMs) < 0 && errno != EINTR) break;
      if ((exited.revents & (POLLIN | POLLHUP | POLLERR)) != 0 && read(doneFd_, &byte, 1) <= 0) break;
    }
    close(doneFd_);
  }

  void watch(pid_t processGroup) {
    if (groupsFd_ < 0) return;
    const int32_t group = processGroup;
    [[maybe_unused]] const ssize_t written = write(groupsFd_, &group, sizeof(group));  // atomic: < PIPE_BUF
  }

 private:
  // The watchdog itself (a forked copy of single-threaded tandem: only async-signal-safe calls). Holding
  // doneFd open until it exits is how tandem learns that it finished.
  [[noreturn]] static void watchAndKill(int readFd, int doneFd) {
    setpgid(0, 0);
    prctl(PR_SET_NAME, "tandem-watchdog");
    signal(SIGINT, SIG_IGN);  // Ctrl-C is for tandem, which stops the workers itself
    signal(SIGTERM, SIG_DFL);
    signal(SIGHUP, SIG_IGN);
    const int devNull = open("/dev/null", O_RDWR);
    for (int fd = 0; fd < 3; ++fd) dup2(devNull, fd);  // not holding tandem's output open for its reader
    for (int fd = 3; fd < 1024; ++fd)
      if (fd != readFd && fd != doneFd) close(fd);
    int32_t groups[4096];
    size_t count = 0;
    for (;;) {
      int32_t group = 0;
      const ssize_t got = read(readFd, &group, sizeof(group));
      if (got == static_cast<ssize_t>(sizeof(group))) {
        if (count < sizeof(groups) / sizeof(groups[0])) groups[count++] = group;
        continue;
      }
      if (got < 0 && errno == EINTR) continue;
      break;  // end of file: tandem is done with them, or gone
    }
    for (size_t i = 0; i < count; ++i) kill(-groups[i], SIGKILL);
    _exit(0);
  }

  int groupsFd_ = -1;  // tandem's end: the workers' process groups
  int doneFd_ = -1;    // closed by the watchdog's exit
};

// Pipes for the worker's output, then the process. On failure nothing is left open.
Status startWorker(const LocalJobOptions& options, int rank, const std::map<std::string, std::string>& environment,
                   OrphanWatchdog& watchdog, Worker& worker) {
  int stdoutPipe[2], stderrPipe[2];
  if (pipe2(stdoutPipe, O_CLOEXEC) != 0) return Status(StatusCode::kResourceUnavailable, std::string("pipe: ") + std::strerror(errno));
  if (pipe2(stderrPipe, O_CLOEXEC) != 0) {
    const int saved = errno;
    close(stdoutPipe[0]);
    close(stdoutPipe[1]);
    return Status(StatusCode::kResourceUnavailable, std::string("pipe: ") + std::strerror(saved));
  }
  const pid_t pid = spawnWorker(options, rank, environment, stdoutPipe, stderrPipe);
  const int forkError = errno;
  close(stdoutPipe[1]);
  close(stderrPipe[1]);
  if (pid < 0) {
    close(stdoutPipe[0]);
    close(stderrPipe[0]);
    return Status(StatusCode::kResourceUnavailable, std::string("fork: ") + std::strerror(forkError));
  }
  setpgid(pid, pid);  // also here: a signal to the group may come before the child's own call
  watchdog.watch(pid);
  worker.pid = pid;
  worker.stdoutFd = stdoutPipe[0];
  worker.stderrFd = stderrPipe[0];
  return Status::Ok();
}

}  // namespace

namespace {
const nlohmann::json* fieldOf(const nlohmann::json& object, const char* key) {
  if (!object.is_object()) return nullptr;
  const auto found = object.find(key);
  return found != object.end() ? &*found : nullptr;
}
}  // namespace

double numberOr(const nlohmann::json& object, const char* key, double fallback) {
  const nlohmann::json* field = fieldOf(object, key);
  return field != nullptr && field->is_number() ? field->get<double>() : fallback;
}

int64_t integerOr(const nlohmann::json& object, const char* key, int64_t fallback) {
  const nlohmann::json* field = fieldOf(object, key);
  return field != nullptr && field->is_number_integer() ? field->get<int64_t>() : fallback;
}

std::string describeExit(int waitStatus) {
  if (WIFEXITED(waitStatus)) return "exited with code " + std::to_string(WEXITSTATUS(waitStatus));
  if (WIFSIGNALED(waitStatus)) {
    const int signal = WTERMSIG(waitStatus);
    return "was killed by signal " + std::to_string(signal) + " (" + strsignal(signal) + ")";
  }
  return "ended with status " + std::to_string(waitStatus);
}

EphemeralPortRange ephemeralPortRange() {
  EphemeralPortRange range;
  std::ifstream file("/proc/sys/net/ipv4/ip_local_port_range");
  int low = 0, high = 0;
  if (file >> low >> high && 0 < low && low <= high && high <= 65535) range = {low, high};
  return range;
}

bool portFree(int port) { return port > 0 && bindAndRelease(port) == port; }

int freePort() {
  // A port from the kernel's ephemeral range (what bind to port 0 gives) can be handed to any outgoing
  // connection of this machine (Gloo's, gRPC's, another job's) between this check and the worker's bind,
  // which then fails and costs the job a restart. Ports below the range are only ever taken by an
  // explicit bind, so the worker gets the one checked here unless another launcher draws the same one
  // in between (then the worker's bind fails: retryable).
  static std::mutex mutex;
  static std::set<int> handedOut;  // one launch asks for several ports: never the same one twice
  static std::deque<int> oldestFirst;  // handedOut in the order handed out
  static Random random(std::random_device{}());
  std::lock_guard<std::mutex> lock(mutex);
  constexpr int kLowestPort = 10000;  // clear of the well-known and registered ports most services use
  const int belowEphemeral = ephemeralPortRange().low;
  // A long run of restarts would use the pool up and fall back to bind(0): the ports handed out longest
  // ago (their workers are gone; this launch's are the newest) may come again once half of it has been.
  while (!oldestFirst.empty() && static_cast<int>(oldestFirst.size()) > (belowEphemeral - kLowestPort) / 2) {
    handedOut.erase(oldestFirst.front());
    oldestFirst.pop_front();
  }
  for (int attempt = 0; attempt < 200 && belowEphemeral - kLowestPort >= 1000; ++attempt) {
    const int port = kLowestPort + static_cast<int>(random.below(static_cast<uint64_t>(belowEphemeral - kLowestPort)));
    if (handedOut.count(port) != 0 || !portFree(port)) continue;
    handedOut.insert(port);
    oldestFirst.push_back(port);
    return port;
  }
  const int port = bindAndRelease(0);  // no room below the range, or all of it taken: the kernel's choice
  if (port > 0 && handedOut.insert(port).second) oldestFirst.push_back(port);
  return port;
}

LocalJobResult runLocalJob(const LocalJobOptions& options) {
  LocalJobResult result;
  const auto start = Clock::now();
  const int workers = static_cast<int>(options.spec.workers);
  const int rendezvousPort = freePort();
  const int masterPort = freePort();
  if (rendezvousPort < 0 || masterPort < 0) {  // nothing could be bound at all: this machine's limit
    result.exitCode = kExitResourceUnavailable;
    result.failure = "cannot bind any TCP port for the rendezvous (out of ports or descriptors?)";
    std::cerr << "tandem: " << result.failure << std::endl;
    return result;
  }
  const std::string token = secureRandomHex(16);
  // The CPUs this run may use: its affinity (taskset, a cpuset), within a cgroup CPU limit if one is set.
  const int cpus = cpusWithin(cgroupCpuLimit());
  const std::string gemmThreads = std::to_string(std::max(1, cpus / workers));
  if (workers > cpus && options.generation == 0 && !options.customCommand) {
    char share[16];
    std::snprintf(share, sizeof(share), "%.2g", static_cast<double>(cpus) / workers);
    std::cerr << "tandem: " << workers << " workers share " << cpus << (cpus == 1 ? " CPU" : " CPUs")
              << ": each computes at about " << share
              << " of a CPU's pace (timings, and a pipeline's bubble, are not those of a CPU per worker)" << std::endl;
  }

  struct sigaction action {};
  action.sa_handler = onInterrupt;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
  // A closed terminal or SSH session: the same graceful stop (the workers, in process groups of their
  // own, do not get the hangup; without this they would die with tandem, without their checkpoint).
  sigaction(SIGHUP, &action, nullptr);
  // A closed pipe (the watchdog gone, or whoever read tandem's output) is an error on that write, not a
  // reason to abandon the workers mid-run.
  signal(SIGPIPE, SIG_IGN);
  interruptSignal = 0;
  interruptCount = 0;
  auto restoreSignals = [] {
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
  };

  OrphanWatchdog watchdog;  // before the workers, so that it holds none of their pipes
  std::vector<Worker> group(workers);
  for (int rank = 0; rank < workers; ++rank) {
    std::map<std::string, std::string> environment{
        {"TANDEM_JOB", options.spec.jobKey()},
        {"TANDEM_RANK", std::to_string(rank)},
        {"TANDEM_WORLD_SIZE", std::to_string(workers)},
        {"TANDEM_GENERATION", std::to_string(options.generation)},
        {"TANDEM_RDZV_ENDPOINT", "127.0.0.1:" + std::to_string(rendezvousPort)},
        {"TANDEM_RDZV_TOKEN", token},
        {"TANDEM_POD_IP", "127.0.0.1"},
        {"TANDEM_CONFIG", options.configPath},
        {"MASTER_ADDR", "127.0.0.1"},
        {"MASTER_PORT", std::to_string(masterPort)},
        {"WORLD_SIZE", std::to_string(workers)},
        {"RANK", std::to_string(rank)},
        {"LOCAL_RANK", std::to_string(rank)},
        {"NODE_RANK", "0"},
    };
    // Each local worker serves its metrics on its own free port (pods all use 9400).
    if (!options.customCommand) {
      const int metricsPort = freePort();  // -1, none bindable: the worker runs without metrics (0)
      environment["TANDEM_METRICS_PORT"] = std::to_string(std::max(metricsPort, 0));
      if (metricsPort > 0 && (!options.quiet || options.generation == 0))
        std::cerr << "tandem: rank " << rank << " metrics at http://127.0.0.1:" << metricsPort << "/metrics" << std::endl;
    }
    // Share the cores: each worker's GEMMs get cores/workers threads (its own cores when bound) unless
    // the user chose.
    if (std::getenv("OPENBLAS_NUM_THREADS") == nullptr)
      environment["OPENBLAS_NUM_THREADS"] =
          options.coreSets.empty() ? gemmThreads : std::to_string(options.coreSets[rank].cores);
    // Bound, the worker keeps its compute thread on a CPU of its own, apart from its other threads (unless
    // the user said 0). Unbound workers share every CPU: each would pick the same one, so never.
    if (options.coreSets.empty())
      environment["TANDEM_PIN_COMPUTE_THREAD"] = "0";
    else if (std::getenv("TANDEM_PIN_COMPUTE_THREAD") == nullptr)
      environment["TANDEM_PIN_COMPUTE_THREAD"] = "1";
    if (!options.coreSets.empty() && (!options.quiet || options.generation == 0))
      std::cerr << "tandem: rank " << rank << " bound to CPUs " << describeCpuList(options.coreSets[rank].cpus)
                << std::endl;
    group[rank].rank = rank;
    if (Status started = startWorker(options, rank, environment, watchdog, group[rank]); !started.ok()) {
      // Out of processes or descriptors (ulimit): this machine's limit, retryable. The ranks already
      // started are ended and reaped, so nothing is left behind.
      result.exitCode = kExitResourceUnavailable;
      result.failedRank = rank;
      result.failure = "cannot start worker rank " + std::to_string(rank) + ": " + started.message();
      std::cerr << "tandem: " << result.failure << std::endl;
      for (Worker& worker : group) {
        if (worker.pid <= 0) continue;
        kill(-worker.pid, SIGKILL);
        waitpid(worker.pid, &worker.waitStatus, 0);
        for (int fd : {worker.stdoutFd, worker.stderrFd})
          if (fd >= 0) close(fd);
      }
      restoreSignals();
      result.wallSeconds = std::chrono::duration<double>(Clock::now() - start).count();
      return result;
    }
  }

  ProgressDisplay display(options.quiet);
  auto handleLine = [&](Worker& worker, const std::string& line, bool fromStdout) {
    if (fromStdout && line.size() > 1 && line[0] == '@') {
      const auto space = line.find(' ');
      const std::string kind = line.substr(1, space == std::string::npos ? std::string::npos : space - 1);
      nlohmann::json payload = nlohmann::json::parse(space == std::string::npos ? "{}" : line.substr(space + 1), nullptr, false);
      if (!payload.is_discarded() && worker.rank == 0) {
        if (kind == "progress") {
          result.lastStep = integerOr(payload, "step", result.lastStep);
          if (options.previousFailure && !result.recoverySeconds) {
            result.recoverySeconds = std::chrono::duration<double>(Clock::now() - *options.previousFailure).count();
            display.beforeOutput();
            char line[160];
            std::snprintf(line, sizeof(line), "tandem: recovered: generation %lld finished step %lld %.2f s after the failure",
                          static_cast<long long>(options.generation), static_cast<long long>(result.lastStep),
                          *result.recoverySeconds);
            std::cerr << line << std::endl;
            display.afterOutput();
          }
          return display.update(payload);
        }
        if (kind == "resume") {
          result.resumedFromStep = integerOr(payload, "step", 0);
          display.beforeOutput();
          std::cerr << "tandem: generation " << options.generation << " resumed from step " << result.resumedFromStep
                    << std::endl;
          display.afterOutput();
          return;
        }
        if (kind == "summary") {
          result.summary = payload;
          return;
        }
        if (kind == "eval") return;  // also logged by the worker in words
      }
    }
    display.beforeOutput();
    (fromStdout ? std::cout : std::cerr) << "[rank " << worker.rank << "] " << line << std::endl;
    display.afterOutput();
  };
  // The stream is over (or abandoned): its unfinished last line, then the pipe.
  auto closeOutput = [&](Worker& worker, int& fd, std::string& partial, bool fromStdout) {
    if (!partial.empty()) handleLine(worker, partial, fromStdout);
    partial.clear();
    close(fd);
    fd = -1;
  };
  auto drain = [&](Worker& worker, int& fd, std::string& partial, bool fromStdout) {
    char buffer[8192];
    const ssize_t count = read(fd, buffer, sizeof(buffer));
    if (count <= 0) {
      closeOutput(worker, fd, partial, fromStdout);
      return;
    }
    partial.append(buffer, static_cast<size_t>(count));
    size_t newline;
    while ((newline = partial.find('\n')) != std::string::npos) {
      handleLine(worker, partial.substr(0, newline), fromStdout);
      partial.erase(0, newline + 1);
    }
  };

  std::optional<Clock::time_point> stopDeadline;  // set once we began stopping the group
  Worker* suspect = nullptr;                       // the first failed worker, or a better cause found after it
  Clock::time_point suspectSince;
  auto lostPeer = [](const Worker& worker) {
    return WIFEXITED(worker.waitStatus) && WEXITSTATUS(worker.waitStatus) == kExitPeerLost;
  };
  bool killed = false;
  sig_atomic_t interruptsHandled = 0;  // the interrupt that began the stop, if one did
  std::optional<Clock::time_point> leftoversDeadline;  // set once every worker exited with output still open
  auto beginStop = [&](std::chrono::milliseconds grace) {
    if (stopDeadline) return;
    stopDeadline = Clock::now() + grace;
    for (auto& worker : group)
      if (!worker.exited) kill(-worker.pid, SIGTERM);
  };

  for (;;) {
    std::vector<pollfd> fds;
    std::vector<std::pair<Worker*, bool>> owners;
    for (auto& worker : group) {
      if (worker.stdoutFd >= 0) {
        fds.push_back({worker.stdoutFd, POLLIN, 0});
        owners.emplace_back(&worker, true);
      }
      if (worker.stderrFd >= 0) {
        fds.push_back({worker.stderrFd, POLLIN, 0});
        owners.emplace_back(&worker, false);
      }
    }
    poll(fds.data(), fds.size(), 100);  // with no pipe left open (workers that closed their output), a sleep
    for (size_t i = 0; i < fds.size(); ++i) {
      if ((fds[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
      Worker& worker = *owners[i].first;
      if (owners[i].second)
        drain(worker, worker.stdoutFd, worker.stdoutPartial, true);
      else
        drain(worker, worker.stderrFd, worker.stderrPartial, false);
    }

    // Reap everyone who exited before naming a failure. A worker that lost a peer (exit 129) is a symptom:
    // the peer that was killed outright is the cause, and may be reaped in the same sweep (after it, when
    // its rank is higher) or a moment later, so a lone 129 is named only after a short wait for a cause.
    for (auto& worker : group) {
      if (worker.exited) continue;
      if (waitpid(worker.pid, &worker.waitStatus, WNOHANG) != worker.pid) continue;
      worker.exited = true;
      const bool clean = WIFEXITED(worker.waitStatus) && WEXITSTATUS(worker.waitStatus) == 0;
      if (!clean && (suspect == nullptr || (lostPeer(*suspect) && !lostPeer(worker)))) {
        if (suspect == nullptr) suspectSince = Clock::now();
        suspect = &worker;
      }
    }
    const bool othersAlive = std::any_of(group.begin(), group.end(), [](const Worker& w) { return !w.exited; });
    if (suspect != nullptr && result.failedRank < 0 && !stopDeadline &&
        (!lostPeer(*suspect) || !othersAlive || Clock::now() - suspectSince >= kCauseWait)) {
      const Worker& worker = *suspect;
      result.failedRank = worker.rank;
      result.exitCode = WIFEXITED(worker.waitStatus) ? WEXITSTATUS(worker.waitStatus) : 128 + WTERMSIG(worker.waitStatus);
      result.failure = "worker rank " + std::to_string(worker.rank) + " " + describeExit(worker.waitStatus);
      result.failureDetected = suspectSince;
      display.beforeOutput();
      std::cerr << "tandem: " << result.failure << "; stopping the other workers" << std::endl;
      // Their peer is gone, so no collective (nor a stop checkpoint, which needs one) can succeed:
      // a short wait, then SIGKILL for one that hangs.
      beginStop(std::min(options.stopGrace, kFailedGroupGrace));
    }
    if (interruptSignal != 0 && !result.interrupted) {
      // Also while a failed group is already stopping: no restart after it, the user asked to stop.
      result.interrupted = true;
      interruptsHandled = interruptCount;
      display.beforeOutput();
      std::cerr << "\ntandem: " << strsignal(interruptSignal)
                << (stopDeadline ? ": the workers are already stopping; no restart" : ": stopping all workers")
                << " (again to kill them now)" << std::endl;
      beginStop(options.stopGrace);  // the workers' grace period: they finish the step and checkpoint
    }
    if (options.activeDeadline && !stopDeadline && Clock::now() >= *options.activeDeadline) {
      result.deadlineExceeded = true;
      display.beforeOutput();
      std::cerr << "tandem: spec.runPolicy.activeDeadlineSeconds (" << options.spec.runPolicy.activeDeadlineSeconds
                << " s) passed: stopping all workers" << std::endl;
      beginStop(options.stopGrace);  // as a preemption: they finish the step and checkpoint
    }
    if (stopDeadline && !killed && interruptCount > interruptsHandled) {
      display.beforeOutput();
      std::cerr << "\ntandem: interrupted again: killing all workers" << std::endl;
      stopDeadline = Clock::now();
    }
    if (stopDeadline && !killed && Clock::now() >= *stopDeadline) {
      for (auto& worker : group)
        if (!worker.exited) kill(-worker.pid, SIGKILL);
      killed = true;
    }
    const bool allExited = std::all_of(group.begin(), group.end(), [](const Worker& w) { return w.exited; });
    const bool allDrained =
        std::all_of(group.begin(), group.end(), [](const Worker& w) { return w.stdoutFd < 0 && w.stderrFd < 0; });
    if (allExited && allDrained) break;
    if (allExited && fds.empty()) break;
    if (allExited) {
      // Every worker is gone but an output pipe is still open: something a worker started holds it. Ask
      // the leftovers to go, read what they still print for a moment, then end them and stop reading.
      if (!leftoversDeadline) {
        leftoversDeadline = Clock::now() + kLeftoversGrace;
        for (auto& worker : group) kill(-worker.pid, SIGTERM);
      } else if (Clock::now() >= *leftoversDeadline) {
        for (auto& worker : group) {
          kill(-worker.pid, SIGKILL);
          if (worker.stdoutFd < 0 && worker.stderrFd < 0) continue;
          display.beforeOutput();
          std::cerr << "tandem: rank " << worker.rank << " exited, but a process it started kept its output open; "
                    << "ended it after " << kLeftoversGrace.count() << " ms" << std::endl;
          if (worker.stdoutFd >= 0) closeOutput(worker, worker.stdoutFd, worker.stdoutPartial, true);
          if (worker.stderrFd >= 0) closeOutput(worker, worker.stderrFd, worker.stderrPartial, false);
        }
        break;
      }
    }
  }
  display.finish();
  restoreSignals();
  // A hangup is stopped as SIGTERM is, and says so: 129 (128 + SIGHUP) would read as "peer lost".
  if (result.interrupted && result.exitCode == 0)
    result.exitCode = 128 + (interruptSignal == SIGHUP ? SIGTERM : static_cast<int>(interruptSignal));
  const bool allFinished = std::all_of(group.begin(), group.end(), [](const Worker& w) {
    return WIFEXITED(w.waitStatus) && WEXITSTATUS(w.waitStatus) == 0;
  });
  if (result.deadlineExceeded && !result.interrupted && !allFinished) {  // (finished within the stop: done)
    result.exitCode = kExitDeadlineExceeded;
    result.failure = "spec.runPolicy.activeDeadlineSeconds (" +
                     std::to_string(options.spec.runPolicy.activeDeadlineSeconds) + " s) passed";
  }
  result.wallSeconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

}  // namespace tandem::launch
