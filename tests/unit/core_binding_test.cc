// launch/core_binding: how `tandem run --bind-cores` splits the machine's CPUs between local workers,
// on made-up topologies (with and without hyperthreads) and on this machine's own.
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <set>
#include <thread>

#include "tandem/launch/core_binding.h"

namespace tandem::launch {
namespace {

using Plan = std::vector<std::vector<int>>;

// cores physical cores; with hyperthreads, core c has CPUs c and c + cores (Linux's usual numbering).
CpuTopology machine(int cores, bool hyperthreads) {
  CpuTopology topology;
  for (int c = 0; c < cores; ++c) topology.cpus.push_back({c, c});
  if (hyperthreads)
    for (int c = 0; c < cores; ++c) topology.cpus.push_back({cores + c, c});
  return topology;
}

Plan planOf(const CpuTopology& topology, int workers) {
  auto plan = planCoreBinding(topology, workers);
  EXPECT_TRUE(plan.ok()) << plan.status().message();
  Plan cpus;
  if (plan.ok())
    for (const CoreSet& set : *plan) {
      EXPECT_EQ(set.cores, physicalCoresIn(topology, set.cpus));
      cpus.push_back(set.cpus);
    }
  return cpus;
}

TEST(CoreBinding, WholeCoresWithTheirHyperthreadsWhenThereAreEnough) {
  const CpuTopology eightBySmt = machine(8, true);  // CPUs 0-15, core c = {c, c + 8}
  EXPECT_EQ(planOf(eightBySmt, 2), (Plan{{0, 1, 2, 3, 8, 9, 10, 11}, {4, 5, 6, 7, 12, 13, 14, 15}}));
  EXPECT_EQ(planOf(eightBySmt, 4), (Plan{{0, 1, 8, 9}, {2, 3, 10, 11}, {4, 5, 12, 13}, {6, 7, 14, 15}}));
  const Plan eight = planOf(eightBySmt, 8);
  for (int w = 0; w < 8; ++w) EXPECT_EQ(eight[w], (std::vector<int>{w, w + 8}));
  for (int w = 0; w < 4; ++w) EXPECT_EQ(physicalCoresIn(eightBySmt, planOf(eightBySmt, 4)[w]), 2);
}

TEST(CoreBinding, EqualSharesLeaveTheRemainderUnused) {
  // 3 workers on 8 cores: 2 cores each (equal stages), cores 6 and 7 left free.
  EXPECT_EQ(planOf(machine(8, false), 3), (Plan{{0, 1}, {2, 3}, {4, 5}}));
}

TEST(CoreBinding, MoreWorkersThanCoresShareCoresAsHyperthreads) {
  // 2 cores x 2 threads, 4 workers: one hyperthread each, neighbouring ranks on one core.
  EXPECT_EQ(planOf(machine(2, true), 4), (Plan{{0}, {2}, {1}, {3}}));
  EXPECT_EQ(planOf(machine(2, false), 2), (Plan{{0}, {1}}));
}

TEST(CoreBinding, MoreWorkersThanCpusIsAnErrorNamingTheFlag) {
  auto plan = planCoreBinding(machine(2, false), 3);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(plan.status().message().find("--bind-cores: 3 workers but only 2 CPUs available to tandem (0-1)"),
            std::string::npos)
      << plan.status().message();
}

TEST(CoreBinding, UnevenCpuNumbersKeepEveryCoreTogether) {
  // A cgroup that allows CPUs 2, 3, 6, 7 of a 4-core SMT machine: cores 2 and 3.
  CpuTopology topology;
  topology.cpus = {{2, 2}, {3, 3}, {6, 2}, {7, 3}};
  EXPECT_EQ(planOf(topology, 2), (Plan{{2, 6}, {3, 7}}));
}

TEST(CoreBinding, DescribesCpuListsAsRanges) {
  EXPECT_EQ(describeCpuList({0}), "0");
  EXPECT_EQ(describeCpuList({3, 0, 1, 2, 8, 10, 11}), "0-3,8,10-11");
  EXPECT_EQ(describeCpuList({}), "");
}

TEST(CoreBinding, ThisMachineSplitsIntoDisjointSetsOfItsOwnCpus) {
  auto topology = readCpuTopology();
  ASSERT_TRUE(topology.ok()) << topology.status().message();
  ASSERT_FALSE(topology->cpus.empty());
  std::set<int> allowed;
  for (const auto& cpu : topology->cpus) allowed.insert(cpu.id);
  const int workers = static_cast<int>(allowed.size());
  std::set<int> used;
  for (const auto& cpus : planOf(*topology, workers)) {
    ASSERT_FALSE(cpus.empty());
    for (const int cpu : cpus) {
      EXPECT_TRUE(allowed.count(cpu)) << cpu;
      EXPECT_TRUE(used.insert(cpu).second) << "CPU " << cpu << " given twice";
    }
  }
  EXPECT_FALSE(planCoreBinding(*topology, workers + 1).ok());
}

TEST(ThreadPlacement, TheComputeThreadGetsTheHighestCpuAndTheOthersTheRestOffItsCore) {
  const auto fourCores = planThreadPlacement(machine(4, false));
  ASSERT_TRUE(fourCores.has_value());
  EXPECT_EQ(fourCores->computeCpu, 3);
  EXPECT_EQ(fourCores->otherCpus, (std::vector<int>{0, 1, 2}));
  // A --bind-cores set of two cores with their hyperthreads: CPU 1, CPU 9's sibling, is left alone.
  CpuTopology twoCoresSmt;
  twoCoresSmt.cpus = {{0, 0}, {1, 1}, {8, 0}, {9, 1}};
  const auto smt = planThreadPlacement(twoCoresSmt);
  ASSERT_TRUE(smt.has_value());
  EXPECT_EQ(smt->computeCpu, 9);
  EXPECT_EQ(smt->otherCpus, (std::vector<int>{0, 8}));
  // One core's two hyperthreads: the sibling is all there is for the other threads.
  CpuTopology oneCoreSmt;
  oneCoreSmt.cpus = {{5, 2}, {13, 2}};
  const auto sibling = planThreadPlacement(oneCoreSmt);
  ASSERT_TRUE(sibling.has_value());
  EXPECT_EQ(sibling->computeCpu, 13);
  EXPECT_EQ(sibling->otherCpus, (std::vector<int>{5}));
  CpuTopology one;
  one.cpus = {{3, 3}};
  EXPECT_FALSE(planThreadPlacement(one).has_value());
}

std::set<int> affinityOf(pid_t tid) {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::set<int> cpus;
  if (sched_getaffinity(tid, sizeof(set), &set) != 0) return cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
    if (CPU_ISSET(cpu, &set)) cpus.insert(cpu);
  return cpus;
}

// In a child process, so that the test binary's own threads keep their CPUs: a thread started before
// placeThreads ends up on the other CPUs, the calling thread on its CPU alone.
TEST(ThreadPlacement, PlacesThisProcesssThreadsOnThisMachine) {
  auto topology = readCpuTopology();
  ASSERT_TRUE(topology.ok()) << topology.status().message();
  if (topology->cpus.size() < 2) GTEST_SKIP() << "needs a machine with two CPUs";
  const auto placement = planThreadPlacement(*topology);
  ASSERT_TRUE(placement.has_value());
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    std::atomic<pid_t> helperTid{0};
    std::atomic<bool> done{false};
    std::thread helper([&] {
      helperTid = static_cast<pid_t>(syscall(SYS_gettid));
      while (!done) usleep(1000);
    });
    while (helperTid == 0) usleep(1000);
    int code = 0;
    if (!placeThreads(*placement).ok()) code = 1;
    else if (affinityOf(0) != std::set<int>{placement->computeCpu}) code = 2;
    else if (affinityOf(helperTid) != std::set<int>(placement->otherCpus.begin(), placement->otherCpus.end())) code = 3;
    done = true;
    helper.join();
    _exit(code);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: placeThreads failed, 2: the calling thread is not on CPU "
                                    << placement->computeCpu << " alone, 3: the other thread is not on CPUs "
                                    << describeCpuList(placement->otherCpus);
}

}  // namespace
}  // namespace tandem::launch
