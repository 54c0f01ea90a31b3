// parallel/pipeline_schedule: rank layout, FLOP-balanced contiguous partitions, GPipe and 1F1B operation
// orders (table-tested), the 1F1B in-flight bound, and Communicator::split over Gloo threads.
#include <gtest/gtest.h>

#include <thread>

#include "gloo_ranks.h"
#include "tandem/comm/communicator.h"
#include "tandem/parallel/pipeline_schedule.h"

namespace tandem::parallel {
namespace {

TEST(PipelineLayout, RankIsReplicaTimesStagesPlusStage) {
  EXPECT_EQ(positionOf(0, 2).replica, 0);
  EXPECT_EQ(positionOf(3, 2).replica, 1);
  EXPECT_EQ(positionOf(3, 2).stage, 1);
  EXPECT_EQ(rankOf(1, 0, 4), 4);
  for (int rank = 0; rank < 12; ++rank) {
    const auto position = positionOf(rank, 3);
    EXPECT_EQ(rankOf(position.replica, position.stage, 3), rank);
  }
}

TEST(PartitionLayers, MinimisesTheLargestStage) {
  // The example mlp with extra layers, costs = multiply-adds per sample.
  const std::vector<double> costs{784.0 * 512, 512.0 * 512, 512.0 * 512, 512.0 * 512, 512.0 * 10};
  EXPECT_EQ(partitionLayers(costs, 1), (std::vector<size_t>{0}));
  EXPECT_EQ(partitionLayers(costs, 2), (std::vector<size_t>{0, 2}));        // 663k | 529k
  EXPECT_EQ(partitionLayers(costs, 4), (std::vector<size_t>{0, 1, 2, 3}));  // the big first layer alone
  EXPECT_EQ(partitionLayers(costs, 5), (std::vector<size_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(partitionLayers({1, 1, 1, 1, 1, 1}, 3), (std::vector<size_t>{0, 2, 4}));
  EXPECT_EQ(partitionLayers({10, 1, 1, 1, 1, 1}, 2), (std::vector<size_t>{0, 1}));
}

struct ScheduleCase {
  std::string kind;
  int stages, stage, microBatches;
  std::string expected;
};

class Schedules : public ::testing::TestWithParam<ScheduleCase> {};

TEST_P(Schedules, MatchTheTable) {
  const auto& c = GetParam();
  EXPECT_EQ(describeSchedule(pipelineSchedule(c.kind, c.stages, c.stage, c.microBatches)), c.expected);
}

INSTANTIATE_TEST_SUITE_P(
    Table, Schedules,
    ::testing::Values(ScheduleCase{"GPipe", 2, 0, 3, "F0 F1 F2 B0 B1 B2"}, ScheduleCase{"GPipe", 4, 3, 2, "F0 F1 B0 B1"},
                      ScheduleCase{"1F1B", 1, 0, 3, "F0 B0 F1 B1 F2 B2"},
                      ScheduleCase{"1F1B", 2, 0, 4, "F0 F1 B0 F2 B1 F3 B2 B3"},
                      ScheduleCase{"1F1B", 2, 1, 4, "F0 B0 F1 B1 F2 B2 F3 B3"},
                      ScheduleCase{"1F1B", 4, 0, 8, "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7"},
                      ScheduleCase{"1F1B", 4, 2, 8, "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7"},
                      ScheduleCase{"1F1B", 4, 0, 2, "F0 F1 B0 B1"}),
    [](const auto& info) { return info.param.kind == "GPipe" ? "GPipe" + std::to_string(info.index) : "OneFOneB" + std::to_string(info.index); });

TEST(Schedules, EveryMicrobatchForwardOnceThenBackwardOnce) {
  for (const std::string kind : {"GPipe", "1F1B"})
    for (int stages : {1, 2, 3, 4, 8})
      for (int stage = 0; stage < stages; ++stage)
        for (int micro : {1, 2, 3, 4, 7, 16}) {
          const auto ops = pipelineSchedule(kind, stages, stage, micro);
          ASSERT_EQ(ops.size(), static_cast<size_t>(2 * micro));
          std::vector<int> forwardAt(micro, -1), backwardAt(micro, -1);
          for (size_t i = 0; i < ops.size(); ++i)
            (ops[i].kind == PipelineOpKind::kForward ? forwardAt : backwardAt)[ops[i].microBatch] = static_cast<int>(i);
          for (int m = 0; m < micro; ++m) {
            EXPECT_GE(forwardAt[m], 0);
            EXPECT_GT(backwardAt[m], forwardAt[m]) << kind << " stage " << stage << " microbatch " << m;
            if (m > 0) {
              EXPECT_GT(backwardAt[m], backwardAt[m - 1]) << "backwards run in microbatch order";
            }
          }
        }
}

TEST(Schedules, OneFOneBHoldsAtMostStagesMinusStageMicrobatches) {
  for (int stages : {2, 4, 8})
    for (int stage = 0; stage < stages; ++stage)
      for (int micro : {1, 4, 16, 32}) {
        EXPECT_LE(peakMicroBatchesInFlight(pipelineSchedule("1F1B", stages, stage, micro)), stages - stage);
        EXPECT_EQ(peakMicroBatchesInFlight(pipelineSchedule("1F1B", stages, stage, micro)),
                  std::min(stages - stage, micro));
        EXPECT_EQ(peakMicroBatchesInFlight(pipelineSchedule("GPipe", stages, stage, micro)), micro);
      }
}

TEST(Split, GroupsRanksByColorOrderedByKey) {
  constexpr int kRanks = 4;
  auto worlds = test_support::connectGlooRanks(kRanks);
  ASSERT_EQ(worlds.size(), static_cast<size_t>(kRanks));
  std::vector<std::vector<float>> stageSums(kRanks), replicaSums(kRanks);
  std::vector<int> stageRanks(kRanks), stageSizes(kRanks);
  test_support::runRanks(worlds, [&](int rank, comm::Communicator& world) {
    const auto position = positionOf(rank, 2);  // 2 stages x 2 replicas
    auto byStage = world.split(position.stage, position.replica);
    ASSERT_TRUE(byStage.ok()) << byStage.status().toString();
    auto byReplica = world.split(position.replica, position.stage);
    ASSERT_TRUE(byReplica.ok()) << byReplica.status().toString();
    stageRanks[rank] = (*byStage)->rank();
    stageSizes[rank] = (*byStage)->size();
    std::vector<float> value{static_cast<float>(rank + 1)};
    ASSERT_TRUE((*byStage)->allReduce(value.data(), 1).ok());
    stageSums[rank] = value;
    value = {static_cast<float>(10 * (rank + 1))};
    ASSERT_TRUE((*byReplica)->allReduce(value.data(), 1).ok());
    replicaSums[rank] = value;
  });
  // Stage 0 = ranks 0 and 2, stage 1 = ranks 1 and 3; replica 0 = ranks 0, 1; replica 1 = ranks 2, 3.
  EXPECT_EQ(stageSums[0][0], 1 + 3);
  EXPECT_EQ(stageSums[2][0], 1 + 3);
  EXPECT_EQ(stageSums[1][0], 2 + 4);
  EXPECT_EQ(replicaSums[0][0], 10 + 20);
  EXPECT_EQ(replicaSums[3][0], 30 + 40);
  EXPECT_EQ(stageRanks, (std::vector<int>{0, 0, 1, 1}));
  EXPECT_EQ(stageSizes, (std::vector<int>{2, 2, 2, 2}));
}

}  // namespace
}  // namespace tandem::parallel
