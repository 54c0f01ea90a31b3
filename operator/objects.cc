// Builders for the Service, Secret, ConfigMap and worker pods of a job (objects.h), and the text reader
// that turns the job's JSON or YAML into nlohmann::json without losing the types of quoted scalars.
#include "tandem/operator/objects.h"

#include <yaml-cpp/yaml.h>

#include <regex>
#include <set>

#include "tandem/operator/naming.h"

namespace tandem::operator_core {
namespace {

using nlohmann::json;

// A plain YAML scalar typed as the YAML 1.2 core schema does (null, bool, int, float, else string).
json plainScalar(const std::string& text) {
  if (text.empty() || text == "~" || text == "null" || text == "Null" || text == "NULL") return nullptr;
  if (text == "true" || text == "True" || text == "TRUE") return true;
  if (text == "false" || text == "False" || text == "FALSE") return false;
  static const std::regex integer("[-+]?[0-9]+");
  static const std::regex number("[-+]?(\\.[0-9]+|[0-9]+(\\.[0-9]*)?)([eE][-+]?[0-9]+)?");
  try {
    if (std::regex_match(text, integer)) return std::stoll(text);
    if (std::regex_match(text, number)) return std::stod(text);
  } catch (const std::out_of_range&) {
    // Too large for int64/double: keep the text.
  }
  return text;
}

json yamlToJson(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      return nullptr;
    case YAML::NodeType::Scalar:
      // "?" marks a plain scalar; "!" a quoted one; explicit tags (!!str) keep the text too.
      return node.Tag() == "?" ? plainScalar(node.Scalar()) : json(node.Scalar());
    case YAML::NodeType::Sequence: {
      json array = json::array();
      for (const auto& item : node) array.push_back(yamlToJson(item));
      return array;
    }
    case YAML::NodeType::Map: {
      json object = json::object();
      for (const auto& entry : node) object[entry.first.as<std::string>()] = yamlToJson(entry.second);
      return object;
    }
  }
  return nullptr;
}

// Shape checks for the parts of a PodTemplateSpec the pod builder reads; each problem names its field.
Status expectObject(const json& parent, const char* key, const std::string& path) {
  if (parent.contains(key) && !parent[key].is_object() && !parent[key].is_null())
    return TANDEM_ERROR(StatusCode::kInvalidArgument, path + "." + key + ": expected a mapping");
  return Status::Ok();
}
Status expectArrayOfObjects(const json& parent, const char* key, const std::string& path) {
  if (!parent.contains(key) || parent[key].is_null()) return Status::Ok();
  if (!parent[key].is_array()) return TANDEM_ERROR(StatusCode::kInvalidArgument, path + "." + key + ": expected a list");
  for (size_t i = 0; i < parent[key].size(); ++i) {
    const json& item = parent[key][i];
    const std::string itemPath = path + "." + key + "[" + std::to_string(i) + "]";
    if (!item.is_object()) return TANDEM_ERROR(StatusCode::kInvalidArgument, itemPath + ": expected a mapping");
    if (item.contains("name") && !item["name"].is_string())
      return TANDEM_ERROR(StatusCode::kInvalidArgument, itemPath + ".name: expected a string");
  }
  return Status::Ok();
}
Status expectStringMap(const json& parent, const char* key, const std::string& path) {
  TANDEM_RETURN_IF_ERROR(expectObject(parent, key, path));
  if (!parent.contains(key) || parent[key].is_null()) return Status::Ok();
  for (const auto& [name, value] : parent[key].items())
    if (!value.is_string())
      return TANDEM_ERROR(StatusCode::kInvalidArgument, path + "." + key + "." + name + ": expected a string");
  return Status::Ok();
}

Status checkPodTemplate(const json& podTemplate) {
  const std::string path = "spec.template";
  if (!podTemplate.is_object()) return TANDEM_ERROR(StatusCode::kInvalidArgument, path + ": expected a mapping");
  TANDEM_RETURN_IF_ERROR(expectObject(podTemplate, "metadata", path));
  if (podTemplate.contains("metadata") && podTemplate["metadata"].is_object()) {
    TANDEM_RETURN_IF_ERROR(expectStringMap(podTemplate["metadata"], "labels", path + ".metadata"));
    TANDEM_RETURN_IF_ERROR(expectStringMap(podTemplate["metadata"], "annotations", path + ".metadata"));
  }
  TANDEM_RETURN_IF_ERROR(expectObject(podTemplate, "spec", path));
  if (!podTemplate.contains("spec") || !podTemplate["spec"].is_object()) return Status::Ok();
  const json& spec = podTemplate["spec"];
  const std::string specPath = path + ".spec";
  TANDEM_RETURN_IF_ERROR(expectArrayOfObjects(spec, "containers", specPath));
  TANDEM_RETURN_IF_ERROR(expectArrayOfObjects(spec, "volumes", specPath));
  if (!spec.contains("containers") || !spec["containers"].is_array()) return Status::Ok();
  for (size_t i = 0; i < spec["containers"].size(); ++i) {
    const json& container = spec["containers"][i];
    const std::string containerPath = specPath + ".containers[" + std::to_string(i) + "]";
    if (container.contains("image") && !container["image"].is_string())
      return TANDEM_ERROR(StatusCode::kInvalidArgument, containerPath + ".image: expected a string");
    for (const char* list : {"command", "args"}) {
      if (container.contains(list) && !container[list].is_array() && !container[list].is_null())
        return TANDEM_ERROR(StatusCode::kInvalidArgument, containerPath + "." + list + ": expected a list");
    }
    for (const char* list : {"env", "ports", "volumeMounts"})
      TANDEM_RETURN_IF_ERROR(expectArrayOfObjects(container, list, containerPath));
    if (container.contains("volumeMounts") && container["volumeMounts"].is_array()) {
      for (const json& mount : container["volumeMounts"])
        if (mount.contains("mountPath") && !mount["mountPath"].is_string())
          return TANDEM_ERROR(StatusCode::kInvalidArgument, containerPath + ".volumeMounts: mountPath must be a string");
    }
  }
  return Status::Ok();
}

json jobLabels(const JobObject& job) { return json{{kJobLabel, job.name}}; }

json objectMeta(const JobObject& job, const std::string& name) {
  return json{{"name", name},
              {"namespace", job.nameSpace},
              {"labels", jobLabels(job)},
              {"ownerReferences", json::array({ownerReference(job)})}};
}

json envValue(const std::string& name, const std::string& value) { return json{{"name", name}, {"value", value}}; }

// DESIGN.md §3, in the order of the contract.
json contractEnvironment(const JobObject& job, int64_t rank, int64_t generation, const std::string& rendezvousSecret) {
  const std::string workers = std::to_string(job.spec.workers);
  const std::string rankText = std::to_string(rank);
  return json::array({
      envValue("TANDEM_JOB", job.nameSpace + "/" + job.name),
      envValue("TANDEM_RANK", rankText),
      envValue("TANDEM_WORLD_SIZE", workers),
      envValue("TANDEM_GENERATION", std::to_string(generation)),
      envValue("TANDEM_RDZV_ENDPOINT", rendezvousEndpoint(job.name, job.nameSpace)),
      json{{"name", "TANDEM_RDZV_TOKEN"},
           {"valueFrom", {{"secretKeyRef", {{"name", rendezvousSecret}, {"key", kTokenKey}}}}}},
      json{{"name", "TANDEM_POD_IP"}, {"valueFrom", {{"fieldRef", {{"fieldPath", "status.podIP"}}}}}},
      envValue("TANDEM_CONFIG", configPath()),
      envValue("MASTER_ADDR", rankZeroAddress(job.name, job.nameSpace)),
      envValue("MASTER_PORT", std::to_string(kMasterPort)),
      envValue("WORLD_SIZE", workers),
      envValue("RANK", rankText),
      envValue("LOCAL_RANK", "0"),  // one process per pod
      envValue("NODE_RANK", rankText),
  });
}

bool hasNamed(const json& list, const std::string& name) {
  for (const json& item : list)
    if (item.value("name", std::string()) == name) return true;
  return false;
}
bool hasPort(const json& ports, int port) {
  for (const json& item : ports)
    if (item.contains("containerPort") && item["containerPort"] == port) return true;
  return false;
}
bool hasMountAt(const json& mounts, const std::string& path) {
  for (const json& item : mounts)
    if (item.value("mountPath", std::string()) == path) return true;
  return false;
}
json& listAt(json& object, const char* key) {
  if (!object.contains(key) || !object[key].is_array()) object[key] = json::array();
  return object[key];
}

}  // namespace

