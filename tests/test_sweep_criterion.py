"""Sweeps that mean something: cells trained to a criterion (stopping, resume of an interrupted
criterion sweep, a grown max_epochs), the batch-to-batch spread of every statistic against
direct measurements, the fit on the cells that reached the criterion (fit_all, weighted, several
sweeps side by side), the CNN/ViT/LM grids on generated data, and the report's verdicts."""
import json
import types

import numpy as np
import pytest
import torch

from landscape_lab import sweep, training
from landscape_lab.cli import main
from landscape_lab.models import MLP
from landscape_lab.scaling import fit_scaling_law
from landscape_lab.spread import disjoint_batches
from landscape_lab.sweep import (SweepConfig, fit_points, fit_sweep, load_results, results_path,
                                 run_sweep)
from landscape_lab.sweep.measuring import _stats_with_spread, measurement_batches
from landscape_lab.sweep.running import _dataset


def _cfg(**kw):
    base = dict(widths=[5], depths=[1], datasets=["gaussian"], batch_size=32, n_samples=30,
                trace_matvecs=3, grad_k=3, spread_batches=2,
                dataset_kwargs={"gaussian": dict(n=100, ambient_dim=5, intrinsic_dim=3,
                                                 n_classes=3, noise=0.1)})
    base.update(kw)
    return SweepConfig(**base)


def _meas(path):
    return [r for r in load_results(path) if r["kind"] == "measurement"]


@pytest.fixture
def count_training(monkeypatch):
    calls = []
    real = sweep.training.train

    def counted(model, ds, cfg, **kw):
        res = real(model, ds, cfg, **kw)
        calls.append(res.epochs)
        return res

    monkeypatch.setattr(sweep.training, "train", counted)
    return calls


def test_criterion_stops_at_the_first_epoch_that_meets_it(tmp_path, count_training):
    """The training loss per epoch of a fixed-epoch run of the same cell is the reference: the
    criterion sweep stops at the first epoch whose loss meets it and measures exactly there."""
    fixed = _cfg(measure_epochs=[1, 2, 3], spread_batches=1)
    run_sweep(fixed, tmp_path / "fixed", progress=False, fit=False)
    ref = {r["epoch"]: r for r in _meas(tmp_path / "fixed")}
    assert all(r["reached_criterion"] is None and r["criterion"] is None for r in ref.values())
    assert [r["final"] for r in sorted(ref.values(), key=lambda r: r["epoch"])] == [
        False, False, True]
    level = ref[2]["train_loss"] * (1 + 1e-9)
    first = min(e for e, r in ref.items() if r["train_loss"] <= level)
    assert first == 2 and ref[3]["train_loss"] < level       # the loss falls: a stop is needed

    crit = _cfg(train_to_loss=level, max_epochs=3, measure_epochs=[0, 1, 3])
    run_sweep(crit, tmp_path / "crit", progress=False, fit=False)
    recs = sorted(_meas(tmp_path / "crit"), key=lambda r: r["epoch"])
    assert [r["epoch"] for r in recs] == [0, 1, first]          # epoch 3 comes after the stop
    assert count_training[-1] == first                          # training stopped there
    for r in recs:
        for key in ("reached_criterion", "epochs_to_criterion", "spectral_norm_batch_sd",
                    "trace_batch_sd", "grad_effective_rank_batch_sd", "phi_batch_sd"):
            assert key in r, key
        assert r["spread_batches"] == 2 and r["spectral_norm_batch_sd"] > 0
    assert [(r["reached_criterion"], r["epochs_to_criterion"], r["final"]) for r in recs] == [
        (False, None, False), (False, None, False), (True, first, True)]
    stop = recs[-1]
    assert stop["criterion"] == f"train loss <= {level:g}" and stop["max_epochs"] == 3
    # the same state as the fixed run's at that epoch: same numbers on batch 0
    for key in ("train_loss", "step", "spectral_norm", "trace", "grad_effective_rank"):
        assert stop[key] == pytest.approx(ref[first][key], rel=1e-10), key

    # accuracy criterion: met after one epoch on these separable classes
    acc = _cfg(train_to_accuracy=0.01, max_epochs=4, spread_batches=1)
    run_sweep(acc, tmp_path / "acc", progress=False, fit=False)
    (r,) = _meas(tmp_path / "acc")
    assert (r["epoch"], r["epochs_to_criterion"], r["criterion"]) == (
        1, 1, "train accuracy >= 0.01")


