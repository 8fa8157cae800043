// headgain's compiled extension: the Python module and the op schemas (the only
// TORCH_LIBRARY block). The implementations register themselves per device, each beside
// its kernels: cpu/*.cpp (CPU) and cuda/headgain_cuda.cu (CUDA); the argument checks they
// share are declared in headgain.h and defined in checks.cpp.
//
// Every op matches the pure-PyTorch reference in headgain/core/reference.py.

#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#ifndef HEADGAIN_WITH_CUDA
#define HEADGAIN_WITH_CUDA 0  // setup.py defines it as 1 when it compiles the CUDA kernels
#endif

// Whether at::parallel_for runs the CPU kernels' loops on torch's threads: ATen defines
// INTRA_OP_PARALLEL where the including file is compiled with the threading torch uses
// (for OpenMP builds of torch, -fopenmp; setup.py passes it).
#ifdef INTRA_OP_PARALLEL
#define HEADGAIN_PARALLEL 1
#else
#define HEADGAIN_PARALLEL 0
#endif

// `import headgain._C` loads this library, which registers torch.ops.headgain.*; the
// Python module holds two constants: `with_cuda` (whether the CUDA kernels were built) and
// `parallel` (whether the CPU kernels use torch's intra-op threads).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && (PyModule_AddIntConstant(m, "with_cuda", HEADGAIN_WITH_CUDA) < 0 ||
                       PyModule_AddIntConstant(m, "parallel", HEADGAIN_PARALLEL) < 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

namespace headgain {

TORCH_LIBRARY(headgain, m) {
  m.def("ratio_from_probs(Tensor probs, Tensor visual, Tensor query_weights) -> Tensor");
  m.def(
      "ratio_from_qk(Tensor q, Tensor k, Tensor? mask, Tensor visual, Tensor row_weights, float scaling, "
      "float softcap) -> Tensor");
  m.def(
      "ratio_from_blocks(Tensor q, Tensor key_blocks, Tensor block_table, Tensor lengths, Tensor visual, "
      "float scaling, float softcap, int window) -> Tensor");
  m.def(
      "head_gains(Tensor ratios, Tensor has_visual, float tau_perc, float tau_reas, float g_perc, float g_reas, "
      "float g_neutral) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor visual, float scaling, float softcap) -> "
      "(Tensor, Tensor)");
  m.def("scale_heads_(Tensor(a!) out, Tensor gains) -> ()");
  m.def("scale_heads(Tensor out, Tensor gains) -> Tensor");
}

}  // namespace headgain
