// Bias and activation kernels over row-major (rows, cols) activations.
#pragma once

#include <cstdint>

namespace tandem::kernels {

// out[r, c] = bias[c] for every row: the starting value a GEMM with beta = 1 accumulates onto.
void broadcast_rows(int64_t rows, int64_t cols, const float* bias, float* out);
// grad_bias[c] += sum over rows of grad_out[r, c].
void bias_backward(int64_t rows, int64_t cols, const float* grad_out, float* grad_bias);

// out = max(in, 0); in and out may alias.
void relu_forward(int64_t n, const float* in, float* out);
// grad_in = grad_out where out > 0, else 0; grad_in and grad_out may alias.
void relu_backward(int64_t n, const float* out, const float* grad_out, float* grad_in);

// out = gelu(in) with the tanh approximation (GPT-2's).
void gelu_forward(int64_t n, const float* in, float* out);
// grad_in = gelu'(in) * grad_out.
void gelu_backward(int64_t n, const float* in, const float* grad_out, float* grad_in);

}  // namespace tandem::kernels
