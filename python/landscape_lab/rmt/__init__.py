r"""Random-matrix fits of Hessian and covariance spectra: semicircle, Marchenko-Pastur, spikes.

The bulk of a Hessian spectrum is often close to Wigner's semicircle and the spectrum of a
gradient covariance close to the Marchenko-Pastur law; a few eigenvalues (spikes) leave the bulk.
This module fits the bulk, reports its edges and goodness of fit, and separates the spikes by the
finite-size (Tracy-Widom) fluctuation of the edge.

Laws (both written with their bulk edges ``a < b``):

* semicircle, centre ``c`` and scale ``s`` (``a, b = c -/+ 2 s``)

  .. math:: \rho(\lambda) = \frac{\sqrt{4 s^2 - (\lambda - c)^2}}{2 \pi s^2}
            = \frac{8 \sqrt{(b - \lambda)(\lambda - a)}}{\pi (b - a)^2}

* Marchenko-Pastur, ratio ``g = p/n`` and scale ``sigma^2`` (eigenvalues of ``X^T X / n`` with
  ``X`` of shape ``n x p`` and i.i.d. entries of variance ``sigma^2``), for ``g <= 1``:
  ``a, b = sigma^2 (1 -/+ sqrt(g))^2`` and

  .. math:: \rho(\lambda) = \frac{\sqrt{(b - \lambda)(\lambda - a)}}{2 \pi \sigma^2 g \lambda}
            = \frac{2 \sqrt{(b - \lambda)(\lambda - a)}}{\pi (\sqrt b - \sqrt a)^2 \lambda}.

  For ``g > 1`` a mass ``1 - 1/g`` sits at zero and the ``n`` non-zero eigenvalues follow the
  law with ratio ``1/g`` and scale ``g sigma^2`` (the same edges).

The BBP transition (Baik, Ben Arous, Peche 2005; Peche 2006 for Wigner matrices): adding
``theta u u^T`` (``|u| = 1``) to a Wigner matrix with semicircle radius ``2 sigma`` creates an outlier
at ``theta + sigma^2 / theta`` when ``|theta| > sigma`` and none otherwise.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import stats
from scipy.integrate import cumulative_trapezoid
from scipy.optimize import brentq

from .._results import ResultMixin, as_float, as_float_array, format_float

__all__ = [
    "SemicircleFit",
    "MarchenkoPasturFit",
    "SpikeReport",
    "fit_semicircle",
    "fit_marchenko_pastur",
    "detect_spikes",
    "bbp_threshold",
    "spike_location",
    "spike_strength",
]

logger = logging.getLogger(__name__)

ArrayLike = Any  # list, numpy array or torch tensor

_MIN_POINTS = 5
_START_FRACTION = 0.9  # the window search starts from the central 90 % of the robust bulk
_BOOT_CHUNK_ELEMENTS = 1_000_000  # bootstrap replicates are refitted in chunks of this many values


# --------------------------------------------------------------------------------------------
# Laws
# --------------------------------------------------------------------------------------------
def _sc_cdf_unit(u: np.ndarray) -> np.ndarray:
    """CDF of the semicircle on [-1, 1] at ``u`` (clipped)."""
    u = np.clip(u, -1.0, 1.0)
    return 0.5 + (u * np.sqrt(1.0 - u * u) + np.arcsin(u)) / math.pi


def _sc_cdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    return _sc_cdf_unit((np.asarray(x, dtype=np.float64) - 0.5 * (a + b)) / (0.5 * (b - a)))


def _sc_pdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    inside = np.clip((b - x) * (x - a), 0.0, None)
    return 8.0 * np.sqrt(inside) / (math.pi * (b - a) ** 2)


# Interquartile range of the semicircle with s = 1 (radius 2): F(q) = 3/4 at u = q / 2.
_SC_Q75_UNIT = brentq(lambda u: _sc_cdf_unit(np.array(u)) - 0.75, 0.0, 1.0, xtol=1e-14)
_SC_IQR_S1 = 2.0 * 2.0 * _SC_Q75_UNIT  # IQR = 2 * q75 with q75 = 2 s u75


_MP_GRID = 4097


def _mp_table(a: float, b: float) -> Tuple[np.ndarray, np.ndarray, float, float]:
    """CDF table of the (normalised) MP law on [a, b] in the angle ``x = m - h cos(theta)``.

    With that substitution ``sqrt((b-x)(x-a)) dx = h^2 sin^2(theta) dtheta`` and the integrand
    ``sin^2(theta) / x(theta)`` is smooth, so a trapezoid rule on 4097 angles is accurate to ~1e-7.
    """
    th = np.linspace(0.0, math.pi, _MP_GRID)
    m, h = 0.5 * (a + b), 0.5 * (b - a)
    xg = m - h * np.cos(th)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(xg > 0, np.sin(th) ** 2 / np.where(xg > 0, xg, 1.0), (1.0 + np.cos(th)) / h)
    F = cumulative_trapezoid(f, th, initial=0.0)
    F /= F[-1]
    return th, F, m, h


def _mp_cdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    th, F, m, h = _mp_table(a, b)
    t = np.arccos(np.clip((m - np.asarray(x, dtype=np.float64)) / h, -1.0, 1.0))
    return np.interp(t, th, F)


def _mp_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    th, F, m, h = _mp_table(a, b)
    return m - h * np.cos(np.interp(q, F, th))


def _mp_pdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    inside = np.clip((b - x) * (x - a), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 2.0 * np.sqrt(inside) / (math.pi * (math.sqrt(b) - math.sqrt(a)) ** 2 * x)
    return np.where(inside > 0, out, 0.0)


def _mp_edges(ratio: float, scale: float) -> Tuple[float, float]:
    r = math.sqrt(ratio)
    return scale * (1.0 - r) ** 2, scale * (1.0 + r) ** 2


def _mp_from_edges(a: float, b: float) -> Tuple[float, float]:
    """(ratio <= 1, scale) of the MP law with edges a, b."""
    sa, sb = math.sqrt(max(a, 0.0)), math.sqrt(b)
    return ((sb - sa) / (sb + sa)) ** 2, (0.5 * (sa + sb)) ** 2


@functools.lru_cache(maxsize=1)
def _mp_shape_table() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ratio grid, IQR/median at scale 1, median at scale 1) for the quantile-matching start."""
    ratios = np.geomspace(1e-4, 1.0, 241)
    shape, med = np.empty_like(ratios), np.empty_like(ratios)
    for i, g in enumerate(ratios):
        a, b = _mp_edges(g, 1.0)
        q25, q50, q75 = _mp_ppf(np.array([0.25, 0.5, 0.75]), a, b)
        shape[i], med[i] = (q75 - q25) / q50, q50
    for arr in (ratios, shape, med):
        arr.setflags(write=False)
    return ratios, shape, med


