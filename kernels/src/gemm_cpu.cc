#include "tandem/kernels/gemm.h"

#include <cblas.h>

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

}  // namespace tandem::kernels
