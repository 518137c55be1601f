"""The Marchenko-Pastur law fitted to a covariance spectrum (ratio given, fixed by the zero count, or fitted)."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Optional, Tuple

import numpy as np

from .._results import ResultMixin, as_float, as_float_array, format_float
from .edge_fit import _BIAS_CORRECTION, _grow_bulk_window, _parametric_bootstrap, _widen_window
from .laws import ArrayLike, _FittedBulk, _mp_cdf, _mp_edges, _mp_from_edges, _mp_pdf, _mp_ppf, _mp_shape_table, _tw_scale_mp
from .sample import _MIN_POINTS, _check_bootstrap, _check_positive, _input_eps, _ks_test

logger = logging.getLogger(__name__)

_MAX_SCALE_ITERATIONS = 100  # fixed ratio: bulk-mean iterations before giving up on a settled window


@dataclasses.dataclass
class MarchenkoPasturFit(_FittedBulk, ResultMixin):
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

    _law_pdf = staticmethod(_mp_pdf)
    _law_cdf = staticmethod(_mp_cdf)

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


# --------------------------------------------------------------------------------------------
# Steps of the fit
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Spectrum:
    """The positive eigenvalues of a covariance spectrum and the count of exact zeros."""

    positive: np.ndarray
    n_total: int
    n_zero: int
    zero_tol: float


def _split_zeros(lam: np.ndarray, eps: float, zero_tol: Optional[float], func: str) -> _Spectrum:
    """Separate exact zeros (``<= zero_tol * max|lam|``, default ``zero_tol = p * eps``); reject negatives."""
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
    positive = lam[~is_zero]
    if positive.size < _MIN_POINTS:
        raise ValueError(f"{func}: needs at least {_MIN_POINTS} non-zero eigenvalues, got {positive.size} of {p}")
    return _Spectrum(positive, p, int(is_zero.sum()), float(zero_tol))


def _resolve_ratio(ratio: Optional[float], spectrum: _Spectrum, func: str) -> Tuple[Optional[float], str]:
    """(ratio or None when it is to be fitted, its source); a zero count at odds with a given ratio is logged."""
    p, n_zero = spectrum.n_total, spectrum.n_zero
    if ratio is not None:
        ratio = _check_positive(ratio, "ratio", func)
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
        return ratio, "given"
    if n_zero:
        return p / (p - n_zero), "zero count"
    return None, "maximum likelihood"


def _margin_function(
    tw_multiple: float, edge_margin: Optional[float], spread: float, n_pos: int, func: str
) -> Callable[[float, float], float]:
    """Bulk/outlier margin (normalised units) at canonical ``(scale, ratio <= 1)``: Johnstone's TW scale."""
    if edge_margin is not None:
        margin_abs = _check_positive(edge_margin, "edge_margin", func) / spread
        return lambda scale_c, g: margin_abs
    return lambda scale_c, g: tw_multiple * _tw_scale_mp(scale_c, g, n_pos / g)


@dataclasses.dataclass
class _BulkFit:
    """A fitted bulk in normalised units, ``scale`` and ``scale_se`` canonical (for the ratio <= 1)."""

    lower: float
    upper: float
    mask: np.ndarray
    margin: float
    scale: float
    scale_se: Optional[float]
    ratio: float  # as the user sees it: > 1 when given or fixed by the zeros
    ratio_se: Optional[float]
    converged: bool
    method: str
    se_method: str


def _fit_scale_fixed_ratio(y: np.ndarray, ratio: float, margin_at: Callable[[float, float], float], func: str) -> _BulkFit:
    """``sigma^2`` = mean of the bulk window (the MP mean), iterated until the window settles.

    A one-parameter likelihood with the support tied to the scale is not robust to edge
    fluctuations; the moment estimate is. A window seen before (a cycle) ends it with the union
    of the last two windows and ``converged=False``.
    """
    g_c = ratio if ratio <= 1 else 1.0 / ratio  # canonical ratio <= 1

    def window(scale_c: float) -> Tuple[float, float, float, np.ndarray]:
        a, b = _mp_edges(g_c, scale_c)
        margin = margin_at(scale_c, g_c)
        return a, b, margin, (y >= a - margin) & (y <= b + margin)

    a0, b0 = _mp_edges(g_c, 1.0)
    scale_c = float(np.median(y) / _mp_ppf(np.array([0.5]), a0, b0)[0])
    a, b, margin, mask = window(scale_c)
    converged = True
    seen = []
    for _ in range(_MAX_SCALE_ITERATIONS):
        if mask.sum() < _MIN_POINTS:
            raise ValueError(f"{func}: fewer than {_MIN_POINTS} eigenvalues fall in the bulk for ratio={ratio:.4g}")
        scale_c = float(y[mask].mean())
        a, b, margin, new_mask = window(scale_c)
        if np.array_equal(new_mask, mask):
            break
        key = new_mask.tobytes()
        if key in seen:  # a cycle between windows: keep the union of the last two
            mask = new_mask | mask
            scale_c = float(y[mask].mean())
            a, b, margin, _ = window(scale_c)
            converged = False
            break
        seen.append(key)
        mask = new_mask
    return _BulkFit(
        a, b, mask, margin, scale_c, scale_c * math.sqrt(g_c / mask.sum()), ratio, None, converged,
        method="bulk mean (method of moments) with the ratio fixed",
        se_method="analytic: sigma^2 sqrt(ratio / n_used) under i.i.d. sampling",
    )


