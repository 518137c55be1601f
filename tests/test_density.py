"""spectral_density (batched SLQ): quadrature exactness, moments, breakdown, broadening."""
from __future__ import annotations

import json
import math

import pytest
import torch

from landscape_ext import HessianOperator, spectral_density

from _spectra import known_spectrum

pytestmark = pytest.mark.usefixtures("single_thread")


def _matrix(ev, seed=0):
    return known_spectrum(ev, seed)[0]


def _probes(r, d, seed):
    g = torch.Generator().manual_seed(seed)
    V = torch.randint(0, 2, (r, d), generator=g, dtype=torch.int8).to(torch.float64) * 2 - 1
    return V / math.sqrt(d)


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_quadrature_is_exact_for_low_degree_moments(reorthogonalize):
    g = torch.Generator().manual_seed(1)
    ev = torch.cat([torch.tensor([8.0, 6.0, -4.0], dtype=torch.float64),
                    torch.randn(197, generator=g, dtype=torch.float64)])
    A = _matrix(ev)
    n = 10
    res = spectral_density(A, n_steps=n, n_probes=4, seed=3, reorthogonalize=reorthogonalize)
    assert res.n_matvecs == 4 * n
    torch.testing.assert_close(res.weights.sum(1), torch.ones(4, dtype=torch.float64))
    V = _probes(4, 200, 3)
    for p in range(0, 2 * n):
        exact = torch.einsum("id,id->i", V, V @ torch.linalg.matrix_power(A, p))
        tol = 1e-9 if reorthogonalize else 1e-6
        torch.testing.assert_close(res.probe_moments(p), exact, rtol=tol, atol=tol * 8.0 ** p)


def test_moments_match_exact_within_stderr(problem, exact_hessian):
    model, loss, data = problem("mlp")
    H = exact_hessian("mlp")
    ev = torch.linalg.eigvalsh(H)
    res = spectral_density(HessianOperator(model, loss, data, mode="double-backward"), n_steps=20, n_probes=16, seed=0)
    for p in (1, 2, 3, 4):
        exact = float((ev ** p).mean())
        est, se = float(res.moments(p)), float(res.moments_stderr(p))
        assert abs(est - exact) <= 3 * se, (p, est, exact, se)
    m = res.moments([1, 2])
    assert m.shape == (2,)
    assert res.n_matvecs == 16 * 20


def test_full_length_lanczos_recovers_the_spectrum():
    ev = torch.linspace(-1, 2, 40, dtype=torch.float64)
    A = _matrix(ev)
    res = spectral_density(A, n_steps=40, n_probes=2, seed=0)
    for i in range(2):
        w = res.weights[i]
        torch.testing.assert_close(res.nodes[i][w > 1e-12], ev[w > 1e-12], rtol=0, atol=1e-9)


def test_early_breakdown_per_probe():
    ev = torch.tensor([1.0] * 30 + [2.0] * 30 + [5.0] * 40, dtype=torch.float64)
    A = _matrix(ev)
    res = spectral_density(A, n_steps=12, n_probes=3, seed=0)
    assert (res.steps == 3).all()
    torch.testing.assert_close(res.weights.sum(1), torch.ones(3, dtype=torch.float64))
    for i in range(3):
        torch.testing.assert_close(res.nodes[i, :3], torch.tensor([1.0, 2.0, 5.0],
                                                                   dtype=torch.float64))
    torch.testing.assert_close(res.moments(1), ev.mean(), rtol=0,
                               atol=4 * float(res.moments_stderr(1)) + 1e-12)


def test_evaluate_band_and_plot(tmp_path):
    g = torch.Generator().manual_seed(0)
    ev = torch.cat([torch.randn(290, generator=g, dtype=torch.float64),
                    torch.tensor([10.0] * 10, dtype=torch.float64)])
    res = spectral_density(_matrix(ev), n_steps=30, n_probes=6, seed=0, progress=False)
    curve = res.evaluate(2000)
    dx = float(curve.grid[1] - curve.grid[0])
    assert abs(float(curve.density.sum()) * dx - 1.0) < 1e-3
    assert (curve.lower <= curve.density + 1e-15).all() and (curve.density <= curve.upper).all()
    lo, hi = res.spectral_range
    assert curve.sigma == pytest.approx((hi - lo) / 100)
    # the outlier mass near 10 is about 10/300
    near = (curve.grid > 9) & (curve.grid < 11)
    assert abs(float(curve.density[near].sum()) * dx - 10 / 300) < 0.02
    c2 = res.evaluate([0.0, 10.0], sigma=0.5)
    assert c2.density.shape == (2,) and c2.sigma == 0.5
    import matplotlib
    matplotlib.use("Agg")
    ax = res.plot()
    ax.figure.savefig(tmp_path / "esd.png")
    assert (tmp_path / "esd.png").stat().st_size > 0


def test_float32_operator_and_half_basis(problem):
    model, loss, (X, y) = problem("mlp")
    op = HessianOperator(model.float(), loss, (X.float(), y), mode="double-backward")
    res = spectral_density(op, n_steps=15, n_probes=4, basis_dtype=torch.bfloat16)
    assert torch.isfinite(res.nodes).all()
    torch.testing.assert_close(res.weights.sum(1), torch.ones(4, dtype=torch.float64))


def test_errors_and_result():
    A = _matrix(torch.linspace(0, 1, 20, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_steps"):
        spectral_density(A, 0)
    with pytest.raises(ValueError, match="n_probes"):
        spectral_density(A, 5, 0)
    with pytest.raises(ValueError, match="distribution"):
        spectral_density(A, 5, 2, distribution="cauchy")
    res = spectral_density(A, 50, 2, seed=9, distribution="gaussian")
    assert res.n_steps == 20  # capped at d
    d = json.loads(res.to_json())
    assert d["seed"] == 9 and d["n_matvecs"] == 40 and len(d["nodes"]) == 2
    assert "alpha" not in d
    assert "SpectralDensityResult(" in str(res)
    with pytest.raises(ValueError, match="sigma"):
        res.evaluate(10, sigma=-1.0)
