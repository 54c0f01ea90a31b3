// checkpoint: CheckpointStore (bitwise round trip, on-disk layout and `latest`, step listing, keep, corruption
// and truncation detection, fallback to older checkpoints, model mismatch, failed and replacing writes, stale
// temporary debris) and AsyncCheckpointer (ordered background writes, keep, failure reporting, drain).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <stdlib.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tandem/checkpoint/checkpoint.h"
#include "tandem/common/status.h"

namespace tandem::checkpoint {
namespace {

namespace fs = std::filesystem;

const char* const kModel = "mlp 784-256-128-10 relu";

// A fresh directory per test (mkdtemp under /tmp), removed afterwards.
class TempDir {
 public:
  TempDir() {
    std::string pattern = "/tmp/tandem-checkpoint-test-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) ADD_FAILURE() << "mkdtemp failed: " << std::strerror(errno);
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code error;
    fs::remove_all(path_, error);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

float fromBits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

std::vector<uint32_t> bitsOf(const std::vector<float>& values) {
  std::vector<uint32_t> bits(values.size());
  if (!values.empty()) std::memcpy(bits.data(), values.data(), values.size() * sizeof(float));
  return bits;
}

// Values that only survive a bitwise round trip (negative zero, NaN payloads, denormals, infinities),
// followed by ordinary values that differ from step to step.
std::vector<float> sampleValues(size_t count, int64_t step, float scale) {
  static const uint32_t kSpecial[] = {0x80000000u, 0x7fc00001u, 0xffa5a5a5u, 0x7f800000u,
                                      0xff800000u, 0x00000001u, 0x807fffffu, 0x7f7fffffu};
  std::vector<float> values;
  for (size_t i = 0; i < count; ++i)
    values.push_back(i < std::size(kSpecial) ? fromBits(kSpecial[i])
                                             : scale * (static_cast<float>(step) + 0.001f * static_cast<float>(i)));
  return values;
}

CheckpointState makeState(int64_t step, size_t parameters = 37, size_t optimizerState = 74,
                          const std::string& model = kModel) {
  CheckpointState state;
  state.step = step;
  state.optimizerSteps = step + 1000;
  state.stage = 0;
  state.job = "research/mnist-" + std::to_string(step);
  state.modelDescription = model;
  state.trainingConfig = "batchSize: 64\nlearningRate: 0.01\nnote: \"quoted\" \\ tab\t \xc3\xa9t\xc3\xa9\n";
  state.seed = 0xfedcba9876543210ull + static_cast<uint64_t>(step);
  state.parameters = sampleValues(parameters, step, 1.0f);
  state.optimizerState = sampleValues(optimizerState, step, -0.5f);
  return state;
}

void expectSameState(const CheckpointState& actual, const CheckpointState& expected) {
  EXPECT_EQ(actual.step, expected.step);
  EXPECT_EQ(actual.optimizerSteps, expected.optimizerSteps);
  EXPECT_EQ(actual.stage, expected.stage);
  EXPECT_EQ(actual.job, expected.job);
  EXPECT_EQ(actual.modelDescription, expected.modelDescription);
  EXPECT_EQ(actual.trainingConfig, expected.trainingConfig);
  EXPECT_EQ(actual.seed, expected.seed);
  EXPECT_EQ(bitsOf(actual.parameters), bitsOf(expected.parameters));
  EXPECT_EQ(bitsOf(actual.optimizerState), bitsOf(expected.optimizerState));
}

std::string readText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

void writeText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

std::set<std::string> entries(const std::string& directory) {
  std::set<std::string> names;
  for (const auto& entry : fs::directory_iterator(directory)) names.insert(entry.path().filename().string());
  return names;
}

bool hasTemporaryDebris(const std::string& directory) {
  for (const auto& name : entries(directory))
    if (name.rfind(".tmp-", 0) == 0) return true;
  return false;
}

void flipByte(const std::string& path, std::streamoff offset) {
  std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(file.good()) << path;
  file.seekg(offset);
  char byte = 0;
  file.read(&byte, 1);
  ASSERT_TRUE(file.good());
  byte = static_cast<char>(byte ^ 0x01);
  file.seekp(offset);
  file.write(&byte, 1);
  ASSERT_TRUE(file.good());
}

void writeOrFail(CheckpointStore& store, const CheckpointState& state) {
  auto written = store.write(state);
  ASSERT_TRUE(written.ok()) << written.status().toString();
}

std::string shardPath(const TempDir& dir, const std::string& root, int64_t step, int stage = 0) {
  return dir / (root + "/" + stepDirectoryName(step) + "/stage-" + std::to_string(stage) + ".bin");
}

struct Warnings {
  std::vector<std::string> messages;
  std::function<void(const std::string&)> callback() {
    return [this](const std::string& message) { messages.push_back(message); };
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Writing and reading

TEST(ResumeExchangeDeadline, AllowsEachReadAndTheTransferATimeoutAndTheShardAtTwentyMegabytesPerSecond) {
  using std::chrono::milliseconds;
  using std::chrono::seconds;
  // keep 3: 4 reads + the transfer.
  EXPECT_EQ(resumeExchangeDeadline(seconds(30), 0.0, 3), seconds(150));
  EXPECT_EQ(resumeExchangeDeadline(seconds(30), 12e9, 3), seconds(5 * (30 + 600)));
  EXPECT_EQ(resumeExchangeDeadline(milliseconds(2500), 1e6, 1), milliseconds(3 * (2500 + 50)));
}

TEST(ResumeExchangeDeadline, IsBoundedForAnyKeepAndShard) {
  using std::chrono::seconds;
  constexpr auto kWeek = std::chrono::hours(24 * 7);
  EXPECT_EQ(resumeExchangeDeadline(seconds(30), 0.0, std::numeric_limits<int64_t>::max()), seconds(9 * 30));
  EXPECT_EQ(resumeExchangeDeadline(seconds(30), 0.0, 0), seconds(3 * 30));
  EXPECT_EQ(resumeExchangeDeadline(seconds(30), 1e18, 3), kWeek);
  EXPECT_EQ(resumeExchangeDeadline(seconds(30), std::numeric_limits<double>::infinity(), 3), kWeek);
  // Never shorter than the collective timeout, even one longer than a week (--collective-timeout 1e6).
  EXPECT_EQ(resumeExchangeDeadline(seconds(1000000), 1e18, 3), seconds(1000000));
}

TEST(CheckpointStore, WriteThenReadRoundTripsEveryFieldBitwise) {
  TempDir dir;
  CheckpointStore store(dir / "job", 3);
  CheckpointState state = makeState(12);
  state.seed = UINT64_MAX;  // the full unsigned range survives the JSON manifest
  writeOrFail(store, state);

  auto read = store.read(12);
  ASSERT_TRUE(read.ok()) << read.status().toString();
  expectSameState(*read, state);
  EXPECT_TRUE(std::isnan(read->parameters[1]));
  EXPECT_TRUE(std::signbit(read->parameters[0]));
}

TEST(CheckpointStore, LayoutIsStepDirectoryWithShardAndManifestAndLatest) {
  TempDir dir;
  CheckpointStore store(dir / "job", 3);
  EXPECT_EQ(store.root(), dir / "job");
  const CheckpointState state = makeState(12, 100, 200);
  auto written = store.write(state);
  ASSERT_TRUE(written.ok()) << written.status().toString();

  EXPECT_EQ(entries(dir / "job"), (std::set<std::string>{"step-00000012", "latest"}));
  EXPECT_EQ(entries(dir / "job/step-00000012"), (std::set<std::string>{"stage-0.bin", "manifest.json"}));
  EXPECT_EQ(readText(dir / "job/latest"), "step-00000012\n");
  EXPECT_FALSE(hasTemporaryDebris(dir / "job"));

  // The shard is the raw float32 parameters followed by the optimizer state.
  const std::string shard = readText(dir / "job/step-00000012/stage-0.bin");
  ASSERT_EQ(shard.size(), (100u + 200u) * sizeof(float));
  EXPECT_EQ(std::memcmp(shard.data(), state.parameters.data(), 100 * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(shard.data() + 100 * sizeof(float), state.optimizerState.data(), 200 * sizeof(float)), 0);
  // The byte count reported is the shard plus the manifest.
  EXPECT_EQ(*written, static_cast<int64_t>(shard.size() + fs::file_size(dir / "job/step-00000012/manifest.json")));
  const std::string manifest = readText(dir / "job/step-00000012/manifest.json");
  EXPECT_NE(manifest.find("\"sha256\""), std::string::npos) << manifest;
  EXPECT_NE(manifest.find(kModel), std::string::npos) << manifest;
}

TEST(CheckpointStore, LatestFollowsTheNewestWrite) {
  TempDir dir;
  CheckpointStore store(dir / "job", 5);
  writeOrFail(store, makeState(1));
  EXPECT_EQ(readText(dir / "job/latest"), "step-00000001\n");
  writeOrFail(store, makeState(2));
  EXPECT_EQ(readText(dir / "job/latest"), "step-00000002\n");
  EXPECT_EQ(entries(dir / "job"), (std::set<std::string>{"step-00000001", "step-00000002", "latest"}));
}

TEST(CheckpointStore, EmptySectionsRoundTrip) {
  TempDir dir;
  CheckpointStore store(dir / "job", 1);
  CheckpointState state = makeState(3, 0, 0);
  writeOrFail(store, state);
  EXPECT_EQ(fs::file_size(shardPath(dir, "job", 3)), 0u);
  auto read = store.read(3);
  ASSERT_TRUE(read.ok()) << read.status().toString();
  expectSameState(*read, state);
}

TEST(CheckpointStore, ShardIsNamedAfterItsStage) {
  TempDir dir;
  CheckpointStore store(dir / "job", 1);
  CheckpointState state = makeState(4);
  state.stage = 1;
  writeOrFail(store, state);
  EXPECT_EQ(entries(dir / "job/step-00000004"), (std::set<std::string>{"stage-1.bin", "manifest.json"}));
  auto read = store.read(4, 1);
  ASSERT_TRUE(read.ok()) << read.status().toString();
  expectSameState(*read, state);
  auto other = store.read(4, 0);
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(other.status().message().find("no shard for stage 0"), std::string::npos) << other.status().message();
}

TEST(CheckpointStore, ReadOfAbsentStepIsNotFound) {
  TempDir dir;
  CheckpointStore store(dir / "job", 1);
  writeOrFail(store, makeState(1));
  auto read = store.read(2);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), StatusCode::kNotFound);
  EXPECT_NE(read.status().message().find("step-00000002"), std::string::npos) << read.status().message();
}

// ---------------------------------------------------------------------------------------------------------------
// Names, listing and keep

TEST(StepDirectoryName, ZeroPadsToEightDigits) {
  EXPECT_EQ(stepDirectoryName(5), "step-00000005");
  EXPECT_EQ(stepDirectoryName(0), "step-00000000");
  EXPECT_EQ(stepDirectoryName(500), "step-00000500");
  EXPECT_EQ(stepDirectoryName(12345678), "step-12345678");
  EXPECT_EQ(stepDirectoryName(123456789), "step-123456789");  // wider steps are not truncated
}

TEST(CheckpointStore, ListStepsIsNewestFirstAndIgnoresUnrelatedEntries) {
  TempDir dir;
  CheckpointStore store(dir / "job", 10);
  for (int64_t step : {2, 10, 7}) writeOrFail(store, makeState(step, 4, 4));
  writeText(dir / "job/step-00000099", "a file, not a checkpoint directory");
  fs::create_directory(dir / "job/step-abc");
  fs::create_directory(dir / "job/.tmp-step-00000007-123");
  fs::create_directory(dir / "job/step-00000004x");
  fs::create_directory(dir / "job/step-4");
  fs::create_directory(dir / "job/unrelated");
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{10, 7, 2}));
}

TEST(CheckpointStore, ListStepsOfMissingRootIsEmpty) {
  TempDir dir;
  CheckpointStore store(dir / "never-written", 3);
  EXPECT_TRUE(store.listSteps().empty());
  EXPECT_FALSE(fs::exists(dir / "never-written"));
}

TEST(CheckpointStore, KeepRetainsOnlyTheNewest) {
  TempDir dir;
  CheckpointStore store(dir / "job", 3);
  for (int64_t step = 1; step <= 5; ++step) {
    writeOrFail(store, makeState(step, 8, 8));
    EXPECT_EQ(store.listSteps().size(), static_cast<size_t>(std::min<int64_t>(step, 3))) << "after step " << step;
  }
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{5, 4, 3}));
  EXPECT_EQ(entries(dir / "job"),
            (std::set<std::string>{"step-00000003", "step-00000004", "step-00000005", "latest"}));
  EXPECT_EQ(readText(dir / "job/latest"), "step-00000005\n");
  for (int64_t step : {3, 4, 5}) {
    auto read = store.read(step);
    ASSERT_TRUE(read.ok()) << read.status().toString();
    expectSameState(*read, makeState(step, 8, 8));
  }
  EXPECT_EQ(store.read(2).status().code(), StatusCode::kNotFound);
}

// After a resume that skipped a corrupt newest checkpoint, the run writes steps below it (a stop-time or
// final checkpoint lands on any step). Retention counts back from the checkpoint just written: the skipped
// one must not push the fresh, valid checkpoints out.
TEST(CheckpointStore, KeepCountsBackFromTheStepJustWritten) {
  TempDir dir;
  CheckpointStore store(dir / "job", 2);
  for (int64_t step : {10, 20, 30}) writeOrFail(store, makeState(step));
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{30, 20}));
  flipByte(shardPath(dir, "job", 30), 3);

  Warnings warnings;
  auto resumed = store.loadNewestValid(kModel, 0, warnings.callback());
  ASSERT_TRUE(resumed.ok()) << resumed.status().toString();
  ASSERT_TRUE(resumed->has_value());
  EXPECT_EQ((*resumed)->step, 20);

  writeOrFail(store, makeState(25));  // stopped at step 25
  EXPECT_TRUE(store.read(25).ok());
  EXPECT_TRUE(store.read(20).ok()) << "the older valid checkpoint was pruned in favour of the corrupt step 30";
  writeOrFail(store, makeState(26));
  EXPECT_TRUE(store.read(26).ok());
  EXPECT_TRUE(store.read(25).ok());
  EXPECT_EQ(store.read(20).status().code(), StatusCode::kNotFound);  // now genuinely beyond keep
  writeOrFail(store, makeState(30));  // the run reaches step 30 again and replaces the corrupt one
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{30, 26}));
  for (int64_t step : {26, 30}) EXPECT_TRUE(store.read(step).ok()) << step;

  // keep 1: the checkpoint just written must survive its own pruning.
  CheckpointStore single(dir / "single", 1);
  writeOrFail(single, makeState(20));
  writeOrFail(single, makeState(30));
  flipByte(shardPath(dir, "single", 30), 3);
  writeOrFail(single, makeState(25));
  auto read = single.read(25);
  ASSERT_TRUE(read.ok()) << read.status().toString();
  EXPECT_EQ(readText(dir / "single/latest"), "step-00000025\n");
  auto found = single.loadNewestValid(kModel, 0, nullptr);
  ASSERT_TRUE(found.ok()) << found.status().toString();
  ASSERT_TRUE(found->has_value()) << "no valid checkpoint left after a successful write";
  EXPECT_EQ((*found)->step, 25);
}