StatusOr<json> parseObjectText(const std::string& text) {
  json parsed = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!parsed.is_discarded()) return parsed;
  try {
    return yamlToJson(YAML::Load(text));
  } catch (const YAML::Exception& error) {
    return TANDEM_ERROR(StatusCode::kInvalidArgument,
                        "line " + std::to_string(error.mark.line + 1) + ": malformed YAML: " + error.msg);
  }
}

StatusOr<json> readPodTemplate(const JobObject& job) {
  StatusOr<json> manifest = parseObjectText(job.manifestText);
  if (!manifest.ok()) return manifest.status().withContext("the job manifest cannot be read: ");
  json podTemplate = json::object();
  if (manifest->is_object() && manifest->contains("spec") && (*manifest)["spec"].is_object()) {
    const json& spec = (*manifest)["spec"];
    if (spec.contains("template") && !spec["template"].is_null()) podTemplate = spec["template"];
  }
  TANDEM_RETURN_IF_ERROR(checkPodTemplate(podTemplate));
  return podTemplate;
}

json ownerReference(const JobObject& job) {
  return json{{"apiVersion", kJobApiVersion}, {"kind", kJobKind},          {"name", job.name},
              {"uid", job.uid},               {"controller", true},        {"blockOwnerDeletion", true}};
}

