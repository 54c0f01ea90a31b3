// common: Status/StatusOr and the error macros, exit codes per status class, FNV-1a against its published
// test vectors, the seeded Random (determinism, ranges, permutations), cgroup CPU limits and flag parsing.
#include <gtest/gtest.h>

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "tandem/common/cpu_limit.h"
#include "tandem/common/exit_codes.h"
#include "tandem/common/flags.h"
#include "tandem/common/hash.h"
#include "tandem/common/random.h"
#include "tandem/common/status.h"

namespace tandem {
namespace {

TEST(Status, OkByDefault) {
  const Status status;
  EXPECT_TRUE(status.ok());
  EXPECT_EQ(status.code(), StatusCode::kOk);
  EXPECT_EQ(status.toString(), "OK");
}

TEST(Status, ToStringCarriesCodeMessageAndOrigin) {
  const Status status = TANDEM_ERROR(StatusCode::kDataLoss, "train-images: truncated");
  EXPECT_FALSE(status.ok());
  const std::string text = status.toString();
  EXPECT_EQ(text.rfind("DATA_LOSS: train-images: truncated (common_test.cc:", 0), 0u) << text;
  EXPECT_EQ(text.back(), ')');
}

TEST(Status, WithContextPrependsAndKeepsTheCode) {
  const Status status = Status(StatusCode::kNotFound, "x.bin missing").withContext("loading checkpoint");
  EXPECT_EQ(status.code(), StatusCode::kNotFound);
  EXPECT_EQ(status.message(), "loading checkpoint: x.bin missing");
  EXPECT_TRUE(Status::Ok().withContext("ignored").ok());
}

StatusOr<int> parsePositive(int value) {
  if (value <= 0) return TANDEM_ERROR(StatusCode::kInvalidArgument, "not positive");
  return value;
}

Status doubleIt(int value, int& out) {
  TANDEM_ASSIGN_OR_RETURN(int parsed, parsePositive(value));
  out = parsed * 2;
  return Status::Ok();
}

Status chain(int value) {
  int out = 0;
  TANDEM_RETURN_IF_ERROR(doubleIt(value, out));
  return out == 2 * value ? Status::Ok() : TANDEM_ERROR(StatusCode::kInternal, "wrong");
}

TEST(StatusOr, ValueOrStatusAndMacros) {
  auto good = parsePositive(4);
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(*good, 4);
  EXPECT_TRUE(good.status().ok());
  auto bad = parsePositive(-1);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);

