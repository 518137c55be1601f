"""Build landscape-ext: a pybind11 module ``landscape_ext._C`` holding the torch ops.

CUDA kernels are compiled when the torch in use is a CUDA build *and* nvcc is found
(never because a GPU happens to be visible). Override with ``LANDSCAPE_EXT_CUDA=0`` or ``=1``.
When ``TORCH_CUDA_ARCH_LIST`` is unset and no GPU is visible, it defaults to Ampere + Hopper
(``8.0;8.6;9.0+PTX``) so a wheel built on a GPU-less machine runs on the common cards.

Always build against the installed torch: ``pip install --no-build-isolation .``
"""
import glob
import os
import shutil
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;9.0+PTX"


def _nvcc_path():
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def _decide_cuda():
    """Return (build_cuda, reason)."""
    override = os.environ.get("LANDSCAPE_EXT_CUDA", "").strip()
    torch_cuda = torch.version.cuda
    nvcc = _nvcc_path()
    if override not in ("", "0", "1"):
        raise SystemExit(f"LANDSCAPE_EXT_CUDA must be 0 or 1, got {override!r}")
    if override == "0":
        return False, "LANDSCAPE_EXT_CUDA=0"
    if override == "1":
        if torch_cuda is None:
            raise SystemExit("LANDSCAPE_EXT_CUDA=1 but the installed torch "
                             f"{torch.__version__} is a CPU build: install a CUDA build of torch")
        if nvcc is None:
            raise SystemExit("LANDSCAPE_EXT_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True, "LANDSCAPE_EXT_CUDA=1"
    if torch_cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if nvcc is None:
        return False, f"torch has CUDA {torch_cuda} but nvcc was not found (set CUDA_HOME)"
    return True, f"torch has CUDA {torch_cuda} and nvcc is at {nvcc}"


def _arch_list(build_cuda):
    if not build_cuda:
        return ""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not arch:
        if torch.cuda.is_available():
            # cpp_extension detects the visible card's arch itself; record what it will use
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            arch = ";".join(f"{a}.{b}" for a, b in caps)
        else:
            arch = DEFAULT_ARCH_LIST
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    return arch


def make_extension():
    build_cuda, reason = _decide_cuda()
    arch = _arch_list(build_cuda)
    print(f"landscape-ext build: CUDA={build_cuda} ({reason}) TORCH_CUDA_ARCH_LIST={arch or '-'}",
          flush=True)

    sources = ["csrc/module.cpp", "csrc/registration.cpp"]
    sources += sorted(glob.glob("csrc/*_common.cpp"))
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    macros = [
        ("LANDSCAPE_EXT_BUILT_TORCH_VERSION", f'"{torch.__version__}"'),
        ("LANDSCAPE_EXT_CUDA_ARCH_LIST", f'"{arch}"'),
    ]
    cxx_flags = ["-O3", "-Wno-psabi"]
    link_flags = []
    # at::parallel_for is a header template: without -fopenmp in *this* build its OpenMP pragma
    # is ignored and every CPU kernel runs on one thread. Linking with -fopenmp records the
    # soname libgomp.so.1, which resolves to the libgomp torch already loaded (one runtime, so
    # torch.set_num_threads applies to our kernels too).
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("LANDSCAPE_EXT_WITH_CUDA", "1"))
        nvcc_flags = ["-O3", "-lineinfo",
                      "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "landscape_ext._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags)
    return CppExtension(
        "landscape_ext._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


setup(
    packages=["landscape_ext", "landscape_lab"],
    package_dir={"landscape_ext": "landscape_ext", "landscape_lab": "python/landscape_lab"},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
