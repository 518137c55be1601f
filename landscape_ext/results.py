"""Result dataclasses of the curvature engine: readable printing, ``to_dict()`` and ``to_json()``.

Every algorithm of :mod:`landscape_ext` returns a small dataclass derived from :class:`Result`.
It prints as a short summary (scalars in full, arrays by shape and first values), converts to a
dict of JSON-serialisable builtins (:meth:`Result.to_dict`) and to JSON (:meth:`Result.to_json`),
and carries the seed and the work done (``n_matvecs``, ``time_s``).

Fields whose metadata has ``export=False`` (e.g. large eigenvector blocks) are left out of
``to_dict()``; they are summarised by shape instead.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["Result", "to_builtin", "format_float"]


def to_builtin(obj: Any) -> Any:
    """Convert ``obj`` recursively to JSON-serialisable Python builtins.

    Tensors and numpy arrays become nested lists, scalars become Python scalars, dataclasses and
    objects with ``to_dict`` become dicts, tuples become lists, ``torch.dtype``/``device`` strings.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return to_builtin(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return to_builtin(obj.detach().cpu().tolist())
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_builtin(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_builtin(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_builtin(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # other array scalars
        try:
            return to_builtin(obj.item())
        except (TypeError, ValueError):
            pass
    return repr(obj)


def format_float(x: Any, digits: int = 6, exp_digits: int = 4) -> str:
    """Short human-readable float: ``digits`` significant digits, scientific notation with
    ``exp_digits`` decimals outside ``[1e-3, 1e5)``; ``None`` -> ``'n/a'``."""
    if x is None:
        return "n/a"
    x = float(x)
    if x == 0.0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    ax = abs(x)
    if ax >= 1e5 or ax < 1e-3:
        return f"{x:.{exp_digits}e}"
    return f"{x:.{digits}g}"


def _fmt_float(x: float) -> str:
    return format_float(x, 6, 4)


def _fmt_value(v: Any, max_items: int = 6) -> str:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        if v.numel() == 1 and v.dim() == 0:
            return _fmt_value(v.item())
        if v.dim() == 1 and v.numel() <= max_items * 2:
            return "[" + ", ".join(_fmt_value(x) for x in v.tolist()) + "]"
        head = v.reshape(-1)[:max_items].tolist()
        return (f"tensor(shape={tuple(v.shape)}, dtype={str(v.dtype).replace('torch.', '')}, "
                f"first=[{', '.join(_fmt_value(x) for x in head)}, ...])")
    if isinstance(v, np.ndarray):
        return _fmt_value(torch.from_numpy(np.ascontiguousarray(v)), max_items)
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return _fmt_float(v)
    if isinstance(v, (list, tuple)) and len(v) > max_items * 2:
        return f"[{', '.join(_fmt_value(x) for x in v[:max_items])}, ... ({len(v)} items)]"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return str(v)


class Result:
    """Base of the engine's result dataclasses.

    Subclasses are ``@dataclasses.dataclass``; fields with ``metadata={"export": False}`` are
    left out of :meth:`to_dict` (they are listed by shape in the printout).
    """

    def to_dict(self) -> dict:
        """The result as a dict of JSON-serialisable builtins (floats, ints, lists, None)."""
        out: dict = {"type": type(self).__name__}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.metadata.get("export", True):
                continue
            out[f.name] = to_builtin(getattr(self, f.name))
        return out

    def to_json(self, **kwargs: Any) -> str:
        """``json.dumps(self.to_dict(), **kwargs)``."""
        return json.dumps(self.to_dict(), **kwargs)

    def save(self, path: Any, *, all_ranks: bool = False, **kwargs: Any) -> Optional[Path]:
        """Write :meth:`to_json` to ``path`` (parents created). In a :mod:`torch.distributed` run
        only rank 0 writes (every rank holds the same result of a ``process_group=`` call); the
        others return ``None``. ``all_ranks=True`` writes on every rank (results computed per
        rank, without a process group: give each rank its own ``path``)."""
        from .distributed import is_main_process
        if not all_ranks and not is_main_process():
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("indent", 1)
        path.write_text(self.to_json(**kwargs) + "\n")
        return path

    def __str__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            lines.append(f"  {f.name}={_fmt_value(getattr(self, f.name))},")
        lines.append(")")
        return "\n".join(lines)

    __repr__ = __str__
