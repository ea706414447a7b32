// Block-wide building blocks for kernels that give one thread block to one row
// of logits: element loads, reductions and the row's mixture constants.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/block/block_reduce.cuh>

#include "common/mixture.h"

namespace memdec_fast {

constexpr int kThreads = 512;  // threads per row block

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

// One row of both models' logits.
template <typename TB, typename TM>
struct RowPtrs {
  const TB* base;
  const TM* mem;
  __device__ __forceinline__ float B(int i) const { return ToFloat(base[i]); }
  __device__ __forceinline__ float M(int i) const { return ToFloat(mem[i]); }
};

struct PairStats {
  MaxSum base, mem;
};

struct MergePairStats {
  InvTemp base_t, mem_t;
  __device__ __forceinline__ PairStats operator()(const PairStats& a, const PairStats& b) const {
    return PairStats{MaxSumMerge(a.base, b.base, base_t), MaxSumMerge(a.mem, b.mem, mem_t)};
  }
};

// op-reduction of x over the block, returned to every thread. The trailing
// barrier makes repeated calls (which share the static storage) safe.
template <typename T, typename Op>
__device__ T BlockAllReduce(const T& x, Op op) {
  using Reduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ T total;
  const T r = Reduce(tmp).Reduce(x, op);
  if (threadIdx.x == 0) total = r;
  __syncthreads();
  const T out = total;
  __syncthreads();
  return out;
}

struct AddFloat {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// The row's mixture constants: one pass over both rows (online softmax), every
// thread gets the same result.
template <typename TB, typename TM>
__device__ Mixture BlockMixture(const RowPtrs<TB, TM>& row, int vocab, const RowParams& p) {
  const InvTemp tb = MakeInvTemp(p.base_temp), tm = MakeInvTemp(p.knn_temp);
  PairStats s{MaxSumIdentity(), MaxSumIdentity()};
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    s.base = MaxSumAdd(s.base, row.B(i), tb);
    s.mem = MaxSumAdd(s.mem, row.M(i), tm);
  }
  const PairStats total = BlockAllReduce(s, MergePairStats{tb, tm});
  return MakeMixture(p, total.base, total.mem);
}

}  // namespace memdec_fast
