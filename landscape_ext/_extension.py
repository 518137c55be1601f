"""Loading the compiled library ``landscape_ext._C``, reporting how it was built, and the facts
the Python side reads from it (op names, activation codes) instead of writing them again."""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Tuple

import torch

_REBUILD = (
    "Rebuild it against the torch installed now ({torch}): from the source checkout run\n"
    "    pip install --no-build-isolation -e .\n"
    "(or `python setup.py build_ext --inplace`), or reinstall a landscape-ext wheel built for "
    "this torch."
)

_NAMESPACE = "landscape_ext::"


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


def op_names(internal: bool = False) -> Tuple[str, ...]:
    """Names of the ops of the ``landscape_ext`` namespace, sorted: the schemas that
    ``csrc/registration.cpp`` defined, read from torch's dispatcher. The internal ops (names
    starting with ``_``: the krylov passes, the argument checks) only with ``internal=True``."""
    names = (name[len(_NAMESPACE):] for name in torch._C._dispatch_get_all_op_names()
             if name.startswith(_NAMESPACE))
    return tuple(sorted(n for n in names if internal or not n.startswith("_")))


def registered_kernels() -> Dict[str, List[str]]:
    """For each op, the dispatch keys (``"CPU"``, ``"CUDA"``) that have a kernel registered."""
    return {op: [key for key in ("CPU", "CUDA")
                 if torch._C._dispatch_has_kernel_for_dispatch_key(_NAMESPACE + op, key)]
            for op in op_names()}


def activation_codes() -> Dict[str, int]:
    """``{name: code}`` of the activations of ``act_derivs``, from the table in ``csrc/hvp.h``."""
    from . import _C

    return {str(name): int(code) for name, code in _C.activations().items()}


def build_info() -> Dict[str, Any]:
    """How the extension was built and what it can run here.

    Returns
    -------
    dict
        ``torch_version`` (installed), ``built_torch_version``, ``cuda_kernels`` (CUDA kernels
        compiled in), ``cuda_arch_list`` (the ``TORCH_CUDA_ARCH_LIST`` they were built for),
        ``cuda_available`` (a GPU is usable now), ``cpu_multiversioning`` (how the CPU
        kernels pick an instruction set), ``cpu_isa_level`` (the x86-64 level this CPU selects:
        ``x86-64-v4`` runs the AVX-512 clones, ``x86-64-v3`` the AVX2 ones),
        ``sketch_isa_level`` (the level whose variant of the CPU sketch kernel runs) and
        ``kernels``: for each op, the dispatch keys that have a kernel registered.
    """
    from . import _C

    info = dict(_C.build_info())
    info["torch_version"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["kernels"] = registered_kernels()
    return info
