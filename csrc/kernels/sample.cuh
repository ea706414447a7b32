// CUDA kernel of sample: one block per row, no sort and no global scratch.
//
// Passes over the row (each re-reads both logits from L2/HBM):
//   1. softmax statistics of both models      (BlockMixture)
//   2. argmax of log p                        (greedy rows stop here)
//   3. top-k: radix select of the k-th largest log p, 4 passes of 8-bit digits
//   4. top-p: total kept weight, then a radix select by weight, 1 + 4 passes
//   5. total weight above the final threshold, then an inverse-CDF scan with
//      one Philox uniform per row
// Filters are value thresholds on log p, so their intersection is one threshold.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cub/block/block_scan.cuh>

#include "common/philox.h"
#include "kernels/block_row.cuh"
#include "kernels/launch.cuh"

namespace memdec_fast {

// The generator state of one call: values, or (under CUDA-graph capture)
// device pointers read at run time so that each replay draws fresh numbers.
struct PhiloxArgs {
  uint64_t seed, offset;
  const int64_t* seed_ptr;
  const int64_t* offset_ptr;
  uint64_t offset_intragraph;
  bool captured;
};

// The counter block of this call. torch reserves offsets in units of 32-bit
// numbers (4 per Philox block) and its own kernels, like curand_init, count
// blocks as offset / 4: dividing here keeps our rows on the blocks reserved for
// us rather than on blocks another op may draw from.
__device__ __forceinline__ void UnpackPhilox(const PhiloxArgs& a, uint64_t* seed, uint64_t* block) {
  *seed = a.captured ? static_cast<uint64_t>(*a.seed_ptr) : a.seed;
  *block = (a.captured ? static_cast<uint64_t>(*a.offset_ptr) + a.offset_intragraph : a.offset) / 4;
}

// Top-p bins sum weights in fixed point, so that the order of the shared-memory
// atomics cannot change a threshold: the same seed gives the same tokens. Weights
// are <= 1 and V <= 2**30, so sums stay below 2**62.
constexpr float kWeightScale = 4294967296.0f;  // 2**32

struct ArgMax {
  float value;
  int index;
};

struct MaxInt {
  __device__ __forceinline__ int operator()(int a, int b) const { return a > b ? a : b; }
};

struct MergeArgMax {  // larger value; the first index on ties
  __device__ __forceinline__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    if (a.value != b.value) return a.value > b.value ? a : b;
    return a.index < b.index ? a : b;
  }
};

