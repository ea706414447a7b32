// SIMD math for the CPU kernels: 8 floats per vector (GCC vector extensions), an
// exp2-domain exponential and a log1p, both within about 2 ulp of expf/log1pf.
// The same source compiles twice: for AVX2 + FMA (chosen at run time when the
// CPU has them) and for the build's baseline (SSE2), so the extension needs no
// -march flag. Both give the same results up to FMA rounding.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors never cross a non-inlined call

namespace memdec_fast {
namespace vec {

typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;

#define MDF_VI inline __attribute__((always_inline))

MDF_VI F8 Splat(float x) { return F8{} + x; }
MDF_VI I8 AsInt(F8 x) { return (I8)x; }  // vector casts reinterpret the bits
MDF_VI F8 AsFloat(I8 x) { return (F8)x; }
MDF_VI F8 Select(I8 mask, F8 a, F8 b) { return mask ? a : b; }
MDF_VI F8 Max(F8 a, F8 b) { return a > b ? a : b; }  // b where either is NaN
MDF_VI F8 Min(F8 a, F8 b) { return a < b ? a : b; }
MDF_VI bool Any(I8 mask) {
  uint64_t w[4];
  std::memcpy(w, &mask, 32);
  return (w[0] | w[1] | w[2] | w[3]) != 0;
}
MDF_VI float HMax(F8 v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
MDF_VI double HSum(F8 v) {
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// Loads 8 logits as float32; Load(p, n, fill) loads n < 8 and fills the rest.
MDF_VI F8 Load(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
MDF_VI F8 Load(const c10::BFloat16* p) {
  uint16_t raw[kLanes];
  std::memcpy(raw, p, sizeof(raw));
  I8 bits;
  for (int l = 0; l < kLanes; ++l) bits[l] = static_cast<int32_t>(raw[l]) << 16;
  return AsFloat(bits);
}
MDF_VI F8 Load(const c10::Half* p) {
  F8 v;
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
template <typename T>
MDF_VI F8 Load(const T* p, int n, float fill) {
  T tmp[kLanes];
  for (int l = 0; l < kLanes; ++l) tmp[l] = l < n ? p[l] : static_cast<T>(0.0f);
  const F8 v = Load(static_cast<const T*>(tmp));
  I8 lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = l;
  return Select(lane < n, v, Splat(fill));
}

// 2**y for y <= 0 (or -inf); 0 below 2**-126. Round to the nearest integer n,
// then a degree-7 polynomial of 2**(y - n) on [-0.5, 0.5] (error ~1e-9), times 2**n.
MDF_VI F8 Exp2(F8 y) {
  const F8 yc = Max(y, Splat(-126.0f));
  const F8 magic = Splat(12582912.0f);  // 1.5 * 2**23: adding it rounds to an integer
  const F8 t = yc + magic;
  const F8 f = yc - (t - magic);
  F8 p = f * 1.5252734e-5f + 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const I8 bits = (AsInt(t) - AsInt(magic) + 127) << 23;
  return Select(y < -126.0f, F8{}, p * AsFloat(bits));
}

constexpr float kLog2e = 1.44269504088896341f;

// e**x for x <= 0.
MDF_VI F8 Exp(F8 x) { return Exp2(x * kLog2e); }

// log1p(z) for z in [0, 1]: musl's logf of u = 1 + z, plus the rounding
// correction (z - (u - 1)) / u.
MDF_VI F8 Log1p(F8 z) {
  const F8 u = 1.0f + z;
  I8 ix = AsInt(u) + (0x3f800000 - 0x3f3504f3);
  const I8 k = (ix >> 23) - 0x7f;
  ix = (ix & 0x007fffff) + 0x3f3504f3;
  const F8 f = AsFloat(ix) - 1.0f;
  const F8 s = f / (2.0f + f);
  const F8 zz = s * s, w = zz * zz;
  const F8 r = zz * (0.66666662693f + w * 0.28498786688f) + w * (0.40000972152f + w * 0.24279078841f);
  const F8 hfsq = 0.5f * f * f;
  const F8 dk = __builtin_convertvector(k, F8);
  const F8 logu = s * (hfsq + r) + dk * 9.0580006145e-06f - hfsq + f + dk * 6.9313812256e-01f;
  return logu + (z - (u - 1.0f)) / u;
}

// log(e**a + e**b), -inf when both are -inf.
MDF_VI F8 LogAddExp(F8 a, F8 b) {
  const F8 hi = Max(a, b), lo = Min(a, b);
  const F8 r = hi + Log1p(Exp(lo - hi));
  return Select(hi == -__builtin_inff(), hi, r);
}

// Runs f() compiled for AVX2 + FMA when the CPU has them, else for the baseline.
// `flatten` inlines everything f calls, so its loops get that instruction set.
template <class F>
__attribute__((target("avx2,fma"), flatten)) void RunAvx2(const F& f) {
  f();
}
template <class F>
__attribute__((flatten)) void RunBaseline(const F& f) {
  f();
}
inline bool HasAvx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
template <class F>
void Run(const F& f) {
  if (HasAvx2()) {
    RunAvx2(f);
  } else {
    RunBaseline(f);
  }
}

}  // namespace vec
}  // namespace memdec_fast
