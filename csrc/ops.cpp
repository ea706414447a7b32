// Schemas of the memdec_fast ops. Kernels register beside their code
// (cpu/*_cpu.cpp, cuda/*_cuda.cu); importing memdec_fast._C runs the registrations.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
// An empty module: importing it loads this library and its op registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace memdec_fast {

// JSON written by setup.py: what was compiled, for memdec_fast.build_info().
std::string build_info() { return MEMDEC_FAST_BUILD_INFO; }

TORCH_LIBRARY(memdec_fast, m) {
  m.def(
      "joint_logprobs(Tensor base_logits, Tensor mem_logits, Tensor? row_params, float lmbda, float knn_temp, "
      "float base_temp) -> Tensor");
  m.def(
      "target_logprobs(Tensor base_logits, Tensor mem_logits, Tensor targets, Tensor? row_params, float lmbda, "
      "float knn_temp, float base_temp) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sample(Tensor base_logits, Tensor mem_logits, Tensor? row_params, float lmbda, float knn_temp, "
      "float base_temp, float temperature, int top_k, float top_p, float min_p, Generator? generator) "
      "-> (Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}

// sample is not differentiable: its outputs never require grad. Without this
// the autograd fallback would mark them requires_grad with no backward.
TORCH_LIBRARY_IMPL(memdec_fast, Autograd, m) { m.impl("sample", torch::CppFunction::makeFallthrough()); }

}  // namespace memdec_fast
