// Datasets held in memory as normalised float features and int32 labels, the Fashion-MNIST IDX reader,
// a synthetic classification set for fast tests, and the sharded, seeded batch order of data parallelism.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tandem/common/status.h"
#include "tandem/tensor/tensor.h"

namespace tandem::data {

struct Dataset {
  int64_t count = 0;
  int64_t features = 0;
  int64_t classes = 0;
  std::vector<float> inputs;    // (count, features), normalised
  std::vector<int32_t> labels;  // (count)

  // Copies the rows `indices` into x (n, features) and y (n).
  void gather(const std::vector<int64_t>& indices, Tensor& x, std::vector<int32_t>& y) const;
  // Only the labels (a last pipeline stage needs no inputs).
  void gatherLabels(const std::vector<int64_t>& indices, std::vector<int32_t>& y) const;
};

struct TrainTest {
  Dataset train;
  Dataset test;
};

// Reads an IDX file (optionally gzip-compressed, by content) into raw bytes with its dimensions.
// Errors name the file: missing (NOT_FOUND), bad magic or truncated (DATA_LOSS).
struct IdxArray {
  std::vector<int64_t> dims;
  std::vector<uint8_t> values;
};
StatusOr<IdxArray> readIdx(const std::string& path);

// Fashion-MNIST from `directory` ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]); pixels scaled to
// [0,1] and standardised with the training set's mean 0.2860 and std 0.3530.
StatusOr<TrainTest> loadFashionMnist(const std::string& directory);

// Gaussian clusters in 784 dimensions, 10 classes: learnable, deterministic in `seed`, instant to make.
TrainTest makeSynthetic(int64_t trainSamples, uint64_t seed);

// The batch order of data parallelism: each epoch is a seeded permutation of the training set; global
// step s takes positions [s*B, (s+1)*B) of its epoch's permutation (the last partial batch is dropped),
// and rank r of N takes the r-th contiguous slice of B/N of them. Same seed, same order on every rank.
class ShardedBatches {
 public:
  ShardedBatches(int64_t datasetSize, int64_t globalBatch, uint64_t seed, int rank, int worldSize);
  int64_t stepsPerEpoch() const { return stepsPerEpoch_; }
  int64_t localBatch() const { return globalBatch_ / worldSize_; }
  // This rank's sample indices for global step `step` (0-based, counting across epochs).
  const std::vector<int64_t>& shard(int64_t step);

 private:
  int64_t datasetSize_, globalBatch_;
  uint64_t seed_;
  int rank_, worldSize_;
  int64_t stepsPerEpoch_;
  int64_t cachedEpoch_ = -1;
  std::vector<int64_t> permutation_;
  std::vector<int64_t> shard_;
};

}  // namespace tandem::data
