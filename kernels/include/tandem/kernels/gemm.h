// General matrix multiply, row-major: C (m, n) = alpha * op(A) (m, k) * op(B) (k, n) + beta * C.
// CPU: OpenBLAS sgemm. The thread count is the process's OpenBLAS setting (setGemmThreads).
#pragma once

#include <cstdint>

namespace tandem::kernels {

enum class Transpose { kNo, kYes };

void gemm(Transpose transposeA, Transpose transposeB, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Threads OpenBLAS may use for one GEMM in this process.
void setGemmThreads(int threads);
int gemmThreads();

}  // namespace tandem::kernels
