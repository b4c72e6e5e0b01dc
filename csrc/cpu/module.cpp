// The Python module of one build of the CPU kernels: setup.py compiles
// csrc/cpu once per vector ISA (default, AVX2, AVX-512) into myext._cpu_<isa>,
// and myext/_cpu.py imports the one this CPU runs, whose static
// TORCH_LIBRARY_IMPL initialisers then register its kernels. The module holds
// the ISA it was compiled for and reaches the GEMM library choice (gemm.h),
// which myext.machine wraps.
#include <Python.h>

#include "gemm.h"

#include <exception>
#include <string>
#include <vector>

#define MYEXT_STRINGIFY_(x) #x
#define MYEXT_STRINGIFY(x) MYEXT_STRINGIFY_(x)
#define MYEXT_CONCAT_(a, b) a##b
#define MYEXT_CONCAT(a, b) MYEXT_CONCAT_(a, b)

namespace {

PyObject* gemm_policy(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(myext::cpu::gemm_policy_name(myext::cpu::gemm_policy()));
  } catch (const std::exception& e) {  // a bad $MYEXT_CPU_GEMM, read on first use
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyObject* set_gemm_policy(PyObject*, PyObject* name) {
  const char* text = PyUnicode_AsUTF8AndSize(name, nullptr);
  if (text == nullptr) return nullptr;
  try {
    myext::cpu::set_gemm_policy(myext::cpu::parse_gemm_policy(text));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

const char* dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return c10::toString(dtype);
  }
}

// Each choice as a tuple (dtype, rows_up_to, inner, cols, a_layout, b_layout,
// aten_seconds, onednn_seconds, onednn, (timed_rows, timed_inner, timed_cols)), the
// dtype named as torch names it.
PyObject* gemm_choices(PyObject*, PyObject*) {
  std::vector<myext::cpu::GemmChoice> choices;
  try {
    choices = myext::cpu::gemm_choices();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(choices.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < choices.size(); ++i) {
    const auto& c = choices[i];
    PyObject* item = Py_BuildValue("(sLLLCCddO(LLL))", dtype_name(c.dtype), static_cast<long long>(c.rows_up_to),
                                   static_cast<long long>(c.inner), static_cast<long long>(c.cols),
                                   static_cast<int>(c.a_layout), static_cast<int>(c.b_layout), c.aten_seconds,
                                   c.onednn_seconds, c.onednn ? Py_True : Py_False,
                                   static_cast<long long>(c.timed_rows), static_cast<long long>(c.timed_inner),
                                   static_cast<long long>(c.timed_cols));
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SetItem(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

PyMethodDef methods[] = {
    {"gemm_policy", gemm_policy, METH_NOARGS, nullptr},
    {"set_gemm_policy", set_gemm_policy, METH_O, nullptr},
    {"gemm_choices", gemm_choices, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// PyInit__cpu_<isa>: the name Python looks for is the module's (MYEXT_CPU_MODULE).
PyObject* MYEXT_CONCAT(PyInit_, MYEXT_CPU_MODULE)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, MYEXT_STRINGIFY(MYEXT_CPU_MODULE), nullptr, -1,
                                          methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "cpu_capability", MYEXT_STRINGIFY(CPU_CAPABILITY)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
