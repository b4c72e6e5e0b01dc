// The Python module of one build of the CPU kernels: setup.py compiles
// csrc/cpu once per vector ISA (default, AVX2, AVX-512) into myext._cpu_<isa>,
// and myext/_cpu.py imports the one this CPU runs, whose static
// TORCH_LIBRARY_IMPL initialisers then register its kernels. The module holds
// the ISA it was compiled for.
#include <Python.h>

#define MYEXT_STRINGIFY_(x) #x
#define MYEXT_STRINGIFY(x) MYEXT_STRINGIFY_(x)
#define MYEXT_CONCAT_(a, b) a##b
#define MYEXT_CONCAT(a, b) MYEXT_CONCAT_(a, b)

extern "C" {
// PyInit__cpu_<isa>: the name Python looks for is the module's (MYEXT_CPU_MODULE).
PyObject* MYEXT_CONCAT(PyInit_, MYEXT_CPU_MODULE)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, MYEXT_STRINGIFY(MYEXT_CPU_MODULE), nullptr, -1,
                                          nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "cpu_capability", MYEXT_STRINGIFY(CPU_CAPABILITY)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
