"""Sweeps: one JSON line per measurement, resume without recomputing finished cells, shards
(processes, torch.distributed ranks, job-array tasks) appending to one results file, the
scaling-law fit and the sweep report."""
import json
import os
from pathlib import Path

import pytest

from landscape_lab import sweep
from landscape_lab.sweep import (SweepConfig, fit_sweep, load_results, parse_shard,
                                 results_path, run_sweep)


def _cfg(**kw):
    base = dict(widths=[3, 5], depths=[1, 2], datasets=["gaussian"], measure_epochs=[0, 1],
                batch_size=32, n_samples=30, trace_matvecs=3, grad_k=3, tol=1e-3,
                dataset_kwargs={"gaussian": dict(n=100, ambient_dim=5, intrinsic_dim=3,
                                                 n_classes=3, noise=0.1)})
    base.update(kw)
    return SweepConfig(**base)


@pytest.fixture
def count_training(monkeypatch):
    calls = []
    real = sweep.training.train

    def counted(model, ds, cfg, **kw):
        calls.append(cfg.seed)
        return real(model, ds, cfg, **kw)

    monkeypatch.setattr(sweep.training, "train", counted)
    return calls


def _kinds(path, kind):
    return [json.loads(l) for l in open(path) if json.loads(l)["kind"] == kind]


def test_sweep_writes_measurements_resumes_and_fits(tmp_path, count_training):
    cfg = _cfg()
    s = run_sweep(cfg, tmp_path, progress=False)
    assert (s.n_cells, s.n_run, s.n_skipped) == (4, 4, 0) and len(count_training) == 4
    path = results_path(tmp_path)
    meas = _kinds(path, "measurement")
    assert len(meas) == 8 and len(_kinds(path, "cell_done")) == 4
    assert {(m["width"], m["depth"], m["epoch"]) for m in meas} == {
        (w, d, e) for w in (3, 5) for d in (1, 2) for e in (0, 1)}
    for m in meas:
        assert m["spectral_norm"] > 0 and m["n_params"] > 0
        assert m["gen_gap"] == pytest.approx(m["train_acc"] - m["test_acc"])
        assert m["grad_effective_rank"] > 0 and m["phi"] is not None
        assert m["data_dim"] == 3
    # fit + report at the end
    fit = json.loads((tmp_path / "scaling_fit.json").read_text())
    entry = fit["fits"]["mlp|gaussian|sgd"]
    assert entry["n_points"] == 4 and entry["fit"]["alpha"] is not None
    for f in ("scaling_law.png", "phi_grid.png", "gap_vs_rank.png"):
        assert (tmp_path / "figures" / f).stat().st_size > 1000
    assert "Scaling law" in (tmp_path / "sweep_report.md").read_text()

    # resume: nothing is recomputed
    s2 = run_sweep(cfg, tmp_path, progress=False, fit=False)
    assert (s2.n_run, s2.n_skipped) == (0, 4) and len(count_training) == 4
    assert len(_kinds(path, "measurement")) == 8

    # an interrupted cell: its cell_done and last measurement are lost, plus a cut line
    lines = path.read_text().splitlines()
    victim = meas[-1]["cell"]
    def lost(rec):
        return rec.get("cell") == victim and (rec["kind"] == "cell_done" or rec["epoch"] == 1)

    kept = [l for l in lines if not lost(json.loads(l))]
    path.write_text("\n".join(kept) + '\n{"kind": "measurement", "cell": "gau')
    s3 = run_sweep(cfg, tmp_path, progress=False, fit=False)
    assert (s3.n_run, s3.n_skipped) == (1, 3) and len(count_training) == 5
    meas3 = [r for r in load_results(tmp_path) if r["kind"] == "measurement"]
    assert len(meas3) == 8   # only the missing epoch was written again
    assert sorted(r["epoch"] for r in meas3 if r["cell"] == victim) == [0, 1]

    # other settings are not reused
    s4 = run_sweep(_cfg(lr={"sgd": 0.05}, widths=[3], depths=[1], measure_epochs=[0]),
                   tmp_path, progress=False, fit=False)
    assert s4.n_run == 1 and len(count_training) == 6


