// The training loop of one rank: builds the model from the job spec, runs data-parallel steps over
// this rank's shards, evaluates on the test set, and reports progress.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

#include "tandem/comm/communicator.h"
#include "tandem/common/status.h"
#include "tandem/data/dataset.h"
#include "tandem/manifest/job_spec.h"
#include "tandem/metrics/worker_metrics.h"
#include "tandem/parallel/gradient_accumulator.h"

namespace tandem::engine {

struct Progress {
  int64_t step = 0;         // steps completed
  int64_t totalSteps = 0;
  int64_t epoch = 0;        // 1-based epoch of the last completed step
  int64_t epochs = 0;
  double loss = 0.0;        // mean loss of the last step over the global batch
  double learningRate = 0.0;
  double samplesPerSecond = 0.0;
  double etaSeconds = 0.0;
};

struct EvalResult {
  int64_t step = 0;
  double accuracy = 0.0;
  double loss = 0.0;
  int64_t samples = 0;
};

struct TrainingSummary {
  int64_t steps = 0;
  int64_t resumedFromStep = 0;     // 0: started fresh
  int64_t checkpointsWritten = 0;
  double finalLoss = 0.0;
  EvalResult finalEval;
  double trainSeconds = 0.0;       // the training loop, evaluation excluded
  double samplesPerSecond = 0.0;   // global samples per second of the training loop
  double exposedAllReduceSeconds = 0.0;
  int64_t allReduceBytes = 0;
  // Pipeline accounting of this rank's stage over the whole run: compute time of forwards (loss
  // included) and backwards, time blocked on the neighbouring stages, and idle / (idle + busy).
  int stage = 0;
  double forwardSeconds = 0.0;
  double backwardSeconds = 0.0;
  double idleSeconds = 0.0;
  double bubbleRatio = 0.0;
  int peakMicroBatchesInFlight = 0;
  int64_t peakActivationBytes = 0;
};

struct TrainerOptions {
  manifest::JobSpec spec;
  int rank = 0;
  int worldSize = 1;
  comm::Communicator* communicator = nullptr;  // null when worldSize == 1
  int64_t maxSteps = 0;                        // 0: the spec decides
  int64_t bucketCapFloats = 25 * 1024 * 1024 / 4;  // 25 MiB, PyTorch DDP's default
  std::string dumpParametersPath;              // rank 0 writes the final parameters (raw float32)
  std::string lossLogPath;                     // rank 0 writes "step loss" per step
  // Checkpoints: <spec.checkpoint.dir>/<job name>; off when spec.checkpoint.dir is empty.
  // On SIGTERM (stopRequested) the ranks agree to stop after the same step; rank 0 then writes a
  // checkpoint if the last one is more than everySteps/2 steps old and it fits in the grace period.
  double graceSeconds = 30.0;
  // A checkpoint write still in flight this long after the trainer began waiting for it is taken for
  // hung storage: training fails with DEADLINE_EXCEEDED naming the directory instead of hanging.
  double checkpointTimeoutSeconds = 600.0;
  const std::atomic<bool>* stopRequested = nullptr;
  metrics::WorkerMetrics* metrics = nullptr;   // optional Prometheus metrics of this rank
  std::function<void(const Progress&)> onProgress;  // rank 0, after every step
  std::function<void(const EvalResult&)> onEval;    // rank 0
  std::function<void(int64_t step)> onResume;        // rank 0, when training resumes from a checkpoint
  // Every rank of a multi-worker job with spec.checkpoint.dir (also on a fresh start, which looks for
  // checkpoints): true before a resume's exchanges, which wait on the checkpoint writers' reads and so
  // may run past the collective timeout, false once they are over (done or failed). The worker watches
  // its peers' heartbeats meanwhile, since those waits notice a hung peer only late.
  std::function<void(bool waiting)> onResumeWait;
  // On the training thread before the first step, once the trainer's own threads (gradient sums,
  // checkpoint writes) are running: where the worker places its threads on its CPUs.
  std::function<void()> onThreadsStarted;
  // Where a pipeline stage sums its microbatches' gradients (the same bits either way).
  parallel::GradientAccumulator::Summing gradientSums = parallel::GradientAccumulator::Summing::kBackground;
};

// Runs the whole training, resuming from the newest valid checkpoint when there is one. Returns
// CANCELLED when a stop was requested (on any rank) and honoured at a step boundary.
StatusOr<TrainingSummary> train(const TrainerOptions& options, const data::TrainTest& data);

// "mlp 784-256-128-10 relu": what a checkpoint must match to be resumed.
std::string describeModel(const manifest::JobSpec& spec, const data::Dataset& train);

// Total optimizer steps the spec (and an override) asks for on a dataset of `trainSamples`.
int64_t plannedSteps(const manifest::JobSpec& spec, int64_t trainSamples, int64_t maxStepsOverride);

}  // namespace tandem::engine
