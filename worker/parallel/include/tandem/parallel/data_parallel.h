// Data parallelism: gradients are all-reduced in buckets of consecutive layers, each bucket as soon as
// the backward of all its layers has finished, so communication overlaps the rest of backward.
// Buckets are contiguous ranges of the model's flat gradient buffer, formed from the last layer
// backwards (the order backward finishes them); a bucket is closed before a layer would push it past the cap.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "tandem/comm/communicator.h"
#include "tandem/model/sequential.h"

namespace tandem::parallel {

struct GradientBucket {
  size_t firstLayer = 0;  // lowest layer index in the bucket: its backward finishes the bucket
  size_t lastLayer = 0;
  int64_t offset = 0;     // in the flat gradient buffer
  int64_t count = 0;      // floats
};

// Splits the layers into buckets of at most capFloats floats each, except that one layer larger than
// the cap gets a bucket of its own. The bucket of the last layer also carries the model's trailing gradient slots.
std::vector<GradientBucket> planGradientBuckets(const model::Sequential& model, int64_t capFloats);

// Not thread-safe: used from the training thread only.
class BucketedAllReduce {
 public:
  // communicator may be null (one rank): then nothing is communicated.
  BucketedAllReduce(model::Sequential& model, comm::Communicator* communicator, int64_t capFloats);

  // The Sequential::backward hook: launches a bucket's all-reduce when its first layer is done.
  void onLayerDone(size_t layer);
  // Waits for every launched bucket; returns the first error. Seconds spent waiting here (the part
  // of communication backward did not hide) accumulate in exposedSeconds().
  Status finish();

  const std::vector<GradientBucket>& buckets() const { return buckets_; }
  double exposedSeconds() const { return exposedSeconds_; }
  int64_t bytesReduced() const { return bytesReduced_; }
  std::string describe() const;

 private:
  model::Sequential& model_;
  comm::Communicator* communicator_;
  std::vector<GradientBucket> buckets_;
  std::vector<int> bucketFinishedBy_;  // layer -> bucket index it completes, or -1
  std::vector<std::shared_ptr<comm::Work>> pending_;
  double exposedSeconds_ = 0.0;
  int64_t bytesReduced_ = 0;
};

}  // namespace tandem::parallel
