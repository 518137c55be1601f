r"""Spikes: eigenvalues outside the fitted bulk, and the BBP transition that predicts them.

For ``W + theta u u^T`` (``|u| = 1``) with ``W`` a Wigner matrix of semicircle radius ``2 sigma``,
an outlier leaves the bulk at ``theta + sigma^2 / theta`` iff ``|theta| > sigma`` (Baik, Ben Arous,
Peche 2005; Peche 2006 for Wigner matrices).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Union

import numpy as np

from .._results import ResultMixin, as_float_array, format_float
from .laws import ArrayLike
from .marchenko_pastur import MarchenkoPasturFit, fit_marchenko_pastur
from .sample import _MIN_POINTS, _check_positive
from .semicircle import SemicircleFit, fit_semicircle

logger = logging.getLogger(__name__)


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
    detections for a pure GOE/Wishart bulk rare (the Tracy-Widom (GOE) tail beyond 5 is about 2e-5
    per edge); a Wigner spike ``theta = sigma (1 + e)`` moves its outlier ``sigma e^2 / (1 + e)``
    past the edge, so it is found once ``e^2 / (1 + e) > tw_multiple N^(-2/3)``: ``e`` about 0.25
    for ``N = 1000``, 0.11 for ``N = 10^4`` (see ``docs/rmt.md``).
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
