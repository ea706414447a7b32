// Small kernels that check the shim itself: `shim_selftest MODE` runs one. The
// "ok" modes print results test_cudacpu_shim.py compares; the others break a
// CUDA rule and must abort with the shim's message.
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cstdio>
#include <cstring>
#include <string>

#include "kernels/launch.cuh"

namespace memdec_fast {
// Inside memdec_fast and inline (so their statics have mangled, comdat sections): shared.ld gathers and poisons
// their __shared__ variables, as it does the kernels' (templates).
namespace selftest {

constexpr int kThreads = 128;

// Shuffles, ballot, atomics, BlockReduce and BlockScan with known answers.
inline __global__ void Collectives(int* out) {
  const int t = threadIdx.x, lane = t & 31;
  __shared__ int hist[4];
  __shared__ typename cub::BlockScan<int, kThreads>::TempStorage scan_tmp;
  __shared__ typename cub::BlockReduce<int, kThreads>::TempStorage reduce_tmp;
  if (t < 4) hist[t] = 0;
  __syncthreads();
  atomicAdd(&hist[t % 4], 1);
  const int up = __shfl_up_sync(0xffffffffu, lane, 1), down = __shfl_down_sync(0xffffffffu, lane, 1);
  const int x = __shfl_xor_sync(0xffffffffu, lane, 5), bcast = __shfl_sync(0xffffffffu, lane, 7);
  const unsigned odd = __ballot_sync(0xffffffffu, lane & 1);
  int incl, total;
  cub::BlockScan<int, kThreads>(scan_tmp).InclusiveSum(1, incl, total);
  const int sum = cub::BlockReduce<int, kThreads>(reduce_tmp).Sum(t);
  __syncthreads();
  if (t == 33) {  // lane 1 of warp 1
    out[0] = up, out[1] = down, out[2] = x, out[3] = bcast, out[4] = static_cast<int>(odd), out[5] = incl;
    out[6] = total;
  }
  if (t == 0) out[7] = sum;
  if (t == 0) out[8] = hist[0] + hist[1] + hist[2] + hist[3];
}

// What a block reads from shared memory it never wrote: the poison.
inline __global__ void ReadUnwritten(unsigned* out) {
  __shared__ unsigned never_written[4];
  if (threadIdx.x == 0) out[blockIdx.x] = never_written[blockIdx.x % 4];
}

// CUB's contract: only thread 0 holds the reduction.
inline __global__ void ReduceOutsideThread0(int* out) {
  __shared__ typename cub::BlockReduce<int, kThreads>::TempStorage tmp;
  const int r = cub::BlockReduce<int, kThreads>(tmp).Sum(1);
  if (threadIdx.x == 5) out[0] = r;
}

inline __global__ void PartialMask(int* out) { out[0] = __shfl_sync(0x0000ffffu, 1, 0); }

inline __global__ void ExitedLane(int* out) {
  if (threadIdx.x == 3) return;
  out[0] = __shfl_sync(0xffffffffu, 1, 0);
}

inline __global__ void DivergentWarp(int* out) {
  if (threadIdx.x & 1) {
    out[0] = __shfl_sync(0xffffffffu, 1, 0);
  } else {
    out[1] = __shfl_sync(0xffffffffu, 2, 0);
  }
}

inline __global__ void BarrierAfterExit(int* out) {
  if (threadIdx.x >= 64) return;
  __syncthreads();
  out[0] = 1;
}

inline __global__ void SpinForever(int* flag) {
  if (threadIdx.x == 0) {
    while (std::atomic_ref<int>(*flag).load() == 0) {
    }
  }
}

}  // namespace selftest
}  // namespace memdec_fast

int main(int argc, char** argv) {
  using namespace memdec_fast::selftest;
  const std::string mode = argc > 1 ? argv[1] : "";
  int out_buf[16] = {};
  unsigned poison_buf[3] = {};
  int* out = out_buf;  // pointers, as a launch's arguments are: the launch copies them
  unsigned* poison = poison_buf;
  cudaStream_t s = nullptr;
  if (mode == "collectives") {
    MDF_LAUNCH(Collectives, 1, kThreads, s, out);
    for (int i = 0; i < 9; ++i) std::printf("%d ", out[i]);
  } else if (mode == "poison") {
    MDF_LAUNCH(ReadUnwritten, 3, kThreads, s, poison);
    std::printf("%08x %08x %08x", poison[0], poison[1], poison[2]);
  } else if (mode == "reduce_thread5") {
    MDF_LAUNCH(ReduceOutsideThread0, 1, kThreads, s, out);
    std::printf("%d", out[0]);
  } else if (mode == "partial_mask") {
    MDF_LAUNCH(PartialMask, 1, kThreads, s, out);
  } else if (mode == "exited_lane") {
    MDF_LAUNCH(ExitedLane, 1, kThreads, s, out);
  } else if (mode == "divergent_warp") {
    MDF_LAUNCH(DivergentWarp, 1, kThreads, s, out);
  } else if (mode == "barrier_after_exit") {
    MDF_LAUNCH(BarrierAfterExit, 1, kThreads, s, out);
  } else if (mode == "spin") {
    MDF_LAUNCH(SpinForever, 1, kThreads, s, out);
  } else {
    std::fprintf(stderr, "unknown mode '%s'\n", mode.c_str());
    return 2;
  }
  std::printf("\n");
  return 0;
}
