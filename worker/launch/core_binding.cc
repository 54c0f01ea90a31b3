#include "tandem/launch/core_binding.h"

#include <dirent.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include <algorithm>
#include <fstream>
#include <map>
#include <set>

namespace tandem::launch {
namespace {

// An integer from a one-line sysfs file, or -1.
int readSysfsInt(const std::string& path) {
  std::ifstream file(path);
  int value = -1;
  if (!(file >> value)) return -1;
  return value;
}

// Physical cores in the order of their lowest CPU; each core's CPUs ascending.
std::vector<std::vector<int>> coresOf(const CpuTopology& topology) {
  std::map<int, std::vector<int>> byKey;
  for (const auto& cpu : topology.cpus) byKey[cpu.coreKey].push_back(cpu.id);
  std::vector<std::vector<int>> cores;
  for (auto& [key, cpus] : byKey) {
    std::sort(cpus.begin(), cpus.end());
    cores.push_back(cpus);
  }
  std::sort(cores.begin(), cores.end());
  return cores;
}

}  // namespace

cpu_set_t cpuSetOf(const std::vector<int>& cpus) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (const int cpu : cpus) CPU_SET(cpu, &set);
  return set;
}

std::optional<ThreadPlacement> planThreadPlacement(const CpuTopology& topology) {
  if (topology.cpus.size() < 2) return std::nullopt;
  const auto highest = std::max_element(topology.cpus.begin(), topology.cpus.end(),
                                        [](const CpuTopology::Cpu& a, const CpuTopology::Cpu& b) { return a.id < b.id; });
  ThreadPlacement placement;
  placement.computeCpu = highest->id;
  // Another core first: a hyperthread sibling shares the compute thread's caches and execution units.
  for (const auto& cpu : topology.cpus)
    if (cpu.coreKey != highest->coreKey) placement.otherCpus.push_back(cpu.id);
  if (placement.otherCpus.empty())
    for (const auto& cpu : topology.cpus)
      if (cpu.id != highest->id) placement.otherCpus.push_back(cpu.id);
  std::sort(placement.otherCpus.begin(), placement.otherCpus.end());
  return placement;
}

Status placeThreads(const ThreadPlacement& placement) {
  const pid_t self = static_cast<pid_t>(syscall(SYS_gettid));
  const cpu_set_t others = cpuSetOf(placement.otherCpus);
  DIR* tasks = opendir("/proc/self/task");
  if (tasks == nullptr)
    return TANDEM_ERROR(StatusCode::kInternal, std::string("/proc/self/task: ") + std::strerror(errno));
  Status status = Status::Ok();
  while (const dirent* entry = readdir(tasks)) {
    const pid_t tid = static_cast<pid_t>(std::atoi(entry->d_name));
    if (tid <= 0 || tid == self) continue;
    // ESRCH: the thread ended since the listing; nothing to place.
    if (sched_setaffinity(tid, sizeof(others), &others) != 0 && errno != ESRCH) {
      const std::string reason = std::strerror(errno);  // before the allocations below
      status = TANDEM_ERROR(StatusCode::kInternal, "cannot move thread " + std::to_string(tid) + " to CPUs " +
                                                       describeCpuList(placement.otherCpus) + ": " + reason);
      break;
    }
  }
  closedir(tasks);
  TANDEM_RETURN_IF_ERROR(status);
  const cpu_set_t compute = cpuSetOf({placement.computeCpu});
  if (sched_setaffinity(0, sizeof(compute), &compute) != 0) {
    const std::string reason = std::strerror(errno);
    return TANDEM_ERROR(StatusCode::kInternal, "cannot bind the compute thread to CPU " +
                                                   std::to_string(placement.computeCpu) + ": " + reason);
  }
  return Status::Ok();
}

StatusOr<CpuTopology> readCpuTopology() {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0)
    return TANDEM_ERROR(StatusCode::kInternal, "--bind-cores: cannot read this process's CPU affinity");
  CpuTopology topology;
  for (int id = 0; id < CPU_SETSIZE; ++id) {
    if (!CPU_ISSET(id, &allowed)) continue;
    const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(id) + "/topology/";
    const int core = readSysfsInt(base + "core_id");
    const int package = readSysfsInt(base + "physical_package_id");
    // Unknown topology: a core of its own, keyed apart from every real (package, core) pair.
    const int key = core < 0 ? -1 - id : std::max(package, 0) * 65536 + core;
    topology.cpus.push_back({id, key});
  }
  return topology;
}

StatusOr<std::vector<CoreSet>> planCoreBinding(const CpuTopology& topology, int workers) {
  const std::vector<std::vector<int>> cores = coresOf(topology);
  const int cpuCount = static_cast<int>(topology.cpus.size());
  std::vector<int> ids;
  for (const auto& cpu : topology.cpus) ids.push_back(cpu.id);
  std::vector<CoreSet> plan(workers);
  if (workers <= static_cast<int>(cores.size())) {
    const size_t perWorker = cores.size() / workers;
    for (int w = 0; w < workers; ++w)
      for (size_t c = w * perWorker; c < (w + 1) * perWorker; ++c)
        plan[w].cpus.insert(plan[w].cpus.end(), cores[c].begin(), cores[c].end());
  } else if (workers <= cpuCount) {
    // Fewer cores than workers: hyperthreads of one core go to neighbouring ranks.
    std::vector<int> ordered;
    for (const auto& core : cores) ordered.insert(ordered.end(), core.begin(), core.end());
    const size_t perWorker = ordered.size() / workers;
    for (int w = 0; w < workers; ++w)
      plan[w].cpus.assign(ordered.begin() + w * perWorker, ordered.begin() + (w + 1) * perWorker);
  } else {
    return TANDEM_ERROR(StatusCode::kInvalidArgument,
                        "--bind-cores: " + std::to_string(workers) + " workers but only " + std::to_string(cpuCount) +
                            " CPUs available to tandem (" + describeCpuList(ids) +
                            "); run fewer workers or drop --bind-cores");
  }
  for (auto& set : plan) {
    std::sort(set.cpus.begin(), set.cpus.end());
    set.cores = physicalCoresIn(topology, set.cpus);
  }
  return plan;
}

std::string describeCpuList(const std::vector<int>& cpus) {
  std::vector<int> sorted(cpus);
  std::sort(sorted.begin(), sorted.end());
  std::string text;
  for (size_t i = 0; i < sorted.size();) {
    size_t j = i;
    while (j + 1 < sorted.size() && sorted[j + 1] == sorted[j] + 1) ++j;
    if (!text.empty()) text += ",";
    text += std::to_string(sorted[i]);
    if (j > i) {
      text += '-';
      text += std::to_string(sorted[j]);
    }
    i = j + 1;
  }
  return text;
}

int physicalCoresIn(const CpuTopology& topology, const std::vector<int>& cpus) {
  std::set<int> keys;
  for (const auto& cpu : topology.cpus)
    if (std::find(cpus.begin(), cpus.end(), cpu.id) != cpus.end()) keys.insert(cpu.coreKey);
  return static_cast<int>(keys.size());
}

}  // namespace tandem::launch
