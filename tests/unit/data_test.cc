// data: readIdx on IDX files written here (plain and gzip): good, bad magic, truncated, missing;
// ShardedBatches (disjoint shards whose union is the single-rank batch, per-epoch permutations, seeding);
// makeSynthetic determinism; Dataset::gather.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "tandem/data/dataset.h"

namespace tandem::data {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            ("tandem-data-test-" + std::to_string(::getpid()) + "-" + info->test_suite_name() + "-" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

// An unsigned-byte IDX file: magic 0x00000803-style (type 0x08, `dims.size()` dimensions), big-endian sizes.
std::vector<uint8_t> idxBytes(const std::vector<uint32_t>& dims, const std::vector<uint8_t>& values) {
  std::vector<uint8_t> bytes = {0, 0, 0x08, static_cast<uint8_t>(dims.size())};
  for (uint32_t dim : dims) {
    bytes.push_back(static_cast<uint8_t>(dim >> 24));
    bytes.push_back(static_cast<uint8_t>(dim >> 16));
    bytes.push_back(static_cast<uint8_t>(dim >> 8));
    bytes.push_back(static_cast<uint8_t>(dim));
  }
  bytes.insert(bytes.end(), values.begin(), values.end());
  return bytes;
}

void writePlain(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

void writeGzip(const std::string& path, const std::vector<uint8_t>& bytes) {
  gzFile file = gzopen(path.c_str(), "wb");
  ASSERT_NE(file, nullptr) << path;
  ASSERT_EQ(gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
  ASSERT_EQ(gzclose(file), Z_OK);
}

std::vector<uint8_t> sequence(size_t n) {
  std::vector<uint8_t> values(n);
  for (size_t i = 0; i < n; ++i) values[i] = static_cast<uint8_t>((i * 7) % 256);
  return values;
}

TEST(ReadIdx, PlainFile) {
  TempDir dir;
  const auto values = sequence(2 * 3 * 4);
  writePlain(dir.file("images-idx3-ubyte"), idxBytes({2, 3, 4}, values));
  auto array = readIdx(dir.file("images-idx3-ubyte"));
  ASSERT_TRUE(array.ok()) << array.status().toString();
  EXPECT_EQ(array->dims, (std::vector<int64_t>{2, 3, 4}));
  EXPECT_EQ(array->values, values);
}

TEST(ReadIdx, GzipFile) {
  TempDir dir;
  const auto values = sequence(300);
  writeGzip(dir.file("labels-idx1-ubyte.gz"), idxBytes({300}, values));
  auto array = readIdx(dir.file("labels-idx1-ubyte.gz"));
  ASSERT_TRUE(array.ok()) << array.status().toString();
  EXPECT_EQ(array->dims, (std::vector<int64_t>{300}));
  EXPECT_EQ(array->values, values);
}

TEST(ReadIdx, LargeGzipFileSpanningManyReadChunks) {
  TempDir dir;
  const auto values = sequence(3 * 100 * 1000);  // > the reader's 64 KiB chunk several times over
  writeGzip(dir.file("big.gz"), idxBytes({3, 100, 1000}, values));
  auto array = readIdx(dir.file("big.gz"));
  ASSERT_TRUE(array.ok()) << array.status().toString();
  EXPECT_EQ(array->values, values);
}

TEST(ReadIdx, BadMagic) {
  TempDir dir;
  auto bytes = idxBytes({4}, sequence(4));
  bytes[2] = 0x0D;  // float data, not unsigned bytes
  writePlain(dir.file("floats"), bytes);
  auto array = readIdx(dir.file("floats"));
  ASSERT_FALSE(array.ok());
  EXPECT_EQ(array.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(array.status().message().find(dir.file("floats")), std::string::npos) << array.status().message();
  EXPECT_NE(array.status().message().find("magic"), std::string::npos) << array.status().message();
}

TEST(ReadIdx, TruncatedPayloadNamesTheFile) {
  TempDir dir;
  const std::string path = dir.file("train-images-idx3-ubyte");
  writePlain(path, idxBytes({2, 3, 3}, sequence(10)));  // 18 promised, 10 present
  auto array = readIdx(path);
  ASSERT_FALSE(array.ok());
  EXPECT_EQ(array.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(array.status().message().find(path), std::string::npos) << array.status().message();
  EXPECT_NE(array.status().message().find("truncated"), std::string::npos) << array.status().message();
}

TEST(ReadIdx, DimensionsWhoseProductWrapsAroundAreDataLoss) {
  TempDir dir;
  const std::string path = dir.file("wrapped-idx3-ubyte");
  // 2^16 x 2^24 x 2^24 = 2^64 values: 0 in 64 bits, which an empty payload would "satisfy".
  writePlain(path, idxBytes({1u << 16, 1u << 24, 1u << 24}, {}));
  auto array = readIdx(path);
  ASSERT_FALSE(array.ok());
  EXPECT_EQ(array.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(array.status().message().find("beyond 64 bits"), std::string::npos) << array.status().message();
}

TEST(ReadIdx, TruncatedGzipPayloadNamesTheFile) {
  TempDir dir;
  const std::string path = dir.file("short.gz");
  writeGzip(path, idxBytes({10, 10}, sequence(40)));
  auto array = readIdx(path);
  ASSERT_FALSE(array.ok());
  EXPECT_EQ(array.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(array.status().message().find(path), std::string::npos) << array.status().message();
  EXPECT_NE(array.status().message().find("truncated"), std::string::npos) << array.status().message();
}

TEST(ReadIdx, CutCompressedStreamIsDataLoss) {
  TempDir dir;
  const std::string whole = dir.file("whole.gz"), cut = dir.file("cut.gz");
  std::vector<uint8_t> noisy(50000);
  for (size_t i = 0; i < noisy.size(); ++i) noisy[i] = static_cast<uint8_t>((i * 2654435761u) >> 13);
  writeGzip(whole, idxBytes({50000}, noisy));
  std::ifstream in(whole, std::ios::binary);
  std::vector<char> compressed((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  compressed.resize(compressed.size() / 2);
  std::ofstream(cut, std::ios::binary).write(compressed.data(), static_cast<std::streamsize>(compressed.size()));
  auto array = readIdx(cut);
  ASSERT_FALSE(array.ok());
  EXPECT_EQ(array.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(array.status().message().find(cut), std::string::npos) << array.status().message();
}

TEST(ReadIdx, TruncatedHeader) {
  TempDir dir;
  auto bytes = idxBytes({5, 5, 5}, {});
  bytes.resize(9);  // magic + 1 of 3 dimensions... and a bit
  writePlain(dir.file("header"), bytes);
  auto array = readIdx(dir.file("header"));
  ASSERT_FALSE(array.ok());
  EXPECT_EQ(array.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(array.status().message().find("truncated"), std::string::npos) << array.status().message();
}

TEST(ReadIdx, MissingFileIsNotFound) {
  TempDir dir;
  const std::string path = dir.file("does-not-exist-idx1-ubyte");
  auto array = readIdx(path);
  ASSERT_FALSE(array.ok());
  EXPECT_EQ(array.status().code(), StatusCode::kNotFound);
  EXPECT_NE(array.status().message().find(path), std::string::npos) << array.status().message();
}

TEST(LoadFashionMnist, MissingDirectoryIsNotFound) {
  auto splits = loadFashionMnist("/nonexistent/tandem/fashion-mnist");
  ASSERT_FALSE(splits.ok());
  EXPECT_EQ(splits.status().code(), StatusCode::kNotFound);
  EXPECT_NE(splits.status().message().find("spec.data.path"), std::string::npos);
}

// ---------------------------------------------------------------- ShardedBatches

std::vector<int64_t> shardOf(int64_t datasetSize, int64_t globalBatch, uint64_t seed, int rank, int worldSize,
                             int64_t step) {
  ShardedBatches batches(datasetSize, globalBatch, seed, rank, worldSize);
  return batches.shard(step);
}

class ShardedBatchesWorld : public ::testing::TestWithParam<int> {};

TEST_P(ShardedBatchesWorld, ShardsAreDisjointAndTheirUnionIsTheSingleRankBatch) {
  const int worldSize = GetParam();
  const int64_t datasetSize = 103, globalBatch = 12;
  ShardedBatches single(datasetSize, globalBatch, 5, 0, 1);
  std::vector<ShardedBatches> ranks;
  for (int rank = 0; rank < worldSize; ++rank) ranks.emplace_back(datasetSize, globalBatch, 5, rank, worldSize);
  ASSERT_EQ(single.stepsPerEpoch(), 8);  // the partial batch is dropped
  for (int64_t step = 0; step < 3 * single.stepsPerEpoch(); ++step) {
    const std::vector<int64_t> whole = single.shard(step);
    ASSERT_EQ(whole.size(), static_cast<size_t>(globalBatch));
    std::vector<int64_t> concatenated;
    for (auto& rank : ranks) {
      EXPECT_EQ(rank.localBatch(), globalBatch / worldSize);
      const auto& part = rank.shard(step);
      ASSERT_EQ(part.size(), static_cast<size_t>(globalBatch / worldSize));
      concatenated.insert(concatenated.end(), part.begin(), part.end());
    }
    // Rank r holds the r-th contiguous slice: concatenated in rank order they are the global batch.
    EXPECT_EQ(concatenated, whole) << "step " << step;
    const std::set<int64_t> distinct(concatenated.begin(), concatenated.end());
    EXPECT_EQ(distinct.size(), concatenated.size()) << "shards overlap at step " << step;
    for (int64_t index : concatenated) {
      EXPECT_GE(index, 0);
      EXPECT_LT(index, datasetSize);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(TwoAndFourRanks, ShardedBatchesWorld, ::testing::Values(2, 4),
                         [](const auto& info) { return std::to_string(info.param) + "Ranks"; });

TEST(ShardedBatches, EachEpochIsAPermutation) {
  const int64_t datasetSize = 96, globalBatch = 12;  // 8 full steps cover every sample once
  ShardedBatches batches(datasetSize, globalBatch, 9, 0, 1);
  ASSERT_EQ(batches.stepsPerEpoch(), 8);
  std::vector<std::vector<int64_t>> epochs(3);
  for (int64_t step = 0; step < 3 * 8; ++step) {
    const auto& shard = batches.shard(step);
    epochs[step / 8].insert(epochs[step / 8].end(), shard.begin(), shard.end());
  }
  std::vector<int64_t> identity(datasetSize);
  std::iota(identity.begin(), identity.end(), 0);
  for (const auto& order : epochs) {
    std::vector<int64_t> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(sorted, identity);
    EXPECT_NE(order, identity);  // shuffled
  }
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_NE(epochs[1], epochs[2]);
}

TEST(ShardedBatches, SameSeedSameOrderDifferentSeedDifferentOrder) {
  for (int64_t step : {0, 3, 9, 17}) {
    EXPECT_EQ(shardOf(200, 20, 42, 1, 2, step), shardOf(200, 20, 42, 1, 2, step)) << "step " << step;
    EXPECT_NE(shardOf(200, 20, 42, 1, 2, step), shardOf(200, 20, 43, 1, 2, step)) << "step " << step;
  }
}

TEST(ShardedBatches, RandomAccessMatchesSequentialAccess) {
  // Jumping to a step (as a resumed run does) gives the same shard as walking there.
  ShardedBatches walked(150, 10, 3, 1, 2);
  std::vector<std::vector<int64_t>> sequential;
  for (int64_t step = 0; step < 40; ++step) sequential.push_back(walked.shard(step));
  for (int64_t step : {37, 2, 15, 0, 29}) EXPECT_EQ(shardOf(150, 10, 3, 1, 2, step), sequential[step]);
}

// ---------------------------------------------------------------- synthetic data and gather

TEST(MakeSynthetic, DeterministicInSeed) {
  const TrainTest first = makeSynthetic(64, 5);
  const TrainTest second = makeSynthetic(64, 5);
  const TrainTest other = makeSynthetic(64, 6);
  EXPECT_EQ(first.train.count, 64);
  EXPECT_EQ(first.test.count, 16);
  EXPECT_EQ(first.train.features, 784);
  EXPECT_EQ(first.train.classes, 10);
  ASSERT_EQ(first.train.inputs.size(), 64u * 784u);
  ASSERT_EQ(first.test.inputs.size(), 16u * 784u);
  EXPECT_EQ(first.train.inputs, second.train.inputs);
  EXPECT_EQ(first.train.labels, second.train.labels);
  EXPECT_EQ(first.test.inputs, second.test.inputs);
  EXPECT_EQ(first.test.labels, second.test.labels);
  EXPECT_NE(first.train.inputs, other.train.inputs);
  for (int32_t label : first.train.labels) {
    EXPECT_GE(label, 0);
    EXPECT_LT(label, 10);
  }
  EXPECT_GT(std::set<int32_t>(first.train.labels.begin(), first.train.labels.end()).size(), 5u);
}

TEST(Dataset, GatherCopiesTheRequestedRows) {
  Dataset dataset;
  dataset.count = 4;
  dataset.features = 2;
  dataset.classes = 3;
  dataset.inputs = {0, 1, 10, 11, 20, 21, 30, 31};
  dataset.labels = {0, 1, 2, 0};
  Tensor x;
  std::vector<int32_t> y;
  dataset.gather({3, 1, 1}, x, y);
  EXPECT_EQ(x.shape(), (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(std::vector<float>(x.data(), x.data() + x.size()), (std::vector<float>{30, 31, 10, 11, 10, 11}));
  EXPECT_EQ(y, (std::vector<int32_t>{0, 1, 1}));
}

}  // namespace
}  // namespace tandem::data