def test_shards_append_to_one_file_and_the_last_one_fits(tmp_path, count_training):
    cfg = _cfg(measure_epochs=[1])
    a = run_sweep(cfg, tmp_path, shard=(0, 2), progress=False, report=False)
    assert a.n_shard_cells == 2 and a.fit is None and a.shard == (0, 2)
    assert not (tmp_path / "scaling_fit.json").exists()
    b = run_sweep(cfg, tmp_path, shard=(1, 2), progress=False, report=False)
    assert b.fit is not None and (tmp_path / "scaling_fit.json").exists()
    f0, f1 = results_path(tmp_path, (0, 2)), results_path(tmp_path, (1, 2))
    assert f0 == f1 == tmp_path / "results.jsonl" == results_path(tmp_path)
    assert sorted(r["cell_index"] for r in _kinds(f0, "measurement")) == [0, 1, 2, 3]
    assert list(tmp_path.glob("results*.jsonl")) == [f0]
    # a full (unsharded) run over the same directory reuses the shards' cells
    s = run_sweep(cfg, tmp_path, progress=False, fit=False)
    assert s.n_run == 0 and len(count_training) == 4
    # fit-only reads the merged files
    out = fit_sweep(tmp_path, n_bootstrap=50, report=False)
    assert out["n_measurements"] == 4


def test_legacy_shard_files_are_merged(tmp_path, count_training):
    cfg = _cfg(measure_epochs=[1])
    run_sweep(cfg, tmp_path, progress=False, fit=False)
    # move cells 0 and 2 into a per-shard file of an older version
    lines = results_path(tmp_path).read_text().splitlines()
    old = [l for l in lines if json.loads(l).get("cell_index") in (0, 2)]
    (tmp_path / "results.shard0of2.jsonl").write_text("\n".join(old) + "\n")
    results_path(tmp_path).write_text("\n".join(l for l in lines if l not in old) + "\n")
    assert len([r for r in load_results(tmp_path) if r["kind"] == "measurement"]) == 4
    s = run_sweep(cfg, tmp_path, progress=False, fit=False)
    assert s.n_run == 0 and len(count_training) == 4
    assert fit_sweep(tmp_path, n_bootstrap=20, report=False)["n_measurements"] == 4


def test_parse_shard_and_lock(tmp_path, monkeypatch):
    assert parse_shard(None) == (0, 1) and parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "a/b", "3", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert parse_shard("slurm") == (2, 4)
    if os.name == "posix":
        p = tmp_path / "results.jsonl"
        with sweep.store._exclusive(p):
            with pytest.raises(RuntimeError, match="in use"):
                with sweep.store._exclusive(p):
                    pass


def test_config_validation():
    with pytest.raises(ValueError, match="widths"):
        SweepConfig(widths=[])
    c = SweepConfig(widths=[4], depths=[1, 2], seeds=[0, 1], measure_epochs=[2, 0, 2])
    assert c.measure_epochs == [0, 2] and len(c.cells()) == 4
    assert c.max_epochs == 2 and c.criterion == {} and c.criterion_text() is None
    assert c.measurement_hash() == SweepConfig(widths=[8], measure_epochs=[1]).measurement_hash()
    assert c.measurement_hash() != SweepConfig(batch_size=7, measure_epochs=[2]).measurement_hash()
    # the default sweep trains to a criterion; a grown max_epochs keeps the hash (resume)
    d = SweepConfig()
    assert d.criterion == {"train_loss": sweep.DEFAULT_TRAIN_TO_LOSS} and d.measure_epochs == []
    assert d.max_epochs == sweep.DEFAULT_MAX_EPOCHS
    assert d.measurement_hash() == SweepConfig(max_epochs=7).measurement_hash()
    assert d.measurement_hash() != c.measurement_hash()
    assert d.measurement_hash() != SweepConfig(train_to_loss=0.2).measurement_hash()
    both = SweepConfig(train_to_loss=0.2, train_to_accuracy=0.9, measure_epochs=[0, 3])
    assert both.criterion_text() == "train loss <= 0.2 and train accuracy >= 0.9"
    assert both.criterion_met(0.1, 0.95) and not both.criterion_met(0.1, 0.85)
    assert not both.criterion_met(0.3, 0.95)
    for bad, match in [(dict(train_to_loss=0), "train_to_loss must be > 0, got 0"),
                       (dict(train_to_accuracy=1.5), r"train_to_accuracy must be in \(0, 1\], got 1.5"),
                       (dict(train_to_loss=0.1, max_epochs=3, measure_epochs=[5]),
                        "max_epochs=3, measure_epochs=\\[5\\]"),
                       (dict(measure_epochs=[]), "nothing says when to measure"),
                       (dict(model="vit", widths=[6, 8]), r"\[6\] are not multiples of 4"),
                       (dict(model="resnet", depths=[0, 1]), "depths=\\[0, 1\\]"),
                       (dict(spread_batches=0), "spread_batches=0")]:
        with pytest.raises(ValueError, match=match):
            SweepConfig(**bad)


