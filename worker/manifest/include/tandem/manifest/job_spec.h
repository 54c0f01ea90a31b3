// The DistributedTrainingJob manifest (DESIGN.md §2) as typed structs, and its strict parser/validator.
// The same checks run in `tandem validate`, `tandem run` and every worker, so a bad manifest is refused
// before anything starts, with one line per problem naming the field path:
//   spec.training.globalBatchSize: 250 is not divisible by 4 workers
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tandem/common/status.h"

namespace tandem::manifest {

struct MlpSpec {
  std::vector<int64_t> hidden{256, 128};
  std::string activation = "relu";  // relu | gelu
};

struct GptSpec {
  int64_t layers = 12;
  int64_t heads = 12;
  int64_t dModel = 768;
  int64_t seqLen = 1024;
  int64_t vocab = 256;
};

struct ModelSpec {
  bool present = false;  // absent model + a template command = custom mode
  std::string kind = "mlp";  // mlp | gpt
  MlpSpec mlp;
  GptSpec gpt;
};

struct DataSpec {
  std::string kind = "fashion-mnist";  // fashion-mnist | text | synthetic
  std::string path = "/usr/share/datasets/fashion-mnist";
  int64_t samples = 8192;  // synthetic only: training samples (a quarter as many test samples)
};

struct OptimizerSpec {
  std::string kind = "adamw";  // adamw | sgd
  double lr = 1e-3;
  double weightDecay = 0.0;
  double momentum = 0.9;   // sgd
  bool nesterov = false;   // sgd
  double beta1 = 0.9;      // adamw
  double beta2 = 0.999;    // adamw
  double eps = 1e-8;       // adamw
  int64_t warmupSteps = 0;
  std::string schedule = "constant";  // constant | linear | cosine
};

struct ParallelismSpec {
  int64_t pipelineStages = 1;
  int64_t microBatches = 1;
  std::string schedule = "1F1B";  // 1F1B | GPipe
};

struct TrainingSpec {
  int64_t globalBatchSize = 256;
  int64_t epochs = 1;
  int64_t maxSteps = 0;  // 0: epochs decide
  int64_t seed = 1;
  int64_t evalEvery = 0;  // 0: evaluate at the end only
  std::string precision = "fp32";  // fp32 | bf16
  std::string device = "auto";     // auto | cpu | cuda
};

struct CheckpointSpec {
  std::string dir;
  int64_t everySteps = 0;  // 0: no periodic checkpoints
  int64_t keep = 3;
  std::string claimName;
};

struct RunPolicySpec {
  std::string restartPolicy = "OnFailure";  // Never | OnFailure | ExitCode
  int64_t backoffLimit = 3;
  int64_t activeDeadlineSeconds = 0;  // 0: none
  int64_t ttlSecondsAfterFinished = -1;  // -1: keep forever
  std::string cleanPodPolicy = "Running";  // All | Running | None
  bool suspend = false;
};

struct JobSpec {
  std::string name;
  std::string nameSpace = "default";
  int64_t workers = 1;
  ParallelismSpec parallelism;
  ModelSpec model;
  DataSpec data;
  OptimizerSpec optimizer;
  TrainingSpec training;
  CheckpointSpec checkpoint;
  RunPolicySpec runPolicy;
  std::string templateYaml;  // spec.template as YAML text, passed through untouched
  bool hasCustomCommand = false;
  // Custom mode: the first container's command and args of spec.template, as strings.
  std::vector<std::string> customCommand;

  int64_t dataParallel() const { return workers / parallelism.pipelineStages; }
  // Number of layers the pipeline can split: linear layers for mlp, transformer blocks for gpt.
  int64_t splittableLayers() const;
  // "namespace/name"
  std::string jobKey() const { return nameSpace + "/" + name; }
};

// One problem found in a manifest: the field path and what was expected.
struct FieldError {
  std::string path;
  std::string message;
  std::string toString() const { return path + ": " + message; }
};

struct ParseResult {
  JobSpec spec;
  std::vector<FieldError> errors;  // empty when the manifest is valid
  bool ok() const { return errors.empty(); }
};

// Parses YAML text. Never throws: malformed YAML is reported as an error at path "<file>:line:col".
ParseResult parseManifest(const std::string& yamlText, const std::string& sourceName);
// Reads and parses a file; an unreadable file is one error naming it.
ParseResult loadManifest(const std::string& path);

// Ranks are ints everywhere (and a million workers is far beyond any cluster).
constexpr int64_t kMaxWorkers = 1 << 20;

// Cross-field checks (divisibility, layer counts, supported combinations), given workers.
// parseManifest already runs these; call again after overriding spec.workers.
std::vector<FieldError> validateCombinations(const JobSpec& spec);

// The canonical text of everything that determines the training trajectory, and its hash.
// Ranks with different hashes refuse to train together.
std::string canonicalTrainingConfig(const JobSpec& spec);
std::string configHash(const JobSpec& spec);
// What differs between two canonical texts, field by field in their order: "workers 4 -> 2; training
// 256,1,0,1 -> 512,1,0,1". A field only one side has reads "(none)" on the other (a checkpoint written
// by an older version). Empty when they are equal.
std::string describeConfigChanges(const std::string& before, const std::string& after);

}  // namespace tandem::manifest
