// parallel: planGradientBuckets on mlps (disjoint, contiguous, covering every parameter and the trailing
// slots, in reverse layer order, within the cap except for one oversized layer) and BucketedAllReduce
// summing gradients of 2 thread ranks over Gloo (closed form), driven by a real backward's hook.
#include <gtest/gtest.h>

#include <memory>
#include <thread>
#include <vector>

#include "tandem/comm/communicator.h"
#include "tandem/model/sequential.h"
#include "tandem/parallel/data_parallel.h"

namespace tandem::parallel {
namespace {

using model::ActivationKind;
using model::buildMlp;

// Checks every invariant a bucket plan promises for `network` under `cap`.
void expectValidPlan(const model::Sequential& network, const std::vector<GradientBucket>& buckets, int64_t cap) {
  ASSERT_FALSE(buckets.empty());
  const int64_t total = network.parameterCount() + network.trailingGradientSlotCount();
  // Reverse layer order: bucket 0 holds the last layer (plus the trailing slots), the last bucket layer 0.
  EXPECT_EQ(buckets.front().lastLayer, network.layerCount() - 1);
  EXPECT_EQ(buckets.back().firstLayer, 0u);
  // Read from the end of the buffer backwards, the buckets tile [0, total) with no gap or overlap.
  int64_t end = total;
  size_t nextLastLayer = network.layerCount() - 1;
  for (size_t i = 0; i < buckets.size(); ++i) {
    const GradientBucket& bucket = buckets[i];
    SCOPED_TRACE("bucket " + std::to_string(i));
    EXPECT_EQ(bucket.lastLayer, nextLastLayer);
    EXPECT_LE(bucket.firstLayer, bucket.lastLayer);
    EXPECT_EQ(bucket.offset + bucket.count, end);
    EXPECT_GT(bucket.count, 0);
    // The bucket's range is exactly its layers' parameters (and, for bucket 0, the trailing slots).
    const int64_t begin = network.parameterRange(bucket.firstLayer).first;
    EXPECT_EQ(bucket.offset, begin);
    int64_t parameters = 0, layersWithParameters = 0;
    for (size_t layer = bucket.firstLayer; layer <= bucket.lastLayer; ++layer) {
      parameters += network.parameterRange(layer).second;
      layersWithParameters += network.parameterRange(layer).second > 0;
    }
    EXPECT_EQ(bucket.count, parameters + (i == 0 ? network.trailingGradientSlotCount() : 0));
    if (layersWithParameters > 1) {
      EXPECT_LE(parameters, cap) << "several layers exceed the cap together";
    }
    end = bucket.offset;
    nextLastLayer = bucket.firstLayer - 1;
  }
  EXPECT_EQ(end, 0);
}

TEST(PlanGradientBuckets, LargeCapGivesOneBucketCoveringEverything) {
  auto network = buildMlp(8, {6, 4}, 3, ActivationKind::kRelu, /*trailingGradientSlots=*/1);
  const auto buckets = planGradientBuckets(*network, 1 << 20);
  ASSERT_EQ(buckets.size(), 1u);
  EXPECT_EQ(buckets[0].firstLayer, 0u);
  EXPECT_EQ(buckets[0].lastLayer, 4u);
  EXPECT_EQ(buckets[0].offset, 0);
  EXPECT_EQ(buckets[0].count, network->parameterCount() + 1);
  expectValidPlan(*network, buckets, 1 << 20);
}

TEST(PlanGradientBuckets, SmallCapGivesOneBucketPerLinearLayerInReverseOrder) {
  // Layers: linear(8->6) 54, relu, linear(6->4) 28, relu, linear(4->3) 15.
  auto network = buildMlp(8, {6, 4}, 3, ActivationKind::kRelu, /*trailingGradientSlots=*/2);
  const auto buckets = planGradientBuckets(*network, 30);
  ASSERT_EQ(buckets.size(), 3u);
  expectValidPlan(*network, buckets, 30);
  // Each activation rides with the linear layer after it (its backward finishes first).
  EXPECT_EQ(buckets[0].firstLayer, 3u);
  EXPECT_EQ(buckets[0].lastLayer, 4u);
  EXPECT_EQ(buckets[0].count, 15 + 2);
  EXPECT_EQ(buckets[1].firstLayer, 1u);
  EXPECT_EQ(buckets[1].lastLayer, 2u);
  EXPECT_EQ(buckets[1].count, 28);
  EXPECT_EQ(buckets[2].firstLayer, 0u);
  EXPECT_EQ(buckets[2].lastLayer, 0u);
  EXPECT_EQ(buckets[2].count, 54);  // oversized (54 > 30): a bucket of its own
}

TEST(PlanGradientBuckets, SmallLayersShareABucketUpToTheCap) {
  // linear(2->3) 9, relu, linear(3->3) 12, relu, linear(3->3) 12, relu, linear(3->2) 8.
  auto network = buildMlp(2, {3, 3, 3}, 2, ActivationKind::kGelu);
  const auto buckets = planGradientBuckets(*network, 25);
  expectValidPlan(*network, buckets, 25);
  // From the back: 8 + 12 = 20 (adding 12 more would pass 25), then 12 + 9 = 21.
  ASSERT_EQ(buckets.size(), 2u);
  EXPECT_EQ(buckets[0].count, 20);
  EXPECT_EQ(buckets[1].count, 21);
}

TEST(PlanGradientBuckets, InvariantsHoldForManyCaps) {
  auto network = buildMlp(20, {16, 1, 12, 7}, 5, ActivationKind::kRelu, /*trailingGradientSlots=*/3);
  for (int64_t cap : {1, 2, 10, 17, 50, 100, 200, 336, 400, 1000, 100000}) {
    SCOPED_TRACE("cap " + std::to_string(cap));
    expectValidPlan(*network, planGradientBuckets(*network, cap), cap);
  }
}

// Two ranks, one mlp each (same initialisation), different inputs: the bucketed all-reduce launched from
// backward's hook leaves every rank with the sum of both ranks' gradients, trailing slots included.
TEST(BucketedAllReduce, SumsGradientsOfTwoRanks) {
  constexpr int kRanks = 2;
  auto store = comm::makeMemoryStore();
  std::vector<std::unique_ptr<comm::Communicator>> communicators(kRanks);
  std::vector<std::unique_ptr<model::Sequential>> networks(kRanks);
  std::vector<std::vector<float>> localGradients(kRanks);
  std::vector<int64_t> bytesReduced(kRanks, 0);
  std::vector<size_t> bucketCounts(kRanks, 0);

  std::vector<std::thread> threads;
  for (int rank = 0; rank < kRanks; ++rank) {
    threads.emplace_back([&, rank] {
      comm::GlooOptions options;
      options.rank = rank;
      options.size = kRanks;
      options.timeout = std::chrono::seconds(20);
      auto communicator = comm::createGlooCommunicator(options, store);
      ASSERT_TRUE(communicator.ok()) << communicator.status().toString();
      communicators[rank] = std::move(communicator).value();

      auto& network = networks[rank];
      network = buildMlp(6, {5, 4}, 3, ActivationKind::kGelu, /*trailingGradientSlots=*/1);
      network->initialize(17);
      Tensor input({3, 6});
      for (int64_t i = 0; i < input.size(); ++i) input.data()[i] = 0.1f * static_cast<float>((i * (rank + 2)) % 11) - 0.4f;
      const Tensor& output = network->forward(input);
      Tensor gradOutput(output.shape());
      for (int64_t i = 0; i < gradOutput.size(); ++i) gradOutput.data()[i] = (rank == 0 ? 1.0f : -0.5f) * (1 + i % 3);

      // What this rank's gradients would be without communication.
      network->zeroGradients();
      network->trailingGradientSlots()[0] = static_cast<float>(rank + 1);
      network->backward(gradOutput);
      const int64_t total = network->parameterCount() + 1;
      localGradients[rank].assign(network->gradients(), network->gradients() + total);

      // The same backward with the all-reduce hooked in; a cap small enough for several buckets.
      network->zeroGradients();
      network->trailingGradientSlots()[0] = static_cast<float>(rank + 1);
      BucketedAllReduce reducer(*network, communicators[rank].get(), /*capFloats=*/25);
      network->backward(gradOutput, [&](size_t layer) { reducer.onLayerDone(layer); });
      const Status status = reducer.finish();
      ASSERT_TRUE(status.ok()) << "rank " << rank << ": " << status.toString();
      bytesReduced[rank] = reducer.bytesReduced();
      bucketCounts[rank] = reducer.buckets().size();
    });
  }
  for (auto& thread : threads) thread.join();
  ASSERT_TRUE(networks[0] && networks[1] && !localGradients[0].empty() && !localGradients[1].empty());

  const int64_t total = networks[0]->parameterCount() + 1;
  EXPECT_GT(bucketCounts[0], 1u);
  for (int rank = 0; rank < kRanks; ++rank) {
    EXPECT_EQ(bytesReduced[rank], total * static_cast<int64_t>(sizeof(float)));
    const float* reduced = networks[rank]->gradients();
    for (int64_t i = 0; i < total; ++i)
      EXPECT_NEAR(reduced[i], localGradients[0][i] + localGradients[1][i], 1e-5) << "rank " << rank << " slot " << i;
  }
  // Trailing slot: 1 + 2.
  EXPECT_EQ(networks[0]->trailingGradientSlots()[0], 3.0f);
  EXPECT_EQ(networks[1]->trailingGradientSlots()[0], 3.0f);
}

// Closed form: rank r fills every gradient with r + 1 and reports every layer done; each slot ends at 3.
TEST(BucketedAllReduce, ClosedFormSumOverGloo) {
  constexpr int kRanks = 2;
  auto store = comm::makeMemoryStore();
  std::vector<std::vector<float>> results(kRanks);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < kRanks; ++rank) {
    threads.emplace_back([&, rank] {
      comm::GlooOptions options;
      options.rank = rank;
      options.size = kRanks;
      options.timeout = std::chrono::seconds(20);
      auto communicator = comm::createGlooCommunicator(options, store);
      ASSERT_TRUE(communicator.ok()) << communicator.status().toString();
      auto network = buildMlp(30, {20, 10}, 4, ActivationKind::kRelu, /*trailingGradientSlots=*/2);
      const int64_t total = network->parameterCount() + 2;
      for (int64_t i = 0; i < total; ++i) network->gradients()[i] = static_cast<float>((rank + 1) * (1 + i % 5));
      BucketedAllReduce reducer(*network, communicator->get(), /*capFloats=*/200);
      for (size_t layer = network->layerCount(); layer-- > 0;) reducer.onLayerDone(layer);
      const Status status = reducer.finish();
      ASSERT_TRUE(status.ok()) << status.toString();
      results[rank].assign(network->gradients(), network->gradients() + total);
    });
  }
  for (auto& thread : threads) thread.join();
  for (int rank = 0; rank < kRanks; ++rank) {
    ASSERT_FALSE(results[rank].empty());
    for (size_t i = 0; i < results[rank].size(); ++i)
      ASSERT_EQ(results[rank][i], 3.0f * static_cast<float>(1 + i % 5)) << "rank " << rank << " slot " << i;
  }
}

TEST(BucketedAllReduce, SingleRankCommunicatesNothing) {
  auto network = buildMlp(4, {3}, 2, ActivationKind::kRelu);
  for (int64_t i = 0; i < network->parameterCount(); ++i) network->gradients()[i] = 1.5f;
  BucketedAllReduce reducer(*network, nullptr, 10);
  for (size_t layer = network->layerCount(); layer-- > 0;) reducer.onLayerDone(layer);
  EXPECT_TRUE(reducer.finish().ok());
  EXPECT_EQ(reducer.bytesReduced(), 0);
  for (int64_t i = 0; i < network->parameterCount(); ++i) EXPECT_EQ(network->gradients()[i], 1.5f);
}

}  // namespace
}  // namespace tandem::parallel
