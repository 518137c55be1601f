"""Small helpers shared by the fit and barrier modules of :mod:`landscape_lab`.

* :class:`ResultMixin` gives the result dataclasses ``to_dict()`` (JSON-serialisable: plain
  floats, ints, strings, lists, dicts and ``None``) and ``to_json()``.
* ``as_float_array`` / ``as_float`` convert user input (lists, numpy arrays, torch tensors,
  Python or numpy scalars) to float64 numpy values and reject NaN/Inf with a message that names
  the calling function, the argument and the offending index.

Nothing here is public API; the result classes built on it are.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# one converter for the engine's and the science layer's results
from landscape_ext.results import format_float as _format_float
from landscape_ext.results import to_builtin

__all__ = ["ResultMixin", "to_builtin", "as_float_array", "as_float", "format_float"]


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "cpu")


class ResultMixin:
    """Mixin for result dataclasses: ``to_dict()`` and ``to_json()``.

    Fields whose metadata has ``export=False`` (large internal arrays such as bootstrap draws)
    are left out of ``to_dict()``.
    """

    def to_dict(self) -> dict:
        """The result as a dict of JSON-serialisable builtins (floats, lists, None)."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.metadata.get("export", True):
                continue
            out[f.name] = to_builtin(getattr(self, f.name))
        return out

    def to_json(self, **kwargs: Any) -> str:
        """``json.dumps(self.to_dict(), **kwargs)``."""
        return json.dumps(self.to_dict(), **kwargs)


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
