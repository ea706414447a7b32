// CPU kernel of sample: one vectorised pass builds log p into a buffer, value
// thresholds on it implement top-k / top-p / min-p, and one uniform draw per row
// picks by inverse CDF in two levels (block, then token). Rows split across
// threads by chunks when there are fewer rows than threads (cpu_row.h).
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <functional>
#include <mutex>
#include <utility>
#include <vector>

#include "common/philox.h"
#include "cpu/cpu_row.h"
#include "op_args.h"

namespace memdec_fast {
namespace {

// Sampling weight exp((log p - max log p) / temperature) of 8 tokens, and of one.
MDF_VI vec::F8 Weight8(vec::F8 lp, float max_logp, float inv_t) { return vec::Exp((lp - max_logp) * inv_t); }
MDF_VI float Weight1(float lp, float max_logp, float inv_t) { return Weight8(vec::Splat(lp), max_logp, inv_t)[0]; }

// The k-th largest of values[0, n) (1-based k <= n); reorders values.
float KthLargest(float* values, int64_t n, int64_t k) {
  std::nth_element(values, values + (k - 1), values + n, std::greater<float>());
  return values[k - 1];
}

// Top-p threshold over the kept values[0, n): the smallest value v such that the
// tokens strictly above v hold less than `target` weight; keeping every token
// >= v keeps exactly those. Sorts a growing prefix only, so it is O(n) unless
// the nucleus is large. Reorders values.
float TopPThreshold(float* values, int64_t n, double target, float max_logp, float inv_temperature) {
  for (int64_t m = std::min<int64_t>(n, 64);; m = std::min<int64_t>(n, 4 * m)) {
    std::nth_element(values, values + (m - 1), values + n, std::greater<float>());
    std::sort(values, values + m, std::greater<float>());
    double above = 0.0;  // weight of the tokens strictly above the current value
    int64_t i = 0;
    while (i < m) {
      int64_t j = i;  // [i, j) is a run of equal values
      double run = 0.0;
      while (j < m && values[j] == values[i]) run += Weight1(values[j++], max_logp, inv_temperature);
      if (j == m && m < n) break;  // the run may continue past the sorted prefix
      if (i > 0 && above >= target) return values[i - 1];
      above += run;
      i = j;
    }
    if (m == n) return i == n && above < target ? values[n - 1] : values[i - 1];
  }
}

// The first index of the largest of x[lo, hi), and its value.
MDF_VI std::pair<float, int64_t> ArgMax(const float* x, int64_t lo, int64_t hi) {
  vec::F8 best = vec::Splat(NegInf());
  vec::I8 idx{}, lane;
  for (int l = 0; l < vec::kLanes; ++l) lane[l] = l;
  int64_t i = lo;
  for (; i + vec::kLanes <= hi; i += vec::kLanes) {
    const vec::F8 v = vec::Load(x + i);
    const vec::I8 gt = v > best;
    best = vec::Select(gt, v, best);
    idx = gt ? lane + static_cast<int32_t>(i) : idx;
  }
  std::pair<float, int64_t> r{NegInf(), lo};
  for (int l = 0; l < vec::kLanes; ++l) {
    if (best[l] > r.first || (best[l] == r.first && best[l] != NegInf() && idx[l] < r.second)) r = {best[l], idx[l]};
  }
  for (; i < hi; ++i) {
    if (x[i] > r.first) r = {x[i], i};
  }
  return r;
}

// The k largest values of x[lo, hi) (fewer if the chunk is shorter), appended to
// `out` in heap order: a min-heap that most vectors skip with one comparison.
MDF_VI void TopKOfChunk(const float* x, int64_t lo, int64_t hi, size_t k, std::vector<float>& out) {
  out.clear();
  const auto push = [&](float v) {
    if (out.size() < k) {
      out.push_back(v);
      std::push_heap(out.begin(), out.end(), std::greater<float>());
    } else if (v > out.front()) {
      std::pop_heap(out.begin(), out.end(), std::greater<float>());
      out.back() = v;
      std::push_heap(out.begin(), out.end(), std::greater<float>());
    }
  };
  int64_t i = lo;
  for (; i + vec::kLanes <= hi; i += vec::kLanes) {
    const vec::F8 v = vec::Load(x + i);
    if (out.size() == k && !vec::Any(v > out.front())) continue;
    for (int l = 0; l < vec::kLanes; ++l) push(v[l]);
  }
  for (; i < hi; ++i) push(x[i]);
}

// Sum of the weights of the tokens of x[lo, hi) at or above `threshold`.
MDF_VI double KeptWeight(const float* x, int64_t lo, int64_t hi, float threshold, float max_logp, float inv_t) {
  vec::F8 acc{};
  int64_t i = lo;
  for (; i + vec::kLanes <= hi; i += vec::kLanes) {
    const vec::F8 v = vec::Load(x + i);
    const vec::I8 kept = v >= threshold;
    if (vec::Any(kept)) acc += vec::Select(kept, Weight8(v, max_logp, inv_t), vec::F8{});
  }
  double sum = vec::HSum(acc);
  for (; i < hi; ++i) {
    if (x[i] >= threshold) sum += Weight1(x[i], max_logp, inv_t);
  }
  return sum;
}

// The pick among listed tokens (token order) that hold every token at or above
// `threshold`: top-p and min-p raise the threshold, then the inverse CDF with
// `uniform`. `values` is scratch.
MDF_VI int64_t PickFromList(const std::vector<std::pair<int64_t, float>>& list, float threshold, const RowParams& p,
                            float max_logp, float inv_t, float uniform, std::vector<float>& values) {
  if (p.top_p < 1.0f) {
    values.clear();
    double total = 0.0;
    for (const auto& kv : list) {
      values.push_back(kv.second);
      total += Weight1(kv.second, max_logp, inv_t);
    }
    threshold = TopPThreshold(values.data(), values.size(), p.top_p * total, max_logp, inv_t);
  }
  if (p.min_p > 0.0f) threshold = std::max(threshold, max_logp + p.temperature * logf(p.min_p));
  double total = 0.0;
  for (const auto& kv : list) {
    if (kv.second >= threshold) total += Weight1(kv.second, max_logp, inv_t);
  }
  const double target = uniform * total;
  double cum = 0.0;
  int64_t pick = -1;
  for (const auto& kv : list) {
    if (kv.second < threshold) continue;
    pick = kv.first;  // the last kept token, should rounding leave cum <= target
    cum += Weight1(kv.second, max_logp, inv_t);
    if (cum > target) break;
  }
  return pick;
}

struct RowScratch {
  std::vector<float> logp, kept;
  std::vector<std::vector<float>> chunk_values;  // per chunk
  std::vector<std::vector<std::pair<int64_t, float>>> chunk_kept;  // per chunk: (token, log p)
  std::vector<std::pair<int64_t, float>> kept_tokens;
  std::vector<std::pair<float, int64_t>> chunk_best;
  std::vector<double> weights;  // per chunk, or per block
};

// One row: log p into a buffer (one pass), the filters as one threshold on it,
// then an inverse-CDF pick with one uniform per row. With top-k, the few kept
// tokens are listed and the rest runs on them; otherwise the pick has two levels:
// the block of kBlock tokens from the blocks' kept weights, then the token in it.
template <typename TB, typename TM>
void SampleRow(const TB* b, const TM* m, int64_t vocab, const RowParams& p, uint64_t seed, uint64_t offset,
               int64_t row, bool split, RowScratch& s, int64_t* token, float* logprob) {
  const Mixture mix = RowMixture(b, m, vocab, p, split);
  if (!mix.valid) {
    *token = -1;
    *logprob = QuietNaN();
    return;
  }
  const int64_t chunks = NumChunks(vocab);
  const auto chunk_end = [&](int64_t c) { return c * kChunk + kChunk < vocab ? c * kChunk + kChunk : vocab; };
  s.logp.resize(vocab);
  s.chunk_best.resize(chunks);
  s.chunk_values.resize(chunks);
  float* lp = s.logp.data();
  const bool top_k = p.top_k > 0 && p.top_k < vocab && !IsGreedy(p);
  ForChunks(vocab, split, [&](int64_t c) {
    LogProbs(mix, b, m, c * kChunk, chunk_end(c), lp);
    s.chunk_best[c] = ArgMax(lp, c * kChunk, chunk_end(c));
    if (top_k) TopKOfChunk(lp, c * kChunk, chunk_end(c), p.top_k, s.chunk_values[c]);  // while in cache
  });
  int64_t best = s.chunk_best[0].second;
  for (int64_t c = 1; c < chunks; ++c) {
    if (s.chunk_best[c].first > lp[best]) best = s.chunk_best[c].second;
  }
  const float max_logp = lp[best];
  if (IsGreedy(p)) {
    *token = best;
    *logprob = mix.LogProb(static_cast<float>(b[best]), static_cast<float>(m[best]));
    return;
  }
  const float inv_t = 1.0f / p.temperature;
  const auto gather = [&] {  // the chunks' values, in chunk order
    s.kept.clear();
    for (int64_t c = 0; c < chunks; ++c) s.kept.insert(s.kept.end(), s.chunk_values[c].begin(), s.chunk_values[c].end());
  };
  if (top_k) {
    gather();
    const float kth = KthLargest(s.kept.data(), s.kept.size(), p.top_k);
    // Few tokens are kept (k and its ties): collect them in token order, and finish on this thread.
    s.chunk_kept.resize(chunks);
    ForChunks(vocab, split, [&](int64_t c) {
      auto& out = s.chunk_kept[c];
      out.clear();
      int64_t i = c * kChunk;
      for (; i + vec::kLanes <= chunk_end(c); i += vec::kLanes) {
        const vec::I8 kept = vec::Load(lp + i) >= kth;
        if (!vec::Any(kept)) continue;
        for (int l = 0; l < vec::kLanes; ++l) {
          if (kept[l]) out.emplace_back(i + l, lp[i + l]);
        }
      }
      for (; i < chunk_end(c); ++i) {
        if (lp[i] >= kth) out.emplace_back(i, lp[i]);
      }
    });
    s.kept_tokens.clear();
    for (int64_t c = 0; c < chunks; ++c) s.kept_tokens.insert(s.kept_tokens.end(), s.chunk_kept[c].begin(), s.chunk_kept[c].end());
    vec::Run([&] { *token = PickFromList(s.kept_tokens, kth, p, max_logp, inv_t, RowUniform(seed, offset, row), s.kept); });
    *logprob = mix.LogProb(static_cast<float>(b[*token]), static_cast<float>(m[*token]));
    return;
  }
  float threshold = NegInf();
  if (p.top_p < 1.0f) {
    s.weights.resize(chunks);
    ForChunks(vocab, split, [&](int64_t c) {
      s.weights[c] = KeptWeight(lp, c * kChunk, chunk_end(c), threshold, max_logp, inv_t);
    });
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += s.weights[c];
    // Tokens lighter than `floor` hold at most half of the 1 - top_p tail together,
    // so the nucleus lies among the heavier ones: only those are sorted.
    const float floor = static_cast<float>(0.5 * (1.0 - p.top_p) * total / static_cast<double>(vocab));
    ForChunks(vocab, split, [&](int64_t c) {
      auto& out = s.chunk_values[c];
      out.clear();
      int64_t i = c * kChunk;
      for (; i + vec::kLanes <= chunk_end(c); i += vec::kLanes) {
        const vec::F8 v = vec::Load(lp + i);
        if (!vec::Any(v >= threshold)) continue;
        const vec::I8 heavy = (v >= threshold) & (Weight8(v, max_logp, inv_t) >= floor);
        for (int l = 0; l < vec::kLanes; ++l) {
          if (heavy[l]) out.push_back(v[l]);
        }
      }
      for (; i < chunk_end(c); ++i) {
        if (lp[i] >= threshold && Weight1(lp[i], max_logp, inv_t) >= floor) out.push_back(lp[i]);
      }
    });
    gather();
    threshold = TopPThreshold(s.kept.data(), s.kept.size(), p.top_p * total, max_logp, inv_t);
  }
  if (p.min_p > 0.0f) threshold = std::max(threshold, max_logp + p.temperature * logf(p.min_p));

  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  s.weights.resize(blocks);
  ForChunks(vocab, split, [&](int64_t c) {
    for (int64_t lo = c * kChunk; lo < chunk_end(c); lo += kBlock) {
      const int64_t hi = lo + kBlock < vocab ? lo + kBlock : vocab;
      s.weights[lo / kBlock] = KeptWeight(lp, lo, hi, threshold, max_logp, inv_t);
    }
  });
  vec::Run([&] {
    double total = 0.0;
    for (int64_t j = 0; j < blocks; ++j) total += s.weights[j];
    const double target = RowUniform(seed, offset, row) * total;
    // the block where the running sum passes target; the last non-empty one should rounding leave it short
    double cum = 0.0, cum_last = 0.0;
    int64_t block = -1, last = 0;
    for (int64_t j = 0; j < blocks && block < 0; ++j) {
      if (s.weights[j] > 0.0) {
        last = j;
        cum_last = cum;
      }
      if (cum + s.weights[j] > target) block = j;
      else cum += s.weights[j];
    }
    if (block < 0) {
      block = last;
      cum = cum_last;
    }
    int64_t pick = best;
    const int64_t hi = block * kBlock + kBlock < vocab ? block * kBlock + kBlock : vocab;
    for (int64_t i = block * kBlock; i < hi; ++i) {
      if (lp[i] < threshold) continue;
      pick = i;  // the block's last kept token, should rounding leave cum <= target
      cum += Weight1(lp[i], max_logp, inv_t);
      if (cum > target) break;
    }
    *token = pick;
  });
  *logprob = mix.LogProb(static_cast<float>(b[*token]), static_cast<float>(m[*token]));
}

// Draws this call's Philox seed from a CPU torch.Generator (mt19937).
uint64_t DrawSeed(const c10::optional<at::Generator>& generator) {
  TORCH_CHECK_VALUE(!generator.has_value() || !generator->defined() || generator->device().is_cpu(),
                    "generator: on ", generator->device(), ", but the logits are on cpu");
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& base_logits, const at::Tensor& mem_logits,
                                              const c10::optional<at::Tensor>& row_params, double lmbda,
                                              double knn_temp, double base_temp, double temperature, int64_t top_k,
                                              double top_p, double min_p,
                                              const c10::optional<at::Generator>& generator) {
  const OpArgs a = prepare_args(base_logits, mem_logits, row_params, lmbda, knn_temp, base_temp, temperature, top_k,
                                top_p, min_p);
  const int64_t rows = a.rows(), vocab = a.vocab();
  at::Tensor tokens = at::empty({rows}, a.base.options().dtype(at::kLong));    // [B]
  at::Tensor logprobs = at::empty({rows}, a.base.options().dtype(at::kFloat));  // [B]
  const uint64_t seed = DrawSeed(generator);
  DispatchTwoDtypes(a.base, a.mem, [&](auto base_tag, auto mem_tag) {
    using TB = decltype(base_tag);
    using TM = decltype(mem_tag);
    const TB* b0 = a.base.data_ptr<TB>();
    const TM* m0 = a.mem.data_ptr<TM>();
    int64_t* tok = tokens.data_ptr<int64_t>();
    float* lps = logprobs.data_ptr<float>();
    ForRows(rows, vocab, [&](int64_t row, bool split) {
      thread_local RowScratch scratch;  // kept between calls: no allocation per token
      SampleRow(b0 + row * a.base.stride(0), m0 + row * a.mem.stride(0), vocab, LoadRowParams(a.table, row, a.scalars),
                seed, 0, row, split, scratch, tok + row, lps + row);
    });
  });
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(memdec_fast, CPU, m) { m.impl("sample", &sample_cpu); }

}  // namespace memdec_fast
