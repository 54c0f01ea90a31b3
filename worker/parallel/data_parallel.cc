#include "tandem/parallel/data_parallel.h"

#include <chrono>
#include <sstream>

namespace tandem::parallel {

std::vector<GradientBucket> planGradientBuckets(const model::Sequential& model, int64_t capFloats) {
  std::vector<GradientBucket> buckets;
  int64_t pieceEnd = model.parameterCount() + model.trailingGradientSlotCount();
  GradientBucket current{pieceEnd, 0};
  for (int64_t pieceStart : model.gradientReadyOffsets()) {
    const int64_t piece = pieceEnd - pieceStart;
    if (piece <= 0) continue;
    if (current.count > 0 && current.count + piece > capFloats) {
      buckets.push_back(current);
      current = GradientBucket{pieceEnd, 0};
    }
    current.offset = pieceStart;
    current.count += piece;
    pieceEnd = pieceStart;
  }
  if (current.count > 0) buckets.push_back(current);
  return buckets;
}

BucketedAllReduce::BucketedAllReduce(model::Sequential& model, comm::Communicator* communicator, int64_t capFloats)
    : model_(model), communicator_(communicator) {
  model_.setGradientChunkFloats(capFloats);
  buckets_ = planGradientBuckets(model_, capFloats);
}

BucketedAllReduce::~BucketedAllReduce() { (void)finish(); }

void BucketedAllReduce::onGradientsReady(int64_t offset) {
  if (communicator_ == nullptr || communicator_->size() == 1) return;
  while (nextBucket_ < buckets_.size() && buckets_[nextBucket_].offset >= offset) {
    const GradientBucket& bucket = buckets_[nextBucket_++];
    pending_.push_back(communicator_->allReduceAsync(model_.gradients() + bucket.offset, bucket.count));
    bytesReduced_ += bucket.count * static_cast<int64_t>(sizeof(float));
  }
}

Status BucketedAllReduce::finish() {
  const auto start = std::chrono::steady_clock::now();
  Status first;
  for (auto& work : pending_) {
    Status status = work->wait();
    if (first.ok() && !status.ok()) first = status;
  }
  pending_.clear();
  nextBucket_ = 0;
  exposedSeconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return first;
}

std::string BucketedAllReduce::describe() const {
  std::ostringstream out;
  out << buckets_.size() << " gradient buckets (KiB, in launch order):";
  for (const auto& bucket : buckets_) out << " " << bucket.count * 4 / 1024;
  return out.str();
}

}  // namespace tandem::parallel
