#include "tandem/engine/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>

#include "tandem/checkpoint/checkpoint.h"
#include "tandem/common/log.h"
#include "tandem/kernels/cross_entropy.h"
#include "tandem/model/sequential.h"
#include "tandem/optim/optimizer.h"
#include "tandem/parallel/data_parallel.h"
#include "tandem/parallel/gradient_accumulator.h"
#include "tandem/parallel/pipeline_schedule.h"

namespace tandem::engine {
namespace {

using Clock = std::chrono::steady_clock;

double secondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// The layout of this rank in the job: rank = replica * stages + stage (DESIGN.md §6).
struct Topology {
  int stages = 1, replicas = 1, stage = 0, replica = 0, microBatches = 1;
  comm::Communicator* world = nullptr;         // null with one rank
  comm::Communicator* dataParallel = nullptr;  // my stage's replicas; null when replicas == 1
  comm::Communicator* pipeline = nullptr;      // my replica's stages; null when stages == 1
  std::unique_ptr<comm::Communicator> ownedDataParallel, ownedPipeline;
  bool firstStage() const { return stage == 0; }
  bool lastStage() const { return stage == stages - 1; }
  // Data-parallel rank 0 of each stage keeps that stage's checkpoints.
  bool writesCheckpoints() const { return replica == 0; }
};

StatusOr<Topology> makeTopology(const TrainerOptions& options) {
  Topology topology;
  topology.stages = static_cast<int>(options.spec.parallelism.pipelineStages);
  topology.replicas = options.worldSize / topology.stages;
  topology.stage = options.rank % topology.stages;
  topology.replica = options.rank / topology.stages;
  topology.microBatches = static_cast<int>(options.spec.parallelism.microBatches);
  topology.world = options.worldSize > 1 ? options.communicator : nullptr;
  if (topology.world == nullptr) return topology;
  // With one of the two degrees at 1 the other group is the whole world: no new mesh needed.
  if (topology.stages == 1) {
    topology.dataParallel = topology.world;
  } else if (topology.replicas > 1) {
    TANDEM_ASSIGN_OR_RETURN(topology.ownedDataParallel, topology.world->split(topology.stage, topology.replica));
    topology.dataParallel = topology.ownedDataParallel.get();
  }
  if (topology.replicas == 1) {
    topology.pipeline = topology.stages > 1 ? topology.world : nullptr;
  } else if (topology.stages > 1) {
    TANDEM_ASSIGN_OR_RETURN(topology.ownedPipeline, topology.world->split(topology.replica, topology.stage));
    topology.pipeline = topology.ownedPipeline.get();
  }
  return topology;
}

// Tags of the activations and gradients of microbatch m between neighbouring stages.
uint32_t activationTag(int microBatch) { return 2u * static_cast<uint32_t>(microBatch); }
uint32_t gradientTag(int microBatch) { return 2u * static_cast<uint32_t>(microBatch) + 1u; }

// Accuracy and mean loss on the test set: each replica evaluates its contiguous slice through its
// pipeline; the last stages count, and one all-reduce over the world gives the totals.
StatusOr<EvalResult> evaluate(model::Sequential& model, const data::Dataset& test, const Topology& topology) {
  const int64_t begin = test.count * topology.replica / topology.replicas;
  const int64_t end = test.count * (topology.replica + 1) / topology.replicas;
  constexpr int64_t kEvalBatch = 1000;
  Tensor inputs;
  std::vector<int32_t> labels;
  std::vector<int64_t> indices;
  model::Activations activations;
  double correct = 0.0, lossSum = 0.0;
  for (int64_t first = begin; first < end; first += kEvalBatch) {
    indices.clear();
    for (int64_t i = first; i < std::min(end, first + kEvalBatch); ++i) indices.push_back(i);
    const int64_t rows = static_cast<int64_t>(indices.size());
    test.gather(indices, inputs, labels);  // labels for the last stage, inputs for the first
    if (!topology.firstStage()) {
      inputs.reshape({rows, model.layer(0).inputFeatures()});
      TANDEM_RETURN_IF_ERROR(topology.pipeline->recv(inputs.data(), inputs.size() * 4, topology.stage - 1, 0));
    }
    const Tensor& output = model.forward(inputs, activations);
    if (!topology.lastStage()) {
      TANDEM_RETURN_IF_ERROR(topology.pipeline->send(output.data(), output.size() * 4, topology.stage + 1, 0));
      continue;
    }
    int64_t batchCorrect = 0;
    lossSum += kernels::softmax_cross_entropy(output.rows(), output.cols(), output.data(), labels.data(), 0.0f,
                                              nullptr, &batchCorrect);
    correct += static_cast<double>(batchCorrect);
  }
  float totals[2] = {static_cast<float>(correct), static_cast<float>(lossSum)};
  if (topology.world != nullptr) TANDEM_RETURN_IF_ERROR(topology.world->allReduce(totals, 2));
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

// One pipeline step of a stage, op by op: "F3 12.1-24.0 (waited 0.4)" in ms from the step's start,
// where the wait is the time blocked on a neighbour before computing.
class StageTimeline {
 public:
  void begin(Clock::time_point stepStart) {
    stepStart_ = stepStart;
    text_.str("");
    text_ << "(ms from the step's start):";
  }
  void record(const parallel::PipelineOp& op, Clock::time_point opStart, Clock::time_point computeStart) {
    text_ << (op.kind == parallel::PipelineOpKind::kForward ? " F" : " B") << op.microBatch << " "
          << milliseconds(computeStart) << "-" << milliseconds(Clock::now()) << " (waited "
          << milliseconds(computeStart) - milliseconds(opStart) << ")";
  }
  std::string finish() {
    text_ << "; sends done " << milliseconds(Clock::now());
    return text_.str();
  }

 private:
  double milliseconds(Clock::time_point at) const {
    return std::round(std::chrono::duration<double, std::milli>(at - stepStart_).count() * 10) / 10;
  }
  Clock::time_point stepStart_;
  std::ostringstream text_;
};

// Where a stage keeps its checkpoints: <dir>/<job name> without pipelines, <dir>/<job name>/stage-<s>
// with them (each stage's shards are verified and published on their own; the stages then agree on
// the newest step that every one of them holds).
std::string checkpointRoot(const manifest::JobSpec& spec, const Topology& topology) {
  std::string root = spec.checkpoint.dir + "/" + spec.name;
  if (topology.stages > 1) root += "/stage-" + std::to_string(topology.stage);
  return root;
}

// The stages' checkpoint writers (replica 0 of each stage: ranks 0..stages-1) list the steps they hold
// that verify; rank 0 picks the newest step every stage holds and broadcasts it; each writer loads its
// shard and hands it to its stage's replicas. Returns the step to resume after (0: fresh start).
StatusOr<int64_t> restoreFromCheckpoint(const TrainerOptions& options, const Topology& topology,
                                        const std::string& modelDescription, const std::string& trainingConfig,
                                        model::Sequential& network, optim::Optimizer& optimizer) {
  const checkpoint::CheckpointStore store(checkpointRoot(options.spec, topology), options.spec.checkpoint.keep);
  std::vector<int64_t> validSteps;
  std::map<int64_t, checkpoint::CheckpointState> loaded;
  if (topology.writesCheckpoints()) {
    for (int64_t step : store.listSteps()) {
      auto state = store.read(step, topology.stage);
      if (!state.ok()) {
        log::warning() << "skipping checkpoint " << checkpoint::stepDirectoryName(step) << ": " << state.status().message();
        continue;
      }
      if (state->modelDescription != modelDescription)
        return TANDEM_ERROR(StatusCode::kFailedPrecondition,
                            "checkpoint " + store.root() + "/" + checkpoint::stepDirectoryName(step) + " holds model \"" +
                                state->modelDescription + "\" but this job trains \"" + modelDescription +
                                "\": refusing to resume (use another checkpoint.dir or job name to start over)");
      if (state->parameters.size() != static_cast<size_t>(network.parameterCount()) ||
          state->optimizerState.size() != static_cast<size_t>(optimizer.stateSize()))
        return TANDEM_ERROR(StatusCode::kFailedPrecondition,
                            store.root() + "/" + checkpoint::stepDirectoryName(step) +
                                ": optimizer state of another size (was the optimizer kind changed?)");
      validSteps.push_back(step);
      loaded.emplace(step, std::move(state).value());
    }
  }
  int64_t chosen = validSteps.empty() ? 0 : validSteps.front();
  if (topology.stages > 1 && topology.replica == 0) {
    // Replica 0's pipeline holds exactly the writers; its rank 0 is the world's rank 0.
    if (topology.stage > 0) {
      int64_t count = static_cast<int64_t>(validSteps.size());
      TANDEM_RETURN_IF_ERROR(topology.pipeline->send(&count, sizeof(count), 0, 0));
      if (count > 0) TANDEM_RETURN_IF_ERROR(topology.pipeline->send(validSteps.data(), count * 8, 0, 1));
    } else {
      std::set<int64_t> common(validSteps.begin(), validSteps.end());
      for (int stage = 1; stage < topology.stages; ++stage) {
        int64_t count = 0;
        TANDEM_RETURN_IF_ERROR(topology.pipeline->recv(&count, sizeof(count), stage, 0));
        std::vector<int64_t> theirs(count);
        if (count > 0) TANDEM_RETURN_IF_ERROR(topology.pipeline->recv(theirs.data(), count * 8, stage, 1));
        std::set<int64_t> both;
        for (int64_t step : theirs)
          if (common.count(step)) both.insert(step);
        common = both;
      }
      chosen = common.empty() ? 0 : *common.rbegin();
      if (!validSteps.empty() && chosen != validSteps.front())
        log::warning() << "the newest checkpoint all " << topology.stages << " stages hold is step " << chosen;
    }
  }
  if (topology.world != nullptr)
    TANDEM_RETURN_IF_ERROR(topology.world->broadcast(&chosen, sizeof(chosen), 0).withContext("sharing the checkpoint step"));
  if (chosen == 0) return int64_t{0};

  int64_t optimizerSteps = 0;
  if (topology.writesCheckpoints()) {
    auto found = loaded.find(chosen);
    if (found == loaded.end())
      return TANDEM_ERROR(StatusCode::kInternal, "stage " + std::to_string(topology.stage) + " lacks the agreed checkpoint " +
                                                     checkpoint::stepDirectoryName(chosen));
    const checkpoint::CheckpointState& state = found->second;
    if (state.trainingConfig != trainingConfig)
      log::warning() << "resuming " << checkpoint::stepDirectoryName(chosen)
                     << " with a changed training configuration (allowed: learning rate, steps, ...). Checkpoint:\n"
                     << state.trainingConfig << "now:\n" << trainingConfig;
    std::copy(state.parameters.begin(), state.parameters.end(), network.parameters());
    std::copy(state.optimizerState.begin(), state.optimizerState.end(), optimizer.state());
    optimizerSteps = state.optimizerSteps;
    log::info() << "resuming from " << store.root() << "/" << checkpoint::stepDirectoryName(chosen);
  }
  if (topology.dataParallel != nullptr) {
    TANDEM_RETURN_IF_ERROR(topology.dataParallel->broadcast(&optimizerSteps, sizeof(optimizerSteps), 0));
    TANDEM_RETURN_IF_ERROR(topology.dataParallel->broadcast(network.parameters(), network.parameterCount() * 4, 0));
    TANDEM_RETURN_IF_ERROR(topology.dataParallel->broadcast(optimizer.state(), optimizer.stateSize() * 4, 0));
  }
  optimizer.setStepsTaken(optimizerSteps);
  return chosen;
}

// Rank 0 gathers every stage's parameters (replica 0's pipeline) and writes them in model order.
Status dumpParameters(const std::string& path, const Topology& topology, model::Sequential& network) {
  if (topology.replica != 0) return Status::Ok();
  if (topology.stage > 0) {
    int64_t count = network.parameterCount();
    TANDEM_RETURN_IF_ERROR(topology.pipeline->send(&count, sizeof(count), 0, 0));
    return topology.pipeline->send(network.parameters(), count * 4, 0, 1);
  }
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(network.parameters()),
            static_cast<std::streamsize>(network.parameterCount() * sizeof(float)));
  for (int stage = 1; stage < topology.stages; ++stage) {
    int64_t count = 0;
    TANDEM_RETURN_IF_ERROR(topology.pipeline->recv(&count, sizeof(count), stage, 0));
    std::vector<float> values(count);
    TANDEM_RETURN_IF_ERROR(topology.pipeline->recv(values.data(), count * 4, stage, 1));
    out.write(reinterpret_cast<const char*>(values.data()), static_cast<std::streamsize>(count * sizeof(float)));
  }
  if (!out) return TANDEM_ERROR(StatusCode::kInvalidArgument, path + ": cannot write parameters");
  return Status::Ok();
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
  TANDEM_ASSIGN_OR_RETURN(Topology topology, makeTopology(options));
  const int stages = topology.stages, microBatches = topology.microBatches;

  // Partition the linear layers into contiguous stages, balanced by estimated compute: per sample, a
  // linear layer's forward, weight-gradient and input-gradient GEMMs each cost its multiply-adds, and
  // the first layer skips the input gradient.
  const auto& hidden = spec.model.mlp.hidden;
  std::vector<int64_t> widths{data.train.features};
  widths.insert(widths.end(), hidden.begin(), hidden.end());
  widths.push_back(data.train.classes);
  std::vector<double> costs;
  for (size_t k = 0; k + 1 < widths.size(); ++k)
    costs.push_back(static_cast<double>(widths[k] * widths[k + 1]) * (k == 0 ? 2.0 : 3.0));
  const std::vector<size_t> starts = parallel::partitionLayers(costs, stages);
  const size_t firstLinear = starts[topology.stage];
  const size_t endLinear = topology.stage + 1 < stages ? starts[topology.stage + 1] : costs.size();
  if (isLeader && stages > 1) {
    std::ostringstream partition;
    for (int stage = 0; stage < stages; ++stage) {
      const size_t first = starts[stage], end = stage + 1 < stages ? starts[stage + 1] : costs.size();
      double multiplyAdds = 0;  // forward + backward, per sample
      int64_t parameters = 0;
      for (size_t k = first; k < end; ++k) {
        multiplyAdds += costs[k];
        parameters += widths[k] * widths[k + 1] + widths[k + 1];
      }
      partition << "\n  stage " << stage << ": linear layers " << first << "-" << end - 1 << ", " << parameters
                << " parameters, " << 2 * multiplyAdds / 1e6 << " MFLOP per sample (forward + backward, estimated)";
    }
    log::info() << "pipeline of " << stages << " stages x " << topology.replicas << " replicas, " << microBatches
                << " microbatches, " << spec.parallelism.schedule << "; partition by estimated FLOPs:" << partition.str();
  }

  // Without a pipeline, two trailing gradient slots ride with the first all-reduce bucket: the local
  // loss sum and this rank's stop vote (so every rank stops after the same step when any one was asked).
  // With a pipeline, the last stages hold the loss, so both travel in one small world all-reduce.
  const bool metricsInGradients = stages == 1;
  auto network = model::buildMlpSlice(data.train.features, hidden, data.train.classes, activationOf(spec), firstLinear,
                                      endLinear, metricsInGradients ? 2 : 0);
  network->initialize(static_cast<uint64_t>(spec.training.seed), 2 * firstLinear);
  if (topology.dataParallel != nullptr)  // identical by seed already; the broadcast makes it a guarantee
    TANDEM_RETURN_IF_ERROR(topology.dataParallel->broadcast(network->parameters(), network->parameterCount() * 4, 0)
                               .withContext("sharing initial parameters"));
  if (isLeader) log::info() << "model mlp" << (stages > 1 ? " (stage 0)" : "") << ":\n" << network->describe();

  optim::OptimizerOptions optimizerOptions;
  optimizerOptions.kind = spec.optimizer.kind;
  optimizerOptions.weightDecay = spec.optimizer.weightDecay;
  optimizerOptions.beta1 = spec.optimizer.beta1;
  optimizerOptions.beta2 = spec.optimizer.beta2;
  optimizerOptions.eps = spec.optimizer.eps;
  optimizerOptions.momentum = spec.optimizer.momentum;
  optimizerOptions.nesterov = spec.optimizer.nesterov;
  optim::Optimizer optimizer(optimizerOptions, network->parameterCount());

  std::string modelDescription = describeModel(spec, data.train);
  if (stages > 1) modelDescription += ", stage " + std::to_string(topology.stage) + " of " + std::to_string(stages);
  const std::string trainingConfig = manifest::canonicalTrainingConfig(spec);
  const bool checkpointing = !spec.checkpoint.dir.empty();
  int64_t firstStep = 0;
  if (checkpointing) {
    TANDEM_ASSIGN_OR_RETURN(firstStep, restoreFromCheckpoint(options, topology, modelDescription, trainingConfig, *network,
                                                             optimizer));
    if (firstStep > 0 && isLeader && options.onResume) options.onResume(firstStep);
  }

  data::ShardedBatches batches(data.train.count, globalBatch, static_cast<uint64_t>(spec.training.seed), topology.replica,
                               topology.replicas);
  const int64_t microBatchSize = batches.localBatch() / microBatches;
  const int64_t totalSteps = plannedSteps(spec, data.train.count, options.maxSteps);
  optim::ScheduleOptions schedule{spec.optimizer.schedule, spec.optimizer.lr, spec.optimizer.warmupSteps, totalSteps};
  parallel::BucketedAllReduce allReduce(*network, topology.dataParallel, options.bucketCapFloats);
  if (isLeader && topology.dataParallel != nullptr) log::info() << allReduce.describe();
  const std::vector<parallel::PipelineOp> operations =
      parallel::pipelineSchedule(spec.parallelism.schedule, stages, topology.stage, microBatches);
  if (stages > 1 && topology.replica == 0)
    log::info() << "stage " << topology.stage << " schedule: " << parallel::describeSchedule(operations);

  std::unique_ptr<std::ofstream> lossLog;
  if (isLeader && !options.lossLogPath.empty()) {
    if (firstStep > 0) TANDEM_RETURN_IF_ERROR(truncateLossLog(options.lossLogPath, firstStep));
    lossLog = std::make_unique<std::ofstream>(options.lossLogPath, firstStep > 0 ? std::ios::app : std::ios::trunc);
    if (!*lossLog) return TANDEM_ERROR(StatusCode::kInvalidArgument, options.lossLogPath + ": cannot write the loss log");
  }

  TrainingSummary summary;
  summary.stage = topology.stage;
  summary.resumedFromStep = firstStep;
  summary.steps = firstStep;
  // Failures are logged; training goes on and the earlier checkpoints stay.
  std::atomic<int64_t> lastDurableStep{firstStep};
  std::atomic<double> lastWriteSeconds{0.0};
  std::atomic<int64_t> checkpointsWritten{0};
  std::unique_ptr<checkpoint::AsyncCheckpointer> checkpointer;
  if (checkpointing && topology.writesCheckpoints()) {
    checkpointer = std::make_unique<checkpoint::AsyncCheckpointer>(
        checkpoint::CheckpointStore(checkpointRoot(spec, topology), spec.checkpoint.keep),
        [&](const checkpoint::AsyncCheckpointer::Result& result) {
          if (result.status.ok()) {
            lastDurableStep = result.step;
            lastWriteSeconds = result.seconds;
            ++checkpointsWritten;
            if (options.metrics != nullptr) options.metrics->observeCheckpoint(result.seconds, result.bytes);
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
    state.stage = topology.stage;
    state.job = spec.jobKey();
    state.modelDescription = modelDescription;
    state.trainingConfig = trainingConfig;
    state.seed = static_cast<uint64_t>(spec.training.seed);
    state.parameters.assign(network->parameters(), network->parameters() + network->parameterCount());
    state.optimizerState.assign(optimizer.state(), optimizer.state() + optimizer.stateSize());
    checkpointer->submit(std::move(state));
  };

  // Per-microbatch state: inputs (data or the previous stage's activations), activations kept for
  // backward, dL/doutput (from the loss or the next stage), dL/dinput (sent back).
  std::vector<Tensor> inputs(microBatches), gradOutputs(microBatches), gradInputs(microBatches);
  std::vector<model::Activations> activations(microBatches);
  std::vector<std::vector<int32_t>> labels(microBatches);
  std::vector<int64_t> microIndices;
  std::vector<std::shared_ptr<comm::Work>> sends;
  const int64_t inFeatures = network->layer(0).inputFeatures();
  const int64_t outFeatures = network->layer(network->layerCount() - 1).outputFeatures();
  const std::function<void(int64_t)> onGradientsReady = [&](int64_t offset) { allReduce.onGradientsReady(offset); };
  const std::function<void(int64_t)> noHook;
  // Several microbatches: their gradients are summed on the accumulator's thread.
  std::optional<parallel::GradientAccumulator> accumulator;
  if (microBatches > 1) accumulator.emplace(network->gradientBufferSize());
  double evalSeconds = 0.0;
  std::optional<Clock::time_point> stopDeadline;
  const auto loopStart = Clock::now();
  // TANDEM_LOG_LEVEL=debug: every pipeline step's timeline, to see which neighbour a stage waits on.
  std::optional<StageTimeline> timeline;
  if (stages > 1 && log::enabled(log::Level::kDebug)) timeline.emplace();
  // Blocks on a neighbour; the time counts as pipeline idle.
  auto waitIdle = [&](const std::shared_ptr<comm::Work>& work) {
    const auto start = Clock::now();
    Status status = work->wait();
    summary.idleSeconds += secondsSince(start);
    return status;
  };

  for (int64_t step = firstStep; step < totalSteps; ++step) {
    const bool stopVote = options.stopRequested != nullptr && options.stopRequested->load();
    if (stopVote && !stopDeadline)
      stopDeadline = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(options.graceSeconds * 1000));
    log::setStep(step + 1);
    const auto stepStart = Clock::now();
    const double exposedBefore = allReduce.exposedSeconds();
    const int64_t bytesBefore = allReduce.bytesReduced();
    const std::vector<int64_t>& shard = batches.shard(step);
    // No zeroing: backward overwrites the gradients (last step's, which the optimizer has used).
    double lossSum = 0.0;
    // Without a pipeline the loss sum and the stop vote ride in the gradients' trailing slots.
    auto setTrailingSlots = [&] {
      if (!metricsInGradients) return;
      network->trailingGradientSlots()[0] = static_cast<float>(lossSum);
      network->trailingGradientSlots()[1] = stopVote ? 1.0f : 0.0f;
    };
    int live = 0;
    int64_t liveBytes = 0;
    // Post every receive of the step up front: Gloo moves a message once its receive is posted, so a
    // neighbour's activations and gradients arrive while this stage computes instead of on demand.
    std::vector<std::shared_ptr<comm::Work>> activationRecvs(microBatches), gradientRecvs(microBatches);
    for (int m = 0; m < microBatches && stages > 1; ++m) {
      if (!topology.firstStage()) {
        inputs[m].reshape({microBatchSize, inFeatures});
        activationRecvs[m] = topology.pipeline->recvAsync(inputs[m].data(), inputs[m].size() * 4, topology.stage - 1,
                                                          activationTag(m));
      }
      if (!topology.lastStage()) {
        gradOutputs[m].reshape({microBatchSize, outFeatures});
        gradientRecvs[m] = topology.pipeline->recvAsync(gradOutputs[m].data(), gradOutputs[m].size() * 4,
                                                        topology.stage + 1, gradientTag(m));
      }
    }
    if (timeline) timeline->begin(stepStart);
    for (size_t o = 0; o < operations.size(); ++o) {
      const parallel::PipelineOp op = operations[o];
      const int m = op.microBatch;
      const auto opStart = Clock::now();
      if (op.kind == parallel::PipelineOpKind::kForward) {
        // Labels are needed by the last stage, inputs by the first; gather fills both.
        microIndices.assign(shard.begin() + m * microBatchSize, shard.begin() + (m + 1) * microBatchSize);
        if (topology.firstStage())
          data.train.gather(microIndices, inputs[m], labels[m]);
        else if (topology.lastStage())
          data.train.gatherLabels(microIndices, labels[m]);
        if (!topology.firstStage()) TANDEM_RETURN_IF_ERROR(waitIdle(activationRecvs[m]));
        const auto start = Clock::now();
        const Tensor& output = network->forward(inputs[m], activations[m]);
        ++live;
        liveBytes += activations[m].bytes();
        summary.peakMicroBatchesInFlight = std::max(summary.peakMicroBatchesInFlight, live);
        summary.peakActivationBytes = std::max(summary.peakActivationBytes, liveBytes);
        if (topology.lastStage()) {
          gradOutputs[m].reshape(output.shape());
          lossSum += kernels::softmax_cross_entropy(output.rows(), output.cols(), output.data(), labels[m].data(),
                                                    1.0f / static_cast<float>(globalBatch), gradOutputs[m].data(), nullptr);
          summary.forwardSeconds += secondsSince(start);
        } else {
          summary.forwardSeconds += secondsSince(start);
          sends.push_back(topology.pipeline->sendAsync(output.data(), output.size() * 4, topology.stage + 1, activationTag(m)));
        }
        if (timeline) timeline->record(op, opStart, start);
        continue;
      }
      if (!topology.lastStage()) TANDEM_RETURN_IF_ERROR(waitIdle(gradientRecvs[m]));
      const auto start = Clock::now();
      // dL/dinput goes to the previous stage as soon as backward has it, before this stage's own
      // gradient bookkeeping: that stage is waiting for it.
      auto sendGradInput = [&] {
        if (!topology.firstStage())
          sends.push_back(topology.pipeline->sendAsync(gradInputs[m].data(), gradInputs[m].size() * 4,
                                                       topology.stage - 1, gradientTag(m)));
      };
      if (microBatches == 1) {
        setTrailingSlots();
        // One microbatch: its backward finalises the gradients and launches the buckets as it goes.
        network->backward(activations[m], gradOutputs[m], onGradientsReady,
                          topology.firstStage() ? nullptr : &gradInputs[m]);
        sendGradInput();
      } else {
        network->backward(activations[m], gradOutputs[m], noHook, topology.firstStage() ? nullptr : &gradInputs[m]);
        sendGradInput();
        // This microbatch's gradients go to the accumulator's thread; the next backward gets a spare buffer.
        FloatBuffer filled = accumulator->spareBuffer();
        TANDEM_RETURN_IF_ERROR(network->exchangeGradients(filled));
        accumulator->add(std::move(filled));
      }
      summary.backwardSeconds += secondsSince(start);
      --live;
      liveBytes -= activations[m].bytes();
      if (timeline) timeline->record(op, opStart, start);
    }
    for (auto& send : sends) TANDEM_RETURN_IF_ERROR(waitIdle(send));
    sends.clear();
    if (timeline) log::debug() << "stage " << topology.stage << " timeline " << timeline->finish();
    float metrics[2] = {static_cast<float>(lossSum), stopVote ? 1.0f : 0.0f};
    if (!metricsInGradients && topology.world != nullptr) {
      // The pipeline's flush: when this all-reduce returns, every stage has run all its microbatches. A
      // stage's wait here for the slower ones is bubble, as in the theory's (P-1)/(M+P-1).
      const auto flushStart = Clock::now();
      TANDEM_RETURN_IF_ERROR(topology.world->allReduce(metrics, 2).withContext("step " + std::to_string(step + 1)));
      summary.idleSeconds += secondsSince(flushStart);  // !metricsInGradients: a pipeline
    }
    if (microBatches > 1) {
      // Outside the pipeline's timing, like the optimizer step: the flush is over.
      FloatBuffer total = accumulator->finish();
      TANDEM_RETURN_IF_ERROR(network->exchangeGradients(total));
      accumulator->recycle(std::move(total));
      setTrailingSlots();
      onGradientsReady(0);
    }
    TANDEM_RETURN_IF_ERROR(allReduce.finish().withContext("step " + std::to_string(step + 1)));
    if (metricsInGradients) {
      metrics[0] = network->trailingGradientSlots()[0];
      metrics[1] = network->trailingGradientSlots()[1];
    }
    const double loss = metrics[0] / static_cast<double>(globalBatch);
    const double lr = optim::learningRate(schedule, step);
    optimizer.step(network->parameters(), network->gradients(), lr);
    summary.finalLoss = loss;
    summary.steps = step + 1;
    if (options.metrics != nullptr) {
      // Samples are counted once per replica, by its first stage, so a sum over ranks is the job's.
      options.metrics->observeStep(secondsSince(stepStart), topology.firstStage() ? batches.localBatch() : 0, 0);
      options.metrics->setLoss(loss);
      options.metrics->setLearningRate(lr);
      options.metrics->observeAllReduce(allReduce.exposedSeconds() - exposedBefore, allReduce.bytesReduced() - bytesBefore);
      const double busy = summary.forwardSeconds + summary.backwardSeconds;
      options.metrics->setPipelineBubbleRatio(summary.idleSeconds / std::max(summary.idleSeconds + busy, 1e-12));
    }

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
    // Every rank saw the same votes (they were summed): stop together, here.
    if (metrics[1] > 0.0f) {
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
      TANDEM_ASSIGN_OR_RETURN(EvalResult eval, evaluate(*network, data.test, topology));
      eval.step = step + 1;
      if (options.metrics != nullptr) options.metrics->setEvalAccuracy(eval.accuracy);
      if (isLeader && options.onEval) options.onEval(eval);
      evalSeconds += secondsSince(evalStart);
    }
  }
  summary.trainSeconds = secondsSince(loopStart) - evalSeconds;
  summary.samplesPerSecond =
      static_cast<double>((summary.steps - firstStep) * globalBatch) / std::max(summary.trainSeconds, 1e-9);
  summary.exposedAllReduceSeconds = allReduce.exposedSeconds();
  summary.allReduceBytes = allReduce.bytesReduced();
  const double busy = summary.forwardSeconds + summary.backwardSeconds;
  summary.bubbleRatio = summary.idleSeconds / std::max(summary.idleSeconds + busy, 1e-12);
  if (stages > 1 && topology.replica == 0)
    log::info() << "stage " << topology.stage << ": forward " << summary.forwardSeconds << " s, backward "
                << summary.backwardSeconds << " s, idle " << summary.idleSeconds << " s, bubble ratio "
                << summary.bubbleRatio << ", peak activations " << summary.peakMicroBatchesInFlight << " microbatches ("
                << summary.peakActivationBytes << " bytes)";
  // The finished model is a checkpoint too: a restart after the end resumes at the end.
  if (checkpointer) {
    if (lastSubmittedStep != summary.steps) snapshot(summary.steps);
    checkpointer->drain();
  }
  summary.checkpointsWritten = checkpointsWritten;

  TANDEM_ASSIGN_OR_RETURN(summary.finalEval, evaluate(*network, data.test, topology));
  summary.finalEval.step = summary.steps;
  if (options.metrics != nullptr) options.metrics->setEvalAccuracy(summary.finalEval.accuracy);
  if (isLeader && options.onEval) options.onEval(summary.finalEval);
  if (!options.dumpParametersPath.empty())
    TANDEM_RETURN_IF_ERROR(dumpParameters(options.dumpParametersPath, topology, *network));
  return summary;
}

}  // namespace tandem::engine
