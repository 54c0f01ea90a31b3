#include "tandem/engine/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
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

// This process's peak resident memory so far (VmHWM), in bytes; 0 where /proc does not tell.
int64_t peakResidentBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtoll(line.c_str() + 6, nullptr, 10) * 1024;  // "VmHWM: N kB"
  return 0;
}

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
  // Saturating: a huge `epochs` with maxSteps as the real bound ("train until maxSteps") must not wrap.
  int64_t steps = 0;
  if (__builtin_mul_overflow(spec.training.epochs, trainSamples / spec.training.globalBatchSize, &steps))
    steps = std::numeric_limits<int64_t>::max();
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

// The mlp's linear layers in contiguous stages, balanced by estimated compute: per sample, a linear
// layer's forward, weight-gradient and input-gradient GEMMs each cost its multiply-adds, and the first
// layer skips the input gradient.
struct MlpPartition {
  std::vector<int64_t> widths;  // features: input, hidden..., classes
  std::vector<double> costs;    // per linear layer: multiply-adds per sample, forward + backward
  std::vector<size_t> starts;   // per stage: its first linear layer
  size_t first(int stage) const { return starts[stage]; }
  size_t end(int stage) const { return static_cast<size_t>(stage) + 1 < starts.size() ? starts[stage + 1] : costs.size(); }
  int stages() const { return static_cast<int>(starts.size()); }
  int64_t parameters(int stage) const {
    int64_t count = 0;
    for (size_t k = first(stage); k < end(stage); ++k) count += widths[k] * widths[k + 1] + widths[k + 1];
    return count;
  }
  // A line per stage: layers, parameters, estimated FLOPs.
  std::string describe() const {
    std::ostringstream text;
    for (int stage = 0; stage < stages(); ++stage) {
      double multiplyAdds = 0;
      for (size_t k = first(stage); k < end(stage); ++k) multiplyAdds += costs[k];
      text << "\n  stage " << stage << ": linear layers " << first(stage) << "-" << end(stage) - 1 << ", "
           << parameters(stage) << " parameters, " << 2 * multiplyAdds / 1e6
           << " MFLOP per sample (forward + backward, estimated)";
    }
    return text.str();
  }
};

MlpPartition partitionMlp(const manifest::JobSpec& spec, const data::Dataset& train, int stages) {
  MlpPartition partition;
  partition.widths.push_back(train.features);
  partition.widths.insert(partition.widths.end(), spec.model.mlp.hidden.begin(), spec.model.mlp.hidden.end());
  partition.widths.push_back(train.classes);
  for (size_t k = 0; k + 1 < partition.widths.size(); ++k)
    partition.costs.push_back(static_cast<double>(partition.widths[k] * partition.widths[k + 1]) * (k == 0 ? 2.0 : 3.0));
  partition.starts = parallel::partitionLayers(partition.costs, stages);
  return partition;
}

optim::OptimizerOptions optimizerOptionsOf(const manifest::JobSpec& spec) {
  optim::OptimizerOptions options;
  options.kind = spec.optimizer.kind;
  options.weightDecay = spec.optimizer.weightDecay;
  options.beta1 = spec.optimizer.beta1;
  options.beta2 = spec.optimizer.beta2;
  options.eps = spec.optimizer.eps;
  options.momentum = spec.optimizer.momentum;
  options.nesterov = spec.optimizer.nesterov;
  return options;
}

// One training step of this rank: its forwards and backwards in the schedule's order, the microbatches'
// inputs, activations and gradients, the neighbours' messages and the microbatch gradient sums. Times
// go to the summary: compute as forward/backward, waits on a neighbour as idle.
//
// Buffers are slots reused from one microbatch to the next, so that a stage holds what its schedule
// keeps in flight and no more: the activations of at most `activationSlots_` microbatches (the schedule's
// peak, M under GPipe, min(P - stage, M) under 1F1B), microbatch m in slot m mod activationSlots_. Both
// schedules run forwards and backwards in microbatch order, so m's slot was freed by m - slots's backward.
// Received inputs and gradients have one slot more: the receive for a later microbatch is posted as soon
// as a backward frees its slot, a whole op before that microbatch needs it, so messages still arrive
// while the stage computes.
class StageStep {
 public:
  StageStep(model::Sequential& network, const Topology& topology, const data::Dataset& train,
            std::vector<parallel::PipelineOp> operations, int64_t microBatchSize, int64_t globalBatch,
            parallel::BucketedAllReduce& allReduce, TrainingSummary& summary,
            parallel::GradientAccumulator::Summing gradientSums)
      : network_(network), topology_(topology), train_(train), operations_(std::move(operations)),
        microBatches_(topology.microBatches), microBatchSize_(microBatchSize), globalBatch_(globalBatch),
        allReduce_(allReduce), summary_(summary),
        activationSlots_(parallel::peakMicroBatchesInFlight(operations_)),
        receiveSlots_(std::min(microBatches_, activationSlots_ + 1)), inputs_(receiveSlots_),
        gradOutputs_(receiveSlots_), gradInputs_(activationSlots_), activations_(activationSlots_),
        labels_(activationSlots_), activationSlotHolder_(activationSlots_, -1), activationRecvs_(microBatches_),
        gradientRecvs_(microBatches_), outputSends_(activationSlots_), gradInputSends_(activationSlots_) {
    // Several microbatches: their gradients are summed on the accumulator's thread (or inline).
    if (microBatches_ > 1) accumulator_.emplace(network.gradientBufferSize(), gradientSums);
    // TANDEM_LOG_LEVEL=debug: every pipeline step's timeline, to see which neighbour a stage waits on.
    if (topology.stages > 1 && log::enabled(log::Level::kDebug)) timeline_.emplace();
  }

