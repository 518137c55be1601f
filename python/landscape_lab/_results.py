"""Small helpers shared by the fit and barrier modules of :mod:`landscape_lab`.

* :class:`ResultMixin` is the engine's :class:`landscape_ext.results.Result` (``to_dict()``,
  ``to_json()``, ``save()``) for the science layer's result dataclasses, whose dicts carry no
  ``"type"`` key.
* ``as_float_array`` / ``as_float`` convert user input (lists, numpy arrays, torch tensors,
  Python or numpy scalars) to float64 numpy values and reject NaN/Inf with a message that names
  the calling function, the argument and the offending index.
* ``PathLike``: the type of a path argument (``str`` or ``os.PathLike``); ``json_clean``,
  ``JsonlWriter``, ``read_jsonl``: the engine's JSON writer/reader (:mod:`landscape_ext.results`),
  re-exported for the science layer.

Nothing here is public API; the result classes built on it are.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

# one result base, one converter, one JSON writer/reader and one path type for the engine and
# the science layer
from landscape_ext.results import JsonlWriter, PathLike, Result, json_clean, read_jsonl, to_builtin
from landscape_ext.results import format_float as _format_float

__all__ = ["ResultMixin", "to_builtin", "as_float_array", "as_float", "format_float",
           "PathLike", "JsonlWriter", "json_clean", "read_jsonl"]


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "cpu")


class ResultMixin(Result):
    """:class:`~landscape_ext.results.Result` without the ``"type"`` key in ``to_dict()`` (the
    science layer's dicts never had it). Subclasses define their own ``__str__``; their
    ``__repr__`` is the dataclass one."""

    _dict_has_type = False


def format_float(x: Any, digits: int = 4) -> str:
    """Short human-readable float (``None`` -> ``'n/a'``)."""
    return _format_float(x, digits, digits - 1)


def as_float_array(
    x: Any, name: str, func: str, *, ndim: int | None = 1, min_size: int = 0
) -> np.ndarray:
    """Convert ``x`` (list, numpy array, torch tensor, scalar) to a float64 numpy array.

    Parameters
    ----------
    x : array-like
        The input.
    name, func : str
        Argument and function names used in error messages.
    ndim : int or None
        Required number of dimensions (``None``: any). A 0-d input is accepted for
        ``ndim=1`` only if ``min_size <= 1`` and becomes shape ``(1,)``.
    min_size : int
        Minimum number of elements.

    Raises
    ------
    ValueError
        Wrong shape, too few elements, non-numeric input, or NaN/Inf entries (the message gives
        the count and the first index).
    """
    if _is_torch_tensor(x):
        x = x.detach().cpu()
        if x.is_complex():
            raise ValueError(f"{func}: {name} must be real, got a complex tensor")
        x = x.double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{func}: {name} must be numeric array-like, got {type(x).__name__}") from exc
    if ndim is not None:
        if ndim == 1 and arr.ndim == 0 and min_size <= 1:
            arr = arr.reshape(1)
        if arr.ndim != ndim:
            raise ValueError(f"{func}: {name} must be {ndim}-D, got shape {tuple(arr.shape)}")
    if arr.size < min_size:
        raise ValueError(f"{func}: {name} needs at least {min_size} values, got {arr.size}")
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.argwhere(bad)[0]
        where = int(idx[0]) if idx.size == 1 else tuple(int(i) for i in idx)
        raise ValueError(
            f"{func}: {name} contains {int(bad.sum())} non-finite value(s) "
            f"(first at index {where}: {arr[tuple(idx)]})"
        )
    return arr


def as_float(x: Any, name: str, func: str) -> float:
    """Convert a scalar (Python, numpy, 0-d or 1-element tensor) to a finite float."""
    if _is_torch_tensor(x):
        if x.numel() != 1:
            raise ValueError(f"{func}: {name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        x = x.detach().cpu().double().item()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{func}: {name} must be a number, got {type(x).__name__}") from exc
    if arr.size != 1:
        raise ValueError(f"{func}: {name} must be a scalar, got shape {tuple(arr.shape)}")
    val = float(arr.reshape(()))
    if not math.isfinite(val):
        raise ValueError(f"{func}: {name} must be finite, got {val}")
    return val
