// The one way kernels/*.cuh launch a kernel. Under nvcc it is the usual
// triple-chevron launch; under g++ with tests/cudacpu's shim (which defines
// MDF_CUDACPU) the same source runs on the CPU, each CUDA thread an OS thread.
#pragma once

#if defined(__CUDACC__)
#define MDF_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#elif defined(MDF_CUDACPU)
// The arguments are captured by value, as a launch copies them.
#define MDF_LAUNCH(kernel, grid, block, stream, ...) \
  ::cudacpu::Launch(#kernel, (grid), (block), (stream), [=] { kernel(__VA_ARGS__); })
#else
#error "kernels/*.cuh compile under nvcc, or under tests/cudacpu's shim (MDF_CUDACPU)"
#endif