  // The step's forwards and backwards over `shard` (this replica's sample indices), until every send is
  // done. Returns this rank's loss sum (non-zero on last stages only). Without a pipeline the loss sum and
  // the stop vote ride in the gradients' trailing slots; with one microbatch its backward launches the
  // data-parallel buckets as it goes.
  StatusOr<double> run(const std::vector<int64_t>& shard, bool stopVote, Clock::time_point stepStart) {
    // No zeroing: backward overwrites the gradients (last step's, which the optimizer has used).
    lossSum_ = 0.0;
    stopVote_ = stopVote;
    live_ = 0;
    for (int m = 0; m < receiveSlots_; ++m) postReceives(m);
    if (timeline_) timeline_->begin(stepStart);
    for (const parallel::PipelineOp& op : operations_) {
      const auto opStart = Clock::now();
      TANDEM_ASSIGN_OR_RETURN(Clock::time_point computeStart, op.kind == parallel::PipelineOpKind::kForward
                                                                  ? forward(op.microBatch, shard)
                                                                  : backward(op.microBatch));
      if (timeline_) timeline_->record(op, opStart, computeStart);
    }
    for (auto* sends : {&outputSends_, &gradInputSends_})
      for (auto& send : *sends) TANDEM_RETURN_IF_ERROR(waitForSend(send));
    if (timeline_) log::debug() << "stage " << topology_.stage << " timeline " << timeline_->finish();
    return lossSum_;
  }

  // After the pipeline's flush: the microbatches' gradient sum goes into the model and to the
  // data-parallel all-reduce (a single microbatch's backward launched it already).
  Status finishGradients() {
    if (!accumulator_) return Status::Ok();
    FloatBuffer total = accumulator_->finish();
    TANDEM_RETURN_IF_ERROR(network_.exchangeGradients(total));
    accumulator_->recycle(std::move(total));
    setTrailingSlots();
    allReduce_.onGradientsReady(0);
    return Status::Ok();
  }

 private:
  // Posts microbatch m's receives (none without a pipeline) into its slots: Gloo moves a message once its
  // receive is posted, so a neighbour's activations and gradients arrive while this stage computes
  // instead of on demand.
  void postReceives(int m) {
    if (topology_.stages == 1) return;
    const int slot = m % receiveSlots_;
    if (!topology_.firstStage()) {
      inputs_[slot].reshape({microBatchSize_, network_.layer(0).inputFeatures()});
      activationRecvs_[m] = topology_.pipeline->recvAsync(inputs_[slot].data(), inputs_[slot].size() * 4,
                                                          topology_.stage - 1, activationTag(m));
    }
    if (!topology_.lastStage()) {
      gradOutputs_[slot].reshape({microBatchSize_, network_.layer(network_.layerCount() - 1).outputFeatures()});
      gradientRecvs_[m] = topology_.pipeline->recvAsync(gradOutputs_[slot].data(), gradOutputs_[slot].size() * 4,
                                                        topology_.stage + 1, gradientTag(m));
    }
  }

  // Returns when its compute started (after any wait on the previous stage).
  StatusOr<Clock::time_point> forward(int m, const std::vector<int64_t>& shard) {
    const int slot = m % activationSlots_, received = m % receiveSlots_;
    if (activationSlotHolder_[slot] >= 0)
      return TANDEM_ERROR(StatusCode::kInternal, "pipeline schedule: microbatch " + std::to_string(m) +
                                                     " goes forward while microbatch " +
                                                     std::to_string(activationSlotHolder_[slot]) + " holds its slot");
    if (!topology_.firstStage()) TANDEM_RETURN_IF_ERROR(waitIdle(activationRecvs_[m]));
    // The slot's previous output may still be on its way to the next stage (in practice it has arrived:
    // that stage has sent back its gradient).
    TANDEM_RETURN_IF_ERROR(waitForSend(outputSends_[slot]));
    const auto start = Clock::now();
    // Loading the microbatch is the stage's work, timed with its forward: labels for the last stage,
    // inputs for the first (gather fills both).
    microIndices_.assign(shard.begin() + m * microBatchSize_, shard.begin() + (m + 1) * microBatchSize_);
    if (topology_.firstStage())
      train_.gather(microIndices_, inputs_[received], labels_[slot]);
    else if (topology_.lastStage())
      train_.gatherLabels(microIndices_, labels_[slot]);
    const Tensor& output = network_.forward(inputs_[received], activations_[slot]);
    activationSlotHolder_[slot] = m;
    ++live_;
    summary_.peakMicroBatchesInFlight = std::max(summary_.peakMicroBatchesInFlight, live_);
    summary_.peakActivationBytes = std::max(summary_.peakActivationBytes, heldActivationBytes());
    if (topology_.lastStage()) {
      gradOutputs_[received].reshape(output.shape());
      lossSum_ += kernels::softmax_cross_entropy(output.rows(), output.cols(), output.data(), labels_[slot].data(),
                                                 1.0f / static_cast<float>(globalBatch_),
                                                 gradOutputs_[received].data(), nullptr);
    }
    summary_.forwardSeconds += secondsSince(start);
    if (!topology_.lastStage())
      outputSends_[slot] =
          topology_.pipeline->sendAsync(output.data(), output.size() * 4, topology_.stage + 1, activationTag(m));
    return start;
  }

