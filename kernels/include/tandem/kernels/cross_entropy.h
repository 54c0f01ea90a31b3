// Softmax cross-entropy fused with its backward: one pass over the logits gives the loss and dL/dlogits.
#pragma once

#include <cstdint>

namespace tandem::kernels {

// logits (rows, classes), labels (rows) in [0, classes).
// Returns the summed (not averaged) loss over the rows. When grad_logits is not null it receives
// (softmax(logits) - onehot(label)) * grad_scale; grad_scale is 1/global batch for a mean loss.
// correct (optional) receives the number of rows whose arg-max equals the label.
double softmax_cross_entropy(int64_t rows, int64_t classes, const float* logits, const int32_t* labels,
                             float grad_scale, float* grad_logits, int64_t* correct);

}  // namespace tandem::kernels
