"""Which cells a process runs: shard ``i`` of ``N`` from ``--shard``, ``torch.distributed``,
``torchrun`` or a Slurm job array; the barrier of the ranks at the end (see docs/sweep.md)."""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

__all__ = ["parse_shard", "ShardBusyError"]


class ShardBusyError(RuntimeError):
    """This shard of this output directory is already running in another process."""


def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    """The shard ``(i, N)`` (``0 <= i < N``) a process runs.

    ``"i/N"``: explicit. ``"slurm"``: from a Slurm job array (an error outside one). ``"auto"``:
    from an initialized ``torch.distributed`` (rank, world size), else the ``RANK``/``WORLD_SIZE``
    variables ``torchrun`` sets, else a Slurm job array, else ``(0, 1)``. ``None`` or ``""``:
    like ``"auto"`` without the Slurm array (a job array may index something else than shards).
    """
    if text is None or text == "":
        return _shard_from_env(slurm=False)
    if text == "auto":
        return _shard_from_env(slurm=True)
    if text == "slurm":
        s = _slurm_shard()
        if s is None:
            raise ValueError("--shard slurm: SLURM_ARRAY_TASK_ID is not set (not a job array)")
        return s
    try:
        a, b = text.split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise ValueError(f"shard must look like 'i/N' (e.g. 0/4), 'auto' or 'slurm'; got "
                         f"{text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need N >= 1 and 0 <= i < N")
    return i, n


def _resolve_shard(shard: Union[Tuple[int, int], str, None]) -> Tuple[int, int]:
    """The ``shard`` argument of :func:`~landscape_lab.sweep.run_sweep` as a checked ``(i, N)``
    (a string or None goes through :func:`parse_shard`)."""
    if shard is None or isinstance(shard, str):
        shard = parse_shard(shard)
    i, n = int(shard[0]), int(shard[1])
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {(i, n)}: need N >= 1 and 0 <= i < N")
    return i, n


def _rank_sync(error: Optional[BaseException]) -> None:
    """Barrier of the torch.distributed ranks that also propagates failures: if any rank's cells
    raised, every rank raises (that rank its own error, the others a ``RankFailure`` naming it)
    instead of the healthy ranks waiting at the barrier for ever."""
    import torch.distributed as dist
    from landscape_ext.distributed import exchange_status
    exchange_status(dist.group.WORLD, error, (), "in the sweep")


def _dist_shard() -> Optional[Tuple[int, int]]:
    """(rank, world size) of an initialized ``torch.distributed`` process group, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return None


def _shard_from_env(slurm: bool) -> Tuple[int, int]:
    s = _dist_shard()
    if s is not None:
        return s
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        try:
            return parse_shard(f"{int(env['RANK'])}/{int(env['WORLD_SIZE'])}")
        except ValueError as e:
            raise ValueError(f"shard from RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r}: "
                             f"{e}") from None
    if slurm:
        s = _slurm_shard()
        if s is not None:
            return s
    return 0, 1


def _slurm_shard() -> Optional[Tuple[int, int]]:
    """``(i, N)`` of a Slurm job-array task (``--array=MIN-MAX[:STEP]``), None outside one."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    try:
        tid = int(env["SLURM_ARRAY_TASK_ID"])
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = max(int(env.get("SLURM_ARRAY_TASK_STEP", "1")), 1)
        if "SLURM_ARRAY_TASK_COUNT" in env:
            n = int(env["SLURM_ARRAY_TASK_COUNT"])
        elif "SLURM_ARRAY_TASK_MAX" in env:
            n = (int(env["SLURM_ARRAY_TASK_MAX"]) - lo) // step + 1
        else:
            raise ValueError("neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX is set")
    except ValueError as e:
        raise ValueError(f"--shard from a Slurm job array: {e}") from None
    i, r = divmod(tid - lo, step)
    if r or not 0 <= i < n:
        raise ValueError(f"--shard from a Slurm job array: task {tid} is not one of {n} tasks "
                         f"{lo}, {lo + step}, ...; use a range array (--array=0-{n - 1}) or "
                         f"--shard i/N")
    return i, n