// A pipeline stage spares the newest step every stage holds (another stage's writes may have failed
// since): it stays beyond `keep` until a newer one is named.
TEST(CheckpointStore, PruningSparesTheStepItIsToldToKeep) {
  TempDir dir;
  CheckpointStore store(dir / "job", 2);
  for (int64_t step : {10, 20}) writeOrFail(store, makeState(step));
  for (int64_t step : {30, 40, 50}) ASSERT_TRUE(store.write(makeState(step), /*alsoKeep=*/20).ok());
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{50, 40, 20}));
  ASSERT_TRUE(store.write(makeState(60), /*alsoKeep=*/50).ok());
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{60, 50}));
  ASSERT_TRUE(store.write(makeState(70), /*alsoKeep=*/50).ok());
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{70, 60, 50}));
}

TEST(CheckpointStore, KeepBelowOneStillKeepsTheNewest) {
  TempDir dir;
  CheckpointStore store(dir / "job", 0);
  writeOrFail(store, makeState(1, 2, 2));
  writeOrFail(store, makeState(2, 2, 2));
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{2}));
}

// ---------------------------------------------------------------------------------------------------------------
// Corruption

class CorruptionTest : public ::testing::Test {
 protected:
  void SetUp() override { writeOrFail(store_, makeState(12, 64, 128)); }
  std::string stepFile(const std::string& name) const { return dir_ / ("job/step-00000012/" + name); }
  TempDir dir_;
  CheckpointStore store_{dir_ / "job", 3};
};