json buildService(const JobObject& job) {
  json ports = json::array({
      json{{"name", "rendezvous"}, {"port", kRendezvousPort}, {"targetPort", kRendezvousPort}},
      json{{"name", "master"}, {"port", kMasterPort}, {"targetPort", kMasterPort}},
      json{{"name", "metrics"}, {"port", kMetricsPort}, {"targetPort", kMetricsPort}},
  });
  return json{{"apiVersion", "v1"},
              {"kind", "Service"},
              {"metadata", objectMeta(job, serviceName(job.name))},
              {"spec",
               {{"clusterIP", "None"},
                {"selector", jobLabels(job)},
                {"publishNotReadyAddresses", true},
                {"ports", ports}}}};
}

json buildSecret(const JobObject& job, const std::string& name, const std::string& token) {
  return json{{"apiVersion", "v1"},
              {"kind", "Secret"},
              {"metadata", objectMeta(job, name)},
              {"type", "Opaque"},
              {"stringData", {{kTokenKey, token}}}};
}

StatusOr<json> buildConfigMap(const JobObject& job) {
  StatusOr<json> manifest = parseObjectText(job.manifestText);
  if (!manifest.ok()) return manifest.status().withContext("the job manifest cannot be read: ");
  if (!manifest->is_object() || !manifest->contains("spec") || !(*manifest)["spec"].is_object())
    return TANDEM_ERROR(StatusCode::kInvalidArgument, "spec: the job manifest has no spec mapping");
  // Only what the worker's parseManifest reads: no status, no server-side metadata.
  json document{{"apiVersion", kJobApiVersion},
                {"kind", kJobKind},
                {"metadata", {{"name", job.name}, {"namespace", job.nameSpace}}},
                {"spec", (*manifest)["spec"]}};
  json metadata = objectMeta(job, configMapName(job.name));
  metadata["annotations"] = {{kRendezvousSecretAnnotation, secretName(job.name, job.uid)}};
  return json{{"apiVersion", "v1"},
              {"kind", "ConfigMap"},
              {"metadata", std::move(metadata)},
              {"data", {{kConfigKey, document.dump(2) + "\n"}}}};
}

std::string keepRunningSpec(json& jobObject, const json& configMap) {
  const json::json_pointer textAt("/data/" + std::string(kConfigKey));
  if (!configMap.contains(textAt) || !configMap.at(textAt).is_string() || !jobObject.contains("spec") ||
      !jobObject["spec"].is_object())
    return "";
  StatusOr<json> running = parseObjectText(configMap.at(textAt).get<std::string>());
  if (!running.ok() || !running->is_object() || !running->contains("spec") || !(*running)["spec"].is_object()) return "";
  json runningSpec = (*running)["spec"];
  const json& liveSpec = jobObject["spec"];
  std::set<std::string> changed;  // in name order
  for (const json* side : {static_cast<const json*>(&runningSpec), &liveSpec})
    for (const auto& [key, value] : side->items())
      if (key != "runPolicy" && (!runningSpec.contains(key) || !liveSpec.contains(key) || runningSpec[key] != liveSpec[key]))
        changed.insert(key);
  if (changed.empty()) return "";
  std::string ignored;
  for (const std::string& key : changed) ignored += (ignored.empty() ? "spec." : ", spec.") + key;
  if (liveSpec.contains("runPolicy"))
    runningSpec["runPolicy"] = liveSpec["runPolicy"];
  else
    runningSpec.erase("runPolicy");
  jobObject["spec"] = std::move(runningSpec);
  return ignored;
}

