// parallel: planGradientBuckets on mlps (disjoint, contiguous, covering every parameter and the trailing
// slots, in reverse layer order, within the cap except for one oversized layer) and BucketedAllReduce
// summing gradients of 2 thread ranks over Gloo (closed form), driven by a real backward's hook;
// GradientAccumulator's background pairwise sums (bitwise those of an explicit tree) and buffer recycling.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <memory>
#include <thread>
#include <vector>

#include "gloo_ranks.h"
#include "tandem/comm/communicator.h"
#include "tandem/model/sequential.h"
#include "tandem/parallel/data_parallel.h"
#include "tandem/parallel/gradient_accumulator.h"

namespace tandem::parallel {
namespace {

using model::ActivationKind;
using model::buildMlp;

// Checks every invariant a bucket plan promises for `network` under `cap`.
void expectValidPlan(const model::Sequential& network, const std::vector<GradientBucket>& buckets, int64_t cap) {
  ASSERT_FALSE(buckets.empty());
  const int64_t total = network.parameterCount() + network.trailingGradientSlotCount();
  const std::vector<int64_t> ready = network.gradientReadyOffsets();
  auto isPieceBoundary = [&](int64_t offset) { return std::find(ready.begin(), ready.end(), offset) != ready.end(); };
  // Read from the end of the buffer backwards, the buckets tile [0, total) with no gap or overlap, and
  // every bucket starts where backward reports a piece finished (so it can launch at that moment).
  int64_t end = total;
  for (size_t i = 0; i < buckets.size(); ++i) {
    const GradientBucket& bucket = buckets[i];
    SCOPED_TRACE("bucket " + std::to_string(i));
    EXPECT_EQ(bucket.offset + bucket.count, end);
    EXPECT_GT(bucket.count, 0);
    EXPECT_TRUE(isPieceBoundary(bucket.offset)) << "offset " << bucket.offset;
    // Within the cap, unless the bucket is one piece (the pieces inside it are its boundaries).
    const int64_t piecesInside = std::count_if(ready.begin(), ready.end(), [&](int64_t offset) {
      return offset > bucket.offset && offset < bucket.offset + bucket.count;
    });
    const int64_t trailing = i == 0 ? network.trailingGradientSlotCount() : 0;
    if (piecesInside > 0) {
      EXPECT_LE(bucket.count - trailing, cap);
    }
    end = bucket.offset;
  }
  EXPECT_EQ(end, 0);
}

// Microbatch gradients whose sum depends on the order of additions (wide magnitudes).
std::vector<std::vector<float>> orderSensitiveGradients(int count, int64_t size) {
  std::mt19937 generator(7);
  std::uniform_real_distribution<float> mantissa(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-20, 20);
  std::vector<std::vector<float>> gradients(count, std::vector<float>(size));
  for (auto& gradient : gradients)
    for (auto& value : gradient) value = std::ldexp(mantissa(generator), exponent(generator));
  return gradients;
}

// The reference: equal-level neighbours merge as soon as they exist, the rest fold right to left.
std::vector<float> treeSum(const std::vector<std::vector<float>>& gradients) {
  std::vector<std::pair<std::vector<float>, int>> stack;
  for (const auto& gradient : gradients) {
    stack.emplace_back(gradient, 0);
    while (stack.size() >= 2 && stack[stack.size() - 1].second == stack[stack.size() - 2].second) {
      for (size_t i = 0; i < gradient.size(); ++i) stack[stack.size() - 2].first[i] += stack.back().first[i];
      ++stack[stack.size() - 2].second;
      stack.pop_back();
    }
  }
  while (stack.size() >= 2) {
    for (size_t i = 0; i < stack.back().first.size(); ++i) stack[stack.size() - 2].first[i] += stack.back().first[i];
    stack.pop_back();
  }
  return stack.front().first;
}

// Hands gradients to the accumulator the way the trainer does: overwrite a spare buffer, add.
std::vector<float> accumulate(GradientAccumulator& accumulator, const std::vector<std::vector<float>>& gradients,
                              int64_t size) {
  for (const auto& gradient : gradients) {
    FloatBuffer buffer = accumulator.spareBuffer();
    EXPECT_EQ(buffer.size(), size);
    std::memcpy(buffer.data(), gradient.data(), size * sizeof(float));
    accumulator.add(std::move(buffer));
  }
  FloatBuffer total = accumulator.finish();
  std::vector<float> result(total.data(), total.data() + size);
  accumulator.recycle(std::move(total));
  return result;
}

// Steps of 1 to 32 microbatches, powers of two and not: each total bitwise the fixed tree's.
void expectTreeSumsUpTo32(GradientAccumulator& accumulator, int64_t size) {
  for (int count : {1, 2, 3, 8, 13, 32}) {
    const auto gradients = orderSensitiveGradients(count, size);
    EXPECT_EQ(accumulate(accumulator, gradients, size), treeSum(gradients)) << count << " microbatches";
  }
}

TEST(GradientAccumulator, SumsBitwiseAsTheFixedPairwiseTree) {
  const int64_t size = 4097;
  GradientAccumulator accumulator(size);
  bool someOrderMattered = false;
  for (int count : {1, 2, 3, 4, 5, 7, 8, 12, 16}) {
    const auto gradients = orderSensitiveGradients(count, size);
    const std::vector<float> expected = treeSum(gradients);
    EXPECT_EQ(accumulate(accumulator, gradients, size), expected) << count << " microbatches";
    std::vector<float> sequential(size, 0.0f);
    for (const auto& gradient : gradients)
      for (int64_t i = 0; i < size; ++i) sequential[i] += gradient[i];
    someOrderMattered = someOrderMattered || sequential != expected;
  }
  EXPECT_TRUE(someOrderMattered) << "the data cannot tell a tree from a running sum";
}

TEST(GradientAccumulator, InlineSumsAreTheSameBitsWithFewerBuffers) {
  const int64_t size = 1000;
  GradientAccumulator accumulator(size, GradientAccumulator::Summing::kInline);
  expectTreeSumsUpTo32(accumulator, size);
  // A partial sum per bit of 32, the buffer being filled and the total: nothing waits in a queue.
  EXPECT_LE(accumulator.buffersAllocated(), 5 + 3);
}

TEST(GradientAccumulator, StepsAfterStepsReuseSpareBuffers) {
  const int64_t size = 1000;
  GradientAccumulator accumulator(size);
  const auto gradients = orderSensitiveGradients(8, size);
  const std::vector<float> expected = treeSum(gradients);
  for (int step = 0; step < 20; ++step) ASSERT_EQ(accumulate(accumulator, gradients, size), expected) << "step " << step;
  // The pool never grows step after step, and holds at most what the header promises (log2(M) + 5).
  EXPECT_LE(accumulator.buffersAllocated(), 3 + 5);
}

TEST(GradientAccumulator, FinishWithNothingAddedIsZero) {
  GradientAccumulator accumulator(16);
  FloatBuffer total = accumulator.finish();
  ASSERT_EQ(total.size(), 16);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(total.data()[i], 0.0f);
  // Also after a step whose buffers went back to the pool with their sums in them.
  accumulator.recycle(std::move(total));
  accumulate(accumulator, orderSensitiveGradients(4, 16), 16);
  total = accumulator.finish();
  for (int i = 0; i < 16; ++i) EXPECT_EQ(total.data()[i], 0.0f);
}

TEST(GradientAccumulator, AddAndFinishDoTheSumsTheThreadNeverGotTo) {
  // No thread at all: the SCHED_IDLE thread's worst case, a core that was never idle during the step.
  // add() sums once more than kMaxQueued wait, finish() what is left: the same bits, bounded memory.
  const int64_t size = 1000;
  GradientAccumulator accumulator(size, GradientAccumulator::Summing::kNoThread);
  expectTreeSumsUpTo32(accumulator, size);
  // 32 microbatches queued whole would have needed 33 buffers.
  EXPECT_LE(accumulator.buffersAllocated(), 5 + 5);
}

TEST(GradientAccumulator, ExchangeGradientsRebindsTheLayers) {
  auto network = buildMlp(8, {6}, 3, ActivationKind::kRelu);
  network->initialize(1);
  GradientAccumulator accumulator(network->gradientBufferSize());
  Tensor input({4, 8});
  for (int64_t i = 0; i < input.size(); ++i) input.data()[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
  Tensor gradOutput({4, 3});
  for (int64_t i = 0; i < gradOutput.size(); ++i) gradOutput.data()[i] = 0.05f * static_cast<float>(i) - 0.2f;
  // The same backward into the model's own buffer and, after an exchange, into the accumulator's.
  network->zeroGradients();
  network->forward(input);
  network->backward(gradOutput);
  const std::vector<float> direct(network->gradients(), network->gradients() + network->gradientBufferSize());
  FloatBuffer other = accumulator.spareBuffer();
  ASSERT_TRUE(network->exchangeGradients(other).ok());
  network->forward(input);
  network->backward(gradOutput);
  EXPECT_EQ(std::vector<float>(network->gradients(), network->gradients() + network->gradientBufferSize()), direct);
  EXPECT_EQ(std::vector<float>(other.data(), other.data() + other.size()), direct);  // the first buffer, untouched
  FloatBuffer wrongSize(3);
  EXPECT_FALSE(network->exchangeGradients(wrongSize).ok());
}

TEST(PlanGradientBuckets, LargeCapGivesOneBucketCoveringEverything) {
  auto network = buildMlp(8, {6, 4}, 3, ActivationKind::kRelu, /*trailingGradientSlots=*/1);
  network->setGradientChunkFloats(1 << 20);
  const auto buckets = planGradientBuckets(*network, 1 << 20);
  ASSERT_EQ(buckets.size(), 1u);
  EXPECT_EQ(buckets[0].offset, 0);
  EXPECT_EQ(buckets[0].count, network->parameterCount() + 1);
  expectValidPlan(*network, buckets, 1 << 20);
}

TEST(PlanGradientBuckets, LayersSplitIntoRowChunksUnderASmallCap) {
  // linear(8->6): 48 weights + 6 bias, relu, linear(6->4): 24 + 4, relu, linear(4->3): 12 + 3.
  auto network = buildMlp(8, {6, 4}, 3, ActivationKind::kRelu, /*trailingGradientSlots=*/2);
  network->setGradientChunkFloats(16);  // 2 rows of 8 for the first layer, 2 rows of 6, 3 rows of 4
  // Layers occupy [0, 54), [54, 82), [82, 97), then 2 slots. Pieces from the end: bias 3 (+2 slots) at
  // 94, W 12 at 82, bias 4 at 78, W rows 2-3 at 66, rows 0-1 at 54, bias 6 at 48, W rows 4-5 at 32,
  // rows 2-3 at 16, rows 0-1 at 0.
  EXPECT_EQ(network->gradientReadyOffsets(), (std::vector<int64_t>{94, 82, 78, 66, 54, 48, 32, 16, 0}));
  const auto buckets = planGradientBuckets(*network, 16);
  expectValidPlan(*network, buckets, 16);
  // 5 (adding W's 12 would pass 16) | 12 + 4 | 12 | 12 | 6 | 16 | 16 | 16
  const std::vector<std::pair<int64_t, int64_t>> expected{{94, 5}, {78, 16}, {66, 12}, {54, 12},
                                                          {48, 6},  {32, 16}, {16, 16}, {0, 16}};
  ASSERT_EQ(buckets.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(buckets[i].offset, expected[i].first) << "bucket " << i;
    EXPECT_EQ(buckets[i].count, expected[i].second) << "bucket " << i;
  }
}

TEST(PlanGradientBuckets, SmallLayersShareABucketUpToTheCap) {
  // linear(2->3) 9, relu, linear(3->3) 12, relu, linear(3->3) 12, relu, linear(3->2) 8; whole layers.
  auto network = buildMlp(2, {3, 3, 3}, 2, ActivationKind::kGelu);
  network->setGradientChunkFloats(1000);
  const auto buckets = planGradientBuckets(*network, 25);
  expectValidPlan(*network, buckets, 25);
  // From the back: 2 + 6 + 3 + 9 = 20 (the next 3 would still fit: 23), ...
  int64_t covered = 0;
  for (const auto& bucket : buckets) covered += bucket.count;
  EXPECT_EQ(covered, network->parameterCount());
  EXPECT_GE(buckets.size(), 2u);
}

TEST(PlanGradientBuckets, InvariantsHoldForManyCaps) {
  auto network = buildMlp(20, {16, 1, 12, 7}, 5, ActivationKind::kRelu, /*trailingGradientSlots=*/3);
  for (int64_t cap : {1, 2, 10, 17, 50, 100, 200, 336, 400, 1000, 100000}) {
    SCOPED_TRACE("cap " + std::to_string(cap));
    network->setGradientChunkFloats(cap);
    expectValidPlan(*network, planGradientBuckets(*network, cap), cap);
  }
}

// A step that fails part-way destroys the reducer with buckets in flight: the destructor waits for them,
// so no all-reduce writes into the gradients afterwards. Rank 1 joins 300 ms late; rank 0 marks its
// gradients as soon as its reducer is gone, and the mark must survive.
TEST(BucketedAllReduce, DestroyingItWaitsForBucketsInFlight) {
  auto communicators = test_support::connectGlooRanks(2);
  ASSERT_EQ(communicators.size(), 2u);
  test_support::runRanks(communicators, [&](int rank, comm::Communicator& communicator) {
    auto network = buildMlp(6, {5}, 3, ActivationKind::kRelu);
    network->initialize(3);
    for (int64_t i = 0; i < network->parameterCount(); ++i) network->gradients()[i] = 1.0f;
    if (rank == 1) std::this_thread::sleep_for(std::chrono::milliseconds(300));
    {
      BucketedAllReduce reducer(*network, &communicator, /*capFloats=*/1000);
      reducer.onGradientsReady(0);  // every bucket launched; no finish(): the step "failed"
    }
    for (int64_t i = 0; i < network->parameterCount(); ++i) network->gradients()[i] = -7.0f;
    std::this_thread::sleep_for(std::chrono::milliseconds(rank == 0 ? 500 : 0));
    for (int64_t i = 0; i < network->parameterCount(); ++i)
      ASSERT_EQ(network->gradients()[i], -7.0f) << "rank " << rank << ": an all-reduce wrote after the reducer was gone";
  });
}

// Two ranks, one mlp each (same initialisation), different inputs: the bucketed all-reduce launched from
// backward's hook leaves every rank with the sum of both ranks' gradients, trailing slots included.
TEST(BucketedAllReduce, SumsGradientsOfTwoRanks) {
  constexpr int kRanks = 2;
  auto communicators = test_support::connectGlooRanks(kRanks);
  ASSERT_EQ(communicators.size(), static_cast<size_t>(kRanks));
  std::vector<std::unique_ptr<model::Sequential>> networks(kRanks);
  std::vector<std::vector<float>> localGradients(kRanks);
  std::vector<int64_t> bytesReduced(kRanks, 0);
  std::vector<size_t> bucketCounts(kRanks, 0);

  test_support::runRanks(communicators, [&](int rank, comm::Communicator& communicator) {
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
    BucketedAllReduce reducer(*network, &communicator, /*capFloats=*/25);
    network->backward(gradOutput, [&](int64_t offset) { reducer.onGradientsReady(offset); });
    const Status status = reducer.finish();
    ASSERT_TRUE(status.ok()) << "rank " << rank << ": " << status.toString();
    bytesReduced[rank] = reducer.bytesReduced();
    bucketCounts[rank] = reducer.buckets().size();
  });
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

// Closed form: rank r fills every gradient with r + 1 and reports all of them ready; each slot ends at 3.
TEST(BucketedAllReduce, ClosedFormSumOverGloo) {
  constexpr int kRanks = 2;
  auto communicators = test_support::connectGlooRanks(kRanks);
  ASSERT_EQ(communicators.size(), static_cast<size_t>(kRanks));
  std::vector<std::vector<float>> results(kRanks);
  test_support::runRanks(communicators, [&](int rank, comm::Communicator& communicator) {
    auto network = buildMlp(30, {20, 10}, 4, ActivationKind::kRelu, /*trailingGradientSlots=*/2);
    const int64_t total = network->parameterCount() + 2;
    for (int64_t i = 0; i < total; ++i) network->gradients()[i] = static_cast<float>((rank + 1) * (1 + i % 5));
    BucketedAllReduce reducer(*network, &communicator, /*capFloats=*/200);
    reducer.onGradientsReady(0);
    const Status status = reducer.finish();
    ASSERT_TRUE(status.ok()) << status.toString();
    results[rank].assign(network->gradients(), network->gradients() + total);
  });
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
  reducer.onGradientsReady(0);
  EXPECT_TRUE(reducer.finish().ok());
  EXPECT_EQ(reducer.bytesReduced(), 0);
  for (int64_t i = 0; i < network->parameterCount(); ++i) EXPECT_EQ(network->gradients()[i], 1.5f);
}

}  // namespace
}  // namespace tandem::parallel
