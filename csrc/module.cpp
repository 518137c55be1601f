// The Python extension module landscape_ext._C. Importing it loads this shared library, whose
// static initializers register every op (registration.cpp) and every backend kernel
// (cpu/*.cpp, cuda/*.cu). The only Python-level function is build_info(): facts fixed at build
// time, plus the x86-64 ISA level whose kernel clones this CPU runs (cpu_isa_level).
#include <torch/extension.h>

#ifndef LANDSCAPE_EXT_BUILT_TORCH_VERSION
#define LANDSCAPE_EXT_BUILT_TORCH_VERSION "unknown"
#endif
#ifndef LANDSCAPE_EXT_CUDA_ARCH_LIST
#define LANDSCAPE_EXT_CUDA_ARCH_LIST ""
#endif

static pybind11::dict build_info() {
  pybind11::dict info;
  info["built_torch_version"] = LANDSCAPE_EXT_BUILT_TORCH_VERSION;
#ifdef LANDSCAPE_EXT_WITH_CUDA
  info["cuda_kernels"] = true;
#else
  info["cuda_kernels"] = false;
#endif
  info["cuda_arch_list"] = LANDSCAPE_EXT_CUDA_ARCH_LIST;
  // krylov and hvp: LANDSCAPE_MULTIVERSION (cpu/simd.h, GCC only); sketch: its own pick_isa
  // (cpu/sketch.cpp, GCC and Clang).
#if defined(__GNUC__) && defined(__x86_64__)
#define LANDSCAPE_EXT_SKETCH_DISPATCH                                                      \
  "sketch: avx512 / avx2+fma / base variants picked by __builtin_cpu_supports "            \
  "(LANDSCAPE_EXT_SKETCH_ISA=avx2|base forces a narrower one)"
#else
#define LANDSCAPE_EXT_SKETCH_DISPATCH "sketch: none"
#endif
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
  info["cpu_multiversioning"] =
      "krylov, hvp: target_clones(arch=x86-64-v4, arch=x86-64-v3, default), resolved by ISA "
      "level; " LANDSCAPE_EXT_SKETCH_DISPATCH;
  // Not a build-time fact: the krylov/hvp clone this CPU runs (the resolvers' own test).
  __builtin_cpu_init();
  info["cpu_isa_level"] = __builtin_cpu_supports("x86-64-v4")   ? "x86-64-v4"
                          : __builtin_cpu_supports("x86-64-v3") ? "x86-64-v3"
                                                                : "default";
#else
  info["cpu_multiversioning"] = "krylov, hvp: none; " LANDSCAPE_EXT_SKETCH_DISPATCH;
  info["cpu_isa_level"] = "none";
#endif
#undef LANDSCAPE_EXT_SKETCH_DISPATCH
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "landscape-ext compiled kernels; use them through landscape_ext.ops";
  m.def("build_info", &build_info, "Facts recorded when this extension was compiled");
}
