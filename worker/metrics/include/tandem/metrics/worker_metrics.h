// The worker's Prometheus metrics (DESIGN.md §8), served on /metrics. Names carry their unit; labels
// are job, rank and stage only (bounded). Thread-safe: prometheus-cpp metrics are atomic.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "tandem/common/status.h"

namespace tandem::metrics {

class WorkerMetrics {
 public:
  // Starts serving on bindAddress ("0.0.0.0:9400"; port 0 picks a free one). UNAVAILABLE when the port
  // is taken.
  static StatusOr<std::unique_ptr<WorkerMetrics>> start(const std::string& bindAddress, const std::string& job,
                                                        int rank, int stage);
  virtual ~WorkerMetrics() = default;
  virtual int port() const = 0;

  virtual void observeStep(double seconds, int64_t samples, int64_t tokens) = 0;
  virtual void setLoss(double loss) = 0;
  virtual void setLearningRate(double lr) = 0;
  virtual void setEvalAccuracy(double accuracy) = 0;
  // Time this rank waited on a gradient all-reduce in one step (what backward did not hide), and bytes.
  virtual void observeAllReduce(double seconds, int64_t bytes) = 0;
  virtual void setPipelineBubbleRatio(double ratio) = 0;
  virtual void observeCheckpoint(double seconds, int64_t bytes) = 0;
  // Job restarts so far (the generation this worker belongs to).
  virtual void setRestarts(int64_t restarts) = 0;
  virtual void setGpuMemoryBytes(int64_t bytes) = 0;
};

}  // namespace tandem::metrics
