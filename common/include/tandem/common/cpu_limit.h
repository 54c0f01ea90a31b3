// How much CPU this process may really use. A container's CPU limit is a CFS quota, not fewer CPUs:
// the process still sees every CPU of the node, and a GEMM library that starts a thread per CPU on a
// 64-core node under a 2-CPU limit is throttled most of each period.
#pragma once

#include <optional>
#include <string>

namespace tandem {

// The CPU limit of this process's cgroup in CPUs (quota / period), the tightest along the cgroup's path
// up to the root: cgroup v2 cpu.max, else v1 cpu.cfs_quota_us and cpu.cfs_period_us. nullopt when no
// level has a limit or nothing can be read. The paths are parameters for tests.
std::optional<double> cgroupCpuLimit(const std::string& cgroupMount = "/sys/fs/cgroup",
                                     const std::string& procSelfCgroup = "/proc/self/cgroup");

// CPUs in this process's affinity mask.
int cpusAvailable();

// The CPUs this process may really use: its affinity mask, within a cgroup `limit` (rounded up, at
// least 1) when there is one.
int cpusWithin(std::optional<double> limit);

}  // namespace tandem
