// Row passes of the CPU kernels, vectorised (cpu_vec.h). A row is cut into fixed
// chunks of kChunk tokens; a pass computes one partial result per chunk, and the
// partials are merged in chunk order. When there are fewer rows than threads,
// the chunks of a row run in parallel, otherwise each thread takes whole rows. The partition does not depend on the thread count, so a row
// gives bit-identical results either way.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "common/mixture.h"
#include "cpu/cpu_vec.h"

namespace memdec_fast {

constexpr int64_t kBlock = 256;              // tokens per block of the online max and of the pick's sums
constexpr int64_t kChunk = 16 * kBlock;      // tokens per chunk: the unit of work of a thread
constexpr int64_t kMinSplitVocab = 2 * kChunk;

inline int64_t NumChunks(int64_t vocab) { return (vocab + kChunk - 1) / kChunk; }

// Whether rows are split across threads (rows run one after another), or each
// thread takes whole rows.
inline bool SplitRows(int64_t rows, int64_t vocab) {
  return rows < at::get_num_threads() && vocab >= kMinSplitVocab && !at::in_parallel_region();
}

// Runs f(chunk) for every chunk of a row of `vocab` tokens; with `split`, on all
// threads (at::parallel_for). Threads take chunks from a shared counter rather
// than fixed ranges, so a thread that starts late (a busy machine) takes fewer.
template <class F>
void ForChunks(int64_t vocab, bool split, const F& f) {
  const int64_t n = NumChunks(vocab);
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t, int64_t) {
    vec::Run([&] {
      for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(c);
    });
  };
  if (split && n > 1) {
    at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, work);
  } else {
    work(0, 1);
  }
}

// Runs f(row, split) for every row: rows in parallel, or one by one with split chunks.
template <class F>
void ForRows(int64_t rows, int64_t vocab, const F& f) {
  if (SplitRows(rows, vocab)) {
    for (int64_t row = 0; row < rows; ++row) f(row, true);
  } else {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) f(row, false);
    });
  }
}

// (x - max) / temp of 8 logits: ScaledDiff (common/mixture.h) lane by lane.
MDF_VI vec::F8 ScaledDiff8(vec::F8 x, float max, const InvTemp& t) {
  const vec::F8 d = 0.5f * x - 0.5f * max;
  if (!t.divide) return d * t.inv2;
  return vec::Select(d == 0.0f, vec::F8{}, d / t.temp * 2.0f);
}

// MaxSum of x[0, n) (a chunk): per block of kBlock tokens, the block max, a
// rescale of the running sum when it grows, then the block's exponentials.
// Partial block sums are float, the running sum double. NaN anywhere gives a NaN sum.
template <typename T>
MDF_VI MaxSum ChunkMaxSum(const T* x, int64_t n, const InvTemp& t) {
  float run_max = NegInf();
  double run_sum = 0.0;
  vec::I8 nan{};
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    vec::F8 vmax = vec::Splat(NegInf());
    for (int64_t i = b; i < e; i += vec::kLanes) {
      const vec::F8 v = i + vec::kLanes <= e ? vec::Load(x + i) : vec::Load(x + i, e - i, NegInf());
      nan |= v != v;
      vmax = vec::Max(v, vmax);
    }
    const float bmax = vec::HMax(vmax);
    if (bmax == NegInf()) continue;
    if (bmax > run_max) {
      run_sum *= expf(ScaledDiff(run_max, bmax, t));
      run_max = bmax;
    }
    vec::F8 s{};
    for (int64_t i = b; i < e; i += vec::kLanes) {
      const vec::F8 v = i + vec::kLanes <= e ? vec::Load(x + i) : vec::Load(x + i, e - i, NegInf());
      s += vec::Exp(ScaledDiff8(v, run_max, t));
    }
    run_sum += vec::HSum(s);
  }
  if (vec::Any(nan)) run_sum = QuietNaN();
  return MaxSum{run_max, static_cast<float>(run_sum)};
}

// Both models' MaxSum over a row and the mixture they give.
template <typename TB, typename TM>
Mixture RowMixture(const TB* base, const TM* mem, int64_t vocab, const RowParams& p, bool split) {
  const InvTemp tb = MakeInvTemp(p.base_temp), tm = MakeInvTemp(p.knn_temp);
  const int64_t chunks = NumChunks(vocab);
  MaxSum parts[2 * 64];  // base, mem per chunk; rows longer than 64 chunks merge on the fly below
  MaxSum bs = MaxSumIdentity(), ms = MaxSumIdentity();
  for (int64_t c0 = 0; c0 < chunks; c0 += 64) {
    const int64_t c1 = c0 + 64 < chunks ? c0 + 64 : chunks;
    const int64_t lo = c0 * kChunk, hi = c1 * kChunk < vocab ? c1 * kChunk : vocab;
    ForChunks(hi - lo, split, [&](int64_t c) {
      const int64_t b = lo + c * kChunk, n = (b + kChunk < hi ? b + kChunk : hi) - b;
      parts[2 * c] = ChunkMaxSum(base + b, n, tb);
      parts[2 * c + 1] = ChunkMaxSum(mem + b, n, tm);
    });
    for (int64_t c = 0; c < c1 - c0; ++c) {
      bs = MaxSumMerge(bs, parts[2 * c], tb);
      ms = MaxSumMerge(ms, parts[2 * c + 1], tm);
    }
  }
  // MaxSumMerge keeps a NaN sum; +inf or an all -inf row leaves a non-finite max.
  return MakeMixture(p, bs, ms);
}

// log p of 8 tokens (Mixture::LogProb with the vector exp and log1p).
template <typename TB, typename TM>
MDF_VI vec::F8 LogProb8(const Mixture& mix, vec::F8 b, vec::F8 m) {
  const vec::F8 ninf = vec::Splat(NegInf());
  const vec::F8 xb = mix.use_base ? ScaledDiff8(b, mix.base_max, mix.base_t) + mix.base_shift : ninf;
  const vec::F8 xm = mix.use_mem ? ScaledDiff8(m, mix.mem_max, mix.mem_t) + mix.mem_shift : ninf;
  return vec::LogAddExp(xb, xm);
}

// Writes log p of tokens [b, e) of a valid row to out[b, e).
template <typename TB, typename TM>
MDF_VI void LogProbs(const Mixture& mix, const TB* base, const TM* mem, int64_t b, int64_t e, float* out) {
  int64_t i = b;
  for (; i + vec::kLanes <= e; i += vec::kLanes) {
    const vec::F8 lp = LogProb8<TB, TM>(mix, vec::Load(base + i), vec::Load(mem + i));
    std::memcpy(out + i, &lp, sizeof(lp));
  }
  if (i < e) {
    const int n = static_cast<int>(e - i);
    const vec::F8 lp = LogProb8<TB, TM>(mix, vec::Load(base + i, n, 0.0f), vec::Load(mem + i, n, 0.0f));
    for (int l = 0; l < n; ++l) out[i + l] = lp[l];
  }
}

}  // namespace memdec_fast
