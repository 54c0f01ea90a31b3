#include "tandem/metrics/worker_metrics.h"

#include <httplib.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "tandem/common/serving_thread.h"

namespace tandem::metrics {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

// Step times from 1 ms to ~30 s, all-reduce waits from 10 µs, checkpoint writes from 1 ms.
prometheus::Histogram::BucketBoundaries exponentialBuckets(double start, double factor, int count) {
  prometheus::Histogram::BucketBoundaries bounds;
  for (double bound = start; count-- > 0; bound *= factor) bounds.push_back(bound);
  return bounds;
}

// GET /metrics on cpp-httplib, whose handler threads get the default 8 MiB stack. (prometheus-cpp's own
// exposer runs on civetweb, whose Debian build fixes its threads' stacks at 100 KiB; the static TLS of
// OpenBLAS (60 KiB) and CUDA's runtime is carved out of every thread's stack, and a scrape then overflowed
// what was left.)
class MetricsEndpoint {
 public:
  static StatusOr<std::unique_ptr<MetricsEndpoint>> start(const std::string& bindAddress,
                                                          std::shared_ptr<prometheus::Registry> registry) {
    const size_t colon = bindAddress.rfind(':');
    if (colon == std::string::npos)
      return TANDEM_ERROR(StatusCode::kInvalidArgument, "metrics: bind address " + bindAddress + " has no port");
    std::string host = bindAddress.substr(0, colon);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    int port = 0;
    try {
      port = std::stoi(bindAddress.substr(colon + 1));
    } catch (const std::exception&) {
      return TANDEM_ERROR(StatusCode::kInvalidArgument, "metrics: bind address " + bindAddress + " has no port");
    }
    auto endpoint = std::unique_ptr<MetricsEndpoint>(new MetricsEndpoint(std::move(registry)));
    endpoint->server_.Get("/metrics", [raw = endpoint.get()](const httplib::Request&, httplib::Response& response) {
      response.set_content(prometheus::TextSerializer().Serialize(raw->registry_->Collect()),
                           "text/plain; version=0.0.4");
    });
    endpoint->port_ = port == 0 ? endpoint->server_.bind_to_any_port(host)
                                : (endpoint->server_.bind_to_port(host, port) ? port : -1);
    if (endpoint->port_ < 0)
      return TANDEM_ERROR(StatusCode::kResourceUnavailable, "metrics: cannot listen on " + bindAddress);
    endpoint->serving_ = std::make_unique<ServingThread>(endpoint->server_);
    return endpoint;
  }

  int port() const { return port_; }

 private:
  explicit MetricsEndpoint(std::shared_ptr<prometheus::Registry> registry) : registry_(std::move(registry)) {}

  std::shared_ptr<prometheus::Registry> registry_;
  httplib::Server server_;
  std::unique_ptr<ServingThread> serving_;  // declared after server_: stopped before it goes
  int port_ = -1;
};

class PrometheusWorkerMetrics final : public WorkerMetrics {
 public:
  PrometheusWorkerMetrics(std::shared_ptr<prometheus::Registry> registry, const prometheus::Labels& labels)
      : registry_(std::move(registry)),
        stepSeconds_(BuildHistogram().Name("tandem_step_seconds").Help("Wall time of one optimizer step")
                         .Register(*registry_).Add(labels, exponentialBuckets(0.001, 2, 16))),
        samples_(BuildCounter().Name("tandem_samples_total").Help("Training samples processed by this rank")
                     .Register(*registry_).Add(labels)),
        tokens_(BuildCounter().Name("tandem_tokens_total").Help("Training tokens processed by this rank (gpt)")
                    .Register(*registry_).Add(labels)),
        loss_(BuildGauge().Name("tandem_loss").Help("Mean training loss of the last step over the global batch")
                  .Register(*registry_).Add(labels)),
        evalAccuracy_(BuildGauge().Name("tandem_eval_accuracy").Help("Accuracy of the last evaluation, 0 to 1")
                          .Register(*registry_).Add(labels)),
        learningRate_(BuildGauge().Name("tandem_learning_rate").Help("Learning rate of the last step")
                          .Register(*registry_).Add(labels)),
        allReduceSeconds_(BuildHistogram().Name("tandem_allreduce_seconds")
                              .Help("Per step, time waiting on gradient all-reduce that backward did not hide")
                              .Register(*registry_).Add(labels, exponentialBuckets(0.00001, 2.5, 14))),
        allReduceBytes_(BuildCounter().Name("tandem_allreduce_bytes_total").Help("Gradient bytes all-reduced")
                            .Register(*registry_).Add(labels)),
        bubble_(BuildGauge().Name("tandem_pipeline_bubble_ratio")
                    .Help("Pipeline idle / (idle + busy) of this rank's stage so far").Register(*registry_).Add(labels)),
        checkpointSeconds_(BuildHistogram().Name("tandem_checkpoint_seconds").Help("Duration of a checkpoint write")
                               .Register(*registry_).Add(labels, exponentialBuckets(0.001, 2.5, 14))),
        checkpointBytes_(BuildCounter().Name("tandem_checkpoint_bytes_total").Help("Checkpoint bytes written")
                             .Register(*registry_).Add(labels)),
        restarts_(BuildGauge().Name("tandem_restarts_total").Help("Job restarts before this worker's generation")
                      .Register(*registry_).Add(labels)),
        gpuMemory_(BuildGauge().Name("tandem_gpu_memory_bytes").Help("GPU memory in use (0 on CPU)")
                       .Register(*registry_).Add(labels)) {}

