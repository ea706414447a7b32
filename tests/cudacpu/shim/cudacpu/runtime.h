// CUDA's execution model on the CPU, for running kernel source in tests.
//
// Each CUDA thread of a block is an OS thread; blocks run one after another, so
// nothing here can see a race *between* blocks. All synchronisation of a block
// goes through one mutex (and condition variables), so ThreadSanitizer sees
// every barrier as the happens-before edge it is on a GPU.
//
// What CUDA leaves undefined aborts with file:line instead of "working":
//   - __syncthreads reached from two different places, or after threads exited;
//   - a warp intrinsic with a partial mask, with an exited lane, or with lanes
//     waiting at different intrinsics;
//   - deadlock (every live thread waits and nothing can complete), and a block
//     that makes no progress for CUDACPU_TIMEOUT seconds (default 120).
// __shared__ variables are poisoned with a different byte at every block start,
// so reading shared memory the block never wrote gives garbage, as on a GPU.
#pragma once

#include <pthread.h>

#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#define MDF_CUDACPU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Function-local statics are shared by the block's threads, like __shared__.
// shared.ld gathers the ones of namespace memdec_fast for poisoning.
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0 };
constexpr int warpSize = 32;

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cudacpu {

// Where a barrier or intrinsic was called from.
struct Site {
  const char* file;
  int line;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  bool operator!=(const Site& o) const { return !(*this == o); }
};
#define CUDACPU_SITE (::cudacpu::Site{__FILE__, __LINE__})

[[noreturn]] inline void Fail(const char* fmt, ...) {
  std::fprintf(stderr, "cudacpu: ");
  va_list args;
  va_start(args, fmt);
  std::vfprintf(stderr, fmt, args);
  va_end(args);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

enum class Wait { kRunning, kBarrier, kWarp, kExited };
enum class WarpOp { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kSync };
constexpr unsigned kFullMask = 0xffffffffu;

// One warp's rendezvous: lanes leave their operand here; the last lane to
// arrive computes every lane's result.
struct WarpSlot {
  int arrived = 0, exited = 0;
  uint64_t generation = 0;
  Site site{"", 0};
  WarpOp op = WarpOp::kSync;
  uint64_t in[32] = {}, out[32] = {};
  int arg[32] = {};
  std::condition_variable cv;
};

class Block {
 public:
  explicit Block(int threads)
      : threads_(threads), where_(threads, Site{"", 0}), wait_(threads, Wait::kRunning), warps_((threads + 31) / 32) {
    if (threads % 32 != 0) Fail("blockDim.x = %d: the shim supports whole warps only", threads);
  }

  void SyncThreads(Site site) {
    std::unique_lock<std::mutex> lock(mu_);
    const int t = threadIdx.x;
    where_[t] = site;
    if (exited_ > 0) {
      Fail("%s:%d: __syncthreads reached by thread %d after %d threads of block %u exited", site.file, site.line, t,
           exited_, blockIdx.x);
    }
    if (barrier_arrived_ > 0 && barrier_site_ != site) {
      Fail("__syncthreads reached from two places in block %u: %s:%d (thread %d) and %s:%d (thread %d)", blockIdx.x,
           barrier_site_.file, barrier_site_.line, barrier_first_, site.file, site.line, t);
    }
    if (barrier_arrived_++ == 0) {
      barrier_site_ = site;
      barrier_first_ = t;
    }
    if (barrier_arrived_ == threads_) {
      barrier_arrived_ = 0;
      ++barrier_generation_;
      running_ += threads_ - 1;
      progress_ = true;
      barrier_cv_.notify_all();
      return;
    }
    const uint64_t gen = barrier_generation_;
    Sleep(t, Wait::kBarrier);
    barrier_cv_.wait(lock, [&] { return barrier_generation_ != gen; });
    wait_[t] = Wait::kRunning;
  }

  // The value each lane gets from a warp-wide operation. `value` holds the
  // lane's operand bits; `arg` the source lane, delta or lane mask.
  uint64_t WarpExchange(Site site, WarpOp op, unsigned mask, uint64_t value, int arg) {
    std::unique_lock<std::mutex> lock(mu_);
    const int t = threadIdx.x, lane = t & 31;
    WarpSlot& w = warps_[t / 32];
    where_[t] = site;
    if (mask != kFullMask) {
      Fail("%s:%d: warp intrinsic with mask 0x%08x (thread %d): the kernels must use whole warps", site.file,
           site.line, mask, t);
    }
    if (w.exited > 0) {
      Fail("%s:%d: warp intrinsic in warp %d of block %u after %d of its lanes exited", site.file, site.line, t / 32,
           blockIdx.x, w.exited);
    }
    if (w.arrived > 0 && (w.site != site || w.op != op)) {
      Fail("lanes of warp %d in block %u wait at different warp intrinsics: %s:%d and %s:%d (thread %d)", t / 32,
           blockIdx.x, w.site.file, w.site.line, site.file, site.line, t);
    }
    if (w.arrived++ == 0) {
      w.site = site;
      w.op = op;
    }
    w.in[lane] = value;
    w.arg[lane] = arg;
    if (w.arrived == 32) {
      Complete(w);
      w.arrived = 0;
      ++w.generation;
      running_ += 31;
      progress_ = true;
      w.cv.notify_all();
      return w.out[lane];
    }
    const uint64_t gen = w.generation;
    Sleep(t, Wait::kWarp);
    w.cv.wait(lock, [&] { return w.generation != gen; });
    wait_[t] = Wait::kRunning;
    return w.out[lane];  // safe: the next completion needs this lane to arrive again
  }

  // Called by each thread when it leaves the kernel.
  void Exit() {
    std::unique_lock<std::mutex> lock(mu_);
    const int t = threadIdx.x;
    WarpSlot& w = warps_[t / 32];
    ++exited_;
    ++w.exited;
    --running_;
    wait_[t] = Wait::kExited;
    if (barrier_arrived_ > 0) {
      Fail("thread %d of block %u exited while %d threads wait at __syncthreads %s:%d", t, blockIdx.x,
           barrier_arrived_, barrier_site_.file, barrier_site_.line);
    }
    if (w.arrived > 0) {
      Fail("lane %d of warp %d in block %u exited while %d lanes wait at %s:%d", t & 31, t / 32, blockIdx.x,
           w.arrived, w.site.file, w.site.line);
    }
    progress_ = true;
    if (exited_ == threads_) {
      done_cv_.notify_all();
      return;
    }
    if (running_ == 0) Deadlock();
  }

  // Waits up to `timeout` for some progress; false when there was none.
  template <typename Pred>
  bool WaitProgress(std::unique_lock<std::mutex>& lock, std::chrono::seconds timeout, Pred done) {
    progress_ = false;
    return done_cv_.wait_for(lock, timeout, [&] { return done() || progress_; });
  }
  std::mutex& mutex() { return mu_; }
  bool Finished() const { return exited_ == threads_; }  // the caller holds the mutex

  // The state of every thread, for a hang report; the caller holds the mutex.
  std::string Describe() const {
    std::string s;
    int i = 0;
    while (i < threads_) {  // runs of threads in the same state at the same site
      int j = i + 1;
      while (j < threads_ && wait_[j] == wait_[i] && where_[j] == where_[i]) ++j;
      static const char* kNames[] = {"running, last at", "waiting at __syncthreads", "waiting at warp intrinsic",
                                     "exited, last at"};
      char line[512];
      std::snprintf(line, sizeof line, "  threads %d-%d: %s %s:%d\n", i, j - 1, kNames[static_cast<int>(wait_[i])],
                    where_[i].line ? where_[i].file : "(no barrier yet)", where_[i].line);
      s += line;
      i = j;
    }
    return s;
  }

 private:
  void Sleep(int t, Wait why) {
    wait_[t] = why;
    if (--running_ == 0) Deadlock();
  }

  [[noreturn]] void Deadlock() {
    Fail("deadlock in block %u: every live thread waits and nothing can complete\n%s", blockIdx.x, Describe().c_str());
  }

  static void Complete(WarpSlot& w) {
    for (int lane = 0; lane < 32; ++lane) {
      const int a = w.arg[lane];
      switch (w.op) {
        case WarpOp::kShfl: w.out[lane] = w.in[a & 31]; break;
        case WarpOp::kShflUp: w.out[lane] = lane >= a ? w.in[lane - a] : w.in[lane]; break;
        case WarpOp::kShflDown: w.out[lane] = lane + a < 32 ? w.in[lane + a] : w.in[lane]; break;
        case WarpOp::kShflXor: w.out[lane] = w.in[(lane ^ a) & 31]; break;
        case WarpOp::kBallot: {
          uint64_t bits = 0;
          for (int l = 0; l < 32; ++l) bits |= (w.in[l] != 0 ? 1ull : 0ull) << l;
          w.out[lane] = bits;
          break;
        }
        case WarpOp::kSync: w.out[lane] = 0; break;
      }
    }
  }

  const int threads_;
  std::mutex mu_;
  std::condition_variable barrier_cv_, done_cv_;
  std::vector<Site> where_;
  std::vector<Wait> wait_;
  std::vector<WarpSlot> warps_;
  int running_ = threads_, exited_ = 0;
  int barrier_arrived_ = 0, barrier_first_ = -1;
  uint64_t barrier_generation_ = 0;
  Site barrier_site_{"", 0};
  bool progress_ = false;
};

// The block of the calling thread.
inline thread_local Block* current_block = nullptr;

inline Block& ThisBlock() {
  if (current_block == nullptr) Fail("a device function was called outside a kernel launch");
  return *current_block;
}

}  // namespace cudacpu

#include "cudacpu/shared_poison.h"
#include "cudacpu/launch.h"
