#include "tandem/common/random.h"

#include <sys/random.h>

#include <cerrno>
#include <cmath>
#include <numeric>
#include <stdexcept>

namespace tandem {

uint64_t Random::mix(uint64_t a, uint64_t b) {
  // splitmix64 finalizer over both inputs.
  uint64_t z = a * 0x9E3779B97F4A7C15ull + b + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t Random::below(uint64_t bound) {
  const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
  uint64_t value;
  do value = engine_();
  while (value >= limit);
  return value % bound;
}

double Random::normal() {
  double u1 = uniform();
  while (u1 <= 0.0) u1 = uniform();
  const double u2 = uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

std::vector<int64_t> Random::permutation(int64_t n) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  for (int64_t i = n - 1; i > 0; --i) std::swap(order[i], order[below(static_cast<uint64_t>(i) + 1)]);
  return order;
}

std::string secureRandomHex(size_t bytes) {
  std::vector<unsigned char> random(bytes);
  for (size_t filled = 0; filled < bytes;) {
    const ssize_t got = getrandom(random.data() + filled, bytes - filled, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("getrandom failed");  // only without a kernel CSPRNG: nothing sane to do
    }
    filled += static_cast<size_t>(got);
  }
  static const char* kHex = "0123456789abcdef";
  std::string text;
  text.reserve(bytes * 2);
  for (unsigned char byte : random) {
    text += kHex[byte >> 4];
    text += kHex[byte & 15];
  }
  return text;
}

}  // namespace tandem
