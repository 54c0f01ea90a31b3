#include "tandem/common/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <utility>

namespace tandem::log {
namespace {

std::mutex& outputMutex() {
  static std::mutex mutex;
  return mutex;
}
std::string& jobField() {
  static std::string job;
  return job;
}
std::atomic<int> rankField{-1};
std::atomic<int64_t> stepField{-1};
std::atomic<int> minimumLevel{static_cast<int>(Level::kInfo)};

const char* levelName(Level level) {
  switch (level) {
    case Level::kDebug: return "DEBUG";
    case Level::kInfo: return "INFO";
    case Level::kWarning: return "WARN";
    case Level::kError: return "ERROR";
  }
  return "?";
}

}  // namespace

void setJob(const std::string& job) {
  std::lock_guard<std::mutex> lock(outputMutex());
  jobField() = job;
}
void setRank(int rank) { rankField = rank; }
void setStep(int64_t step) { stepField = step; }
void setMinimumLevel(Level level) { minimumLevel = static_cast<int>(level); }
bool enabled(Level level) { return static_cast<int>(level) >= minimumLevel.load(); }

bool parseLevel(const std::string& name, Level* level) {
  static const std::pair<const char*, Level> kNames[] = {
      {"debug", Level::kDebug}, {"info", Level::kInfo}, {"warning", Level::kWarning}, {"warn", Level::kWarning},
      {"error", Level::kError}};
  for (const auto& [text, value] : kNames) {
    if (name != text) continue;
    *level = value;
    return true;
  }
  return false;
}

void write(Level level, const std::string& message) {
  if (static_cast<int>(level) < minimumLevel.load()) return;
  const auto now = std::chrono::system_clock::now();
  const std::time_t seconds = std::chrono::system_clock::to_time_t(now);
  const int millis = static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm utc{};
  gmtime_r(&seconds, &utc);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &utc);

  std::lock_guard<std::mutex> lock(outputMutex());
  std::string fields;
  if (!jobField().empty()) fields += " job=" + jobField();
  if (rankField >= 0) fields += " rank=" + std::to_string(rankField.load());
  if (stepField >= 0) fields += " step=" + std::to_string(stepField.load());
  std::fprintf(stderr, "%s.%03dZ %s%s %s\n", stamp, millis, levelName(level), fields.c_str(),
               message.c_str());
  std::fflush(stderr);
}

}  // namespace tandem::log