  // Set once, right after construction: the endpoint serves the registry built above.
  void serve(std::unique_ptr<MetricsEndpoint> endpoint) { endpoint_ = std::move(endpoint); }
  int port() const override { return endpoint_ ? endpoint_->port() : 0; }
  void observeStep(double seconds, int64_t samples, int64_t tokens) override {
    stepSeconds_.Observe(seconds);
    samples_.Increment(static_cast<double>(samples));
    tokens_.Increment(static_cast<double>(tokens));
  }
  void setLoss(double loss) override { loss_.Set(loss); }
  void setLearningRate(double lr) override { learningRate_.Set(lr); }
  void setEvalAccuracy(double accuracy) override { evalAccuracy_.Set(accuracy); }
  void observeAllReduce(double seconds, int64_t bytes) override {
    allReduceSeconds_.Observe(seconds);
    allReduceBytes_.Increment(static_cast<double>(bytes));
  }
  void setPipelineBubbleRatio(double ratio) override { bubble_.Set(ratio); }
  void observeCheckpoint(double seconds, int64_t bytes) override {
    checkpointSeconds_.Observe(seconds);
    checkpointBytes_.Increment(static_cast<double>(bytes));
  }
  void setRestarts(int64_t restarts) override { restarts_.Set(static_cast<double>(restarts)); }
  void setGpuMemoryBytes(int64_t bytes) override { gpuMemory_.Set(static_cast<double>(bytes)); }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Histogram& stepSeconds_;
  prometheus::Counter& samples_;
  prometheus::Counter& tokens_;
  prometheus::Gauge& loss_;
  prometheus::Gauge& evalAccuracy_;
  prometheus::Gauge& learningRate_;
  prometheus::Histogram& allReduceSeconds_;
  prometheus::Counter& allReduceBytes_;
  prometheus::Gauge& bubble_;
  prometheus::Histogram& checkpointSeconds_;
  prometheus::Counter& checkpointBytes_;
  prometheus::Gauge& restarts_;
  prometheus::Gauge& gpuMemory_;
  // Last: destroyed (its thread stopped) before the metrics it serves.
  std::unique_ptr<MetricsEndpoint> endpoint_;
};

}  // namespace

StatusOr<std::unique_ptr<WorkerMetrics>> WorkerMetrics::start(const std::string& bindAddress, const std::string& job,
                                                              int rank, int stage) {
  auto registry = std::make_shared<prometheus::Registry>();
  const prometheus::Labels labels{{"job", job}, {"rank", std::to_string(rank)}, {"stage", std::to_string(stage)}};
  auto metrics = std::make_unique<PrometheusWorkerMetrics>(registry, labels);
  TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<MetricsEndpoint> endpoint, MetricsEndpoint::start(bindAddress, registry));
  metrics->serve(std::move(endpoint));
  return std::unique_ptr<WorkerMetrics>(std::move(metrics));
}

}  // namespace tandem::metrics