  StatusOr<Clock::time_point> backward(int m) {
    const int slot = m % activationSlots_, received = m % receiveSlots_;
    if (activationSlotHolder_[slot] != m)
      return TANDEM_ERROR(StatusCode::kInternal,
                          "pipeline schedule: microbatch " + std::to_string(m) + " goes backward before its forward");
    if (!topology_.lastStage()) TANDEM_RETURN_IF_ERROR(waitIdle(gradientRecvs_[m]));
    TANDEM_RETURN_IF_ERROR(waitForSend(gradInputSends_[slot]));
    const auto start = Clock::now();
    Tensor* gradInput = topology_.firstStage() ? nullptr : &gradInputs_[slot];
    if (microBatches_ == 1) {
      setTrailingSlots();
      // One microbatch: its backward finalises the gradients and launches the buckets as it goes.
      network_.backward(activations_[slot], gradOutputs_[received],
                        [this](int64_t offset) { allReduce_.onGradientsReady(offset); }, gradInput);
      sendGradInput(m);
    } else {
      network_.backward(activations_[slot], gradOutputs_[received], {}, gradInput);
      sendGradInput(m);
      // The microbatch's input and output gradient are spent: their slot takes a later microbatch's.
      if (m + receiveSlots_ < microBatches_) postReceives(m + receiveSlots_);
      // This microbatch's gradients go to the accumulator's thread; the next backward gets a spare buffer.
      FloatBuffer filled = accumulator_->spareBuffer();
      TANDEM_RETURN_IF_ERROR(network_.exchangeGradients(filled));
      accumulator_->add(std::move(filled));
    }
    summary_.backwardSeconds += secondsSince(start);
    activationSlotHolder_[slot] = -1;
    --live_;
    return start;
  }

  // dL/dinput goes to the previous stage as soon as backward has it, before this stage's own gradient
  // bookkeeping: that stage is waiting for it.
  void sendGradInput(int m) {
    if (topology_.firstStage()) return;
    Tensor& gradInput = gradInputs_[m % activationSlots_];
    gradInputSends_[m % activationSlots_] = topology_.pipeline->sendAsync(gradInput.data(), gradInput.size() * 4,
                                                                        topology_.stage - 1, gradientTag(m));
  }

  // The activations this stage holds for backward: every slot's, used or not, i.e. its real footprint.
  int64_t heldActivationBytes() const {
    int64_t bytes = 0;
    for (const model::Activations& slot : activations_) bytes += slot.bytes();
    return bytes;
  }

  void setTrailingSlots() {
    if (network_.trailingGradientSlotCount() < 2) return;  // a pipeline: the metrics travel on their own
    network_.trailingGradientSlots()[0] = static_cast<float>(lossSum_);
    network_.trailingGradientSlots()[1] = stopVote_ ? 1.0f : 0.0f;
  }

  // Blocks on a neighbour; the time counts as pipeline idle.
  Status waitIdle(const std::shared_ptr<comm::Work>& work) {
    const auto start = Clock::now();
    Status status = work->wait();
    summary_.idleSeconds += secondsSince(start);
    return status;
  }

  // Waits for a slot's earlier send, if any, before the slot is written again.
  Status waitForSend(std::shared_ptr<comm::Work>& send) {
    if (send == nullptr) return Status::Ok();
    Status status = waitIdle(send);
    send.reset();
    return status;
  }

  model::Sequential& network_;
  const Topology& topology_;
  const data::Dataset& train_;
  const std::vector<parallel::PipelineOp> operations_;
  const int microBatches_;
  const int64_t microBatchSize_, globalBatch_;
  parallel::BucketedAllReduce& allReduce_;
  TrainingSummary& summary_;
  const int activationSlots_, receiveSlots_;
  // Per receive slot: inputs (data or the previous stage's activations, kept for backward), dL/doutput
  // (from the loss or the next stage). Per activation slot: dL/dinput (sent back), the activations kept
  // for backward, labels, and which microbatch holds the slot (-1: none).
  std::vector<Tensor> inputs_, gradOutputs_, gradInputs_;
  std::vector<model::Activations> activations_;
  std::vector<std::vector<int32_t>> labels_;
  std::vector<int> activationSlotHolder_;
  // Receives per microbatch; sends per activation slot (a slot is not written again before its send is done).
  std::vector<std::shared_ptr<comm::Work>> activationRecvs_, gradientRecvs_, outputSends_, gradInputSends_;
  std::vector<int64_t> microIndices_;
  std::optional<parallel::GradientAccumulator> accumulator_;
  std::optional<StageTimeline> timeline_;
  double lossSum_ = 0.0;
  bool stopVote_ = false;
  int live_ = 0;  // microbatches whose activations are held
};

// Where a stage keeps its checkpoints: <dir>/<job name> without pipelines, <dir>/<job name>/stage-<s>
// with them (each stage's shards are verified and published on their own; the stages then agree on
// the newest step that every one of them holds).
std::string checkpointRoot(const manifest::JobSpec& spec, const Topology& topology) {
  std::string root = spec.checkpoint.dir + "/" + spec.name;
  if (topology.stages > 1) root += "/stage-" + std::to_string(topology.stage);
  return root;
}

