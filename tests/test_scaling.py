"""Scaling-law fits on synthetic data with known exponents; Phi and the architecture search."""
import json
import logging
import math

import numpy as np
import pytest
import torch

from landscape_lab.scaling import (
    ArchitectureSearchResult,
    ScalingFit,
    architecture_search,
    fit_scaling_law,
    phi,
)

ALPHA, BETA, C = 0.6, 0.25, 3.0
WIDTHS = (32, 64, 128, 256, 512)
DEPTHS = (2, 4, 6, 8)


def synthetic(rng, noise=0.1, repeats=2):
    n, L = np.meshgrid(WIDTHS, DEPTHS, indexing="ij")
    n = np.repeat(n.ravel(), repeats).astype(float)
    L = np.repeat(L.ravel(), repeats).astype(float)
    v = C * n**ALPHA * np.exp(BETA * L) * np.exp(noise * rng.standard_normal(n.size))
    return n, L, v


def test_recovers_known_law():
    n, L, v = synthetic(np.random.default_rng(0), noise=0.02)
    fit = fit_scaling_law(n, L, v, n_bootstrap=300)
    assert isinstance(fit, ScalingFit)
    assert fit.alpha == pytest.approx(ALPHA, abs=0.01)
    assert fit.beta == pytest.approx(BETA, abs=0.005)
    assert fit.c == pytest.approx(C, rel=0.05)
    assert fit.r_squared > 0.999
    assert fit.residual_std == pytest.approx(0.02, rel=0.3)
    assert fit.alpha_ci[0] < fit.alpha < fit.alpha_ci[1]
    assert fit.c_ci[0] < fit.c < fit.c_ci[1]
    assert len(fit.residuals) == n.size and abs(np.mean(fit.residuals)) < 1e-12
    assert fit.identifiable == ["c", "alpha", "beta"] and fit.note == ""


def test_interval_coverage():
    """95 % intervals hold the true values at about the nominal rate over 100 synthetic data sets."""
    rng = np.random.default_rng(2024)
    reps = 100
    hits = {"alpha": 0, "beta": 0, "c": 0}
    for k in range(reps):
        n, L, v = synthetic(rng, noise=0.15)
        fit = fit_scaling_law(n, L, v, n_bootstrap=200, seed=k)
        hits["alpha"] += fit.alpha_ci[0] <= ALPHA <= fit.alpha_ci[1]
        hits["beta"] += fit.beta_ci[0] <= BETA <= fit.beta_ci[1]
        hits["c"] += fit.c_ci[0] <= C <= fit.c_ci[1]
    for name, h in hits.items():
        assert 0.85 <= h / reps <= 0.99, (name, h / reps)


def test_cases_bootstrap_and_inputs():
    n, L, v = synthetic(np.random.default_rng(1), noise=0.1)
    res = fit_scaling_law(n, L, v, n_bootstrap=400, bootstrap="cases", seed=3)
    assert res.bootstrap == "cases"
    assert res.alpha_ci[0] < ALPHA < res.alpha_ci[1] and res.beta_ci[0] < BETA < res.beta_ci[1]
    # same fit from lists and tensors
    t = fit_scaling_law(torch.tensor(n), L.tolist(), torch.tensor(v), n_bootstrap=0)
    assert t.alpha == pytest.approx(res.alpha, rel=1e-12) and t.alpha_ci is None


def test_predict_and_band():
    n, L, v = synthetic(np.random.default_rng(5), noise=0.05)
    fit = fit_scaling_law(n, L, v, n_bootstrap=300)
    pred = fit.predict([100.0, 1000.0], 3.0)
    expected = fit.c * np.array([100.0, 1000.0]) ** fit.alpha * np.exp(fit.beta * 3.0)
    np.testing.assert_allclose(pred, expected, rtol=1e-12)
    p, lo, hi = fit.predict(np.array(WIDTHS, dtype=float), 4.0, interval=True)
    assert np.all(lo < p) and np.all(p < hi)
    truth = C * np.array(WIDTHS, dtype=float) ** ALPHA * np.exp(BETA * 4.0)
    assert np.all(np.abs(np.log(p / truth)) < 0.1)
    with pytest.raises(ValueError, match="widths must be positive"):
        fit.predict([-1.0], 2.0)


def test_degenerate_grids():
    rng = np.random.default_rng(8)
    L = np.array([2.0, 4, 6, 8, 2, 4, 6, 8])
    v = 5.0 * np.exp(0.3 * L) * np.exp(0.01 * rng.standard_normal(L.size))
    fit = fit_scaling_law(np.full(L.size, 64.0), L, v, n_bootstrap=100)
    assert fit.alpha is None and fit.alpha_ci is None and fit.beta == pytest.approx(0.3, abs=0.01)
    assert "single width 64" in fit.note and fit.identifiable == ["c", "beta"]
    assert fit.predict(64.0, 5.0) == pytest.approx(5.0 * math.exp(1.5), rel=0.02)
    with pytest.raises(ValueError, match="alpha was not identifiable"):
        fit.predict(128.0, 5.0)
    assert "n/a" in str(fit)
    n = np.array([16.0, 32, 64, 128, 16, 32])
    fit_d = fit_scaling_law(n, np.full(6, 3.0), 2.0 * n**0.5, n_bootstrap=50)
    assert fit_d.beta is None and fit_d.alpha == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(ValueError, match="beta was not identifiable"):
        fit_d.predict(16.0, 4.0)


