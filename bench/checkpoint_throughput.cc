// checkpoint_throughput: durable checkpoint writes of a given size through CheckpointStore (temporary
// directory, fsync, rename, latest), the same path training uses.
//   checkpoint_throughput --dir DIR [--megabytes 256] [--repeats 3]
// Prints one JSON line per repeat: bytes, seconds, MB/s.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "tandem/checkpoint/checkpoint.h"

int main(int argc, char** argv) {
  std::string directory;
  int64_t megabytes = 256;
  int repeats = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--dir") directory = argv[i + 1];
    else if (flag == "--megabytes") megabytes = std::atoll(argv[i + 1]);
    else if (flag == "--repeats") repeats = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (directory.empty()) {
    std::fprintf(stderr, "usage: checkpoint_throughput --dir DIR [--megabytes N] [--repeats N]\n");
    return 2;
  }
  tandem::checkpoint::CheckpointStore store(directory, 1);
  tandem::checkpoint::CheckpointState state;
  const int64_t floats = megabytes * 1024 * 1024 / 4;
  state.parameters.resize(floats / 3);
  state.optimizerState.resize(floats - floats / 3);
  for (size_t i = 0; i < state.parameters.size(); ++i) state.parameters[i] = static_cast<float>(i % 977) * 1e-3f;
  for (size_t i = 0; i < state.optimizerState.size(); ++i) state.optimizerState[i] = static_cast<float>(i % 613) * 1e-4f;
  state.modelDescription = "benchmark";
  for (int repeat = 1; repeat <= repeats; ++repeat) {
    state.step = repeat;
    const auto start = std::chrono::steady_clock::now();
    auto written = store.write(state);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!written.ok()) {
      std::fprintf(stderr, "%s\n", written.status().toString().c_str());
      return 1;
    }
    std::printf("{\"bytes\":%lld,\"seconds\":%.3f,\"megabytesPerSecond\":%.1f}\n", static_cast<long long>(*written), seconds,
                *written / seconds / 1e6);
    std::fflush(stdout);
  }
  return 0;
}