TEST_F(CorruptionTest, FlippedShardByteIsDataLossNamingSha256) {
  flipByte(stepFile("stage-0.bin"), 100);
  auto read = store_.read(12);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(read.status().message().find("SHA-256"), std::string::npos) << read.status().message();
  EXPECT_NE(read.status().message().find("stage-0.bin"), std::string::npos) << read.status().message();
}

TEST_F(CorruptionTest, TruncatedShardIsDataLossSayingTruncated) {
  fs::resize_file(stepFile("stage-0.bin"), (64 + 128) * sizeof(float) - 3);
  auto read = store_.read(12);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(read.status().message().find("truncated"), std::string::npos) << read.status().message();
}

TEST_F(CorruptionTest, OverlongShardIsDataLoss) {
  std::ofstream(stepFile("stage-0.bin"), std::ios::binary | std::ios::app) << "x";
  auto read = store_.read(12);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), StatusCode::kDataLoss);
}

TEST_F(CorruptionTest, ManifestThatIsNotJsonIsDataLoss) {
  const std::string manifest = readText(stepFile("manifest.json"));
  writeText(stepFile("manifest.json"), manifest.substr(0, manifest.size() / 2));  // a torn write
  auto read = store_.read(12);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(read.status().message().find("manifest.json"), std::string::npos) << read.status().message();

  writeText(stepFile("manifest.json"), "not json at all");
  EXPECT_EQ(store_.read(12).status().code(), StatusCode::kDataLoss);
}

