// launch/core_binding: how `tandem run --bind-cores` splits the machine's CPUs between local workers,
// on made-up topologies (with and without hyperthreads) and on this machine's own.
#include <gtest/gtest.h>

#include <set>

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

}  // namespace
}  // namespace tandem::launch
