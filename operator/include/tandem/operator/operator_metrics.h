// The operator's Prometheus metrics (DESIGN.md §8), rendered in the text format by the operator's own
// HTTP server next to /healthz and /readyz.
#pragma once

#include <map>
#include <memory>
#include <string>

namespace prometheus {
class Registry;
class Histogram;
class Counter;
class Gauge;
template <typename T>
class Family;
}  // namespace prometheus

namespace tandem::operator_core {

class OperatorMetrics {
 public:
  OperatorMetrics();
  ~OperatorMetrics();

  void observeReconcile(double seconds);
  void addPodsCreated(double count);
  void addJobRestarts(double count);
  void setWorkqueueDepth(double depth);
  // Jobs per phase ("" counts as "Pending": no status written yet); phases absent from the map go to 0.
  void setJobsByPhase(const std::map<std::string, int64_t>& counts);

  std::string render() const;  // the text exposition format

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Histogram* reconcileSeconds_;
  prometheus::Counter* podsCreated_;
  prometheus::Counter* jobRestarts_;
  prometheus::Gauge* workqueueDepth_;
  prometheus::Family<prometheus::Gauge>* jobs_;
};

}  // namespace tandem::operator_core
