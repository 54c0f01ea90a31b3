// Data parallelism: gradients are all-reduced in buckets, each launched the moment backward has
// finished every gradient in it, so communication overlaps the rest of backward. Buckets are
// contiguous ranges of the model's flat gradient buffer, planned from its end (backward finishes the
// last layer first) out of the pieces backward reports (a layer's bias, row chunks of its weights).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "tandem/comm/communicator.h"
#include "tandem/model/sequential.h"

namespace tandem::parallel {

struct GradientBucket {
  int64_t offset = 0;  // in the flat gradient buffer
  int64_t count = 0;   // floats
};

// Groups the pieces backward reports (model.gradientReadyOffsets()) into buckets of at most capFloats
// floats, from the end of the buffer to its start; a piece larger than the cap is a bucket of its own.
// The first bucket also carries the model's trailing gradient slots.
std::vector<GradientBucket> planGradientBuckets(const model::Sequential& model, int64_t capFloats);

// Not thread-safe: used from the training thread only.
class BucketedAllReduce {
 public:
  // Sets the model's gradient pieces to the cap, then plans. communicator may be null (one rank):
  // then nothing is communicated.
  BucketedAllReduce(model::Sequential& model, comm::Communicator* communicator, int64_t capFloats);
  // Waits for buckets still in flight (each bounded by the communicator's timeout): a step that failed
  // part-way must not leave all-reduces writing into gradients that are about to be freed.
  ~BucketedAllReduce();
  BucketedAllReduce(const BucketedAllReduce&) = delete;
  BucketedAllReduce& operator=(const BucketedAllReduce&) = delete;

  // The Sequential::backward hook: launches every bucket whose gradients are now all final.
  void onGradientsReady(int64_t offset);
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
  size_t nextBucket_ = 0;
  std::vector<std::shared_ptr<comm::Work>> pending_;
  double exposedSeconds_ = 0.0;
  int64_t bytesReduced_ = 0;
};

}  // namespace tandem::parallel
