// Deterministic random numbers: the same seed gives the same stream on every platform and library
// version (std::mt19937_64 is fully specified; std::*_distribution is not, so we do not use them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace tandem {

class Random {
 public:
  explicit Random(uint64_t seed) : engine_(seed) {}
  // Seeds a stream from several integers (seed, epoch, purpose) so streams never overlap by accident.
  Random(uint64_t seed, uint64_t stream) : engine_(mix(seed, stream)) {}

  uint64_t next() { return engine_(); }
  // Uniform in [0, 1) with 53 bits.
  double uniform() { return static_cast<double>(engine_() >> 11) * (1.0 / 9007199254740992.0); }
  double uniform(double low, double high) { return low + (high - low) * uniform(); }
  // Uniform integer in [0, bound) without modulo bias.
  uint64_t below(uint64_t bound);
  // Standard normal (Box-Muller).
  double normal();
  // Fisher-Yates shuffle of 0..n-1.
  std::vector<int64_t> permutation(int64_t n);

  static uint64_t mix(uint64_t a, uint64_t b);

 private:
  std::mt19937_64 engine_;
};

// Secrets (rendezvous tokens): `bytes` bytes from the kernel's CSPRNG (getrandom), as lowercase hex.
// Never the deterministic Random above.
std::string secureRandomHex(size_t bytes);

}  // namespace tandem
