"""Data-parallel curvature on torch.distributed: two CPU processes (gloo) spawned by the test.

Every scenario runs in one spawned pair of processes (starting them costs seconds); rank 0 saves
what it computed, every rank saves the text of an error it raised, and the parent compares
against the single-process results on all of the data.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import landscape_ext as le

from _dist_common import N, error_text, run_rank, spawn_ranks, tiny_data, tiny_model, uneven_shard

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


_model, _data = tiny_model, tiny_data


def _shard(rank: int):
    return uneven_shard(rank, 32)  # rank 0 in batches of 32


def _directions(d: int) -> torch.Tensor:
    return torch.randn(d, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _compute(model, data, group=None, ddp=None):
    """Everything the main scenario compares; the same code runs in one process and on ranks."""
    kw = dict(process_group=group) if group is not None else {}
    target = ddp if ddp is not None else model
    H = le.HessianOperator(target, F.cross_entropy, data, **kw)
    G = le.GGNOperator(target, F.cross_entropy, data, **kw)
    V = _directions(H.d)
    out = {
        "hv": H @ V,
        "gv": G @ V,
        "n_samples": H.n_samples,
        "eig": le.eigsh(H, k=4, which="both", tol=1e-10, block_size=2, max_basis=24).eigenvalues,
        "eig_ggn": le.eigsh(G, k=3, tol=1e-10).eigenvalues,
        "trace": le.trace(H, 24, method="hutch++", seed=3).estimate,
        "diag": le.diagonal(H, 16, seed=4).estimate,
    }
    dens = le.spectral_density(H, n_steps=8, n_probes=3, seed=5)
    out["density_nodes"] = dens.nodes
    out["density_weights"] = dens.weights
    return out


def _scenario(rank: int, tmp: str, scenario: str, dist) -> None:
    if scenario == "main":
        model = _model()
        before = [p.detach().clone() for p in model.parameters()]
        res = _compute(model, _shard(rank), dist.group.WORLD)
        ddp = nn.parallel.DistributedDataParallel(_model())
        H = le.HessianOperator(ddp, F.cross_entropy, _shard(rank))  # DDP's group by default
        res["hv_ddp"] = H @ _directions(H.d)
        res["ddp_group_used"] = H.process_group is not None
        # directions that differ between ranks by rounding are replaced by rank 0's
        Hs = le.HessianOperator(model, F.cross_entropy, _shard(rank),
                                process_group=dist.group.WORLD)
        res["hv_rank0_input"] = Hs @ (_directions(Hs.d) * (1.0 + 1e-9 * rank))
        res["input_syncs"] = Hs.n_input_syncs
        # ... but a v0 or seed that differs per rank (the solvers' state would diverge, and
        # with it their calls: a hang), or a different number of directions (a collective
        # of different sizes), is an error on every rank
        res["v0_error"] = error_text(
            lambda: le.eigsh(Hs, k=2, v0=_directions(Hs.d)[:, 0] + rank, max_basis=24))
        res["seed_error"] = error_text(lambda: le.trace(Hs, 6, seed=rank))
        res["k_error"] = error_text(lambda: Hs @ _directions(Hs.d)[:, :3 - rank])
        res["input_syncs_after"] = Hs.n_input_syncs
        # a rank without samples contributes zeros (and takes part in every collective)
        Hz = le.HessianOperator(model, F.cross_entropy, _shard(0) + _shard(1) if rank == 0
                                else [], process_group=dist.group.WORLD)
        res["hv_all_on_rank0"] = Hz @ _directions(Hz.d)
        # rank 0 of a subgroup that does not hold global rank 0
        g1 = dist.new_group([1])
        res["main_of_g1"] = le.is_main_process(g1)
        r = le.eigsh(Hs, k=2, tol=1e-8)
        res["saved"] = r.save(Path(tmp) / f"eig_rank{rank}.json") is not None
        res["saved_all"] = r.save(Path(tmp) / f"own{rank}.json", all_ranks=True) is not None
        res["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        torch.save(res, Path(tmp) / f"result{rank}.pt")
    elif scenario == "raise":
        def loss_fn(out, t):
            if rank == 1:
                raise ValueError("rank 1's loss is broken")
            return F.cross_entropy(out, t)
        H = le.HessianOperator(_model(), loss_fn, _shard(rank),
                               process_group=dist.group.WORLD)
        le.eigsh(H, k=2)
    elif scenario == "nan":
        data = _shard(rank)
        if rank == 0:
            data[1][0][3, 0] = float("nan")
        H = le.HessianOperator(_model(), F.cross_entropy, data, process_group=dist.group.WORLD)
        le.trace(H, 12)
    elif scenario == "replica_check_raises":
        # an exception before the product's guarded local work (here: in the replica check)
        H = le.HessianOperator(_model(), F.cross_entropy, _shard(rank),
                               process_group=dist.group.WORLD)
        if rank == 1:
            H.param_names = H.param_names + ["no.such.parameter"]
        H @ _directions(H.d)
    elif scenario == "mismatch":
        H = le.HessianOperator(_model(seed=rank), F.cross_entropy, _shard(rank),
                               process_group=dist.group.WORLD)
        H @ _directions(H.d)


def _worker(rank: int, world: int, tmp: str, scenario: str):
    run_rank(rank, world, tmp, lambda dist: _scenario(rank, tmp, scenario, dist))


def _spawn(tmp_path: Path, scenario: str, world: int = 2, timeout: float = 150.0):
    return spawn_ranks(tmp_path, _worker, scenario, world, timeout)


def _close(a, b, rtol=1e-9):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max().clamp_min(1e-30)))


def test_distributed_equals_single_process_uneven_split(tmp_path):
    errors = _spawn(tmp_path, "main")
    assert errors == {0: None, 1: None}, errors
    x, y = _data()
    ref = _compute(_model(), (x, y))
    got = torch.load(tmp_path / "result0.pt")
    got1 = torch.load(tmp_path / "result1.pt")
    assert got["n_samples"] == N
    for key in ("hv", "gv", "eig", "eig_ggn", "trace", "diag", "density_nodes",
                "density_weights"):
        assert _close(got[key], ref[key]), (key, got[key], ref[key])
        # the Krylov state is the same on every rank: identical results everywhere
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(got1[key])), key
    assert _close(got["hv_ddp"], ref["hv"])
    assert got["ddp_group_used"]
    assert _close(got["hv_rank0_input"], ref["hv"])
    assert torch.equal(got1["hv_rank0_input"], got["hv_rank0_input"])
    assert got["input_syncs"] == 1 and got1["input_syncs"] == 1
    for r, g in ((0, got), (1, got1)):
        assert g["v0_error"] is not None and "multiply different directions" in g["v0_error"], r
        # a seed that differs is caught before the first product, naming it
        assert g["seed_error"] is not None and \
            "different values of seed (rank 0: 0, rank 1: 1)" in g["seed_error"], r
        assert g["k_error"] is not None and "different numbers of directions" in g["k_error"], r
        assert g["input_syncs_after"] == 1
    assert not got["main_of_g1"] and got1["main_of_g1"]
    assert _close(got1["hv_all_on_rank0"], ref["hv"])
    assert got["saved"] and not got1["saved"]  # only rank 0 writes
    assert (tmp_path / "eig_rank0.json").exists() and not (tmp_path / "eig_rank1.json").exists()
    assert got["saved_all"] and got1["saved_all"] and (tmp_path / "own1.json").exists()
    assert got["unchanged"]


def test_exact_mean_matches_dense_hessian():
    # the single-process reference itself against the dense Hessian of the mean loss
    x, y = _data()
    model = _model()
    params = dict(model.named_parameters())
    names = list(params)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss_of(v):
        parts, off = {}, 0
        for n in names:
            m = params[n].numel()
            parts[n] = v[off:off + m].reshape(params[n].shape)
            off += m
        return F.cross_entropy(torch.func.functional_call(model, parts, (x,)), y)

    Hd = torch.autograd.functional.hessian(loss_of, flat)
    H = le.HessianOperator(model, F.cross_entropy, _shard(0) + _shard(1))
    V = _directions(H.d)
    assert _close(H @ V, Hd @ V, 1e-10)


@pytest.mark.parametrize("scenario,rank_with_error,own", [
    ("raise", 1, "ValueError: rank 1's loss is broken"),
    ("nan", 0, "FloatingPointError"),
    ("replica_check_raises", 1, "KeyError"),
])
def test_a_failing_rank_stops_all_ranks(tmp_path, scenario, rank_with_error, own):
    errors = _spawn(tmp_path, scenario)
    other = 1 - rank_with_error
    assert errors[rank_with_error] is not None and errors[rank_with_error].startswith(own), errors
    assert errors[other] is not None and errors[other].startswith("RankFailure"), errors
    assert f"rank(s) [{rank_with_error}]" in errors[other]


def test_parameters_that_differ_between_ranks_are_an_error(tmp_path):
    errors = _spawn(tmp_path, "mismatch")
    for r in (0, 1):
        assert errors[r] is not None and "parameters differ between ranks" in errors[r], errors


def test_process_group_without_init_is_a_clear_error():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        le.HessianOperator(_model(), F.cross_entropy, _data(), process_group=object())


def test_torchrun_example_matches_single_process(tmp_path):
    """examples/distributed_spectrum.py under torchrun (2 CPU ranks, gloo, uneven shards):
    rank 0 alone writes, and the eigenvalues are those of all samples in one process."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "examples" / "distributed_spectrum.py"), "--samples", "301",
           "--batch-size", "64", "--width", "12", "--depth", "1", "--epochs", "0",
           "--dtype", "float64", "--k", "3", "--tol", "1e-9", "--trace-matvecs", "12",
           "--slq-steps", "6", "--slq-probes", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["samples_total"] == 301
    assert summary["samples_this_rank"] == 150  # rank 0 of [0, 150), [150, 301)
    for name in ("eigsh.json", "trace.json", "density.json"):
        assert (out / name).exists()

    from landscape_lab.data import get_dataset
    from landscape_lab.models import MLP
    ds = get_dataset("digits", seed=0)
    model = MLP(64, 12, 1, 10, "tanh", seed=0).double()
    op = le.HessianOperator(model, nn.CrossEntropyLoss(),
                            (ds.x_train[:301].double(), ds.y_train[:301]))
    ref = le.eigsh(op, k=3, tol=1e-9).eigenvalues
    assert _close(summary["top_eigenvalues"], ref, 1e-8), (summary["top_eigenvalues"], ref)
