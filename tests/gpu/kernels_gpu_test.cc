// Every CUDA kernel against its CPU reference (tandem/kernels/*.h), on random inputs of awkward sizes.
// Tolerances: fp32 1e-5 relative (normwise, and per element against the values' RMS); TF32 GEMM 2e-3;
// bf16 GEMM 1e-4 against the CPU product of the same bf16-rounded inputs and 1e-2 normwise against the
// fp32 inputs; bf16 casts bit-exact (round to nearest even). Without a GPU the binary exits 77, which ctest
// reports as skipped.
#include "tandem/kernels/cross_entropy.h"
#include "tandem/kernels/cuda/ops.h"
#include "tandem/kernels/cuda/runtime.h"
#include "tandem/kernels/elementwise.h"
#include "tandem/kernels/gemm.h"
#include "tandem/kernels/gpu_info.h"
#include "tandem/kernels/optimizer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iostream>
#include <random>
#include <vector>

namespace tandem::kernels {
namespace {

using cuda::DeviceBuffer;
using cuda::Epilogue;
using cuda::GemmPrecision;

std::vector<float> randomVector(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 engine(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(n);
  for (auto& v : values) v = normal(engine);
  return values;
}

template <typename T>
DeviceBuffer<T> upload(const std::vector<T>& host) {
  DeviceBuffer<T> device(host.size());
  TANDEM_CUDA_CHECK(cudaMemcpy(device.data(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

template <typename T>
std::vector<T> download(const DeviceBuffer<T>& device) {
  std::vector<T> host(device.size());
  TANDEM_CUDA_CHECK(cudaMemcpy(host.data(), device.data(), host.size() * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

template <typename T>
T downloadOne(const T* device) {
  T value{};
  TANDEM_CUDA_CHECK(cudaMemcpy(&value, device, sizeof(T), cudaMemcpyDeviceToHost));
  return value;
}

// ||got - want|| <= tolerance * ||want||, and every element within tolerance of the values' RMS scale
// (a per-element relative test would be meaningless where the reference is close to 0).
enum class Check { kNormAndElements, kNormOnly };

void expectClose(const std::vector<float>& got, const std::vector<float>& want, double tolerance,
                 const std::string& what, Check check = Check::kNormAndElements) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double difference = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    difference += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    norm += double(want[i]) * want[i];
  }
  const double rms = std::sqrt(norm / std::max<size_t>(1, want.size()));
  EXPECT_LE(std::sqrt(difference), tolerance * std::sqrt(norm) + 1e-30) << what << ": normwise relative error";
  if (check == Check::kNormOnly) return;
  int reported = 0;
  for (size_t i = 0; i < want.size() && reported < 5; ++i)
    if (std::abs(double(got[i]) - want[i]) > tolerance * (std::abs(double(want[i])) + rms)) {
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", CPU reference " << want[i];
      ++reported;
    }
}

// Round to nearest even, as __float2bfloat16_rn (finite inputs).
uint16_t toBf16Bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

float fromBf16Bits(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

__nv_bfloat16 bf16FromBits(uint16_t bits) {
  __nv_bfloat16_raw raw;
  raw.x = bits;
  return raw;
}

struct GemmCase {
  Transpose transposeA, transposeB;
  int64_t m, n, k;
  float beta;
};

class GemmTest : public ::testing::TestWithParam<GemmCase> {};

// A (m, k) or stored transposed (k, m); B (k, n) or (n, k); leading dimensions padded by 3 so strides are
// exercised; C starts random so beta matters.
struct GemmOperands {
  std::vector<float> a, b, c;
  int64_t lda, ldb, ldc;
};

GemmOperands makeOperands(const GemmCase& p, uint32_t seed) {
  GemmOperands o;
  const int64_t aRows = p.transposeA == Transpose::kNo ? p.m : p.k, aCols = p.transposeA == Transpose::kNo ? p.k : p.m;
  const int64_t bRows = p.transposeB == Transpose::kNo ? p.k : p.n, bCols = p.transposeB == Transpose::kNo ? p.n : p.k;
  o.lda = aCols + 3;
  o.ldb = bCols + 3;
  o.ldc = p.n + 3;
  o.a = randomVector(aRows * o.lda, seed);
  o.b = randomVector(bRows * o.ldb, seed + 1);
  o.c = randomVector(p.m * o.ldc, seed + 2);
  return o;
}

// fp32 inputs on the GPU with `precision`, against OpenBLAS on the same operands.
void checkFp32Inputs(const GemmCase& p, GemmPrecision precision, float alpha, double tolerance, const char* what) {
  GemmOperands o = makeOperands(p, precision == GemmPrecision::kFp32 ? 11 : 21);
  auto a = upload(o.a), b = upload(o.b);
  auto c = upload(o.c);
  cuda::gemm(p.transposeA, p.transposeB, p.m, p.n, p.k, alpha, a.data(), o.lda, b.data(), o.ldb, p.beta, c.data(),
             o.ldc, precision, Epilogue::kNone, nullptr, nullptr);
  std::vector<float> want = o.c;
  gemm(p.transposeA, p.transposeB, p.m, p.n, p.k, alpha, o.a.data(), o.lda, o.b.data(), o.ldb, p.beta, want.data(),
       o.ldc);
  expectClose(download(c), want, tolerance, what);
}

TEST_P(GemmTest, Fp32MatchesOpenBlas) { checkFp32Inputs(GetParam(), GemmPrecision::kFp32, 0.75f, 1e-5, "fp32 gemm"); }

TEST_P(GemmTest, Tf32IsCloseToFp32) { checkFp32Inputs(GetParam(), GemmPrecision::kTf32, 1.0f, 2e-3, "tf32 gemm"); }

TEST_P(GemmTest, Bf16InputsAccumulateInFp32) {
  const GemmCase p = GetParam();
  GemmOperands o = makeOperands(p, 31);
  // The same bf16 inputs for the GPU and (widened back to fp32) for the CPU reference.
  std::vector<__nv_bfloat16> aBf16(o.a.size()), bBf16(o.b.size());
  std::vector<float> aRounded(o.a.size()), bRounded(o.b.size());
  for (size_t i = 0; i < o.a.size(); ++i) {
    const uint16_t bits = toBf16Bits(o.a[i]);
    aBf16[i] = bf16FromBits(bits);
    aRounded[i] = fromBf16Bits(bits);
  }
  for (size_t i = 0; i < o.b.size(); ++i) {
    const uint16_t bits = toBf16Bits(o.b[i]);
    bBf16[i] = bf16FromBits(bits);
    bRounded[i] = fromBf16Bits(bits);
  }
  auto a = upload(aBf16), b = upload(bBf16);
  auto c = upload(o.c);
  cuda::gemm(p.transposeA, p.transposeB, p.m, p.n, p.k, 1.0f, a.data(), o.lda, b.data(), o.ldb, p.beta, c.data(),
             o.ldc, GemmPrecision::kBf16, Epilogue::kNone, nullptr, nullptr);
  const std::vector<float> got = download(c);
  std::vector<float> sameInputs = o.c, fp32Inputs = o.c;
  gemm(p.transposeA, p.transposeB, p.m, p.n, p.k, 1.0f, aRounded.data(), o.lda, bRounded.data(), o.ldb, p.beta,
       sameInputs.data(), o.ldc);
  gemm(p.transposeA, p.transposeB, p.m, p.n, p.k, 1.0f, o.a.data(), o.lda, o.b.data(), o.ldb, p.beta,
       fp32Inputs.data(), o.ldc);
  expectClose(got, sameInputs, 1e-4, "bf16 gemm vs the same rounded inputs");
  // Rounding the inputs to bf16 (8 mantissa bits) moves each product by a random ~2^-9 relative error,
  // so single elements stray by several of those; only the normwise error is a fair bound here.
  expectClose(got, fp32Inputs, 1e-2, "bf16 gemm vs fp32 inputs", Check::kNormOnly);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GemmTest,
                         ::testing::Values(GemmCase{Transpose::kNo, Transpose::kNo, 37, 53, 71, 0.0f},
                                           GemmCase{Transpose::kNo, Transpose::kYes, 64, 10, 784, 1.0f},
                                           GemmCase{Transpose::kYes, Transpose::kNo, 512, 784, 256, 0.0f},
                                           GemmCase{Transpose::kYes, Transpose::kYes, 33, 17, 129, 0.5f},
                                           GemmCase{Transpose::kNo, Transpose::kNo, 256, 512, 784, 1.0f}));

// Linear layer forward (x W^T + b, then the activation) fused into the GEMM's epilogue.
void checkEpilogue(Epilogue epilogue, double tolerance) {
  const int64_t rows = 96, in = 200, out = 130;
  const auto x = randomVector(rows * in, 41), w = randomVector(out * in, 42, 0.1f), bias = randomVector(out, 43);
  auto dx = upload(x), dw = upload(w), dbias = upload(bias);
  DeviceBuffer<float> dy(rows * out);
  cuda::gemm(Transpose::kNo, Transpose::kYes, rows, out, in, 1.0f, dx.data(), in, dw.data(), in, 0.0f, dy.data(), out,
             GemmPrecision::kFp32, epilogue, dbias.data(), nullptr);
  std::vector<float> want(rows * out);
  broadcast_rows(rows, out, bias.data(), want.data());
  gemm(Transpose::kNo, Transpose::kYes, rows, out, in, 1.0f, x.data(), in, w.data(), in, 1.0f, want.data(), out);
  if (epilogue == Epilogue::kBiasRelu) relu_forward(want.size(), want.data(), want.data());
  if (epilogue == Epilogue::kBiasGelu) gelu_forward(want.size(), want.data(), want.data());
  expectClose(download(dy), want, tolerance, "gemm epilogue");
}

TEST(GemmEpilogue, Bias) { checkEpilogue(Epilogue::kBias, 1e-5); }
TEST(GemmEpilogue, BiasRelu) { checkEpilogue(Epilogue::kBiasRelu, 1e-5); }
// cuBLASLt's GELU uses its own tanh evaluation: close to ours, not bit-equal.
TEST(GemmEpilogue, BiasGelu) { checkEpilogue(Epilogue::kBiasGelu, 1e-4); }

TEST(Elementwise, BiasBroadcastAndBackward) {
  const int64_t rows = 1000, cols = 77;
  const auto bias = randomVector(cols, 51), grad = randomVector(rows * cols, 52);
  auto dbias = upload(bias), dgrad = upload(grad);
  DeviceBuffer<float> out(rows * cols);
  cuda::broadcast_rows(rows, cols, dbias.data(), out.data(), nullptr);
  std::vector<float> want(rows * cols);
  broadcast_rows(rows, cols, bias.data(), want.data());
  EXPECT_EQ(download(out), want);

  auto gradBias = upload(bias);  // accumulates onto the existing values, as the CPU version
  cuda::bias_backward(rows, cols, dgrad.data(), gradBias.data(), nullptr);
  std::vector<float> wantGrad = bias;
  bias_backward(rows, cols, grad.data(), wantGrad.data());
  const auto first = download(gradBias);
  expectClose(first, wantGrad, 1e-5, "bias_backward");
  // Deterministic: the same input gives the same bits.
  auto again = upload(bias);
  cuda::bias_backward(rows, cols, dgrad.data(), again.data(), nullptr);
  EXPECT_EQ(download(again), first);
}

TEST(Elementwise, ReluAndGeluForwardAndBackward) {
  const int64_t n = 100003;
  const auto in = randomVector(n, 61, 3.0f), gradOut = randomVector(n, 62);
  auto din = upload(in), dgradOut = upload(gradOut);
  DeviceBuffer<float> out(n), gradIn(n);
  std::vector<float> want(n), wantGrad(n);

  cuda::relu_forward(n, din.data(), out.data(), nullptr);
  relu_forward(n, in.data(), want.data());
  EXPECT_EQ(download(out), want);
  cuda::relu_backward(n, out.data(), dgradOut.data(), gradIn.data(), nullptr);
  relu_backward(n, want.data(), gradOut.data(), wantGrad.data());
  EXPECT_EQ(download(gradIn), wantGrad);

  cuda::gelu_forward(n, din.data(), out.data(), nullptr);
  gelu_forward(n, in.data(), want.data());
  expectClose(download(out), want, 1e-5, "gelu_forward");
  cuda::gelu_backward(n, din.data(), dgradOut.data(), gradIn.data(), nullptr);
  gelu_backward(n, in.data(), gradOut.data(), wantGrad.data());
  expectClose(download(gradIn), wantGrad, 1e-5, "gelu_backward");

  // In place, as the CPU kernels allow.
  auto inPlace = upload(in);
  cuda::relu_forward(n, inPlace.data(), inPlace.data(), nullptr);
  relu_forward(n, in.data(), want.data());
  EXPECT_EQ(download(inPlace), want);
}

TEST(Casts, Bf16RoundsToNearestEvenAndWidensExactly) {
  auto values = randomVector(4099, 71, 100.0f);
  values[0] = 1.0f + 1.0f / 256.0f;  // exactly halfway between two bf16 values: rounds to even (1.0)
  values[1] = -0.0f;
  auto device = upload(values);
  DeviceBuffer<__nv_bfloat16> narrow(values.size());
  DeviceBuffer<float> wide(values.size());
  cuda::cast_to_bf16(values.size(), device.data(), narrow.data(), nullptr);
  cuda::cast_to_fp32(values.size(), narrow.data(), wide.data(), nullptr);
  const auto narrowHost = download(narrow);
  const auto wideHost = download(wide);
  for (size_t i = 0; i < values.size(); ++i) {
    uint16_t bits;
    std::memcpy(&bits, &narrowHost[i], 2);
    ASSERT_EQ(bits, toBf16Bits(values[i])) << "element " << i << " = " << values[i];
    ASSERT_EQ(wideHost[i], fromBf16Bits(bits)) << "element " << i;
  }
  EXPECT_EQ(wideHost[0], 1.0f);
}

TEST(Buckets, FlattenAndUnflattenManyTensorsRoundTrip) {
  // 70 tensors: more than one launch's worth (kMaxBucketTensors), sizes from 1 to large.
  std::vector<DeviceBuffer<float>> tensors;
  std::vector<std::vector<float>> hostTensors;
  std::vector<const float*> sources;
  std::vector<float*> destinations;
  std::vector<int64_t> sizes, offsets;
  int64_t total = 0;
  for (int i = 0; i < 70; ++i) {
    const int64_t size = 1 + (i * 7919) % 5000;
    hostTensors.push_back(randomVector(size, 100 + i));
    tensors.push_back(upload(hostTensors.back()));
    sources.push_back(tensors.back().data());
    sizes.push_back(size);
    offsets.push_back(total);
    total += size;
  }
  DeviceBuffer<float> bucket(total);
  cuda::flatten_bucket(70, sources.data(), sizes.data(), offsets.data(), bucket.data(), nullptr);
  const auto flat = download(bucket);
  for (int i = 0; i < 70; ++i)
    ASSERT_TRUE(std::equal(hostTensors[i].begin(), hostTensors[i].end(), flat.begin() + offsets[i])) << "tensor " << i;

  std::vector<DeviceBuffer<float>> outputs;
  for (int i = 0; i < 70; ++i) {
    outputs.emplace_back(sizes[i]);
    destinations.push_back(outputs.back().data());
  }
  cuda::unflatten_bucket(70, bucket.data(), destinations.data(), sizes.data(), offsets.data(), nullptr);
  for (int i = 0; i < 70; ++i) ASSERT_EQ(download(outputs[i]), hostTensors[i]) << "tensor " << i;
}

TEST(CrossEntropy, LossGradientAndAccuracyMatchTheCpu) {
  for (const int64_t classes : {10, 1000, 50257}) {
    const int64_t rows = classes > 1000 ? 64 : 333;
    auto logits = randomVector(rows * classes, 81, 2.0f);
    std::vector<int32_t> labels(rows);
    std::mt19937 engine(82);
    for (auto& label : labels) label = static_cast<int32_t>(engine() % classes);
    // A tie: two equal maxima in row 0; the first one is the arg-max (as on the CPU).
    logits[3] = logits[5] = 50.0f;
    labels[0] = 3;
    auto dlogits = upload(logits);
    auto dlabels = upload(labels);
    DeviceBuffer<float> grad(rows * classes);
    DeviceBuffer<double> loss(1);
    DeviceBuffer<int64_t> correct(1);
    const float scale = 1.0f / rows;
    cuda::softmax_cross_entropy(rows, classes, dlogits.data(), dlabels.data(), scale, grad.data(), loss.data(),
                                correct.data(), nullptr);
    std::vector<float> wantGrad(rows * classes);
    int64_t wantCorrect = 0;
    const double wantLoss =
        softmax_cross_entropy(rows, classes, logits.data(), labels.data(), scale, wantGrad.data(), &wantCorrect);
    EXPECT_NEAR(downloadOne(loss.data()), wantLoss, 1e-9 * std::abs(wantLoss)) << classes << " classes";
    EXPECT_EQ(downloadOne(correct.data()), wantCorrect) << classes << " classes";
    expectClose(download(grad), wantGrad, 1e-5, "cross-entropy gradient, " + std::to_string(classes) + " classes");
  }
}

TEST(Optimizers, AdamWTenStepsMatchTheCpu) {
  const int64_t n = 300001;
  AdamWParams params;
  params.lr = 3e-3f;
  params.weight_decay = 0.01f;
  auto param = randomVector(n, 91), m = std::vector<float>(n, 0.0f), v = std::vector<float>(n, 0.0f);
  auto dparam = upload(param), dm = upload(m), dv = upload(v);
  // The device step counter (graph-capturable) on a second copy.
  auto dparam2 = upload(param), dm2 = upload(m), dv2 = upload(v);
  DeviceBuffer<int64_t> counter(1);
  const int64_t first = 1;
  TANDEM_CUDA_CHECK(cudaMemcpy(counter.data(), &first, sizeof first, cudaMemcpyHostToDevice));
  for (int step = 1; step <= 10; ++step) {
    const auto grad = randomVector(n, 1000 + step);
    auto dgrad = upload(grad);
    params.step = step;
    cuda::adamw_step(n, dparam.data(), dgrad.data(), dm.data(), dv.data(), params, nullptr, nullptr);
    cuda::adamw_step(n, dparam2.data(), dgrad.data(), dm2.data(), dv2.data(), params, counter.data(), nullptr);
    adamw_step(n, param.data(), grad.data(), m.data(), v.data(), params);
  }
  expectClose(download(dparam), param, 1e-5, "adamw parameters");
  expectClose(download(dm), m, 1e-5, "adamw exp_avg");
  expectClose(download(dv), v, 1e-5, "adamw exp_avg_sq");
  EXPECT_EQ(download(dparam2), download(dparam)) << "device step counter gives the same trajectory";
  EXPECT_EQ(downloadOne(counter.data()), 11);
}

TEST(Optimizers, SgdVariantsMatchTheCpu) {
  const int64_t n = 65537;
  for (const bool nesterov : {false, true}) {
    SgdParams params;
    params.lr = 0.05f;
    params.momentum = 0.9f;
    params.weight_decay = 1e-4f;
    params.nesterov = nesterov;
    auto param = randomVector(n, 92), buffer = std::vector<float>(n, 0.0f);
    auto dparam = upload(param), dbuffer = upload(buffer);
    for (int step = 1; step <= 5; ++step) {
      params.first_step = step == 1;
      const auto grad = randomVector(n, 2000 + step);
      auto dgrad = upload(grad);
      cuda::sgd_step(n, dparam.data(), dgrad.data(), dbuffer.data(), params, nullptr);
      sgd_step(n, param.data(), grad.data(), buffer.data(), params);
    }
    expectClose(download(dparam), param, 1e-5, nesterov ? "nesterov sgd" : "momentum sgd");
  }
}

TEST(Allocator, ReusesFreedBlocksWithoutCallingTheDriver) {
  auto& allocator = cuda::CachingAllocator::forDevice(0);
  { DeviceBuffer<float> warm(1 << 20); }
  const int64_t before = allocator.driverAllocations();
  const size_t inUse = allocator.bytesInUse();
  for (int i = 0; i < 100; ++i) {
    DeviceBuffer<float> buffer((1 << 20) - i);  // sizes that vary a little share a block
    EXPECT_GE(allocator.bytesInUse(), inUse + ((1 << 20) - i) * sizeof(float));
  }
  EXPECT_EQ(allocator.driverAllocations(), before);
  EXPECT_EQ(allocator.bytesInUse(), inUse);
}

// A whole training step (linear layer with fused bias + ReLU, a second linear layer, cross-entropy,
// backward GEMMs, AdamW with the device step counter) captured once as a CUDA graph and replayed gives
// the same parameters as running the step eagerly: nothing in it synchronises or reads host state.
TEST(CudaGraph, ReplayedTrainingStepEqualsEagerSteps) {
  const int64_t batch = 64, in = 784, hidden = 128, classes = 10;
  const auto x = randomVector(batch * in, 201), w1 = randomVector(hidden * in, 202, 0.05f),
             b1 = randomVector(hidden, 203, 0.1f), w2 = randomVector(classes * hidden, 204, 0.1f),
             b2 = randomVector(classes, 205, 0.1f);
  std::vector<int32_t> labels(batch);
  for (int64_t i = 0; i < batch; ++i) labels[i] = static_cast<int32_t>(i % classes);
  const int64_t parameterCount = hidden * in + hidden + classes * hidden + classes;

  struct Model {
    DeviceBuffer<float> params, grads, m, v, hiddenActivations, logits, gradLogits, gradHidden;
    DeviceBuffer<double> loss;
    DeviceBuffer<int64_t> step;
  };
  auto makeModel = [&] {
    Model model{DeviceBuffer<float>(parameterCount), DeviceBuffer<float>(parameterCount),
                DeviceBuffer<float>(parameterCount), DeviceBuffer<float>(parameterCount),
                DeviceBuffer<float>(batch * hidden), DeviceBuffer<float>(batch * classes),
                DeviceBuffer<float>(batch * classes), DeviceBuffer<float>(batch * hidden), DeviceBuffer<double>(1),
                DeviceBuffer<int64_t>(1)};
    std::vector<float> flat;
    for (const auto* part : {&w1, &b1, &w2, &b2}) flat.insert(flat.end(), part->begin(), part->end());
    TANDEM_CUDA_CHECK(cudaMemcpy(model.params.data(), flat.data(), flat.size() * 4, cudaMemcpyHostToDevice));
    TANDEM_CUDA_CHECK(cudaMemset(model.m.data(), 0, parameterCount * 4));
    TANDEM_CUDA_CHECK(cudaMemset(model.v.data(), 0, parameterCount * 4));
    const int64_t one = 1;
    TANDEM_CUDA_CHECK(cudaMemcpy(model.step.data(), &one, sizeof one, cudaMemcpyHostToDevice));
    return model;
  };
  auto dx = upload(x);
  auto dlabels = upload(labels);
  cudaStream_t stream;
  TANDEM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  auto step = [&](Model& model) {
    float* W1 = model.params.data();
    float* B1 = W1 + hidden * in;
    float* W2 = B1 + hidden;
    float* B2 = W2 + classes * hidden;
    float* gW1 = model.grads.data();
    float* gB1 = gW1 + hidden * in;
    float* gW2 = gB1 + hidden;
    float* gB2 = gW2 + classes * hidden;
    TANDEM_CUDA_CHECK(cudaMemsetAsync(model.grads.data(), 0, parameterCount * 4, stream));
    cuda::gemm(Transpose::kNo, Transpose::kYes, batch, hidden, in, 1.0f, dx.data(), in, W1, in, 0.0f,
               model.hiddenActivations.data(), hidden, GemmPrecision::kFp32, Epilogue::kBiasRelu, B1, stream);
    cuda::gemm(Transpose::kNo, Transpose::kYes, batch, classes, hidden, 1.0f, model.hiddenActivations.data(), hidden,
               W2, hidden, 0.0f, model.logits.data(), classes, GemmPrecision::kFp32, Epilogue::kBias, B2, stream);
    cuda::softmax_cross_entropy(batch, classes, model.logits.data(), dlabels.data(), 1.0f / batch,
                                model.gradLogits.data(), model.loss.data(), nullptr, stream);
    cuda::gemm(Transpose::kYes, Transpose::kNo, classes, hidden, batch, 1.0f, model.gradLogits.data(), classes,
               model.hiddenActivations.data(), hidden, 0.0f, gW2, hidden, GemmPrecision::kFp32, Epilogue::kNone,
               nullptr, stream);
    cuda::bias_backward(batch, classes, model.gradLogits.data(), gB2, stream);
    cuda::gemm(Transpose::kNo, Transpose::kNo, batch, hidden, classes, 1.0f, model.gradLogits.data(), classes, W2,
               hidden, 0.0f, model.gradHidden.data(), hidden, GemmPrecision::kFp32, Epilogue::kNone, nullptr, stream);
    cuda::relu_backward(batch * hidden, model.hiddenActivations.data(), model.gradHidden.data(),
                        model.gradHidden.data(), stream);
    cuda::gemm(Transpose::kYes, Transpose::kNo, hidden, in, batch, 1.0f, model.gradHidden.data(), hidden, dx.data(),
               in, 0.0f, gW1, in, GemmPrecision::kFp32, Epilogue::kNone, nullptr, stream);
    cuda::bias_backward(batch, hidden, model.gradHidden.data(), gB1, stream);
    AdamWParams params;
    params.lr = 1e-3f;
    cuda::adamw_step(parameterCount, model.params.data(), model.grads.data(), model.m.data(), model.v.data(), params,
                     model.step.data(), stream);
  };

  Model eager = makeModel(), graphed = makeModel();
  step(eager);  // warm-up: plans, workspace and pool blocks exist before capture
  step(graphed);
  TANDEM_CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  TANDEM_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  step(graphed);
  TANDEM_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t executable;
  TANDEM_CUDA_CHECK(cudaGraphInstantiate(&executable, graph, 0));
  const int64_t driverAllocations = cuda::CachingAllocator::forDevice(0).driverAllocations();
  std::vector<double> eagerLosses, graphLosses;
  for (int i = 0; i < 5; ++i) {
    step(eager);
    TANDEM_CUDA_CHECK(cudaGraphLaunch(executable, stream));
    TANDEM_CUDA_CHECK(cudaStreamSynchronize(stream));
    eagerLosses.push_back(downloadOne(eager.loss.data()));
    graphLosses.push_back(downloadOne(graphed.loss.data()));
  }
  EXPECT_EQ(download(graphed.params), download(eager.params));
  EXPECT_EQ(graphLosses, eagerLosses);
  EXPECT_LT(eagerLosses.back(), eagerLosses.front()) << "the step trains";
  EXPECT_EQ(downloadOne(graphed.step.data()), 7);
  EXPECT_EQ(cuda::CachingAllocator::forDevice(0).driverAllocations(), driverAllocations);
  cudaGraphExecDestroy(executable);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace tandem::kernels

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  const int gpus = tandem::kernels::gpuCount();
  if (gpus == 0) {
    std::cout << "SKIPPED: no CUDA GPU visible; the gpu tier runs where one is present\n";
    return 77;
  }
  std::cout << "GPU: " << tandem::kernels::gpuDescription(0) << "\n";
  tandem::kernels::useGpu(0);
  return RUN_ALL_TESTS();
}