def _tw_scale_mp(scale: float, ratio: float, n_samples: float) -> float:
    """Tracy-Widom scale of the largest eigenvalue of X^T X / n (Johnstone 2001), ratio <= 1."""
    r = math.sqrt(ratio)
    return scale * (1.0 + r) * (1.0 + 1.0 / r) ** (1.0 / 3.0) * n_samples ** (-2.0 / 3.0)


# --------------------------------------------------------------------------------------------
# Edge maximum likelihood (vectorised over bootstrap replicates)
# --------------------------------------------------------------------------------------------
def _edge_loglik(x: np.ndarray, w: np.ndarray, a: np.ndarray, b: np.ndarray, law: str) -> np.ndarray:
    """Mean log-likelihood (up to a constant) of rows of x (weights w) under the law on [a, b]."""
    t = 0.5 * (w * (np.log(b[:, None] - x) + np.log(x - a[:, None]))).sum(axis=1)
    if law == "semicircle":
        return t - 2.0 * np.log(b - a)
    return t - 2.0 * np.log(np.sqrt(b) - np.sqrt(a))


def _edge_grad_hess(x, w, a, b, law):
    rb = 1.0 / (b[:, None] - x)
    ra = 1.0 / (x - a[:, None])
    sb1, sa1 = 0.5 * (w * rb).sum(1), 0.5 * (w * ra).sum(1)
    sb2, sa2 = 0.5 * (w * rb * rb).sum(1), 0.5 * (w * ra * ra).sum(1)
    if law == "semicircle":
        d = b - a
        na, nb = -2.0 / d, 2.0 / d
        naa = nbb = -2.0 / d**2
        nab = 2.0 / d**2
    else:  # N = 2 log(sqrt(b) - sqrt(a))
        sa, sb = np.sqrt(a), np.sqrt(b)
        r = sb - sa
        na, nb = -1.0 / (sa * r), 1.0 / (sb * r)
        naa = (r / (2.0 * sa) - 0.5) / (a * r * r)
        nbb = -(r / (2.0 * sb) + 0.5) / (b * r * r)
        nab = 1.0 / (2.0 * sa * sb * r * r)
    ga, gb = -sa1 - na, sb1 - nb
    return ga, gb, -sa2 - naa, -sb2 - nbb, -nab


