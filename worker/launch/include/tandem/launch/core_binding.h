// `tandem run --bind-cores`: each local worker gets its own CPUs, so workers do not share a core (or
// a core's hyperthreads) and the scheduler does not move them about. Pipeline stages wait on each
// other every microbatch, so a stage slowed by a neighbour on its core slows the whole pipeline.
#pragma once

#include <sched.h>

#include <optional>
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

// Inside a bound worker with one GEMM thread: the thread that runs forwards and backwards gets one CPU to
// itself, and every other thread of the process (the gradient sums, checkpoint writes, the transport's
// and gRPC's threads) the rest of the set, off that CPU's physical core where the set has other cores.
// Left to the scheduler, the summing thread can land on the compute thread's core (the 2-core VM showed
// it), and a pipeline waits on its slowest stage at every hop. On the GPU machine's 16 cores it made no
// measurable difference to the bubble (BENCHMARKS.md §3); it only rules that out.
struct ThreadPlacement {
  int computeCpu = 0;
  std::vector<int> otherCpus;
};
// The set's highest CPU computes: the lowest is the likelier to be CPU 0, which takes the device
// interrupts Linux does not spread. nullopt when the set has a single CPU: nothing to separate.
std::optional<ThreadPlacement> planThreadPlacement(const CpuTopology& topology);
// The calling thread to computeCpu, every other thread of this process to otherCpus. Threads the
// calling thread starts later inherit computeCpu alone: call it once the process's threads are running.
Status placeThreads(const ThreadPlacement& placement);

// A cpu_set_t of these CPUs, for sched_setaffinity.
cpu_set_t cpuSetOf(const std::vector<int>& cpus);

// "0-3,8,10-11"
std::string describeCpuList(const std::vector<int>& cpus);

// How many physical cores of topology a set spans (the GEMM threads a bound worker should use).
int physicalCoresIn(const CpuTopology& topology, const std::vector<int>& cpus);

}  // namespace tandem::launch
