// CUDA kernels of sample, v2 (issue 20 part 2; benchmarks/NOTES.md, "The sampler redesign"). log p is computed
// once per element into a float32 scratch row, and every later pass reads that instead of both logit rows.
//
// Split (rows x chunks <= max_blocks, chunks = ceil(V / kSplitChunk) > 1: the small-batch latency case):
//   K1 SplitStatsKernel   one block per chunk: both models' max and sum of exp       -> stats [B, G]
//   K2 SplitLogpKernel    one block per chunk: log p -> scratch, chunk argmax, and the 256-bin count histogram of
//                         the top 8 bits of log p's key for top-k                    -> best [B, G], hist [B, G, 256]
//   K3 SplitPickKernel    one block per row: the filters' thresholds by radix select over the scratch row, then
//                         the inverse-CDF pick
// Otherwise one block per row runs the same three steps in one launch (SampleFusedKernel).
//
// The pick is the one of kernels/sample.cuh and of the CPU op: the same Philox uniform per row, the first token
// whose running weight in index order exceeds u * total, the same fixed-point top-p bins (their 64-bit sums kept
// as two 32-bit words, so no 64-bit shared atomics), the same thresholds. Tokens differ only where float32
// rounding of a running sum or a softmax statistic falls across a boundary.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "common/philox.h"
#include "kernels/block_row.cuh"
#include "kernels/launch.cuh"
#include "kernels/sample.cuh"