// How many checkpoints a stage keeps. With a pipeline each stage prunes its own directory: a write that
// lands on some stages only (a full disk, no time left after a stop) must not leave the stages without a
// step in common, so each keeps at least two even when spec.checkpoint.keep is 1.
int64_t checkpointsKept(const manifest::JobSpec& spec, const Topology& topology) {
  return topology.stages > 1 ? std::max<int64_t>(spec.checkpoint.keep, 2) : spec.checkpoint.keep;
}

checkpoint::CheckpointStore checkpointStore(const manifest::JobSpec& spec, const Topology& topology) {
  return checkpoint::CheckpointStore(checkpointRoot(spec, topology), checkpointsKept(spec, topology));
}

// Checkpoints of this job written with another number of pipeline stages. Each stage's shard holds its
// own layers, so they cannot be resumed from; and since every layout looks only in its own directories
// (<job>/step-* without stages, <job>/stage-<s>/step-* with them), ignoring them would silently start
// the job over. Returns why, naming the directory, or "" when there are none.
std::string checkpointsOfAnotherLayout(const manifest::JobSpec& spec, const Topology& topology,
                                       const checkpoint::CheckpointStore& store) {
  const std::string jobRoot = spec.checkpoint.dir + "/" + spec.name;
  const std::string now = ", but spec.parallelism.pipelineStages is " + std::to_string(topology.stages) +
                          ": a job cannot resume with another number of stages (set it back, or use another "
                          "spec.checkpoint.dir or job name to start over)";
  if (topology.stages > 1) {
    const std::vector<int64_t> unstaged = checkpoint::CheckpointStore(jobRoot, 1).listSteps();
    if (!unstaged.empty())
      return jobRoot + "/" + checkpoint::stepDirectoryName(unstaged.front()) + " was written without pipeline stages" +
             now;
  }
  std::set<int> otherStages;  // stage-<k> directories this layout does not have, lowest first
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(jobRoot, error)) {
    int stage = -1;
    char tail = 0;
    if (entry.is_directory() && std::sscanf(entry.path().filename().c_str(), "stage-%d%c", &stage, &tail) == 1 &&
        stage >= (topology.stages > 1 ? topology.stages : 0))
      otherStages.insert(stage);
  }
  for (int stage : otherStages) {
    const checkpoint::CheckpointStore other(jobRoot + "/stage-" + std::to_string(stage), 1);
    const std::vector<int64_t> steps = other.listSteps();
    if (!steps.empty())
      return other.root() + "/" + checkpoint::stepDirectoryName(steps.front()) + " was written by pipeline stage " +
             std::to_string(stage) + " of a job with " + (topology.stages > 1 ? "more stages" : "pipeline stages") +
             now;
  }
  // Fewer stages before: this stage's directory holds shards of another split ("..., stage 0 of 2").
  const std::vector<int64_t> mine = store.listSteps();
  if (topology.stages > 1 && !mine.empty()) {
    StatusOr<std::string> description = store.readModelDescription(mine.front());
    const std::string ofStages = " of " + std::to_string(topology.stages);
    if (description.ok() && (description->size() < ofStages.size() ||
                             description->compare(description->size() - ofStages.size(), ofStages.size(), ofStages) != 0))
      return store.root() + "/" + checkpoint::stepDirectoryName(mine.front()) + " was written by a job with another " +
             "number of pipeline stages (model \"" + *description + "\")" + now;
  }
  return "";
}

// The newest checkpoint every pipeline stage holds. Each stage's writer prunes its own directory, and a
// stage whose writes fail (a full disk) keeps only older steps: pruning by `keep` alone could leave the
// stages no step in common, and a restart would begin again at step 0. So each writer reports the steps
// it made durable, one per training step, in that step's all-reduce (two floats per stage: the step's
// high and low 20 bits, exact in float); a step is common once every stage has reported it, and every
// writer's pruning spares the newest common step.
class CommonCheckpoint {
 public:
  static constexpr int kFloatsPerStage = 2;

  CommonCheckpoint(int stages, int64_t resumedStep) : stages_(stages), newest_(resumedStep) {}

  // The writer thread: a checkpoint made durable.
  void durable(int64_t step) {
    std::lock_guard<std::mutex> lock(mutex_);
    unreported_.push_back(step);
  }

  // Before the all-reduce: at most one unreported step into this stage's slots (zero elsewhere).
  void report(int stage, float* slots) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (unreported_.empty()) return;
    const int64_t step = unreported_.front();
    unreported_.erase(unreported_.begin());
    slots[stage * kFloatsPerStage] = static_cast<float>(step >> 20);
    slots[stage * kFloatsPerStage + 1] = static_cast<float>(step & ((int64_t{1} << 20) - 1));
  }

  // After the all-reduce: every stage's report (each slot summed from its one writer).
  void heard(const float* slots) {
    for (int stage = 0; stage < stages_; ++stage) {
      const int64_t step = (static_cast<int64_t>(slots[stage * kFloatsPerStage]) << 20) +
                           static_cast<int64_t>(slots[stage * kFloatsPerStage + 1]);
      if (step > 0 && ++reports_[step] == stages_) newest_ = std::max(newest_, step);
    }
    reports_.erase(reports_.begin(), reports_.upper_bound(newest_));
  }

  int64_t newest() const { return newest_; }

 private:
  const int stages_;
  int64_t newest_;                   // 0: none yet
  std::map<int64_t, int> reports_;   // steps newer than newest_: how many stages hold them
  std::mutex mutex_;
  std::vector<int64_t> unreported_;  // this writer's durable steps not yet reported
};

