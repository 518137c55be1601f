"""Sweeps: one JSON line per measurement, resume without recomputing finished cells, shards in
separate files, the scaling-law fit and the sweep report."""
import json
import os

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
    entry = fit["fits"]["gaussian|sgd"]
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


def test_shards_write_separate_files_and_the_last_one_fits(tmp_path, count_training):
    cfg = _cfg(measure_epochs=[1])
    a = run_sweep(cfg, tmp_path, shard=(0, 2), progress=False, report=False)
    assert a.n_shard_cells == 2 and a.fit is None
    b = run_sweep(cfg, tmp_path, shard=(1, 2), progress=False, report=False)
    assert b.fit is not None and (tmp_path / "scaling_fit.json").exists()
    f0, f1 = results_path(tmp_path, (0, 2)), results_path(tmp_path, (1, 2))
    assert f0.name == "results.shard0of2.jsonl"
    idx0 = {r["cell_index"] for r in _kinds(f0, "measurement")}
    idx1 = {r["cell_index"] for r in _kinds(f1, "measurement")}
    assert idx0 == {0, 2} and idx1 == {1, 3}
    # a full (unsharded) run over the same directory reuses the shards' cells
    s = run_sweep(cfg, tmp_path, progress=False, fit=False)
    assert s.n_run == 0 and len(count_training) == 4
    # fit-only reads the merged files
    out = fit_sweep(tmp_path, n_bootstrap=50, report=False)
    assert out["n_measurements"] == 4


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
        with sweep._exclusive(p):
            with pytest.raises(RuntimeError, match="in use"):
                with sweep._exclusive(p):
                    pass


def test_config_validation():
    with pytest.raises(ValueError, match="widths"):
        SweepConfig(widths=[])
    c = SweepConfig(widths=[4], depths=[1, 2], seeds=[0, 1], measure_epochs=[2, 0, 2])
    assert c.measure_epochs == [0, 2] and len(c.cells()) == 4
    assert c.measurement_hash() == SweepConfig(widths=[8]).measurement_hash()
    assert c.measurement_hash() != SweepConfig(batch_size=7).measurement_hash()