TEST_F(CorruptionTest, ManifestMissingFieldsIsDataLoss) {
  writeText(stepFile("manifest.json"), "{}");
  auto read = store_.read(12);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), StatusCode::kDataLoss);
}

TEST_F(CorruptionTest, SectionCountsThatWrapAroundAreDataLossNotACrash) {
  // 2^62 + 192 floats are 2^64 + 768 bytes: in 64 bits exactly the shard's size. Read must neither
  // accept that nor try to allocate 2^62 floats (which threw out of read()).
  nlohmann::json manifest = nlohmann::json::parse(readText(stepFile("manifest.json")));
  ASSERT_EQ(manifest["shards"][0]["parameters"], 64);
  manifest.erase("manifestSha256");  // as an older checkpoint, which the manifest's own checksum does not guard
  manifest["shards"][0]["parameters"] = uint64_t{1} << 62;
  manifest["shards"][0]["optimizerState"] = 192;
  writeText(stepFile("manifest.json"), manifest.dump());
  auto read = store_.read(12);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(read.status().message().find("section sizes do not add up"), std::string::npos) << read.status().message();
}

TEST_F(CorruptionTest, ChangedManifestFieldsAreDataLossNamingTheManifest) {
  // Section counts that still add up: without the manifest's own checksum the shard would split wrongly.
  nlohmann::json manifest = nlohmann::json::parse(readText(stepFile("manifest.json")));
  ASSERT_TRUE(manifest.contains("manifestSha256"));
  manifest["shards"][0]["parameters"] = 65;
  manifest["shards"][0]["optimizerState"] = 127;
  writeText(stepFile("manifest.json"), manifest.dump(1));
  auto read = store_.read(12);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(read.status().message().find("manifest.json: its fields do not match their SHA-256"), std::string::npos)
      << read.status().message();
  // The same counts in a manifest of before the checksum: read, split as it says (what it guards against).
  manifest.erase("manifestSha256");
  writeText(stepFile("manifest.json"), manifest.dump(1));
  read = store_.read(12);
  ASSERT_TRUE(read.ok()) << read.status().message();
  EXPECT_EQ(read->parameters.size(), 65u);
}

TEST_F(CorruptionTest, ManifestOfAnotherStepIsDataLoss) {
  fs::rename(dir_ / "job/step-00000012", dir_ / "job/step-00000013");
  auto read = store_.read(13);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(read.status().message().find("says step 12"), std::string::npos) << read.status().message();
}

TEST_F(CorruptionTest, MissingManifestFails) {
  fs::remove(stepFile("manifest.json"));
  auto read = store_.read(12);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), StatusCode::kNotFound);
  EXPECT_NE(read.status().message().find("manifest.json"), std::string::npos) << read.status().message();
}

TEST_F(CorruptionTest, MissingShardFails) {
  fs::remove(stepFile("stage-0.bin"));
  auto read = store_.read(12);
  ASSERT_FALSE(read.ok());
  EXPECT_NE(read.status().message().find("stage-0.bin"), std::string::npos) << read.status().message();
}

// ---------------------------------------------------------------------------------------------------------------
// loadNewestValid