# -- one results file, concurrent shards, --shard auto, resume safety ---------------------------

_CLI_SWEEP = ["sweep", "--datasets", "gaussian", "--gaussian-n", "100", "--ambient-dim", "5",
              "--intrinsic-dim", "3", "--n-classes", "3", "--widths", "3,5", "--depths", "1,2",
              "--measure-epochs", "0,1", "--samples", "30", "--trace-matvecs", "3",
              "--grad-k", "3", "--bootstrap", "20", "--threads", "1", "--quiet"]

_ENV_VARS = ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
             "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_COUNT")


@pytest.fixture
def clean_env(monkeypatch):
    """No torchrun/Slurm variables; the root logger restored afterwards (the CLI's
    ``logging.basicConfig(force=True)`` would leave a handler on a closed capture stream)."""
    import logging

    for k in _ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield monkeypatch
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(path):
    """Every line of a results file, parsed (fails on a torn or interleaved line)."""
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_concurrent_shard_processes_write_one_file(tmp_path, clean_env, capsys):
    import subprocess
    import sys

    import landscape_lab
    from landscape_lab.cli import main

    out = tmp_path / "sw"
    env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS}
    pkg = os.path.dirname(os.path.dirname(landscape_lab.__file__))
    env["PYTHONPATH"] = pkg + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "landscape_lab", *_CLI_SWEEP, "--shard",
                               f"{i}/2", "--out", str(out)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    res = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, res):
        assert p.returncode == 0, e
    assert list(out.glob("results*.jsonl")) == [out / "results.jsonl"]
    recs = _lines(out / "results.jsonl")   # no torn or interleaved line
    meas = [(r["cell_index"], r["epoch"]) for r in recs if r["kind"] == "measurement"]
    assert sorted(meas) == [(c, e) for c in range(4) for e in (0, 1)]   # each exactly once
    assert sorted(r["cell_index"] for r in recs if r["kind"] == "cell_done") == [0, 1, 2, 3]
    assert sorted(r["shard"] for r in recs if r["kind"] == "shard_start") == ["0/2", "1/2"]
    # exactly one process (the one that completed the grid) fitted and wrote the report
    fitted = ["~ c n^alpha" in o for o, _ in res]
    assert sum(fitted) == 1 and (out / "scaling_fit.json").exists()
    assert (out / "sweep_report.md").exists()
    # resume: nothing runs, nothing is appended but the shard_start line
    n = len(recs)
    assert main([*_CLI_SWEEP, "--no-fit", "--out", str(out)]) == 0
    assert "0 run, 4 already finished" in capsys.readouterr().out
    assert [r["kind"] for r in _lines(out / "results.jsonl")[n:]] == ["shard_start"]


def test_shard_auto_from_torchrun_and_slurm(clean_env):
    env = clean_env
    assert parse_shard("auto") == parse_shard(None) == (0, 1)
    env.setenv("RANK", "2")
    env.setenv("WORLD_SIZE", "3")
    assert parse_shard("auto") == parse_shard(None) == parse_shard("") == (2, 3)
    assert parse_shard("0/4") == (0, 4)          # explicit wins
    env.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK"):
        parse_shard("auto")
    env.delenv("RANK")
    env.delenv("WORLD_SIZE")
    env.setenv("SLURM_ARRAY_TASK_ID", "7")
    env.setenv("SLURM_ARRAY_TASK_MIN", "5")
    env.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert parse_shard("auto") == parse_shard("slurm") == (2, 4)
    assert parse_shard(None) == (0, 1)           # a job array shards only when asked
    env.delenv("SLURM_ARRAY_TASK_COUNT")
    env.setenv("SLURM_ARRAY_TASK_MAX", "8")
    assert parse_shard("auto") == (2, 4)         # from min/max
    env.setenv("SLURM_ARRAY_TASK_ID", "9")
    env.setenv("SLURM_ARRAY_TASK_MIN", "1")
    env.setenv("SLURM_ARRAY_TASK_MAX", "13")
    env.setenv("SLURM_ARRAY_TASK_STEP", "4")
    assert parse_shard("slurm") == (2, 4)        # --array=1-13:4
    env.setenv("SLURM_ARRAY_TASK_ID", "10")
    with pytest.raises(ValueError, match="Slurm"):
        parse_shard("slurm")


