"""Wigner's semicircle fitted to eigenvalues or to a stochastic-Lanczos-quadrature density."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Tuple

import numpy as np

from .._results import ResultMixin, format_float
from .edge_fit import _BIAS_CORRECTION, _bootstrap_edges, _BulkWindow, _grow_bulk_window, _parametric_bootstrap, _widen_window
from .laws import _SC_IQR_S1, _FittedBulk, _sc_cdf, _sc_pdf
from .sample import _check_bootstrap, _check_positive, _ks_test, _parse_sample, _Sample, _weighted_quantile

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SemicircleFit(_FittedBulk, ResultMixin):
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

    _law_pdf = staticmethod(_sc_pdf)
    _law_cdf = staticmethod(_sc_cdf)

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


# --------------------------------------------------------------------------------------------
# Steps of the fit
# --------------------------------------------------------------------------------------------
def _matrix_size(sample: _Sample, matrix_size: Optional[int], func: str) -> int:
    """``N`` of the Tracy-Widom margin: given, the eigenvalue count, or Lanczos nodes per probe."""
    if matrix_size is not None:
        if int(matrix_size) != matrix_size or matrix_size < 1:
            raise ValueError(f"{func}: matrix_size must be a positive integer, got {matrix_size}")
        return int(matrix_size)
    if sample.kind == "eigenvalues":
        return sample.x.size
    return int(np.ceil(sample.x.size / max(sample.n_probes, 1)))


def _robust_location_spread(x: np.ndarray, w: np.ndarray, func: str) -> Tuple[float, float]:
    """(weighted median, weighted IQR), the IQR replaced by the standard deviation when it is 0."""
    loc = float(_weighted_quantile(x, w, [0.5])[0])
    q25, q75 = _weighted_quantile(x, w, [0.25, 0.75])
    spread = float(q75 - q25)
    if not spread > 0:
        spread = float(np.sqrt(np.sum(w * (x - loc) ** 2)))
    if not spread > 0:
        raise ValueError(f"{func}: all {x.size} points equal {loc}; a semicircle needs a spread")
    return loc, spread


def _margin_function(
    tw_multiple: float, edge_margin: Optional[float], spread: float, n_size: int, func: str
) -> Callable[[float], float]:
    """Bulk/outlier margin (normalised units) of a semicircle of scale ``s``: ``tw_multiple s N^(-2/3)``."""
    if edge_margin is not None:
        margin_abs = _check_positive(edge_margin, "edge_margin", func) / spread
        return lambda s: margin_abs
    return lambda s: tw_multiple * s * n_size ** (-2.0 / 3.0)


@dataclasses.dataclass
class _EdgesAndErrors:
    """Edges after the bootstrap (bias-corrected or not), standard errors (eigenvalue units), how."""

    lower: float
    upper: float
    center_se: Optional[float] = None
    sigma_se: Optional[float] = None
    se_method: str = "none"
    bias_corrected: bool = False


def _center_sigma_se(lower_draws: np.ndarray, upper_draws: np.ndarray, spread: float) -> Tuple[float, float]:
    center_se = float(np.std(0.5 * (lower_draws + upper_draws), ddof=1)) * spread
    sigma_se = float(np.std(0.25 * (upper_draws - lower_draws), ddof=1)) * spread
    return center_se, sigma_se


def _probe_bootstrap(
    sample: _Sample, z: np.ndarray, window: _BulkWindow, n_bootstrap: int, rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray]:
    """Edge MLEs with the density's probes resampled (each probe is an independent estimate)."""
    mask = window.mask
    weights, points, probe = sample.w[mask] / sample.w[mask].sum(), z[mask], sample.probe[mask]
    n_probes = sample.n_probes
    counts = rng.multinomial(n_probes, np.full(n_probes, 1.0 / n_probes), size=n_bootstrap)
    counts = counts[(counts[:, probe] * weights[None, :]).sum(axis=1) > 0]  # a replicate needs some weight

    def draw(start: int, k: int) -> Tuple[np.ndarray, np.ndarray]:
        resampled = counts[start : start + k][:, probe] * weights[None, :]
        return np.broadcast_to(points, resampled.shape), resampled

    return _bootstrap_edges(draw, len(counts), points.size, window.lower, window.upper, "semicircle")


