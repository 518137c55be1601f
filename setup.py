"""Build landscape-ext: the module ``landscape_ext._C`` holding the torch ops.

One binary for every torch from 2.10 on and every CPython from 3.10 on (torch 2.10 needs 3.10):
the kernels are written against torch's stable C ABI (csrc/stable_api.h, ``TORCH_TARGET_VERSION``
= 2.10) and the module against CPython's limited API, so the wheel is tagged ``cp310-abi3`` (the
limited-API level torch's BuildExtension compiles with: Py_LIMITED_API = 3.10) and holds no
libtorch, no CUDA runtime and no pybind11.

CUDA kernels are compiled when the torch in use is a CUDA build *and* a working CUDA toolkit is
found (never because a GPU happens to be visible). Override with ``LANDSCAPE_EXT_CUDA=0`` or
``=1``. The toolkit is ``CUDA_HOME`` when it holds ``bin/nvcc``, else the folder of the *real*
nvcc behind the one on PATH (a wrapper script or a symlink is followed); it must hold the CUDA
runtime (``lib64/libcudart.so``). When ``TORCH_CUDA_ARCH_LIST`` is unset and no GPU is visible it
defaults to Ampere + Hopper (``8.0;8.6;9.0+PTX``).

Always build against the installed torch: ``pip install --no-build-isolation .`` (an isolated
build would first download a torch of its own; this script stops at once and says so).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;9.0+PTX"
TORCH_TARGET = (2, 10)  # the oldest torch whose stable ABI the binary may use
TORCH_TARGET_VERSION = f"0x{TORCH_TARGET[0]:02x}{TORCH_TARGET[1]:02x}000000000000"

try:
    import torch
except ImportError:
    # pip's build isolation gives setup.py a fresh environment without the user's torch.
    raise SystemExit(
        "landscape-ext: torch is not importable in this build environment. landscape-ext builds "
        "against the torch you already have: install torch first (pip install torch), then run\n"
        "    pip install --no-build-isolation .\n"
        "(pip's default build isolation hides the installed torch; with it pip would download "
        "another several-GB torch only to build against it).")


def _toolkit_of(nvcc):
    """The CUDA toolkit folder of an nvcc executable: nvcc itself says where it lives
    (``--dryrun`` prints ``_HERE_=<toolkit>/bin``), which also sees through wrapper scripts."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        text = ""
    match = re.search(r"^#\$ _HERE_=(.+)$", text, re.MULTILINE)
    if match:
        return os.path.dirname(os.path.realpath(match.group(1).strip()))
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _has_cudart(home):
    return any(os.path.exists(os.path.join(home, sub, "libcudart.so"))
               for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")))


def resolve_cuda_home():
    """(toolkit folder or None, what was looked at): CUDA_HOME if it has bin/nvcc, else the
    folder of the real nvcc on PATH. Sets CUDA_HOME for torch's cpp_extension, which reads it
    when imported."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and os.path.exists(os.path.join(env, "bin", "nvcc")):
        home = os.path.realpath(env)
    else:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            return None, "no nvcc on PATH and CUDA_HOME is not set"
        home = _toolkit_of(nvcc)
    if not _has_cudart(home):
        return None, (f"the CUDA toolkit at {home} has no lib64/libcudart.so: set CUDA_HOME to "
                      f"the toolkit folder (the one holding bin/nvcc and lib64/)")
    os.environ["CUDA_HOME"] = home
    return home, f"toolkit {home}"


def decide_cuda():
    """Return (build_cuda, reason, cuda_home)."""
    override = os.environ.get("LANDSCAPE_EXT_CUDA", "").strip()
    if override not in ("", "0", "1"):
        raise SystemExit(f"LANDSCAPE_EXT_CUDA must be 0 or 1, got {override!r}")
    if override == "0":
        return False, "LANDSCAPE_EXT_CUDA=0", None
    torch_cuda = torch.version.cuda
    if torch_cuda is None:
        if override == "1":
            raise SystemExit("LANDSCAPE_EXT_CUDA=1 but the installed torch "
                             f"{torch.__version__} is a CPU build: install a CUDA build of torch")
        return False, f"torch {torch.__version__} is a CPU build", None
    home, why = resolve_cuda_home()
    if home is None:
        if override == "1":
            raise SystemExit(f"landscape-ext: LANDSCAPE_EXT_CUDA=1 but {why}")
        print(f"landscape-ext build: WARNING: torch has CUDA {torch_cuda} but {why}; building "
              "the CPU kernels only (LANDSCAPE_EXT_CUDA=0 silences this)", flush=True)
        return False, f"torch has CUDA {torch_cuda} but {why}", None
    tag = "LANDSCAPE_EXT_CUDA=1" if override == "1" else f"torch has CUDA {torch_cuda}"
    return True, f"{tag}, {why}", home


def arch_list(build_cuda):
    if not build_cuda:
        return ""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not arch:
        if torch.cuda.is_available():
            # cpp_extension detects the visible card's arch itself; record what it will use
            caps = sorted({torch.cuda.get_device_capability(i)
                           for i in range(torch.cuda.device_count())})
            arch = ";".join(f"{a}.{b}" for a, b in caps)
        else:
            arch = DEFAULT_ARCH_LIST
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    return arch


def write_build_facts(build_cuda, arch):
    """landscape_ext/_build_facts.py: what this build was made with, readable by the import-error
    message even when the compiled module cannot be loaded."""
    text = (
        '"""Written by setup.py at build time (not in git): what landscape_ext._C was built '
        'with."""\n'
        f"BUILT_TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_TARGET = {TORCH_TARGET!r}\n"
        f"CUDA_KERNELS = {build_cuda!r}\n"
        f"BUILT_CUDA_VERSION = {(torch.version.cuda if build_cuda else None)!r}\n"
        f"CUDA_ARCH_LIST = {arch!r}\n")
    with open(os.path.join(ROOT, "landscape_ext", "_build_facts.py"), "w") as f:
        f.write(text)