  int out = 0;
  EXPECT_TRUE(doubleIt(21, out).ok());
  EXPECT_EQ(out, 42);
  EXPECT_EQ(doubleIt(0, out).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(chain(3).ok());
  EXPECT_EQ(chain(-3).message(), "not positive");
}

TEST(ExitCodes, PermanentAndRetryableClasses) {
  struct Case {
    StatusCode code;
    int exit;
  };
  for (const Case& c : {Case{StatusCode::kOk, 0}, Case{StatusCode::kInvalidArgument, kExitInvalidConfig},
                        Case{StatusCode::kNotFound, kExitBadData}, Case{StatusCode::kDataLoss, kExitBadData},
                        Case{StatusCode::kPermissionDenied, kExitRefused},
                        Case{StatusCode::kFailedPrecondition, kExitRefused},
                        Case{StatusCode::kAlreadyExists, kExitRefused}, Case{StatusCode::kUnavailable, kExitPeerLost},
                        Case{StatusCode::kDeadlineExceeded, kExitPeerLost}, Case{StatusCode::kAborted, kExitPeerLost},
                        Case{StatusCode::kCancelled, kExitTerminated}, Case{StatusCode::kInternal, kExitInternal},
                        Case{StatusCode::kResourceUnavailable, kExitResourceUnavailable}}) {
    EXPECT_EQ(exitCodeFor(Status(c.code, "x")), c.exit) << statusCodeName(c.code);
  }
  // DESIGN.md §3: 1-127 permanent, 128+ retryable.
  EXPECT_FALSE(isRetryableExit(kExitInvalidConfig));
  EXPECT_FALSE(isRetryableExit(kExitBadData));
  EXPECT_FALSE(isRetryableExit(kExitRefused));
  EXPECT_TRUE(isRetryableExit(kExitPeerLost));
  EXPECT_TRUE(isRetryableExit(kExitTerminated));
  EXPECT_TRUE(isRetryableExit(kExitResourceUnavailable));
  EXPECT_NE(kExitResourceUnavailable, kExitPeerLost);  // a cause must read differently from its symptom
}

TEST(Hash, Fnv1a64PublishedVectors) {
  EXPECT_EQ(fnv1a64(""), 0xcbf29ce484222325ull);
  EXPECT_EQ(fnv1a64("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(fnv1a64("foobar"), 0x85944171f73967e8ull);
  EXPECT_EQ(toHex64(0xaf63dc4c8601ec8cull), "af63dc4c8601ec8c");
  EXPECT_EQ(toHex64(1), "0000000000000001");
}

TEST(Random, SameSeedSameStreamDifferentSeedOrStreamDifferent) {
  Random a(7), b(7), c(8), d(7, 1), e(7, 2);
  std::vector<uint64_t> va, vb, vc, vd, ve;
  for (int i = 0; i < 16; ++i) {
    va.push_back(a.next());
    vb.push_back(b.next());
    vc.push_back(c.next());
    vd.push_back(d.next());
    ve.push_back(e.next());
  }
  EXPECT_EQ(va, vb);
  EXPECT_NE(va, vc);
  EXPECT_NE(vd, ve);
}

TEST(Random, StdMt19937_64ReferenceValue) {
  // The C++ standard fixes the 10000th output of a default-seeded mt19937_64: the stream is portable.
  Random random(5489u);
  uint64_t value = 0;
  for (int i = 0; i < 10000; ++i) value = random.next();
  EXPECT_EQ(value, 9981545732273789042ull);
}

TEST(Random, RangesAndMoments) {
  Random random(3);
  double sum = 0.0, sumSquares = 0.0;
  constexpr int kSamples = 20000;
  for (int i = 0; i < kSamples; ++i) {
    const double u = random.uniform();
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    const double x = random.uniform(-2.0, 3.0);
    ASSERT_GE(x, -2.0);
    ASSERT_LT(x, 3.0);
    ASSERT_LT(random.below(7), 7u);
    const double n = random.normal();
    sum += n;
    sumSquares += n * n;
  }
  EXPECT_NEAR(sum / kSamples, 0.0, 0.05);
  EXPECT_NEAR(sumSquares / kSamples, 1.0, 0.05);
}

TEST(Random, PermutationIsAPermutation) {
  Random random(11);
  const auto order = random.permutation(1000);
  std::vector<int64_t> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> identity(1000);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(sorted, identity);
  EXPECT_NE(order, identity);
  EXPECT_TRUE(Random(0).permutation(0).empty());
}

TEST(Random, BelowCoversEveryValue) {
  Random random(5);
  std::set<uint64_t> seen;
  for (int i = 0; i < 200; ++i) seen.insert(random.below(5));
  EXPECT_EQ(seen, (std::set<uint64_t>{0, 1, 2, 3, 4}));
}

// ---------------------------------------------------------------------------------------------- cpu limit

// A fake /sys/fs/cgroup and /proc/self/cgroup under a temporary directory.
class CgroupTree : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::temp_directory_path() / ("tandem-cgroup-test-" + std::to_string(getpid()));
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  void write(const std::string& relative, const std::string& text) {
    const auto path = root_ / relative;
    std::filesystem::create_directories(path.parent_path());
    std::ofstream(path) << text << "\n";
  }
  std::optional<double> limit() {
    return cgroupCpuLimit((root_ / "fs").string(), (root_ / "self-cgroup").string());
  }
  std::filesystem::path root_;
};

TEST_F(CgroupTree, V2TakesTheTightestQuotaAlongThePath) {
  write("self-cgroup", "0::/kubepods/pod1/worker");
  write("fs/kubepods/pod1/worker/cpu.max", "max 100000");
  write("fs/kubepods/pod1/cpu.max", "250000 100000");  // the pod's limit: 2.5 CPUs
  write("fs/kubepods/cpu.max", "800000 100000");
  ASSERT_TRUE(limit().has_value());
  EXPECT_DOUBLE_EQ(*limit(), 2.5);
}

TEST_F(CgroupTree, V2InsideACgroupNamespaceReadsTheMountRoot) {
  write("self-cgroup", "0::/");
  write("fs/cpu.max", "150000 100000");
  EXPECT_DOUBLE_EQ(limit().value_or(-1), 1.5);
}

TEST_F(CgroupTree, NoLimitAnywhereIsNone) {
  write("self-cgroup", "0::/user.slice/session");
  write("fs/user.slice/session/cpu.max", "max 100000");
  EXPECT_FALSE(limit().has_value());
  write("self-cgroup", "0::/gone");  // nothing readable at all
  EXPECT_FALSE(limit().has_value());
}

TEST_F(CgroupTree, V1QuotaAndPeriodWithAHostPathTheContainerCannotSee) {
  write("self-cgroup", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc");
  // The container sees its own cgroup at the mount's root; /docker/abc exists only on the host.
  write("fs/cpu,cpuacct/cpu.cfs_quota_us", "300000");
  write("fs/cpu,cpuacct/cpu.cfs_period_us", "100000");
  EXPECT_DOUBLE_EQ(limit().value_or(-1), 3.0);
  write("fs/cpu,cpuacct/cpu.cfs_quota_us", "-1");
  EXPECT_FALSE(limit().has_value());
}

TEST(CpusAvailable, CountsTheAffinityMaskNotTheMachine) {
  cpu_set_t saved;
  ASSERT_EQ(sched_getaffinity(0, sizeof(saved), &saved), 0);
  EXPECT_EQ(cpusAvailable(), CPU_COUNT(&saved));
  cpu_set_t one;
  CPU_ZERO(&one);
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
    if (CPU_ISSET(cpu, &saved)) {
      CPU_SET(cpu, &one);
      break;
    }
  ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);  // this thread only
  EXPECT_EQ(cpusAvailable(), 1);
  ASSERT_EQ(sched_setaffinity(0, sizeof(saved), &saved), 0);
}

TEST(CpusWithin, RoundsALimitUpWithinTheAffinityMask) {
  const int available = cpusAvailable();
  EXPECT_EQ(cpusWithin(std::nullopt), available);
  EXPECT_EQ(cpusWithin(0.5), 1);
  EXPECT_EQ(cpusWithin(1.0), 1);
  EXPECT_EQ(cpusWithin(1e9), available);
  if (available >= 2) {
    EXPECT_EQ(cpusWithin(1.5), 2);
  }
}

// Flags: the error names the flag and the range; values that would overflow a clock or a port are refused.
TEST(Flags, IntegersInRangeOnly) {
  EXPECT_EQ(parseIntegerFlag("--metrics-port", "9400", 0, 65535).value(), 9400);
  EXPECT_EQ(parseIntegerFlag("--metrics-port", "0", 0, 65535).value(), 0);
  for (const char* text : {"70000", "-1", "", "12x", "99999999999999999999"}) {
    const auto parsed = parseIntegerFlag("--metrics-port", text, 0, 65535);
    ASSERT_FALSE(parsed.ok()) << text;
    EXPECT_EQ(parsed.status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(parsed.status().message(),
              std::string("--metrics-port: expected an integer from 0 to 65535, got \"") + text + "\"");
  }
}

TEST(Flags, PositiveNumbersUpToTheirMaximum) {
  EXPECT_DOUBLE_EQ(parsePositiveFlag("--grace-seconds", "2.5", kMaxFlagSeconds).value(), 2.5);
  EXPECT_DOUBLE_EQ(parsePositiveFlag("--grace-seconds", "1e6", kMaxFlagSeconds).value(), 1e6);
  for (const char* text : {"0", "-3", "inf", "nan", "1e7", "1e400", "", "5s"}) {
    const auto parsed = parsePositiveFlag("--grace-seconds", text, kMaxFlagSeconds);
    ASSERT_FALSE(parsed.ok()) << text;
    EXPECT_EQ(parsed.status().message(),
              std::string("--grace-seconds: expected a positive number up to 1000000, got \"") + text + "\"");
  }
}

}  // namespace
}  // namespace tandem