def test_interrupted_criterion_sweep_resumes(tmp_path, count_training):
    """A crash after a cell's first measurement: the rerun trains that cell alone and writes only
    its missing (final) measurement; a grown max_epochs trains on the cells that had not reached
    the criterion and leaves the others alone."""
    cfg = _cfg(widths=[3, 5], train_to_loss=1e-4, max_epochs=2, measure_epochs=[0, 1])
    out = tmp_path / "unreached"
    run_sweep(cfg, out, progress=False, fit=False)
    assert count_training == [2, 2]
    path = results_path(out)
    lines = path.read_text().splitlines()
    victim = "mlp|gaussian|sgd|w5|d1|s0"
    cut = next(i for i, l in enumerate(lines) if json.loads(l).get("cell") == victim
               and json.loads(l).get("epoch") == 1)
    path.write_text("\n".join(lines[:cut + 1]) + '\n{"kind": "measurement", "cell": "ml')
    s = run_sweep(cfg, out, progress=False, fit=False)
    assert (s.n_run, s.n_skipped) == (1, 1) and count_training == [2, 2, 2]
    recs = _meas(out)
    assert sorted((r["cell"][-8:], r["epoch"]) for r in recs if r["cell"] == victim) == [
        ("w5|d1|s0", 0), ("w5|d1|s0", 1), ("w5|d1|s0", 2)]
    assert sum(r["cell"] == victim for r in recs) == 3          # nothing written twice
    assert run_sweep(cfg, out, progress=False, fit=False).n_run == 0

    grown = _cfg(widths=[3, 5], train_to_loss=1e-4, max_epochs=3, measure_epochs=[0, 1])
    assert grown.measurement_hash() == cfg.measurement_hash()
    s = run_sweep(grown, out, progress=False, fit=False)
    assert s.n_run == 2 and count_training[-2:] == [3, 3]
    finals = sweep.final_measurements(sweep.measurements(load_results(out)))
    assert {r["epoch"] for r in finals.values()} == {3}
    assert all(r["reached_criterion"] is False and r["epochs_to_criterion"] is None
               for r in finals.values())
    # shrunk: epoch 1 was a trajectory point; it is measured again as the final one
    s = run_sweep(_cfg(widths=[3, 5], train_to_loss=1e-4, max_epochs=1, measure_epochs=[0, 1]),
                  out, progress=False, fit=False)
    assert s.n_run == 2 and count_training[-2:] == [1, 1]
    finals = sweep.final_measurements(sweep.measurements(load_results(out)))
    assert {(r["epoch"], r["final"]) for r in finals.values()} == {(1, True)}
    assert fit_points(sweep.measurements(load_results(out)), "spectral_norm", fit_all=True)[1][
        "n_cells"] == 2

    easy = _cfg(widths=[3, 5], train_to_loss=50.0, max_epochs=2)
    run_sweep(easy, tmp_path / "reached", progress=False, fit=False)
    n = len(count_training)
    s = run_sweep(_cfg(widths=[3, 5], train_to_loss=50.0, max_epochs=9), tmp_path / "reached",
                  progress=False, fit=False)
    assert s.n_run == 0 and len(count_training) == n       # reached at epoch 1: nothing to do


def test_measurement_spread_matches_direct_measurements():
    cfg = _cfg(spread_batches=3, n_samples=20)
    ds = _dataset(cfg, "gaussian", {})
    batches = measurement_batches(cfg, ds)
    assert len(batches) == 3 and [b[1].shape[0] for b in batches] == [20, 20, 20]
    assert torch.equal(batches[0][0], ds.subset(20, "train", seed=0)[0])
    assert len(measurement_batches(_cfg(spread_batches=9, n_samples=30), ds)) == 2   # 75 // 30
    assert len(measurement_batches(_cfg(n_samples=500), ds)) == 1                   # all data
    model = MLP(5, width=4, depth=1, n_classes=3, seed=2)
    loss_fn, per_sample = training.loss_functions("classification")
    state = types.SimpleNamespace(model=model, loss_fn=loss_fn, per_sample_loss=per_sample)
    cell = cfg.cells()[0]
    before = [p.detach().clone() for p in model.parameters()]
    stats = _stats_with_spread(cfg, cell, ds, state, batches)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and model.training
    direct = [training.curvature_stats(model, loss_fn, b, k=0, tol=cfg.tol,
                                       trace_matvecs=cfg.trace_matvecs, spectral_norm=True,
                                       per_sample_loss=per_sample, grad_k=cfg.grad_k,
                                       seed=cell.seed + 7919 * j)[0]
              for j, b in enumerate(disjoint_batches(ds, 20, 3, seed=0))]
    for key in ("spectral_norm", "trace", "grad_effective_rank"):
        vals = [d[key] for d in direct]
        assert stats[key] == pytest.approx(vals[0], rel=1e-9)
        assert stats[f"{key}_batch_sd"] == pytest.approx(np.std(vals, ddof=1), rel=1e-6)
    one = _stats_with_spread(cfg, cell, ds, state, batches[:1])
    assert one["spread_batches"] == 1 and one["spectral_norm_batch_sd"] is None


