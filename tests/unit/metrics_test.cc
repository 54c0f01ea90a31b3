// The worker's /metrics endpoint: it serves the DESIGN.md §8 names with their labels, and stopping it
// never hangs, even right after it started (before its thread got a CPU).
#include <httplib.h>

#include <gtest/gtest.h>

#include "tandem/metrics/worker_metrics.h"

namespace tandem {
namespace {

TEST(WorkerMetrics, ServesTheMetricsWithJobRankAndStage) {
  auto metrics = metrics::WorkerMetrics::start("127.0.0.1:0", "ns/job", 3, 1);
  ASSERT_TRUE(metrics.ok()) << metrics.status().toString();
  (*metrics)->observeStep(0.25, 64, 0);
  (*metrics)->setPipelineBubbleRatio(0.125);
  httplib::Client client("127.0.0.1", (*metrics)->port());
  auto response = client.Get("/metrics");
  ASSERT_TRUE(response) << httplib::to_string(response.error());
  EXPECT_EQ(response->status, 200);
  EXPECT_NE(response->body.find(R"(tandem_samples_total{job="ns/job",rank="3",stage="1"} 64)"), std::string::npos)
      << response->body;
  EXPECT_NE(response->body.find(R"(tandem_pipeline_bubble_ratio{job="ns/job",rank="3",stage="1"} 0.125)"),
            std::string::npos);
}

TEST(WorkerMetrics, StoppingRightAfterStartingNeverHangs) {
  // Each round destroys the endpoint at once; before the fix one of the first few waited forever.
  for (int round = 0; round < 200; ++round) {
    auto metrics = metrics::WorkerMetrics::start("127.0.0.1:0", "ns/job", 0, 0);
    ASSERT_TRUE(metrics.ok()) << metrics.status().toString();
  }
}

TEST(WorkerMetrics, ABadAddressIsNamed) {
  auto metrics = metrics::WorkerMetrics::start("no-port", "ns/job", 0, 0);
  ASSERT_FALSE(metrics.ok());
  EXPECT_NE(metrics.status().message().find("no-port"), std::string::npos);
}

}  // namespace
}  // namespace tandem