// This writer's shard of `step`, checked against this job: nullopt when it does not verify (logged:
// an older one may), an error when it belongs to another model or optimizer (no older one would do).
StatusOr<std::optional<checkpoint::CheckpointState>> readShard(const checkpoint::CheckpointStore& store, int64_t step,
                                                                int stage, const std::string& modelDescription,
                                                                model::Sequential& network, optim::Optimizer& optimizer) {
  TANDEM_ASSIGN_OR_RETURN(
      std::optional<checkpoint::CheckpointState> state,
      store.readMatching(step, stage, modelDescription, [](const std::string& why) { log::warning() << why; }));
  if (state && (state->parameters.size() != static_cast<size_t>(network.parameterCount()) ||
                state->optimizerState.size() != static_cast<size_t>(optimizer.stateSize())))
    return TANDEM_ERROR(StatusCode::kFailedPrecondition,
                        store.root() + "/" + checkpoint::stepDirectoryName(step) +
                            ": optimizer state of another size (was the optimizer kind changed?)");
  return state;
}

// The steps every stage's writer lists, newest first: rank 0 gathers the writers' lists over replica 0's
// pipeline (which holds exactly the writers) and sends back what they have in common.
StatusOr<std::vector<int64_t>> stepsAllStagesList(const Topology& topology, const std::vector<int64_t>& mine) {
  std::vector<int64_t> common = mine;
  int64_t count = static_cast<int64_t>(mine.size());
  if (topology.stage > 0) {
    TANDEM_RETURN_IF_ERROR(topology.pipeline->send(&count, sizeof(count), 0, 0));
    if (count > 0) TANDEM_RETURN_IF_ERROR(topology.pipeline->send(mine.data(), count * 8, 0, 1));
    TANDEM_RETURN_IF_ERROR(topology.pipeline->recv(&count, sizeof(count), 0, 2));
    common.resize(static_cast<size_t>(count));
    if (count > 0) TANDEM_RETURN_IF_ERROR(topology.pipeline->recv(common.data(), count * 8, 0, 3));
    return common;
  }
  for (int stage = 1; stage < topology.stages; ++stage) {
    TANDEM_RETURN_IF_ERROR(topology.pipeline->recv(&count, sizeof(count), stage, 0));
    std::vector<int64_t> theirs(static_cast<size_t>(count));
    if (count > 0) TANDEM_RETURN_IF_ERROR(topology.pipeline->recv(theirs.data(), count * 8, stage, 1));
    std::vector<int64_t> both;
    for (int64_t step : common)
      if (std::find(theirs.begin(), theirs.end(), step) != theirs.end()) both.push_back(step);
    common = std::move(both);
  }
  count = static_cast<int64_t>(common.size());
  for (int stage = 1; stage < topology.stages; ++stage) {
    TANDEM_RETURN_IF_ERROR(topology.pipeline->send(&count, sizeof(count), stage, 2));
    if (count > 0) TANDEM_RETURN_IF_ERROR(topology.pipeline->send(common.data(), count * 8, stage, 3));
  }
  return common;
}

