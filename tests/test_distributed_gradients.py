"""Data-parallel gradient-covariance SVD on torch.distributed: two CPU processes (gloo) spawned
once by a module fixture.

The ranks hold an uneven split of the samples (70 in three batches on rank 0, 30 in one on rank
1); every method, centred and uncentred, must give the singular values of all 100 samples
(against torch.linalg.svdvals of the materialized per-sample gradients and against the
single-process call), the exact mean gradient and trace, identical results on both ranks and
each rank's rows of the left singular vectors. Then a rank that raises (or meets a NaN) at
different points must make both ranks raise instead of hanging.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import landscape_ext  # noqa: F401  (loads the ops)
from landscape_ext.gradients import gradient_covariance_svd, per_sample_gradients

from _dist_common import N, SPLIT, error_text, run_rank, tiny_data, tiny_model, uneven_shard

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

K = 40                          # d = 57, rank(G) <= 50 (CE: the logit gradients sum to zero)
CE = nn.CrossEntropyLoss(reduction="none")
# (method, centered): exact methods and randomized ones with l = d (the range of G is captured
# exactly, so they are exact too)
RUNS = [(m, c) for m in ("kronecker", "jvp", "gram", "materialize", "auto") for c in (True, False)]


_model, _data = tiny_model, tiny_data


def _shard(rank: int):
    return uneven_shard(rank, 25)  # rank 0 in batches of 25


def _svd(model, data, method, centered, **kw):
    return gradient_covariance_svd(model, CE, data, K, method=method, centered=centered,
                                   oversample=30, n_power_iter=1, seed=3, **kw)


def _keep(res):
    return {"S": res.singular_values, "V": res.right_singular_vectors,
            "U": res.left_singular_vectors, "n": res.n_samples, "trace": res.trace,
            "gbar": res.mean_gradient_norm, "used": res.method_used, "world": res.world_size,
            "offset": res.sample_offset, "passes": res.n_passes}


class _FailingLoss:
    """Per-sample CE that raises on call number ``at`` (counted from 1) on rank ``rank``."""

    reduction = "none"

    def __init__(self, my_rank: int, rank: int, at: int):
        self.my_rank, self.rank, self.at, self.calls = my_rank, rank, at, 0

    def __call__(self, out, t):
        self.calls += 1
        if self.my_rank == self.rank and self.calls == self.at:
            raise RuntimeError(f"loss broken on rank {self.rank}")
        return CE(out, t)


def _compute_all(rank: int, world: int, tmp: str, dist) -> None:
    group = dist.group.WORLD
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    out = {"runs": {}, "errors": {}, "times": {}}
    t0 = time.perf_counter()
    for method, centered in RUNS:
        out["runs"][method, centered] = _keep(_svd(model, _shard(rank), method, centered,
                                                   process_group=group))
    out["times"]["runs"] = time.perf_counter() - t0
    out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # a DDP-wrapped model: unwrapped, DDP's group by default
    ddp = nn.parallel.DistributedDataParallel(_model())
    out["ddp"] = _keep(_svd(ddp, _shard(rank), "kronecker", True))
    # a DataLoader with a DistributedSampler: the sample count of auto's choice is the
    # ranks' shares (not world x the data set's length)
    x, y = _data()
    ds = torch.utils.data.TensorDataset(x, y)
    sampler = torch.utils.data.distributed.DistributedSampler(ds, world, rank, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=25, sampler=sampler)
    out["sampler"] = _keep(_svd(model, loader, "auto", True, process_group=group))
    # per-sample gradients are local: this rank's rows (DDP names with "module." accepted)
    out["psg"] = per_sample_gradients(ddp, CE, _shard(rank))
    out["psg_named"] = per_sample_gradients(ddp, CE, _shard(rank),
                                            params=["module.2.weight", "0.bias"])

    t0 = time.perf_counter()
    # NaN in rank 1's data: its probe of the first batch fails
    data = _shard(rank)
    if rank == 1:
        data[0][0][4, 2] = float("nan")
    out["errors"]["nan"] = error_text(lambda: _svd(model, data, "kronecker", True,
                                               process_group=group))
    # rank 1's loss raises on its 4th call: a later data pass of jvp
    loss = _FailingLoss(rank, 1, 4)
    out["errors"]["late"] = error_text(lambda: gradient_covariance_svd(
        model, loss, _shard(rank), 5, method="jvp", n_power_iter=2, process_group=group))
    # rank 0's loss raises in the factor pass of gram (its 2nd call, after the probe)
    loss = _FailingLoss(rank, 0, 2)
    out["errors"]["gram"] = error_text(lambda: gradient_covariance_svd(
        model, loss, _shard(rank), 5, method="gram", process_group=group))
    # the group still works after the failures
    out["after"] = _keep(_svd(model, _shard(rank), "gram", True, process_group=group))
    # different parameters on the ranks: an error everywhere
    out["errors"]["mismatch"] = error_text(lambda: _svd(_model(seed=rank), _shard(rank),
                                                    "kronecker", True, process_group=group))
    out["times"]["errors"] = time.perf_counter() - t0
    torch.save(out, Path(tmp) / f"result{rank}.pt")


def _worker(rank: int, world: int, tmp: str):
    run_rank(rank, world, tmp, lambda dist: _compute_all(rank, world, tmp, dist))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_grad")
    world = 2
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp))) for r in range(world)]
    for p in procs:
        p.start()
    hung = []
    deadline = time.monotonic() + 120.0
    for r, p in enumerate(procs):
        p.join(max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            hung.append(r)
            p.kill()
            p.join()
    assert not hung, f"rank(s) {hung} hung"
    errors = {r: (tmp / f"error{r}.txt").read_text() for r in range(world)
              if (tmp / f"error{r}.txt").exists()}
    assert not errors, errors
    return [torch.load(tmp / f"result{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def reference():
    x, y = _data()
    G = per_sample_gradients(_model(), CE, (x, y)).double()
    return G, _shard(0) + _shard(1)


def _exact(G, centered):
    Gc = G - G.mean(0) if centered else G
    return torch.linalg.svdvals(Gc / math.sqrt(G.shape[0]))


def _rel(a, b):
    return float(((a - b).abs() / b.abs()).max())


@pytest.mark.parametrize("method,centered", RUNS)
def test_uneven_split_equals_single_process(spawned, reference, method, centered):
    G, full = reference
    r0, r1 = spawned[0]["runs"][method, centered], spawned[1]["runs"][method, centered]
    exact = _exact(G, centered)[:K]
    assert exact[-1] > 1e-6 * exact[0]             # the compared values are well above noise
    assert r0["n"] == r1["n"] == N and r0["world"] == 2
    assert _rel(r0["S"], exact) <= 1e-8, (method, centered, _rel(r0["S"], exact))
    single = _svd(_model(), full, method, centered)
    assert single.method_used == r0["used"]
    assert _rel(r0["S"], single.singular_values) <= 1e-8
    # every rank returns the same result; the left vectors are each rank's rows
    assert torch.equal(r0["S"], r1["S"]) and torch.equal(r0["V"], r1["V"])
    assert r0["offset"] == 0 and r1["offset"] == SPLIT
    assert r0["U"].shape == (SPLIT, K) and r1["U"].shape == (N - SPLIT, K)
    U = torch.cat([r0["U"], r1["U"]])
    V = r0["V"].double()
    torch.testing.assert_close(U.T @ U, torch.eye(K, dtype=torch.float64), atol=1e-9, rtol=0)
    Gc = (G - G.mean(0) if centered else G) / math.sqrt(N)
    k = 10                                          # leading pairs: G_c v = sigma u
    torch.testing.assert_close(Gc @ V[:, :k], U[:, :k] * r0["S"][:k], atol=1e-9, rtol=0)
    # the exact mean over all samples of the uneven split, and the exact trace where computed
    if r0["used"] in ("gram", "materialize") or not centered:
        assert abs(r0["gbar"] - float(G.mean(0).norm())) <= 1e-10 * float(G.mean(0).norm())
    if r0["used"] in ("gram", "materialize"):
        assert abs(r0["trace"] - float(Gc.pow(2).sum())) <= 1e-10 * float(Gc.pow(2).sum())
    if method == "auto":
        assert r0["used"] == "gram"                 # n = 100 <= 2 d: gram, on every rank


def test_ddp_model_and_model_unchanged(spawned, reference):
    G, _ = reference
    rows = {0: slice(0, SPLIT), 1: slice(SPLIT, N)}
    for r in (0, 1):
        assert spawned[r]["unchanged"]
        got = spawned[r]["ddp"]
        assert got["world"] == 2 and got["n"] == N and got["used"] == "kronecker"
        assert _rel(got["S"], _exact(G, True)[:K]) <= 1e-8
        torch.testing.assert_close(spawned[r]["psg"], G[rows[r]], rtol=1e-12, atol=1e-14)
        # 0.bias (6) comes before 2.weight (18) in named_parameters order
        torch.testing.assert_close(spawned[r]["psg_named"],
                                   torch.cat([G[rows[r], 30:36], G[rows[r], 36:54]], 1),
                                   rtol=1e-12, atol=1e-14)


def test_distributed_sampler_counts_this_ranks_share(spawned, reference):
    G, _ = reference
    for r in (0, 1):
        got = spawned[r]["sampler"]
        assert got["n"] == N and got["used"] == "gram", got["used"]   # n = 100 <= 2 d
        assert _rel(got["S"], _exact(G, True)[:K]) <= 1e-8


def test_a_failing_rank_stops_all_ranks(spawned, reference):
    e0, e1 = spawned[0]["errors"], spawned[1]["errors"]
    assert e1["nan"].startswith("FloatingPointError") and "not finite" in e1["nan"], e1
    assert e0["nan"].startswith("RankFailure") and "rank(s) [1]" in e0["nan"], e0
    assert e1["late"].startswith("RuntimeError: loss broken on rank 1"), e1
    assert e0["late"].startswith("RankFailure") and "rank(s) [1]" in e0["late"], e0
    assert "pass" in e0["late"]                     # it failed in a data pass, not the probe
    assert e0["gram"].startswith("RuntimeError: loss broken on rank 0"), e0
    assert e1["gram"].startswith("RankFailure") and "rank(s) [0]" in e1["gram"], e1
    # the process group is still usable afterwards
    G, _ = reference
    assert _rel(spawned[0]["after"]["S"], _exact(G, True)[:K]) <= 1e-8
    for e in (e0, e1):
        assert e["mismatch"].startswith("ValueError") and "parameters differ" in e["mismatch"]


def test_auto_prefers_gram_unless_samples_outnumber_parameters():
    # single process: gram (exact, n x n) when n <= 2 d, materialize (n x d + SVD) when the
    # samples outnumber the parameters (d = 57 here); both exact
    x, y = _data()
    model = _model()
    G = per_sample_gradients(model, CE, (x, y)).double()
    a = gradient_covariance_svd(model, CE, (x, y), 5)
    assert a.method_used == "gram"
    xx, yy = torch.cat([x, -x]), torch.cat([y, y])          # n = 200 > 2 d
    b = gradient_covariance_svd(model, CE, (xx, yy), 5)
    assert b.method_used == "materialize"
    torch.testing.assert_close(a.singular_values, _exact(G, True)[:5], rtol=1e-10, atol=0)
    GG = per_sample_gradients(model, CE, (xx, yy)).double()
    torch.testing.assert_close(b.singular_values, _exact(GG, True)[:5], rtol=1e-10, atol=0)
