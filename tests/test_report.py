"""Reports: one model (every section, files exist and parse, numbers match the dense Hessian),
the notes for missing inputs, the models moved back to their device, HTML, and the sweep report
from synthetic measurements."""
import json

import numpy as np
import pytest
import torch

from landscape_lab import report
from landscape_lab.data import gaussian_mixture
from landscape_lab.models import MLP
from landscape_lab.report import ReportConfig, model_report, sweep_report
from landscape_lab.training import CurvatureCallback, MetricsCallback, TrainConfig, train


def _strict(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ds = gaussian_mixture(n=120, ambient_dim=6, intrinsic_dim=3, n_classes=3, seed=0, noise=0.1)
    out = tmp_path_factory.mktemp("train")
    log = out / "log.jsonl"
    a = MLP(6, 5, 1, 3, seed=0)
    train(a, ds, TrainConfig(epochs=1, batch_size=30, lr=0.5), log_path=log, progress=False,
          callbacks=[MetricsCallback(every_steps=2, every_epochs=None),
                     CurvatureCallback(every_steps=2, n_samples=30, k=2)])
    b = MLP(6, 5, 1, 3, seed=1)
    train(b, ds, TrainConfig(epochs=1, batch_size=30, lr=0.5, seed=1), progress=False)
    return ds, a, b, log


CFG = dict(n_samples=40, k=4, tol=1e-8, trace_matvecs=9, slq_steps=12, slq_probes=3,
           grad_samples=30, barrier_points=5, progress=False)


def test_model_report_all_sections(trained, tmp_path):
    ds, a, b, log = trained
    params = [p.detach().clone() for p in a.parameters()]
    res = model_report(a, ds, tmp_path, config=ReportConfig(**CFG, format="both"),
                       train_log=log, model_b=b, context={"note": "test"})
    assert all(torch.equal(p, q) for p, q in zip(params, a.parameters()))
    r = _strict(tmp_path / "results.json")
    for key in ("topk", "trace", "esd", "gradients", "training", "barrier", "metrics"):
        assert key in r, key
    for name in ("topk.png", "esd.png", "gradient_spectrum.png", "lambda_max_training.png",
                 "barrier.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 5000, name
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    for title in ("Top Hessian eigenvalues", "Trace", "Spectral density", "Gradient covariance",
                  "Sharpness over training", "Loss barrier"):
        assert title in md and title in html
    assert "figures/esd.png" in md
    # numbers: top-k against the dense Hessian of the measurement batch
    x, y = ds.subset(40, "train", seed=0)
    flat = torch.cat([p.detach().double().reshape(-1) for p in a.parameters()])
    a64 = MLP(6, 5, 1, 3).double()
    names = [n for n, _ in a.named_parameters()]
    shapes = [p.shape for p in a.parameters()]

    def f(v):
        d, i = {}, 0
        for n, s in zip(names, shapes):
            d[n] = v[i:i + s.numel()].reshape(s)
            i += s.numel()
        return torch.nn.functional.cross_entropy(torch.func.functional_call(a64, d, (x.double(),)), y)

    ev = torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, flat)).flip(0)
    np.testing.assert_allclose(r["topk"]["eigenvalues"], ev[:4].numpy(), rtol=1e-4)
    assert all(r["topk"]["converged"])
    assert abs(r["trace"]["estimate"] - ev.sum().item()) <= 5 * r["trace"]["stderr"] + 1e-6
    assert r["barrier"]["height"] == pytest.approx(max(
        l - ((1 - t) * r["barrier"]["losses"][0] + t * r["barrier"]["losses"][-1])
        for t, l in zip(r["barrier"]["ts"], r["barrier"]["losses"])))
    g = r["gradients"]
    assert g["available"] and 0 < g["rank"]["effective_rank"] <= 30
    assert len(r["training"]["lambda_max"]) >= 3
    assert r["training"]["eos_threshold"] == pytest.approx(4.0)
    assert set(res.figures) == {"topk", "esd", "gradients", "training", "barrier"}


def test_report_without_optional_inputs(trained, tmp_path):
    ds, a, _, _ = trained
    res = model_report(a, ds, tmp_path, config=ReportConfig(**CFG))
    r = res.results
    assert r["gradients"]["available"] is True and "gradients" in res.figures
    assert "barrier" not in r and "training" not in r
    assert any("--checkpoint-b" in n for n in r["notes"])
    assert any("--train-log" in n for n in r["notes"])
    md = (tmp_path / "report.md").read_text()
    assert "## Notes" in md and "## Loss barrier" not in md


