#include "tandem/manifest/job_spec.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <fstream>
#include <set>
#include <sstream>

#include "tandem/common/hash.h"

namespace tandem::manifest {
namespace {

std::string describeNode(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Null: return "nothing";
    case YAML::NodeType::Scalar: return "\"" + node.Scalar() + "\"";
    default: return "an undefined value";
  }
}

// A quoted scalar ("4") is a string in YAML (and to the Kubernetes API server), never a number.
bool isQuoted(const YAML::Node& node) { return node.IsScalar() && node.Tag() == "!"; }

// node[key] when `node` is a mapping and the child is of type `wanted` (undefined when absent); for a
// child of another type, an error at `path` naming what was expected, and undefined: subscripting a
// scalar would throw.
YAML::Node childOf(const YAML::Node& node, const char* key, YAML::NodeType::value wanted, const std::string& path,
                   const std::string& expected, std::vector<FieldError>& errors) {
  if (!node.IsMap()) return YAML::Node(YAML::NodeType::Undefined);
  YAML::Node child = node[key];
  // An absent key gives a node that is not even valid to ask its type.
  if (!child.IsDefined() || child.IsNull()) return YAML::Node(YAML::NodeType::Undefined);
  if (child.Type() != wanted) {
    errors.push_back({path, "expected " + expected + ", got " + describeNode(child)});
    return YAML::Node(YAML::NodeType::Undefined);
  }
  return child;
}

// A mapping key as text. Keys are normally scalars, but YAML allows a list or mapping as a key, and
// as<std::string>() would throw on those; parseManifest promises never to throw.
std::string keyText(const YAML::Node& key) {
  if (key.IsScalar()) return key.Scalar();
  YAML::Emitter out;
  out << YAML::Flow << key;
  return out.c_str();
}

std::string joinWords(const std::vector<std::string>& words) {
  std::string out;
  for (size_t i = 0; i < words.size(); ++i) out += (i == 0 ? "" : ", ") + words[i];
  return out;
}

// Reads one YAML mapping strictly: every key must be declared through one of the typed readers,
// and finish() reports the rest as unknown fields. Type errors name the field path.
class MapReader {
 public:
  MapReader(YAML::Node node, std::string path, std::vector<FieldError>& errors)
      : node_(std::move(node)), path_(std::move(path)), errors_(errors) {
    if (node_.IsDefined() && !node_.IsNull() && !node_.IsMap()) {
      errors_.push_back({path_, "expected a mapping, got " + describeNode(node_)});
      valid_ = false;
    }
  }

  bool present() const { return valid_ && node_.IsDefined() && !node_.IsNull(); }