def _bootstrap_errors(
    sample: _Sample, z: np.ndarray, window: _BulkWindow, n_bootstrap: int, seed: int, spread: float
) -> _EdgesAndErrors:
    """Parametric bootstrap for eigenvalues (with bias correction), probe bootstrap for a density."""
    a, b = window.lower, window.upper
    if n_bootstrap < 2:
        return _EdgesAndErrors(a, b)
    rng = np.random.default_rng(seed)
    if sample.kind == "eigenvalues":
        boot = _parametric_bootstrap("semicircle", a, b, int(window.mask.sum()), n_bootstrap, rng)
        se = _center_sigma_se(boot.lower_draws, boot.upper_draws, spread)
        return _EdgesAndErrors(boot.lower, boot.upper, *se, se_method=boot.se_method, bias_corrected=True)
    if sample.n_probes >= 2:
        se = _center_sigma_se(*_probe_bootstrap(sample, z, window, n_bootstrap, rng), spread)
        return _EdgesAndErrors(a, b, *se, se_method=f"bootstrap over {sample.n_probes} probes ({n_bootstrap} replicates)")
    return _EdgesAndErrors(a, b, se_method="none (a single-probe density has no independent replicate)")


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------
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

    From a robust start (weighted median and IQR), the edges ``(c - 2s, c + 2s)`` are fitted by
    maximum likelihood over a bulk window grown until stable, with margin
    ``threshold = tw_multiple * s * N^(-2/3)`` (the Tracy-Widom edge scale); goodness of fit is
    a KS test on the window; standard errors come from a bootstrap that also removes the edge
    MLE's inward bias. The method, its assumptions and its caveats: ``docs/rmt.md``.

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
        Matrix dimension ``N`` behind a density (only used for the margin; default: the number
        of Lanczos nodes per probe, which is conservative).
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
    n_size = _matrix_size(sample, matrix_size, func)
    loc, spread = _robust_location_spread(x, w, func)
    z = (x - loc) / spread  # normalised units: median 0, IQR 1
    margin_at = _margin_function(tw_multiple, edge_margin, spread, n_size, func)

    def margin_of_edges(a: float, b: float) -> float:
        return margin_at((b - a) / 4.0)  # the scale s is a quarter of the bulk width

    s0 = 1.0 / _SC_IQR_S1  # the scale whose IQR is 1
    window = _grow_bulk_window(z, w, "semicircle", (-2.0 * s0, 2.0 * s0), margin_of_edges, func)
    errors = _bootstrap_errors(sample, z, window, n_bootstrap, seed, spread)
    a, b = errors.lower, errors.upper
    # Final window with the final edges (it can only grow after the outward bias correction).
    thr = margin_of_edges(a, b)
    mask = _widen_window(z, window.mask, a, b, thr)
    weights = None if sample.kind == "eigenvalues" else w[mask] / w[mask].sum()
    ks_stat, ks_p = _ks_test(z[mask], weights, lambda t: _sc_cdf(t, a, b))

    method = "maximum likelihood over the bulk window (robust median/IQR start)"
    c, s = 0.5 * (a + b) * spread + loc, 0.25 * (b - a) * spread
    res = SemicircleFit(
        center=c,
        sigma=s,
        center_se=errors.center_se,
        sigma_se=errors.sigma_se,
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
        method=method + (_BIAS_CORRECTION if errors.bias_corrected else ""),
        se_method=errors.se_method,
        converged=window.converged,
    )
    logger.debug("%s: %s", func, res)
    return res