TEST(LoadNewestValid, FallsBackPastACorruptNewestAndSaysWhy) {
  TempDir dir;
  CheckpointStore store(dir / "job", 5);
  for (int64_t step : {10, 20, 30}) writeOrFail(store, makeState(step));
  flipByte(shardPath(dir, "job", 30), 7);

  Warnings warnings;
  auto found = store.loadNewestValid(kModel, 0, warnings.callback());
  ASSERT_TRUE(found.ok()) << found.status().toString();
  ASSERT_TRUE(found->has_value());
  expectSameState(**found, makeState(20));
  ASSERT_EQ(warnings.messages.size(), 1u);
  EXPECT_NE(warnings.messages[0].find("step-00000030"), std::string::npos) << warnings.messages[0];
  EXPECT_NE(warnings.messages[0].find("SHA-256"), std::string::npos) << warnings.messages[0];
}

TEST(LoadNewestValid, AllCorruptIsNulloptWithOkStatus) {
  TempDir dir;
  CheckpointStore store(dir / "job", 5);
  for (int64_t step : {10, 20, 30}) writeOrFail(store, makeState(step));
  flipByte(shardPath(dir, "job", 10), 0);
  fs::resize_file(shardPath(dir, "job", 20), 5);
  fs::remove(dir / "job/step-00000030/manifest.json");

  Warnings warnings;
  auto found = store.loadNewestValid(kModel, 0, warnings.callback());
  ASSERT_TRUE(found.ok()) << found.status().toString();
  EXPECT_FALSE(found->has_value());
  ASSERT_EQ(warnings.messages.size(), 3u);
  EXPECT_NE(warnings.messages[0].find("step-00000030"), std::string::npos) << warnings.messages[0];
  EXPECT_NE(warnings.messages[1].find("step-00000020"), std::string::npos) << warnings.messages[1];
  EXPECT_NE(warnings.messages[2].find("step-00000010"), std::string::npos) << warnings.messages[2];

  // Without a callback the corrupt checkpoints are still skipped.
  auto quiet = store.loadNewestValid(kModel, 0, nullptr);
  ASSERT_TRUE(quiet.ok()) << quiet.status().toString();
  EXPECT_FALSE(quiet->has_value());
}

TEST(LoadNewestValid, NoDirectoryIsNullopt) {
  TempDir dir;
  CheckpointStore store(dir / "absent/job", 5);
  Warnings warnings;
  auto found = store.loadNewestValid(kModel, 0, warnings.callback());
  ASSERT_TRUE(found.ok()) << found.status().toString();
  EXPECT_FALSE(found->has_value());
  EXPECT_TRUE(warnings.messages.empty());
}

TEST(LoadNewestValid, OtherModelIsFailedPreconditionNamingBoth) {
  TempDir dir;
  CheckpointStore store(dir / "job", 5);
  writeOrFail(store, makeState(10));  // this job's model, older
  writeOrFail(store, makeState(20, 37, 74, "mlp 784-512-10 gelu"));

  Warnings warnings;
  auto found = store.loadNewestValid(kModel, 0, warnings.callback());
  ASSERT_FALSE(found.ok());
  EXPECT_EQ(found.status().code(), StatusCode::kFailedPrecondition);
  const std::string& message = found.status().message();
  EXPECT_NE(message.find("mlp 784-512-10 gelu"), std::string::npos) << message;
  EXPECT_NE(message.find(kModel), std::string::npos) << message;
  EXPECT_NE(message.find("step-00000020"), std::string::npos) << message;
  EXPECT_TRUE(warnings.messages.empty());
}

// ---------------------------------------------------------------------------------------------------------------
// Failed, replacing and interrupted writes

TEST(CheckpointStore, FailedWriteBelowARegularFileLeavesOtherCheckpointsUntouched) {
  TempDir dir;
  CheckpointStore good(dir / "good", 5);
  writeOrFail(good, makeState(1));
  writeOrFail(good, makeState(2));
  writeText(dir / "blocker", "a regular file");

  CheckpointStore bad(dir / "blocker/job", 5);
  auto written = bad.write(makeState(3));
  ASSERT_FALSE(written.ok());
  EXPECT_NE(written.status().message().find(dir / "blocker/job"), std::string::npos) << written.status().message();
  EXPECT_TRUE(bad.listSteps().empty());
  EXPECT_EQ(readText(dir / "blocker"), "a regular file");

  // A root that is itself a regular file fails the same way.
  CheckpointStore fileRoot(dir / "blocker", 5);
  EXPECT_FALSE(fileRoot.write(makeState(3)).ok());
  EXPECT_EQ(readText(dir / "blocker"), "a regular file");

  EXPECT_EQ(good.listSteps(), (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(readText(dir / "good/latest"), "step-00000002\n");
  for (int64_t step : {1, 2}) {
    auto read = good.read(step);
    ASSERT_TRUE(read.ok()) << read.status().toString();
    expectSameState(*read, makeState(step));
  }
}

// Limits the size of files this process may write for its lifetime (RLIMIT_FSIZE binds root too), with
// SIGXFSZ ignored so an oversized write() fails with EFBIG instead of killing the process.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    ::getrlimit(RLIMIT_FSIZE, &saved_);
    previousHandler_ = std::signal(SIGXFSZ, SIG_IGN);
    rlimit limited = saved_;
    limited.rlim_cur = bytes;
    active_ = ::setrlimit(RLIMIT_FSIZE, &limited) == 0;
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &saved_);
    std::signal(SIGXFSZ, previousHandler_);
  }
  bool active() const { return active_; }

 private:
  rlimit saved_{};
  void (*previousHandler_)(int) = SIG_DFL;
  bool active_ = false;
};