def make_extension():
    build_cuda, reason, _ = decide_cuda()
    # imported only now: cpp_extension reads CUDA_HOME when it is imported
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    arch = arch_list(build_cuda)
    write_build_facts(build_cuda, arch)
    print(f"landscape-ext build: CUDA={build_cuda} ({reason}) TORCH_CUDA_ARCH_LIST={arch or '-'} "
          f"torch {torch.__version__} (stable ABI target {TORCH_TARGET[0]}.{TORCH_TARGET[1]})",
          flush=True)

    sources = ["csrc/module.cpp", "csrc/registration.cpp"]
    sources += sorted(glob.glob("csrc/*_common.cpp"))
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    macros = [
        ("TORCH_TARGET_VERSION", TORCH_TARGET_VERSION),
        ("LANDSCAPE_EXT_BUILT_TORCH_VERSION", f'"{torch.__version__}"'),
        ("LANDSCAPE_EXT_TORCH_TARGET", f'"{TORCH_TARGET[0]}.{TORCH_TARGET[1]}"'),
        ("LANDSCAPE_EXT_CUDA_ARCH_LIST", f'"{arch}"'),
    ]
    cxx_flags = ["-O3", "-Wno-psabi"]
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], py_limited_api=True)
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros += [("LANDSCAPE_EXT_WITH_CUDA", "1"), ("USE_CUDA", None),
                   ("LANDSCAPE_EXT_BUILT_CUDA", f'"{torch.version.cuda}"')]
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        return CUDAExtension("landscape_ext._C", sources, define_macros=macros,
                             extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **common)
    return CppExtension("landscape_ext._C", sources, define_macros=macros,
                        extra_compile_args={"cxx": cxx_flags}, **common)


def packages():
    """Every package and subpackage of both trees (a wheel with only the two roots could not
    import landscape_ext.operators, landscape_lab.sweep, ...)."""
    engine = find_packages(include=["landscape_ext", "landscape_ext.*"])
    lab = find_packages(where="python", include=["landscape_lab", "landscape_lab.*"])
    return engine + lab


def build_ext_class():
    """torch's BuildExtension (ninja). With LANDSCAPE_EXT_BUILD_DIR set, the object files and
    build.ninja live there instead of pip's throw-away folder, so a rebuild compiles only what
    changed (scripts/setup_env.sh sets it to build/ext-<torch>)."""
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            persistent = os.environ.get("LANDSCAPE_EXT_BUILD_DIR", "").strip()
            if persistent:
                self.build_temp = os.path.abspath(persistent)

        def run(self):
            # A module of a build from before the stable ABI (_C.cpython-3XX-*.so) left in the
            # checkout or in build/lib* would shadow _C.abi3.so (Python tries the
            # version-tagged suffix first) or be packed into wheels beside it.
            for folder in (ROOT, self.build_lib):
                for stale in glob.glob(os.path.join(folder, "landscape_ext", "_C.cpython-*.so")):
                    print(f"landscape-ext build: removing the stale {stale}", flush=True)
                    os.remove(stale)
            super().run()

    return BuildExt


setup(
    packages=packages(),
    package_dir={"landscape_ext": "landscape_ext", "landscape_lab": "python/landscape_lab"},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": build_ext_class()},
    # abi3: the module uses CPython's limited API only (csrc/module.cpp)
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