def _record_moves(models, moves, monkeypatch):
    """Make ``.to(device)`` of the models ``{name: model}`` append ``(name, device)`` to
    ``moves`` (copies of them, and every other module, move unrecorded)."""
    real_to = torch.nn.Module.to
    names = {id(m): name for name, m in models.items()}

    def to(self, *args, **kwargs):
        if id(self) in names:
            moves.append((names[id(self)], torch.device(args[0])))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)


def test_model_report_moves_the_models_back(trained, tmp_path, monkeypatch):
    """model_report moves both models to config.device and back to where they were, also when
    a section raises (on a CUDA machine the move is a real one)."""
    import landscape_ext

    ds, a, b, _ = trained
    home = torch.device("cpu")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    moves = []
    _record_moves({"a": a, "b": b}, moves, monkeypatch)
    params = [p.detach().clone() for p in list(a.parameters()) + list(b.parameters())]
    cfg = ReportConfig(**{**CFG, "device": str(dev), "sections": ("trace", "barrier")})
    res = model_report(a, ds, tmp_path / "ok", config=cfg, model_b=b)
    assert "barrier" in res.results
    assert moves == [("a", dev), ("b", dev), ("a", home), ("b", home)]
    after = list(a.parameters()) + list(b.parameters())
    assert all(p.device == home and torch.equal(p, q) for p, q in zip(after, params))

    def fail(*args, **kwargs):
        raise RuntimeError("trace failed")

    monkeypatch.setattr(landscape_ext, "trace", fail)
    moves.clear()
    with pytest.raises(RuntimeError, match="trace failed"):
        model_report(a, ds, tmp_path / "fail", config=cfg, model_b=b)
    assert moves == [("a", dev), ("a", home), ("b", home)]
    assert all(p.device == home for p in after)


def test_report_sections_subset_and_ggn(trained, tmp_path):
    ds, a, _, _ = trained
    res = model_report(a, ds, tmp_path, config=ReportConfig(
        **{**CFG, "sections": ("topk", "trace"), "operator": "ggn", "tol": 1e-6}), stem="spec")
    assert res.report_path.endswith("spec.md")
    assert set(res.results) >= {"topk", "trace"} and "esd" not in res.results
    assert res.results["operator"] == "ggn" and all(res.results["topk"]["converged"])
    assert res.results["trace"]["estimate"] > 0   # the Gauss-Newton matrix is PSD


def _synthetic(rank_values, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, (w, d) in enumerate([(w, d) for d in (1, 2, 3) for w in (8, 16, 32)]):
        sn = 2.0 * w ** 0.5 * np.exp(0.3 * d) * np.exp(rng.normal(0, 0.02))
        rank = rank_values[i % len(rank_values)]
        out.append(dict(kind="measurement", cell=f"g|sgd|w{w}|d{d}|s0", epoch=1,
                        dataset="g", optimizer="sgd", width=w, depth=d, n_params=100 * w,
                        spectral_norm=sn, trace=sn * 10, grad_effective_rank=rank,
                        phi=0.01 * rank, data_dim=8, train_acc=0.9, test_acc=0.8 - 0.001 * rank,
                        gen_gap=0.1 + 0.001 * rank))
    return out


def test_sweep_report_from_measurements(tmp_path):
    from landscape_lab.scaling import fit_scaling_law

    meas = _synthetic([20, 60, 150, 300])
    fit = fit_scaling_law([m["width"] for m in meas], [m["depth"] for m in meas],
                          [m["spectral_norm"] for m in meas], n_bootstrap=200)
    assert fit.alpha == pytest.approx(0.5, abs=0.05) and fit.beta == pytest.approx(0.3, abs=0.05)
    path = sweep_report(meas, tmp_path, fits={"g|sgd": fit}, fmt="both")
    text = path.read_text()
    assert "alpha in (0, 1) is supported" in text and "beta > 0 is supported" in text
    assert "Below rank 100" in text
    for f in ("scaling_law.png", "phi_grid.png", "gap_vs_rank.png"):
        assert (tmp_path / "figures" / f).stat().st_size > 5000
    assert (tmp_path / "sweep_report.html").exists()
    low = report._rank_verdict(np.array([5.0, 10, 20]), np.array([0.1, 0.2, 0.3]))
    assert "cannot be tested" in low
    no_rank = [{k: v for k, v in m.items() if k not in ("grad_effective_rank", "phi")}
               for m in meas]
    text = sweep_report(no_rank, tmp_path / "b").read_text()
    assert "No gradient ranks" in text and "No scaling-law fit" in text