def test_errors_name_the_problem():
    n, L, v = synthetic(np.random.default_rng(0))
    bad = v.copy()
    bad[4] = -0.3
    with pytest.raises(ValueError, match=r"fit_scaling_law: values must be positive, got min -0.3 at index 4"):
        fit_scaling_law(n, L, bad)
    with pytest.raises(ValueError, match=r"same length, got 40, 40 and 39"):
        fit_scaling_law(n, L, v[:-1])
    with pytest.raises(ValueError, match=r"3 point\(s\) for 3 parameter\(s\) \(c, alpha, beta\); need at least 4"):
        fit_scaling_law([8, 16, 32], [1, 2, 1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="collinear"):
        fit_scaling_law([2, 4, 8, 16], [1, 2, 3, 4], [1.0, 2.0, 3.0, 4.5])
    with pytest.raises(ValueError, match=r"widths must be positive, got min 0 at index 1"):
        fit_scaling_law([8, 0, 32, 64], [1, 2, 1, 2], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=r"values contains 1 non-finite value\(s\) \(first at index 2: nan\)"):
        fit_scaling_law([8, 16, 32, 64], [1, 2, 1, 2], [1.0, 2.0, float("nan"), 4.0])
    with pytest.raises(ValueError, match="confidence must be in"):
        fit_scaling_law(n, L, v, confidence=1.5)
    with pytest.raises(ValueError, match="bootstrap must be 'residuals' or 'cases'"):
        fit_scaling_law(n, L, v, bootstrap="wild")


def test_result_serialises_and_plots():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, L, v = synthetic(np.random.default_rng(9))
    fit = fit_scaling_law(n, L, v, statistic="trace", n_bootstrap=100)
    d = json.loads(json.dumps(fit.to_dict()))
    assert "draws" not in d and d["statistic"] == "trace" and len(d["alpha_ci"]) == 2
    text = str(fit)
    assert "alpha" in text and "R^2" in text
    ax = fit.plot()
    assert len(ax.lines) == len(DEPTHS) and len(ax.collections) >= 2 * len(DEPTHS)  # points + bands
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    plt.close(ax.figure)


# ------------------------------------------------------------------------------ Phi
def test_phi_formula_and_validation():
    # (tr/d) / ||H|| * rank / D = (50/100) / 10 * 20 / 40
    assert phi(50.0, 10.0, 100, 20, 40) == pytest.approx(0.025, rel=1e-15)
    assert phi(torch.tensor(50.0), np.float64(10.0), 100, torch.tensor(20), 40) == pytest.approx(0.025, rel=1e-6)
    assert phi(-50.0, 10.0, 100, 20, 40) == pytest.approx(-0.025)
    with pytest.raises(ValueError, match="phi: spectral_norm must be positive, got 0.0"):
        phi(1.0, 0.0, 10, 2, 3)
    with pytest.raises(ValueError, match="phi: n_params must be positive, got -5.0"):
        phi(1.0, 1.0, -5, 2, 3)
    with pytest.raises(ValueError, match="phi: grad_rank must be >= 0, got -1.0"):
        phi(1.0, 1.0, 10, -1, 3)
    with pytest.raises(ValueError, match="phi: data_dim must be positive, got 0.0"):
        phi(1.0, 1.0, 10, 2, 0)
    with pytest.raises(ValueError, match="phi: trace must be finite, got nan"):
        phi(float("nan"), 1.0, 10, 2, 3)


def test_phi_warns_on_inconsistent_curvature(caplog):
    with caplog.at_level(logging.WARNING, logger="landscape_lab.scaling"):
        phi(1000.0, 1.0, 10, 2, 3)  # mean eigenvalue 100 > spectral norm 1
    assert "exceeds spectral_norm" in caplog.text


def _measure(width, depth):
    n_params = width * width * depth
    return {
        "trace": 0.1 * n_params * (1 + 0.05 * depth),
        "spectral_norm": 2.0 * width**0.5 * math.exp(0.1 * depth),
        "n_params": n_params,
        "grad_rank": min(width, 50),
        "test_accuracy": 0.5 + 0.001 * width,
    }


def test_architecture_search_ranks_by_phi(caplog, capsys):
    widths, depths = [16, 64, 256], [2, 4]
    with caplog.at_level(logging.INFO, logger="landscape_lab.scaling"):
        res = architecture_search(widths, depths, _measure, data_dim=100)
    assert isinstance(res, ArchitectureSearchResult)
    expected = {
        (w, d): phi(m["trace"], m["spectral_norm"], m["n_params"], m["grad_rank"], 100)
        for w in widths
        for d in depths
        for m in [_measure(w, d)]
    }
    best = max(expected, key=expected.get)
    assert (res.best["width"], res.best["depth"]) == best
    phis = [row["phi"] for row in res.table]
    assert phis == sorted(phis, reverse=True) and len(res.table) == 6
    assert [row["rank"] for row in res.table] == [1, 2, 3, 4, 5, 6]
    for row in res.table:
        assert row["phi"] == pytest.approx(expected[(row["width"], row["depth"])], rel=1e-12)
        assert row["test_accuracy"] == pytest.approx(_measure(row["width"], row["depth"])["test_accuracy"])
        assert row["data_dim"] == 100
    grid = res.phi_grid()
    assert grid.shape == (3, 2) and grid[widths.index(best[0]), depths.index(best[1])] == res.best["phi"]
    json.dumps(res.to_dict())
    assert "[6/6]" in caplog.text and capsys.readouterr().out == ""
    assert "rank" in str(res)


def test_architecture_search_errors():
    with pytest.raises(ValueError, match="no data_dim for width=8, depth=1"):
        architecture_search([8], [1], _measure)
    with pytest.raises(ValueError, match=r"evaluate\(width=8, depth=1\) lacks grad_rank"):
        architecture_search([8], [1], lambda w, d: {"trace": 1.0, "spectral_norm": 1.0, "n_params": 3})
    with pytest.raises(ValueError, match="reports data_dim=7 but data_dim=100.0 was passed"):
        architecture_search([8], [1], lambda w, d: dict(_measure(w, d), data_dim=7), data_dim=100)
    with pytest.raises(ValueError, match="configuration width=8, depth=1: phi: spectral_norm must be positive"):
        architecture_search([8], [1], lambda w, d: dict(_measure(w, d), spectral_norm=0.0), data_dim=10)
    with pytest.raises(TypeError, match="must return a dict"):
        architecture_search([8], [1], lambda w, d: 3.0, data_dim=10)
    # per-configuration data_dim is used when no default is passed
    res = architecture_search([8], [1], lambda w, d: dict(_measure(w, d), data_dim=7))
    assert res.best["data_dim"] == 7


def test_weighted_fit_is_weighted_least_squares():
    """weights=w solves min sum w_i (log v_i - log c - alpha log n_i - beta L_i)^2 (numpy's lstsq
    on the sqrt(w)-scaled rows is the reference); equal weights give the unweighted fit; with
    unequal noise the weighted estimate is the closer one."""
    rng = np.random.default_rng(1)
    n, L, _ = synthetic(rng, repeats=1)
    sd = np.where(np.arange(n.size) % 2 == 0, 0.02, 0.4)         # two precisions of log v
    v = C * n**ALPHA * np.exp(BETA * L) * np.exp(sd * rng.standard_normal(n.size))
    w = 1.0 / sd**2
    fit = fit_scaling_law(n, L, v, n_bootstrap=400, weights=w)
    X = np.stack([np.ones_like(n), np.log(n), L], 1)
    ref = np.linalg.lstsq(X * np.sqrt(w)[:, None], np.log(v) * np.sqrt(w), rcond=None)[0]
    assert [math.log(fit.c), fit.alpha, fit.beta] == pytest.approx(ref.tolist(), rel=1e-10)
    assert fit.weights == pytest.approx((w / w.mean()).tolist())
    assert fit.residuals == pytest.approx((np.log(v) - X @ ref).tolist())
    assert fit.alpha_ci[0] < fit.alpha < fit.alpha_ci[1] and fit.beta_ci[0] < fit.beta < fit.beta_ci[1]
    plain = fit_scaling_law(n, L, v, n_bootstrap=0)
    assert abs(fit.alpha - ALPHA) < abs(plain.alpha - ALPHA)      # the precise points count more
    same = fit_scaling_law(n, L, v, n_bootstrap=50, weights=np.full(n.size, 7.0), seed=3)
    ref_same = fit_scaling_law(n, L, v, n_bootstrap=50, seed=3)
    assert same.alpha == pytest.approx(ref_same.alpha) and same.alpha_ci == pytest.approx(
        ref_same.alpha_ci) and same.r_squared == pytest.approx(ref_same.r_squared)
    assert "weighted" in str(fit) and "weighted" not in str(plain)
    with pytest.raises(ValueError, match="weights has 3 entries for 20 points"):
        fit_scaling_law(n, L, v, weights=[1, 2, 3])
    with pytest.raises(ValueError, match="weights must be positive, got 0 at index 4"):
        fit_scaling_law(n, L, v, weights=np.where(np.arange(20) == 4, 0.0, 1.0))
