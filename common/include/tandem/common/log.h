// One process-wide logger. Every line carries a UTC timestamp, the level and the fields that identify
// where it came from (job, rank, step), so interleaved logs of many workers stay readable:
//   2026-11-23T18:42:29.123Z INFO job=default/fmnist rank=0 step=120 message
// Thread-safe: lines are written whole under a mutex.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>

namespace tandem::log {

enum class Level { kDebug, kInfo, kWarning, kError };

// Fields set once at start (job, rank) and per step; -1 leaves a field out.
void setJob(const std::string& job);
void setRank(int rank);
void setStep(int64_t step);
void setMinimumLevel(Level level);
bool enabled(Level level);
// "debug", "info", "warning" or "error"; false for anything else.
bool parseLevel(const std::string& name, Level* level);

void write(Level level, const std::string& message);

// Streams a line and writes it on destruction: `log::Line(log::Level::kInfo) << "joined " << n;`
class Line {
 public:
  explicit Line(Level level) : level_(level) {}
  ~Line() { write(level_, stream_.str()); }
  template <typename T>
  Line& operator<<(const T& value) {
    stream_ << value;
    return *this;
  }

 private:
  Level level_;
  std::ostringstream stream_;
};

inline Line info() { return Line(Level::kInfo); }
inline Line warning() { return Line(Level::kWarning); }
inline Line error() { return Line(Level::kError); }
inline Line debug() { return Line(Level::kDebug); }

}  // namespace tandem::log
