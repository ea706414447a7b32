// Row helpers for the CPU kernels: one row of logits at a time, plain loops.
#pragma once

#include <cstdint>

#include "common/mixture.h"

namespace memdec_fast {

// MaxSum of x_i * scale over one row, in two passes (the max pass vectorises).
template <typename T>
MaxSum RowMaxSum(const T* x, int64_t vocab, float scale) {
  float mx = NegInf();
  bool nan = false;
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = static_cast<float>(x[i]) * scale;
    mx = v > mx ? v : mx;
    nan |= v != v;
  }
  if (nan) return MaxSum{mx, QuietNaN()};
  if (mx == NegInf()) return MaxSum{mx, 0.0f};
  // +inf gives exp(inf - inf) = NaN: the row is invalid. A double sum keeps the
  // serial loop's rounding error below that of a float32 log_softmax.
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += expf(static_cast<float>(x[i]) * scale - mx);
  return MaxSum{mx, static_cast<float>(sum)};
}

template <typename TB, typename TM>
Mixture RowMixture(const TB* base, const TM* mem, int64_t vocab, const RowParams& p) {
  return MakeMixture(p, RowMaxSum(base, vocab, 1.0f / p.base_temp), RowMaxSum(mem, vocab, 1.0f / p.knn_temp));
}

}  // namespace memdec_fast
