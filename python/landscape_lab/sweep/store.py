"""The files of a sweep's output directory: the results file every shard appends to (one JSON
line at a time under a file lock), the shard locks, ``sweep_config.json`` (see docs/sweep.md)."""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from landscape_ext.results import JsonlWriter, read_jsonl, write_json_atomic

from .._results import PathLike
from .config import SweepConfig
from .sharding import ShardBusyError

__all__ = ["results_path", "load_results"]


def results_path(out_dir: PathLike, shard: Tuple[int, int] = (0, 1)) -> Path:
    """The results file of ``out_dir``: ``results.jsonl``, shared by every shard (``shard`` is
    kept for compatibility and does not change the name)."""
    return Path(out_dir) / "results.jsonl"


def load_results(out_dir: PathLike) -> List[Dict[str, Any]]:
    """All records of ``out_dir``: the legacy per-shard files ``results.shard*.jsonl`` of older
    versions first, then ``results.jsonl`` (read under a shared lock, so a line being appended is
    never seen half-written). Lines that do not parse (cut by a crash) are skipped with a
    warning."""
    return [r for _, r in _located_results(out_dir)]


def _located_results(out_dir: PathLike) -> List[Tuple[str, Dict[str, Any]]]:
    """``(where, record)`` of :func:`load_results`' records: ``where`` is ``"file:line"``, for
    a reader that rejects a record to name it."""
    out = Path(out_dir)
    main = results_path(out)
    recs = [x for p in _legacy_paths(out) for x in _located(p)]
    if main.exists():
        recs.extend(_located(main, locked=True))
    return recs


def _located(path: Path, locked: bool = False) -> List[Tuple[str, Dict[str, Any]]]:
    return [(f"{path}:{i}", r) for i, r in read_jsonl(path, locked=locked, numbered=True)
            if isinstance(r, dict)]


def _legacy_paths(out: Path) -> List[Path]:
    """The per-shard results files of older versions (``results.shard*.jsonl``)."""
    main = results_path(out)
    return [p for p in sorted(out.glob("results*.jsonl")) if p != main]


def _legacy_results(out: Path) -> List[Dict[str, Any]]:
    """Records of the per-shard files of older versions (``results.shard*.jsonl``)."""
    return [r for p in _legacy_paths(out) for _, r in _located(p)]


def _results_writer(path: PathLike) -> JsonlWriter:
    """The writer every shard appends to the shared results file with: one line at a time under
    an exclusive ``flock`` of the file (write, ``fsync``, unlock); ``write(record,
    read_back=True)`` also returns every record of the file, read under the same lock."""
    return JsonlWriter(path, locked=True)


def _shard_lock_path(out_dir: PathLike, shard: Tuple[int, int]) -> Path:
    return Path(out_dir) / f".shard{shard[0]}of{shard[1]}.lock"


@contextlib.contextmanager
def _exclusive(path: Path, what: Optional[str] = None) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path.lock`` (POSIX; a no-op elsewhere);
    :class:`ShardBusyError` if another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock = path if path.suffix == ".lock" else path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ShardBusyError(f"{what or path} is in use by another process (lock {lock}); "
                                 f"each shard must run once at a time") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_sweep_config(out: Path, cfg: SweepConfig, chash: str, n_cells: int) -> None:
    """``sweep_config.json`` (written atomically: shards starting at once never leave half a
    file); its ``config_hash`` selects the records :func:`fit_sweep` uses."""
    write_json_atomic(out / "sweep_config.json",
                      {"config": asdict(cfg), "config_hash": chash, "n_cells": n_cells})


def _config_hash(out: Path) -> Optional[str]:
    """The ``config_hash`` of ``out/sweep_config.json``, None without that file."""
    cfg_file = out / "sweep_config.json"
    if not cfg_file.exists():
        return None
    return json.loads(cfg_file.read_text()).get("config_hash")
