// CUDA kernels of joint_logprobs and target_logprobs: one block per row, two
// passes over the row (statistics, then output).
#pragma once

#include <cuda_runtime.h>

#include "kernels/block_row.cuh"
#include "kernels/launch.cuh"

namespace memdec_fast {

template <typename TB, typename TM>
__global__ void __launch_bounds__(kThreads)
    JointLogprobsKernel(const TB* base, int64_t base_stride, const TM* mem, int64_t mem_stride, int vocab,
                        const float* table, RowParams scalars, float* out) {
  const int64_t r = blockIdx.x;
  const RowPtrs<TB, TM> row{base + r * base_stride, mem + r * mem_stride};
  const Mixture mix = BlockMixture(row, vocab, LoadRowParams(table, r, scalars));
  float* o = out + r * vocab;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    o[i] = mix.valid ? mix.LogProb(row.B(i), row.M(i)) : QuietNaN();
  }
}

template <typename TB, typename TM>
__global__ void __launch_bounds__(kThreads)
    TargetLogprobsKernel(const TB* base, int64_t base_stride, const TM* mem, int64_t mem_stride, int vocab,
                         const int64_t* targets, const float* table, RowParams scalars, float* joint, float* lp_base,
                         float* lp_mem) {
  const int64_t r = blockIdx.x;
  const RowPtrs<TB, TM> row{base + r * base_stride, mem + r * mem_stride};
  const Mixture mix = BlockMixture(row, vocab, LoadRowParams(table, r, scalars));
  if (threadIdx.x != 0) return;
  const int64_t t = targets[r];
  if (t < 0 || t >= vocab) {
    joint[r] = lp_base[r] = lp_mem[r] = QuietNaN();
    return;
  }
  const float bt = row.B(t), mt = row.M(t);
  joint[r] = mix.valid ? mix.LogProb(bt, mt) : QuietNaN();
  lp_base[r] = mix.BaseLogProb(bt);
  lp_mem[r] = mix.MemLogProb(mt);
}

template <typename TB, typename TM>
void LaunchJointLogprobs(const TB* base, int64_t base_stride, const TM* mem, int64_t mem_stride, int rows, int vocab,
                         const float* table, RowParams scalars, float* out, cudaStream_t stream) {
  MDF_LAUNCH(JointLogprobsKernel, rows, kThreads, stream, base, base_stride, mem, mem_stride, vocab, table, scalars, out);
}

template <typename TB, typename TM>
void LaunchTargetLogprobs(const TB* base, int64_t base_stride, const TM* mem, int64_t mem_stride, int rows,
                          int vocab, const int64_t* targets, const float* table, RowParams scalars, float* joint,
                          float* lp_base, float* lp_mem, cudaStream_t stream) {
  MDF_LAUNCH(TargetLogprobsKernel, rows, kThreads, stream, base, base_stride, mem, mem_stride, vocab, targets, table,
             scalars, joint, lp_base, lp_mem);
}

}  // namespace memdec_fast