def _record(cell, width, depth, value, sd, reached=True, epoch=5, group_model="mlp"):
    return dict(kind="measurement", cell=cell, dataset="d", optimizer="sgd", model=group_model,
                width=width, depth=depth, epoch=epoch, final=True, reached_criterion=reached,
                epochs_to_criterion=epoch if reached else None, criterion="train loss <= 0.1",
                max_epochs=9, spectral_norm=value, spectral_norm_batch_sd=sd, train_acc=1.0,
                test_acc=0.9, gen_gap=0.1, config_hash="h", train_loss=0.05)


def _law_records(model="mlp", alpha=0.5, beta=0.3, miss=()):
    rng = np.random.default_rng(0)
    out = []
    for i, (w, d) in enumerate([(w, d) for w in (8, 16, 32) for d in (1, 2, 3)]):
        v = 2.0 * w ** alpha * np.exp(beta * d) * np.exp(0.05 * rng.standard_normal())
        out.append(_record(f"{model}|d|sgd|w{w}|d{d}|s0", w, d, float(v), 0.05 * v * (1 + i % 3),
                           reached=i not in miss, group_model=model))
    return out


def test_fit_uses_the_cells_that_reached_the_criterion(tmp_path):
    recs = _law_records(miss=(2, 7))
    recs.append(dict(recs[0], epoch=2, final=False))             # a trajectory point
    pts, info = fit_points(recs, "spectral_norm")
    assert len(pts) == 7 and info["n_not_reached"] == 2 and info["n_cells"] == 9
    assert info["criterion"] == "train loss <= 0.1" and all(p["epoch"] == 5 for p in pts)
    assert len(fit_points(recs, "spectral_norm", fit_all=True)[0]) == 9
    assert [p["epoch"] for p in fit_points(recs, "spectral_norm", epoch=2)[0]] == [2]

    # fit_sweep over a results directory: unweighted, weighted, all cells
    out = tmp_path / "a"
    sweep.store._write_sweep_config(out, _cfg(), "h", 9)
    with sweep.store._results_writer(results_path(out)) as w:
        for r in recs:
            w.write(r)
    e = fit_sweep(out, n_bootstrap=50, report=False)["fits"]["mlp|d|sgd"]
    assert (e["n_points"], e["n_not_reached"], e["weighted"]) == (7, 2, False)
    kept = [r for r in recs if r["reached_criterion"] and r["final"]]
    ref = fit_scaling_law([r["width"] for r in kept], [r["depth"] for r in kept],
                          [r["spectral_norm"] for r in kept], n_bootstrap=0)
    assert e["fit"]["alpha"] == pytest.approx(ref.alpha) and e["fit"]["beta"] == pytest.approx(
        ref.beta)
    ew = fit_sweep(out, n_bootstrap=50, report=False, weighted=True)["fits"]["mlp|d|sgd"]
    refw = fit_scaling_law([r["width"] for r in kept], [r["depth"] for r in kept],
                           [r["spectral_norm"] for r in kept], n_bootstrap=0,
                           weights=[(r["spectral_norm"] / r["spectral_norm_batch_sd"]) ** 2
                                    for r in kept])
    assert ew["weighted"] and ew["fit"]["alpha"] == pytest.approx(refw.alpha)
    assert ew["fit"]["alpha"] != pytest.approx(ref.alpha)
    assert fit_sweep(out, n_bootstrap=0, report=False, fit_all=True)["fits"]["mlp|d|sgd"][
        "n_points"] == 9

    # two sweeps side by side (one per architecture), written to a third directory
    other = tmp_path / "b"
    sweep.store._write_sweep_config(other, _cfg(model="vit", widths=[8]), "h2", 9)
    with sweep.store._results_writer(results_path(other)) as w:
        for r in _law_records("vit", alpha=0.9, beta=-0.2):
            w.write(dict(r, config_hash="h2"))
    s = fit_sweep(tmp_path / "both", n_bootstrap=200, sources=[out, other])
    assert sorted(s["fits"]) == ["mlp|d|sgd", "vit|d|sgd"]
    assert s["fits"]["vit|d|sgd"]["fit"]["alpha"] == pytest.approx(0.9, abs=0.15)
    text = (tmp_path / "both" / "sweep_report.md").read_text()
    assert "vit|d|sgd: alpha in (0, 1) is" in text and "beta > 0 is rejected" in text
    assert "7 of 9 cells reached train loss <= 0.1" in text
    for f in ("scaling_law.png", "exponents.png", "statistics.png"):
        assert (tmp_path / "both" / "figures" / f).stat().st_size > 5000
    with pytest.raises(ValueError, match="not a sweep output directory"):
        fit_sweep(tmp_path / "c", sources=[tmp_path / "nothing"])


