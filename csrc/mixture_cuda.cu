// CUDA glue of joint_logprobs and target_logprobs: checks, dtype dispatch and
// launch on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_types.h"
#include "kernels/mixture.cuh"
#include "op_args.h"

namespace memdec_fast {
namespace {

at::Tensor joint_logprobs_cuda(const at::Tensor& base_logits, const at::Tensor& mem_logits,
                               const c10::optional<at::Tensor>& row_params, double lmbda, double knn_temp,
                               double base_temp) {
  check_logits(base_logits, mem_logits);
  const RowParams scalars = scalar_params(lmbda, knn_temp, base_temp, 1.0, 0, 1.0, 0.0);
  const float* table = row_param_table(row_params, base_logits);
  const c10::cuda::CUDAGuard guard(base_logits.device());
  const at::Tensor base = unit_stride_rows(base_logits), mem = unit_stride_rows(mem_logits);
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(at::kFloat));  // [B, V]
  if (base.size(0) == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DispatchTwoDtypes(base, mem, [&](auto base_tag, auto mem_tag) {
    LaunchJointLogprobs(cuda_data<decltype(base_tag)>(base), base.stride(0), cuda_data<decltype(mem_tag)>(mem),
                        mem.stride(0), base.size(0), base.size(1), table, scalars, out.data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> target_logprobs_cuda(
    const at::Tensor& base_logits, const at::Tensor& mem_logits, const at::Tensor& targets,
    const c10::optional<at::Tensor>& row_params, double lmbda, double knn_temp, double base_temp) {
  check_logits(base_logits, mem_logits);
  check_targets(targets, base_logits);
  const RowParams scalars = scalar_params(lmbda, knn_temp, base_temp, 1.0, 0, 1.0, 0.0);
  const float* table = row_param_table(row_params, base_logits);
  const c10::cuda::CUDAGuard guard(base_logits.device());
  const at::Tensor base = unit_stride_rows(base_logits), mem = unit_stride_rows(mem_logits);
  const at::Tensor tgt = targets.contiguous();
  auto opts = base.options().dtype(at::kFloat);
  at::Tensor joint = at::empty({base.size(0)}, opts), lp_base = at::empty_like(joint), lp_mem = at::empty_like(joint);
  if (base.size(0) == 0) return {joint, lp_base, lp_mem};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DispatchTwoDtypes(base, mem, [&](auto base_tag, auto mem_tag) {
    LaunchTargetLogprobs(cuda_data<decltype(base_tag)>(base), base.stride(0), cuda_data<decltype(mem_tag)>(mem),
                         mem.stride(0), base.size(0), base.size(1), tgt.const_data_ptr<int64_t>(), table, scalars,
                         joint.data_ptr<float>(), lp_base.data_ptr<float>(), lp_mem.data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {joint, lp_base, lp_mem};
}

}  // namespace

TORCH_LIBRARY_IMPL(memdec_fast, CUDA, m) {
  m.impl("joint_logprobs", &joint_logprobs_cuda);
  m.impl("target_logprobs", &target_logprobs_cuda);
}

}  // namespace memdec_fast
