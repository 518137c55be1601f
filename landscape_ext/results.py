"""Result dataclasses of the curvature engine and the one JSON writer/reader of the project.

Every algorithm of :mod:`landscape_ext` (and of the science layer :mod:`landscape_lab`) returns a
small dataclass derived from :class:`Result`. It prints as a short summary (scalars in full,
arrays by shape and first values), converts to a dict of JSON-serialisable builtins
(:meth:`Result.to_dict`) and to JSON (:meth:`Result.to_json`), and carries the seed and the work
done (``n_matvecs``, ``time_s``). Fields whose metadata has ``export=False`` (e.g. large
eigenvector blocks) are left out of ``to_dict()``; they are summarised by shape instead.

Files: :func:`json_clean` (strict JSON: non-finite floats become ``null``),
:func:`write_text_atomic` / :func:`write_json_atomic` (temporary file + rename: a reader never sees
half a file), :class:`JsonlWriter` (appends one JSON object per line, optionally under an
exclusive ``flock`` shared by several processes) and :func:`read_jsonl` (skips a line cut by a
crash, with a warning).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np
import torch

__all__ = ["Result", "to_builtin", "format_float", "json_clean", "write_text_atomic",
           "write_json_atomic", "JsonlWriter", "read_jsonl", "parse_jsonl", "file_lock",
           "PathLike"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


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
    """Base of the result dataclasses of the engine and the science layer.

    Subclasses are ``@dataclasses.dataclass``; fields with ``metadata={"export": False}`` are
    left out of :meth:`to_dict` (they are listed by shape in the printout).
    """

    #: ``to_dict()`` starts with ``"type": <class name>`` (the science layer's results, whose
    #: dicts never had it, set this to False)
    _dict_has_type = True

    def to_dict(self) -> dict:
        """The result as a dict of JSON-serialisable builtins (floats, ints, lists, None)."""
        out: dict = {"type": type(self).__name__} if self._dict_has_type else {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.metadata.get("export", True):
                continue
            out[f.name] = to_builtin(getattr(self, f.name))
        return out

    def to_json(self, **kwargs: Any) -> str:
        """``json.dumps(self.to_dict(), **kwargs)``."""
        return json.dumps(self.to_dict(), **kwargs)

    def save(self, path: PathLike, *, all_ranks: bool = False, **kwargs: Any) -> Optional[Path]:
        """Write :meth:`to_json` to ``path`` (parents created; atomically, see
        :func:`write_text_atomic`). In a :mod:`torch.distributed` run
        only rank 0 writes (every rank holds the same result of a ``process_group=`` call); the
        others return ``None``. ``all_ranks=True`` writes on every rank (results computed per
        rank, without a process group: give each rank its own ``path``)."""
        from .distributed import is_main_process
        if not all_ranks and not is_main_process():
            return None
        kwargs.setdefault("indent", 1)
        return write_text_atomic(path, self.to_json(**kwargs) + "\n")

    def __str__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            lines.append(f"  {f.name}={_fmt_value(getattr(self, f.name))},")
        lines.append(")")
        return "\n".join(lines)

    __repr__ = __str__


# ------------------------------------------------------------------------------------------------
# JSON files: strict JSON, atomic whole files, JSON lines
# ------------------------------------------------------------------------------------------------


def json_clean(obj: Any) -> Any:
    """``obj`` as JSON builtins (:func:`to_builtin`: tensors/arrays to lists) with non-finite
    floats as ``None``, so that every file written from it is strict JSON."""
    def finite(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, list):
            return [finite(v) for v in x]
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        return x

    return finite(to_builtin(obj))


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same directory and a
    rename (parents created): a reader, or another process finishing at the same time, never
    sees a half-written file. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and thread: two writers of the same file never share a temporary file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json_atomic(path: PathLike, obj: Any, indent: Optional[int] = 2) -> Path:
    """:func:`write_text_atomic` of ``obj`` as strict JSON (:func:`json_clean`)."""
    return write_text_atomic(path, json.dumps(json_clean(obj), indent=indent, allow_nan=False))


@contextlib.contextmanager
def file_lock(f: Any, shared: bool = False) -> Iterator[None]:
    """Blocking ``flock`` of an open file, exclusive or ``shared`` (POSIX; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)


def parse_jsonl(data: Union[bytes, str], source: Any = "<jsonl>", warn: bool = True,
                numbered: bool = False) -> List[Any]:
    """The values of the JSON lines in ``data``; blank lines are ignored and a line that does
    not parse (cut by a crash) is skipped, with a warning naming ``source`` and the line unless
    ``warn`` is False. ``numbered``: ``(line number, value)`` pairs (from 1), so that a caller
    can name the line of a value it rejects."""
    if isinstance(data, bytes):
        # a line cut inside a multi-byte character must not stop the reader
        data = data.decode("utf-8", errors="replace")
    out = []
    # split on "\n" only: a JSON string may hold other line separators (U+2028, ...)
    for i, line in enumerate(data.split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            if warn:
                log.warning("%s:%d: skipping a line that is not valid JSON (interrupted write?)",
                            source, i)
            continue
        out.append((i, value) if numbered else value)
    return out


def read_jsonl(path: PathLike, *, locked: bool = False, warn: bool = True,
               numbered: bool = False) -> List[Any]:
    """Records of a JSON-lines file (see :func:`parse_jsonl`; ``numbered``: ``(line number,
    record)`` pairs). ``locked``: read under a shared ``flock``, so a line that a
    :class:`JsonlWriter` with ``locked=True`` is appending is never seen half-written."""
    with open(path, "rb") as f:
        with file_lock(f, shared=True) if locked else contextlib.nullcontext():
            data = f.read()
    return parse_jsonl(data, path, warn, numbered)


class JsonlWriter:
    """Appends JSON objects as lines to ``path`` (parents created; ``path=None``: a no-op
    writer). Each record goes through :func:`json_clean` and is written at once (no buffer);
    a file that ends in a line cut by a crash gets a newline first, so that line is not
    extended.

    ``locked=True``: for a file that several processes append to. Each line is written under
    an exclusive ``flock`` of the file (write, ``fsync``, unlock), so concurrent writers never
    interleave or tear lines; read it with :func:`read_jsonl` ``(locked=True)``.
    """

    def __init__(self, path: Optional[PathLike], *, locked: bool = False):
        self.path = Path(path) if path is not None else None
        self.locked = locked
        self._f = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # unbuffered, O_APPEND: every write goes to the current end of the file
            self._f = open(self.path, "a+b", buffering=0)

    def write(self, record: Dict[str, Any], read_back: bool = False
              ) -> Optional[List[Any]]:
        """Append ``record``; with ``read_back``, also return every record of the file, read
        under the same lock (so no other process's line falls between the two)."""
        f = self._f
        if f is None:
            return None
        line = (json.dumps(json_clean(record), allow_nan=False) + "\n").encode("utf-8")
        with file_lock(f) if self.locked else contextlib.nullcontext():
            size = os.fstat(f.fileno()).st_size
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line   # the file ends in a torn line: do not extend it
            view = memoryview(line)
            while view:
                view = view[f.write(view):]
            if self.locked:
                os.fsync(f.fileno())
            if read_back:
                f.seek(0)
                return parse_jsonl(f.read(), self.path, warn=False)
        return None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
