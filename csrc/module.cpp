// The Python extension module landscape_ext._C. Importing it loads this shared library, whose
// static initializers register every op (registration.cpp) and every backend kernel
// (cpu/*.cpp, cuda/*.cu). Python-level functions: build_info() (facts fixed at build time, plus
// the x86-64 ISA level whose kernel variants this CPU runs) and activations() (the activation
// codes of act_derivs, from csrc/hvp.h), and the sketch family's argument checks.
#include <torch/extension.h>

#include "cpu/simd.h"
#include "hvp.h"
#include "sketch.h"

#ifndef LANDSCAPE_EXT_BUILT_TORCH_VERSION
#define LANDSCAPE_EXT_BUILT_TORCH_VERSION "unknown"
#endif
#ifndef LANDSCAPE_EXT_CUDA_ARCH_LIST
#define LANDSCAPE_EXT_CUDA_ARCH_LIST ""
#endif

static pybind11::dict build_info() {
  namespace simd = landscape_ext::simd;
  pybind11::dict info;
  info["built_torch_version"] = LANDSCAPE_EXT_BUILT_TORCH_VERSION;
#ifdef LANDSCAPE_EXT_WITH_CUDA
  info["cuda_kernels"] = true;
#else
  info["cuda_kernels"] = false;
#endif
  info["cuda_arch_list"] = LANDSCAPE_EXT_CUDA_ARCH_LIST;
  // krylov and hvp: LANDSCAPE_MULTIVERSION (target_clones, GCC only); sketch: one function per
  // level picked by simd::cpu_isa_level() (GCC and Clang). See cpu/simd.h.
#if LANDSCAPE_X86_64
#define LANDSCAPE_EXT_SKETCH_DISPATCH                                                     \
  "sketch: x86-64-v4 (AVX-512) / x86-64-v3 (AVX2+FMA) / default variants picked by the " \
  "CPU's level (LANDSCAPE_EXT_SKETCH_ISA=x86-64-v3|default caps it)"
#else
#define LANDSCAPE_EXT_SKETCH_DISPATCH "sketch: none"
#endif
#if LANDSCAPE_X86_64 && !defined(__clang__)
  info["cpu_multiversioning"] =
      "krylov, hvp: target_clones(arch=x86-64-v4, arch=x86-64-v3, default), resolved by ISA "
      "level; " LANDSCAPE_EXT_SKETCH_DISPATCH;
  // Not a build-time fact: the krylov/hvp clone this CPU runs (the resolvers' own test).
  info["cpu_isa_level"] = simd::isa_level_name(simd::cpu_isa_level());
#else
  info["cpu_multiversioning"] = "krylov, hvp: none; " LANDSCAPE_EXT_SKETCH_DISPATCH;
  info["cpu_isa_level"] = "none";
#endif
#undef LANDSCAPE_EXT_SKETCH_DISPATCH
  info["sketch_isa_level"] = landscape_ext::sketch::cpu_sketch_isa_level();
  return info;
}

// {name: code} of act_derivs' activations (hvp::kActNames, indexed by code).
static pybind11::dict activations() {
  pybind11::dict codes;
  for (int64_t code = 0; code < landscape_ext::hvp::kNumActs; ++code) {
    codes[landscape_ext::hvp::kActNames[code]] = code;
  }
  return codes;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "landscape-ext compiled kernels; use them through landscape_ext.ops";
  m.def("build_info", &build_info, "Facts recorded when this extension was compiled");
  m.def("activations", &activations, "Activation codes of act_derivs: {name: code}");
  // The kernels' argument checks alone, so that the composite (torch) paths in ops.py reject bad
  // input with the same messages as the kernels on every device.
  m.def("check_linear_grad_sketch_args", &landscape_ext::sketch::check_linear_grad_sketch_args,
        "Raise the error linear_grad_sketch's kernels would raise for these arguments");
  m.def("check_linear_grad_project_args", &landscape_ext::sketch::check_linear_grad_project_args,
        "Raise the error linear_grad_project's kernels would raise for these arguments");
}
