#include "tandem/kernels/cuda/ops.h"

#include "launch.h"

#include <cfloat>

namespace tandem::kernels::cuda {
namespace {

constexpr int kRowThreads = 256;

// Block-wide reduction over kRowThreads threads; every thread gets the result.
template <typename T, typename Op>
__device__ T blockReduce(T value, Op op, T* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kRowThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] = op(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  const T result = shared[0];
  __syncthreads();
  return result;
}

// One block per row: max (with the first arg-max, as the CPU reference), the log of the softmax
// denominator in double, the row's loss, and the gradient in the same pass over the logits.
__global__ void softmaxCrossEntropyKernel(int64_t classes, const float* logits, const int32_t* labels,
                                          float grad_scale, float* grad_logits, double* row_loss,
                                          int32_t* row_correct) {
  __shared__ float sharedMax[kRowThreads];
  __shared__ long long sharedIndex[kRowThreads];
  __shared__ double sharedSum[kRowThreads];
  const int64_t r = blockIdx.x;
  const float* row = logits + r * classes;

  float localMax = -FLT_MAX;
  long long localIndex = classes;
  for (int64_t c = threadIdx.x; c < classes; c += kRowThreads)
    if (row[c] > localMax) {  // strided ascending c: the first maximum of this thread's share
      localMax = row[c];
      localIndex = c;
    }
  sharedMax[threadIdx.x] = localMax;
  sharedIndex[threadIdx.x] = localIndex;
  __syncthreads();
  for (int stride = kRowThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const float other = sharedMax[threadIdx.x + stride];
      const long long otherIndex = sharedIndex[threadIdx.x + stride];
      if (other > sharedMax[threadIdx.x] || (other == sharedMax[threadIdx.x] && otherIndex < sharedIndex[threadIdx.x])) {
        sharedMax[threadIdx.x] = other;
        sharedIndex[threadIdx.x] = otherIndex;
      }
    }
    __syncthreads();
  }
  const float maxLogit = sharedMax[0];
  const long long argmax = sharedIndex[0];
  __syncthreads();

  double localSum = 0.0;
  for (int64_t c = threadIdx.x; c < classes; c += kRowThreads) localSum += exp(static_cast<double>(row[c] - maxLogit));
  const double denominator = blockReduce(localSum, [](double a, double b) { return a + b; }, sharedSum);
  const double logDenominator = log(denominator);
  const int32_t label = labels[r];

  if (grad_logits != nullptr) {
    float* gradRow = grad_logits + r * classes;
    for (int64_t c = threadIdx.x; c < classes; c += kRowThreads) {
      const double probability = exp(static_cast<double>(row[c] - maxLogit) - logDenominator);
      gradRow[c] = static_cast<float>((probability - (c == label ? 1.0 : 0.0)) * grad_scale);
    }
  }
  if (threadIdx.x == 0) {
    row_loss[r] = logDenominator - static_cast<double>(row[label] - maxLogit);
    row_correct[r] = argmax == label ? 1 : 0;
  }
}

// One block adds the per-row results in a fixed order: the same logits give the same loss bits.
__global__ void sumRowsKernel(int64_t rows, const double* row_loss, const int32_t* row_correct, double* loss_sum,
                              int64_t* correct) {
  __shared__ double sharedLoss[kRowThreads];
  __shared__ long long sharedCorrect[kRowThreads];
  double loss = 0.0;
  long long hits = 0;
  for (int64_t r = threadIdx.x; r < rows; r += kRowThreads) {
    loss += row_loss[r];
    hits += row_correct[r];
  }
  loss = blockReduce(loss, [](double a, double b) { return a + b; }, sharedLoss);
  hits = blockReduce(hits, [](long long a, long long b) { return a + b; }, sharedCorrect);
  if (threadIdx.x == 0) {
    *loss_sum = loss;
    if (correct != nullptr) *correct = hits;
  }
}

}  // namespace

void softmax_cross_entropy(int64_t rows, int64_t classes, const float* logits, const int32_t* labels,
                           float grad_scale, float* grad_logits, double* loss_sum, int64_t* correct,
                           cudaStream_t stream) {
  if (rows == 0) {
    TANDEM_CUDA_CHECK(cudaMemsetAsync(loss_sum, 0, sizeof(double), stream));
    if (correct != nullptr) TANDEM_CUDA_CHECK(cudaMemsetAsync(correct, 0, sizeof(int64_t), stream));
    return;
  }
  // Stream-ordered scratch (graph-capturable, reused by the driver's pool without a cudaMalloc).
  void* scratch = nullptr;
  const size_t lossBytes = rows * sizeof(double);
  TANDEM_CUDA_CHECK(cudaMallocAsync(&scratch, lossBytes + rows * sizeof(int32_t), stream));
  auto* rowLoss = static_cast<double*>(scratch);
  auto* rowCorrect = reinterpret_cast<int32_t*>(static_cast<char*>(scratch) + lossBytes);
  softmaxCrossEntropyKernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
      classes, logits, labels, grad_scale, grad_logits, rowLoss, rowCorrect);
  detail::checkLaunch("softmax_cross_entropy");
  sumRowsKernel<<<1, kRowThreads, 0, stream>>>(rows, rowLoss, rowCorrect, loss_sum, correct);
  detail::checkLaunch("softmax_cross_entropy (sum)");
  TANDEM_CUDA_CHECK(cudaFreeAsync(scratch, stream));
}

}  // namespace tandem::kernels::cuda
