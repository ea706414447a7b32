// Qualifiers that let one function body serve both the C++ and the CUDA build.
#pragma once

#if defined(__CUDACC__)
#define MDF_HD __host__ __device__ __forceinline__
#else
#define MDF_HD inline
#endif
