#include "tandem/common/cpu_limit.h"

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

namespace tandem {
namespace {

std::optional<std::string> readFirstLine(const std::string& path) {
  std::ifstream file(path);
  std::string line;
  if (!file || !std::getline(file, line)) return std::nullopt;
  return line;
}

// "/a/b/c" -> {"/a/b/c", "/a/b", "/a", ""}: a limit anywhere above a cgroup applies to it.
std::vector<std::string> selfAndAncestors(std::string path) {
  std::vector<std::string> paths;
  while (!path.empty() && path.back() == '/') path.pop_back();
  for (;;) {
    paths.push_back(path);
    const size_t slash = path.rfind('/');
    if (slash == std::string::npos || path.empty()) break;
    path.erase(slash);
  }
  return paths;
}

// cgroup v2: "max 100000" (no limit) or "200000 100000".
std::optional<double> v2Limit(const std::string& directory) {
  auto line = readFirstLine(directory + "/cpu.max");
  if (!line) return std::nullopt;
  std::istringstream fields(*line);
  std::string quota;
  double period = 0;
  if (!(fields >> quota >> period) || quota == "max" || period <= 0) return std::nullopt;
  try {
    return std::stod(quota) / period;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

// cgroup v1: cpu.cfs_quota_us is -1 without a limit.
std::optional<double> v1Limit(const std::string& directory) {
  auto quota = readFirstLine(directory + "/cpu.cfs_quota_us");
  auto period = readFirstLine(directory + "/cpu.cfs_period_us");
  if (!quota || !period) return std::nullopt;
  try {
    const double q = std::stod(*quota), p = std::stod(*period);
    if (q <= 0 || p <= 0) return std::nullopt;
    return q / p;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

void tighten(std::optional<double>& limit, std::optional<double> candidate) {
  if (candidate && (!limit || *candidate < *limit)) limit = candidate;
}

}  // namespace

std::optional<double> cgroupCpuLimit(const std::string& cgroupMount, const std::string& procSelfCgroup) {
  std::ifstream membership(procSelfCgroup);
  std::optional<double> limit;
  std::string line;
  while (std::getline(membership, line)) {
    // "hierarchy-id:controllers:path"; v2 is "0::/path".
    const size_t first = line.find(':'), second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1);
    const std::string path = line.substr(second + 1);
    if (controllers.empty()) {
      // Inside a container the cgroup namespace usually makes its own cgroup the mount's root.
      for (const std::string& ancestor : selfAndAncestors(path)) tighten(limit, v2Limit(cgroupMount + ancestor));
      continue;
    }
    std::istringstream names(controllers);
    std::string name;
    bool cpu = false;
    while (std::getline(names, name, ',')) cpu = cpu || name == "cpu";
    if (!cpu) continue;
    // v1 mounts the cpu controller at cpu,cpuacct (or cpu); without a cgroup namespace the path is the
    // host's and does not exist in the container, whose own cgroup is the mount's root then.
    for (const std::string& mount : {cgroupMount + "/" + controllers, cgroupMount + "/cpu,cpuacct", cgroupMount + "/cpu"})
      for (const std::string& ancestor : selfAndAncestors(path)) tighten(limit, v1Limit(mount + ancestor));
  }
  return limit;
}

int cpusAvailable() {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  // Fails (EINVAL) on kernels built for more CPUs than a cpu_set_t holds: count the online ones then.
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0)
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  return std::max(1, CPU_COUNT(&allowed));
}

int cpusWithin(std::optional<double> limit) {
  const int available = cpusAvailable();
  return limit ? std::clamp(static_cast<int>(std::ceil(*limit - 1e-9)), 1, available) : available;
}

}  // namespace tandem
