"""Loading the compiled library ``landscape_ext._C`` and reporting how it was built."""
from __future__ import annotations

import importlib
from typing import Any, Dict

import torch

_REBUILD = (
    "Rebuild it against the torch installed now ({torch}): from the source checkout run\n"
    "    pip install --no-build-isolation -e .\n"
    "(or `python setup.py build_ext --inplace`), or reinstall a landscape-ext wheel built for "
    "this torch."
)

_OPS = ("block_orthonormalize", "orthogonalize_batched")
_OPS += ("linear_grad_sketch", "linear_grad_project")  # sketch family
_OPS += ("xent_hvp", "act_derivs")  # hvp family


def load_extension():
    """Import ``landscape_ext._C`` (which registers the ops) or raise an ImportError saying how
    to rebuild: when the library is missing, fails to load (ABI mismatch), or was compiled
    for another torch version."""
    rebuild = _REBUILD.format(torch=torch.__version__)
    try:
        ext = importlib.import_module("landscape_ext._C")
    except ImportError as err:
        raise ImportError(
            f"landscape_ext: the compiled extension landscape_ext._C could not be loaded "
            f"({err}).\n{rebuild}") from err
    built = ext.build_info()["built_torch_version"]
    if built != torch.__version__:
        raise ImportError(
            f"landscape_ext: landscape_ext._C was built for torch {built} but torch "
            f"{torch.__version__} is installed.\n{rebuild}")
    return ext


def build_info() -> Dict[str, Any]:
    """How the extension was built and what it can run here.

    Returns
    -------
    dict
        ``torch_version`` (installed), ``built_torch_version``, ``cuda_kernels`` (CUDA kernels
        compiled in), ``cuda_arch_list`` (the ``TORCH_CUDA_ARCH_LIST`` they were built for),
        ``cuda_available`` (a GPU is usable now), ``cpu_multiversioning`` (how the CPU
        kernels pick an instruction set), ``cpu_isa_level`` (the x86-64 level this CPU selects:
        ``x86-64-v4`` runs the AVX-512 clones, ``x86-64-v3`` the AVX2 ones) and ``kernels``: for
        each op, the dispatch keys that have a kernel registered.
    """
    from . import _C

    info = dict(_C.build_info())
    info["torch_version"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    kernels = {}
    for op in _OPS:
        name = f"landscape_ext::{op}"
        kernels[op] = [key for key in ("CPU", "CUDA")
                       if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)]
    info["kernels"] = kernels
    return info
