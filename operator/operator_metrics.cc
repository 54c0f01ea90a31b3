#include "tandem/operator/operator_metrics.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

namespace tandem::operator_core {

namespace {
constexpr const char* kPhases[] = {"Pending", "Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended"};
}

OperatorMetrics::OperatorMetrics() : registry_(std::make_shared<prometheus::Registry>()) {
  reconcileSeconds_ = &prometheus::BuildHistogram()
                           .Name("tandem_operator_reconcile_seconds")
                           .Help("Time to reconcile one job: decide and apply the plan")
                           .Register(*registry_)
                           .Add({}, prometheus::Histogram::BucketBoundaries{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                                             0.1, 0.25, 0.5, 1, 2.5, 5, 10});
  podsCreated_ = &prometheus::BuildCounter()
                      .Name("tandem_operator_pods_created_total")
                      .Help("Worker pods created")
                      .Register(*registry_)
                      .Add({});
  jobRestarts_ = &prometheus::BuildCounter()
                      .Name("tandem_operator_job_restarts_total")
                      .Help("Gang restarts, counted ones and disruptions")
                      .Register(*registry_)
                      .Add({});
  workqueueDepth_ = &prometheus::BuildGauge()
                         .Name("tandem_operator_workqueue_depth")
                         .Help("Job keys waiting to be reconciled")
                         .Register(*registry_)
                         .Add({});
  jobs_ = &prometheus::BuildGauge().Name("tandem_operator_jobs").Help("Jobs by phase").Register(*registry_);
  for (const char* phase : kPhases) jobs_->Add({{"phase", phase}}).Set(0);
}

OperatorMetrics::~OperatorMetrics() = default;

void OperatorMetrics::observeReconcile(double seconds) { reconcileSeconds_->Observe(seconds); }
void OperatorMetrics::addPodsCreated(double count) { podsCreated_->Increment(count); }
void OperatorMetrics::addJobRestarts(double count) { jobRestarts_->Increment(count); }
void OperatorMetrics::setWorkqueueDepth(double depth) { workqueueDepth_->Set(depth); }

void OperatorMetrics::setJobsByPhase(const std::map<std::string, int64_t>& counts) {
  for (const char* phase : kPhases) {
    auto it = counts.find(phase);
    jobs_->Add({{"phase", phase}}).Set(it == counts.end() ? 0.0 : static_cast<double>(it->second));
  }
}

std::string OperatorMetrics::render() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace tandem::operator_core
