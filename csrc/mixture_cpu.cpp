// CPU kernels of joint_logprobs and target_logprobs, parallel over rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu_row.h"
#include "op_args.h"

namespace memdec_fast {
namespace {

template <typename TB, typename TM>
void JointLogprobsCpu(const at::Tensor& base, const at::Tensor& mem, const float* table, const RowParams& scalars,
                      at::Tensor& out) {
  const int64_t vocab = base.size(1), sb = base.stride(0), sm = mem.stride(0);
  const TB* b0 = base.data_ptr<TB>();
  const TM* m0 = mem.data_ptr<TM>();
  float* o0 = out.data_ptr<float>();
  at::parallel_for(0, base.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const TB* b = b0 + row * sb;
      const TM* m = m0 + row * sm;
      float* o = o0 + row * vocab;
      const Mixture mix = RowMixture(b, m, vocab, LoadRowParams(table, row, scalars));
      for (int64_t i = 0; i < vocab; ++i) {
        o[i] = mix.valid ? mix.LogProb(static_cast<float>(b[i]), static_cast<float>(m[i])) : QuietNaN();
      }
    }
  });
}

template <typename TB, typename TM>
void TargetLogprobsCpu(const at::Tensor& base, const at::Tensor& mem, const int64_t* targets, const float* table,
                       const RowParams& scalars, float* joint, float* lp_base, float* lp_mem) {
  const int64_t vocab = base.size(1), sb = base.stride(0), sm = mem.stride(0);
  const TB* b0 = base.data_ptr<TB>();
  const TM* m0 = mem.data_ptr<TM>();
  at::parallel_for(0, base.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const TB* b = b0 + row * sb;
      const TM* m = m0 + row * sm;
      const Mixture mix = RowMixture(b, m, vocab, LoadRowParams(table, row, scalars));
      const int64_t t = targets[row];
      if (t < 0 || t >= vocab) {
        joint[row] = lp_base[row] = lp_mem[row] = QuietNaN();
        continue;
      }
      const float bt = static_cast<float>(b[t]), mt = static_cast<float>(m[t]);
      joint[row] = mix.valid ? mix.LogProb(bt, mt) : QuietNaN();
      lp_base[row] = mix.BaseLogProb(bt);
      lp_mem[row] = mix.MemLogProb(mt);
    }
  });
}

at::Tensor joint_logprobs_cpu(const at::Tensor& base_logits, const at::Tensor& mem_logits,
                              const c10::optional<at::Tensor>& row_params, double lmbda, double knn_temp,
                              double base_temp) {
  check_logits(base_logits, mem_logits);
  const RowParams scalars = scalar_params(lmbda, knn_temp, base_temp, 1.0, 0, 1.0, 0.0);
  const float* table = row_param_table(row_params, base_logits);
  const at::Tensor base = unit_stride_rows(base_logits), mem = unit_stride_rows(mem_logits);
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(at::kFloat));  // [B, V]
  DispatchTwoDtypes(base, mem, [&](auto base_tag, auto mem_tag) {
    JointLogprobsCpu<decltype(base_tag), decltype(mem_tag)>(base, mem, table, scalars, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> target_logprobs_cpu(
    const at::Tensor& base_logits, const at::Tensor& mem_logits, const at::Tensor& targets,
    const c10::optional<at::Tensor>& row_params, double lmbda, double knn_temp, double base_temp) {
  check_logits(base_logits, mem_logits);
  check_targets(targets, base_logits);
  const RowParams scalars = scalar_params(lmbda, knn_temp, base_temp, 1.0, 0, 1.0, 0.0);
  const float* table = row_param_table(row_params, base_logits);
  const at::Tensor base = unit_stride_rows(base_logits), mem = unit_stride_rows(mem_logits);
  const at::Tensor tgt = targets.contiguous();
  auto opts = base.options().dtype(at::kFloat);
  at::Tensor joint = at::empty({base.size(0)}, opts), lp_base = at::empty_like(joint), lp_mem = at::empty_like(joint);
  DispatchTwoDtypes(base, mem, [&](auto base_tag, auto mem_tag) {
    TargetLogprobsCpu<decltype(base_tag), decltype(mem_tag)>(base, mem, tgt.data_ptr<int64_t>(), table, scalars, joint.data_ptr<float>(),
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