// The newest checkpoint that verifies on every stage, read newest first: usually one read per writer,
// whatever spec.checkpoint.keep is, and one state in memory. The writers (replica 0 of each stage:
// ranks 0..stages-1) agree on it, rank 0 tells the world, and each writer hands its shard to its
// stage's replicas; the exchanges that wait on reads have `deadline` (resumeExchangeDeadline). Returns the step
// to resume after (0: fresh start).
StatusOr<int64_t> restoreFromCheckpoint(const TrainerOptions& options, const Topology& topology,
                                        const std::string& modelDescription, const std::string& trainingConfig,
                                        model::Sequential& network, optim::Optimizer& optimizer,
                                        std::chrono::milliseconds deadline) {
  const checkpoint::CheckpointStore store = checkpointStore(options.spec, topology);
  constexpr int64_t kRefused = -1;  // told to the other replicas instead of a step: none may resume
  int64_t chosen = 0;
  Status refusal;
  std::optional<checkpoint::CheckpointState> loaded;
  if (topology.writesCheckpoints()) {
    std::string otherLayout = checkpointsOfAnotherLayout(options.spec, topology, store);
    if (topology.stages > 1) {  // the writers refuse together: each alone sees its own directory
      float found = otherLayout.empty() ? 0.0f : 1.0f;
      TANDEM_RETURN_IF_ERROR(
          topology.pipeline->allReduce(&found, 1).withContext("checking the checkpoints' pipeline stages"));
      if (found > 0.0f && otherLayout.empty())
        otherLayout = "another stage found checkpoints written with another number of pipeline stages (its log says "
                      "where): refusing to resume";
    }
    if (!otherLayout.empty()) refusal = TANDEM_ERROR(StatusCode::kFailedPrecondition, otherLayout);
    const std::vector<int64_t> listed = otherLayout.empty() ? store.listSteps() : std::vector<int64_t>{};
    std::vector<int64_t> candidates = listed;
    if (topology.stages > 1 && otherLayout.empty()) {
      TANDEM_ASSIGN_OR_RETURN(candidates, stepsAllStagesList(topology, listed));
    }
    for (int64_t step : candidates) {
      auto shard = readShard(store, step, topology.stage, modelDescription, network, optimizer);
      if (topology.stages > 1) {
        // Every writer's verdict on this step: 0 verified, 1 unreadable here, 1000 another job's.
        float verdict = !shard.ok() ? 1000.0f : (*shard ? 0.0f : 1.0f);
        TANDEM_RETURN_IF_ERROR(
            topology.pipeline->allReduceWithin(&verdict, 1, deadline).withContext("agreeing on a checkpoint"));
        if (verdict >= 1000.0f) {
          refusal = !shard.ok() ? shard.status()
                                : TANDEM_ERROR(StatusCode::kFailedPrecondition,
                                               "another stage's shard of " + checkpoint::stepDirectoryName(step) +
                                                   " belongs to another model or optimizer (its log says which): "
                                                   "refusing to resume");
          break;
        }
        if (verdict > 0.0f) continue;  // some stage cannot read it: an older one
      } else if (!shard.ok()) {
        refusal = shard.status();
        break;
      } else if (!*shard) {
        continue;
      }
      loaded = std::move(*shard);
      chosen = step;
      break;
    }
    if (!refusal.ok()) chosen = kRefused;
    if (topology.stage == 0 && refusal.ok() && !listed.empty() && chosen != listed.front())
      log::warning() << "the newest checkpoint " << (topology.stages > 1 ? "every stage holds and can read" : "that verifies")
                     << " is " << (chosen > 0 ? checkpoint::stepDirectoryName(chosen) : std::string("none"));
  }
  // Also when refusing: the other replicas wait in this broadcast, and would otherwise time out.
  if (topology.world != nullptr)
    TANDEM_RETURN_IF_ERROR(
        topology.world->broadcastWithin(&chosen, sizeof(chosen), 0, deadline).withContext("sharing the checkpoint step"));
  if (chosen == kRefused)
    return !refusal.ok() ? refusal
                         : TANDEM_ERROR(StatusCode::kFailedPrecondition,
                                        "the checkpoint writers refused to resume (rank 0's log says why)");
  if (chosen == 0) return int64_t{0};

  int64_t optimizerSteps = 0;
  if (topology.writesCheckpoints()) {
    const checkpoint::CheckpointState& state = *loaded;
    if (state.trainingConfig != trainingConfig)
      log::warning() << "resuming " << checkpoint::stepDirectoryName(chosen)
                     << " with a changed training configuration (allowed: workers, learning rate, steps, ...): "
                     << manifest::describeConfigChanges(state.trainingConfig, trainingConfig);
    std::copy(state.parameters.begin(), state.parameters.end(), network.parameters());
    std::copy(state.optimizerState.begin(), state.optimizerState.end(), optimizer.state());
    optimizerSteps = state.optimizerSteps;
    log::info() << "resuming from " << store.root() << "/" << checkpoint::stepDirectoryName(chosen);
  }
  if (topology.dataParallel != nullptr) {
    comm::Communicator& group = *topology.dataParallel;
    TANDEM_RETURN_IF_ERROR(group.broadcastWithin(&optimizerSteps, sizeof(optimizerSteps), 0, deadline)
                               .withContext("receiving the checkpoint"));
    TANDEM_RETURN_IF_ERROR(group.broadcastWithin(network.parameters(), network.parameterCount() * 4, 0, deadline)
                               .withContext("receiving the checkpoint"));
    TANDEM_RETURN_IF_ERROR(group.broadcastWithin(optimizer.state(), optimizer.stateSize() * 4, 0, deadline)
                               .withContext("receiving the checkpoint"));
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

  const MlpPartition partition = partitionMlp(spec, data.train, stages);
  const size_t firstLinear = partition.first(topology.stage), endLinear = partition.end(topology.stage);
  if (isLeader && stages > 1)
    log::info() << "pipeline of " << stages << " stages x " << topology.replicas << " replicas, " << microBatches
                << " microbatches, " << spec.parallelism.schedule << "; partition by estimated FLOPs:"
                << partition.describe();

  // Without a pipeline, two trailing gradient slots ride with the first all-reduce bucket: the local
  // loss sum and this rank's stop vote (so every rank stops after the same step when any one was asked).
  // With a pipeline, the last stages hold the loss, so both travel in one small world all-reduce.
  const bool metricsInGradients = stages == 1;
  auto network = model::buildMlpSlice(data.train.features, spec.model.mlp.hidden, data.train.classes,
                                      activationOf(spec), firstLinear, endLinear, metricsInGradients ? 2 : 0);
  network->initialize(static_cast<uint64_t>(spec.training.seed), 2 * firstLinear);
  if (topology.dataParallel != nullptr)  // identical by seed already; the broadcast makes it a guarantee
    TANDEM_RETURN_IF_ERROR(topology.dataParallel->broadcast(network->parameters(), network->parameterCount() * 4, 0)
                               .withContext("sharing initial parameters"));
  if (isLeader) log::info() << "model mlp" << (stages > 1 ? " (stage 0)" : "") << ":\n" << network->describe();

  optim::Optimizer optimizer(optimizerOptionsOf(spec), network->parameterCount());

  std::string modelDescription = describeModel(spec, data.train);
  if (stages > 1) modelDescription += ", stage " + std::to_string(topology.stage) + " of " + std::to_string(stages);
  const std::string trainingConfig = manifest::canonicalTrainingConfig(spec);
  const bool checkpointing = !spec.checkpoint.dir.empty();
  int64_t firstStep = 0;
  if (checkpointing) {
    // Every stage's shard holds its parameters and the optimizer's state for them.
    const double floatsPerParameter =
        static_cast<double>(network->parameterCount() + optimizer.stateSize()) / std::max<int64_t>(1, network->parameterCount());
    int64_t largestStage = 0;
    for (int stage = 0; stage < stages; ++stage) largestStage = std::max(largestStage, partition.parameters(stage));
    const std::chrono::milliseconds deadline =
        options.communicator == nullptr
            ? std::chrono::milliseconds(0)
            : checkpoint::resumeExchangeDeadline(options.communicator->timeout(),
                                                 4.0 * floatsPerParameter * static_cast<double>(largestStage),
                                                 checkpointsKept(spec, topology));
    // Reported however the restore ends, an exception included.
    struct ResumeWait {
      const std::function<void(bool)>* report;
      explicit ResumeWait(const std::function<void(bool)>* r) : report(r) {
        if (report != nullptr) (*report)(true);
      }
      ~ResumeWait() {
        if (report != nullptr) (*report)(false);
      }
    } wait(options.communicator != nullptr && options.onResumeWait ? &options.onResumeWait : nullptr);
    TANDEM_ASSIGN_OR_RETURN(firstStep, restoreFromCheckpoint(options, topology, modelDescription, trainingConfig,
                                                             *network, optimizer, deadline));
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
  std::atomic<double> lastWriteSeconds{0.0};
  CommonCheckpoint commonCheckpoint(stages, firstStep);  // with pipeline stages: spared by every writer's pruning
  std::atomic<int64_t> checkpointsWritten{0};
  std::unique_ptr<checkpoint::AsyncCheckpointer> checkpointer;
  if (checkpointing && topology.writesCheckpoints()) {
    if (isLeader && checkpointsKept(spec, topology) != spec.checkpoint.keep)
      log::info() << "spec.checkpoint.keep " << spec.checkpoint.keep << ": each pipeline stage keeps "
                  << checkpointsKept(spec, topology) << ", so that the stages always hold a step in common";
    checkpointer = std::make_unique<checkpoint::AsyncCheckpointer>(
        checkpointStore(spec, topology),
        std::chrono::milliseconds(static_cast<int64_t>(std::min(options.checkpointTimeoutSeconds, 1e9) * 1000)),
        firstStep, [&](const checkpoint::AsyncCheckpointer::Result& result) {
          if (result.status.ok()) {
            lastWriteSeconds = result.seconds;
            commonCheckpoint.durable(result.step);
            ++checkpointsWritten;
            if (options.metrics != nullptr) options.metrics->observeCheckpoint(result.seconds, result.bytes);
            log::info() << "checkpoint " << checkpoint::stepDirectoryName(result.step) << " written: " << result.bytes
                        << " bytes in " << result.seconds << " s";
          } else {
            log::error() << result.status.message() << "; training continues, the last good checkpoint is "
                         << (result.lastDurableStep > 0 ? checkpoint::stepDirectoryName(result.lastDurableStep)
                                                        : std::string("none"));
          }
        });
  }
  // A failed worker is killed after its grace period anyway: wait no longer for a write in flight.
  const auto grace = std::chrono::milliseconds(static_cast<int64_t>(std::clamp(options.graceSeconds, 0.0, 1e6) * 1000));
  if (checkpointer) checkpointer->limitShutdown(grace);
  int64_t lastSubmittedStep = firstStep;
  auto snapshot = [&](int64_t step, Clock::time_point deadline) {
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
    return checkpointer->submit(std::move(state), deadline, stages > 1 ? commonCheckpoint.newest() : 0);
  };

  StageStep stageStep(*network, topology, data.train, operations, microBatchSize, globalBatch, allReduce, summary,
                      options.gradientSums);
  if (options.onThreadsStarted) options.onThreadsStarted();
  double evalSeconds = 0.0;
  std::optional<Clock::time_point> stopDeadline;
  const auto loopStart = Clock::now();

  for (int64_t step = firstStep; step < totalSteps; ++step) {
    const bool stopVote = options.stopRequested != nullptr && options.stopRequested->load();
    if (stopVote && !stopDeadline)
      stopDeadline = Clock::now() + grace;
    log::setStep(step + 1);
    const auto stepStart = Clock::now();
    const double exposedBefore = allReduce.exposedSeconds();
    const int64_t bytesBefore = allReduce.bytesReduced();
    TANDEM_ASSIGN_OR_RETURN(const double lossSum, stageStep.run(batches.shard(step), stopVote, stepStart));
    const bool checkpointDue = spec.checkpoint.everySteps > 0 && (step + 1) % spec.checkpoint.everySteps == 0;
    // The third slot: stages whose previous checkpoint is still being written. With a pipeline, each
    // stage's writer keeps its own shards; they skip a checkpoint together, or one would hold a step
    // the others lack (of use to none: a resume needs every stage's shard of its step).
    // With pipeline stages, the writers' durable checkpoints follow (CommonCheckpoint).
    std::vector<float> metrics(stages > 1 ? 3 + stages * CommonCheckpoint::kFloatsPerStage : 3, 0.0f);
    metrics[0] = static_cast<float>(lossSum);
    metrics[1] = stopVote ? 1.0f : 0.0f;
    metrics[2] = checkpointDue && checkpointer && checkpointer->stepInFlight() ? 1.0f : 0.0f;
    if (stages > 1 && checkpointer) commonCheckpoint.report(topology.stage, metrics.data() + 3);
    if (!metricsInGradients && topology.world != nullptr) {
      // The pipeline's flush: when this all-reduce returns, every stage has run all its microbatches. A
      // stage's wait here for the slower ones is bubble, as in the theory's (P-1)/(M+P-1).
      const auto flushStart = Clock::now();
      TANDEM_RETURN_IF_ERROR(topology.world->allReduce(metrics.data(), static_cast<int64_t>(metrics.size()))
                                 .withContext("step " + std::to_string(step + 1)));
      summary.idleSeconds += secondsSince(flushStart);  // !metricsInGradients: a pipeline
      if (stages > 1) commonCheckpoint.heard(metrics.data() + 3);
    }
    // Outside the pipeline's timing, like the optimizer step: the flush is over.
    TANDEM_RETURN_IF_ERROR(stageStep.finishGradients());
    TANDEM_RETURN_IF_ERROR(allReduce.finish().withContext("step " + std::to_string(step + 1)));
    if (metricsInGradients) {
      metrics[0] = network->trailingGradientSlots()[0];
      metrics[1] = network->trailingGradientSlots()[1];
    }
    const double loss = metrics[0] / static_cast<double>(globalBatch);
    const double lr = optim::learningRate(schedule, step);
    // Every rank has the same loss (it was summed): all stop here, before a NaN reaches the parameters,
    // a checkpoint or hours of compute. A restart would replay the same steps, so it is permanent.
    if (!std::isfinite(loss)) {
      std::ostringstream message;
      message << "step " << step + 1 << ": the training loss is " << (std::isnan(loss) ? "NaN" : "infinite")
              << ": training diverged (spec.optimizer.lr "
              << spec.optimizer.lr << ", " << lr << " at this step; lower it, add warm-up, or check the data)";
      return TANDEM_ERROR(StatusCode::kInvalidArgument, message.str());
    }
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
      progress.epochs = totalSteps / batches.stepsPerEpoch() + (totalSteps % batches.stepsPerEpoch() != 0 ? 1 : 0);
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
        stopDeadline = Clock::now() + grace;
      if (checkpointer && step + 1 - lastSubmittedStep > spec.checkpoint.everySteps / 2) {
        // A periodic write still in flight lands first; everything within the grace period, after which
        // the pod is killed anyway.
        Status written = checkpointer->drain(*stopDeadline).status();
        const double left = std::chrono::duration<double>(*stopDeadline - Clock::now()).count();
        if (written.ok() && left > 2.0 * lastWriteSeconds + 0.5) {
          log::info() << "stop requested: writing a checkpoint of step " << step + 1 << " (" << left << " s of grace left)";
          written = snapshot(step + 1, *stopDeadline);
        } else if (written.ok()) {
          log::warning() << "stop requested: no time for a checkpoint (" << left << " s of grace left)";
        }
        if (!written.ok()) log::warning() << "stop: " << written.message();
      }
      if (checkpointer) {
        if (auto drained = checkpointer->drain(*stopDeadline); !drained.ok())
          log::warning() << "stop: " << drained.status().message();
        checkpointer->limitShutdown(*stopDeadline);
      }
      return TANDEM_ERROR(StatusCode::kCancelled, "stopped by request after step " + std::to_string(step + 1));
    }
    if (checkpointer) {
      // A write hung on dead storage ends training here instead of in a collective's timeout elsewhere.
      TANDEM_RETURN_IF_ERROR(checkpointer->checkWriter());
      if (checkpointDue) {
        // Waiting would stall this rank and every peer in the next collective: skip this one (with a
        // pipeline, every stage when any stage's writer is busy: metrics[2] was summed over the world;
        // without one there is a single writer and only its own write counts).
        if (const auto inFlight = checkpointer->stepInFlight()) {
          log::warning() << "skipping the checkpoint of step " << step + 1 << ": "
                         << checkpoint::stepDirectoryName(*inFlight) << " is still being written";
        } else if (metrics[2] > 0.0f) {
          log::warning() << "skipping the checkpoint of step " << step + 1
                         << ": another stage's previous checkpoint is still being written (stages keep the same steps)";
        } else {
          TANDEM_RETURN_IF_ERROR(snapshot(step + 1, Clock::now()));
        }
      }
    }
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
                << summary.peakActivationBytes << " bytes), peak resident memory " << peakResidentBytes() << " bytes";
  TANDEM_ASSIGN_OR_RETURN(summary.finalEval, evaluate(*network, data.test, topology));
  summary.finalEval.step = summary.steps;
  if (options.metrics != nullptr) options.metrics->setEvalAccuracy(summary.finalEval.accuracy);
  if (isLeader && options.onEval) options.onEval(summary.finalEval);
  if (!options.dumpParametersPath.empty())
    TANDEM_RETURN_IF_ERROR(dumpParameters(options.dumpParametersPath, topology, *network));
  // The finished model is a checkpoint too: a restart after the end resumes at the end. Written after
  // the last collective, so that no peer waits on this rank's storage.
  if (checkpointer) {
    if (lastSubmittedStep != summary.steps)
      TANDEM_RETURN_IF_ERROR(snapshot(summary.steps, Clock::time_point::max()));
    TANDEM_RETURN_IF_ERROR(checkpointer->drain().status());
  }
  summary.checkpointsWritten = checkpointsWritten;
  return summary;
}

}  // namespace tandem::engine
