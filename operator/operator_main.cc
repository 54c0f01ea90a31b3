// tandem-operator: runs DistributedTrainingJobs as gangs of worker pods (DESIGN.md §9).
//
//   tandem-operator [--kubeconfig PATH] [--namespace NS] [--metrics-port 8080] [--leader-elect] ...
//
// Serves /metrics, /healthz and /readyz on the metrics port. With --leader-elect only the replica that
// holds the Lease reconciles; the others keep warm caches and stand by. SIGTERM/SIGINT: running
// reconciles finish, the Lease is released, exit 0. Losing the Lease while leading: exit 1 at once (the
// Deployment restarts the container), so two replicas never act at the same time.
#include <malloc.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>
#include <thread>

#include <httplib.h>

#include "tandem/common/exit_codes.h"
#include "tandem/common/log.h"
#include "tandem/common/serving_thread.h"
#include "tandem/kube/client.h"
#include "tandem/kube/config.h"
#include "tandem/operator/controller.h"
#include "tandem/operator/leader_election.h"
#include "tandem/operator/operator_metrics.h"

namespace {

using namespace tandem;
using namespace tandem::operator_core;

constexpr const char* kUsage =
    "usage: tandem-operator [flags]\n"
    "  --kubeconfig PATH         kubeconfig to use (default: $KUBECONFIG, else in-cluster)\n"
    "  --namespace NS            watch only this namespace (default: all)\n"
    "  --metrics-port N          port of /metrics, /healthz, /readyz (default 8080; 0 picks a free one)\n"
    "  --metrics-address ADDR    address to bind it to (default 0.0.0.0)\n"
    "  --leader-elect[=BOOL]     take a coordination.k8s.io Lease before reconciling (default false)\n"
    "  --lease-name NAME         (default tandem-operator)\n"
    "  --lease-namespace NS      (default $POD_NAMESPACE, else the kubeconfig's namespace)\n"
    "  --lease-duration S        (default 15)   --renew-deadline S (default 10)   --retry-period S (default 2)\n"
    "  --identity ID             (default $POD_NAME, else hostname-pid)\n"
    "  --worker-image IMAGE      image of worker containers whose template names none (default tandem-worker:0.1.0)\n"
    "  --workers N               jobs reconciled concurrently (default 4)\n"
    "  --resync-period S         re-reconcile every job this often (default 300)\n"
    "  --watch-timeout S         the server ends each watch after about this long (default 300)\n"
    "  --force-delete-after S    force-delete pods stuck terminating on an unreachable node (default 60)\n"
    "  --unreachable-node-wait S restart a gang whose only failure is a worker on a node that stopped reporting\n"
    "                            once it has been silent this long (default 60); another failure restarts at once\n";

struct Flags {
  std::string kubeconfig;
  std::string nameSpace;
  int metricsPort = 8080;
  std::string metricsAddress = "0.0.0.0";
  bool leaderElect = false;
  std::string leaseName = "tandem-operator";
  std::string leaseNamespace;
  double leaseDuration = 15, renewDeadline = 10, retryPeriod = 2;
  std::string identity;
  std::string workerImage = "tandem-worker:0.1.0";
  int workers = 4;
  double resyncPeriod = 300;
  int watchTimeout = 300;
  double forceDeleteAfter = 60;
  double unreachableNodeWait = 60;
};

tandem::StatusOr<double> number(const std::string& flag, const std::string& text, double minimum) {
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  // Bounded above (and NaN refused) so that every conversion to seconds or an int stays defined.
  constexpr double kMaximum = 1e9;
  if (text.empty() || end == nullptr || *end != '\0' || !(value >= minimum && value <= kMaximum))
    return TANDEM_ERROR(StatusCode::kInvalidArgument, "--" + flag + ": \"" + text + "\" is not a number from " +
                                                          std::to_string(minimum) + " to 1e9");
  return value;
}

tandem::StatusOr<Flags> parseFlags(int argc, char** argv) {
  Flags flags;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (arg.rfind("--", 0) != 0) return TANDEM_ERROR(StatusCode::kInvalidArgument, "unexpected argument " + arg);
    std::string name = arg.substr(2), value;
    bool hasValue = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      hasValue = true;
    }
    if (name == "leader-elect") {
      if (hasValue && value != "true" && value != "false")
        return TANDEM_ERROR(StatusCode::kInvalidArgument, "--leader-elect: expected true or false, got " + value);
      flags.leaderElect = !hasValue || value == "true";
      continue;
    }
    if (!hasValue) {
      if (i + 1 >= argc) return TANDEM_ERROR(StatusCode::kInvalidArgument, "--" + name + " needs a value");
      value = argv[++i];
    }
    auto numeric = [&](double minimum) { return number(name, value, minimum); };
    if (name == "kubeconfig") flags.kubeconfig = value;
    else if (name == "namespace") flags.nameSpace = value;
    else if (name == "metrics-address") flags.metricsAddress = value;
    else if (name == "lease-name") flags.leaseName = value;
    else if (name == "lease-namespace") flags.leaseNamespace = value;
    else if (name == "identity") flags.identity = value;
    else if (name == "worker-image") flags.workerImage = value;
    else if (name == "metrics-port") { TANDEM_ASSIGN_OR_RETURN(double v, numeric(0)); flags.metricsPort = static_cast<int>(v); }
    else if (name == "lease-duration") { TANDEM_ASSIGN_OR_RETURN(flags.leaseDuration, numeric(0.1)); }
    else if (name == "renew-deadline") { TANDEM_ASSIGN_OR_RETURN(flags.renewDeadline, numeric(0.1)); }
    else if (name == "retry-period") { TANDEM_ASSIGN_OR_RETURN(flags.retryPeriod, numeric(0.05)); }
    else if (name == "workers") { TANDEM_ASSIGN_OR_RETURN(double v, numeric(1)); flags.workers = static_cast<int>(v); }
    else if (name == "resync-period") { TANDEM_ASSIGN_OR_RETURN(flags.resyncPeriod, numeric(1)); }
    else if (name == "watch-timeout") { TANDEM_ASSIGN_OR_RETURN(double v, numeric(2)); flags.watchTimeout = static_cast<int>(v); }
    else if (name == "force-delete-after") { TANDEM_ASSIGN_OR_RETURN(flags.forceDeleteAfter, numeric(0)); }
    else if (name == "unreachable-node-wait") { TANDEM_ASSIGN_OR_RETURN(flags.unreachableNodeWait, numeric(0)); }
    else return TANDEM_ERROR(StatusCode::kInvalidArgument, "unknown flag --" + name + "\n" + kUsage);
  }
  if (flags.renewDeadline >= flags.leaseDuration)
    return TANDEM_ERROR(StatusCode::kInvalidArgument, "--renew-deadline must be shorter than --lease-duration");
  return flags;
}

