// Maps torch's element types to CUDA's, so kernels/ sees no torch types.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace memdec_fast {

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// The tensor's data as the CUDA element type matching the torch type T.
template <typename T>
const typename CudaType<T>::type* cuda_data(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<T>::type*>(t.const_data_ptr<T>());
}

}  // namespace memdec_fast