@pytest.mark.parametrize("model, dataset, extra", [
    ("vit", "gaussian-images", ["--image-shape", "3,8,8"]),
    ("resnet", "gaussian-images", ["--image-shape", "2,8,8", "--image-classes", "4",
                                   "--fit-all"]),
    ("lm", "synthetic-text", ["--text-seq-len", "6", "--text-vocab", "6"]),
])
def test_generated_data_grids_for_every_architecture(tmp_path, model, dataset, extra, capsys):
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = tmp_path / model
    try:
        rc = main(["sweep", "--model", model, "--datasets", dataset, "--widths", "4,8",
                   "--depths", "1,2", "--max-epochs", "2", "--max-train", "48", "--samples", "16",
                   "--trace-matvecs", "3", "--grad-k", "4", "--spread-batches", "2",
                   "--bootstrap", "20", "--threads", "1", "--quiet", "--out",
                   str(out), *extra])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert rc == 0, capsys.readouterr().err
    recs = _meas(out)
    assert len(recs) == 4 and {r["model"] for r in recs} == {model}
    assert all(r["epoch"] == 2 and r["final"] and r["reached_criterion"] is False
               and r["spread_batches"] == 2 and r["spectral_norm_batch_sd"] is not None
               for r in recs)
    assert (out / "sweep_report.md").exists() and f"{model}|{dataset}|sgd" in capsys.readouterr().out


def test_wrong_data_for_the_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'lm' needs a language-model data set"):
        run_sweep(_cfg(model="lm", widths=[4]), tmp_path, progress=False)
    with pytest.raises(ValueError, match="needs a classification data set; 'synthetic-text'"):
        run_sweep(_cfg(datasets=["synthetic-text"]), tmp_path, progress=False)


def test_plateau_verdicts():
    from landscape_lab.report.sweep import _claim_verdict, _plateau_verdict

    below = np.array([20.0, 40, 60, 80])
    above = np.array([120.0, 160, 220, 300])
    rank = np.concatenate([below, above])
    flat_above = np.concatenate([0.3 - 0.05 * np.log(below), [0.08, 0.081, 0.079, 0.08]])
    verdict, why = _plateau_verdict(rank, flat_above)
    assert verdict == "supported" and "flat above" in why
    assert _plateau_verdict(rank, 0.01 * np.log(rank))[0] == "rejected"
    wide = np.array([20.0, 30, 45, 60, 75, 90, 120, 160, 220, 300, 400, 500])
    noise = 0.1 + 0.05 * np.random.default_rng(0).standard_normal(12)
    verdict, why = _plateau_verdict(wide, noise)
    assert verdict == "not resolved" and "flat on both sides" in why
    verdict, why = _plateau_verdict(below, below / 1000, bound=90)
    assert verdict == "not resolved" and "cannot exceed 90" in why
    assert [_claim_verdict(ci, 0, 1) for ci in ((0.2, 0.8), (-0.5, -0.1), (-0.1, 0.3))] == [
        "supported", "rejected", "not resolved"]
