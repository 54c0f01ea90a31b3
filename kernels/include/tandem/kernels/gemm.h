// General matrix multiply, row-major: C (m, n) = alpha * op(A) (m, k) * op(B) (k, n) + beta * C.
// CPU: OpenBLAS sgemm. The thread count is the process's OpenBLAS setting (setGemmThreads).
#pragma once

#include <cstdint>
#include <string>

namespace tandem::kernels {

enum class Transpose { kNo, kYes };

void gemm(Transpose transposeA, Transpose transposeB, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Threads OpenBLAS may use for one GEMM in this process.
void setGemmThreads(int threads);
int gemmThreads();

// The kernel family OpenBLAS chose for this CPU as it loaded ("SkylakeX", "Haswell", "Prescott", ...).
std::string gemmCore();

// Debian 12's OpenBLAS (0.3.21) does not know CPUs newer than itself, Sapphire and Emerald Rapids among
// them, and falls back to its generic Prescott (SSE3) kernels: 3-4x slower than the AVX-512 kernels those
// CPUs run. OpenBLAS reads OPENBLAS_CORETYPE once, as it loads, so only a fresh start can change its choice.
// Returns the OPENBLAS_CORETYPE a restart should set ("SkylakeX" with AVX-512, "Haswell" with AVX2 and FMA)
// when that is better than OpenBLAS's choice; empty when it is not, or when OPENBLAS_CORETYPE is set.
std::string betterGemmCore();

// First thing in main() of a program whose GEMMs matter: when betterGemmCore() names a core, re-executes
// the program (same pid and arguments) with OPENBLAS_CORETYPE set to it. Returns when there is nothing to
// do or the exec failed (the program then runs on as it is).
void restartWithBetterGemmCore(char** argv);

}  // namespace tandem::kernels
