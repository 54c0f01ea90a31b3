// Pipeline parallelism, the pure parts: how ranks map to (replica, stage), how a layer stack is cut
// into contiguous stages, and the order of forward/backward microbatch operations on each stage for
// GPipe and 1F1B (PipeDream-Flush). Table-tested without any process.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tandem::parallel {

// rank = replica * stages + stage: a replica's stages are consecutive ranks.
struct PipelinePosition {
  int replica = 0;
  int stage = 0;
};
inline PipelinePosition positionOf(int rank, int stages) { return {rank / stages, rank % stages}; }
inline int rankOf(int replica, int stage, int stages) { return replica * stages + stage; }

// Cuts `costs` (one per splittable layer) into `stages` contiguous, non-empty ranges minimising the
// largest stage cost. Returns the first layer index of each stage (first is 0). Requires
// 1 <= stages <= costs.size().
std::vector<size_t> partitionLayers(const std::vector<double>& costs, int stages);

enum class PipelineOpKind { kForward, kBackward };
struct PipelineOp {
  PipelineOpKind kind;
  int microBatch;
  bool operator==(const PipelineOp& other) const { return kind == other.kind && microBatch == other.microBatch; }
};

// The operations of `stage` in one optimizer step. GPipe: every forward, then every backward.
// 1F1B: min(stages - stage - 1, microBatches) warm-up forwards, then one forward one backward until the
// forwards run out, then the remaining backwards; at most stages - stage microbatches in flight.
std::vector<PipelineOp> pipelineSchedule(const std::string& kind, int stages, int stage, int microBatches);

// The most microbatches whose activations a stage holds at once under `schedule`.
int peakMicroBatchesInFlight(const std::vector<PipelineOp>& schedule);

// "F0 F1 B0 ..." for logs and test messages.
std::string describeSchedule(const std::vector<PipelineOp>& schedule);

}  // namespace tandem::parallel