  // Returns the child node (possibly undefined) and declares the key known.
  YAML::Node take(const std::string& key) {
    known_.push_back(key);
    if (!present()) return YAML::Node(YAML::NodeType::Undefined);
    return node_[key];
  }
  std::string pathOf(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

  void integer(const std::string& key, int64_t& out, int64_t minimum, bool required = false) {
    YAML::Node value = take(key);
    if (!checkPresence(key, value, required)) return;
    if (!value.IsScalar() || isQuoted(value)) return typeError(key, "an integer", value);
    try {
      out = value.as<int64_t>();
    } catch (const YAML::Exception&) {
      return typeError(key, "an integer", value);
    }
    if (out < minimum)
      errors_.push_back({pathOf(key), std::to_string(out) + " is below the minimum " + std::to_string(minimum)});
  }

  // A finite number >= minimum (> when exclusive), and below `below` when given.
  void number(const std::string& key, double& out, double minimum, bool exclusive,
              std::optional<double> below = std::nullopt) {
    YAML::Node value = take(key);
    if (!checkPresence(key, value, false)) return;
    if (!value.IsScalar() || isQuoted(value)) return typeError(key, "a number", value);
    double parsed = 0;
    try {
      parsed = value.as<double>();
    } catch (const YAML::Exception&) {
      return typeError(key, "a number", value);
    }
    std::ostringstream message;
    if (!std::isfinite(parsed))
      message << value.Scalar() << " is not a finite number";
    else if (exclusive ? !(parsed > minimum) : !(parsed >= minimum))
      message << value.Scalar() << " must be " << (exclusive ? "greater than " : "at least ") << minimum;
    else if (below && !(parsed < *below))
      message << value.Scalar() << " must be below " << *below;
    if (!message.str().empty()) return errors_.push_back({pathOf(key), message.str()});
    out = parsed;
  }

  void boolean(const std::string& key, bool& out) {
    YAML::Node value = take(key);
    if (!checkPresence(key, value, false)) return;
    if (!value.IsScalar() || isQuoted(value)) return typeError(key, "true or false", value);
    try {
      out = value.as<bool>();
    } catch (const YAML::Exception&) {
      return typeError(key, "true or false", value);
    }
  }

  // allowed empty: any string.
  void text(const std::string& key, std::string& out, const std::vector<std::string>& allowed = {},
            bool required = false) {
    YAML::Node value = take(key);
    if (!checkPresence(key, value, required)) return;
    if (!value.IsScalar()) return typeError(key, "a string", value);
    const std::string candidate = value.Scalar();
    if (!allowed.empty() && std::find(allowed.begin(), allowed.end(), candidate) == allowed.end()) {
      errors_.push_back({pathOf(key), "\"" + candidate + "\" is not one of " + joinWords(allowed)});
      return;
    }
    out = candidate;
  }

  void integerList(const std::string& key, std::vector<int64_t>& out, int64_t minimum) {
    YAML::Node value = take(key);
    if (!checkPresence(key, value, false)) return;
    if (!value.IsSequence()) return typeError(key, "a list of integers", value);
    std::vector<int64_t> parsed;
    for (size_t i = 0; i < value.size(); ++i) {
      const std::string itemPath = pathOf(key) + "[" + std::to_string(i) + "]";
      int64_t item = 0;
      try {
        if (!value[i].IsScalar() || isQuoted(value[i])) throw YAML::Exception(YAML::Mark::null_mark(), "");
        item = value[i].as<int64_t>();
      } catch (const YAML::Exception&) {
        errors_.push_back({itemPath, "expected an integer, got " + describeNode(value[i])});
        continue;
      }
      if (item < minimum)
        errors_.push_back({itemPath, std::to_string(item) + " is below the minimum " + std::to_string(minimum)});
      parsed.push_back(item);
    }
    out = parsed;
  }

  // Declares a key whose content is free-form (metadata.labels, spec.template).
  YAML::Node anything(const std::string& key) { return take(key); }

  // Reports every key that no reader declared, and every key given twice (yaml-cpp keeps both and
  // lookups see the first; kubectl refuses such a file).
  void finish() {
    if (!present()) return;
    std::set<std::string> seen;
    for (const auto& entry : node_) {
      const std::string key = keyText(entry.first);
      if (!seen.insert(key).second) {
        errors_.push_back({pathOf(key), "given more than once"});
        continue;
      }
      if (std::find(known_.begin(), known_.end(), key) == known_.end())
        errors_.push_back({pathOf(key), "unknown field (known fields: " + joinWords(known_) + ")"});
    }
  }

 private:
  bool checkPresence(const std::string& key, const YAML::Node& value, bool required) {
    if (value.IsDefined() && !value.IsNull()) return true;
    if (required) errors_.push_back({pathOf(key), "required field is missing"});
    return false;
  }
  void typeError(const std::string& key, const std::string& expected, const YAML::Node& value) {
    errors_.push_back({pathOf(key), "expected " + expected + ", got " + describeNode(value)});
  }

  YAML::Node node_;
  std::string path_;
  std::vector<FieldError>& errors_;
  std::vector<std::string> known_;
  bool valid_ = true;
};

void readModel(MapReader& spec, JobSpec& job, std::vector<FieldError>& errors) {
  YAML::Node modelNode = spec.take("model");
  MapReader model(modelNode, "spec.model", errors);
  job.model.present = model.present();
  model.text("kind", job.model.kind, {"mlp", "gpt"}, model.present());
  MapReader mlp(model.take("mlp"), "spec.model.mlp", errors);
  mlp.integerList("hidden", job.model.mlp.hidden, 1);
  mlp.text("activation", job.model.mlp.activation, {"relu", "gelu"});
  mlp.finish();
  MapReader gpt(model.take("gpt"), "spec.model.gpt", errors);
  gpt.integer("layers", job.model.gpt.layers, 1);
  gpt.integer("heads", job.model.gpt.heads, 1);
  gpt.integer("dModel", job.model.gpt.dModel, 1);
  gpt.integer("seqLen", job.model.gpt.seqLen, 1);
  gpt.integer("vocab", job.model.gpt.vocab, 2);
  gpt.finish();
  model.finish();
}

void readSpec(MapReader& spec, JobSpec& job, std::vector<FieldError>& errors) {
  spec.integer("workers", job.workers, 1, true);

  MapReader parallelism(spec.take("parallelism"), "spec.parallelism", errors);
  parallelism.integer("pipelineStages", job.parallelism.pipelineStages, 1);
  parallelism.integer("microBatches", job.parallelism.microBatches, 1);
  parallelism.text("schedule", job.parallelism.schedule, {"1F1B", "GPipe"});
  parallelism.finish();

  readModel(spec, job, errors);

  MapReader data(spec.take("data"), "spec.data", errors);
  data.text("kind", job.data.kind, {"fashion-mnist", "text", "synthetic"}, data.present());
  data.text("path", job.data.path);
  data.integer("samples", job.data.samples, 1);
  data.finish();

  MapReader optimizer(spec.take("optimizer"), "spec.optimizer", errors);
  optimizer.text("kind", job.optimizer.kind, {"adamw", "sgd"});
  optimizer.number("lr", job.optimizer.lr, 0.0, true);
  optimizer.number("weightDecay", job.optimizer.weightDecay, 0.0, false);
  // At 1 or above these never decay: momentum grows without bound, and AdamW's bias correction 1 - beta^t
  // is 0, so the first step divides by zero.
  optimizer.number("momentum", job.optimizer.momentum, 0.0, false, 1.0);
  optimizer.boolean("nesterov", job.optimizer.nesterov);
  optimizer.number("beta1", job.optimizer.beta1, 0.0, false, 1.0);
  optimizer.number("beta2", job.optimizer.beta2, 0.0, false, 1.0);
  optimizer.number("eps", job.optimizer.eps, 0.0, true);
  optimizer.integer("warmupSteps", job.optimizer.warmupSteps, 0);
  optimizer.text("schedule", job.optimizer.schedule, {"constant", "linear", "cosine"});
  optimizer.finish();

  MapReader training(spec.take("training"), "spec.training", errors);
  training.integer("globalBatchSize", job.training.globalBatchSize, 1);
  training.integer("epochs", job.training.epochs, 1);
  training.integer("maxSteps", job.training.maxSteps, 0);
  training.integer("seed", job.training.seed, 0);
  training.integer("evalEvery", job.training.evalEvery, 0);
  training.text("precision", job.training.precision, {"fp32", "bf16"});
  training.text("device", job.training.device, {"auto", "cpu", "cuda"});
  training.finish();

  MapReader checkpoint(spec.take("checkpoint"), "spec.checkpoint", errors);
  checkpoint.text("dir", job.checkpoint.dir);
  checkpoint.integer("everySteps", job.checkpoint.everySteps, 0);
  checkpoint.integer("keep", job.checkpoint.keep, 1);
  checkpoint.text("claimName", job.checkpoint.claimName);
  checkpoint.finish();

  MapReader runPolicy(spec.take("runPolicy"), "spec.runPolicy", errors);
  runPolicy.text("restartPolicy", job.runPolicy.restartPolicy, {"Never", "OnFailure", "ExitCode"});
  runPolicy.integer("backoffLimit", job.runPolicy.backoffLimit, 0);
  runPolicy.integer("activeDeadlineSeconds", job.runPolicy.activeDeadlineSeconds, 1);
  runPolicy.integer("ttlSecondsAfterFinished", job.runPolicy.ttlSecondsAfterFinished, 0);
  runPolicy.text("cleanPodPolicy", job.runPolicy.cleanPodPolicy, {"All", "Running", "None"});
  runPolicy.boolean("suspend", job.runPolicy.suspend);
  runPolicy.finish();

  YAML::Node templateNode = spec.anything("template");
  if (templateNode.IsDefined() && !templateNode.IsNull()) {
    if (!templateNode.IsMap()) {
      errors.push_back({"spec.template", "expected a mapping (a PodTemplateSpec), got " + describeNode(templateNode)});
    } else {
      job.templateYaml = YAML::Dump(templateNode);
      // Only the shape Tandem reads is checked (the rest is the API server's business), without
      // subscripting a scalar, which would throw.
      const YAML::Node podSpec =
          childOf(templateNode, "spec", YAML::NodeType::Map, "spec.template.spec", "a mapping (a PodSpec)", errors);
      const YAML::Node containers =
          childOf(podSpec, "containers", YAML::NodeType::Sequence, "spec.template.spec.containers", "a list", errors);
      YAML::Node first(YAML::NodeType::Undefined);
      if (containers.IsSequence() && containers.size() > 0) {
        first = containers[0];
        if (!first.IsMap()) {
          errors.push_back({"spec.template.spec.containers[0]", "expected a mapping (a Container), got " + describeNode(first)});
          first = YAML::Node(YAML::NodeType::Undefined);
        }
      }
      const YAML::Node command =
          childOf(first, "command", YAML::NodeType::Sequence, "spec.template.spec.containers[0].command", "a list", errors);
      childOf(first, "args", YAML::NodeType::Sequence, "spec.template.spec.containers[0].args", "a list", errors);
      job.hasCustomCommand = command.IsSequence() && command.size() > 0;
      if (job.hasCustomCommand) {
        for (const char* list : {"command", "args"}) {
          const YAML::Node items = first[list];
          if (!items.IsSequence()) continue;
          for (size_t i = 0; i < items.size(); ++i) {
            if (!items[i].IsScalar()) {
              errors.push_back({"spec.template.spec.containers[0]." + std::string(list) + "[" + std::to_string(i) + "]",
                                "expected a string, got " + describeNode(items[i])});
              continue;
            }
            job.customCommand.push_back(items[i].Scalar());
          }
        }
      }
    }
  }
}

// Valid manifests that this build cannot train yet: refused up front rather than failing mid-run.
void appendUnimplemented(const JobSpec& job, std::vector<FieldError>& errors) {
  const std::string notYet = " is not implemented in this build yet";
  if (job.model.present && job.model.kind == "gpt")
    errors.push_back({"spec.model.kind", "the gpt family" + notYet + " (use mlp)"});
  if (job.data.kind == "text") errors.push_back({"spec.data.kind", "text data" + notYet});
  if (job.training.precision == "bf16")
    errors.push_back({"spec.training.precision", "bf16 needs the CUDA build, which" + notYet + " (use fp32)"});
  if (job.training.device == "cuda")
    errors.push_back({"spec.training.device", "cuda" + notYet + " (use auto or cpu)"});
}

}  // namespace

int64_t JobSpec::splittableLayers() const {
  if (model.kind == "gpt") return model.gpt.layers;
  return static_cast<int64_t>(model.mlp.hidden.size()) + 1;
}

std::vector<FieldError> validateCombinations(const JobSpec& job) {
  std::vector<FieldError> errors;
  if (job.workers > kMaxWorkers) {
    errors.push_back({"spec.workers", std::to_string(job.workers) + " is above the maximum " + std::to_string(kMaxWorkers)});
    return errors;
  }
  const int64_t stages = job.parallelism.pipelineStages;
  if (job.workers % stages != 0) {
    errors.push_back({"spec.parallelism.pipelineStages",
                      std::to_string(stages) + " does not divide spec.workers (" + std::to_string(job.workers) + ")"});
    return errors;
  }
  const int64_t dataParallel = job.workers / stages;
  int64_t perStep = 0;
  if (__builtin_mul_overflow(dataParallel, job.parallelism.microBatches, &perStep)) {
    errors.push_back({"spec.parallelism.microBatches", std::to_string(job.parallelism.microBatches) +
                                                           " is too large: x the data-parallel degree (" +
                                                           std::to_string(dataParallel) + ") it exceeds any batch"});
    return errors;
  }
  // In custom mode the user's command owns batching: Tandem's training fields do not apply.
  if (job.model.present && job.training.globalBatchSize % perStep != 0) {
    std::string divisor = job.parallelism.microBatches == 1 && stages == 1
                              ? std::to_string(job.workers) + " workers"
                              : "data-parallel degree (" + std::to_string(dataParallel) + ") x microBatches (" +
                                    std::to_string(job.parallelism.microBatches) + ") = " + std::to_string(perStep);
    errors.push_back({"spec.training.globalBatchSize",
                      std::to_string(job.training.globalBatchSize) + " is not divisible by " + divisor});
  }
  if (job.model.present && job.data.kind == "synthetic" && job.data.samples < job.training.globalBatchSize) {
    errors.push_back({"spec.data.samples", std::to_string(job.data.samples) + " synthetic samples are fewer than one "
                                           "global batch (spec.training.globalBatchSize " +
                                               std::to_string(job.training.globalBatchSize) + ")"});
  }
  if (job.model.present && stages > job.splittableLayers()) {
    errors.push_back({"spec.parallelism.pipelineStages",
                      std::to_string(stages) + " stages but the " + job.model.kind + " model has only " +
                          std::to_string(job.splittableLayers()) + " layers"});
  }
  if (!job.model.present && !job.hasCustomCommand) {
    errors.push_back({"spec.model", "required field is missing (or give spec.template a container command for custom mode)"});
  }
  if (job.model.present && job.model.kind == "gpt" && job.model.gpt.dModel % job.model.gpt.heads != 0) {
    errors.push_back({"spec.model.gpt.dModel", std::to_string(job.model.gpt.dModel) + " is not divisible by spec.model.gpt.heads (" +
                                                   std::to_string(job.model.gpt.heads) + ")"});
  }
  if (job.model.present && job.model.kind == "mlp" && job.data.kind == "text") {
    errors.push_back({"spec.data.kind", "\"text\" needs spec.model.kind gpt; an mlp trains on fashion-mnist or synthetic"});
  }
  if (job.model.present && job.model.kind == "gpt" && job.data.kind != "text") {
    errors.push_back({"spec.data.kind", "\"" + job.data.kind + "\" cannot feed a gpt model; use text"});
  }
  appendUnimplemented(job, errors);
  if (!job.checkpoint.dir.empty() && job.checkpoint.dir.front() != '/') {
    errors.push_back({"spec.checkpoint.dir", "\"" + job.checkpoint.dir + "\" must be an absolute path"});
  }
  return errors;
}

namespace {

// Kubernetes' DNS-1035 label (a Service name, which the job's name becomes): lower-case letters, digits
// and '-', starting with a letter, ending with a letter or digit, at most 63 characters. The worker
// pods' hostnames (<name>-worker-<rank>) must fit in 63 as well; the operator checks that with the
// worker count it runs.
bool isDnsLabel(const std::string& text, bool letterFirst) {
  if (text.empty() || text.size() > 63) return false;
  for (char c : text)
    if (!(std::islower(static_cast<unsigned char>(c)) || std::isdigit(static_cast<unsigned char>(c)) || c == '-'))
      return false;
  if (letterFirst && !std::islower(static_cast<unsigned char>(text.front()))) return false;
  return text.front() != '-' && text.back() != '-';
}

void checkNames(const JobSpec& job, std::vector<FieldError>& errors) {
  const bool nameReported =
      std::any_of(errors.begin(), errors.end(), [](const FieldError& error) { return error.path == "metadata.name"; });
  if (!nameReported && !isDnsLabel(job.name, true))
    errors.push_back({"metadata.name", "\"" + job.name + "\" must be at most 63 lower-case letters, digits and '-', "
                                       "starting with a letter and ending with a letter or digit (a DNS-1035 label)"});
  if (!job.nameSpace.empty() && !isDnsLabel(job.nameSpace, false))
    errors.push_back({"metadata.namespace", "\"" + job.nameSpace + "\" must be at most 63 lower-case letters, digits "
                                            "and '-', starting and ending with a letter or digit (a DNS-1123 label)"});
}

ParseResult parseManifestUnguarded(const std::string& yamlText, const std::string& sourceName) {
  ParseResult result;
  YAML::Node root;
  try {
    root = YAML::Load(yamlText);
  } catch (const YAML::ParserException& error) {
    result.errors.push_back({sourceName + ":" + std::to_string(error.mark.line + 1) + ":" +
                                 std::to_string(error.mark.column + 1),
                             "malformed YAML: " + error.msg});
    return result;
  }
  if (!root.IsMap()) {
    result.errors.push_back({sourceName, "expected a DistributedTrainingJob mapping, got " + describeNode(root)});
    return result;
  }
  auto& errors = result.errors;
  JobSpec& job = result.spec;
  MapReader top(root, "", errors);
  std::string apiVersion, kind;
  top.text("apiVersion", apiVersion, {"tandem.dev/v1alpha1"}, true);
  top.text("kind", kind, {"DistributedTrainingJob"}, true);
  MapReader metadata(top.take("metadata"), "metadata", errors);
  metadata.text("name", job.name, {}, true);
  metadata.text("namespace", job.nameSpace);
  // The rest of ObjectMeta (labels, annotations, uid, ...) is the API server's business.
  if (metadata.present()) {
    for (const auto& entry : root["metadata"]) metadata.anything(keyText(entry.first));
  }
  metadata.finish();
  if (!root["metadata"].IsDefined()) errors.push_back({"metadata", "required field is missing"});
  top.anything("status");  // written by the operator; ignored here
  YAML::Node specNode = top.take("spec");
  MapReader spec(specNode, "spec", errors);
  if (!spec.present()) {
    if (!errors.empty() && errors.back().path == "spec") return result;
    errors.push_back({"spec", "required field is missing"});
    top.finish();
    return result;
  }
  readSpec(spec, job, errors);
  spec.finish();
  top.finish();
  checkNames(job, errors);
  if (!errors.empty()) return result;
  for (auto& error : validateCombinations(job)) errors.push_back(std::move(error));
  return result;
}

}  // namespace

ParseResult parseManifest(const std::string& yamlText, const std::string& sourceName) {
  // Every shape is meant to be reported as a field error; this is the backstop that keeps one that was
  // missed from killing `tandem validate` or the operator.
  try {
    return parseManifestUnguarded(yamlText, sourceName);
  } catch (const std::exception& error) {
    ParseResult result;
    result.errors.push_back({sourceName, std::string("cannot read the manifest: ") + error.what()});
    return result;
  }
}

ParseResult loadManifest(const std::string& path) {
  std::ifstream file(path);
  if (!file) {
    ParseResult result;
    result.errors.push_back({path, "cannot read the manifest file"});
    return result;
  }
  std::stringstream text;
  text << file.rdbuf();
  return parseManifest(text.str(), path);
}

std::string canonicalTrainingConfig(const JobSpec& job) {
  std::ostringstream out;
  out.precision(17);
  out << "job=" << job.jobKey() << "\nworkers=" << job.workers << "\npipelineStages=" << job.parallelism.pipelineStages
      << "\nmicroBatches=" << job.parallelism.microBatches << "\nschedule=" << job.parallelism.schedule
      << "\nmodel.kind=" << job.model.kind << "\nmodel.mlp.hidden=";
  for (int64_t size : job.model.mlp.hidden) out << size << ",";
  out << "\nmodel.mlp.activation=" << job.model.mlp.activation << "\nmodel.gpt=" << job.model.gpt.layers << ","
      << job.model.gpt.heads << "," << job.model.gpt.dModel << "," << job.model.gpt.seqLen << "," << job.model.gpt.vocab
      << "\ndata.kind=" << job.data.kind << "\ndata.samples=" << job.data.samples
      << "\noptimizer=" << job.optimizer.kind << "," << job.optimizer.lr << "," << job.optimizer.weightDecay << ","
      << job.optimizer.momentum << "," << job.optimizer.nesterov << "," << job.optimizer.beta1 << ","
      << job.optimizer.beta2 << "," << job.optimizer.eps << "," << job.optimizer.warmupSteps << ","
      << job.optimizer.schedule << "\ntraining=" << job.training.globalBatchSize << "," << job.training.epochs << ","
      << job.training.maxSteps << "," << job.training.seed << "," << job.training.precision << ","
      << job.training.device << "\n";
  return out.str();
}

std::string configHash(const JobSpec& job) { return toHex64(fnv1a64(canonicalTrainingConfig(job))); }

std::string describeConfigChanges(const std::string& before, const std::string& after) {
  // "key=value" lines, in the order they were written.
  auto fields = [](const std::string& text) {
    std::vector<std::pair<std::string, std::string>> parsed;
    std::istringstream lines(text);
    for (std::string line; std::getline(lines, line);) {
      const size_t equals = line.find('=');
      if (equals == std::string::npos) continue;
      parsed.emplace_back(line.substr(0, equals), line.substr(equals + 1));
    }
    return parsed;
  };
  const auto old = fields(before), now = fields(after);
  auto valueIn = [](const std::vector<std::pair<std::string, std::string>>& in, const std::string& key) {
    for (const auto& [name, value] : in)
      if (name == key) return std::optional<std::string>(value);
    return std::optional<std::string>();
  };
  std::string changes;
  auto add = [&](const std::string& key, const std::optional<std::string>& from, const std::optional<std::string>& to) {
    if (from == to) return;
    changes += (changes.empty() ? "" : "; ") + key + " " + from.value_or("(none)") + " -> " + to.value_or("(none)");
  };
  for (const auto& [key, value] : old) add(key, value, valueIn(now, key));
  for (const auto& [key, value] : now)
    if (!valueIn(old, key)) add(key, std::nullopt, value);
  return changes;
}

}  // namespace tandem::manifest
