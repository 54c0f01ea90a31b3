#include "tandem/kernels/gemm.h"

#include <cblas.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>

namespace tandem::kernels {

void gemm(Transpose transposeA, Transpose transposeB, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, transposeA == Transpose::kYes ? CblasTrans : CblasNoTrans,
              transposeB == Transpose::kYes ? CblasTrans : CblasNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b,
              static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

void setGemmThreads(int threads) { openblas_set_num_threads(threads < 1 ? 1 : threads); }
int gemmThreads() { return openblas_get_num_threads(); }

std::string gemmCore() {
  const char* name = openblas_get_corename();
  return name != nullptr ? name : "unknown";
}

namespace {

// 2: AVX-512 kernels, 1: AVX2 kernels (Zen uses Haswell's), 0: older or generic.
int coreTier(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  if (name == "skylakex" || name == "cooperlake" || name == "sapphirerapids") return 2;
  if (name == "haswell" || name == "zen") return 1;
  return 0;
}

}  // namespace

std::string betterGemmCore() {
  const char* chosen = std::getenv("OPENBLAS_CORETYPE");
  if (chosen != nullptr && *chosen != '\0') return "";  // the user's (or an earlier restart's) choice
  // __builtin_cpu_supports also checks that the OS saves the AVX and AVX-512 registers.
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512cd");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const int cpuTier = avx512 ? 2 : avx2 ? 1 : 0;
  if (cpuTier <= coreTier(gemmCore())) return "";
  return cpuTier == 2 ? "SkylakeX" : "Haswell";
}

void restartWithBetterGemmCore(char** argv) {
  const std::string core = betterGemmCore();
  if (core.empty()) return;
  setenv("OPENBLAS_CORETYPE", core.c_str(), 1);
  execv("/proc/self/exe", argv);
  unsetenv("OPENBLAS_CORETYPE");  // exec failed: go on with the kernels we have
}

}  // namespace tandem::kernels
