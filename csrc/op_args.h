// Torch-facing argument checks and unpacking shared by the CPU and CUDA glue.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <cfloat>

#include "common/mixture.h"

namespace memdec_fast {

// Logits [B, V] as the kernels read them: a row pointer stride and unit-stride rows.
inline at::Tensor unit_stride_rows(const at::Tensor& logits) {
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

// Every tensor of an op on the logits' device. Checked before anything else:
// with mixed devices the dispatcher picks one device's kernel for all of them.
inline void check_devices(const at::Tensor& base, const at::Tensor& mem, const c10::optional<at::Tensor>& row_params,
                          const at::Tensor* targets = nullptr) {
  TORCH_CHECK_VALUE(mem.device() == base.device(), "mem_logits: on ", mem.device(), ", but base_logits is on ",
                    base.device());
  if (row_params.has_value()) {
    TORCH_CHECK_VALUE(row_params->device() == base.device(), "row_params: on ", row_params->device(),
                      ", but the logits are on ", base.device());
  }
  if (targets != nullptr) {
    TORCH_CHECK_VALUE(targets->device() == base.device(), "targets: on ", targets->device(),
                      ", but the logits are on ", base.device());
  }
}

inline void check_logits(const at::Tensor& base, const at::Tensor& mem) {
  TORCH_CHECK_VALUE(base.dim() == 2, "base_logits: expected a 2-D tensor [B, V], got ", base.sizes());
  TORCH_CHECK_VALUE(mem.sizes() == base.sizes(), "mem_logits: shape ", mem.sizes(), " does not match base_logits ",
                    base.sizes());
  TORCH_CHECK_VALUE(base.size(1) >= 2, "base_logits: the vocabulary must have at least 2 entries");
  TORCH_CHECK_VALUE(base.size(1) <= (int64_t{1} << 30), "base_logits: the vocabulary exceeds 2**30 entries");
  for (const auto* t : {&base, &mem}) {
    const auto dt = t->scalar_type();
    TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, (t == &base ? "base" : "mem"),
                      "_logits: expected float32, float16 or bfloat16, got ", dt);
  }
}

// The per-row parameter table [B, kNumRowParams] float32, contiguous, or nullptr.
inline const float* row_param_table(const c10::optional<at::Tensor>& row_params, const at::Tensor& logits) {
  if (!row_params.has_value()) return nullptr;
  const at::Tensor& t = *row_params;
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == kNumRowParams,
                    "row_params: expected shape [", logits.size(0), ", ", int(kNumRowParams), "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.is_contiguous(), "row_params: expected contiguous float32");
  return t.data_ptr<float>();
}

inline RowParams scalar_params(double lmbda, double knn_temp, double base_temp, double temperature, int64_t top_k,
                               double top_p, double min_p) {
  TORCH_CHECK_VALUE(lmbda >= 0.0 && lmbda <= 1.0, "lmbda: ", lmbda, " is outside [0, 1]");
  // Temperatures are applied in float32, so they must be finite there.
  TORCH_CHECK_VALUE(knn_temp > 0.0 && knn_temp <= FLT_MAX, "knn_temp: ", knn_temp, " is outside (0, ", FLT_MAX, "]");
  TORCH_CHECK_VALUE(base_temp > 0.0 && base_temp <= FLT_MAX, "base_temp: ", base_temp, " is outside (0, ", FLT_MAX,
                    "]");
  TORCH_CHECK_VALUE(temperature >= 0.0 && temperature <= FLT_MAX, "temperature: ", temperature, " is outside [0, ",
                    FLT_MAX, "]");
  TORCH_CHECK_VALUE(top_k >= 0, "top_k: ", top_k, " must be >= 0");
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "top_p: ", top_p, " is outside (0, 1]");
  TORCH_CHECK_VALUE(min_p >= 0.0 && min_p <= 1.0, "min_p: ", min_p, " is outside [0, 1]");
  return RowParams{float(lmbda), float(knn_temp), float(base_temp), float(temperature),
                   int(std::min<int64_t>(top_k, INT32_MAX)), float(top_p), float(min_p)};
}

inline void check_targets(const at::Tensor& targets, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0), "targets: expected shape [",
                    logits.size(0), "], got ", targets.sizes());
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong, "targets: expected int64, got ", targets.scalar_type());
}

// Everything a kernel needs from an op's arguments, checked.
struct OpArgs {
  at::Tensor base, mem;   // [B, V], unit stride along V
  const float* table;     // [B, kNumRowParams] or nullptr
  RowParams scalars;
  int64_t rows() const { return base.size(0); }
  int64_t vocab() const { return base.size(1); }
};

inline OpArgs prepare_args(const at::Tensor& base_logits, const at::Tensor& mem_logits,
                           const c10::optional<at::Tensor>& row_params, double lmbda, double knn_temp,
                           double base_temp, double temperature = 1.0, int64_t top_k = 0, double top_p = 1.0,
                           double min_p = 0.0) {
  check_devices(base_logits, mem_logits, row_params);
  check_logits(base_logits, mem_logits);
  const RowParams scalars = scalar_params(lmbda, knn_temp, base_temp, temperature, top_k, top_p, min_p);
  const float* table = row_param_table(row_params, base_logits);
  return OpArgs{unit_stride_rows(base_logits), unit_stride_rows(mem_logits), table, scalars};
}

// Calls fn(TB{}, TM{}) with the element types of the two logit tensors, which
// may differ (float, at::Half or at::BFloat16 each).
template <typename Fn>
void DispatchTwoDtypes(const at::Tensor& base, const at::Tensor& mem, Fn&& fn) {
  auto with_mem = [&](auto base_tag) {
    switch (mem.scalar_type()) {
      case at::kFloat: return fn(base_tag, float{});
      case at::kHalf: return fn(base_tag, at::Half{});
      case at::kBFloat16: return fn(base_tag, at::BFloat16{});
      default: TORCH_CHECK_VALUE(false, "mem_logits: unsupported dtype ", mem.scalar_type());
    }
  };
  switch (base.scalar_type()) {
    case at::kFloat: return with_mem(float{});
    case at::kHalf: return with_mem(at::Half{});
    case at::kBFloat16: return with_mem(at::BFloat16{});
    default: TORCH_CHECK_VALUE(false, "base_logits: unsupported dtype ", base.scalar_type());
  }
}

}  // namespace memdec_fast
