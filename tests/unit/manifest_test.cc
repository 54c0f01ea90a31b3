// manifest: table-driven parseManifest cases (valid full manifest, unknown fields, wrong types, missing
// required fields, enum violations, malformed YAML, cross-field checks, custom mode) and the config hash.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tandem/manifest/job_spec.h"

namespace tandem::manifest {
namespace {

// Every field of DESIGN.md §2, with values this build can train (one pipeline stage, one microbatch).
const char* const kFullManifest = R"(apiVersion: tandem.dev/v1alpha1
kind: DistributedTrainingJob
metadata: {name: fmnist, namespace: research, labels: {team: ml}}
spec:
  workers: 4
  parallelism:
    pipelineStages: 1
    microBatches: 1
    schedule: 1F1B
  model:
    kind: mlp
    mlp: {hidden: [256, 128], activation: relu}
    gpt: {layers: 12, heads: 12, dModel: 768, seqLen: 1024, vocab: 256}
  data:
    kind: fashion-mnist
    path: /usr/share/datasets/fashion-mnist
  optimizer: {kind: adamw, lr: 1.0e-3, weightDecay: 0.0, warmupSteps: 0, schedule: constant}
  training: {globalBatchSize: 256, epochs: 10, seed: 1, evalEvery: 500, precision: fp32, device: auto}
  checkpoint: {dir: /checkpoints, everySteps: 500, keep: 3, claimName: fmnist-ckpt}
  runPolicy:
    restartPolicy: OnFailure
    backoffLimit: 3
    activeDeadlineSeconds: 86400
    ttlSecondsAfterFinished: 3600
    cleanPodPolicy: Running
    suspend: false
  template: {}
)";

// A minimal valid manifest; cases below replace one line or append to it.
const char* const kMinimal = R"(apiVersion: tandem.dev/v1alpha1
kind: DistributedTrainingJob
metadata:
  name: small
spec:
  workers: 4
  model:
    kind: mlp
    mlp: {hidden: [32, 16]}
  data: {kind: synthetic}
  training:
    globalBatchSize: 64
)";

// Replaces the first `from`; when it is missing (a bug in this file) the result is a document that fails
// every expectation below instead of silently testing the unmodified manifest.
std::string replace(std::string text, const std::string& from, const std::string& to) {
  const size_t at = text.find(from);
  if (at == std::string::npos) return "test bug: '" + from + "' is not in the manifest";
  return text.replace(at, from.size(), to);
}

std::string allErrors(const ParseResult& result) {
  std::string text;
  for (const auto& error : result.errors) text += "\n  " + error.toString();
  return text;
}