// Run by one whole warp over bins[256] in shared memory, from digit 255 down:
// the first digit d where (sum of bins above d) + bins[d] >= need. Writes d and
// the sum above it to *digit / *above. When the bins fall short (float rounding)
// it takes the lowest digit with a positive bin, and -1 when every bin is empty.
template <typename T>
__device__ void WarpFindCrossing(const T* bins, T need, int* digit, T* above) {
  const int lane = threadIdx.x & 31;
  T local[8], sum = 0;
  for (int j = 0; j < 8; ++j) {
    local[j] = bins[255 - (lane * 8 + j)];
    sum += local[j];
  }
  T incl = sum;
  for (int o = 1; o < 32; o <<= 1) {
    const T n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  const unsigned crossing = __ballot_sync(0xffffffffu, sum > 0 && incl >= need);
  const unsigned positive = __ballot_sync(0xffffffffu, sum > 0);
  if (positive == 0) {
    if (lane == 0) *digit = -1;
    return;
  }
  const int owner = crossing ? __ffs(crossing) - 1 : 31 - __clz(positive);
  if (lane != owner) return;
  T acc = incl - sum, above_last = acc;
  int last = 0;
  for (int j = 0; j < 8; ++j) {
    if (local[j] > 0) {
      last = j;
      above_last = acc;
      if (crossing && acc + local[j] >= need) break;
    }
    acc += local[j];
  }
  *digit = 255 - (lane * 8 + last);
  *above = above_last;
}

// A radix select's state between digits, in shared memory.
template <typename Bin>
struct RadixState {
  uint32_t prefix, mask;  // the digits chosen so far, and their bits
  Bin remaining, above;   // the need left below the chosen digits; the bins above the crossing digit
  int digit;              // the crossing digit, -1 when every bin is empty
};

// One digit of a radix select, once bins[256] hold the candidates' counts or weights for it: (weighted, first
// digit) the need from their total; the digit where it is crossed; the prefix grown by it. False when there is
// nothing left to refine. Called by the whole block, after a barrier.
template <bool WEIGHTED, typename Bin>
__device__ bool RadixNextDigit(const Bin* bins, int shift, double need, RadixState<Bin>& s) {
  if constexpr (WEIGHTED) {
    if (shift == 24 && threadIdx.x < 32) {  // the total weight of the candidates, once
      Bin total = 0;
      for (int j = threadIdx.x; j < 256; j += 32) total += bins[j];
      for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
      if (threadIdx.x == 0) s.remaining = static_cast<Bin>(need * static_cast<double>(total));
      __syncwarp();
    }
  }
  if (threadIdx.x < 32) WarpFindCrossing<Bin>(bins, s.remaining, &s.digit, &s.above);
  __syncthreads();
  const int d = s.digit;
  if (d < 0) return false;  // keep the whole current range
  if (threadIdx.x == 0) {
    s.remaining -= s.above;
    s.prefix |= static_cast<uint32_t>(d) << shift;
    s.mask |= 255u << shift;
  }
  __syncthreads();
  return true;
}

// Radix select over keys = OrderedKey(log p) of the candidates (log p >= floor).
// WEIGHTED=false: the k-th largest value (need = k, bins count tokens).
// WEIGHTED=true: the value v where the weight strictly above v is < need * total
// <= the weight at or above v (need = top_p; bins sum sampling weights in fixed
// point, and total is the first pass's sum of them).
template <bool WEIGHTED, typename TB, typename TM>
__device__ float BlockRadixSelect(const RowPtrs<TB, TM>& row, int vocab, const Mixture& mix, float floor,
                                  float max_logp, float inv_t, double need) {
  using Bin = typename std::conditional<WEIGHTED, unsigned long long, int>::type;
  __shared__ Bin bins[256];
  __shared__ RadixState<Bin> st;
  if (threadIdx.x == 0) {
    st.prefix = st.mask = 0;
    if constexpr (!WEIGHTED) st.remaining = static_cast<Bin>(need);
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int j = threadIdx.x; j < 256; j += kThreads) bins[j] = 0;
    __syncthreads();
    const uint32_t pre = st.prefix, msk = st.mask;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const float lp = mix.LogProb(row.B(i), row.M(i));
      const uint32_t key = OrderedKey(lp);
      if (lp >= floor && (key & msk) == pre) {
        if constexpr (WEIGHTED) {
          const Bin w = static_cast<Bin>(TokenWeight(lp, max_logp, inv_t) * kWeightScale);
          if (w > 0) atomicAdd(&bins[(key >> shift) & 255u], w);
        } else {
          atomicAdd(&bins[(key >> shift) & 255u], 1);
        }
      }
    }
    __syncthreads();
    if (!RadixNextDigit<WEIGHTED>(bins, shift, need, st)) break;
  }
  return KeyToFloat(st.prefix);
}

