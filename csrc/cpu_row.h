// Row helpers for the CPU kernels: one row of logits at a time, plain loops.
#pragma once

#include <cstdint>

#include "common/mixture.h"

namespace memdec_fast {

// MaxSum of one row in two passes: the raw max (a pass that vectorises), then
// the sum of exp((x_i - max) / temp).
template <typename T>
MaxSum RowMaxSum(const T* x, int64_t vocab, float temp) {
  float mx = NegInf();
  bool nan = false;
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = static_cast<float>(x[i]);
    mx = v > mx ? v : mx;
    nan |= v != v;
  }
  if (nan) return MaxSum{mx, QuietNaN()};
  if (!IsFinite(mx)) return MaxSum{mx, 0.0f};  // all -inf, or +inf: the row is invalid
  // A double sum keeps the serial loop's rounding error below that of a float32 log_softmax.
  const InvTemp t = MakeInvTemp(temp);
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += expf(ScaledDiff(static_cast<float>(x[i]), mx, t));
  return MaxSum{mx, static_cast<float>(sum)};
}

template <typename TB, typename TM>
Mixture RowMixture(const TB* base, const TM* mem, int64_t vocab, const RowParams& p) {
  return MakeMixture(p, RowMaxSum(base, vocab, p.base_temp), RowMaxSum(mem, vocab, p.knn_temp));
}

}  // namespace memdec_fast