TEST(ParseManifest, FullManifestIsValidAndEveryFieldLands) {
  const ParseResult result = parseManifest(kFullManifest, "full.yaml");
  ASSERT_TRUE(result.ok()) << allErrors(result);
  const JobSpec& spec = result.spec;
  EXPECT_EQ(spec.name, "fmnist");
  EXPECT_EQ(spec.nameSpace, "research");
  EXPECT_EQ(spec.jobKey(), "research/fmnist");
  EXPECT_EQ(spec.workers, 4);
  EXPECT_EQ(spec.dataParallel(), 4);
  EXPECT_EQ(spec.parallelism.schedule, "1F1B");
  EXPECT_TRUE(spec.model.present);
  EXPECT_EQ(spec.model.kind, "mlp");
  EXPECT_EQ(spec.model.mlp.hidden, (std::vector<int64_t>{256, 128}));
  EXPECT_EQ(spec.model.mlp.activation, "relu");
  EXPECT_EQ(spec.model.gpt.dModel, 768);
  EXPECT_EQ(spec.model.gpt.seqLen, 1024);
  EXPECT_EQ(spec.splittableLayers(), 3);
  EXPECT_EQ(spec.data.kind, "fashion-mnist");
  EXPECT_EQ(spec.data.path, "/usr/share/datasets/fashion-mnist");
  EXPECT_EQ(spec.optimizer.kind, "adamw");
  EXPECT_DOUBLE_EQ(spec.optimizer.lr, 1e-3);
  EXPECT_EQ(spec.optimizer.schedule, "constant");
  EXPECT_EQ(spec.training.globalBatchSize, 256);
  EXPECT_EQ(spec.training.epochs, 10);
  EXPECT_EQ(spec.training.evalEvery, 500);
  EXPECT_EQ(spec.training.device, "auto");
  EXPECT_EQ(spec.checkpoint.dir, "/checkpoints");
  EXPECT_EQ(spec.checkpoint.everySteps, 500);
  EXPECT_EQ(spec.checkpoint.keep, 3);
  EXPECT_EQ(spec.checkpoint.claimName, "fmnist-ckpt");
  EXPECT_EQ(spec.runPolicy.restartPolicy, "OnFailure");
  EXPECT_EQ(spec.runPolicy.backoffLimit, 3);
  EXPECT_EQ(spec.runPolicy.activeDeadlineSeconds, 86400);
  EXPECT_EQ(spec.runPolicy.ttlSecondsAfterFinished, 3600);
  EXPECT_EQ(spec.runPolicy.cleanPodPolicy, "Running");
  EXPECT_FALSE(spec.runPolicy.suspend);
  EXPECT_FALSE(spec.hasCustomCommand);
}

// The DESIGN.md §2 example itself (two stages, eight microbatches) is valid now that pipelines exist.
TEST(ParseManifest, DesignExampleWithPipelineIsValid) {
  std::string text = replace(kFullManifest, "pipelineStages: 1", "pipelineStages: 2");
  text = replace(text, "microBatches: 1", "microBatches: 8");
  const ParseResult result = parseManifest(text, "design.yaml");
  ASSERT_TRUE(result.ok()) << allErrors(result);
  EXPECT_EQ(result.spec.parallelism.pipelineStages, 2);
  EXPECT_EQ(result.spec.dataParallel(), 2);
}

TEST(ParseManifest, BatchNotDivisibleByDataParallelTimesMicroBatches) {
  std::string text = replace(kFullManifest, "pipelineStages: 1", "pipelineStages: 2");
  text = replace(text, "microBatches: 1", "microBatches: 6");
  const ParseResult result = parseManifest(text, "design.yaml");
  ASSERT_EQ(result.errors.size(), 1u) << allErrors(result);
  EXPECT_EQ(result.errors[0].toString(),
            "spec.training.globalBatchSize: 256 is not divisible by data-parallel degree (2) x microBatches (6) = 12");
}

TEST(ParseManifest, MinimalManifestIsValid) {
  const ParseResult result = parseManifest(kMinimal, "small.yaml");
  ASSERT_TRUE(result.ok()) << allErrors(result);
  EXPECT_EQ(result.spec.nameSpace, "default");
  EXPECT_EQ(result.spec.training.globalBatchSize, 64);
}

struct ErrorCase {
  std::string name;
  std::string yaml;
  std::string path;            // expected error path, exactly
  std::string messagePart;     // expected inside that error's message
};

class ManifestErrorTest : public ::testing::TestWithParam<ErrorCase> {};

