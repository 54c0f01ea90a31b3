#include "tandem/kernels/cross_entropy.h"

#include <cmath>

namespace tandem::kernels {

double softmax_cross_entropy(int64_t rows, int64_t classes, const float* logits, const int32_t* labels,
                             float grad_scale, float* grad_logits, int64_t* correct) {
  double loss_sum = 0.0;
  int64_t correct_count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits + r * classes;
    int64_t argmax = 0;
    float max_logit = row[0];
    for (int64_t c = 1; c < classes; ++c) {
      if (row[c] > max_logit) {
        max_logit = row[c];
        argmax = c;
      }
    }
    double denominator = 0.0;
    for (int64_t c = 0; c < classes; ++c) denominator += std::exp(static_cast<double>(row[c] - max_logit));
    const int32_t label = labels[r];
    const double log_denominator = std::log(denominator);
    loss_sum += log_denominator - static_cast<double>(row[label] - max_logit);
    if (argmax == label) ++correct_count;
    if (grad_logits != nullptr) {
      float* grad_row = grad_logits + r * classes;
      for (int64_t c = 0; c < classes; ++c) {
        const double probability = std::exp(static_cast<double>(row[c] - max_logit) - log_denominator);
        grad_row[c] = static_cast<float>((probability - (c == label ? 1.0 : 0.0)) * grad_scale);
      }
    }
  }
  if (correct != nullptr) *correct = correct_count;
  return loss_sum;
}

}  // namespace tandem::kernels
