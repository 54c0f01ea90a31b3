#include "tandem/engine/trainer.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>

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

StatusOr<TrainingSummary> train(const TrainerOptions& options, const data::TrainTest& data) {
  const manifest::JobSpec& spec = options.spec;
  const int64_t globalBatch = spec.training.globalBatchSize;
  if (data.train.count < globalBatch)
    return TANDEM_ERROR(StatusCode::kInvalidArgument,
                        "spec.training.globalBatchSize: " + std::to_string(globalBatch) + " is larger than the " +
                            std::to_string(data.train.count) + " training samples");
  const bool isLeader = options.rank == 0;
  comm::Communicator* communicator = options.worldSize > 1 ? options.communicator : nullptr;

  // One trailing gradient slot carries the local loss sum; it is summed with the first bucket.
  auto network = model::buildMlp(data.train.features, spec.model.mlp.hidden, data.train.classes,
                                 activationOf(spec), /*trailingGradientSlots=*/1);
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

  data::ShardedBatches batches(data.train.count, globalBatch, static_cast<uint64_t>(spec.training.seed), options.rank,
                               options.worldSize);
  const int64_t totalSteps = plannedSteps(spec, data.train.count, options.maxSteps);
  optim::ScheduleOptions schedule{spec.optimizer.schedule, spec.optimizer.lr, spec.optimizer.warmupSteps, totalSteps};
  parallel::BucketedAllReduce allReduce(*network, communicator, options.bucketCapFloats);
  if (isLeader && communicator != nullptr) log::info() << allReduce.describe();

  std::unique_ptr<std::ofstream> lossLog;
  if (isLeader && !options.lossLogPath.empty()) {
    lossLog = std::make_unique<std::ofstream>(options.lossLogPath, std::ios::trunc);
    if (!*lossLog) return TANDEM_ERROR(StatusCode::kInvalidArgument, options.lossLogPath + ": cannot write the loss log");
  }

  Tensor inputs, gradLogits;
  std::vector<int32_t> labels;
  const auto onGradientsReady = [&](int64_t offset) { allReduce.onGradientsReady(offset); };
  TrainingSummary summary;
  double evalSeconds = 0.0;
  const auto loopStart = Clock::now();
  for (int64_t step = 0; step < totalSteps; ++step) {
    if (options.stopRequested != nullptr && options.stopRequested->load())
      return TANDEM_ERROR(StatusCode::kCancelled, "stopped by signal before step " + std::to_string(step + 1));
    log::setStep(step + 1);
    data.train.gather(batches.shard(step), inputs, labels);
    network->zeroGradients();
    const Tensor& logits = network->forward(inputs);
    gradLogits.reshape(logits.shape());
    *network->trailingGradientSlots() = static_cast<float>(kernels::softmax_cross_entropy(
        logits.rows(), logits.cols(), logits.data(), labels.data(), 1.0f / static_cast<float>(globalBatch),
        gradLogits.data(), nullptr));
    network->backward(gradLogits, onGradientsReady);
    TANDEM_RETURN_IF_ERROR(allReduce.finish().withContext("step " + std::to_string(step + 1)));
    const double loss = *network->trailingGradientSlots() / static_cast<double>(globalBatch);
    const double lr = optim::learningRate(schedule, step);
    optimizer.step(network->parameters(), network->gradients(), lr);
    summary.finalLoss = loss;
    summary.steps = step + 1;

    if (lossLog) {
      char line[64];
      std::snprintf(line, sizeof(line), "%lld %.9g\n", static_cast<long long>(step + 1), loss);
      *lossLog << line;
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
      progress.samplesPerSecond = static_cast<double>(progress.step * globalBatch) / std::max(trainSeconds, 1e-9);
      progress.etaSeconds = static_cast<double>(totalSteps - progress.step) * trainSeconds / progress.step;
      options.onProgress(progress);
    }
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
  summary.samplesPerSecond = static_cast<double>(summary.steps * globalBatch) / std::max(summary.trainSeconds, 1e-9);
  summary.exposedAllReduceSeconds = allReduce.exposedSeconds();
  summary.allReduceBytes = allReduce.bytesReduced();

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