def _edge_mle(
    x: np.ndarray, w: np.ndarray, a: np.ndarray, b: np.ndarray, law: str, max_iter: int = 200
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximise the weighted log-likelihood over the edges (a, b), one problem per row.

    Damped Newton with a fraction-to-boundary rule that keeps every point of positive weight
    strictly inside (a, b) (and a > 0 for MP) and Armijo backtracking; where the Hessian is not
    negative definite it is shifted (Levenberg). The log-likelihood tends to -inf at the
    boundary of the feasible set and as the support grows, so a maximiser exists.

    Returns (a, b, converged) arrays of shape (rows,).
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    w = np.atleast_2d(np.asarray(w, dtype=np.float64))
    w = w / w.sum(axis=1, keepdims=True)
    pos = w > 0
    fill = x[np.arange(x.shape[0]), np.argmax(w, axis=1)]
    x = np.where(pos, x, fill[:, None])  # zero-weight points must not constrain the edges
    xmin, xmax = x.min(axis=1), x.max(axis=1)
    a = np.array(a, dtype=np.float64, copy=True).reshape(-1)
    b = np.array(b, dtype=np.float64, copy=True).reshape(-1)
    span = np.maximum(xmax - xmin, 1e-12 * np.maximum(np.abs(xmax), 1.0))
    a = np.minimum(a, xmin - 1e-3 * span)
    b = np.maximum(b, xmax + 1e-3 * span)
    if law == "marchenko_pastur":
        a = np.where(a <= 0, 0.5 * xmin, a)
    f = _edge_loglik(x, w, a, b, law)
    converged = np.zeros(x.shape[0], dtype=bool)
    for _ in range(max_iter):
        act = np.nonzero(~converged)[0]
        if act.size == 0:
            break
        xa, wa, aa, ba, fa = x[act], w[act], a[act], b[act], f[act]
        ga, gb, haa, hbb, hab = _edge_grad_hess(xa, wa, aa, ba, law)
        tr = haa + hbb
        det = haa * hbb - hab * hab
        lam_max = 0.5 * (tr + np.sqrt((haa - hbb) ** 2 + 4.0 * hab * hab))
        shift = np.where((det > 0) & (tr < 0), 0.0, lam_max + 1e-3 * np.abs(tr) + 1e-12)
        h11, h22 = haa - shift, hbb - shift
        dets = h11 * h22 - hab * hab
        da = -(h22 * ga - hab * gb) / dets
        db = -(-hab * ga + h11 * gb) / dets
        dec = ga * da + gb * db  # Newton decrement^2, >= 0
        done = dec <= 1e-14 * np.maximum(1.0, np.abs(fa))
        tau = np.ones_like(aa)
        m = da > 0
        tau[m] = np.minimum(tau[m], 0.99 * (xmin[act][m] - aa[m]) / da[m])
        m = db < 0
        tau[m] = np.minimum(tau[m], 0.99 * (ba[m] - xmax[act][m]) / (-db[m]))
        if law == "marchenko_pastur":
            m = da < 0
            tau[m] = np.minimum(tau[m], 0.99 * aa[m] / (-da[m]))
        accepted = done.copy()
        new_a, new_b, new_f = aa.copy(), ba.copy(), fa.copy()
        for _ in range(60):
            todo = np.nonzero(~accepted)[0]
            if todo.size == 0:
                break
            ta, tb = aa[todo] + tau[todo] * da[todo], ba[todo] + tau[todo] * db[todo]
            with np.errstate(invalid="ignore", divide="ignore"):
                ft = _edge_loglik(xa[todo], wa[todo], ta, tb, law)
            ok = np.isfinite(ft) & (ft >= fa[todo] + 1e-4 * tau[todo] * dec[todo])
            sel = todo[ok]
            new_a[sel], new_b[sel], new_f[sel] = ta[ok], tb[ok], ft[ok]
            accepted[sel] = True
            tau[todo[~ok]] *= 0.5
        stalled = ~accepted  # no ascent possible at machine precision: treat as converged
        a[act], b[act], f[act] = new_a, new_b, new_f
        converged[act] = done | stalled
    return a, b, converged


def _bootstrap_edges(draw, n_rows: int, n_cols: int, a: float, b: float, law: str) -> Tuple[np.ndarray, np.ndarray]:
    """Edge MLEs of ``n_rows`` replicates ``draw(k) -> (x, w)`` (k rows each), in memory-bounded chunks."""
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // max(n_cols, 1))
    out_a, out_b = [], []
    for start in range(0, n_rows, chunk):
        k = min(chunk, n_rows - start)
        x, w = draw(k)
        ra, rb, _ = _edge_mle(x, w, np.full(x.shape[0], a), np.full(x.shape[0], b), law)
        out_a.append(ra)
        out_b.append(rb)
    return np.concatenate(out_a), np.concatenate(out_b)


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------
def _weighted_quantile(x: np.ndarray, w: np.ndarray, q: Sequence[float]) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    xs, ws = x[order], w[order]
    cw = np.cumsum(ws)
    total = cw[-1]
    mid = (cw - 0.5 * ws) / total
    return np.interp(np.asarray(q, dtype=np.float64), mid, xs)


@dataclasses.dataclass
class _Sample:
    x: np.ndarray  # (M,) positions
    w: np.ndarray  # (M,) weights summing to 1
    probe: Optional[np.ndarray]  # (M,) probe index for a density, None for eigenvalues
    n_probes: int
    kind: str  # "eigenvalues" | "density"


def _looks_like_pair(obj: Any) -> bool:
    """A ``(nodes, weights)`` tuple of two arrays (not a tuple of eigenvalues)."""
    return isinstance(obj, tuple) and len(obj) == 2 and all(np.ndim(o) >= 1 for o in obj)


def _parse_sample(obj: Any, func: str) -> _Sample:
    if hasattr(obj, "nodes") and hasattr(obj, "weights"):
        nodes, weights = obj.nodes, obj.weights
    elif _looks_like_pair(obj):
        nodes, weights = obj
    else:
        x = as_float_array(obj, "eigenvalues", func, ndim=1, min_size=_MIN_POINTS)
        return _Sample(x, np.full(x.size, 1.0 / x.size), None, 0, "eigenvalues")
    nodes = as_float_array(nodes, "density nodes", func, ndim=None)
    weights = as_float_array(weights, "density weights", func, ndim=None)
    if nodes.shape != weights.shape:
        raise ValueError(
            f"{func}: density nodes and weights must have the same shape, got "
            f"{tuple(nodes.shape)} and {tuple(weights.shape)}"
        )
    if nodes.ndim == 1:
        nodes, weights = nodes[None, :], weights[None, :]
    if nodes.ndim != 2:
        raise ValueError(f"{func}: density nodes must have shape (n_probes, n_steps), got {tuple(nodes.shape)}")
    wmax = float(np.abs(weights).max()) if weights.size else 0.0
    if (weights < -1e-10 * max(wmax, 1e-300)).any():
        i = np.unravel_index(int(np.argmin(weights)), weights.shape)
        raise ValueError(f"{func}: density weights must be >= 0, got {weights[i]:.3g} at index {tuple(int(k) for k in i)}")
    weights = np.clip(weights, 0.0, None)
    sums = weights.sum(axis=1)
    if (sums <= 0).any():
        raise ValueError(f"{func}: density weights of probe {int(np.argmin(sums))} sum to 0")
    if np.abs(sums - 1.0).max() > 1e-3:
        logger.debug("%s: density weights per probe sum to %s, renormalising", func, sums)
    n_probes = nodes.shape[0]
    w = (weights / sums[:, None] / n_probes).reshape(-1)
    x = nodes.reshape(-1)
    probe = np.repeat(np.arange(n_probes), nodes.shape[1])
    keep = w > 0
    if int(keep.sum()) < _MIN_POINTS:
        raise ValueError(f"{func}: density needs at least {_MIN_POINTS} nodes of positive weight, got {int(keep.sum())}")
    return _Sample(x[keep], w[keep], probe[keep], n_probes, "density")


def _weighted_ks(z: np.ndarray, w: np.ndarray, cdf) -> float:
    """Kolmogorov-Smirnov distance between the weighted empirical CDF of z and ``cdf``."""
    ux, inv = np.unique(z, return_inverse=True)
    uw = np.bincount(inv, weights=w)
    cw = np.cumsum(uw) / uw.sum()
    F = cdf(ux)
    before = np.concatenate([[0.0], cw[:-1]])
    return float(max(np.max(np.abs(cw - F)), np.max(np.abs(F - before))))


def _check_positive(value: float, name: str, func: str) -> float:
    value = as_float(value, name, func)
    if value <= 0:
        raise ValueError(f"{func}: {name} must be positive, got {value}")
    return value


def _check_bootstrap(n_bootstrap: int, func: str) -> int:
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 0 or n_bootstrap == 1:
        raise ValueError(f"{func}: n_bootstrap must be 0 or an integer >= 2, got {n_bootstrap}")
    return int(n_bootstrap)


# --------------------------------------------------------------------------------------------
# Semicircle
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SemicircleFit(ResultMixin):
    """Result of :func:`fit_semicircle` (all quantities in eigenvalue units).

    Attributes
    ----------
    center, sigma : float
        Fitted centre ``c`` and scale ``s``; the bulk is ``[c - 2s, c + 2s]``.
    center_se, sigma_se : float or None
        Bootstrap standard errors (``None`` when not computed, see ``se_method``).
    lower_edge, upper_edge : float
        ``c - 2 s`` and ``c + 2 s``.
    ks_statistic : float
        Kolmogorov-Smirnov distance between the (weighted) empirical CDF of the bulk points and
        the fitted law.
    ks_pvalue : float or None
        Its p-value for eigenvalue input (``None`` for a weighted density).
    n_used, n_total : int
        Points (eigenvalues or density nodes) inside the fitted bulk window, and all points.
    outlier_mass : float
        Fraction of the sample (weight for a density) outside the bulk window.
    threshold : float
        Edge margin used to separate the bulk from outliers (eigenvalue units).
    matrix_size : int or None
        ``N`` used for the Tracy-Widom margin.
    source, method, se_method : str
        Input kind, estimator and standard-error method.
    """

    center: float
    sigma: float
    center_se: Optional[float]
    sigma_se: Optional[float]
    lower_edge: float
    upper_edge: float
    ks_statistic: float
    ks_pvalue: Optional[float]
    n_used: int
    n_total: int
    outlier_mass: float
    threshold: float
    matrix_size: Optional[int]
    source: str
    method: str
    se_method: str
    converged: bool = True

    @property
    def edges(self) -> Tuple[float, float]:
        """``(c - 2s, c + 2s)``."""
        return (self.lower_edge, self.upper_edge)

    def pdf(self, x: ArrayLike) -> np.ndarray:
        """Fitted density ``sqrt(4 s^2 - (x - c)^2) / (2 pi s^2)`` (0 outside the bulk)."""
        return _sc_pdf(as_float_array(x, "x", "SemicircleFit.pdf", ndim=None), self.lower_edge, self.upper_edge)

    def cdf(self, x: ArrayLike) -> np.ndarray:
        """Fitted cumulative distribution function."""
        return _sc_cdf(as_float_array(x, "x", "SemicircleFit.cdf", ndim=None), self.lower_edge, self.upper_edge)

    def __str__(self) -> str:
        p = "n/a (weighted density)" if self.ks_pvalue is None else format_float(self.ks_pvalue)
        se_c = "" if self.center_se is None else f" +- {format_float(self.center_se)}"
        se_s = "" if self.sigma_se is None else f" +- {format_float(self.sigma_se)}"
        return (
            f"SemicircleFit ({self.source}: {self.n_used} of {self.n_total} points in the bulk; {self.method})\n"
            f"  center = {format_float(self.center)}{se_c}\n"
            f"  sigma  = {format_float(self.sigma)}{se_s}\n"
            f"  bulk   = [{format_float(self.lower_edge)}, {format_float(self.upper_edge)}]"
            f"  (edge margin {format_float(self.threshold)})\n"
            f"  KS D = {format_float(self.ks_statistic)}, p = {p}"
        )


def fit_semicircle(
    eigenvalues_or_density: Any,
    *,
    tw_multiple: float = 5.0,
    edge_margin: Optional[float] = None,
    matrix_size: Optional[int] = None,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> SemicircleFit:
    r"""Fit Wigner's semicircle to eigenvalues or to a stochastic-Lanczos-quadrature density.

    .. math:: \rho(\lambda) = \frac{\sqrt{4 s^2 - (\lambda - c)^2}}{2 \pi s^2},
              \qquad \lambda \in [c - 2s,\ c + 2s].

    Method
    ------
    1. Robust start: ``c0`` = (weighted) median, ``s0`` = (weighted) interquartile range divided
       by the semicircle's IQR at ``s = 1`` (1.6160...), so a few spikes cannot move it.
    2. Bulk window: start from the central 90 % of ``[c0 - 2 s0, c0 + 2 s0]``; maximise the
       likelihood of the points in the window over the edges ``(a, b) = (c - 2s, c + 2s)``
       (the log-likelihood is a log-barrier, so the fitted support contains every point used);
       then add every point within ``threshold`` of the fitted edges and refit, until the window
       stops growing. The window only grows, so the iteration ends; points separated from the
       bulk by a gap larger than ``threshold`` (spikes) are never used.
    3. ``threshold = tw_multiple * s * N^(-2/3)``: the Tracy-Widom scale of the edge of a GOE-like
       bulk of size ``N`` (``N`` = number of eigenvalues; for a density ``matrix_size`` if given,
       else the number of Lanczos nodes per probe, which is conservative). ``edge_margin``
       overrides it with an absolute value.
    4. Goodness of fit: Kolmogorov-Smirnov distance between the empirical CDF of the points in
       the window and the fitted CDF, with scipy's p-value for eigenvalues. The p-value ignores
       that ``c, s`` were fitted (conservative, Lilliefors) and assumes independent points,
       while eigenvalues of a random matrix repel (rigidity): for a true GOE it is close to 1.
       For a weighted density the p-value is undefined (``None``).
    5. Standard errors by bootstrap (``n_bootstrap`` replicates, ``seed``): for eigenvalues a
       parametric bootstrap (``n_used`` i.i.d. draws from the fitted law, refitted), whose mean
       also removes the inward bias of the edge MLE (about one standard error: the law vanishes
       like a square root at its edges, so the MLE is not regular; ``a <- 2 a - mean(a*)``, same
       for ``b``; the KS statistic uses the corrected edges); for a density
       with several probes, resampling probes (each probe is an independent estimate of the
       density). They describe i.i.d. sampling, so they overstate the error for a rigid random
       matrix spectrum. A single-probe density or ``n_bootstrap=0`` gives ``None``.

    Parameters
    ----------
    eigenvalues_or_density : array-like or density
        1-D eigenvalues (list, numpy array, torch tensor), or an SLQ density: an object with
        ``.nodes`` and ``.weights`` of shape ``(n_probes, n_steps)`` (each probe's weights sum to
        1), or a ``(nodes, weights)`` tuple. A density is treated as a weighted sample.
    tw_multiple : float
        Multiple of the Tracy-Widom edge scale ``s N^(-2/3)`` used as the bulk/outlier margin.
    edge_margin : float, optional
        Absolute margin (eigenvalue units), overriding ``tw_multiple``.
    matrix_size : int, optional
        Matrix dimension ``N`` behind a density (only used for the margin).
    n_bootstrap : int
        Bootstrap replicates for the standard errors (0 disables).
    seed : int
        Seed of the bootstrap.

    Returns
    -------
    SemicircleFit

    Raises
    ------
    ValueError
        NaN/Inf input, fewer than 5 points, all points equal, bad arguments.
    """
    func = "fit_semicircle"
    tw_multiple = _check_positive(tw_multiple, "tw_multiple", func)
    n_bootstrap = _check_bootstrap(n_bootstrap, func)
    sample = _parse_sample(eigenvalues_or_density, func)
    x, w = sample.x, sample.w
    if matrix_size is not None:
        if int(matrix_size) != matrix_size or matrix_size < 1:
            raise ValueError(f"{func}: matrix_size must be a positive integer, got {matrix_size}")
        n_size = int(matrix_size)
    elif sample.kind == "eigenvalues":
        n_size = x.size
    else:
        n_size = int(np.ceil(x.size / max(sample.n_probes, 1)))

    loc = float(_weighted_quantile(x, w, [0.5])[0])
    q25, q75 = _weighted_quantile(x, w, [0.25, 0.75])
    spread = float(q75 - q25)
    if not spread > 0:
        spread = float(np.sqrt(np.sum(w * (x - loc) ** 2)))
    if not spread > 0:
        raise ValueError(f"{func}: all {x.size} points equal {loc}; a semicircle needs a spread")
    z = (x - loc) / spread  # normalised units: median 0, IQR 1
    if edge_margin is not None:
        margin_abs = _check_positive(edge_margin, "edge_margin", func) / spread
    else:
        margin_abs = None

    def margin(s_cur: float) -> float:
        return margin_abs if margin_abs is not None else tw_multiple * s_cur * n_size ** (-2.0 / 3.0)

    s0 = 1.0 / _SC_IQR_S1
    a, b = -2.0 * s0 * _START_FRACTION, 2.0 * s0 * _START_FRACTION
    mask = (z >= a) & (z <= b)
    if mask.sum() < _MIN_POINTS:
        mask = np.ones_like(mask)
    converged = True
    for _ in range(200):
        aa, bb, conv = _edge_mle(z[mask][None, :], w[mask][None, :], [a], [b], "semicircle")
        a, b = float(aa[0]), float(bb[0])
        converged = bool(conv[0])
        m = margin((b - a) / 4.0)
        new_mask = (z >= a - m) & (z <= b + m)
        if np.array_equal(new_mask, mask):
            break
        mask = new_mask | mask
    else:  # pragma: no cover - the window grows monotonically, so this is not reached
        logger.warning("%s: bulk window did not settle in 200 refits", func)

    wz = w[mask] / w[mask].sum()
    zin = z[mask]
    c_se = s_se = None
    se_method = "none"
    method = "maximum likelihood over the bulk window (robust median/IQR start)"
    rng = np.random.default_rng(seed)
    if n_bootstrap >= 2 and sample.kind == "eigenvalues":
        a_fit, b_fit = a, b

        def draw(k):
            x_ = a_fit + (b_fit - a_fit) * rng.beta(1.5, 1.5, size=(k, zin.size))
            return x_, np.ones_like(x_)

        ab, bb = _bootstrap_edges(draw, n_bootstrap, zin.size, a, b, "semicircle")
        # The edge MLE converges fast (n^(-2/3)) but is biased inwards by about one standard
        # error; the parametric bootstrap estimates that bias and it is removed.
        a, b = 2.0 * a - float(ab.mean()), 2.0 * b - float(bb.mean())
        c_se = float(np.std(0.5 * (ab + bb), ddof=1)) * spread
        s_se = float(np.std(0.25 * (bb - ab), ddof=1)) * spread
        se_method = f"parametric bootstrap ({n_bootstrap} replicates of {zin.size} i.i.d. draws)"
        method += ", parametric-bootstrap bias correction"
    elif n_bootstrap >= 2 and sample.n_probes >= 2:
        probe = sample.probe[mask]
        counts = rng.multinomial(sample.n_probes, np.full(sample.n_probes, 1.0 / sample.n_probes), size=n_bootstrap)
        counts = counts[(counts[:, probe] * wz[None, :]).sum(axis=1) > 0]
        rows = iter(range(0, len(counts)))

        def draw(k):
            idx = [next(rows) for _ in range(k)]
            wb = counts[idx][:, probe] * wz[None, :]
            return np.broadcast_to(zin, wb.shape), wb

        ab, bb = _bootstrap_edges(draw, len(counts), zin.size, a, b, "semicircle")
        c_se = float(np.std(0.5 * (ab + bb), ddof=1)) * spread
        s_se = float(np.std(0.25 * (bb - ab), ddof=1)) * spread
        se_method = f"bootstrap over {sample.n_probes} probes ({n_bootstrap} replicates)"
    elif sample.kind == "density" and n_bootstrap >= 2:
        se_method = "none (a single-probe density has no independent replicate)"

    # Final window with the final edges (it can only grow after the outward bias correction).
    thr = margin((b - a) / 4.0)
    mask = mask | ((z >= a - thr) & (z <= b + thr))
    wz = w[mask] / w[mask].sum()
    zin = z[mask]
    if sample.kind == "eigenvalues":
        ks = stats.kstest(zin, lambda t: _sc_cdf(t, a, b))
        ks_stat, ks_p = float(ks.statistic), float(ks.pvalue)
    else:
        ks_stat, ks_p = _weighted_ks(zin, wz, lambda t: _sc_cdf(t, a, b)), None

    c, s = 0.5 * (a + b) * spread + loc, 0.25 * (b - a) * spread
    res = SemicircleFit(
        center=c,
        sigma=s,
        center_se=c_se,
        sigma_se=s_se,
        lower_edge=c - 2.0 * s,
        upper_edge=c + 2.0 * s,
        ks_statistic=ks_stat,
        ks_pvalue=ks_p,
        n_used=int(mask.sum()),
        n_total=int(x.size),
        outlier_mass=float(w[~mask].sum()),
        threshold=thr * spread,
        matrix_size=n_size,
        source=sample.kind,
        method=method,
        se_method=se_method,
        converged=converged,
    )
    logger.debug("%s: %s", func, res)
    return res


# --------------------------------------------------------------------------------------------
# Marchenko-Pastur
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MarchenkoPasturFit(ResultMixin):
    """Result of :func:`fit_marchenko_pastur` (eigenvalue units).

    Attributes
    ----------
    ratio : float
        ``p / n``; when fitted from the non-zero eigenvalues alone it is reported ``<= 1``.
    scale : float
        ``sigma^2``, the entry variance.
    ratio_se, scale_se : float or None
        Standard errors (``None`` when the quantity was given or fixed by the zero count).
    lower_edge, upper_edge : float
        ``sigma^2 (1 -/+ sqrt(ratio))^2``.
    ks_statistic, ks_pvalue : float
        KS distance of the non-zero bulk eigenvalues to the fitted law (continuous part,
        normalised) and its p-value.
    n_used, n_total, n_zero, n_outliers : int
        Eigenvalues in the bulk window, all eigenvalues, exact zeros, positive ones outside.
    threshold : float
        Edge margin (Tracy-Widom scale times ``tw_multiple``).
    ratio_source : str
        ``"given"``, ``"zero count"`` or ``"maximum likelihood"``.
    """

    ratio: float
    scale: float
    ratio_se: Optional[float]
    scale_se: Optional[float]
    lower_edge: float
    upper_edge: float
    ks_statistic: float
    ks_pvalue: float
    n_used: int
    n_total: int
    n_zero: int
    n_outliers: int
    threshold: float
    ratio_source: str
    method: str
    se_method: str
    zero_tol: float
    converged: bool = True

    @property
    def edges(self) -> Tuple[float, float]:
        return (self.lower_edge, self.upper_edge)

    def pdf(self, x: ArrayLike) -> np.ndarray:
        """Density of the non-zero part, normalised to 1 on the bulk."""
        return _mp_pdf(as_float_array(x, "x", "MarchenkoPasturFit.pdf", ndim=None), self.lower_edge, self.upper_edge)

    def cdf(self, x: ArrayLike) -> np.ndarray:
        """CDF of the non-zero part, normalised to 1 on the bulk."""
        return _mp_cdf(as_float_array(x, "x", "MarchenkoPasturFit.cdf", ndim=None), self.lower_edge, self.upper_edge)

    def __str__(self) -> str:
        se_r = "" if self.ratio_se is None else f" +- {format_float(self.ratio_se)}"
        se_s = "" if self.scale_se is None else f" +- {format_float(self.scale_se)}"
        return (
            f"MarchenkoPasturFit ({self.n_used} of {self.n_total} eigenvalues in the bulk, "
            f"{self.n_zero} zero, {self.n_outliers} outside)\n"
            f"  ratio   = {format_float(self.ratio)}{se_r} ({self.ratio_source})\n"
            f"  sigma^2 = {format_float(self.scale)}{se_s}\n"
            f"  bulk    = [{format_float(self.lower_edge)}, {format_float(self.upper_edge)}]"
            f"  (edge margin {format_float(self.threshold)})\n"
            f"  KS D = {format_float(self.ks_statistic)}, p = {format_float(self.ks_pvalue)}"
        )


def _input_eps(x: Any) -> float:
    dt = getattr(x, "dtype", None)
    if dt is not None and type(x).__module__.startswith("torch"):
        import torch  # only reached for torch input

        return float(torch.finfo(dt).eps) if dt.is_floating_point else float(np.finfo(np.float64).eps)
    try:
        dt = np.asarray(x).dtype
        return float(np.finfo(dt).eps) if np.issubdtype(dt, np.floating) else float(np.finfo(np.float64).eps)
    except (TypeError, ValueError):
        return float(np.finfo(np.float64).eps)


def fit_marchenko_pastur(
    eigenvalues: ArrayLike,
    ratio: Optional[float] = None,
    *,
    zero_tol: Optional[float] = None,
    tw_multiple: float = 5.0,
    edge_margin: Optional[float] = None,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> MarchenkoPasturFit:
    r"""Fit the Marchenko-Pastur law to a covariance spectrum.

    For eigenvalues of ``X^T X / n`` with ``X`` of shape ``n x p`` (i.i.d. entries of variance
    ``sigma^2``) and ``g = p / n``, the bulk is ``[sigma^2 (1 - sqrt g)^2, sigma^2 (1 + sqrt g)^2]``
    with density (``g <= 1``)

    .. math:: \rho(\lambda) = \frac{\sqrt{(b - \lambda)(\lambda - a)}}{2 \pi \sigma^2 g \lambda}.

    Zero eigenvalues
    ----------------
    Eigenvalues ``<= zero_tol * max(eigenvalues)`` count as exact zeros (default
    ``zero_tol = p * eps`` of the input dtype, numpy's numerical-rank rule). For ``g > 1`` there
    are ``p - n`` of them and the ``n`` non-zero eigenvalues follow the law with ratio ``1/g`` and
    scale ``g sigma^2`` (same edges). So:

    * ``ratio=None`` with zeros: ``ratio = p / (p - n_zero)`` (exact for a full-rank ``X``), and
      ``sigma^2`` is fitted on the non-zero eigenvalues;
    * ``ratio=None`` without zeros: ``ratio <= 1`` is fitted. (The non-zero part alone cannot tell
      ``(g, sigma^2)`` from ``(1/g, g sigma^2)``; pass the zeros or ``ratio`` to get ``g > 1``.)
    * ``ratio`` given: used as is; a zero count that disagrees with it is logged as a warning and
      zeros are never part of the fitted bulk.

    Negative eigenvalues beyond the tolerance raise (a covariance spectrum is PSD).

    Method
    ------
    The non-zero eigenvalues are fitted like :func:`fit_semicircle`: a robust start (ratio from
    the IQR/median shape, scale from the median), then a bulk window grown from the central 90 %
    until stable, with margin ``threshold = tw_multiple * sigma^2 (1 + sqrt g)(1 + 1/sqrt g)^(1/3)
    n^(-2/3)`` (Johnstone's Tracy-Widom scale of the top edge, used at both edges). With the ratio
    free, the edges ``(a, b)`` are fitted by maximum likelihood; a parametric bootstrap
    (``n_bootstrap`` replicates, ``seed``) gives standard errors and removes the edge MLE's inward
    bias as in :func:`fit_semicircle`. With the ratio known, ``sigma^2`` is
    the mean of the bulk eigenvalues (the MP mean) with standard error ``sigma^2 sqrt(g / n_used)``
    (a one-parameter likelihood with the support tied to the scale is not robust to edge
    fluctuations). Goodness of fit: KS distance of the bulk eigenvalues to the fitted law and its
    p-value (conservative: parameters fitted; eigenvalues are rigid).

    Parameters
    ----------
    eigenvalues : array-like
        1-D eigenvalues (list, numpy array, torch tensor).
    ratio : float, optional
        ``p / n`` if known.
    zero_tol : float, optional
        Relative tolerance for exact zeros (see above).
    tw_multiple, edge_margin : float
        Bulk/outlier margin as a multiple of the Tracy-Widom scale, or absolute.
    n_bootstrap : int
        Bootstrap replicates (ratio free only; 0 disables).
    seed : int
        Bootstrap seed.

    Returns
    -------
    MarchenkoPasturFit
    """
    func = "fit_marchenko_pastur"
    eps = _input_eps(eigenvalues)
    lam = as_float_array(eigenvalues, "eigenvalues", func, ndim=1, min_size=_MIN_POINTS)
    tw_multiple = _check_positive(tw_multiple, "tw_multiple", func)
    n_bootstrap = _check_bootstrap(n_bootstrap, func)
    p = lam.size
    top = float(np.max(np.abs(lam)))
    if top == 0:
        raise ValueError(f"{func}: all {p} eigenvalues are zero")
    if zero_tol is None:
        zero_tol = p * eps
    else:
        zero_tol = as_float(zero_tol, "zero_tol", func)
        if zero_tol < 0:
            raise ValueError(f"{func}: zero_tol must be >= 0, got {zero_tol}")
    tol = zero_tol * top
    if lam.min() < -tol:
        i = int(np.argmin(lam))
        raise ValueError(
            f"{func}: eigenvalues must be >= 0 (a covariance spectrum), got min {lam[i]:.6g} at index {i} "
            f"(tolerance {tol:.3g})"
        )
    is_zero = lam <= tol
    n_zero = int(is_zero.sum())
    pos_idx = np.nonzero(~is_zero)[0]
    y_raw = lam[pos_idx]
    if y_raw.size < _MIN_POINTS:
        raise ValueError(f"{func}: needs at least {_MIN_POINTS} non-zero eigenvalues, got {y_raw.size} of {p}")

    if ratio is not None:
        ratio = _check_positive(ratio, "ratio", func)
        ratio_source = "given"
        if ratio > 1:
            expected = p * (1.0 - 1.0 / ratio)
            if n_zero and abs(n_zero - expected) > max(1.0, 0.01 * p):
                logger.warning(
                    "%s: ratio=%.4g implies %.0f zero eigenvalues of %d, found %d", func, ratio, expected, p, n_zero
                )
        elif n_zero:
            logger.warning(
                "%s: ratio=%.4g <= 1 implies no zero eigenvalues, found %d of %d; they are left out", func, ratio, n_zero, p
            )
    elif n_zero:
        ratio = p / (p - n_zero)
        ratio_source = "zero count"
    else:
        ratio_source = "maximum likelihood"
    g_c = None if ratio is None else (ratio if ratio <= 1 else 1.0 / ratio)  # canonical ratio <= 1
    n_pos = y_raw.size

    spread = float(np.median(y_raw))
    y = y_raw / spread
    converged = True

    def margin(scale_c: float, g: float) -> float:
        if edge_margin is not None:
            return _check_positive(edge_margin, "edge_margin", func) / spread
        return tw_multiple * _tw_scale_mp(scale_c, g, n_pos / g)

    if g_c is not None:
        a0, b0 = _mp_edges(g_c, 1.0)
        scale_c = float(np.median(y) / _mp_ppf(np.array([0.5]), a0, b0)[0])
        a, b = _mp_edges(g_c, scale_c)
        m = margin(scale_c, g_c)
        mask = (y >= a - m) & (y <= b + m)
        seen = []
        for _ in range(100):
            if mask.sum() < _MIN_POINTS:
                raise ValueError(f"{func}: fewer than {_MIN_POINTS} eigenvalues fall in the bulk for ratio={ratio:.4g}")
            scale_c = float(y[mask].mean())
            a, b = _mp_edges(g_c, scale_c)
            m = margin(scale_c, g_c)
            new_mask = (y >= a - m) & (y <= b + m)
            if np.array_equal(new_mask, mask):
                break
            key = new_mask.tobytes()
            if key in seen:  # a 2-cycle between windows: keep the larger one
                mask = new_mask | mask
                scale_c = float(y[mask].mean())
                a, b = _mp_edges(g_c, scale_c)
                m = margin(scale_c, g_c)
                converged = False
                break
            seen.append(key)
            mask = new_mask
        scale_c_se = scale_c * math.sqrt(g_c / mask.sum())
        g_se = None
        method = "bulk mean (method of moments) with the ratio fixed"
        se_method = "analytic: sigma^2 sqrt(ratio / n_used) under i.i.d. sampling"
    else:
        ratios, shape, med = _mp_shape_table()
        q25, q50, q75 = np.quantile(y, [0.25, 0.5, 0.75])
        r = (q75 - q25) / q50
        g0 = float(np.interp(r, shape, ratios))
        scale0 = float(q50 / np.interp(g0, ratios, med))
        a0, b0 = _mp_edges(g0, scale0)
        mid, half = 0.5 * (a0 + b0), 0.5 * (b0 - a0) * _START_FRACTION
        a, b = max(mid - half, 0.5 * float(y.min())), mid + half
        mask = (y >= a) & (y <= b)
        if mask.sum() < _MIN_POINTS:
            mask = np.ones(n_pos, dtype=bool)
        for _ in range(200):
            aa, bb, conv = _edge_mle(y[mask][None, :], np.ones((1, int(mask.sum()))), [a], [b], "marchenko_pastur")
            a, b = float(aa[0]), float(bb[0])
            converged = bool(conv[0])
            g_fit, scale_c = _mp_from_edges(a, b)
            m = margin(scale_c, g_fit)
            new_mask = (y >= a - m) & (y <= b + m)
            if np.array_equal(new_mask, mask):
                break
            mask = new_mask | mask
        method = "maximum likelihood of the edges over the bulk window (quantile-matched start)"
        g_se = scale_c_se = None
        se_method = "none"
        if n_bootstrap >= 2:
            rng = np.random.default_rng(seed)
            a_fit, b_fit, n_in = a, b, int(mask.sum())

            def draw(k):
                x_ = _mp_ppf(rng.random((k, n_in)), a_fit, b_fit)
                return x_, np.ones_like(x_)

            ab, bb = _bootstrap_edges(draw, n_bootstrap, n_in, a, b, "marchenko_pastur")
            # Same inward bias of the edge MLE as for the semicircle: removed with the bootstrap.
            a = max(2.0 * a - float(ab.mean()), 0.0)
            b = 2.0 * b - float(bb.mean())
            sa, sb = np.sqrt(ab), np.sqrt(bb)
            g_se = float(np.std(((sb - sa) / (sb + sa)) ** 2, ddof=1))
            scale_c_se = float(np.std((0.5 * (sa + sb)) ** 2, ddof=1))
            se_method = f"parametric bootstrap ({n_bootstrap} replicates of {int(mask.sum())} i.i.d. draws)"
            method += ", parametric-bootstrap bias correction"
        g_c, scale_c = _mp_from_edges(a, b)
        m = margin(scale_c, g_c)
        mask = mask | ((y >= a - m) & (y <= b + m))
        ratio = g_c

    # Back to eigenvalue units and to the user's ratio (> 1: scale = canonical scale / ratio).
    conv_factor = spread / ratio if ratio > 1 else spread
    scale = scale_c * conv_factor
    scale_se = None if scale_c_se is None else scale_c_se * conv_factor
    lower, upper = a * spread, b * spread
    yin = y[mask]
    ks = stats.kstest(yin, lambda t: _mp_cdf(t, a, b))
    res = MarchenkoPasturFit(
        ratio=float(ratio),
        scale=float(scale),
        ratio_se=g_se,
        scale_se=scale_se,
        lower_edge=float(lower),
        upper_edge=float(upper),
        ks_statistic=float(ks.statistic),
        ks_pvalue=float(ks.pvalue),
        n_used=int(mask.sum()),
        n_total=int(p),
        n_zero=n_zero,
        n_outliers=int(n_pos - mask.sum()),
        threshold=float(m * spread),
        ratio_source=ratio_source,
        method=method,
        se_method=se_method,
        zero_tol=float(zero_tol),
        converged=converged,
    )
    logger.debug("%s: %s", func, res)
    return res


# --------------------------------------------------------------------------------------------
# BBP and spikes
# --------------------------------------------------------------------------------------------
def bbp_threshold(sigma: float) -> float:
    r"""BBP threshold of a rank-one spike in a Wigner matrix: ``theta_c = sigma``.

    For ``W + theta u u^T`` with ``W`` of semicircle radius ``2 sigma`` (entry variance
    ``sigma^2 / N``), an outlier leaves the bulk iff ``|theta| > sigma``.
    """
    return _check_positive(sigma, "sigma", "bbp_threshold")


def spike_location(theta: Union[float, ArrayLike], sigma: float) -> Union[float, np.ndarray]:
    r"""BBP prediction of the eigenvalue created by a spike ``theta`` (bulk centred at 0).

    .. math:: \lambda(\theta) = \begin{cases} \theta + \sigma^2 / \theta & |\theta| > \sigma \\
              2 \sigma\, \mathrm{sign}(\theta) & |\theta| \le \sigma \end{cases}

    (``theta = 0`` gives the upper edge ``2 sigma``). Scalars give a float, arrays an array.
    """
    func = "spike_location"
    sigma = _check_positive(sigma, "sigma", func)
    scalar = np.ndim(theta) == 0
    th = as_float_array(theta, "theta", func, ndim=None)
    sign = np.where(th < 0, -1.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(np.abs(th) > sigma, th + sigma**2 / th, 2.0 * sigma * sign)
    return float(out) if scalar else out


def spike_strength(location: Union[float, ArrayLike], sigma: float) -> Union[float, np.ndarray]:
    r"""Invert :func:`spike_location`: the spike ``theta`` that puts an outlier at ``location``.

    .. math:: \theta = \tfrac12 \left(\lambda + \mathrm{sign}(\lambda) \sqrt{\lambda^2 - 4\sigma^2}\right),
              \quad |\lambda| > 2 \sigma,

    and ``sigma * sign(lambda)`` (the threshold) for ``|lambda| <= 2 sigma``.
    """
    func = "spike_strength"
    sigma = _check_positive(sigma, "sigma", func)
    scalar = np.ndim(location) == 0
    lam = as_float_array(location, "location", func, ndim=None)
    sign = np.where(lam < 0, -1.0, 1.0)
    disc = np.sqrt(np.clip(lam * lam - 4.0 * sigma**2, 0.0, None))
    out = np.where(np.abs(lam) > 2.0 * sigma, 0.5 * (lam + sign * disc), sigma * sign)
    return float(out) if scalar else out


@dataclasses.dataclass
class SpikeReport(ResultMixin):
    """Result of :func:`detect_spikes`.

    Attributes
    ----------
    law : str
        ``"semicircle"`` or ``"marchenko_pastur"``.
    n_spikes, n_above, n_below : int
        Outliers in total, above the upper edge, below the lower edge.
    spikes_above : list of float
        Outliers above the bulk, largest first.
    spikes_below : list of float
        Outliers below the bulk, smallest first.
    indices_above, indices_below : list of int
        Their indices in the input.
    theta_above, theta_below : list of float or None
        Semicircle only: the spike strengths ``theta`` that the BBP formula maps to the observed
        outliers (relative to the fitted centre).
    lower_edge, upper_edge, threshold : float
        Fitted bulk edges and the margin an outlier must exceed.
    tw_multiple : float
        Margin in Tracy-Widom units.
    bulk : SemicircleFit or MarchenkoPasturFit
        The bulk fit.
    """

    law: str
    n_spikes: int
    n_above: int
    n_below: int
    spikes_above: list
    spikes_below: list
    indices_above: list
    indices_below: list
    theta_above: Optional[list]
    theta_below: Optional[list]
    lower_edge: float
    upper_edge: float
    threshold: float
    tw_multiple: float
    bulk: Union[SemicircleFit, MarchenkoPasturFit]

    def __str__(self) -> str:
        def fmt(v):
            return "[" + ", ".join(format_float(t) for t in v[:8]) + (", ..." if len(v) > 8 else "") + "]"

        return (
            f"SpikeReport ({self.law}: {self.n_spikes} outlier(s), {self.n_above} above, {self.n_below} below)\n"
            f"  bulk  = [{format_float(self.lower_edge)}, {format_float(self.upper_edge)}], "
            f"margin {format_float(self.threshold)} ({format_float(self.tw_multiple)} x Tracy-Widom)\n"
            f"  above = {fmt(self.spikes_above)}\n"
            f"  below = {fmt(self.spikes_below)}"
        )


def detect_spikes(
    eigenvalues: ArrayLike,
    law: str = "semicircle",
    *,
    tw_multiple: float = 5.0,
    edge_margin: Optional[float] = None,
    ratio: Optional[float] = None,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> SpikeReport:
    r"""Fit the bulk law and report the eigenvalues that lie outside it (spikes).

    An eigenvalue is a spike if it lies beyond a fitted bulk edge by more than
    ``threshold = tw_multiple * (Tracy-Widom scale)``: ``s N^(-2/3)`` for a semicircle of scale
    ``s`` and ``N`` eigenvalues (the GOE edge fluctuation), Johnstone's scale for
    Marchenko-Pastur (see :func:`fit_marchenko_pastur`). The default ``tw_multiple = 5`` keeps false
    detections for a pure GOE/Wishart bulk rare (the Tracy-Widom tail beyond 5 is ~1e-4) while a
    spike ``theta`` a few percent above the BBP threshold is found for ``N`` in the thousands.
    The bulk fit uses the same margin, so the bulk and the spikes partition the eigenvalues
    (exact zeros of a rank-deficient covariance are neither).

    Parameters
    ----------
    eigenvalues : array-like
        1-D eigenvalues.
    law : {"semicircle", "marchenko_pastur"}
        Bulk law.
    tw_multiple, edge_margin : float
        Margin in Tracy-Widom units, or absolute (overrides).
    ratio : float, optional
        Marchenko-Pastur ratio ``p / n`` if known.
    n_bootstrap, seed : int
        Passed to the bulk fit (standard errors).

    Returns
    -------
    SpikeReport
    """
    func = "detect_spikes"
    lam = as_float_array(eigenvalues, "eigenvalues", func, ndim=1, min_size=_MIN_POINTS)
    if law == "semicircle":
        if ratio is not None:
            raise ValueError(f"{func}: ratio applies to law='marchenko_pastur' only, got ratio={ratio}")
        fit = fit_semicircle(lam, tw_multiple=tw_multiple, edge_margin=edge_margin, n_bootstrap=n_bootstrap, seed=seed)
        candidates = np.ones(lam.size, dtype=bool)
    elif law == "marchenko_pastur":
        fit = fit_marchenko_pastur(
            eigenvalues, ratio, tw_multiple=tw_multiple, edge_margin=edge_margin, n_bootstrap=n_bootstrap, seed=seed
        )
        candidates = lam > fit.zero_tol * float(np.max(np.abs(lam)))
    else:
        raise ValueError(f"{func}: law must be 'semicircle' or 'marchenko_pastur', got {law!r}")
    thr = fit.threshold
    up = np.nonzero(candidates & (lam > fit.upper_edge + thr))[0]
    lo = np.nonzero(candidates & (lam < fit.lower_edge - thr))[0]
    up = up[np.argsort(-lam[up], kind="stable")]
    lo = lo[np.argsort(lam[lo], kind="stable")]
    theta_up = theta_lo = None
    if law == "semicircle":
        theta_up = np.atleast_1d(spike_strength(lam[up] - fit.center, fit.sigma)).tolist() if up.size else []
        theta_lo = np.atleast_1d(spike_strength(lam[lo] - fit.center, fit.sigma)).tolist() if lo.size else []
    rep = SpikeReport(
        law=law,
        n_spikes=int(up.size + lo.size),
        n_above=int(up.size),
        n_below=int(lo.size),
        spikes_above=lam[up].tolist(),
        spikes_below=lam[lo].tolist(),
        indices_above=up.tolist(),
        indices_below=lo.tolist(),
        theta_above=theta_up,
        theta_below=theta_lo,
        lower_edge=fit.lower_edge,
        upper_edge=fit.upper_edge,
        threshold=thr,
        tw_multiple=float(tw_multiple),
        bulk=fit,
    )
    logger.info("%s: %d spike(s) (%d above, %d below the %s bulk)", func, rep.n_spikes, rep.n_above, rep.n_below, law)
    return rep
