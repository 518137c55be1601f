"""Shared pieces of the two-process (gloo) tests: the tiny float64 model, its data, the
uneven split between rank 0 and rank 1, and how a worker reports an expected error. Imported by the spawned workers too (the tests folder is
on their ``sys.path``, inherited from the parent)."""
from __future__ import annotations

import torch
from torch import nn

N, D_IN, C = 100, 5, 3
SPLIT = 70  # rank 0 holds samples [0, 70) in several batches, rank 1 [70, 100) in one


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, C)).double()


def tiny_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return x, y


def uneven_shard(rank: int, batch: int):
    """Rank 0: ``[0, SPLIT)`` in batches of ``batch``; rank 1: ``[SPLIT, N)`` in one batch."""
    x, y = tiny_data()
    if rank == 0:
        return [(x[s:min(s + batch, SPLIT)], y[s:min(s + batch, SPLIT)])
                for s in range(0, SPLIT, batch)]
    return [(x[SPLIT:], y[SPLIT:])]


def error_text(fn):
    """``"Type: message"`` of the exception ``fn()`` raises (None if it returns): workers send
    this to the parent, which compares it."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - compared by the parent
        return f"{type(exc).__name__}: {exc}"
    return None


def init_gloo(rank: int, world: int, tmp: str):
    """Join the file-initialised gloo group of a spawned test pair (one thread per rank)."""
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    return dist


def run_rank(rank: int, world: int, tmp: str, body) -> None:
    """A spawned rank's life: join the group, run ``body(dist)``, write the text of an error it
    raised to ``error<rank>.txt`` for the parent (which compares it), leave the group."""
    import traceback
    from pathlib import Path

    dist = init_gloo(rank, world, tmp)
    try:
        body(dist)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        (Path(tmp) / f"error{rank}.txt").write_text(
            f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def spawn_ranks(tmp_path, worker, scenario: str, world: int = 2, timeout: float = 150.0):
    """Run ``worker(rank, world, tmp, scenario)`` in ``world`` spawned processes; fail the test
    if one hangs. Returns ``{rank: text of its error file, or None}``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, str(tmp_path), scenario))
             for r in range(world)]
    for p in procs:
        p.start()
    hung = []
    for r, p in enumerate(procs):
        p.join(timeout)
        if p.is_alive():
            hung.append(r)
            p.kill()
            p.join()
    assert not hung, f"rank(s) {hung} hung in scenario {scenario!r}"
    return {r: (tmp_path / f"error{r}.txt").read_text() if (tmp_path / f"error{r}.txt").exists()
            else None for r in range(world)}