// Inverse-CDF pick among tokens with log p >= threshold: the first token whose
// running weight, in index order, exceeds target.
template <typename TB, typename TM>
__device__ int BlockInverseCdf(const RowPtrs<TB, TM>& row, int vocab, const Mixture& mix, float threshold,
                               float max_logp, float inv_t, float target) {
  using Scan = cub::BlockScan<float, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ float running;
  __shared__ int pick;
  if (threadIdx.x == 0) {
    running = 0.0f;
    pick = INT_MAX;
  }
  __syncthreads();
  int last = -1;  // this thread's last token with positive weight
  for (int start = 0; start < vocab; start += kThreads) {
    const int i = start + threadIdx.x;
    float w = 0.0f;
    if (i < vocab) {
      const float lp = mix.LogProb(row.B(i), row.M(i));
      if (lp >= threshold) w = TokenWeight(lp, max_logp, inv_t);
    }
    float incl, chunk;
    Scan(tmp).InclusiveSum(w, incl, chunk);
    const float before = running;
    if (w > 0.0f) {
      last = i;
      if (before + incl > target) atomicMin(&pick, i);
    }
    __syncthreads();
    const bool found = pick != INT_MAX;
    if (threadIdx.x == 0) running = before + chunk;
    __syncthreads();
    if (found) break;
  }
  if (pick != INT_MAX) return pick;
  // Rounding left the total short of target (a uniform branch): the last kept token.
  return BlockAllReduce(last, MaxInt{});
}

template <typename TB, typename TM>
__global__ void __launch_bounds__(kThreads)
    SampleKernel(const TB* base, int64_t base_stride, const TM* mem, int64_t mem_stride, int vocab,
                 const float* table, RowParams scalars, PhiloxArgs philox, int64_t* tokens, float* logprobs) {
  const int64_t r = blockIdx.x;
  const RowPtrs<TB, TM> row{base + r * base_stride, mem + r * mem_stride};
  const RowParams p = LoadRowParams(table, r, scalars);
  const Mixture mix = BlockMixture(row, vocab, p);
  if (!mix.valid) {
    if (threadIdx.x == 0) {
      tokens[r] = -1;
      logprobs[r] = QuietNaN();
    }
    return;
  }

  ArgMax best{NegInf(), 0};
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float lp = mix.LogProb(row.B(i), row.M(i));
    if (lp > best.value) best = ArgMax{lp, i};
  }
  best = BlockAllReduce(best, MergeArgMax{});
  const float max_logp = best.value;
  int pick = best.index;
  if (!IsGreedy(p)) {
    const float inv_t = 1.0f / p.temperature;
    float threshold = NegInf();
    if (p.top_k > 0 && p.top_k < vocab) {
      threshold = BlockRadixSelect<false>(row, vocab, mix, threshold, max_logp, inv_t, p.top_k);
    }
    if (p.top_p < 1.0f) threshold = BlockRadixSelect<true>(row, vocab, mix, threshold, max_logp, inv_t, p.top_p);
    if (p.min_p > 0.0f) threshold = fmaxf(threshold, max_logp + p.temperature * logf(p.min_p));
    float w = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const float lp = mix.LogProb(row.B(i), row.M(i));
      if (lp >= threshold) w += TokenWeight(lp, max_logp, inv_t);
    }
    const float total = BlockAllReduce(w, AddFloat{});
    uint64_t seed, offset;
    UnpackPhilox(philox, &seed, &offset);
    const float target = RowUniform(seed, offset, r) * total;
    pick = BlockInverseCdf(row, vocab, mix, threshold, max_logp, inv_t, target);
    if (pick < 0) pick = best.index;  // no token with positive weight: cannot happen for a valid row
  }
  if (threadIdx.x == 0) {
    tokens[r] = pick;
    logprobs[r] = mix.LogProb(row.B(pick), row.M(pick));
  }
}

template <typename TB, typename TM>
void LaunchSample(const TB* base, int64_t base_stride, const TM* mem, int64_t mem_stride, int rows, int vocab,
                  const float* table, RowParams scalars, PhiloxArgs philox, int64_t* tokens, float* logprobs,
                  cudaStream_t stream) {
  MDF_LAUNCH(SampleKernel, rows, kThreads, stream, base, base_stride, mem, mem_stride, vocab, table, scalars, philox,
             tokens, logprobs);
}

}  // namespace memdec_fast
