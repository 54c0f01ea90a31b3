#include "tandem/data/dataset.h"

#include <zlib.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "tandem/common/random.h"

namespace tandem::data {
namespace {

constexpr float kFashionMnistMean = 0.2860f;
constexpr float kFashionMnistStd = 0.3530f;

// Reads the whole file, inflating it when it is gzip (zlib's gzread passes plain files through).
StatusOr<std::vector<uint8_t>> readMaybeGzip(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr)
    return TANDEM_ERROR(StatusCode::kNotFound, path + ": cannot open (" + std::strerror(errno) + ")");
  std::vector<uint8_t> bytes;
  uint8_t chunk[1 << 16];
  int read = 0;
  while ((read = gzread(file, chunk, sizeof(chunk))) > 0) bytes.insert(bytes.end(), chunk, chunk + read);
  int errorNumber = Z_OK;
  const char* message = gzerror(file, &errorNumber);
  const bool failed = read < 0 || (errorNumber != Z_OK && errorNumber != Z_STREAM_END);
  std::string reason = failed ? message : "";
  gzclose(file);
  if (failed) return TANDEM_ERROR(StatusCode::kDataLoss, path + ": corrupt or truncated compressed data (" + reason + ")");
  return bytes;
}

uint32_t bigEndian32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

std::string findFile(const std::string& directory, const std::string& stem) {
  for (const std::string& candidate : {directory + "/" + stem + ".gz", directory + "/" + stem})
    if (std::filesystem::exists(candidate)) return candidate;
  return directory + "/" + stem + ".gz";
}

StatusOr<Dataset> loadSplit(const std::string& directory, const std::string& prefix) {
  TANDEM_ASSIGN_OR_RETURN(IdxArray images, readIdx(findFile(directory, prefix + "-images-idx3-ubyte")));
  TANDEM_ASSIGN_OR_RETURN(IdxArray labels, readIdx(findFile(directory, prefix + "-labels-idx1-ubyte")));
  if (images.dims.size() != 3 || labels.dims.size() != 1 || images.dims[0] != labels.dims[0])
    return TANDEM_ERROR(StatusCode::kDataLoss, directory + ": " + prefix + " images and labels do not match (" +
                                                   std::to_string(images.dims[0]) + " images, " +
                                                   std::to_string(labels.dims.empty() ? 0 : labels.dims[0]) + " labels)");
  Dataset dataset;
  dataset.count = images.dims[0];
  dataset.features = images.dims[1] * images.dims[2];
  dataset.classes = 10;
  dataset.inputs.resize(images.values.size());
  for (size_t i = 0; i < images.values.size(); ++i)
    dataset.inputs[i] = (static_cast<float>(images.values[i]) / 255.0f - kFashionMnistMean) / kFashionMnistStd;
  dataset.labels.resize(dataset.count);
  for (int64_t i = 0; i < dataset.count; ++i) {
    if (labels.values[i] >= dataset.classes)
      return TANDEM_ERROR(StatusCode::kDataLoss, directory + ": " + prefix + " label " + std::to_string(i) +
                                                     " is " + std::to_string(labels.values[i]) + ", not in 0..9");
    dataset.labels[i] = labels.values[i];
  }
  return dataset;
}

}  // namespace

void Dataset::gather(const std::vector<int64_t>& indices, Tensor& x, std::vector<int32_t>& y) const {
  const int64_t n = static_cast<int64_t>(indices.size());
  x.reshape({n, features});
  y.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(x.data() + i * features, inputs.data() + indices[i] * features, sizeof(float) * features);
    y[i] = labels[indices[i]];
  }
}

void Dataset::gatherLabels(const std::vector<int64_t>& indices, std::vector<int32_t>& y) const {
  y.resize(indices.size());
  for (size_t i = 0; i < indices.size(); ++i) y[i] = labels[indices[i]];
}