TEST_P(ManifestErrorTest, NamesTheField) {
  const ErrorCase& c = GetParam();
  const ParseResult result = parseManifest(c.yaml, "job.yaml");
  ASSERT_FALSE(result.ok()) << "accepted:\n" << c.yaml;
  bool found = false;
  for (const auto& error : result.errors)
    if (error.path == c.path && error.message.find(c.messagePart) != std::string::npos) found = true;
  EXPECT_TRUE(found) << "no error at " << c.path << " mentioning '" << c.messagePart << "'; got:" << allErrors(result);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ManifestErrorTest,
    ::testing::Values(
        ErrorCase{"UnknownTopLevelField", std::string(kMinimal) + "specification: {}\n", "specification", "unknown field"},
        ErrorCase{"UnknownSpecField", replace(kMinimal, "  workers: 4\n", "  workers: 4\n  replicas: 2\n"),
                  "spec.replicas", "unknown field"},
        ErrorCase{"UnknownTrainingField", replace(kMinimal, "globalBatchSize: 64", "globalBatchSiz: 64"),
                  "spec.training.globalBatchSiz", "unknown field"},
        ErrorCase{"UnknownNestedModelField", replace(kMinimal, "hidden: [32, 16]", "hidden: [32, 16], dropout: 0.1"),
                  "spec.model.mlp.dropout", "unknown field"},
        ErrorCase{"WorkersNotAnInteger", replace(kMinimal, "workers: 4", "workers: \"four\""), "spec.workers",
                  "integer"},
        ErrorCase{"WorkersUnquotedWord", replace(kMinimal, "workers: 4", "workers: four"), "spec.workers", "integer"},
        ErrorCase{"WorkersBelowMinimum", replace(kMinimal, "workers: 4", "workers: 0"), "spec.workers", "minimum"},
        ErrorCase{"HiddenItemNotAnInteger", replace(kMinimal, "hidden: [32, 16]", "hidden: [32, wide]"),
                  "spec.model.mlp.hidden[1]", "integer"},
        ErrorCase{"LearningRateNotPositive", replace(kMinimal, "  data: {kind: synthetic}\n",
                                                     "  data: {kind: synthetic}\n  optimizer: {lr: 0}\n"),
                  "spec.optimizer.lr", "greater than 0"},
        ErrorCase{"SpecNotAMapping",
                  "apiVersion: tandem.dev/v1alpha1\nkind: DistributedTrainingJob\nmetadata: {name: x}\nspec: [1, 2]\n",
                  "spec", "expected a mapping"},
        ErrorCase{"MissingName", replace(kMinimal, "  name: small\n", "  namespace: ml\n"), "metadata.name",
                  "required"},
        ErrorCase{"MissingMetadata", replace(kMinimal, "metadata:\n  name: small\n", ""), "metadata", "required"},
        ErrorCase{"MissingWorkers", replace(kMinimal, "  workers: 4\n", ""), "spec.workers", "required"},
        ErrorCase{"MissingSpec", "apiVersion: tandem.dev/v1alpha1\nkind: DistributedTrainingJob\nmetadata: {name: x}\n",
                  "spec", "required"},
        ErrorCase{"WrongKind", replace(kMinimal, "kind: DistributedTrainingJob", "kind: PyTorchJob"), "kind",
                  "not one of"},
        ErrorCase{"OptimizerKindEnum", replace(kMinimal, "  data: {kind: synthetic}\n",
                                               "  data: {kind: synthetic}\n  optimizer: {kind: adam}\n"),
                  "spec.optimizer.kind", "\"adam\" is not one of adamw, sgd"},
        ErrorCase{"RestartPolicyEnum",
                  replace(kMinimal, "  training:\n", "  runPolicy: {restartPolicy: Always}\n  training:\n"),
                  "spec.runPolicy.restartPolicy", "not one of"},
        ErrorCase{"WorkersNotDivisibleByStages",
                  replace(replace(kMinimal, "workers: 4", "workers: 3"), "  model:\n",
                          "  parallelism: {pipelineStages: 2}\n  model:\n"),
                  "spec.parallelism.pipelineStages", "does not divide spec.workers (3)"},
        ErrorCase{"MoreStagesThanLayers",
                  replace(kMinimal, "  model:\n", "  parallelism: {pipelineStages: 4}\n  model:\n"),
                  "spec.parallelism.pipelineStages", "has only 3 layers"},
        ErrorCase{"ModelAbsentWithoutCommand",
                  replace(kMinimal, "  model:\n    kind: mlp\n    mlp: {hidden: [32, 16]}\n", ""), "spec.model",
                  "required"},
        ErrorCase{"ModelAbsentTemplateWithoutCommand",
                  replace(kMinimal, "  model:\n    kind: mlp\n    mlp: {hidden: [32, 16]}\n",
                          "  template: {spec: {containers: [{name: w, image: trainer}]}}\n"),
                  "spec.model", "required"},
        ErrorCase{"RelativeCheckpointDir", std::string(kMinimal) + "  checkpoint: {dir: ckpt}\n", "spec.checkpoint.dir",
                  "absolute"},
        // A template Tandem reads must not be subscripted where it is a scalar (that threw, and crashed the
        // operator on every reconcile of such a job).
        ErrorCase{"TemplateSpecNotAMapping", std::string(kMinimal) + "  template: {spec: x}\n", "spec.template.spec",
                  "expected a mapping (a PodSpec), got \"x\""},
        ErrorCase{"TemplateContainersNotAList", std::string(kMinimal) + "  template: {spec: {containers: x}}\n",
                  "spec.template.spec.containers", "expected a list"},
        ErrorCase{"TemplateContainerNotAMapping", std::string(kMinimal) + "  template: {spec: {containers: [busybox]}}\n",
                  "spec.template.spec.containers[0]", "expected a mapping (a Container), got \"busybox\""},
        ErrorCase{"TemplateCommandNotAList",
                  std::string(kMinimal) + "  template: {spec: {containers: [{name: w, command: run.sh}]}}\n",
                  "spec.template.spec.containers[0].command", "expected a list"},
        // 4 x 2^62 wraps to 0 in 64 bits: a division by zero (SIGFPE) in the batch check.
        ErrorCase{"MicroBatchesOverflow",
                  replace(kMinimal, "  model:\n", "  parallelism: {microBatches: 4611686018427387904}\n  model:\n"),
                  "spec.parallelism.microBatches", "too large"},
        ErrorCase{"WorkersAboveMaximum", replace(kMinimal, "workers: 4", "workers: 4294967296"), "spec.workers",
                  "above the maximum 1048576"},
        ErrorCase{"Beta1AtOne", replace(kMinimal, "  data: {kind: synthetic}\n",
                                        "  data: {kind: synthetic}\n  optimizer: {beta1: 1.0}\n"),
                  "spec.optimizer.beta1", "1.0 must be below 1"},
        ErrorCase{"Beta2AboveOne", replace(kMinimal, "  data: {kind: synthetic}\n",
                                           "  data: {kind: synthetic}\n  optimizer: {beta2: 1.5}\n"),
                  "spec.optimizer.beta2", "must be below 1"},
        ErrorCase{"MomentumAtOne", replace(kMinimal, "  data: {kind: synthetic}\n",
                                           "  data: {kind: synthetic}\n  optimizer: {kind: sgd, momentum: 1}\n"),
                  "spec.optimizer.momentum", "must be below 1"},
        ErrorCase{"LearningRateInfinite", replace(kMinimal, "  data: {kind: synthetic}\n",
                                                  "  data: {kind: synthetic}\n  optimizer: {lr: .inf}\n"),
                  "spec.optimizer.lr", ".inf is not a finite number"},
        ErrorCase{"NameWithAPathSeparator", replace(kMinimal, "name: small", "name: ../x"), "metadata.name",
                  "DNS-1035 label"},
        ErrorCase{"NameWithADot", replace(kMinimal, "name: small", "name: gpt.v2"), "metadata.name", "DNS-1035"},
        ErrorCase{"NameStartingWithADigit", replace(kMinimal, "name: small", "name: 7b-run"), "metadata.name",
                  "starting with a letter"},
        ErrorCase{"NameEmpty", replace(kMinimal, "name: small", "name: \"\""), "metadata.name", "DNS-1035"},
        ErrorCase{"DuplicateField", replace(kMinimal, "  workers: 4\n", "  workers: 4\n  workers: 8\n"), "spec.workers",
                  "given more than once"},
        ErrorCase{"DuplicateNestedField",
                  replace(kMinimal, "globalBatchSize: 64", "globalBatchSize: 64\n    globalBatchSize: 128"),
                  "spec.training.globalBatchSize", "given more than once"},
        ErrorCase{"FewerSyntheticSamplesThanABatch",
                  replace(kMinimal, "data: {kind: synthetic}", "data: {kind: synthetic, samples: 32}"),
                  "spec.data.samples", "32 synthetic samples are fewer than one global batch"},
        ErrorCase{"NamespaceUpperCase", replace(kMinimal, "name: small", "name: small\n  namespace: ML"),
                  "metadata.namespace", "DNS-1123 label"}),
    [](const auto& info) { return info.param.name; });

