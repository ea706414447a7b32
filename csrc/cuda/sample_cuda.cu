// CUDA glue of sample: checks, the generator's Philox state (graph-safe),
// dtype dispatch and launch on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>

#include "cuda/cuda_types.h"
#include "kernels/sample.cuh"
#include "op_args.h"

namespace memdec_fast {
namespace {

// Reserves this call's numbers from the generator. Under CUDA-graph capture
// torch hands out device pointers, so every replay reads a fresh offset.
PhiloxArgs ReservePhilox(const c10::optional<at::Generator>& generator, const at::Device& device) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  TORCH_CHECK_VALUE(gen->device() == device, "generator: on ", gen->device(), ", but the logits are on ", device);
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    state = gen->philox_cuda_state(4);  // one counter block per row: offset advances by one block
  }
  PhiloxArgs a{};
  a.captured = state.captured_;
  if (state.captured_) {
    a.seed_ptr = state.seed_.ptr;
    a.offset_ptr = state.offset_.ptr;
    a.offset_intragraph = state.offset_intragraph_;
  } else {
    a.seed = state.seed_.val;
    a.offset = state.offset_.val;
  }
  return a;
}

std::tuple<at::Tensor, at::Tensor> sample_cuda(const at::Tensor& base_logits, const at::Tensor& mem_logits,
                                               const c10::optional<at::Tensor>& row_params, double lmbda,
                                               double knn_temp, double base_temp, double temperature, int64_t top_k,
                                               double top_p, double min_p,
                                               const c10::optional<at::Generator>& generator) {
  const OpArgs a = prepare_args(base_logits, mem_logits, row_params, lmbda, knn_temp, base_temp, temperature, top_k,
                                top_p, min_p);
  const c10::cuda::CUDAGuard guard(base_logits.device());  // after the checks: the logits may be on the CPU
  at::Tensor tokens = at::empty({a.rows()}, a.base.options().dtype(at::kLong));    // [B]
  at::Tensor logprobs = at::empty({a.rows()}, a.base.options().dtype(at::kFloat));  // [B]
  if (a.rows() == 0) return {tokens, logprobs};
  const PhiloxArgs philox = ReservePhilox(generator, a.base.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DispatchTwoDtypes(a.base, a.mem, [&](auto base_tag, auto mem_tag) {
    LaunchSample(cuda_data<decltype(base_tag)>(a.base), a.base.stride(0), cuda_data<decltype(mem_tag)>(a.mem),
                 a.mem.stride(0), a.rows(), a.vocab(), a.table, a.scalars, philox, tokens.data_ptr<int64_t>(),
                 logprobs.data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(memdec_fast, CUDA, m) { m.impl("sample", &sample_cuda); }

}  // namespace memdec_fast
