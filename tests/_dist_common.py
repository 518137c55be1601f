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