def test_torch_distributed_ranks_barrier_and_rank0_fits(tmp_path, clean_env, monkeypatch,
                                                          count_training):
    barriers = []
    monkeypatch.setattr(sweep.sharding, "_rank_sync", lambda error: barriers.append(error))
    cfg = _cfg(measure_epochs=[1])
    monkeypatch.setattr(sweep.sharding, "_dist_shard", lambda: (0, 2))
    assert parse_shard("auto") == (0, 2)
    a = run_sweep(cfg, tmp_path, progress=False, report=False)   # rank 0: cells 0, 2
    assert a.shard == (0, 2) and a.n_run == 2 and a.fit is None and len(barriers) == 1
    monkeypatch.setattr(sweep.sharding, "_dist_shard", lambda: (1, 2))
    b = run_sweep(cfg, tmp_path, progress=False, report=False)   # rank 1 completes the grid
    assert b.n_run == 2 and len(barriers) == 2
    assert b.fit is None and not (tmp_path / "scaling_fit.json").exists()   # only rank 0 fits
    monkeypatch.setattr(sweep.sharding, "_dist_shard", lambda: (0, 2))
    c = run_sweep(cfg, tmp_path, progress=False, report=False)
    assert c.n_run == 0 and c.fit is not None and (tmp_path / "scaling_fit.json").exists()
    assert len(count_training) == 4


def test_sweep_ranks_of_a_node_get_their_own_gpu(monkeypatch):
    import torch

    from landscape_lab.cli import _rank_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(str(d)))
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert _rank_device("cuda") == "cuda:1" and chosen == ["cuda:1"]
    assert _rank_device("cuda:0") == "cuda:0" and _rank_device("cpu") == "cpu"
    monkeypatch.delenv("LOCAL_RANK")
    assert _rank_device("cuda") == "cuda"


def test_second_copy_of_a_shard_fails_clearly(tmp_path, clean_env, capsys):
    from landscape_lab.cli import main

    cfg = _cfg(widths=[3], depths=[1], measure_epochs=[0])
    with sweep.store._exclusive(sweep.store._shard_lock_path(tmp_path, (0, 2))):
        with pytest.raises(sweep.ShardBusyError, match=r"shard 0/2 .* in use by another"):
            run_sweep(cfg, tmp_path, shard=(0, 2), progress=False)
        rc = main([*_CLI_SWEEP, "--shard", "0/2", "--out", str(tmp_path)])
        assert rc == 2 and "shard 0/2" in capsys.readouterr().err
        # another shard of the same directory runs alongside
        s = run_sweep(cfg, tmp_path, shard=(1, 2), progress=False, fit=False)
        assert s.n_shard_cells == 0
    assert not (tmp_path / "results.jsonl").exists() or all(
        r["kind"] == "shard_start" for r in _lines(tmp_path / "results.jsonl"))


