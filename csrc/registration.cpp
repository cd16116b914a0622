// Schemas of the compiled ops, and the Python module whose import registers them.
//
// The public op pydecouple::gated_conv2d (with its fake implementation and
// autograd) is defined in Python (pydecouple/ops.py); it dispatches to the
// per-device kernels defined here. The CUDA kernel's schema lives beside its
// glue (csrc/cuda/), which is compiled only where it can run.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pydecouple, m) {
  m.def(
      "gated_conv2d_cpu(Tensor x, Tensor weight, Tensor? bias, Tensor? out_mask, Tensor? in_mask, "
      "int[] stride, int[] padding, int[] dilation, int groups, bool relu) -> Tensor");
}

// A module with no functions: importing pydecouple._C runs the static
// registrations above (the extension-cpp pattern, no pybind11 glue per op).
static struct PyModuleDef pydecouple_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pydecouple_c_module); }
