// Row-major GEMM on cuBLASLt. cuBLASLt is column-major; a row-major (m, n) matrix is the column-major
// (n, m) matrix of its transpose, so C = op(A) op(B) is computed as C^T = op(B)^T op(A)^T: the operands
// swap places and m and n swap roles. The bias epilogue adds a vector along the column-major rows,
// which are our columns: bias[col], exactly a linear layer's bias.
#include "tandem/kernels/cuda/ops.h"

#include "tandem/kernels/cuda/runtime.h"

#include <cublasLt.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace tandem::kernels::cuda {
namespace {

void checkBlas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw CudaError(std::string("cuBLASLt ") + what + " failed: status " + std::to_string(static_cast<int>(status)));
}

constexpr size_t kWorkspaceBytes = 32 << 20;

// Largest power of two (up to 256) dividing the address: cuBLASLt picks kernels by operand alignment.
uint32_t alignmentOf(const void* pointer) {
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

// Everything a plan depends on: the problem and its operands' alignments.
struct PlanKey {
  Transpose transposeA, transposeB;
  int64_t m, n, k, lda, ldb, ldc;
  GemmPrecision precision;
  Epilogue epilogue;
  uint32_t alignA, alignB, alignC;
  auto operator<=>(const PlanKey&) const = default;
};

// Descriptors and the chosen algorithm for one shape: built once, reused every step (the heuristic
// query costs more than a small GEMM).
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t layoutA = nullptr, layoutB = nullptr, layoutC = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (layoutA) cublasLtMatrixLayoutDestroy(layoutA);
    if (layoutB) cublasLtMatrixLayoutDestroy(layoutB);
    if (layoutC) cublasLtMatrixLayoutDestroy(layoutC);
  }
};

// One per device and thread: a cuBLASLt handle, its workspace and the plan cache.
class Context {
 public:
  Context() : workspace_(kWorkspaceBytes) { checkBlas(cublasLtCreate(&handle_), "create"); }
  ~Context() { cublasLtDestroy(handle_); }

  static Context& current() {
    thread_local std::map<int, std::unique_ptr<Context>> contexts;
    int device = 0;
    TANDEM_CUDA_CHECK(cudaGetDevice(&device));
    auto& context = contexts[device];
    if (!context) context = std::make_unique<Context>();
    return *context;
  }

  const Plan& plan(const PlanKey& key) {
    auto found = plans_.find(key);
    if (found != plans_.end()) return *found->second;
    const auto [transposeA, transposeB, m, n, k, lda, ldb, ldc, precision, epilogue, alignA, alignB, alignC] = key;
    auto plan = std::make_unique<Plan>();
    const cublasComputeType_t compute =
        precision == GemmPrecision::kTf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const cudaDataType_t inputType = precision == GemmPrecision::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
    checkBlas(cublasLtMatmulDescCreate(&plan->desc, compute, CUDA_R_32F), "matmul descriptor");
    // Swapped operands: cuBLASLt's A is our B, its B is our A.
    const cublasOperation_t opFirst = transposeB == Transpose::kYes ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t opSecond = transposeA == Transpose::kYes ? CUBLAS_OP_T : CUBLAS_OP_N;
    checkBlas(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opFirst, sizeof(opFirst)),
              "transa");
    checkBlas(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opSecond, sizeof(opSecond)),
              "transb");
    cublasLtEpilogue_t mode = CUBLASLT_EPILOGUE_DEFAULT;
    if (epilogue == Epilogue::kBias) mode = CUBLASLT_EPILOGUE_BIAS;
    if (epilogue == Epilogue::kBiasRelu) mode = CUBLASLT_EPILOGUE_RELU_BIAS;
    if (epilogue == Epilogue::kBiasGelu) mode = CUBLASLT_EPILOGUE_GELU_BIAS;
    checkBlas(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &mode, sizeof(mode)),
              "epilogue");
    if (epilogue != Epilogue::kNone) {
      const cudaDataType_t biasType = CUDA_R_32F;
      checkBlas(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &biasType,
                                               sizeof(biasType)),
                "bias type");
    }
    // Column-major shapes of the swapped problem: first (n x k) or its transpose, second (k x m), C (n x m).
    const bool firstTransposed = transposeB == Transpose::kYes, secondTransposed = transposeA == Transpose::kYes;
    checkBlas(cublasLtMatrixLayoutCreate(&plan->layoutA, inputType, firstTransposed ? k : n, firstTransposed ? n : k, ldb),
              "layout of B");
    checkBlas(cublasLtMatrixLayoutCreate(&plan->layoutB, inputType, secondTransposed ? m : k, secondTransposed ? k : m, lda),
              "layout of A");
    checkBlas(cublasLtMatrixLayoutCreate(&plan->layoutC, CUDA_R_32F, n, m, ldc), "layout of C");

    cublasLtMatmulPreference_t preference = nullptr;
    checkBlas(cublasLtMatmulPreferenceCreate(&preference), "preference");
    const uint64_t workspaceBytes = kWorkspaceBytes;
    cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspaceBytes,
                                         sizeof(workspaceBytes));
    cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &alignB, sizeof(alignB));
    cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &alignA, sizeof(alignA));
    cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &alignC, sizeof(alignC));
    cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &alignC, sizeof(alignC));
    cublasLtMatmulHeuristicResult_t result{};
    int found_count = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle_, plan->desc, plan->layoutA, plan->layoutB,
                                                                 plan->layoutC, plan->layoutC, preference, 1, &result,
                                                                 &found_count);
    cublasLtMatmulPreferenceDestroy(preference);
    if (status != CUBLAS_STATUS_SUCCESS || found_count == 0)
      throw CudaError("cuBLASLt has no algorithm for gemm m=" + std::to_string(m) + " n=" + std::to_string(n) +
                      " k=" + std::to_string(k) + " (status " + std::to_string(static_cast<int>(status)) + ")");
    plan->algo = result.algo;
    return *plans_.emplace(key, std::move(plan)).first->second;
  }

  cublasLtHandle_t handle() const { return handle_; }
  void* workspace() const { return workspace_.data(); }

 private:
  cublasLtHandle_t handle_ = nullptr;
  DeviceBuffer<char> workspace_;
  std::map<PlanKey, std::unique_ptr<Plan>> plans_;
};

}  // namespace

void gemm(Transpose transposeA, Transpose transposeB, int64_t m, int64_t n, int64_t k, float alpha, const void* a,
          int64_t lda, const void* b, int64_t ldb, float beta, float* c, int64_t ldc, GemmPrecision precision,
          Epilogue epilogue, const float* bias, cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  if (epilogue != Epilogue::kNone && bias == nullptr) throw CudaError("gemm: a bias epilogue needs a bias pointer");
  Context& context = Context::current();
  const Plan& plan = context.plan({transposeA, transposeB, m, n, k, lda, ldb, ldc, precision, epilogue,
                                   alignmentOf(a), alignmentOf(b), alignmentOf(c)});
  if (epilogue != Epilogue::kNone)
    checkBlas(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)),
              "bias pointer");
  checkBlas(cublasLtMatmul(context.handle(), plan.desc, &alpha, b, plan.layoutA, a, plan.layoutB, &beta, c,
                           plan.layoutC, c, plan.layoutC, &plan.algo, context.workspace(), kWorkspaceBytes, stream),
            "matmul");
}

}  // namespace tandem::kernels::cuda