namespace memdec_fast {

constexpr int kSplitChunk = 4096;  // tokens a block takes when a row is split
constexpr int kDigitBins = 256;    // 8-bit radix digits

// Where each part of the workspace lies, and how the rows are cut. Made on the host.
struct SplitPlan {
  int chunks;              // blocks per row in K1 and K2; 1: the fused kernel
  int64_t scratch_stride;  // floats per scratch row: vocab rounded up to 4, so rows start 16-byte aligned
  size_t stats_at, best_at, hist_at, bytes;  // byte offsets in the workspace, and its size
};

inline size_t AlignUp16(size_t n) { return (n + 15) & ~size_t{15}; }

// max_blocks: how many blocks fill the GPU (the glue passes 2 x the SM count).
inline SplitPlan PlanSampleSplit(int rows, int vocab, int max_blocks) {
  SplitPlan s{};
  const int64_t g = (static_cast<int64_t>(vocab) + kSplitChunk - 1) / kSplitChunk;
  s.chunks = g > 1 && rows * g <= max_blocks ? static_cast<int>(g) : 1;
  s.scratch_stride = (static_cast<int64_t>(vocab) + 3) & ~int64_t{3};
  const size_t parts = static_cast<size_t>(rows) * s.chunks;
  s.stats_at = AlignUp16(static_cast<size_t>(rows) * s.scratch_stride * sizeof(float));
  s.best_at = s.stats_at + AlignUp16(parts * sizeof(PairStats));
  s.hist_at = s.best_at + AlignUp16(parts * sizeof(ArgMax));
  s.bytes = s.hist_at + parts * kDigitBins * sizeof(int);
  return s;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Calls f(i, b_i, m_i) for the tokens [lo, hi) of a row, spread over the block: loads of 16 bytes (of the wider
// type; the other loads as many elements) where both rows are aligned for them, a scalar tail, and scalar loads
// for unaligned rows (a strided view of a padded vocabulary).
template <typename TB, typename TM, typename F>
__device__ __forceinline__ void ForPairs(const RowPtrs<TB, TM>& row, int lo, int hi, F&& f) {
  constexpr int kVec = 16 / (sizeof(TB) > sizeof(TM) ? sizeof(TB) : sizeof(TM));
  const bool aligned = reinterpret_cast<uintptr_t>(row.base + lo) % (sizeof(TB) * kVec) == 0 &&
                       reinterpret_cast<uintptr_t>(row.mem + lo) % (sizeof(TM) * kVec) == 0;
  int tail = lo;
  if (aligned) {
    const int groups = (hi - lo) / kVec;
    const auto* bv = reinterpret_cast<const Pack<TB, kVec>*>(row.base + lo);
    const auto* mv = reinterpret_cast<const Pack<TM, kVec>*>(row.mem + lo);
    for (int j = threadIdx.x; j < groups; j += kThreads) {
      const Pack<TB, kVec> b = bv[j];
      const Pack<TM, kVec> m = mv[j];
      for (int l = 0; l < kVec; ++l) f(lo + j * kVec + l, ToFloat(b.v[l]), ToFloat(m.v[l]));
    }
    tail = lo + groups * kVec;
  }
  for (int i = tail + threadIdx.x; i < hi; i += kThreads) f(i, row.B(i), row.M(i));
}

// Calls f(i, x_i) for x[0, n) of a 16-byte aligned float row, spread over the block: float4 loads, then a scalar
// tail.
template <typename F>
__device__ __forceinline__ void ForScratch(const float* x, int n, F&& f) {
  const auto* xv = reinterpret_cast<const Pack<float, 4>*>(x);
  for (int j = threadIdx.x; j < n / 4; j += kThreads) {
    const Pack<float, 4> v = xv[j];
    for (int l = 0; l < 4; ++l) f(4 * j + l, v.v[l]);
  }
  for (int i = (n & ~3) + threadIdx.x; i < n; i += kThreads) f(i, x[i]);
}

// Calls f(i, x_i) for x[lo, hi) in this thread alone, in index order: float4 loads (x 16-byte aligned, lo a
// multiple of 4), then a scalar tail.
template <typename F>
__device__ __forceinline__ void ForRun(const float* x, int lo, int hi, F&& f) {
  const auto* xv = reinterpret_cast<const Pack<float, 4>*>(x);
  int i = lo;
  for (; i + 4 <= hi; i += 4) {
    const Pack<float, 4> v = xv[i / 4];
    for (int l = 0; l < 4; ++l) f(i + l, v.v[l]);
  }
  for (; i < hi; ++i) f(i, x[i]);
}

__device__ __forceinline__ int MinInt(int a, int b) { return a < b ? a : b; }

// Both models' max and sum of exp over tokens [lo, hi) of the row, in every thread.
template <typename TB, typename TM>
__device__ PairStats ChunkStats(const RowPtrs<TB, TM>& row, int lo, int hi, const RowParams& p) {
  const InvTemp tb = MakeInvTemp(p.base_temp), tm = MakeInvTemp(p.knn_temp);
  PairStats s{MaxSumIdentity(), MaxSumIdentity()};
  ForPairs(row, lo, hi, [&](int, float b, float m) {
    s.base = MaxSumAdd(s.base, b, tb);
    s.mem = MaxSumAdd(s.mem, m, tm);
  });
  return BlockAllReduce(s, MergePairStats{tb, tm});
}

// The row's mixture from its chunks' statistics, merged in chunk order (every block of a row gets the same).
__device__ __forceinline__ Mixture MergedMixture(const PairStats* parts, int chunks, const RowParams& p) {
  const InvTemp tb = MakeInvTemp(p.base_temp), tm = MakeInvTemp(p.knn_temp);
  PairStats s{MaxSumIdentity(), MaxSumIdentity()};
  for (int g = 0; g < chunks; ++g) {
    s.base = MaxSumMerge(s.base, parts[g].base, tb);
    s.mem = MaxSumMerge(s.mem, parts[g].mem, tm);
  }
  return MakeMixture(p, s.base, s.mem);
}

__device__ __forceinline__ bool UsesTopK(const RowParams& p, int vocab) {
  return !IsGreedy(p) && p.top_k > 0 && p.top_k < vocab;
}

// log p of tokens [lo, hi) into scratch[lo, hi); returns their argmax (first index on ties) in every thread. With
// `hist`, also the counts of the top 8 bits of OrderedKey(log p) (radix select's first digit), written to hist[256].
template <typename TB, typename TM>
__device__ ArgMax ChunkLogp(const RowPtrs<TB, TM>& row, int lo, int hi, const Mixture& mix, float* scratch,
                            int* hist) {
  __shared__ int counts[kDigitBins];
  if (hist != nullptr) {
    for (int j = threadIdx.x; j < kDigitBins; j += kThreads) counts[j] = 0;
    __syncthreads();
  }
  ArgMax best{NegInf(), lo};
  ForPairs(row, lo, hi, [&](int i, float b, float m) {
    const float lp = mix.LogProb(b, m);
    scratch[i] = lp;
    if (lp > best.value) best = ArgMax{lp, i};  // a thread's tokens come in index order
    if (hist != nullptr) atomicAdd(&counts[OrderedKey(lp) >> 24], 1);
  });
  best = BlockAllReduce(best, MergeArgMax{});  // its barriers also complete the counts
  if (hist != nullptr) {
    for (int j = threadIdx.x; j < kDigitBins; j += kThreads) hist[j] = counts[j];
  }
  return best;
}

// Radix select over the keys OrderedKey(log p) of the scratch row's candidates (log p >= floor), as
// BlockRadixSelect in kernels/sample.cuh: WEIGHTED=false gives the k-th largest (need = k), WEIGHTED=true the top-p
// cut (need = top_p) with the same fixed-point weights. A weight's 64-bit sum is kept as two 32-bit words: the
// thread whose add wraps the low word carries into the high one. `first` (WEIGHTED=false only): the first digit's
// counts, [chunks, 256], already made by ChunkLogp.
template <bool WEIGHTED>
__device__ float ScratchRadixSelect(const float* lp, int vocab, float floor, float max_logp, float inv_t,
                                    double need, const int* first, int chunks) {
  using Bin = typename std::conditional<WEIGHTED, unsigned long long, int>::type;
  __shared__ unsigned low[kDigitBins], high[kDigitBins];
  __shared__ Bin bins[kDigitBins];
  __shared__ RadixState<Bin> st;
  if (threadIdx.x == 0) {
    st.prefix = st.mask = 0;
    if constexpr (!WEIGHTED) st.remaining = static_cast<Bin>(need);
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int j = threadIdx.x; j < kDigitBins; j += kThreads) low[j] = high[j] = 0;
    __syncthreads();
    const uint32_t pre = st.prefix, msk = st.mask;
    if (!WEIGHTED && shift == 24 && first != nullptr) {
      for (int j = threadIdx.x; j < kDigitBins; j += kThreads) {
        int n = 0;
        for (int g = 0; g < chunks; ++g) n += first[g * kDigitBins + j];
        low[j] = static_cast<unsigned>(n);
      }
    } else {
      ForScratch(lp, vocab, [&](int, float x) {
        const uint32_t key = OrderedKey(x);
        if (!(x >= floor && (key & msk) == pre)) return;
        const unsigned d = (key >> shift) & 255u;
        if constexpr (WEIGHTED) {
          const unsigned long long w = static_cast<unsigned long long>(TokenWeight(x, max_logp, inv_t) * kWeightScale);
          const unsigned w_lo = static_cast<unsigned>(w), w_hi = static_cast<unsigned>(w >> 32);
          const unsigned old = atomicAdd(&low[d], w_lo);
          const unsigned carry = old + w_lo < old ? 1u : 0u;
          if (w_hi + carry != 0u) atomicAdd(&high[d], w_hi + carry);
        } else {
          atomicAdd(&low[d], 1u);
        }
      });
    }
    __syncthreads();
    for (int j = threadIdx.x; j < kDigitBins; j += kThreads) {
      bins[j] = WEIGHTED ? static_cast<Bin>((static_cast<unsigned long long>(high[j]) << 32) | low[j])
                         : static_cast<Bin>(low[j]);
    }
    __syncthreads();
    if (!RadixNextDigit<WEIGHTED>(bins, shift, need, st)) break;
  }
  return KeyToFloat(st.prefix);
}

// Inverse-CDF pick over the scratch row: the first token in index order whose running weight (tokens with
// log p >= threshold) exceeds target = u * total. Each thread owns a contiguous run of tokens; one block scan of
// the runs' sums places the target in a run, and only that run's owner (and the owners of later runs, which claim
// their first kept token should rounding leave the owner short) walks its tokens again.
__device__ __forceinline__ int ScratchInverseCdf(const float* lp, int vocab, float threshold, float max_logp,
                                                 float inv_t, float u) {
  using Scan = cub::BlockScan<float, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int pick;
  const int run = (((vocab + kThreads - 1) / kThreads) + 3) & ~3;  // a multiple of 4: float4 loads stay aligned
  const int lo = MinInt(static_cast<int>(threadIdx.x) * run, vocab), hi = MinInt(lo + run, vocab);
  float sum = 0.0f;
  int first = -1, last = -1;
  ForRun(lp, lo, hi, [&](int i, float x) {
    const float w = x >= threshold ? TokenWeight(x, max_logp, inv_t) : 0.0f;
    if (w > 0.0f) {
      sum += w;
      first = first < 0 ? i : first;
      last = i;
    }
  });
  if (threadIdx.x == 0) pick = INT_MAX;
  float before, total;
  Scan(tmp).ExclusiveSum(sum, before, total);  // its barriers order pick's reset before the claims
  const float target = u * total;
  if (first >= 0 && before > target) {
    atomicMin(&pick, first);
  } else if (first >= 0 && before + sum > target) {
    float cum = before;
    for (int i = first; i <= last; ++i) {
      const float x = lp[i];
      if (!(x >= threshold)) continue;
      cum += TokenWeight(x, max_logp, inv_t);
      if (cum > target) {
        atomicMin(&pick, i);
        break;
      }
    }
  }
  __syncthreads();
  const int found = pick;
  if (found != INT_MAX) return found;
  // Rounding left every run short of target (a uniform branch): the last kept token.
  return BlockAllReduce(last, MaxInt{});
}

// The pick of a valid row from its scratch log p [vocab] and argmax; `first`: top-k's first digit, [chunks, 256].
__device__ __forceinline__ int RowPick(const float* lp, int vocab, const RowParams& p, ArgMax best, const int* first,
                                       int chunks, const PhiloxArgs& philox, int64_t r) {
  if (IsGreedy(p)) return best.index;
  const float max_logp = best.value, inv_t = 1.0f / p.temperature;
  float threshold = NegInf();
  if (UsesTopK(p, vocab)) {
    threshold = ScratchRadixSelect<false>(lp, vocab, threshold, max_logp, inv_t, p.top_k, first, chunks);
  }
  if (p.top_p < 1.0f) {
    threshold = ScratchRadixSelect<true>(lp, vocab, threshold, max_logp, inv_t, p.top_p, nullptr, 0);
  }
  if (p.min_p > 0.0f) threshold = fmaxf(threshold, max_logp + p.temperature * logf(p.min_p));
  uint64_t seed, offset;
  UnpackPhilox(philox, &seed, &offset);
  const int pick = ScratchInverseCdf(lp, vocab, threshold, max_logp, inv_t, RowUniform(seed, offset, r));
  return pick < 0 ? best.index : pick;  // no token with positive weight: cannot happen for a valid row
}

__device__ __forceinline__ void WriteInvalid(int64_t r, int64_t* tokens, float* logprobs) {
  if (threadIdx.x == 0) {
    tokens[r] = -1;
    logprobs[r] = QuietNaN();
  }
}

template <typename TB, typename TM>
__global__ void __launch_bounds__(kThreads)
    SplitStatsKernel(const TB* base, int64_t base_stride, const TM* mem, int64_t mem_stride, int vocab, int chunks,
                     const float* table, RowParams scalars, PairStats* stats) {
  const int64_t r = blockIdx.x / chunks;
  const int lo = (blockIdx.x % chunks) * kSplitChunk, hi = MinInt(lo + kSplitChunk, vocab);
  const RowPtrs<TB, TM> row{base + r * base_stride, mem + r * mem_stride};
  const PairStats s = ChunkStats(row, lo, hi, LoadRowParams(table, r, scalars));
  if (threadIdx.x == 0) stats[blockIdx.x] = s;
}

template <typename TB, typename TM>
__global__ void __launch_bounds__(kThreads)
    SplitLogpKernel(const TB* base, int64_t base_stride, const TM* mem, int64_t mem_stride, int vocab, int chunks,
                    const float* table, RowParams scalars, const PairStats* stats, float* scratch,
                    int64_t scratch_stride, ArgMax* best, int* hist) {
  const int64_t r = blockIdx.x / chunks;
  const int lo = (blockIdx.x % chunks) * kSplitChunk, hi = MinInt(lo + kSplitChunk, vocab);
  const RowParams p = LoadRowParams(table, r, scalars);
  const Mixture mix = MergedMixture(stats + r * chunks, chunks, p);
  if (!mix.valid) return;  // SplitPickKernel writes the row's -1 and NaN
  const RowPtrs<TB, TM> row{base + r * base_stride, mem + r * mem_stride};
  int* h = UsesTopK(p, vocab) ? hist + static_cast<int64_t>(blockIdx.x) * kDigitBins : nullptr;
  const ArgMax b = ChunkLogp(row, lo, hi, mix, scratch + r * scratch_stride, h);
  if (threadIdx.x == 0) best[blockIdx.x] = b;
}

static __global__ void __launch_bounds__(kThreads)
    SplitPickKernel(int vocab, int chunks, const float* table, RowParams scalars, const PairStats* stats,
                    const float* scratch, int64_t scratch_stride, const ArgMax* best, const int* hist,
                    PhiloxArgs philox, int64_t* tokens, float* logprobs) {
  const int64_t r = blockIdx.x;
  const RowParams p = LoadRowParams(table, r, scalars);
  if (!MergedMixture(stats + r * chunks, chunks, p).valid) return WriteInvalid(r, tokens, logprobs);
  ArgMax b = best[r * chunks];
  for (int g = 1; g < chunks; ++g) b = MergeArgMax{}(b, best[r * chunks + g]);
  const float* lp = scratch + r * scratch_stride;
  const int pick = RowPick(lp, vocab, p, b, hist + r * chunks * kDigitBins, chunks, philox, r);
  if (threadIdx.x == 0) {
    tokens[r] = pick;
    logprobs[r] = lp[pick];
  }
}

// One block per row: K1, K2 and K3 in one launch, the scratch row written and read back by the same block.
template <typename TB, typename TM>
__global__ void __launch_bounds__(kThreads)
    SampleFusedKernel(const TB* base, int64_t base_stride, const TM* mem, int64_t mem_stride, int vocab,
                      const float* table, RowParams scalars, float* scratch, int64_t scratch_stride, int* hist,
                      PhiloxArgs philox, int64_t* tokens, float* logprobs) {
  const int64_t r = blockIdx.x;
  const RowPtrs<TB, TM> row{base + r * base_stride, mem + r * mem_stride};
  const RowParams p = LoadRowParams(table, r, scalars);
  const PairStats s = ChunkStats(row, 0, vocab, p);
  const Mixture mix = MakeMixture(p, s.base, s.mem);
  if (!mix.valid) return WriteInvalid(r, tokens, logprobs);
  float* lp = scratch + r * scratch_stride;
  int* h = UsesTopK(p, vocab) ? hist + r * kDigitBins : nullptr;
  const ArgMax b = ChunkLogp(row, 0, vocab, mix, lp, h);
  // Not needed today (ChunkLogp's scratch writes precede its reduction's barriers, and each thread reads back the
  // counts it wrote), but a change to either loop must not be able to race.
  __syncthreads();
  const int pick = RowPick(lp, vocab, p, b, h, 1, philox, r);
  if (threadIdx.x == 0) {
    tokens[r] = pick;
    logprobs[r] = lp[pick];
  }
}

// `workspace`: plan.bytes of device memory, 16-byte aligned, from PlanSampleSplit(rows, vocab, max_blocks).
template <typename TB, typename TM>
void LaunchSampleSplit(const TB* base, int64_t base_stride, const TM* mem, int64_t mem_stride, int rows, int vocab,
                       const float* table, RowParams scalars, PhiloxArgs philox, int64_t* tokens, float* logprobs,
                       const SplitPlan& plan, void* workspace, cudaStream_t stream) {
  char* ws = static_cast<char*>(workspace);
  float* scratch = reinterpret_cast<float*>(ws);
  auto* stats = reinterpret_cast<PairStats*>(ws + plan.stats_at);
  auto* best = reinterpret_cast<ArgMax*>(ws + plan.best_at);
  int* hist = reinterpret_cast<int*>(ws + plan.hist_at);
  const int64_t ss = plan.scratch_stride;
  if (plan.chunks == 1) {
    MDF_LAUNCH(SampleFusedKernel, rows, kThreads, stream, base, base_stride, mem, mem_stride, vocab, table, scalars,
               scratch, ss, hist, philox, tokens, logprobs);
    return;
  }
  const int blocks = rows * plan.chunks;
  MDF_LAUNCH(SplitStatsKernel, blocks, kThreads, stream, base, base_stride, mem, mem_stride, vocab, plan.chunks, table,
             scalars, stats);
  MDF_LAUNCH(SplitLogpKernel, blocks, kThreads, stream, base, base_stride, mem, mem_stride, vocab, plan.chunks, table,
             scalars, stats, scratch, ss, best, hist);
  MDF_LAUNCH(SplitPickKernel, rows, kThreads, stream, vocab, plan.chunks, table, scalars, stats, scratch, ss, best,
             hist, philox, tokens, logprobs);
}

}  // namespace memdec_fast