std::chrono::milliseconds millis(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

std::string environment(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? "" : value;
}

int run(int argc, char** argv) {
  // glibc gives every thread that allocates its own arena (up to 8 per core); the operator's many short-lived
  // request threads would each keep one. Two arenas hold the caches of 100 jobs in under 50 MB.
  mallopt(M_ARENA_MAX, 2);
  // A write on a connection the API server has closed must be an error to retry, not a silent death:
  // OpenSSL writes to the socket without MSG_NOSIGNAL.
  std::signal(SIGPIPE, SIG_IGN);
  // Signals go to one thread that sets `stop`; every other thread inherits the blocked mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto flags = parseFlags(argc, argv);
  if (!flags.ok()) {
    std::cerr << flags.status().message() << "\n";
    return kExitInvalidConfig;
  }
  auto config = kube::resolveConfig(flags->kubeconfig);
  if (!config.ok()) {
    log::error() << config.status().message();
    return kExitInvalidConfig;
  }
  std::string identity = flags->identity.empty() ? environment("POD_NAME") : flags->identity;
  if (identity.empty()) {
    char host[256] = {0};
    gethostname(host, sizeof host - 1);
    identity = std::string(host) + "-" + std::to_string(getpid());
  }
  log::info() << "tandem-operator " << identity << ": API server " << config->server << " (" << config->source
              << "), watching " << (flags->nameSpace.empty() ? "all namespaces" : "namespace " + flags->nameSpace);

  kube::KubeClient client(*config);
  // The Lease has a client of its own: shutdown cancels the controller's calls before the Lease is released.
  kube::KubeClient electionClient(*config);
  OperatorMetrics metrics;
  ControllerOptions options;
  options.nameSpace = flags->nameSpace;
  options.workers = flags->workers;
  options.resyncPeriod = std::chrono::seconds(static_cast<int64_t>(flags->resyncPeriod));
  options.watchTimeoutSeconds = flags->watchTimeout;
  options.identity = identity;
  options.reconcile.defaultWorkerImage = flags->workerImage;
  options.reconcile.forceDeleteAfter = std::chrono::seconds(static_cast<int64_t>(flags->forceDeleteAfter));
  options.reconcile.unreachableNodeWait = std::chrono::seconds(static_cast<int64_t>(flags->unreachableNodeWait));
  Controller controller(client, options, metrics);

  std::atomic<bool> stop{false};
  std::thread signalThread([&] {
    int received = 0;
    sigwait(&signals, &received);
    log::info() << "received " << (received == SIGTERM ? "SIGTERM" : "SIGINT") << ": shutting down";
    stop = true;
  });
  signalThread.detach();  // it may never return when no signal comes; the process exits around it

  httplib::Server server;
  server.Get("/healthz", [](const httplib::Request&, httplib::Response& response) { response.set_content("ok", "text/plain"); });
  server.Get("/readyz", [&](const httplib::Request&, httplib::Response& response) {
    if (controller.synced()) {
      response.set_content("ok", "text/plain");
    } else {
      response.status = 503;
      response.set_content("informers have not synced yet", "text/plain");
    }
  });
  server.Get("/metrics", [&](const httplib::Request&, httplib::Response& response) {
    response.set_content(metrics.render(), "text/plain; version=0.0.4");
  });
  int port = flags->metricsPort;
  if (port == 0) {
    port = server.bind_to_any_port(flags->metricsAddress);
  } else if (!server.bind_to_port(flags->metricsAddress, port)) {
    port = -1;
  }
  if (port < 0) {
    log::error() << "cannot listen on " << flags->metricsAddress << ":" << flags->metricsPort
                 << " for /metrics, /healthz, /readyz (--metrics-port)";
    return kExitInternal;
  }
  ServingThread serving(server);
  log::info() << "serving /metrics, /healthz, /readyz on " << flags->metricsAddress << ":" << port;

  controller.startInformers();
  while (!stop && !controller.waitForSync(std::chrono::milliseconds(200))) {
  }

  std::unique_ptr<LeaderElector> elector;
  bool leading = !stop;
  if (flags->leaderElect && !stop) {
    LeaderElectionOptions election;
    election.nameSpace = !flags->leaseNamespace.empty() ? flags->leaseNamespace
                         : !environment("POD_NAMESPACE").empty() ? environment("POD_NAMESPACE")
                                                                 : config->nameSpace;
    election.name = flags->leaseName;
    election.identity = identity;
    election.leaseDuration = millis(flags->leaseDuration);
    election.renewDeadline = millis(flags->renewDeadline);
    election.retryPeriod = millis(flags->retryPeriod);
    election.onRenewDeadlineMissed = [] {
      log::error() << "lost leadership: exiting so that only the new leader acts";
      std::_Exit(1);
    };
    elector = std::make_unique<LeaderElector>(electionClient, election);
    leading = elector->acquire(stop);
  }
  if (leading) {
    log::info() << "reconciling with " << options.workers << " workers";
    controller.startWorkers();
    if (elector) {
      if (!elector->holdUntil(stop)) {
        log::error() << "lost leadership: exiting so that only the new leader acts";
        std::_Exit(1);
      }
    } else {
      while (!stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  // Every step of the shutdown is bounded, so a stalled API server cannot keep a SIGTERM'd operator
  // (and its Lease) alive. Reconciles must end while the Lease is surely still ours: it was last renewed
  // at most renewDeadline ago.
  auto shutdownGrace = std::chrono::milliseconds(5000);
  if (elector) shutdownGrace = std::min(shutdownGrace, millis((flags->leaseDuration - flags->renewDeadline) / 2));
  controller.stopWorkers(shutdownGrace);
  if (elector && leading) elector->release();
  controller.stop();
  serving.stop();
  log::info() << "tandem-operator stopped";
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) { return run(argc, argv); }