def test_torn_line_skipped_and_incomplete_cell_reruns(tmp_path, clean_env, count_training,
                                                      caplog):
    cfg = _cfg(widths=[3], depths=[1, 2], measure_epochs=[0, 1])
    path = results_path(tmp_path)
    run_sweep(cfg, tmp_path, shard=(0, 2), progress=False)          # cell 0
    torn = '{"kind": "measurement", "cell": "mlp|gaussian|sgd|w3|d2|s0", "epo'
    with open(path, "a") as f:
        f.write(torn)                                               # a crash mid-write
    with caplog.at_level("WARNING", logger="landscape_lab"):
        s = run_sweep(cfg, tmp_path, shard=(1, 2), progress=False, report=False)   # cell 1
    assert s.n_run == 1 and s.fit is not None                      # it completed the grid
    assert any("not valid JSON" in r.getMessage() for r in caplog.records)
    lines = path.read_text().splitlines()
    assert lines.count(torn) == 1                                   # not extended by an append
    recs = [json.loads(l) for l in lines if l != torn]
    assert sorted((r["cell_index"], r["epoch"]) for r in recs if r["kind"] == "measurement") \
        == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # resume: nothing to do
    assert run_sweep(cfg, tmp_path, progress=False, fit=False).n_run == 0
    assert len(count_training) == 2
    # a cell whose record is incomplete (a measurement lost, cell_done kept) runs again,
    # writing only the missing epoch
    lost = [l for l in lines if l != torn and json.loads(l).get("cell_index") == 1
            and json.loads(l).get("epoch") == 1]
    assert len(lost) == 1
    path.write_text("\n".join(l for l in lines if l not in lost) + "\n")
    s = run_sweep(cfg, tmp_path, progress=False, fit=False)
    assert (s.n_run, s.n_skipped) == (1, 1) and len(count_training) == 3
    new = [json.loads(l) for l in path.read_text().splitlines()[len(lines) - 1:]]
    new = [r for r in new if r["kind"] == "measurement"]
    assert [(r["cell_index"], r["epoch"]) for r in new] == [(1, 1)]


def _append_many(path, tag, n):
    with sweep.store._results_writer(path) as w:
        for k in range(n):
            w.write({"kind": "stress", "tag": tag, "k": k, "pad": tag * 12000})


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_locked_appends_from_processes_never_tear(tmp_path):
    import multiprocessing as mp

    path = tmp_path / "results.jsonl"
    path.write_text('{"kind": "measurement", "cel')             # a torn line left by a crash
    ctx = mp.get_context("fork")
    ps = [ctx.Process(target=_append_many, args=(path, t, 40)) for t in "abc"]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    assert lines[0] == '{"kind": "measurement", "cel'
    recs = [json.loads(l) for l in lines[1:]]
    assert sorted((r["tag"], r["k"]) for r in recs) == [(t, k) for t in "abc" for k in range(40)]
    assert all(r["pad"] == r["tag"] * 12000 for r in recs)
    assert len([r for r in load_results(tmp_path) if r["kind"] == "stress"]) == 120


def _gloo_sweep_worker(rank, tmp, fail_rank, fail_in="cell"):
    import datetime
    import traceback

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if rank == fail_rank:
            def broken(*a, **k):
                raise RuntimeError(f"{fail_in} failed on rank {rank}")
            if fail_in == "cell":
                sweep.running._run_cell = broken
            else:   # before the cells: writing sweep_config.json
                sweep.store._write_sweep_config = broken
        s = run_sweep(_cfg(widths=[3], depths=[1, 2], measure_epochs=[0]), f"{tmp}/sweep",
                      progress=False, report=False)
        (Path(tmp) / f"ok{rank}").write_text(f"{s.shard} {s.n_run} {s.fit is not None}")
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        (Path(tmp) / f"error{rank}").write_text(f"{type(exc).__name__}: {exc}\n"
                                                f"{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fail_rank,fail_in", [(-1, "cell"), (1, "cell"), (0, "setup")])
def test_gloo_ranks_share_one_file_and_a_failing_rank_stops_all(tmp_path, fail_rank, fail_in):
    """Two real torch.distributed ranks: cells split over ranks into one results file and rank 0
    fits; when a rank's cell raises, every rank stops with an error instead of hanging."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_gloo_sweep_worker, args=(r, str(tmp_path), fail_rank, fail_in))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(150)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    read = {r: {k: (tmp_path / f"{k}{r}").read_text() if (tmp_path / f"{k}{r}").exists()
                else None for k in ("ok", "error")} for r in range(2)}
    if fail_rank < 0:
        assert read[0]["ok"] == "(0, 2) 1 True" and read[1]["ok"] == "(1, 2) 1 False", read
        done = [r for r in _lines(tmp_path / "sweep" / "results.jsonl")
                if r["kind"] == "cell_done"]
        assert len(done) == 2 and not list((tmp_path / "sweep").glob("results.shard*"))
    else:
        other = 1 - fail_rank
        assert read[fail_rank]["error"].startswith(
            f"RuntimeError: {fail_in} failed on rank {fail_rank}"), read
        assert read[other]["error"].startswith("RankFailure"), read
        assert f"[{fail_rank}]" in read[other]["error"], read
