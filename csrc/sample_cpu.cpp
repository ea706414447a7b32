// CPU kernel of sample: one pass builds log p, then value thresholds implement
// top-k / top-p / min-p, and one uniform draw per row picks by inverse CDF.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <mutex>
#include <vector>

#include "common/philox.h"
#include "cpu_row.h"
#include "op_args.h"

namespace memdec_fast {
namespace {

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
      while (j < m && values[j] == values[i]) run += TokenWeight(values[j++], max_logp, inv_temperature);
      if (j == m && m < n) break;  // the run may continue past the sorted prefix
      if (i > 0 && above >= target) return values[i - 1];
      above += run;
      i = j;
    }
    if (m == n) return i == n && above < target ? values[n - 1] : values[i - 1];
  }
}

struct RowScratch {
  std::vector<float> logp, kept;
};

template <typename TB, typename TM>
void SampleRow(const TB* b, const TM* m, int64_t vocab, const RowParams& p, uint64_t seed, uint64_t offset,
               int64_t row, RowScratch& s, int64_t* token, float* logprob) {
  const Mixture mix = RowMixture(b, m, vocab, p);
  if (!mix.valid) {
    *token = -1;
    *logprob = QuietNaN();
    return;
  }
  s.logp.resize(vocab);
  float* lp = s.logp.data();
  int64_t best = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    lp[i] = mix.LogProb(static_cast<float>(b[i]), static_cast<float>(m[i]));
    if (lp[i] > lp[best]) best = i;
  }
  const float max_logp = lp[best];
  if (IsGreedy(p)) {
    *token = best;
    *logprob = max_logp;
    return;
  }
  const float inv_t = 1.0f / p.temperature;
  float threshold = NegInf();
  if (p.top_k > 0 && p.top_k < vocab) {
    s.kept.assign(lp, lp + vocab);
    threshold = KthLargest(s.kept.data(), vocab, p.top_k);
  }
  if (p.top_p < 1.0f) {
    s.kept.clear();
    double total = 0.0;
    for (int64_t i = 0; i < vocab; ++i) {
      if (lp[i] >= threshold) {
        s.kept.push_back(lp[i]);
        total += TokenWeight(lp[i], max_logp, inv_t);
      }
    }
    threshold = TopPThreshold(s.kept.data(), s.kept.size(), p.top_p * total, max_logp, inv_t);
  }
  if (p.min_p > 0.0f) threshold = std::max(threshold, max_logp + p.temperature * logf(p.min_p));

  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    if (lp[i] >= threshold) total += TokenWeight(lp[i], max_logp, inv_t);
  }
  const double target = RowUniform(seed, offset, row) * total;
  double cum = 0.0;
  int64_t pick = best;
  for (int64_t i = 0; i < vocab; ++i) {
    if (lp[i] < threshold) continue;
    pick = i;  // the last kept token, should rounding leave cum <= target
    cum += TokenWeight(lp[i], max_logp, inv_t);
    if (cum > target) break;
  }
  *token = pick;
  *logprob = lp[pick];
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
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      RowScratch scratch;
      for (int64_t row = begin; row < end; ++row) {
        SampleRow(b0 + row * a.base.stride(0), m0 + row * a.mem.stride(0), vocab, LoadRowParams(a.table, row, a.scalars),
                  seed, 0, row, scratch, tok + row, lps + row);
      }
    });
  });
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(memdec_fast, CPU, m) { m.impl("sample", &sample_cpu); }

}  // namespace memdec_fast
