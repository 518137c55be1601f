"""Faults and bad inputs (issue 26, items 1-4): Ctrl-C in the command line, measurement lines
with missing fields in a sweep's results, distributed solver calls whose arguments differ
between ranks, and replicas whose parameters are permuted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import landscape_ext as le
from landscape_ext import distributed as _dist
from landscape_lab.cli import main

from _dist_common import run_rank, spawn_ranks, tiny_model, uneven_shard


# a 4-cell fixed-epoch sweep of tiny MLPs on a small Gaussian mixture (seconds)
SWEEP = ["sweep", "--datasets", "gaussian", "--gaussian-n", "100", "--ambient-dim", "5",
         "--intrinsic-dim", "3", "--n-classes", "3", "--widths", "3,5", "--depths", "1,2",
         "--measure-epochs", "1", "--samples", "30", "--trace-matvecs", "6", "--grad-k", "3",
         "--bootstrap", "20", "--quiet"]


def _run(argv):
    """``main(argv)``; a KeyboardInterrupt that escapes it fails the test (instead of stopping
    pytest)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped landscape-lab's main()")


def _one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# 1. Ctrl-C
# ------------------------------------------------------------------------------------------------


def test_ctrl_c_in_a_sweep_says_where_it_stopped_and_a_rerun_resumes(tmp_path, monkeypatch,
                                                                     capsys):
    from landscape_lab.sweep import running

    real, calls = running._run_cell, []

    def interrupted_second_cell(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(running, "_run_cell", interrupted_second_cell)
    out = tmp_path / "sw"
    argv = SWEEP + ["--no-fit", "--out", str(out)]
    assert _run(argv) == 130
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("landscape-lab sweep: interrupted with 1 of 4 cells finished"), line
    assert str(out / "results.jsonl") in line and "rerun the same command to resume" in line
    monkeypatch.setattr(running, "_run_cell", real)
    assert _run(argv) == 0
    assert "3 run, 1 already finished" in capsys.readouterr().out


@pytest.mark.parametrize("command,module,name", [
    ("report", "landscape_lab.report", "example_report"),
    ("train", "landscape_lab.training", "train"),
    ("barrier", "landscape_lab.cli", "_train_example"),
    ("spectrum", "landscape_lab.cli", "_train_example"),
    ("sweep --fit-only", "landscape_lab.sweep", "fit_sweep"),
])
def test_ctrl_c_in_every_subcommand_is_one_line_and_exit_130(command, module, name, tmp_path,
                                                            monkeypatch, capsys):
    def interrupt(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules[module], name, interrupt)
    argv = command.split() + ["--out", str(tmp_path / "o"), "--quiet"]
    if command == "train":
        argv += ["--dataset", "gaussian", "--gaussian-n", "60"]
    assert _run(argv) == 130
    line = _one_line(capsys.readouterr().err)
    sub = command.split()[0]
    assert line.startswith(f"landscape-lab {sub}: interrupted"), line
    assert "partial" in line and "rerun the same command" in line, line


def test_sigint_during_a_real_sweep(tmp_path):
    """The real signal: a sweep process that has written its first cell gets SIGINT."""
    out = tmp_path / "sw"
    argv = SWEEP + ["--widths", "3,4,5,6,7,8", "--no-fit", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "landscape_lab", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and '"cell_done"' in results.read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    line = _one_line(err)
    assert "cells finished" in line and "rerun the same command to resume" in line, line


# ------------------------------------------------------------------------------------------------
# 2. valid JSON lines with missing fields in results.jsonl
# ------------------------------------------------------------------------------------------------


def test_measurement_line_with_missing_fields_is_skipped_by_the_fit(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = SWEEP + ["--out", str(out)]
    assert _run(argv + ["--no-fit"]) == 0
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    first = next(json.loads(l) for l in lines if json.loads(l)["kind"] == "measurement")
    bad = {"kind": "measurement", "cell": first["cell"], "config_hash": first["config_hash"]}
    with open(results, "a") as f:
        f.write(json.dumps(bad) + "\n")
    where = f"{results}:{len(lines) + 1}"
    capsys.readouterr()
    for run in (argv, ["sweep", "--fit-only", "--bootstrap", "20", "--quiet", "--out",
                       str(out)]):
        assert _run(run) == 0, run
        cap = capsys.readouterr()
        assert "alpha" in cap.out
        warning = [l for l in cap.err.splitlines() if where in l]
        assert len(warning) == 1 and "epoch" in warning[0], cap.err
        fit = json.loads((out / "scaling_fit.json").read_text())
        assert fit["fits"]["mlp|gaussian|sgd"]["n_points"] == 4


def test_measurements_skips_records_without_the_fields_of_a_fit(caplog):
    from landscape_lab.sweep import measurements

    good = dict(kind="measurement", cell="c", epoch=1, dataset="d", optimizer="sgd", width=3,
                depth=1)
    recs = [good, {"kind": "measurement", "cell": "c"}, dict(good, epoch="one"),
            dict(good, width=None)]
    with caplog.at_level("WARNING", logger="landscape_lab.sweep.fitting"):
        assert measurements(recs, where=["a:1", "a:2", "a:3", "a:4"]) == [good]
    text = caplog.text
    assert "a:2: skipping a measurement record without epoch, dataset" in text
    assert "a:3: skipping a measurement record whose epoch is 'one'" in text
    assert "a:4: skipping a measurement record without width" in text


# ------------------------------------------------------------------------------------------------
# 3 and 4. ranks that call a solver differently, ranks with permuted parameters
# ------------------------------------------------------------------------------------------------


def _rank_calls(rank: int, tmp: str) -> None:
    """Every call below differs between the ranks in one argument; each must raise on both
    ranks (naming the argument and each rank's value) instead of hanging."""
    from _dist_common import error_text

    group = torch.distributed.group.WORLD
    H = le.HessianOperator(tiny_model(), F.cross_entropy, uneven_shard(rank, 32),
                           process_group=group)
    calls = {
        "k": lambda: le.eigsh(H, k=2 + rank, tol=1e-8),
        "which": lambda: le.eigsh(H, k=2, which=("largest", "smallest")[rank]),
        "tol": lambda: le.eigsh(H, k=2, tol=(1e-6, 1e-7)[rank]),
        "block_size": lambda: le.eigsh(H, k=2, block_size=1 + rank),
        "n_matvecs": lambda: le.trace(H, 6 + 3 * rank),
        "n_steps": lambda: le.spectral_density(H, n_steps=4 + rank, n_probes=2),
    }
    errors = {name: error_text(call) for name, call in calls.items()}
    # the same call on both ranks still works
    errors["same"] = error_text(lambda: le.eigsh(H, k=2, tol=1e-6))
    # two entries of one weight swapped on rank 1
    model = tiny_model()
    if rank == 1:
        with torch.no_grad():
            w = model[0].weight
            w[0, 1], w[2, 3] = w[2, 3].clone(), w[0, 1].clone()
    Hp = le.HessianOperator(model, F.cross_entropy, uneven_shard(rank, 32), process_group=group)
    errors["permuted"] = error_text(lambda: Hp @ torch.ones(Hp.d, 1, dtype=torch.float64))
    (Path(tmp) / f"calls{rank}.json").write_text(json.dumps(errors))


def _worker(rank: int, world: int, tmp: str, scenario: str) -> None:
    run_rank(rank, world, tmp, lambda dist: _rank_calls(rank, tmp))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ranks_with_different_arguments_or_permuted_parameters_raise(tmp_path):
    crashed = spawn_ranks(tmp_path, _worker, "calls", timeout=60)
    assert crashed == {0: None, 1: None}, crashed
    got = [json.loads((tmp_path / f"calls{r}.json").read_text()) for r in (0, 1)]
    shown = {"k": "rank 0: 2, rank 1: 3", "which": "rank 0: 'largest', rank 1: 'smallest'",
             "tol": "rank 0: 1e-06, rank 1: 1e-07", "block_size": "rank 0: 1, rank 1: 2",
             "n_matvecs": "rank 0: 6, rank 1: 9", "n_steps": "rank 0: 4, rank 1: 5"}
    for r in (0, 1):
        for name, values in shown.items():
            err = got[r][name]
            assert err is not None and err.startswith("ValueError"), (r, name, err)
            assert f"different values of {name} ({values})" in err, (r, name, err)
        assert got[r]["same"] is None, got[r]["same"]
        err = got[r]["permuted"]
        assert err is not None and "parameters differ between ranks" in err, (r, err)


def test_parameter_checksum_is_position_sensitive():
    torch.manual_seed(0)
    model = tiny_model()
    params = [p.detach().clone() for p in model.parameters()]
    base = _dist.parameter_checksum(params)
    assert _dist.parameter_checksum([p.clone() for p in params]) == base

    swapped = [p.clone() for p in params]
    swapped[0][0, 1], swapped[0][2, 3] = params[0][2, 3], params[0][0, 1]
    reversed_bias = [p.clone() for p in params]
    reversed_bias[1] = params[1].flip(0)
    rows = [p.clone() for p in params]
    rows[0] = params[0][[1, 0, 2, 3, 4, 5]]
    for changed in (swapped, reversed_bias, rows):
        # each tensor holds the same values as before: the same sums and norms
        for a, b in zip(changed, params):
            assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
        other = _dist.parameter_checksum(changed)
        with pytest.raises(ValueError, match="parameters differ between ranks"):
            _dist.check_same_parameters(torch.stack([base, other]), "test")
    # identical replicas pass; float32 copies of float64 values give the same value
    _dist.check_same_parameters(torch.stack([base, base.clone()]), "test")
    assert _dist.parameter_checksum([p.float() for p in params]) == pytest.approx(
        float(_dist.parameter_checksum([p.float().double() for p in params])), rel=1e-12)
