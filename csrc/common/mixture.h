// The per-element math of the two-model mixture, shared by the CPU and CUDA
// kernels so that both compute the same function:
//
//   log p_i = logaddexp(log(1 - lmbda) + (b_i - max b) / base_temp - lse_b,
//                       log(lmbda)     + (m_i - max m) / knn_temp  - lse_m)
//
// with lse over the shifted, scaled logits. Shifting by the raw max before
// scaling keeps every step finite for any temperature and any float32 logit:
// the largest logit maps to exactly 0, so each lse lies in [0, log V].
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace memdec_fast {

// Columns of the packed per-row parameter table [B, kNumRowParams] float32
// (memdec_fast.ops.ROW_PARAM_COLUMNS).
enum RowParamColumn { kLmbda = 0, kKnnTemp, kBaseTemp, kTemperature, kTopK, kTopP, kMinP, kNumRowParams };

struct RowParams {
  float lmbda, knn_temp, base_temp, temperature;
  int top_k;
  float top_p, min_p;
};

// The row's parameters: from the table when there is one, else the call's scalars.
MDF_HD RowParams LoadRowParams(const float* table, int64_t row, const RowParams& scalars) {
  if (table == nullptr) return scalars;
  const float* t = table + row * kNumRowParams;
  return RowParams{t[kLmbda], t[kKnnTemp], t[kBaseTemp], t[kTemperature], static_cast<int>(t[kTopK]),
                   t[kTopP], t[kMinP]};
}

MDF_HD float NegInf() { return -INFINITY; }  // macros, not numeric_limits: usable in device code as is
MDF_HD float QuietNaN() { return NAN; }
MDF_HD bool IsFinite(float x) { return x - x == 0.0f; }

MDF_HD float LogAddExp(float a, float b) {
  const float hi = a > b ? a : b, lo = a > b ? b : a;
  if (hi == NegInf()) return NegInf();
  return hi + log1pf(expf(lo - hi));
}

// 1 / temperature of one model's row, as (x - max) / temp is computed from it.
struct InvTemp {
  float inv2;   // 2 / temp
  float temp;
  bool divide;  // 2 / temp overflows: a subnormal temp (or one that rounded to 0)
};

MDF_HD InvTemp MakeInvTemp(float temp) {
  const float inv2 = 2.0f / temp;
  return InvTemp{inv2, temp, !IsFinite(inv2)};
}

// (x - max) / temp for x <= max. The halves cannot overflow where x - max
// could (logits spanning more than FLT_MAX); x == max gives exactly 0 and
// x == -inf gives -inf for every temp in [0, FLT_MAX], never 0 * inf.
MDF_HD float ScaledDiff(float x, float max, const InvTemp& t) {
  const float d = 0.5f * x - 0.5f * max;
  if (!t.divide) return d * t.inv2;
  return d == 0.0f ? 0.0f : d / t.temp * 2.0f;
}

// Running max of the raw logits and sum of exp((x - max) / temp) of one model's
// row (online softmax). NaN or +inf inputs turn the sum into NaN (or leave the
// max at +inf); an all -inf row leaves the max at -inf.
struct MaxSum {
  float max, sum;
};

MDF_HD MaxSum MaxSumIdentity() { return MaxSum{NegInf(), 0.0f}; }

MDF_HD MaxSum MaxSumAdd(MaxSum s, float x, const InvTemp& t) {
  if (x == NegInf()) return s;  // a masked token adds nothing
  if (x > s.max) {
    s.sum = s.sum * expf(ScaledDiff(s.max, x, t)) + 1.0f;
    s.max = x;
  } else {
    s.sum += expf(ScaledDiff(x, s.max, t));  // NaN, or inf - inf, poisons the sum
  }
  return s;
}

MDF_HD MaxSum MaxSumMerge(MaxSum a, MaxSum b, const InvTemp& t) {
  if (a.max == NegInf()) return MaxSum{b.max, b.sum + a.sum};
  if (b.max == NegInf()) return MaxSum{a.max, a.sum + b.sum};
  const float m = a.max > b.max ? a.max : b.max;
  return MaxSum{m, a.sum * expf(ScaledDiff(a.max, m, t)) + b.sum * expf(ScaledDiff(b.max, m, t))};
}

// log of the sum of exp((x - max) / temp); non-finite for an invalid row
// (NaN, +inf, or all -inf logits).
MDF_HD float ShiftedLogSumExp(MaxSum s) { return IsFinite(s.max) ? logf(s.sum) : QuietNaN(); }

// Per-row constants of the mixture, built once from both models' statistics.
struct Mixture {
  InvTemp base_t, mem_t;
  float base_max, mem_max;      // raw logits
  float base_shift, mem_shift;  // log(1 - lmbda) - lse_b, log(lmbda) - lse_m
  float lse_base, lse_mem;      // of the shifted, scaled logits
  bool use_base, use_mem;       // weight > 0
  bool base_ok, mem_ok;         // finite log-sum-exp
  bool valid;                   // every used model is valid

  // log p_i from one base and one memory logit.
  MDF_HD float LogProb(float b, float m) const {
    const float xb = use_base ? ScaledDiff(b, base_max, base_t) + base_shift : NegInf();
    const float xm = use_mem ? ScaledDiff(m, mem_max, mem_t) + mem_shift : NegInf();
    return LogAddExp(xb, xm);
  }
  MDF_HD float BaseLogProb(float b) const { return base_ok ? ScaledDiff(b, base_max, base_t) - lse_base : QuietNaN(); }
  MDF_HD float MemLogProb(float m) const { return mem_ok ? ScaledDiff(m, mem_max, mem_t) - lse_mem : QuietNaN(); }
};

// `base_stats` and `mem_stats` are MaxSum over the raw b_i and m_i with the
// row's temperatures.
MDF_HD Mixture MakeMixture(const RowParams& p, MaxSum base_stats, MaxSum mem_stats) {
  Mixture mix;
  mix.base_t = MakeInvTemp(p.base_temp);
  mix.mem_t = MakeInvTemp(p.knn_temp);
  mix.base_max = base_stats.max;
  mix.mem_max = mem_stats.max;
  mix.lse_base = ShiftedLogSumExp(base_stats);
  mix.lse_mem = ShiftedLogSumExp(mem_stats);
  mix.base_ok = IsFinite(mix.lse_base);
  mix.mem_ok = IsFinite(mix.lse_mem);
  mix.use_base = p.lmbda < 1.0f;
  mix.use_mem = p.lmbda > 0.0f;
  mix.base_shift = mix.use_base ? log1pf(-p.lmbda) - mix.lse_base : NegInf();
  mix.mem_shift = mix.use_mem ? logf(p.lmbda) - mix.lse_mem : NegInf();
  mix.valid = (!mix.use_base || mix.base_ok) && (!mix.use_mem || mix.mem_ok);
  return mix;
}

// A uint32 whose unsigned order is the float order (for radix selection).
MDF_HD uint32_t OrderedKey(float x) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = x;
  return (v.u & 0x80000000u) ? ~v.u : (v.u | 0x80000000u);
}

MDF_HD float KeyToFloat(uint32_t key) {
  union {
    float f;
    uint32_t u;
  } v;
  v.u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return v.f;
}

// Greedy rows: temperature 0, and any temperature too small (or invalid) for
// 1 / temperature to be finite, where sampling would be greedy anyway.
MDF_HD bool IsGreedy(const RowParams& p) { return !(p.temperature > 0.0f) || !IsFinite(1.0f / p.temperature); }

// Sampling weight exp((log p_i - max log p) / temperature) of a kept token.
MDF_HD float TokenWeight(float logp, float max_logp, float inv_temperature) {
  return expf((logp - max_logp) * inv_temperature);
}

}  // namespace memdec_fast
