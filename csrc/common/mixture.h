// The per-element math of the two-model mixture, shared by the CPU and CUDA
// kernels so that both compute the same function:
//
//   log p_i = logaddexp(log(1 - lmbda) + b_i / base_temp - lse_b,
//                       log(lmbda)     + m_i / knn_temp  - lse_m)
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

MDF_HD float LogAddExp(float a, float b) {
  const float hi = a > b ? a : b, lo = a > b ? b : a;
  if (hi == NegInf()) return NegInf();
  return hi + log1pf(expf(lo - hi));
}

// Running max and sum of exp(x - max) of one model's scaled logits (online softmax).
// NaN or +inf inputs turn the sum into NaN; an all -inf row leaves max at -inf.
struct MaxSum {
  float max, sum;
};

MDF_HD MaxSum MaxSumIdentity() { return MaxSum{NegInf(), 0.0f}; }

MDF_HD MaxSum MaxSumAdd(MaxSum s, float x) {
  if (x == NegInf()) return s;  // a masked token adds nothing
  if (x > s.max) {
    s.sum = s.sum * expf(s.max - x) + 1.0f;
    s.max = x;
  } else {
    s.sum += expf(x - s.max);  // NaN, or inf - inf, poisons the sum
  }
  return s;
}

MDF_HD MaxSum MaxSumMerge(MaxSum a, MaxSum b) {
  if (a.max == NegInf()) return MaxSum{b.max, b.sum + a.sum};
  if (b.max == NegInf()) return MaxSum{a.max, a.sum + b.sum};
  const float m = a.max > b.max ? a.max : b.max;
  return MaxSum{m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

// log-sum-exp; non-finite for an invalid row.
MDF_HD float LogSumExp(MaxSum s) { return s.max + logf(s.sum); }

MDF_HD bool IsFinite(float x) { return x - x == 0.0f; }

// Per-row constants of the mixture, built once from both models' statistics.
struct Mixture {
  float inv_base_temp, inv_knn_temp;
  float base_shift, mem_shift;  // log(1 - lmbda) - lse_b, log(lmbda) - lse_m
  float lse_base, lse_mem;      // of the scaled logits
  bool use_base, use_mem;       // weight > 0
  bool base_ok, mem_ok;         // finite log-sum-exp
  bool valid;                   // every used model is valid

  // log p_i from one base and one memory logit.
  MDF_HD float LogProb(float b, float m) const {
    const float xb = use_base ? b * inv_base_temp + base_shift : NegInf();
    const float xm = use_mem ? m * inv_knn_temp + mem_shift : NegInf();
    return LogAddExp(xb, xm);
  }
  MDF_HD float BaseLogProb(float b) const { return base_ok ? b * inv_base_temp - lse_base : QuietNaN(); }
  MDF_HD float MemLogProb(float m) const { return mem_ok ? m * inv_knn_temp - lse_mem : QuietNaN(); }
};

// `base_stats` and `mem_stats` are MaxSum over b_i / base_temp and m_i / knn_temp.
MDF_HD Mixture MakeMixture(const RowParams& p, MaxSum base_stats, MaxSum mem_stats) {
  Mixture mix;
  mix.inv_base_temp = 1.0f / p.base_temp;
  mix.inv_knn_temp = 1.0f / p.knn_temp;
  mix.lse_base = LogSumExp(base_stats);
  mix.lse_mem = LogSumExp(mem_stats);
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
