// Barriers, warp intrinsics, atomics and bit tricks of CUDA on the CPU. Every
// synchronising call records its file:line, so the shim can say where threads
// diverged.
#pragma once

#include <atomic>
#include <type_traits>

#include "cudacpu/runtime.h"

namespace cudacpu {

template <typename T>
uint64_t ToBits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp intrinsics move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T FromBits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

template <typename T>
T Shuffle(Site site, WarpOp op, unsigned mask, T value, int arg, int width = warpSize) {
  if (width != warpSize) Fail("%s:%d: shuffle width %d: the shim supports whole warps only", site.file, site.line, width);
  return FromBits<T>(ThisBlock().WarpExchange(site, op, mask, ToBits(value), arg));
}

inline unsigned Ballot(Site site, unsigned mask, bool predicate) {
  return static_cast<unsigned>(ThisBlock().WarpExchange(site, WarpOp::kBallot, mask, predicate ? 1 : 0, 0));
}

inline void SyncWarp(Site site, unsigned mask = kFullMask) { ThisBlock().WarpExchange(site, WarpOp::kSync, mask, 0, 0); }

}  // namespace cudacpu

#define __syncthreads() ::cudacpu::ThisBlock().SyncThreads(CUDACPU_SITE)
#define __syncwarp(...) ::cudacpu::SyncWarp(CUDACPU_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::cudacpu::Shuffle(CUDACPU_SITE, ::cudacpu::WarpOp::kShfl, __VA_ARGS__)
#define __shfl_up_sync(...) ::cudacpu::Shuffle(CUDACPU_SITE, ::cudacpu::WarpOp::kShflUp, __VA_ARGS__)
#define __shfl_down_sync(...) ::cudacpu::Shuffle(CUDACPU_SITE, ::cudacpu::WarpOp::kShflDown, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cudacpu::Shuffle(CUDACPU_SITE, ::cudacpu::WarpOp::kShflXor, __VA_ARGS__)
#define __ballot_sync(mask, predicate) ::cudacpu::Ballot(CUDACPU_SITE, (mask), (predicate))
#define __any_sync(mask, predicate) (::cudacpu::Ballot(CUDACPU_SITE, (mask), (predicate)) != 0u)
#define __all_sync(mask, predicate) (::cudacpu::Ballot(CUDACPU_SITE, (mask), (predicate)) == 0xffffffffu)

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }

// Atomics on shared or global memory; std::atomic_ref so ThreadSanitizer sees them.
template <typename T, typename U>
T atomicAdd(T* p, U v) {
  return std::atomic_ref<T>(*p).fetch_add(static_cast<T>(v));
}
template <typename T, typename U>
T atomicSub(T* p, U v) {
  return std::atomic_ref<T>(*p).fetch_sub(static_cast<T>(v));
}
template <typename T, typename U>
T atomicExch(T* p, U v) {
  return std::atomic_ref<T>(*p).exchange(static_cast<T>(v));
}
template <typename T, typename U>
T atomicMin(T* p, U v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (static_cast<T>(v) < old && !a.compare_exchange_weak(old, static_cast<T>(v))) {
  }
  return old;
}
template <typename T, typename U>
T atomicMax(T* p, U v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (static_cast<T>(v) > old && !a.compare_exchange_weak(old, static_cast<T>(v))) {
  }
  return old;
}
template <typename T, typename U, typename W>
T atomicCAS(T* p, U expected, W desired) {
  T e = static_cast<T>(expected);
  std::atomic_ref<T>(*p).compare_exchange_strong(e, static_cast<T>(desired));
  return e;
}
