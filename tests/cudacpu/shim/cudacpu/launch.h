// Launch: runs a kernel's blocks one after another on a pool of blockDim.x OS
// threads, and watches each block for hangs.
#pragma once

#include <memory>

namespace cudacpu {

inline std::chrono::seconds Timeout() {
  const char* s = std::getenv("CUDACPU_TIMEOUT");
  return std::chrono::seconds(s != nullptr ? std::atoi(s) : 120);
}

// The blocks of one launch and the thread pool's hand-over between them.
struct Grid {
  std::vector<std::unique_ptr<Block>> blocks;  // all kept to the end: a worker may still be leaving one
  std::mutex mu;
  std::condition_variable cv;
  int started = -1;  // the block the workers may run
};

struct Worker {
  Grid* grid;
  int thread;
  dim3 grid_dim, block_dim;
  void (*run)(void*);
  void* body;
};

inline void* WorkerMain(void* arg) {
  const Worker& w = *static_cast<Worker*>(arg);
  threadIdx = dim3(w.thread);
  blockDim = w.block_dim;
  gridDim = w.grid_dim;
  for (unsigned b = 0; b < w.grid_dim.x; ++b) {
    {
      std::unique_lock<std::mutex> lock(w.grid->mu);
      w.grid->cv.wait(lock, [&] { return w.grid->started >= static_cast<int>(b); });
    }
    blockIdx = dim3(b);
    current_block = w.grid->blocks[b].get();
    w.run(w.body);
    current_block->Exit();
    current_block = nullptr;
  }
  return nullptr;
}

// kernel<<<grid, block, 0, stream>>>(...) with the call wrapped in `body`.
template <typename Body>
void Launch(const char* name, dim3 grid, dim3 block, cudaStream_t /*stream*/, Body body) {
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1) Fail("%s: the shim runs 1-D launches only", name);
  if (grid.x == 0 || block.x == 0 || block.x > 1024) Fail("%s: invalid launch <<<%u, %u>>>", name, grid.x, block.x);
  const int threads = static_cast<int>(block.x);
  Grid g;
  for (unsigned b = 0; b < grid.x; ++b) g.blocks.push_back(std::make_unique<Block>(threads));
  auto run = [](void* p) { (*static_cast<Body*>(p))(); };
  std::vector<Worker> workers(threads);
  std::vector<pthread_t> ids(threads);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 4u << 20);
  for (int t = 0; t < threads; ++t) {
    workers[t] = Worker{&g, t, grid, block, run, &body};
    if (pthread_create(&ids[t], &attr, WorkerMain, &workers[t]) != 0) Fail("%s: cannot start thread %d", name, t);
  }
  pthread_attr_destroy(&attr);
  const auto timeout = Timeout();
  for (unsigned b = 0; b < grid.x; ++b) {
    PoisonShared(b);  // every worker has left block b - 1
    {
      std::lock_guard<std::mutex> lock(g.mu);
      g.started = static_cast<int>(b);
    }
    g.cv.notify_all();
    Block& blk = *g.blocks[b];
    std::unique_lock<std::mutex> lock(blk.mutex());
    while (!blk.Finished()) {
      if (!blk.WaitProgress(lock, timeout, [&] { return blk.Finished(); })) {
        Fail("%s: block %u made no progress for %lld s (CUDACPU_TIMEOUT)\n%s", name, b,
             static_cast<long long>(timeout.count()), blk.Describe().c_str());
      }
    }
  }
  for (int t = 0; t < threads; ++t) pthread_join(ids[t], nullptr);
}

}  // namespace cudacpu
