#include "tandem/kernels/elementwise.h"

#include "vector_clones.h"

#include <cmath>
#include <cstring>

namespace tandem::kernels {

void broadcast_rows(int64_t rows, int64_t cols, const float* bias, float* out) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * cols, bias, sizeof(float) * cols);
}

TANDEM_VECTOR_CLONES void bias_backward(int64_t rows, int64_t cols, const float* grad_out, float* grad_bias) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = grad_out + r * cols;
    for (int64_t c = 0; c < cols; ++c) grad_bias[c] += row[c];
  }
}

TANDEM_VECTOR_CLONES void relu_forward(int64_t n, const float* in, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = in[i];
    out[i] = x > 0.0f ? x : 0.0f;
  }
}

TANDEM_VECTOR_CLONES void relu_backward(int64_t n, const float* out, const float* grad_out, float* grad_in) {
  for (int64_t i = 0; i < n; ++i) {
    // Both loads happen unconditionally so the select vectorises.
    const float y = out[i];
    const float g = grad_out[i];
    grad_in[i] = y > 0.0f ? g : 0.0f;
  }
}

namespace {
constexpr float kSqrtTwoOverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;
}  // namespace

void gelu_forward(int64_t n, const float* in, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = in[i];
    out[i] = 0.5f * x * (1.0f + std::tanh(kSqrtTwoOverPi * (x + kGeluCubic * x * x * x)));
  }
}

void gelu_backward(int64_t n, const float* in, const float* grad_out, float* grad_in) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = in[i];
    const float inner = kSqrtTwoOverPi * (x + kGeluCubic * x * x * x);
    const float t = std::tanh(inner);
    const float dinner = kSqrtTwoOverPi * (1.0f + 3.0f * kGeluCubic * x * x);
    grad_in[i] = grad_out[i] * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * dinner);
  }
}

}  // namespace tandem::kernels
