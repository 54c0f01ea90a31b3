#include "tandem/engine/trainer.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>

#include "tandem/checkpoint/checkpoint.h"
#include "tandem/common/log.h"
#include "tandem/kernels/cross_entropy.h"
#include "tandem/model/sequential.h"
#include "tandem/optim/optimizer.h"
#include "tandem/parallel/data_parallel.h"

namespace tandem::engine {
namespace {

using Clock = std::chrono::steady_clock;

double secondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Accuracy and mean loss on the test set: each rank evaluates its contiguous slice, then one
// all-reduce of (correct, loss sum) gives the totals.
StatusOr<EvalResult> evaluate(model::Sequential& model, const data::Dataset& test, int rank, int worldSize,
                              comm::Communicator* communicator) {
  const int64_t begin = test.count * rank / worldSize;
  const int64_t end = test.count * (rank + 1) / worldSize;
  constexpr int64_t kEvalBatch = 1000;
  Tensor inputs;
  std::vector<int32_t> labels;
  std::vector<int64_t> indices;
  double correct = 0.0, lossSum = 0.0;
  for (int64_t first = begin; first < end; first += kEvalBatch) {
    indices.clear();
    for (int64_t i = first; i < std::min(end, first + kEvalBatch); ++i) indices.push_back(i);
    test.gather(indices, inputs, labels);
    const Tensor& logits = model.forward(inputs);
    int64_t batchCorrect = 0;
    lossSum += kernels::softmax_cross_entropy(logits.rows(), logits.cols(), logits.data(), labels.data(), 0.0f,
                                              nullptr, &batchCorrect);
    correct += static_cast<double>(batchCorrect);
  }
  float totals[2] = {static_cast<float>(correct), static_cast<float>(lossSum)};
  if (communicator != nullptr && worldSize > 1) TANDEM_RETURN_IF_ERROR(communicator->allReduce(totals, 2));
  EvalResult result;
  result.samples = test.count;
  result.accuracy = totals[0] / static_cast<double>(test.count);
  result.loss = totals[1] / static_cast<double>(test.count);
  return result;
}

model::ActivationKind activationOf(const manifest::JobSpec& spec) {
  return spec.model.mlp.activation == "gelu" ? model::ActivationKind::kGelu : model::ActivationKind::kRelu;
}

}  // namespace

int64_t plannedSteps(const manifest::JobSpec& spec, int64_t trainSamples, int64_t maxStepsOverride) {
  int64_t steps = spec.training.epochs * (trainSamples / spec.training.globalBatchSize);
  if (spec.training.maxSteps > 0) steps = std::min(steps, spec.training.maxSteps);
  if (maxStepsOverride > 0) steps = std::min(steps, maxStepsOverride);
  return steps;
}

std::string describeModel(const manifest::JobSpec& spec, const data::Dataset& train) {
  std::ostringstream text;
  text << "mlp " << train.features;
  for (int64_t width : spec.model.mlp.hidden) text << '-' << width;
  text << '-' << train.classes << ' ' << spec.model.mlp.activation;
  return text.str();
}

namespace {

// Keeps the loss log's lines up to and including `step` (a resumed run then rewrites the rest, so the
// file ends up line for line what an uninterrupted run writes).
Status truncateLossLog(const std::string& path, int64_t step) {
  std::ifstream in(path);
  std::string kept, line;
  while (std::getline(in, line)) {
    long long lineStep = 0;
    if (std::sscanf(line.c_str(), "%lld", &lineStep) == 1 && lineStep <= step) kept += line + "\n";
  }
  std::ofstream out(path, std::ios::trunc);
  out << kept;
  if (!out) return TANDEM_ERROR(StatusCode::kInvalidArgument, path + ": cannot rewrite the loss log");
  return Status::Ok();
}

// Rank 0 finds the newest valid checkpoint and hands its state to every rank by broadcast, so only
// rank 0 needs to see the checkpoint volume. Returns the step to resume after (0: fresh start).
StatusOr<int64_t> restoreFromCheckpoint(const TrainerOptions& options, const std::string& modelDescription,
                                        const std::string& trainingConfig, model::Sequential& network,
                                        optim::Optimizer& optimizer, comm::Communicator* communicator) {
  int64_t header[2] = {0, 0};  // step, optimizer steps
  std::optional<checkpoint::CheckpointState> state;
  if (options.rank == 0) {
    checkpoint::CheckpointStore store(options.spec.checkpoint.dir + "/" + options.spec.name, options.spec.checkpoint.keep);
    auto found = store.loadNewestValid(modelDescription, 0, [](const std::string& warning) { log::warning() << warning; });
    if (!found.ok()) return found.status();
    state = std::move(found).value();
    if (state) {
      if (state->parameters.size() != static_cast<size_t>(network.parameterCount()) ||
          state->optimizerState.size() != static_cast<size_t>(optimizer.stateSize()))
        return TANDEM_ERROR(StatusCode::kFailedPrecondition,
                            store.root() + "/" + checkpoint::stepDirectoryName(state->step) +
                                ": optimizer state of another size (was the optimizer kind changed?)");
      if (state->trainingConfig != trainingConfig)
        log::warning() << "resuming " << checkpoint::stepDirectoryName(state->step)
                       << " with a changed training configuration (allowed: learning rate, steps, ...). Checkpoint:\n"
                       << state->trainingConfig << "now:\n" << trainingConfig;
      header[0] = state->step;
      header[1] = state->optimizerSteps;
      std::copy(state->parameters.begin(), state->parameters.end(), network.parameters());
      std::copy(state->optimizerState.begin(), state->optimizerState.end(), optimizer.state());
      log::info() << "resuming from " << store.root() << "/" << checkpoint::stepDirectoryName(state->step);
    }
  }
  if (communicator != nullptr) {
    TANDEM_RETURN_IF_ERROR(communicator->broadcast(header, sizeof(header), 0).withContext("sharing the checkpoint step"));
    if (header[0] > 0) {
      TANDEM_RETURN_IF_ERROR(communicator->broadcast(network.parameters(), network.parameterCount() * 4, 0));
      TANDEM_RETURN_IF_ERROR(communicator->broadcast(optimizer.state(), optimizer.stateSize() * 4, 0));
    }
  }
  optimizer.setStepsTaken(header[1]);
  return header[0];
}

}  // namespace

StatusOr<TrainingSummary> train(const TrainerOptions& options, const data::TrainTest& data) {
  const manifest::JobSpec& spec = options.spec;
  const int64_t globalBatch = spec.training.globalBatchSize;
  if (data.train.count < globalBatch)
    return TANDEM_ERROR(StatusCode::kInvalidArgument,
                        "spec.training.globalBatchSize: " + std::to_string(globalBatch) + " is larger than the " +
                            std::to_string(data.train.count) + " training samples");
  const bool isLeader = options.rank == 0;
  comm::Communicator* communicator = options.worldSize > 1 ? options.communicator : nullptr;

  // Two trailing gradient slots ride with the first all-reduce bucket: the local loss sum, and this
  // rank's stop vote (so every rank stops after the same step when any one was asked to).
  constexpr int64_t kLossSlot = 0, kStopSlot = 1;
  auto network = model::buildMlp(data.train.features, spec.model.mlp.hidden, data.train.classes,
                                 activationOf(spec), /*trailingGradientSlots=*/2);
  network->initialize(static_cast<uint64_t>(spec.training.seed));
  if (communicator != nullptr)  // identical by seed already; the broadcast makes it a guarantee
    TANDEM_RETURN_IF_ERROR(communicator->broadcast(network->parameters(),
                                                   network->parameterCount() * static_cast<int64_t>(sizeof(float)), 0)
                               .withContext("sharing initial parameters"));
  if (isLeader) log::info() << "model mlp:\n" << network->describe();

  optim::OptimizerOptions optimizerOptions;
  optimizerOptions.kind = spec.optimizer.kind;
  optimizerOptions.weightDecay = spec.optimizer.weightDecay;
  optimizerOptions.beta1 = spec.optimizer.beta1;
  optimizerOptions.beta2 = spec.optimizer.beta2;
  optimizerOptions.eps = spec.optimizer.eps;
  optimizerOptions.momentum = spec.optimizer.momentum;
  optimizerOptions.nesterov = spec.optimizer.nesterov;
  optim::Optimizer optimizer(optimizerOptions, network->parameterCount());

  const std::string modelDescription = describeModel(spec, data.train);
  const std::string trainingConfig = manifest::canonicalTrainingConfig(spec);
  const bool checkpointing = !spec.checkpoint.dir.empty();
  int64_t firstStep = 0;
  if (checkpointing) {
    TANDEM_ASSIGN_OR_RETURN(firstStep, restoreFromCheckpoint(options, modelDescription, trainingConfig, *network,
                                                             optimizer, communicator));
    if (firstStep > 0 && isLeader && options.onResume) options.onResume(firstStep);
  }

  data::ShardedBatches batches(data.train.count, globalBatch, static_cast<uint64_t>(spec.training.seed), options.rank,
                               options.worldSize);
  const int64_t totalSteps = plannedSteps(spec, data.train.count, options.maxSteps);
  optim::ScheduleOptions schedule{spec.optimizer.schedule, spec.optimizer.lr, spec.optimizer.warmupSteps, totalSteps};
  parallel::BucketedAllReduce allReduce(*network, communicator, options.bucketCapFloats);
  if (isLeader && communicator != nullptr) log::info() << allReduce.describe();

  std::unique_ptr<std::ofstream> lossLog;
  if (isLeader && !options.lossLogPath.empty()) {
    if (firstStep > 0) TANDEM_RETURN_IF_ERROR(truncateLossLog(options.lossLogPath, firstStep));
    lossLog = std::make_unique<std::ofstream>(options.lossLogPath, firstStep > 0 ? std::ios::app : std::ios::trunc);
    if (!*lossLog) return TANDEM_ERROR(StatusCode::kInvalidArgument, options.lossLogPath + ": cannot write the loss log");
  }

  TrainingSummary summary;
  summary.resumedFromStep = firstStep;
  summary.steps = firstStep;
  // Only data-parallel rank 0 writes (one stage today). Failures are logged; training goes on and
  // the earlier checkpoints stay.
  std::atomic<int64_t> lastDurableStep{firstStep};
  std::atomic<double> lastWriteSeconds{0.0};
  std::atomic<int64_t> checkpointsWritten{0};
  std::unique_ptr<checkpoint::AsyncCheckpointer> checkpointer;
  if (checkpointing && isLeader) {
    checkpointer = std::make_unique<checkpoint::AsyncCheckpointer>(
        checkpoint::CheckpointStore(spec.checkpoint.dir + "/" + spec.name, spec.checkpoint.keep),
        [&](const checkpoint::AsyncCheckpointer::Result& result) {
          if (result.status.ok()) {
            lastDurableStep = result.step;
            lastWriteSeconds = result.seconds;
            ++checkpointsWritten;
            log::info() << "checkpoint " << checkpoint::stepDirectoryName(result.step) << " written: " << result.bytes
                        << " bytes in " << result.seconds << " s";
          } else {
            log::error() << result.status.message() << "; training continues, the last good checkpoint is "
                         << (lastDurableStep > 0 ? checkpoint::stepDirectoryName(lastDurableStep) : std::string("none"));
          }
        });
  }
  int64_t lastSubmittedStep = firstStep;
  auto snapshot = [&](int64_t step) {
    lastSubmittedStep = step;
    checkpoint::CheckpointState state;
    state.step = step;
    state.optimizerSteps = optimizer.stepsTaken();
    state.job = spec.jobKey();
    state.modelDescription = modelDescription;
    state.trainingConfig = trainingConfig;
    state.seed = static_cast<uint64_t>(spec.training.seed);
    state.parameters.assign(network->parameters(), network->parameters() + network->parameterCount());
    state.optimizerState.assign(optimizer.state(), optimizer.state() + optimizer.stateSize());
    checkpointer->submit(std::move(state));
  };

  Tensor inputs, gradLogits;
  std::vector<int32_t> labels;
  const auto onGradientsReady = [&](int64_t offset) { allReduce.onGradientsReady(offset); };
  double evalSeconds = 0.0;
  std::optional<std::chrono::steady_clock::time_point> stopDeadline;
  const auto loopStart = Clock::now();
  for (int64_t step = firstStep; step < totalSteps; ++step) {
    const bool stopVote = options.stopRequested != nullptr && options.stopRequested->load();
    if (stopVote && !stopDeadline)
      stopDeadline = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(options.graceSeconds * 1000));
    log::setStep(step + 1);
    data.train.gather(batches.shard(step), inputs, labels);
    network->zeroGradients();
    const Tensor& logits = network->forward(inputs);
    gradLogits.reshape(logits.shape());
    network->trailingGradientSlots()[kLossSlot] = static_cast<float>(kernels::softmax_cross_entropy(
        logits.rows(), logits.cols(), logits.data(), labels.data(), 1.0f / static_cast<float>(globalBatch),
        gradLogits.data(), nullptr));
    network->trailingGradientSlots()[kStopSlot] = stopVote ? 1.0f : 0.0f;
    network->backward(gradLogits, onGradientsReady);
    TANDEM_RETURN_IF_ERROR(allReduce.finish().withContext("step " + std::to_string(step + 1)));
    const double loss = network->trailingGradientSlots()[kLossSlot] / static_cast<double>(globalBatch);
    const double lr = optim::learningRate(schedule, step);
    optimizer.step(network->parameters(), network->gradients(), lr);
    summary.finalLoss = loss;
    summary.steps = step + 1;

    if (lossLog) {
      char line[64];
      std::snprintf(line, sizeof(line), "%lld %.9g\n", static_cast<long long>(step + 1), loss);
      *lossLog << line << std::flush;
    }
    if (isLeader && options.onProgress) {
      Progress progress;
      progress.step = step + 1;
      progress.totalSteps = totalSteps;
      progress.epoch = step / batches.stepsPerEpoch() + 1;
      progress.epochs = (totalSteps + batches.stepsPerEpoch() - 1) / batches.stepsPerEpoch();
      progress.loss = loss;
      progress.learningRate = lr;
      const double trainSeconds = secondsSince(loopStart) - evalSeconds;
      const int64_t stepsHere = progress.step - firstStep;
      progress.samplesPerSecond = static_cast<double>(stepsHere * globalBatch) / std::max(trainSeconds, 1e-9);
      progress.etaSeconds = static_cast<double>(totalSteps - progress.step) * trainSeconds / stepsHere;
      options.onProgress(progress);
    }
    // Every rank saw the same votes (they were summed with the gradients): stop together, here.
    if (network->trailingGradientSlots()[kStopSlot] > 0.0f) {
      // The grace period runs from this rank's own signal, or from now when another rank was asked.
      if (!stopDeadline)
        stopDeadline = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(options.graceSeconds * 1000));
      if (checkpointer && step + 1 - lastSubmittedStep > spec.checkpoint.everySteps / 2) {
        const double left = std::chrono::duration<double>(*stopDeadline - Clock::now()).count();
        if (left > 2.0 * lastWriteSeconds + 0.5) {
          log::info() << "stop requested: writing a checkpoint of step " << step + 1 << " (" << left << " s of grace left)";
          snapshot(step + 1);
        } else {
          log::warning() << "stop requested: no time for a checkpoint (" << left << " s of grace left)";
        }
      }
      if (checkpointer) checkpointer->drain();
      return TANDEM_ERROR(StatusCode::kCancelled, "stopped by request after step " + std::to_string(step + 1));
    }
    if (checkpointer && spec.checkpoint.everySteps > 0 && (step + 1) % spec.checkpoint.everySteps == 0)
      snapshot(step + 1);
    const bool evalDue = spec.training.evalEvery > 0 && (step + 1) % spec.training.evalEvery == 0 && step + 1 < totalSteps;
    if (evalDue) {
      const auto evalStart = Clock::now();
      TANDEM_ASSIGN_OR_RETURN(EvalResult eval, evaluate(*network, data.test, options.rank, options.worldSize, communicator));
      eval.step = step + 1;
      if (isLeader && options.onEval) options.onEval(eval);
      evalSeconds += secondsSince(evalStart);
    }
  }
  summary.trainSeconds = secondsSince(loopStart) - evalSeconds;
  summary.samplesPerSecond =
      static_cast<double>((summary.steps - firstStep) * globalBatch) / std::max(summary.trainSeconds, 1e-9);
  summary.exposedAllReduceSeconds = allReduce.exposedSeconds();
  summary.allReduceBytes = allReduce.bytesReduced();
  // The finished model is a checkpoint too: a restart after the end resumes at the end.
  if (checkpointer) {
    if (lastSubmittedStep != summary.steps) snapshot(summary.steps);
    checkpointer->drain();
  }
  summary.checkpointsWritten = checkpointsWritten;

  TANDEM_ASSIGN_OR_RETURN(summary.finalEval,
                          evaluate(*network, data.test, options.rank, options.worldSize, communicator));
  summary.finalEval.step = summary.steps;
  if (isLeader && options.onEval) options.onEval(summary.finalEval);

  if (isLeader && !options.dumpParametersPath.empty()) {
    std::ofstream out(options.dumpParametersPath, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(network->parameters()),
              static_cast<std::streamsize>(network->parameterCount() * sizeof(float)));
    if (!out) return TANDEM_ERROR(StatusCode::kInvalidArgument, options.dumpParametersPath + ": cannot write parameters");
  }
  return summary;
}

}  // namespace tandem::engine
