#include "tandem/parallel/data_parallel.h"

#include <chrono>
#include <sstream>

namespace tandem::parallel {

std::vector<GradientBucket> planGradientBuckets(const model::Sequential& model, int64_t capFloats) {
  std::vector<GradientBucket> buckets;
  GradientBucket current;
  bool open = false;
  for (size_t layer = model.layerCount(); layer-- > 0;) {
    const auto [offset, count] = model.parameterRange(layer);
    // Close the open bucket before it would pass the cap, so a large layer does not drag the small
    // layers after it into its (late) bucket.
    if (open && current.count > 0 && count > 0 && current.count + count > capFloats) {
      buckets.push_back(current);
      open = false;
    }
    if (!open) {
      current = GradientBucket{layer, layer, offset, 0};
      open = true;
    }
    current.firstLayer = layer;
    current.offset = offset;
    current.count += count;
  }
  if (open) buckets.push_back(current);
  if (!buckets.empty()) buckets.front().count += model.trailingGradientSlotCount();
  // Buckets may begin with parameter-free layers (activations): their offset is where the next
  // layer's parameters begin, which keeps the ranges contiguous and disjoint.
  return buckets;
}

BucketedAllReduce::BucketedAllReduce(model::Sequential& model, comm::Communicator* communicator, int64_t capFloats)
    : model_(model), communicator_(communicator), buckets_(planGradientBuckets(model, capFloats)) {
  bucketFinishedBy_.assign(model.layerCount(), -1);
  for (size_t i = 0; i < buckets_.size(); ++i) bucketFinishedBy_[buckets_[i].firstLayer] = static_cast<int>(i);
}

void BucketedAllReduce::onLayerDone(size_t layer) {
  if (communicator_ == nullptr || communicator_->size() == 1) return;
  const int index = bucketFinishedBy_[layer];
  if (index < 0) return;
  const GradientBucket& bucket = buckets_[index];
  pending_.push_back(communicator_->allReduceAsync(model_.gradients() + bucket.offset, bucket.count));
  bytesReduced_ += bucket.count * static_cast<int64_t>(sizeof(float));
}

Status BucketedAllReduce::finish() {
  const auto start = std::chrono::steady_clock::now();
  Status first;
  for (auto& work : pending_) {
    Status status = work->wait();
    if (first.ok() && !status.ok()) first = status;
  }
  pending_.clear();
  exposedSeconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return first;
}

std::string BucketedAllReduce::describe() const {
  std::ostringstream out;
  out << buckets_.size() << " gradient buckets:";
  for (const auto& bucket : buckets_)
    out << " [layers " << bucket.firstLayer << "-" << bucket.lastLayer << ", " << bucket.count * 4 / 1024 << " KiB]";
  return out.str();
}

}  // namespace tandem::parallel
