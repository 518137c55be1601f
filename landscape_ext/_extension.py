"""Loading the compiled library ``landscape_ext._C``, reporting how it was built, and the facts
the Python side reads from it (op names, activation codes) instead of writing them again."""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Tuple

import torch

_REBUILD = (
    "Reinstall a landscape-ext wheel, or rebuild from the source checkout against the torch "
    "installed now:\n    pip install --no-build-isolation -e ."
)

_NAMESPACE = "landscape_ext::"


def _built_with() -> Tuple[str, Tuple[int, int]]:
    """(torch version the library was built with, oldest torch its stable ABI targets), from
    landscape_ext/_build_facts.py, written by setup.py; readable when _C itself is not."""
    try:
        from . import _build_facts
    except ImportError:
        return "unknown (no landscape_ext/_build_facts.py: the extension was never built here)", (2, 10)
    return _build_facts.BUILT_TORCH_VERSION, tuple(_build_facts.TORCH_TARGET)


def _torch_release() -> Tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def load_extension():
    """Import ``landscape_ext._C`` (which registers the ops) or raise an ImportError that names
    the torch it was built with, the torch installed and what to do: when the library is
    missing or fails to load, or when the installed torch is older than the oldest release whose
    stable ABI the library uses (any newer torch works: one wheel serves them all)."""
    built, target = _built_with()
    runtime = torch.__version__
    if _torch_release() < target:
        raise ImportError(
            f"landscape_ext: the compiled extension needs torch >= {target[0]}.{target[1]} (it "
            f"uses torch's stable ABI from that release on; built with torch {built}) but torch "
            f"{runtime} is installed. Upgrade torch: pip install 'torch>={target[0]}.{target[1]}'")
    try:
        return importlib.import_module("landscape_ext._C")
    except ImportError as err:
        raise ImportError(
            f"landscape_ext: the compiled extension landscape_ext._C could not be loaded ({err}). "
            f"It was built with torch {built} for torch >= {target[0]}.{target[1]}; torch "
            f"{runtime} is installed.\n{_REBUILD}") from err


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
