// CUDA glue of joint_logprobs and target_logprobs: checks, dtype dispatch and
// launch on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/cuda_types.h"
#include "kernels/mixture.cuh"
#include "op_args.h"

namespace memdec_fast {
namespace {

at::Tensor joint_logprobs_cuda(const at::Tensor& base_logits, const at::Tensor& mem_logits,
                               const c10::optional<at::Tensor>& row_params, double lmbda, double knn_temp,
                               double base_temp) {
  const OpArgs a = prepare_args(base_logits, mem_logits, row_params, lmbda, knn_temp, base_temp);
  const c10::cuda::CUDAGuard guard(base_logits.device());  // after the checks: the logits may be on the CPU
  at::Tensor out = at::empty(a.base.sizes(), a.base.options().dtype(at::kFloat));  // [B, V]
  if (a.rows() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DispatchTwoDtypes(a.base, a.mem, [&](auto base_tag, auto mem_tag) {
    LaunchJointLogprobs(cuda_data<decltype(base_tag)>(a.base), a.base.stride(0), cuda_data<decltype(mem_tag)>(a.mem),
                        a.mem.stride(0), a.rows(), a.vocab(), a.table, a.scalars, out.data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> target_logprobs_cuda(
    const at::Tensor& base_logits, const at::Tensor& mem_logits, const at::Tensor& targets,
    const c10::optional<at::Tensor>& row_params, double lmbda, double knn_temp, double base_temp) {
  check_devices(base_logits, mem_logits, row_params, &targets);
  const OpArgs a = prepare_args(base_logits, mem_logits, row_params, lmbda, knn_temp, base_temp);
  check_targets(targets, base_logits);
  const c10::cuda::CUDAGuard guard(base_logits.device());
  const at::Tensor tgt = targets.contiguous();
  at::Tensor joint = at::empty({a.rows()}, a.base.options().dtype(at::kFloat));  // [N]
  at::Tensor lp_base = at::empty_like(joint), lp_mem = at::empty_like(joint);
  if (a.rows() == 0) return {joint, lp_base, lp_mem};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DispatchTwoDtypes(a.base, a.mem, [&](auto base_tag, auto mem_tag) {
    LaunchTargetLogprobs(cuda_data<decltype(base_tag)>(a.base), a.base.stride(0), cuda_data<decltype(mem_tag)>(a.mem),
                         a.mem.stride(0), a.rows(), a.vocab(), tgt.const_data_ptr<int64_t>(), a.table, a.scalars,
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
