// allreduce_bandwidth: the Gloo communicator's all-reduce over loopback, ranks as threads of one
// process (each with its own TCP pairs), for message sizes from 1 KiB to 64 MiB.
//   allreduce_bandwidth [--ranks N] [--min-bytes B] [--max-bytes B] [--seconds-per-size S]
// Prints one JSON line per size: bytes, microseconds per all-reduce, algorithm and bus bandwidth (GB/s;
// bus = algorithm x 2(N-1)/N, the traffic a ring moves per byte reduced).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "tandem/comm/communicator.h"

int main(int argc, char** argv) {
  int ranks = 2;
  int64_t minBytes = 1024, maxBytes = 64ll << 20;
  double secondsPerSize = 0.5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--ranks") ranks = std::atoi(argv[i + 1]);
    else if (flag == "--min-bytes") minBytes = std::atoll(argv[i + 1]);
    else if (flag == "--max-bytes") maxBytes = std::atoll(argv[i + 1]);
    else if (flag == "--seconds-per-size") secondsPerSize = std::atof(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  auto store = tandem::comm::makeMemoryStore();
  std::vector<std::unique_ptr<tandem::comm::Communicator>> communicators(ranks);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < ranks; ++rank)
    threads.emplace_back([&, rank] {
      tandem::comm::GlooOptions options;
      options.rank = rank;
      options.size = ranks;
      auto created = tandem::comm::createGlooCommunicator(options, store);
      if (!created.ok()) {
        std::fprintf(stderr, "rank %d: %s\n", rank, created.status().toString().c_str());
        std::exit(1);
      }
      communicators[rank] = std::move(created).value();
    });
  for (auto& thread : threads) thread.join();

  for (int64_t bytes = minBytes; bytes <= maxBytes; bytes *= 4) {
    const int64_t count = bytes / 4;
    std::vector<std::vector<float>> buffers(ranks, std::vector<float>(count, 1.0f));
    // Every rank runs the same number of iterations: rank 0 decides after a timed probe.
    auto runIterations = [&](int iterations) {
      std::vector<std::thread> workers;
      for (int rank = 0; rank < ranks; ++rank)
        workers.emplace_back([&, rank] {
          for (int i = 0; i < iterations; ++i) {
            auto status = communicators[rank]->allReduce(buffers[rank].data(), count);
            if (!status.ok()) {
              std::fprintf(stderr, "%s\n", status.toString().c_str());
              std::exit(1);
            }
          }
        });
      for (auto& worker : workers) worker.join();
    };
    using Clock = std::chrono::steady_clock;
    runIterations(2);  // warm-up
    auto start = Clock::now();
    runIterations(3);
    const double probe = std::chrono::duration<double>(Clock::now() - start).count() / 3;
    const int iterations = std::max(3, static_cast<int>(secondsPerSize / std::max(probe, 1e-6)));
    start = Clock::now();
    runIterations(iterations);
    const double perOp = std::chrono::duration<double>(Clock::now() - start).count() / iterations;
    const double algorithm = bytes / perOp / 1e9;
    std::printf("{\"ranks\":%d,\"bytes\":%lld,\"iterations\":%d,\"microseconds\":%.1f,\"algorithmGBps\":%.3f,\"busGBps\":%.3f}\n",
                ranks, static_cast<long long>(bytes), iterations, perOp * 1e6, algorithm,
                algorithm * 2.0 * (ranks - 1) / ranks);
    std::fflush(stdout);
  }
  return 0;
}