StatusOr<IdxArray> readIdx(const std::string& path) {
  TANDEM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, readMaybeGzip(path));
  if (bytes.size() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08)
    return TANDEM_ERROR(StatusCode::kDataLoss, path + ": not an unsigned-byte IDX file (bad magic number)");
  const int rank = bytes[3];
  const size_t headerSize = 4 + 4 * static_cast<size_t>(rank);
  if (rank < 1 || rank > 4 || bytes.size() < headerSize)
    return TANDEM_ERROR(StatusCode::kDataLoss, path + ": truncated IDX header");
  IdxArray array;
  size_t expected = 1;
  for (int i = 0; i < rank; ++i) {
    array.dims.push_back(bigEndian32(bytes.data() + 4 + 4 * i));
    // Four 32-bit dimensions can overflow 64 bits, and a wrapped product could pass the size check.
    if (__builtin_mul_overflow(expected, static_cast<size_t>(array.dims.back()), &expected))
      return TANDEM_ERROR(StatusCode::kDataLoss, path + ": the IDX header's dimensions multiply beyond 64 bits (corrupt)");
  }
  if (bytes.size() - headerSize < expected)
    return TANDEM_ERROR(StatusCode::kDataLoss, path + ": truncated: the header promises " + std::to_string(expected) +
                                                   " values but the file holds " + std::to_string(bytes.size() - headerSize));
  array.values.assign(bytes.begin() + headerSize, bytes.begin() + headerSize + expected);
  return array;
}

StatusOr<TrainTest> loadFashionMnist(const std::string& directory) {
  if (!std::filesystem::is_directory(directory))
    return TANDEM_ERROR(StatusCode::kNotFound,
                        "spec.data.path: dataset directory " + directory + " does not exist (Debian: apt-get install dataset-fashion-mnist)");
  TrainTest splits;
  TANDEM_ASSIGN_OR_RETURN(splits.train, loadSplit(directory, "train"));
  TANDEM_ASSIGN_OR_RETURN(splits.test, loadSplit(directory, "t10k"));
  return splits;
}

TrainTest makeSynthetic(int64_t trainSamples, uint64_t seed) {
  constexpr int64_t kFeatures = 784, kClasses = 10;
  Random random(seed, /*stream=*/77);
  std::vector<float> centers(kClasses * kFeatures);
  for (float& value : centers) value = static_cast<float>(random.normal() * 0.35);
  auto make = [&](int64_t count) {
    Dataset dataset;
    dataset.count = count;
    dataset.features = kFeatures;
    dataset.classes = kClasses;
    dataset.inputs.resize(count * kFeatures);
    dataset.labels.resize(count);
    for (int64_t i = 0; i < count; ++i) {
      const int32_t label = static_cast<int32_t>(random.below(kClasses));
      dataset.labels[i] = label;
      for (int64_t f = 0; f < kFeatures; ++f)
        dataset.inputs[i * kFeatures + f] = centers[label * kFeatures + f] + static_cast<float>(random.normal());
    }
    return dataset;
  };
  TrainTest splits;
  splits.train = make(trainSamples);
  splits.test = make(std::max<int64_t>(1, trainSamples / 4));
  return splits;
}

ShardedBatches::ShardedBatches(int64_t datasetSize, int64_t globalBatch, uint64_t seed, int rank, int worldSize)
    : datasetSize_(datasetSize),
      globalBatch_(globalBatch),
      seed_(seed),
      rank_(rank),
      worldSize_(worldSize),
      stepsPerEpoch_(datasetSize / globalBatch) {}

const std::vector<int64_t>& ShardedBatches::shard(int64_t step) {
  const int64_t epoch = step / stepsPerEpoch_;
  if (epoch != cachedEpoch_) {
    Random random(seed_, /*stream=*/static_cast<uint64_t>(epoch));
    permutation_ = random.permutation(datasetSize_);
    cachedEpoch_ = epoch;
  }
  const int64_t local = localBatch();
  const int64_t begin = (step % stepsPerEpoch_) * globalBatch_ + rank_ * local;
  shard_.assign(permutation_.begin() + begin, permutation_.begin() + begin + local);
  return shard_;
}

}  // namespace tandem::data