bool isCustomMode(const JobObject& job, const json& podTemplate) {
  if (job.spec.model.present) return false;
  if (!podTemplate.contains("spec") || !podTemplate["spec"].is_object()) return false;
  const json& spec = podTemplate["spec"];
  if (!spec.contains("containers") || !spec["containers"].is_array() || spec["containers"].empty()) return false;
  const json& first = spec["containers"][0];
  return first.contains("command") && first["command"].is_array() && !first["command"].empty();
}

json buildWorkerPod(const JobObject& job, const json& podTemplate, int64_t rank, int64_t generation,
                    const std::string& defaultImage, const std::string& rendezvousSecret) {
  const std::string name = workerPodName(job.name, rank);

  // Metadata: the template's labels under ours, our annotations under the template's.
  json metadata = json::object();
  json labels = json::object();
  json annotations{{"prometheus.io/scrape", "true"},
                   {"prometheus.io/port", std::to_string(kMetricsPort)},
                   {"prometheus.io/path", "/metrics"}};
  if (podTemplate.contains("metadata") && podTemplate["metadata"].is_object()) {
    const json& templateMeta = podTemplate["metadata"];
    if (templateMeta.contains("labels") && templateMeta["labels"].is_object()) labels = templateMeta["labels"];
    if (templateMeta.contains("annotations") && templateMeta["annotations"].is_object())
      annotations.update(templateMeta["annotations"]);
  }
  labels[kJobLabel] = job.name;
  labels[kRankLabel] = std::to_string(rank);
  labels[kGenerationLabel] = std::to_string(generation);
  metadata["name"] = name;
  metadata["namespace"] = job.nameSpace;
  metadata["labels"] = labels;
  metadata["annotations"] = annotations;
  metadata["ownerReferences"] = json::array({ownerReference(job)});

  json spec = podTemplate.contains("spec") && podTemplate["spec"].is_object() ? podTemplate["spec"] : json::object();
  spec["restartPolicy"] = "Never";  // the operator restarts whole gangs, never single containers
  spec["hostname"] = workerHostname(job.name, rank);
  spec["subdomain"] = serviceName(job.name);

  json& containers = listAt(spec, "containers");
  if (containers.empty()) containers.push_back(json::object());
  json& worker = containers[0];
  if (!worker.contains("name") || !worker["name"].is_string()) worker["name"] = kWorkerContainerName;
  if (!worker.contains("image") || !worker["image"].is_string() || worker["image"].get<std::string>().empty())
    worker["image"] = defaultImage;
  if (!isCustomMode(job, podTemplate)) worker["command"] = json::array({kWorkerCommand});

  json environment = contractEnvironment(job, rank, generation, rendezvousSecret);
  if (worker.contains("env") && worker["env"].is_array())
    for (const json& item : worker["env"]) environment.push_back(item);  // appended: the user's entries win
  worker["env"] = environment;

  json& ports = listAt(worker, "ports");
  if (!hasPort(ports, kMetricsPort)) ports.push_back({{"name", "metrics"}, {"containerPort", kMetricsPort}});
  if (!hasPort(ports, kRendezvousPort))
    ports.push_back({{"name", "rendezvous"}, {"containerPort", kRendezvousPort}});

  json& volumes = listAt(spec, "volumes");
  json& mounts = listAt(worker, "volumeMounts");
  if (!hasNamed(volumes, kConfigVolumeName))
    volumes.push_back({{"name", kConfigVolumeName}, {"configMap", {{"name", configMapName(job.name)}}}});
  if (!hasMountAt(mounts, kConfigMountPath))
    mounts.push_back({{"name", kConfigVolumeName}, {"mountPath", kConfigMountPath}, {"readOnly", true}});
  const auto& checkpoint = job.spec.checkpoint;
  if (!checkpoint.claimName.empty() && !checkpoint.dir.empty() && !hasMountAt(mounts, checkpoint.dir)) {
    if (!hasNamed(volumes, kCheckpointVolumeName))
      volumes.push_back(
          {{"name", kCheckpointVolumeName}, {"persistentVolumeClaim", {{"claimName", checkpoint.claimName}}}});
    mounts.push_back({{"name", kCheckpointVolumeName}, {"mountPath", checkpoint.dir}});
  }

  // metadata.name and the like in the template cannot override ours: we built metadata from scratch.
  return json{{"apiVersion", "v1"}, {"kind", "Pod"}, {"metadata", metadata}, {"spec", spec}};
}

}  // namespace tandem::operator_core
