// The Python extension module landscape_ext._C. Importing it loads this shared library, whose
// static initializers register every op (registration.cpp) and every backend kernel
// (cpu/*.cpp, cuda/*.cu) through torch's stable C ABI. Python-level functions: build_info() (facts
// fixed at build time, plus the x86-64 ISA level whose kernel variants this CPU runs) and
// activations() (the activation codes of act_derivs, from csrc/hvp.h).
//
// Written against CPython's limited API (Py_LIMITED_API, set by setup.py through
// py_limited_api=True), not pybind11: the binary then depends on neither one Python minor version
// nor one libtorch, so one abi3 wheel serves every CPython >= 3.10 and every torch >= 2.10.
#include <Python.h>

#include <cstdint>

#include "cpu/simd.h"
#include "hvp.h"
#include "sketch.h"

#ifndef LANDSCAPE_EXT_BUILT_TORCH_VERSION
#define LANDSCAPE_EXT_BUILT_TORCH_VERSION "unknown"
#endif
#ifndef LANDSCAPE_EXT_TORCH_TARGET
#define LANDSCAPE_EXT_TORCH_TARGET "unknown"
#endif
#ifndef LANDSCAPE_EXT_CUDA_ARCH_LIST
#define LANDSCAPE_EXT_CUDA_ARCH_LIST ""
#endif
#ifndef LANDSCAPE_EXT_BUILT_CUDA
#define LANDSCAPE_EXT_BUILT_CUDA ""
#endif

namespace {

// dict[key] = value (a new reference, released here); false on a Python error.
bool set_item(PyObject* dict, const char* key, PyObject* value) {
  if (value == nullptr) return false;
  const int rc = PyDict_SetItemString(dict, key, value);
  Py_DECREF(value);
  return rc == 0;
}

bool set_str(PyObject* dict, const char* key, const char* value) {
  return set_item(dict, key, PyUnicode_FromString(value));
}

bool set_bool(PyObject* dict, const char* key, bool value) {
  return set_item(dict, key, PyBool_FromLong(value ? 1 : 0));
}

// krylov and hvp: LANDSCAPE_MULTIVERSION (target_clones, GCC only); sketch: one function per
// level picked by simd::cpu_isa_level() (GCC and Clang). See cpu/simd.h.
#if LANDSCAPE_X86_64
#define LANDSCAPE_EXT_SKETCH_DISPATCH                                                     \
  "sketch: x86-64-v4 (AVX-512) / x86-64-v3 (AVX2+FMA) / default variants picked by the " \
  "CPU's level (LANDSCAPE_EXT_SKETCH_ISA=x86-64-v3|default caps it)"
#else
#define LANDSCAPE_EXT_SKETCH_DISPATCH "sketch: none"
#endif

bool fill_build_info(PyObject* info) {
  namespace simd = landscape_ext::simd;
#ifdef LANDSCAPE_EXT_WITH_CUDA
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
#if LANDSCAPE_X86_64 && !defined(__clang__)
  const char* multiversioning =
      "krylov, hvp: target_clones(arch=x86-64-v4, arch=x86-64-v3, default), resolved by ISA "
      "level; " LANDSCAPE_EXT_SKETCH_DISPATCH;
  // Not a build-time fact: the krylov/hvp clone this CPU runs (the resolvers' own test).
  const char* isa = simd::isa_level_name(simd::cpu_isa_level());
#else
  const char* multiversioning = "krylov, hvp: none; " LANDSCAPE_EXT_SKETCH_DISPATCH;
  const char* isa = "none";
#endif
  return set_str(info, "built_torch_version", LANDSCAPE_EXT_BUILT_TORCH_VERSION) &&
         set_str(info, "torch_target_version", LANDSCAPE_EXT_TORCH_TARGET) &&
         set_bool(info, "stable_abi", true) && set_bool(info, "cuda_kernels", cuda) &&
         set_str(info, "built_cuda_version", LANDSCAPE_EXT_BUILT_CUDA) &&
         set_str(info, "cuda_arch_list", LANDSCAPE_EXT_CUDA_ARCH_LIST) &&
         set_str(info, "cpu_multiversioning", multiversioning) &&
         set_str(info, "cpu_isa_level", isa) &&
         set_str(info, "sketch_isa_level", landscape_ext::sketch::cpu_sketch_isa_level());
}
#undef LANDSCAPE_EXT_SKETCH_DISPATCH

PyObject* build_info(PyObject* /*self*/, PyObject* /*args*/) {
  PyObject* info = PyDict_New();
  if (info == nullptr) return nullptr;
  if (!fill_build_info(info)) {
    Py_DECREF(info);
    return nullptr;
  }
  return info;
}

// {name: code} of act_derivs' activations (hvp::kActNames, indexed by code).
PyObject* activations(PyObject* /*self*/, PyObject* /*args*/) {
  PyObject* codes = PyDict_New();
  if (codes == nullptr) return nullptr;
  for (int64_t code = 0; code < landscape_ext::hvp::kNumActs; ++code) {
    if (!set_item(codes, landscape_ext::hvp::kActNames[code],
                  PyLong_FromLongLong(static_cast<long long>(code)))) {
      Py_DECREF(codes);
      return nullptr;
    }
  }
  return codes;
}

PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS, "Facts recorded when this extension was compiled"},
    {"activations", activations, METH_NOARGS, "Activation codes of act_derivs: {name: code}"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "landscape-ext compiled kernels (torch ops registered on import); use them through "
    "landscape_ext.ops",
    -1,
    kMethods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
