"""Random-matrix fits on matrices drawn from the laws they fit (GOE, Wishart, spiked Wigner).

Dense eigensolves are the cost here: one GOE of size 2000, one spiked Wigner of size 1000 and a
few Wishart spectra of size <= 500, each computed once per module.
"""
import contextlib
import json
import math

import numpy as np
import pytest
import torch

from landscape_lab.rmt import (
    MarchenkoPasturFit,
    SemicircleFit,
    SpikeReport,
    bbp_threshold,
    detect_spikes,
    fit_marchenko_pastur,
    fit_semicircle,
    spike_location,
    spike_strength,
)

GOE_N, GOE_SIGMA = 2000, 1.5
SPIKED_N, SPIKED_SIGMA = 1000, 1.0
DETECTABLE = (3.0, 1.8, -2.2)  # |theta| > sigma: outliers at theta + sigma^2 / theta
HIDDEN = (0.5, -0.7)  # |theta| < sigma: absorbed by the bulk


@contextlib.contextmanager
def one_thread():
    """Dense linear algebra on one thread: multi-threaded BLAS crawls on a busy shared machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def eigvalsh(m):
    with one_thread():
        return torch.linalg.eigvalsh(torch.from_numpy(np.ascontiguousarray(m))).numpy()


def gram(x, n):
    """x^T x / n."""
    with one_thread():
        t = torch.from_numpy(np.ascontiguousarray(x))
        return ((t.T @ t) / n).numpy()


def goe(n, sigma, rng):
    """GOE with off-diagonal variance sigma^2 / n: semicircle of radius 2 sigma."""
    a = rng.standard_normal((n, n)) * (sigma / math.sqrt(n))
    return (a + a.T) / math.sqrt(2.0)


@pytest.fixture(scope="module")
def goe_eigs():
    rng = np.random.default_rng(1234)
    return eigvalsh(goe(GOE_N, GOE_SIGMA, rng))


@pytest.fixture(scope="module")
def spiked_eigs():
    rng = np.random.default_rng(99)
    h = goe(SPIKED_N, SPIKED_SIGMA, rng)
    thetas = np.array(DETECTABLE + HIDDEN)
    u, _ = np.linalg.qr(rng.standard_normal((SPIKED_N, thetas.size)))
    return eigvalsh(h + (u * thetas) @ u.T)


def slq_density(eigs, n_probes, n_steps, rng):
    """Stochastic Lanczos quadrature of diag(eigs) (same nodes/weights as for Q diag Q^T)."""
    nodes, weights = [], []
    for _ in range(n_probes):
        q = rng.standard_normal(eigs.size)
        q /= np.linalg.norm(q)
        basis = np.zeros((n_steps, eigs.size))
        alpha, beta = np.zeros(n_steps), np.zeros(n_steps - 1)
        for j in range(n_steps):
            basis[j] = q
            w = eigs * q
            alpha[j] = w @ q
            for _ in range(2):  # full reorthogonalisation
                w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
            if j < n_steps - 1:
                beta[j] = np.linalg.norm(w)
                q = w / beta[j]
        theta, vecs = np.linalg.eigh(np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1))
        nodes.append(theta)
        weights.append(vecs[0] ** 2)
    return np.array(nodes), np.array(weights)


class Density:
    def __init__(self, nodes, weights):
        self.nodes, self.weights = nodes, weights


# ------------------------------------------------------------------------------ semicircle
def test_semicircle_goe_recovers_sigma(goe_eigs):
    fit = fit_semicircle(goe_eigs)
    assert isinstance(fit, SemicircleFit)
    assert abs(fit.sigma - GOE_SIGMA) / GOE_SIGMA < 0.02
    assert abs(fit.center) < 0.02 * GOE_SIGMA
    assert fit.upper_edge == pytest.approx(2 * GOE_SIGMA, rel=0.02)
    assert fit.lower_edge == pytest.approx(-2 * GOE_SIGMA, rel=0.02)
    assert fit.n_used == GOE_N and fit.outlier_mass == 0.0
    assert fit.ks_pvalue is not None and fit.ks_pvalue > 0.05
    assert 0 < fit.sigma_se < 0.02 * GOE_SIGMA and 0 < fit.center_se < 0.05 * GOE_SIGMA
    # the fitted law integrates to one on its support
    x = np.linspace(fit.lower_edge, fit.upper_edge, 20001)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    assert trapezoid(fit.pdf(x), x) == pytest.approx(1.0, abs=1e-4)


def test_semicircle_rejects_wrong_law():
    x = np.random.default_rng(3).uniform(-1.0, 1.0, 2000)
    fit = fit_semicircle(x, n_bootstrap=0)
    assert fit.ks_pvalue < 1e-4
    assert fit.sigma_se is None


def test_semicircle_iid_sample_standard_errors():
    rng = np.random.default_rng(11)
    c, s = 0.3, 0.8
    x = c + 2 * s * (2 * rng.beta(1.5, 1.5, 2000) - 1)  # i.i.d. semicircle draws
    fit = fit_semicircle(x, seed=5)
    assert abs(fit.sigma - s) / fit.sigma_se < 3.5
    assert abs(fit.center - c) / fit.center_se < 3.5
    assert fit.ks_pvalue > 0.01


def test_semicircle_input_types_agree():
    x = np.random.default_rng(4).standard_normal(300)
    ref = fit_semicircle(x, n_bootstrap=0)
    for variant in (x.tolist(), torch.tensor(x), torch.tensor(x, dtype=torch.float32)):
        got = fit_semicircle(variant, n_bootstrap=0)
        assert got.sigma == pytest.approx(ref.sigma, rel=1e-5)


def test_semicircle_ignores_spikes(spiked_eigs):
    fit = fit_semicircle(spiked_eigs)
    assert abs(fit.sigma - SPIKED_SIGMA) < 0.02 * SPIKED_SIGMA
    assert fit.n_used == SPIKED_N - len(DETECTABLE)


def test_semicircle_from_slq_density(goe_eigs):
    rng = np.random.default_rng(7)
    nodes, weights = slq_density(goe_eigs, n_probes=8, n_steps=60, rng=rng)
    dens = Density(torch.tensor(nodes), torch.tensor(weights))
    fit = fit_semicircle(dens, matrix_size=GOE_N)
    assert abs(fit.sigma - GOE_SIGMA) / GOE_SIGMA < 0.02
    assert fit.ks_pvalue is None and 0 <= fit.ks_statistic < 0.05
    assert fit.source == "density"
    assert fit.sigma_se is not None and fit.sigma_se > 0  # bootstrap over the 8 probes
    single = fit_semicircle((nodes[0], weights[0]))
    assert abs(single.sigma - GOE_SIGMA) / GOE_SIGMA < 0.03
    assert single.sigma_se is None and "single-probe" in single.se_method


def test_semicircle_errors():
    with pytest.raises(ValueError, match=r"fit_semicircle: eigenvalues contains 1 non-finite value\(s\) \(first at index 2: nan\)"):
        fit_semicircle([0.1, 0.2, float("nan"), 0.3, 0.4, 0.5])
    with pytest.raises(ValueError, match="at least 5 values, got 3"):
        fit_semicircle([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="all 6 points equal 2.0"):
        fit_semicircle([2.0] * 6)
    with pytest.raises(ValueError, match="density weights must be >= 0, got -0.5"):
        fit_semicircle((np.arange(6.0), np.array([0.5, 0.5, 0.5, -0.5, 0.5, 0.5])))
    with pytest.raises(ValueError, match="same shape"):
        fit_semicircle((np.zeros((2, 6)), np.ones((2, 5))))
    with pytest.raises(ValueError, match="n_bootstrap must be 0 or an integer >= 2, got 1"):
        fit_semicircle(np.arange(10.0), n_bootstrap=1)


def test_semicircle_result_serialises(goe_eigs):
    fit = fit_semicircle(goe_eigs, n_bootstrap=20)
    d = json.loads(json.dumps(fit.to_dict()))
    assert d["sigma"] == pytest.approx(fit.sigma) and d["ks_pvalue"] == pytest.approx(fit.ks_pvalue)
    text = str(fit)
    assert "sigma" in text and "KS" in text and len(text.splitlines()) <= 6


# ------------------------------------------------------------------------------ spikes
def test_bbp_formulas():
    assert bbp_threshold(2.0) == 2.0
    assert spike_location(3.0, 1.0) == pytest.approx(3.0 + 1.0 / 3.0)
    assert spike_location(-3.0, 1.0) == pytest.approx(-3.0 - 1.0 / 3.0)
    assert spike_location(0.5, 1.0) == 2.0 and spike_location(-0.5, 1.0) == -2.0
    assert spike_location(1.0, 1.0) == pytest.approx(2.0)  # continuous at the threshold
    arr = spike_location(np.array([0.2, 2.0, -4.0]), 0.5)
    np.testing.assert_allclose(arr, [1.0, 2.125, -4.0625])
    thetas = np.array([1.2, 2.5, -1.7, 6.0])
    np.testing.assert_allclose(spike_strength(spike_location(thetas, 1.1), 1.1), thetas, rtol=1e-12)
    with pytest.raises(ValueError, match="sigma must be positive, got -1.0"):
        spike_location(1.0, -1.0)
    with pytest.raises(ValueError, match="bbp_threshold: sigma must be positive, got 0.0"):
        bbp_threshold(0.0)


def test_detect_spikes_bbp(spiked_eigs):
    rep = detect_spikes(spiked_eigs)
    assert isinstance(rep, SpikeReport)
    above = sorted((t for t in DETECTABLE if t > 0), reverse=True)
    below = sorted(t for t in DETECTABLE if t < 0)
    assert rep.n_above == len(above) and rep.n_below == len(below) and rep.n_spikes == 3
    np.testing.assert_allclose(rep.spikes_above, spike_location(np.array(above), SPIKED_SIGMA), rtol=0.05)
    np.testing.assert_allclose(rep.spikes_below, spike_location(np.array(below), SPIKED_SIGMA), rtol=0.05)
    np.testing.assert_allclose(rep.theta_above, above, rtol=0.1)
    np.testing.assert_allclose(rep.theta_below, below, rtol=0.1)
    assert sorted(rep.indices_above) == [SPIKED_N - 2, SPIKED_N - 1] and rep.indices_below == [0]
    assert rep.threshold == pytest.approx(5.0 * rep.bulk.sigma * SPIKED_N ** (-2 / 3))
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["bulk"]["n_used"] == SPIKED_N - 3
    assert "3 outlier(s)" in str(rep)


def test_detect_spikes_pure_goe_has_none(goe_eigs):
    rep = detect_spikes(goe_eigs, n_bootstrap=20)
    assert rep.n_spikes == 0 and rep.bulk.n_used == GOE_N


def test_detect_spikes_errors():
    x = np.arange(20.0)
    with pytest.raises(ValueError, match="law must be 'semicircle' or 'marchenko_pastur', got 'gauss'"):
        detect_spikes(x, law="gauss")
    with pytest.raises(ValueError, match="ratio applies to law='marchenko_pastur' only"):
        detect_spikes(x, ratio=0.5)
    with pytest.raises(ValueError, match="tw_multiple must be positive, got -2.0"):
        detect_spikes(x, tw_multiple=-2.0)


# ------------------------------------------------------------------------------ Marchenko-Pastur
def wishart_eigs(n, p, scale, rng, spike=None):
    x = rng.standard_normal((n, p)) * math.sqrt(scale)
    if spike is not None:
        x[:, 0] *= math.sqrt(spike)
    if p <= n:
        return eigvalsh(gram(x, n))
    # rank-deficient: the n non-zero eigenvalues of X X^T / n, and p - n zeros with roundoff
    nz = eigvalsh(gram(x.T, n))
    zeros = rng.uniform(-1e-13, 1e-13, p - n)
    return np.concatenate([zeros, nz])


def test_marchenko_pastur_recovers_ratio_and_scale():
    ev = wishart_eigs(2000, 500, 2.0, np.random.default_rng(21))
    fit = fit_marchenko_pastur(ev)
    assert isinstance(fit, MarchenkoPasturFit) and fit.ratio_source == "maximum likelihood"
    assert fit.ratio == pytest.approx(0.25, rel=0.05)
    assert fit.scale == pytest.approx(2.0, rel=0.03)
    assert fit.ratio_se > 0 and fit.scale_se > 0
    assert fit.ks_pvalue > 0.05 and fit.n_zero == 0 and fit.n_outliers == 0
    lo, hi = 2.0 * (1 - 0.5) ** 2, 2.0 * (1 + 0.5) ** 2
    assert fit.lower_edge == pytest.approx(lo, rel=0.05) and fit.upper_edge == pytest.approx(hi, rel=0.03)
    given = fit_marchenko_pastur(torch.tensor(ev), ratio=0.25)
    assert given.ratio == 0.25 and given.ratio_source == "given" and given.ratio_se is None
    assert given.scale == pytest.approx(2.0, rel=0.03)
    json.dumps(fit.to_dict())
    assert "ratio" in str(fit)


def test_marchenko_pastur_rank_deficient():
    n, p, scale = 300, 750, 0.7
    ev = wishart_eigs(n, p, scale, np.random.default_rng(22))
    fit = fit_marchenko_pastur(ev)
    assert fit.n_zero == p - n and fit.ratio_source == "zero count"
    assert fit.ratio == pytest.approx(p / n, rel=1e-12)
    assert fit.scale == pytest.approx(scale, rel=0.03)
    assert fit.upper_edge == pytest.approx(scale * (1 + math.sqrt(p / n)) ** 2, rel=0.03)
    # the non-zero eigenvalues with the ratio given: the same law
    nonzero = ev[p - n:]
    with_ratio = fit_marchenko_pastur(nonzero, ratio=p / n)
    assert with_ratio.scale == pytest.approx(fit.scale, rel=1e-9)
    # without zeros or ratio only the dual parametrisation (n/p, (p/n) sigma^2) is identifiable
    dual = fit_marchenko_pastur(nonzero)
    assert dual.ratio == pytest.approx(n / p, rel=0.05)
    assert dual.scale == pytest.approx(scale * p / n, rel=0.03)


def test_marchenko_pastur_spiked_covariance():
    n, p, ell = 2000, 400, 6.0
    g = p / n
    ev = wishart_eigs(n, p, 1.0, np.random.default_rng(23), spike=ell)
    rep = detect_spikes(ev, law="marchenko_pastur")
    assert rep.n_above == 1 and rep.n_below == 0
    # Baik-Silverstein location; Gaussian fluctuation sd from Paul (2007)
    predicted = ell * (1 + g / (ell - 1))
    sd = ell * math.sqrt(2 * (1 - g / (ell - 1) ** 2) / n)
    assert abs(rep.spikes_above[0] - predicted) < 3 * sd
    assert rep.theta_above is None
    assert rep.bulk.scale == pytest.approx(1.0, rel=0.03)


def test_marchenko_pastur_errors():
    with pytest.raises(ValueError, match=r"eigenvalues must be >= 0 \(a covariance spectrum\), got min -0.3 at index 4"):
        fit_marchenko_pastur([1.0, 2.0, 1.5, 0.7, -0.3, 1.1, 0.9])
    with pytest.raises(ValueError, match="needs at least 5 non-zero eigenvalues, got 2 of 7"):
        fit_marchenko_pastur([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="ratio must be positive, got -0.5"):
        fit_marchenko_pastur(np.linspace(0.5, 2.0, 20), ratio=-0.5)
    with pytest.raises(ValueError, match="non-finite"):
        fit_marchenko_pastur([1.0, 2.0, float("inf"), 1.0, 1.0, 1.0])