TEST(CheckpointStore, FailedShardWriteKeepsEarlierCheckpointsAndLeavesNoDebris) {
  TempDir dir;
  CheckpointStore store(dir / "job", 2);
  writeOrFail(store, makeState(1));
  writeOrFail(store, makeState(2));

  // 1 MiB of parameters against a 64 KiB file size limit: the shard write fails part way.
  std::optional<StatusOr<int64_t>> newer, sameStep;
  {
    FileSizeLimit limit(64 * 1024);
    ASSERT_TRUE(limit.active());
    newer = store.write(makeState(3, 256 * 1024, 16));
    sameStep = store.write(makeState(2, 256 * 1024, 16));  // would replace step 2
  }
  ASSERT_FALSE(newer->ok());
  EXPECT_NE(newer->status().message().find("step-00000003 not written"), std::string::npos)
      << newer->status().message();
  EXPECT_NE(newer->status().message().find("stage-0.bin"), std::string::npos) << newer->status().message();
  ASSERT_FALSE(sameStep->ok());

  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(readText(dir / "job/latest"), "step-00000002\n");
  EXPECT_FALSE(hasTemporaryDebris(dir / "job"));
  for (int64_t step : {1, 2}) {
    auto read = store.read(step);
    ASSERT_TRUE(read.ok()) << read.status().toString();
    expectSameState(*read, makeState(step));
  }
  // The store still works once the cause is gone.
  writeOrFail(store, makeState(3, 256 * 1024, 16));
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{3, 2}));
}

TEST(CheckpointStore, RewritingAStepReplacesItWhole) {
  TempDir dir;
  CheckpointStore store(dir / "job", 3);
  writeOrFail(store, makeState(7, 50, 100));
  CheckpointState replacement = makeState(8, 20, 10);  // other values and sizes...
  replacement.step = 7;                                // ...for the same step
  replacement.job = "research/restarted";
  writeOrFail(store, replacement);

  auto read = store.read(7);
  ASSERT_TRUE(read.ok()) << read.status().toString();
  expectSameState(*read, replacement);
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{7}));
  EXPECT_EQ(entries(dir / "job/step-00000007"), (std::set<std::string>{"stage-0.bin", "manifest.json"}));
  EXPECT_EQ(fs::file_size(shardPath(dir, "job", 7)), (20u + 10u) * sizeof(float));
  EXPECT_EQ(readText(dir / "job/latest"), "step-00000007\n");
  EXPECT_FALSE(hasTemporaryDebris(dir / "job"));
}

TEST(CheckpointStore, StaleTemporaryDirectoryIsRemovedByTheNextWrite) {
  TempDir dir;
  fs::create_directories(dir / "job/.tmp-step-00000003-999");
  writeText(dir / "job/.tmp-step-00000003-999/stage-0.bin", "half a shard");
  fs::create_directories(dir / "job/.tmp-step-00000002-1/nested");

  CheckpointStore store(dir / "job", 3);
  writeOrFail(store, makeState(4));
  EXPECT_FALSE(fs::exists(dir / "job/.tmp-step-00000003-999"));
  EXPECT_FALSE(fs::exists(dir / "job/.tmp-step-00000002-1"));
  EXPECT_EQ(entries(dir / "job"), (std::set<std::string>{"step-00000004", "latest"}));
}

// ---------------------------------------------------------------------------------------------------------------
// AsyncCheckpointer

// Far longer than any write here: only the tests about hung writes use a short timeout.
constexpr std::chrono::milliseconds kNoHang(60000);

std::optional<AsyncCheckpointer::Result> drained(AsyncCheckpointer& checkpointer) {
  auto result = checkpointer.drain();
  EXPECT_TRUE(result.ok()) << result.status().toString();
  return result.ok() ? *result : std::nullopt;
}

struct Recorder {
  std::mutex mutex;
  std::vector<AsyncCheckpointer::Result> results;
  std::function<void(const AsyncCheckpointer::Result&)> callback() {
    return [this](const AsyncCheckpointer::Result& result) {
      std::lock_guard<std::mutex> lock(mutex);
      results.push_back(result);
    };
  }
  std::vector<AsyncCheckpointer::Result> snapshot() {
    std::lock_guard<std::mutex> lock(mutex);
    return results;
  }
};

TEST(AsyncCheckpointer, WritesEverySubmissionInOrder) {
  TempDir dir;
  Recorder recorder;
  AsyncCheckpointer checkpointer(CheckpointStore(dir / "job", 10), kNoHang, 0, recorder.callback());
  EXPECT_EQ(checkpointer.store().root(), dir / "job");
  for (int64_t step = 1; step <= 5; ++step) ASSERT_TRUE(checkpointer.submit(makeState(step)).ok());
  const auto last = drained(checkpointer);

  ASSERT_TRUE(last.has_value());
  EXPECT_EQ(last->step, 5);
  EXPECT_TRUE(last->status.ok()) << last->status.toString();
  EXPECT_GT(last->bytes, 0);
  const auto results = recorder.snapshot();
  ASSERT_EQ(results.size(), 5u);
  for (size_t i = 0; i < results.size(); ++i) {
    EXPECT_EQ(results[i].step, static_cast<int64_t>(i + 1));
    EXPECT_TRUE(results[i].status.ok()) << results[i].status.toString();
    EXPECT_GT(results[i].bytes, 0);
    EXPECT_GE(results[i].seconds, 0.0);
  }
  EXPECT_EQ(last->bytes, results.back().bytes);
  const CheckpointStore& store = checkpointer.store();
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{5, 4, 3, 2, 1}));
  for (int64_t step = 1; step <= 5; ++step) {
    auto read = store.read(step);
    ASSERT_TRUE(read.ok()) << read.status().toString();
    expectSameState(*read, makeState(step));
  }
  EXPECT_EQ(readText(dir / "job/latest"), "step-00000005\n");
}