def _fit_edges_free_ratio(
    y: np.ndarray, margin_at: Callable[[float, float], float], n_bootstrap: int, seed: int, func: str
) -> _BulkFit:
    """Edges by maximum likelihood from a quantile-matched start, bias-corrected by a parametric bootstrap."""
    ratios, shape, med = _mp_shape_table()
    q25, q50, q75 = np.quantile(y, [0.25, 0.5, 0.75])
    g0 = float(np.interp((q75 - q25) / q50, shape, ratios))
    scale0 = float(q50 / np.interp(g0, ratios, med))

    def margin_of_edges(a: float, b: float) -> float:
        g_fit, scale_c = _mp_from_edges(a, b)
        return margin_at(scale_c, g_fit)

    window = _grow_bulk_window(
        y, np.ones(y.size), "marchenko_pastur", _mp_edges(g0, scale0), margin_of_edges, func, lower_floor=0.5 * float(y.min())
    )
    a, b = window.lower, window.upper
    method = "maximum likelihood of the edges over the bulk window (quantile-matched start)"
    g_se = scale_c_se = None
    se_method = "none"
    if n_bootstrap >= 2:
        boot = _parametric_bootstrap("marchenko_pastur", a, b, int(window.mask.sum()), n_bootstrap, np.random.default_rng(seed))
        a, b = boot.lower, boot.upper
        sa, sb = np.sqrt(boot.lower_draws), np.sqrt(boot.upper_draws)
        g_se = float(np.std(((sb - sa) / (sb + sa)) ** 2, ddof=1))
        scale_c_se = float(np.std((0.5 * (sa + sb)) ** 2, ddof=1))
        se_method = boot.se_method
        method += _BIAS_CORRECTION
    g_c, scale_c = _mp_from_edges(a, b)
    margin = margin_at(scale_c, g_c)
    mask = _widen_window(y, window.mask, a, b, margin)
    return _BulkFit(a, b, mask, margin, scale_c, scale_c_se, g_c, g_se, window.converged, method, se_method)


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------
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

    Eigenvalues ``<= zero_tol * max(eigenvalues)`` are exact zeros; without ``ratio`` their count
    fixes ``ratio = p / (p - n_zero)``, and with no zeros either a ``ratio <= 1`` is fitted (the
    non-zero part alone cannot tell ``(g, sigma^2)`` from ``(1/g, g sigma^2)``). Negative
    eigenvalues beyond the tolerance raise. With the ratio free the edges are fitted by maximum
    likelihood over a bulk window, as in :func:`fit_semicircle`, with a parametric bootstrap for
    standard errors and bias; with the ratio known ``sigma^2`` is the mean of the bulk window.
    The margin is ``tw_multiple`` times Johnstone's Tracy-Widom scale of the top edge. The
    method in full, zeros included: ``docs/rmt.md``.

    Parameters
    ----------
    eigenvalues : array-like
        1-D eigenvalues (list, numpy array, torch tensor).
    ratio : float, optional
        ``p / n`` if known.
    zero_tol : float, optional
        Relative tolerance for exact zeros (default ``p * eps`` of the input dtype, numpy's
        numerical-rank rule).
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
    spectrum = _split_zeros(lam, eps, zero_tol, func)
    ratio, ratio_source = _resolve_ratio(ratio, spectrum, func)
    n_pos = spectrum.positive.size
    spread = float(np.median(spectrum.positive))
    y = spectrum.positive / spread
    margin_at = _margin_function(tw_multiple, edge_margin, spread, n_pos, func)
    if ratio is not None:
        bulk = _fit_scale_fixed_ratio(y, ratio, margin_at, func)
    else:
        bulk = _fit_edges_free_ratio(y, margin_at, n_bootstrap, seed, func)

    # Back to eigenvalue units and to the user's ratio (> 1: scale = canonical scale / ratio).
    conv_factor = spread / bulk.ratio if bulk.ratio > 1 else spread
    a, b = bulk.lower, bulk.upper
    ks_stat, ks_p = _ks_test(y[bulk.mask], None, lambda t: _mp_cdf(t, a, b))
    n_used = int(bulk.mask.sum())
    res = MarchenkoPasturFit(
        ratio=float(bulk.ratio),
        scale=float(bulk.scale * conv_factor),
        ratio_se=bulk.ratio_se,
        scale_se=None if bulk.scale_se is None else bulk.scale_se * conv_factor,
        lower_edge=float(a * spread),
        upper_edge=float(b * spread),
        ks_statistic=ks_stat,
        ks_pvalue=ks_p,
        n_used=n_used,
        n_total=int(spectrum.n_total),
        n_zero=spectrum.n_zero,
        n_outliers=int(n_pos - n_used),
        threshold=float(bulk.margin * spread),
        ratio_source=ratio_source,
        method=bulk.method,
        se_method=bulk.se_method,
        zero_tol=spectrum.zero_tol,
        converged=bulk.converged,
    )
    logger.debug("%s: %s", func, res)
    return res
