// The `archext._C` Python module. Loading it runs the static TORCH_LIBRARY registrations; the
// few functions here only report and choose the build's capabilities. Plain CPython API (no
// pybind11), so this file compiles in seconds.
#include <Python.h>

#include <c10/util/Exception.h>

#include "cpu/isa.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(archext::cpu::isa_name(archext::cpu::current_isa()));
}

PyObject* best_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(archext::cpu::isa_name(archext::cpu::best_supported_isa()));
}

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    archext::cpu::set_cpu_isa(name);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef ARCHEXT_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The ISA the CPU kernels use now."},
    {"best_cpu_isa", best_cpu_isa, METH_NOARGS, "The widest ISA this CPU and build support."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Choose the CPU kernel ISA: default, avx2, avx512, avx512_bf16, best."},
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "archext native kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