TEST(AsyncCheckpointer, KeepTwoLeavesTheLastTwo) {
  TempDir dir;
  Recorder recorder;
  AsyncCheckpointer checkpointer(CheckpointStore(dir / "job", 2), kNoHang, 0, recorder.callback());
  for (int64_t step = 1; step <= 5; ++step) ASSERT_TRUE(checkpointer.submit(makeState(step)).ok());
  const auto last = drained(checkpointer);
  ASSERT_TRUE(last.has_value());
  EXPECT_TRUE(last->status.ok()) << last->status.toString();
  EXPECT_EQ(recorder.snapshot().size(), 5u);
  EXPECT_EQ(checkpointer.store().listSteps(), (std::vector<int64_t>{5, 4}));
  EXPECT_EQ(entries(dir / "job"), (std::set<std::string>{"step-00000004", "step-00000005", "latest"}));
}

TEST(AsyncCheckpointer, PruningSparesTheStepSubmittedWithTheState) {
  TempDir dir;
  Recorder recorder;
  AsyncCheckpointer checkpointer(CheckpointStore(dir / "job", 1), kNoHang, 0, recorder.callback());
  ASSERT_TRUE(checkpointer.submit(makeState(1)).ok());
  for (int64_t step = 2; step <= 4; ++step)
    ASSERT_TRUE(checkpointer.submit(makeState(step), AsyncCheckpointer::Clock::time_point::max(), 1).ok());
  drained(checkpointer);
  EXPECT_EQ(checkpointer.store().listSteps(), (std::vector<int64_t>{4, 1}));
}

TEST(AsyncCheckpointer, ReportsAFailureAndKeepsWriting) {
  TempDir dir;
  writeText(dir / "blocker", "a regular file where the checkpoint directory should go");
  Recorder recorder;
  AsyncCheckpointer checkpointer(CheckpointStore(dir / "blocker/job", 3), kNoHang, 0, recorder.callback());

  ASSERT_TRUE(checkpointer.submit(makeState(1)).ok());
  auto first = drained(checkpointer);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->step, 1);
  EXPECT_FALSE(first->status.ok());
  EXPECT_EQ(first->bytes, 0);

  ASSERT_TRUE(checkpointer.submit(makeState(2)).ok());  // still failing: the attempt is made and reported
  auto second = drained(checkpointer);
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->step, 2);
  EXPECT_FALSE(second->status.ok());

  fs::remove(dir / "blocker");  // the cause goes away; later submissions succeed
  ASSERT_TRUE(checkpointer.submit(makeState(3)).ok());
  auto third = drained(checkpointer);
  ASSERT_TRUE(third.has_value());
  EXPECT_EQ(third->step, 3);
  EXPECT_TRUE(third->status.ok()) << third->status.toString();

  const auto results = recorder.snapshot();
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results[0].step, 1);
  EXPECT_FALSE(results[0].status.ok());
  EXPECT_NE(results[0].status.message().find(dir / "blocker/job"), std::string::npos) << results[0].status.message();
  EXPECT_EQ(results[1].step, 2);
  EXPECT_FALSE(results[1].status.ok());
  EXPECT_EQ(results[2].step, 3);
  EXPECT_TRUE(results[2].status.ok());
  EXPECT_EQ(checkpointer.store().listSteps(), (std::vector<int64_t>{3}));
}

TEST(AsyncCheckpointer, DrainBeforeAnySubmissionIsNullopt) {
  TempDir dir;
  AsyncCheckpointer checkpointer(CheckpointStore(dir / "job", 3), kNoHang, 0, nullptr);
  EXPECT_FALSE(drained(checkpointer).has_value());
  EXPECT_FALSE(fs::exists(dir / "job"));
}

TEST(AsyncCheckpointer, ASubmissionWaitsUntilThePreviousOneIsDurable) {
  TempDir dir;
  // The writer pauses between the shard and the publish, so a write is observably in flight.
  ASSERT_EQ(::setenv("TANDEM_FAULT_CHECKPOINT_DELAY_MS", "200", 1), 0);
  {
    AsyncCheckpointer checkpointer(CheckpointStore(dir / "job", 3), kNoHang, 0, nullptr);
    ASSERT_TRUE(checkpointer.submit(makeState(1)).ok());
    ASSERT_TRUE(checkpointer.submit(makeState(2)).ok());  // returns only once step 1 is published
    EXPECT_EQ(checkpointer.store().listSteps(), (std::vector<int64_t>{1}));
    // The destructor finishes what was submitted.
  }
  ::unsetenv("TANDEM_FAULT_CHECKPOINT_DELAY_MS");
  CheckpointStore store(dir / "job", 3);
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{2, 1}));
  auto read = store.read(2);
  ASSERT_TRUE(read.ok()) << read.status().toString();
  expectSameState(*read, makeState(2));
}

