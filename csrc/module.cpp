// The Python extension module landscape_ext._C. Importing it loads this shared library, whose
// static initializers register every op (registration.cpp) and every backend kernel
// (cpu/*.cpp, cuda/*.cu). The only Python-level function is build_info(): facts fixed at build time.
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
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
  info["cpu_multiversioning"] = "target_clones(skylake-avx512, haswell, default)";
#else
  info["cpu_multiversioning"] = "none";
#endif
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "landscape-ext compiled kernels; use them through landscape_ext.ops";
  m.def("build_info", &build_info, "Facts recorded when this extension was compiled");
}
