// CUDA glue of sample: checks, the generator's Philox state (graph-safe),
// dtype dispatch and launch on the current stream. Two kernels: v2
// (kernels/sample_split.cuh), the default, and v1 (kernels/sample.cuh), kept
// selectable with MEMDEC_FAST_SAMPLER=v1 until a GPU run has compared them.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "cuda/cuda_types.h"
#include "kernels/sample.cuh"
#include "kernels/sample_split.cuh"
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

// MEMDEC_FAST_SAMPLER, read once: "v1" for the old kernel; unset, empty or "v2" for the new one.
bool UseSamplerV1() {
  static const int choice = [] {
    const char* s = std::getenv("MEMDEC_FAST_SAMPLER");
    if (s == nullptr || std::strcmp(s, "") == 0 || std::strcmp(s, "v2") == 0) return 2;
    return std::strcmp(s, "v1") == 0 ? 1 : 0;
  }();
  TORCH_CHECK_VALUE(choice != 0, "MEMDEC_FAST_SAMPLER=", std::getenv("MEMDEC_FAST_SAMPLER"),
                    ": expected v1 or v2 (the default)");
  return choice == 1;
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
  const bool v1 = UseSamplerV1();
  const PhiloxArgs philox = ReservePhilox(generator, a.base.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // v2's plan and workspace: the log p scratch rows, the chunks' statistics, argmaxes and digit counts
  const int max_blocks = 2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const SplitPlan plan = PlanSampleSplit(static_cast<int>(a.rows()), static_cast<int>(a.vocab()), max_blocks);
  const at::Tensor workspace =
      v1 ? at::Tensor() : at::empty({static_cast<int64_t>(plan.bytes)}, a.base.options().dtype(at::kByte));
  DispatchTwoDtypes(a.base, a.mem, [&](auto base_tag, auto mem_tag) {
    const auto* b = cuda_data<decltype(base_tag)>(a.base);
    const auto* m = cuda_data<decltype(mem_tag)>(a.mem);
    if (v1) {
      LaunchSample(b, a.base.stride(0), m, a.mem.stride(0), a.rows(), a.vocab(), a.table, a.scalars, philox,
                   tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(), stream);
    } else {
      LaunchSampleSplit(b, a.base.stride(0), m, a.mem.stride(0), a.rows(), a.vocab(), a.table, a.scalars, philox,
                        tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(), plan, workspace.data_ptr(), stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();  // v2 launches up to 3 kernels: the first failed launch's error stays pending
  });
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(memdec_fast, CUDA, m) { m.impl("sample", &sample_cuda); }

}  // namespace memdec_fast
