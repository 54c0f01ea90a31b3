#include "tandem/operator/event_recorder.h"

#include <optional>

#include "tandem/common/log.h"
#include "tandem/operator/api_convert.h"
#include "tandem/operator/controller.h"
#include "tandem/operator/naming.h"

namespace tandem::operator_core {
namespace {

using json = nlohmann::json;
using std::chrono::steady_clock;

constexpr size_t kMaxMessageBytes = 1024;  // what events.k8s.io allows a note; API error texts can be long
constexpr size_t kMaxRemembered = 4096;

// Cut on a character boundary: a split UTF-8 sequence would make the JSON unwritable.
std::string truncated(const std::string& message) {
  if (message.size() <= kMaxMessageBytes) return message;
  size_t cut = kMaxMessageBytes - 3;
  while (cut > 0 && (static_cast<unsigned char>(message[cut]) & 0xC0) == 0x80) --cut;  // a continuation byte
  return message.substr(0, cut) + "...";
}

}  // namespace

EventRecorder::EventRecorder(kube::KubeClient& client, std::string reportingInstance, std::chrono::seconds window)
    : client_(client), reportingInstance_(std::move(reportingInstance)), window_(window) {}

size_t EventRecorder::remembered() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return written_.size();
}

void EventRecorder::forgetOlderThanWindow(steady_clock::time_point now) {
  for (auto it = written_.begin(); it != written_.end();)
    it = now - it->second.lastWritten > window_ ? written_.erase(it) : std::next(it);
}

EventRecorder::Bumped EventRecorder::bump(Written& written, const std::string& now) {
  auto patched = client_.mergePatch(resources::kEvents.objectPath(written.nameSpace, written.name),
                                    {{"count", written.count + 1}, {"lastTimestamp", now}});
  if (patched.ok()) {
    ++written.count;
    return Bumped::kYes;
  }
  // Gone (expired by the API server's event TTL, or deleted): a new one.
  if (kube::isNotFound(patched.status())) return Bumped::kGone;
  // Anything else (the client has retried already): this occurrence goes uncounted rather than risking
  // a duplicate of an Event whose patch may have landed.
  log::warning() << "event " << written.name << ": " << patched.status().message();
  return Bumped::kFailed;
}

void EventRecorder::record(const JobObject& job, const EmitEvent& event) {
  // Best effort, never a reason to stop the caller: not even JSON that cannot be written.
  try {
    write(job, event);
  } catch (const nlohmann::json::exception& error) {
    log::warning() << "event " << event.reason << " on " << job.nameSpace << "/" << job.name << ": " << error.what();
  }
}

void EventRecorder::write(const JobObject& job, const EmitEvent& event) {
  const std::string message = truncated(event.message);
  const std::string key = job.uid + "\n" + eventTypeName(event.type) + "\n" + event.reason + "\n" + message;
  const auto seen = steady_clock::now();
  const std::string now = formatTime(Clock::now());
  std::optional<Written> earlier;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    forgetOlderThanWindow(seen);
    if (auto it = written_.find(key); it != written_.end()) earlier = it->second;
  }
  if (earlier) {
    const Bumped bumped = bump(*earlier, now);
    if (bumped == Bumped::kFailed) return;
    if (bumped == Bumped::kYes) {
      earlier->lastWritten = seen;
      std::lock_guard<std::mutex> lock(mutex_);
      written_[key] = *earlier;
      return;
    }
  }
  json object = {
      {"apiVersion", "v1"},
      {"kind", "Event"},
      {"metadata", {{"generateName", job.name + "."}, {"namespace", job.nameSpace}}},
      {"involvedObject",
       {{"apiVersion", kJobApiVersion}, {"kind", kJobKind}, {"name", job.name}, {"namespace", job.nameSpace},
        {"uid", job.uid}}},
      {"reason", event.reason},
      {"message", message},
      {"type", eventTypeName(event.type)},
      {"source", {{"component", "tandem-operator"}}},
      {"firstTimestamp", now},
      {"lastTimestamp", now},
      {"count", 1},
      {"reportingComponent", "tandem.dev/operator"},
      {"reportingInstance", reportingInstance_},
  };
  auto created = client_.create(resources::kEvents.collectionPath(job.nameSpace), object);
  if (!created.ok()) {
    log::warning() << "event " << event.reason << " on " << job.nameSpace << "/" << job.name << ": "
                   << created.status().message();
    return;
  }
  Written written{job.nameSpace, created->value("/metadata/name"_json_pointer, std::string()), 1, seen};
  if (written.name.empty()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  if (written_.size() >= kMaxRemembered) written_.erase(written_.begin());  // any one: it only costs a new Event
  written_[key] = std::move(written);
}

}  // namespace tandem::operator_core
