// CPU kernels of joint_logprobs and target_logprobs: vectorised row passes,
// parallel over rows, or over chunks of a row when there are fewer rows than threads.
#include <ATen/Dispatch.h>

#include <algorithm>

#include "cpu/cpu_row.h"
#include "op_args.h"

namespace memdec_fast {
namespace {

template <typename TB, typename TM>
void JointLogprobsCpu(const OpArgs& a, at::Tensor& out) {
  const int64_t vocab = a.vocab(), sb = a.base.stride(0), sm = a.mem.stride(0);
  const TB* b0 = a.base.data_ptr<TB>();
  const TM* m0 = a.mem.data_ptr<TM>();
  float* o0 = out.data_ptr<float>();
  ForRows(a.rows(), vocab, [&](int64_t row, bool split) {
    const TB* b = b0 + row * sb;
    const TM* m = m0 + row * sm;
    float* o = o0 + row * vocab;
    const Mixture mix = RowMixture(b, m, vocab, LoadRowParams(a.table, row, a.scalars), split);
    if (!mix.valid) {
      std::fill(o, o + vocab, QuietNaN());
      return;
    }
    ForChunks(vocab, split, [&](int64_t c) {
      const int64_t lo = c * kChunk, hi = lo + kChunk < vocab ? lo + kChunk : vocab;
      LogProbs(mix, b, m, lo, hi, o);
    });
  });
}

template <typename TB, typename TM>
void TargetLogprobsCpu(const OpArgs& a, const int64_t* targets, float* joint, float* lp_base, float* lp_mem) {
  const int64_t vocab = a.vocab(), sb = a.base.stride(0), sm = a.mem.stride(0);
  const TB* b0 = a.base.data_ptr<TB>();
  const TM* m0 = a.mem.data_ptr<TM>();
  ForRows(a.rows(), vocab, [&](int64_t row, bool split) {
    const int64_t t = targets[row];
    if (t < 0 || t >= vocab) {
      joint[row] = lp_base[row] = lp_mem[row] = QuietNaN();
      return;
    }
    const TB* b = b0 + row * sb;
    const TM* m = m0 + row * sm;
    const Mixture mix = RowMixture(b, m, vocab, LoadRowParams(a.table, row, a.scalars), split);
    const float bt = static_cast<float>(b[t]), mt = static_cast<float>(m[t]);
    joint[row] = mix.valid ? mix.LogProb(bt, mt) : QuietNaN();
    lp_base[row] = mix.BaseLogProb(bt);
    lp_mem[row] = mix.MemLogProb(mt);
  });
}

at::Tensor joint_logprobs_cpu(const at::Tensor& base_logits, const at::Tensor& mem_logits,
                              const c10::optional<at::Tensor>& row_params, double lmbda, double knn_temp,
                              double base_temp) {
  const OpArgs a = prepare_args(base_logits, mem_logits, row_params, lmbda, knn_temp, base_temp);
  at::Tensor out = at::empty(a.base.sizes(), a.base.options().dtype(at::kFloat));  // [B, V]
  DispatchTwoDtypes(a.base, a.mem, [&](auto base_tag, auto mem_tag) {
    JointLogprobsCpu<decltype(base_tag), decltype(mem_tag)>(a, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> target_logprobs_cpu(
    const at::Tensor& base_logits, const at::Tensor& mem_logits, const at::Tensor& targets,
    const c10::optional<at::Tensor>& row_params, double lmbda, double knn_temp, double base_temp) {
  check_devices(base_logits, mem_logits, row_params, &targets);
  const OpArgs a = prepare_args(base_logits, mem_logits, row_params, lmbda, knn_temp, base_temp);
  check_targets(targets, base_logits);
  const at::Tensor tgt = targets.contiguous();
  at::Tensor joint = at::empty({a.rows()}, a.base.options().dtype(at::kFloat));  // [N]
  at::Tensor lp_base = at::empty_like(joint), lp_mem = at::empty_like(joint);
  DispatchTwoDtypes(a.base, a.mem, [&](auto base_tag, auto mem_tag) {
    TargetLogprobsCpu<decltype(base_tag), decltype(mem_tag)>(a, tgt.data_ptr<int64_t>(), joint.data_ptr<float>(),
                                                             lp_base.data_ptr<float>(), lp_mem.data_ptr<float>());
  });
  return {joint, lp_base, lp_mem};
}

}  // namespace

TORCH_LIBRARY_IMPL(memdec_fast, CPU, m) {
  m.impl("joint_logprobs", &joint_logprobs_cpu);
  m.impl("target_logprobs", &target_logprobs_cpu);
}

}  // namespace memdec_fast