TEST(ParseManifest, MalformedYamlNamesTheSourceAndLine) {
  const std::string text = replace(kMinimal, "  workers: 4\n", "  workers: [4\n");
  const ParseResult result = parseManifest(text, "job.yaml");
  ASSERT_EQ(result.errors.size(), 1u) << allErrors(result);
  const FieldError& error = result.errors[0];
  EXPECT_NE(error.message.find("malformed YAML"), std::string::npos) << error.toString();
  // path is "<source>:<line>:<column>" with a line inside the document.
  ASSERT_EQ(error.path.rfind("job.yaml:", 0), 0u) << error.path;
  const int line = std::stoi(error.path.substr(std::string("job.yaml:").size()));
  EXPECT_GE(line, 6);
  EXPECT_LE(line, 12);
}

TEST(ParseManifest, UnknownTrainingFieldPathIsExact) {
  const ParseResult result =
      parseManifest(replace(kMinimal, "globalBatchSize: 64", "globalBatchSiz: 64"), "job.yaml");
  ASSERT_EQ(result.errors.size(), 1u) << allErrors(result);
  EXPECT_EQ(result.errors[0].path, "spec.training.globalBatchSiz");
  // The message lists the fields that do exist, so the typo is easy to spot.
  EXPECT_NE(result.errors[0].message.find("globalBatchSize"), std::string::npos);
}

