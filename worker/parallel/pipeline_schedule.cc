#include "tandem/parallel/pipeline_schedule.h"

#include <algorithm>
#include <limits>

namespace tandem::parallel {

std::vector<size_t> partitionLayers(const std::vector<double>& costs, int stages) {
  const size_t layers = costs.size();
  // best[s][i]: the smallest possible largest-stage cost when the first i layers form s stages.
  const double kInfinity = std::numeric_limits<double>::infinity();
  std::vector<double> prefix(layers + 1, 0.0);
  for (size_t i = 0; i < layers; ++i) prefix[i + 1] = prefix[i] + costs[i];
  std::vector<std::vector<double>> best(stages + 1, std::vector<double>(layers + 1, kInfinity));
  std::vector<std::vector<size_t>> cut(stages + 1, std::vector<size_t>(layers + 1, 0));
  best[0][0] = 0.0;
  for (int s = 1; s <= stages; ++s) {
    for (size_t i = static_cast<size_t>(s); i <= layers; ++i) {
      for (size_t j = static_cast<size_t>(s - 1); j < i; ++j) {  // the last stage is layers [j, i)
        const double candidate = std::max(best[s - 1][j], prefix[i] - prefix[j]);
        if (candidate < best[s][i]) {
          best[s][i] = candidate;
          cut[s][i] = j;
        }
      }
    }
  }
  std::vector<size_t> starts(stages);
  size_t end = layers;
  for (int s = stages; s >= 1; --s) {
    starts[s - 1] = cut[s][end];
    end = cut[s][end];
  }
  return starts;
}

std::vector<PipelineOp> pipelineSchedule(const std::string& kind, int stages, int stage, int microBatches) {
  std::vector<PipelineOp> ops;
  if (kind == "GPipe") {
    for (int m = 0; m < microBatches; ++m) ops.push_back({PipelineOpKind::kForward, m});
    for (int m = 0; m < microBatches; ++m) ops.push_back({PipelineOpKind::kBackward, m});
    return ops;
  }
  const int warmup = std::min(stages - stage - 1, microBatches);
  int nextForward = 0, nextBackward = 0;
  for (; nextForward < warmup; ++nextForward) ops.push_back({PipelineOpKind::kForward, nextForward});
  while (nextForward < microBatches) {
    ops.push_back({PipelineOpKind::kForward, nextForward++});
    ops.push_back({PipelineOpKind::kBackward, nextBackward++});
  }
  while (nextBackward < microBatches) ops.push_back({PipelineOpKind::kBackward, nextBackward++});
  return ops;
}

int peakMicroBatchesInFlight(const std::vector<PipelineOp>& schedule) {
  int live = 0, peak = 0;
  for (const auto& op : schedule) {
    live += op.kind == PipelineOpKind::kForward ? 1 : -1;
    peak = std::max(peak, live);
  }
  return peak;
}

std::string describeSchedule(const std::vector<PipelineOp>& schedule) {
  std::string text;
  for (const auto& op : schedule) {
    if (!text.empty()) text += ' ';
    text += (op.kind == PipelineOpKind::kForward ? 'F' : 'B') + std::to_string(op.microBatch);
  }
  return text;
}

}  // namespace tandem::parallel