TEST(AsyncCheckpointer, AWriteThatOutlastsTheTimeoutIsReportedInsteadOfWaitedFor) {
  TempDir dir;
  // Step 8's write stalls for 3 s: hung storage, as far as a 1 s timeout can tell.
  ASSERT_EQ(::setenv("TANDEM_FAULT_CHECKPOINT_DELAY_MS", "3000", 1), 0);
  Recorder recorder;
  const auto start = std::chrono::steady_clock::now();
  {
    AsyncCheckpointer checkpointer(CheckpointStore(dir / "job", 3), std::chrono::milliseconds(1000), 7,
                                   recorder.callback());
    ASSERT_TRUE(checkpointer.submit(makeState(8)).ok());
    EXPECT_EQ(checkpointer.stepInFlight(), std::optional<int64_t>(8));
    EXPECT_TRUE(checkpointer.checkWriter().ok());  // in flight, not yet hung
    // A snapshot that may not wait (training's periodic one) is told so at once.
    const Status busy = checkpointer.submit(makeState(9), std::chrono::steady_clock::now());
    EXPECT_EQ(busy.code(), StatusCode::kDeadlineExceeded) << busy.toString();
    EXPECT_NE(busy.message().find(", not durable when the snapshot of step-00000009 had to go on"), std::string::npos)
        << busy.message();
    // One that may wait is refused once the write turns hung.
    const Status refused = checkpointer.submit(makeState(9));
    EXPECT_EQ(refused.code(), StatusCode::kResourceUnavailable) << refused.toString();
    for (const std::string& part : {"checkpoint step-00000008 is being written to " + std::string(dir / "job") + " (for ",
                                    std::string("s), longer than the checkpoint timeout (1.0 s): the storage does not answer"),
                                    std::string("the last durable checkpoint is step-00000007")})
      EXPECT_NE(refused.message().find(part), std::string::npos) << refused.message();
    EXPECT_EQ(checkpointer.checkWriter().code(), StatusCode::kResourceUnavailable);
    EXPECT_EQ(checkpointer.drain().status().code(), StatusCode::kResourceUnavailable);
    // The destructor does not join a hung writer.
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(waited, 2.5) << "the owner waited for the stalled write to end";

  // The writer left behind still finishes step 8 (a whole checkpoint, not debris) but reports nothing:
  // the callback's owner may be gone.
  CheckpointStore store(dir / "job", 3);
  for (int i = 0; i < 100 && store.listSteps().empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // past the writer's last use of the environment
  ::unsetenv("TANDEM_FAULT_CHECKPOINT_DELAY_MS");
  ASSERT_EQ(store.listSteps(), (std::vector<int64_t>{8}));
  auto read = store.read(8);
  ASSERT_TRUE(read.ok()) << read.status().toString();
  EXPECT_TRUE(recorder.snapshot().empty());
}

TEST(AsyncCheckpointer, DrainEndsAtTheCallersDeadlineAndTheWriteStillLands) {
  TempDir dir;
  ASSERT_EQ(::setenv("TANDEM_FAULT_CHECKPOINT_DELAY_MS", "500", 1), 0);
  Recorder recorder;
  {
    AsyncCheckpointer checkpointer(CheckpointStore(dir / "job", 3), kNoHang, 0, recorder.callback());
    ASSERT_TRUE(checkpointer.submit(makeState(1)).ok());
    // A stop's grace period ends before the write does.
    auto early = checkpointer.drain(std::chrono::steady_clock::now() + std::chrono::milliseconds(50));
    EXPECT_EQ(early.status().code(), StatusCode::kDeadlineExceeded) << early.status().toString();
    EXPECT_NE(early.status().message().find(", not durable when the wait for it had to go on; the last durable "
                                            "checkpoint is none"),
              std::string::npos)
        << early.status().message();
    // Waiting again (without a deadline of its own) sees it land, reported once.
    const auto last = drained(checkpointer);
    ASSERT_TRUE(last.has_value());
    EXPECT_EQ(last->step, 1);
    EXPECT_TRUE(last->status.ok()) << last->status.toString();
    EXPECT_FALSE(checkpointer.stepInFlight().has_value());
  }
  ::unsetenv("TANDEM_FAULT_CHECKPOINT_DELAY_MS");
  ASSERT_EQ(recorder.snapshot().size(), 1u);
  EXPECT_EQ(CheckpointStore(dir / "job", 3).listSteps(), (std::vector<int64_t>{1}));
}

TEST(AsyncCheckpointer, TheDestructorWaitsNoLongerThanItsShutdownLimit) {
  TempDir dir;
  // A slow write, not a hung one: a stop's grace period ends first.
  ASSERT_EQ(::setenv("TANDEM_FAULT_CHECKPOINT_DELAY_MS", "2000", 1), 0);
  Recorder recorder;
  const auto start = std::chrono::steady_clock::now();
  {
    AsyncCheckpointer checkpointer(CheckpointStore(dir / "job", 3), kNoHang, 0, recorder.callback());
    checkpointer.limitShutdown(std::chrono::milliseconds(60000));
    checkpointer.limitShutdown(start + std::chrono::milliseconds(300));  // the earlier limit wins
    ASSERT_TRUE(checkpointer.submit(makeState(1)).ok());
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(waited, 1.5) << "the destructor waited past its limit";
  EXPECT_GE(waited, 0.25);
  CheckpointStore store(dir / "job", 3);
  for (int i = 0; i < 100 && store.listSteps().empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ::unsetenv("TANDEM_FAULT_CHECKPOINT_DELAY_MS");
  EXPECT_EQ(store.listSteps(), (std::vector<int64_t>{1}));  // left behind, it still lands whole
  EXPECT_TRUE(recorder.snapshot().empty());
}

}  // namespace
}  // namespace tandem::checkpoint