TEST(ParseManifest, GlobalBatchNotDivisibleByWorkersIsExactlyOneLine) {
  const ParseResult result = parseManifest(replace(kMinimal, "globalBatchSize: 64", "globalBatchSize: 250"), "job.yaml");
  ASSERT_EQ(result.errors.size(), 1u) << allErrors(result);
  EXPECT_EQ(result.errors[0].toString(), "spec.training.globalBatchSize: 250 is not divisible by 4 workers");
}

TEST(ParseManifest, TemplateWithCommandIsCustomMode) {
  const std::string text =
      replace(kMinimal, "  model:\n    kind: mlp\n    mlp: {hidden: [32, 16]}\n",
              "  template:\n    spec:\n      containers:\n        - name: trainer\n          image: pytorch:2\n"
              "          command: [torchrun, train.py]\n");
  const ParseResult result = parseManifest(text, "custom.yaml");
  ASSERT_TRUE(result.ok()) << allErrors(result);
  EXPECT_FALSE(result.spec.model.present);
  EXPECT_TRUE(result.spec.hasCustomCommand);
  EXPECT_NE(result.spec.templateYaml.find("torchrun"), std::string::npos);
}

TEST(ParseManifest, NeverThrowsOnOddDocuments) {
  // Includes non-string keys (a list as a mapping key), at the top and inside metadata and spec.
  for (const char* text : {"", "just a string", "- a\n- list\n", "{", "spec: [", "\t:", "? [a, b]\n: 1\n",
                           "apiVersion: tandem.dev/v1alpha1\nkind: DistributedTrainingJob\nmetadata: {name: x, [1]: 2}\n",
                           "apiVersion: tandem.dev/v1alpha1\nkind: DistributedTrainingJob\nmetadata: {name: x}\n"
                           "spec: {workers: 1, {a: b}: c}\n"}) {
    const ParseResult result = parseManifest(text, "odd.yaml");
    EXPECT_FALSE(result.ok()) << "accepted: " << text;
    // Each is reported as what is wrong with it, not caught by parseManifest's backstop.
    for (const auto& error : result.errors)
      EXPECT_EQ(error.message.rfind("cannot read the manifest: ", 0), std::string::npos) << text << ": " << error.message;
  }
}

