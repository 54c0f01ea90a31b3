// `tandem run --bind-cores`: each local worker gets its own CPUs, so workers do not share a core (or
// a core's hyperthreads) and the scheduler does not move them about. Pipeline stages wait on each
// other every microbatch, so a stage slowed by a neighbour on its core slows the whole pipeline.
#pragma once

#include <string>
#include <vector>

#include "tandem/common/status.h"

namespace tandem::launch {

// The CPUs this process may use, each with the physical core it belongs to (hyperthreads of one
// core share a coreKey).
struct CpuTopology {
  struct Cpu {
    int id = 0;
    int coreKey = 0;
  };
  std::vector<Cpu> cpus;
};

// Reads sched_getaffinity and /sys/devices/system/cpu/cpu<N>/topology; where sysfs says nothing, each
// CPU counts as its own core.
StatusOr<CpuTopology> readCpuTopology();

// The CPUs one worker runs on, and how many physical cores they span (its GEMM threads).
struct CoreSet {
  std::vector<int> cpus;
  int cores = 0;
};

// One CPU set per worker, disjoint and equal in size: whole physical cores when there are at least as
// many as workers (cores / workers each, the rest left unused so that stages stay equal), else single
// hyperthreads. Fails, naming --bind-cores, when there are fewer CPUs than workers.
StatusOr<std::vector<CoreSet>> planCoreBinding(const CpuTopology& topology, int workers);

// "0-3,8,10-11"
std::string describeCpuList(const std::vector<int>& cpus);

// How many physical cores of topology a set spans (the GEMM threads a bound worker should use).
int physicalCoresIn(const CpuTopology& topology, const std::vector<int>& cpus);

}  // namespace tandem::launch
