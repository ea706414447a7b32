// cub::BlockReduce and cub::BlockScan with CUB's contracts, and no more:
//   - BlockReduce's result is valid in thread 0 only (the others get their own
//     input back, so a kernel that reads it elsewhere computes garbage);
//   - the temporary storage may not be reused without a __syncthreads between
//     calls (reuse races, and ThreadSanitizer reports it).
#pragma once

#include "cudacpu/intrinsics.h"

namespace cub {

template <typename T, int kBlockDimX, auto... kIgnored>
class BlockReduce {
 public:
  struct TempStorage {
    alignas(T) unsigned char bytes[sizeof(T) * kBlockDimX];
  };
  explicit BlockReduce(TempStorage& storage) : slots_(reinterpret_cast<T*>(storage.bytes)) { CheckBlock(); }

  template <typename Op>
  T Reduce(T x, Op op) {
    std::memcpy(&slots_[threadIdx.x], &x, sizeof(T));
    ::cudacpu::ThisBlock().SyncThreads(CUDACPU_SITE);
    if (threadIdx.x != 0) return x;
    T acc = slots_[0];
    for (int i = 1; i < kBlockDimX; ++i) acc = op(acc, slots_[i]);
    return acc;
  }
  T Sum(T x) {
    return Reduce(x, [](const T& a, const T& b) { return a + b; });
  }

 private:
  static void CheckBlock() {
    if (blockDim.x != kBlockDimX) ::cudacpu::Fail("cub::BlockReduce<%d> in a block of %u threads", kBlockDimX, blockDim.x);
  }
  T* slots_;
};

template <typename T, int kBlockDimX, auto... kIgnored>
class BlockScan {
 public:
  struct TempStorage {
    alignas(T) unsigned char bytes[sizeof(T) * kBlockDimX];
  };
  explicit BlockScan(TempStorage& storage) : slots_(reinterpret_cast<T*>(storage.bytes)) {
    if (blockDim.x != kBlockDimX) ::cudacpu::Fail("cub::BlockScan<%d> in a block of %u threads", kBlockDimX, blockDim.x);
  }

  // The block aggregate is valid in every thread, as in CUB.
  void InclusiveSum(T x, T& inclusive, T& aggregate) {
    Scan(x);
    inclusive = slots_[threadIdx.x];
    aggregate = slots_[kBlockDimX - 1];
  }
  void InclusiveSum(T x, T& inclusive) {
    T aggregate;
    InclusiveSum(x, inclusive, aggregate);
  }
  void ExclusiveSum(T x, T& exclusive, T& aggregate) {
    Scan(x);
    exclusive = slots_[threadIdx.x] - x;
    aggregate = slots_[kBlockDimX - 1];
  }
  void ExclusiveSum(T x, T& exclusive) {
    T aggregate;
    ExclusiveSum(x, exclusive, aggregate);
  }

 private:
  // In place, so that a caller reusing the storage without a barrier races.
  void Scan(const T& x) {
    slots_[threadIdx.x] = x;
    ::cudacpu::ThisBlock().SyncThreads(CUDACPU_SITE);
    if (threadIdx.x == 0) {
      for (int i = 1; i < kBlockDimX; ++i) slots_[i] = slots_[i - 1] + slots_[i];
    }
    ::cudacpu::ThisBlock().SyncThreads(CUDACPU_SITE);
  }
  T* slots_;
};

}  // namespace cub