TEST(ParseManifest, NonScalarKeyIsReportedAsAnUnknownField) {
  const std::string text = std::string(kMinimal) + "  ? [a, b]\n  : 1\n";
  const ParseResult result = parseManifest(text, "job.yaml");
  ASSERT_EQ(result.errors.size(), 1u) << allErrors(result);
  EXPECT_EQ(result.errors[0].path, "spec.[a, b]");
  EXPECT_NE(result.errors[0].message.find("unknown field"), std::string::npos);
}

TEST(ValidateCombinations, RecheckAfterOverridingWorkers) {
  ParseResult result = parseManifest(kMinimal, "small.yaml");
  ASSERT_TRUE(result.ok()) << allErrors(result);
  result.spec.workers = 3;  // 64 % 3 != 0
  const auto errors = validateCombinations(result.spec);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].toString(), "spec.training.globalBatchSize: 64 is not divisible by 3 workers");
}

TEST(ConfigHash, EqualForEqualSpecsDifferentWhenTrainingDiffers) {
  const ParseResult a = parseManifest(kMinimal, "a.yaml");
  const ParseResult b = parseManifest(kMinimal, "b.yaml");
  const ParseResult wider = parseManifest(replace(kMinimal, "hidden: [32, 16]", "hidden: [64, 16]"), "c.yaml");
  const ParseResult reseeded =
      parseManifest(replace(kMinimal, "globalBatchSize: 64", "globalBatchSize: 64\n    seed: 2"), "d.yaml");
  const ParseResult restartOnly =
      parseManifest(std::string(kMinimal) + "  runPolicy: {backoffLimit: 7}\n", "e.yaml");
  for (const auto* result : {&a, &b, &wider, &reseeded, &restartOnly}) ASSERT_TRUE(result->ok()) << allErrors(*result);

  EXPECT_EQ(configHash(a.spec).size(), 16u);
  EXPECT_EQ(configHash(a.spec), configHash(b.spec));
  EXPECT_NE(configHash(a.spec), configHash(wider.spec));
  EXPECT_NE(configHash(a.spec), configHash(reseeded.spec));
  // The restart policy does not change what is trained: ranks of a job may differ there.
  EXPECT_EQ(configHash(a.spec), configHash(restartOnly.spec));
}

TEST(DescribeConfigChanges, NamesEachChangedFieldWithBothValues) {
  EXPECT_EQ(describeConfigChanges("job=a/b\nworkers=4\ntraining=256,1,0,1\n", "job=a/b\nworkers=2\ntraining=128,1,0,1\n"),
            "workers 4 -> 2; training 256,1,0,1 -> 128,1,0,1");
  // A field one side lacks (a checkpoint from before the field existed).
  EXPECT_EQ(describeConfigChanges("workers=4\n", "workers=4\nschedule=1F1B\n"), "schedule (none) -> 1F1B");
  EXPECT_EQ(describeConfigChanges("workers=4\nschedule=GPipe\n", "workers=4\n"), "schedule GPipe -> (none)");
  // On real specs: only what was changed is named.
  const ParseResult parsed = parseManifest(kMinimal, "a.yaml");
  ASSERT_TRUE(parsed.ok()) << allErrors(parsed);
  JobSpec fewer = parsed.spec;
  fewer.workers = 1;
  const std::string before = canonicalTrainingConfig(parsed.spec);
  EXPECT_EQ(describeConfigChanges(before, before), "");
  EXPECT_EQ(describeConfigChanges(before, canonicalTrainingConfig(fewer)),
            "workers " + std::to_string(parsed.spec.workers) + " -> 1");
}

}  // namespace
}  // namespace tandem::manifest
