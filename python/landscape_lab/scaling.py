r"""Width/depth scaling laws of landscape statistics and the compatibility metric Phi.

* :func:`fit_scaling_law` fits ``value = c * n^alpha * exp(beta * L)`` (``n`` width, ``L`` depth)
  by least squares in log space with bootstrap confidence intervals.
* :func:`phi` is the proposal's compatibility metric

  .. math:: \Phi(n, L, D) = \frac{\mathrm{tr}(H) / d}{\|H\|_2} \cdot \frac{\mathrm{grad\_rank}}{D},

  ``d`` the number of parameters and ``D`` the data dimension.
* :func:`architecture_search` evaluates a (width, depth) grid and ranks it by Phi.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._results import ResultMixin, as_float, as_float_array, format_float, to_builtin

__all__ = ["ScalingFit", "fit_scaling_law", "phi", "ArchitectureSearchResult", "architecture_search"]

logger = logging.getLogger(__name__)

ArrayLike = Any


# --------------------------------------------------------------------------------------------
# Scaling law
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ScalingFit(ResultMixin):
    r"""Result of :func:`fit_scaling_law`: ``value = c * n^alpha * exp(beta * L)``.

    Attributes
    ----------
    statistic : str
        Name of the fitted statistic (a label).
    alpha, beta : float or None
        Width exponent and depth rate; ``None`` when the grid has a single width (``alpha``) or a
        single depth (``beta``), which makes them unidentifiable (see ``note``).
    c : float
        Prefactor.
    alpha_ci, beta_ci, c_ci : (float, float) or None
        Percentile bootstrap intervals at level ``confidence``.
    alpha_se, beta_se, log_c_se : float or None
        Bootstrap standard deviations.
    r_squared : float
        Coefficient of determination of the log-space fit.
    residual_std : float
        ``sqrt(sum(residuals^2) / (n_points - n_parameters))`` in log space (the multiplicative
        noise level).
    residuals : list of float
        ``log(value) - log(fitted value)`` per point.
    widths, depths, values : list of float
        The data.
    identifiable : list of str
        The fitted parameters among ``"c", "alpha", "beta"``.
    weights : list of float or None
        The relative weights of a weighted fit (normalized to mean 1), None when unweighted.
    """

    statistic: str
    alpha: Optional[float]
    beta: Optional[float]
    c: float
    alpha_ci: Optional[Tuple[float, float]]
    beta_ci: Optional[Tuple[float, float]]
    c_ci: Optional[Tuple[float, float]]
    alpha_se: Optional[float]
    beta_se: Optional[float]
    log_c_se: Optional[float]
    r_squared: float
    residual_std: float
    residuals: List[float]
    n_points: int
    n_bootstrap: int
    confidence: float
    bootstrap: str
    identifiable: List[str]
    note: str
    widths: List[float]
    depths: List[float]
    values: List[float]
    weights: Optional[List[float]] = None
    draws: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, metadata={"export": False})

    # ------------------------------------------------------------------
    def _coef(self) -> np.ndarray:
        return np.array([math.log(self.c), self.alpha or 0.0, self.beta or 0.0])

    def _check_domain(self, n: np.ndarray, L: np.ndarray, func: str) -> None:
        if self.alpha is None:
            w0 = self.widths[0]
            if not np.allclose(n, w0, rtol=1e-12, atol=0):
                raise ValueError(f"{func}: alpha was not identifiable (single width {w0:g}); cannot predict at other widths")
        if self.beta is None:
            d0 = self.depths[0]
            if not np.allclose(L, d0, rtol=1e-12, atol=1e-12):
                raise ValueError(f"{func}: beta was not identifiable (single depth {d0:g}); cannot predict at other depths")

    def predict(
        self, widths: ArrayLike, depths: ArrayLike, *, interval: bool = False
    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Predicted ``c * n^alpha * exp(beta L)`` (broadcast over ``widths`` and ``depths``).

        With ``interval=True`` also returns the pointwise percentile band of the bootstrap fits at
        level ``confidence``: ``(prediction, lower, upper)``.
        """
        func = "ScalingFit.predict"
        n = as_float_array(widths, "widths", func, ndim=None)
        L = as_float_array(depths, "depths", func, ndim=None)
        if (n <= 0).any():
            raise ValueError(f"{func}: widths must be positive, got min {n.min():g}")
        n, L = np.broadcast_arrays(n, L)
        self._check_domain(n, L, func)
        coef = self._coef()
        pred = np.exp(coef[0] + coef[1] * np.log(n) + coef[2] * L)
        if not interval:
            return pred
        if self.draws is None or len(self.draws) < 2:
            raise ValueError(f"{func}: no bootstrap draws (n_bootstrap={self.n_bootstrap}); refit with n_bootstrap >= 2")
        logs = self.draws[:, 0, None] + self.draws[:, 1, None] * np.log(n).reshape(1, -1) + self.draws[:, 2, None] * L.reshape(1, -1)
        q = (1.0 - self.confidence) / 2.0
        lo, hi = np.quantile(logs, [q, 1.0 - q], axis=0)
        return pred, np.exp(lo).reshape(n.shape), np.exp(hi).reshape(n.shape)

    def plot(self, ax: Any = None, *, n_grid: int = 100) -> Any:
        """Draw value vs width per depth on log-log axes with the fit and its confidence band.

        matplotlib is imported here (optional dependency). Returns the axes.
        """
        import matplotlib.pyplot as plt  # lazy: optional dependency

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        n = np.asarray(self.widths)
        L = np.asarray(self.depths)
        v = np.asarray(self.values)
        colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
        lo_w, hi_w = float(n.min()), float(n.max())
        grid = np.geomspace(lo_w, hi_w, n_grid) if hi_w > lo_w else np.array([lo_w])
        for i, d in enumerate(np.unique(L)):
            col = colors[i % len(colors)]
            sel = L == d
            ax.scatter(n[sel], v[sel], color=col, s=18, label=f"L = {d:g}")
            dd = np.full_like(grid, d)
            if self.draws is not None and len(self.draws) >= 2:
                pred, lo, hi = self.predict(grid, dd, interval=True)
                ax.fill_between(grid, lo, hi, color=col, alpha=0.2, linewidth=0)
            else:
                pred = self.predict(grid, dd)
            ax.plot(grid, pred, color=col, linewidth=1.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("width n")
        ax.set_ylabel(self.statistic)
        a = "n/a" if self.alpha is None else f"{self.alpha:.3g}"
        b = "n/a" if self.beta is None else f"{self.beta:.3g}"
        ax.set_title(f"{self.statistic} ~ {self.c:.3g} n^{a} exp({b} L),  R^2 = {self.r_squared:.3f}")
        ax.legend(fontsize="small")
        return ax

    def __str__(self) -> str:
        def line(name, val, ci, se):
            if val is None:
                return f"  {name:<5} = n/a (not identifiable)"
            s = f"  {name:<5} = {format_float(val)}"
            if ci is not None:
                s += f"  [{format_float(ci[0])}, {format_float(ci[1])}]"
            return s

        pct = f"{100 * self.confidence:g}%"
        out = [
            f"ScalingFit: {self.statistic} = c * n^alpha * exp(beta * L)  ({self.n_points} points, "
            f"{pct} {self.bootstrap}-bootstrap intervals, B={self.n_bootstrap}"
            f"{', weighted' if self.weights is not None else ''})",
            line("alpha", self.alpha, self.alpha_ci, self.alpha_se),
            line("beta", self.beta, self.beta_ci, self.beta_se),
            line("c", self.c, self.c_ci, self.log_c_se),
            f"  R^2 = {self.r_squared:.4f}, residual std (log) = {format_float(self.residual_std)}",
        ]
        if self.note:
            out.append(f"  note: {self.note}")
        return "\n".join(out)


# Steps of fit_scaling_law: inputs, design matrix, bootstrap, intervals, goodness of fit.
def _check_scaling_inputs(
    widths: ArrayLike,
    depths: ArrayLike,
    values: ArrayLike,
    n_bootstrap: int,
    confidence: float,
    bootstrap: str,
    func: str,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
    """(widths, depths, values) as float arrays, ``n_bootstrap`` and ``confidence`` checked."""
    n = as_float_array(widths, "widths", func)
    L = as_float_array(depths, "depths", func)
    v = as_float_array(values, "values", func)
    if not (n.size == L.size == v.size):
        raise ValueError(f"{func}: widths, depths and values must have the same length, got {n.size}, {L.size} and {v.size}")
    for arr, name in ((n, "widths"), (v, "values")):
        if arr.size and arr.min() <= 0:
            i = int(np.argmin(arr))
            raise ValueError(f"{func}: {name} must be positive, got min {arr[i]:g} at index {i}")
    if bootstrap not in ("residuals", "cases"):
        raise ValueError(f"{func}: bootstrap must be 'residuals' or 'cases', got {bootstrap!r}")
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 0 or n_bootstrap == 1:
        raise ValueError(f"{func}: n_bootstrap must be 0 or an integer >= 2, got {n_bootstrap}")
    confidence = as_float(confidence, "confidence", func)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"{func}: confidence must be in (0, 1), got {confidence}")
    return n, L, v, int(n_bootstrap), confidence


def _check_weights(weights: Optional[ArrayLike], n_points: int, func: str) -> np.ndarray:
    """The weights as positive floats normalized to mean 1 (all ones when None)."""
    if weights is None:
        return np.ones(n_points)
    w = as_float_array(weights, "weights", func)
    if w.size != n_points:
        raise ValueError(f"{func}: weights has {w.size} entries for {n_points} points")
    if w.size and w.min() <= 0:
        i = int(np.argmin(w))
        raise ValueError(f"{func}: weights must be positive, got {w[i]:g} at index {i}")
    return w / w.mean()


@dataclasses.dataclass
class _Design:
    """Columns ``1, log n, L`` of the log-linear model, less those a single width/depth leaves unidentifiable."""

    X: np.ndarray  # (n_points, n_params)
    names: List[str]
    single_width: bool
    single_depth: bool
    note: str

    @property
    def n_params(self) -> int:
        return self.X.shape[1]

    def expand(self, coef: np.ndarray) -> np.ndarray:
        """Rows of fitted coefficients -> rows of ``(log c, alpha, beta)``, 0 for the unidentified ones."""
        full = np.zeros((coef.shape[0], 3))
        full[:, 0] = coef[:, 0]
        k = 1
        if not self.single_width:
            full[:, 1] = coef[:, k]
            k += 1
        if not self.single_depth:
            full[:, 2] = coef[:, k]
        return full


def _design_matrix(n: np.ndarray, L: np.ndarray, func: str) -> _Design:
    """The design matrix; a single width or depth is noted (and logged), a collinear grid raises."""
    ln = np.log(n)
    single_w = n.size > 0 and np.allclose(n, n[0], rtol=1e-12, atol=0)
    single_d = L.size > 0 and np.allclose(L, L[0], rtol=1e-12, atol=1e-12)
    names = ["c"] + ([] if single_w else ["alpha"]) + ([] if single_d else ["beta"])
    cols = [np.ones_like(ln)] + ([] if single_w else [ln]) + ([] if single_d else [L])
    p = len(cols)
    if n.size < p + 1:
        raise ValueError(
            f"{func}: {n.size} point(s) for {p} parameter(s) ({', '.join(names)}); "
            f"need at least {p + 1} to estimate the noise for intervals"
        )
    notes = []
    if single_w:
        notes.append(f"single width {n[0]:g}: alpha is not identifiable, c absorbs n^alpha")
    if single_d:
        notes.append(f"single depth {L[0]:g}: beta is not identifiable, c absorbs exp(beta L)")
    note = "; ".join(notes)
    if note:
        logger.warning("%s: %s", func, note)
    X = np.stack(cols, axis=1)
    if np.linalg.matrix_rank(X) < p:
        raise ValueError(
            f"{func}: the grid is degenerate: log(width) and depth are collinear over the "
            f"{n.size} points ({len(np.unique(n))} widths, {len(np.unique(L))} depths); alpha and beta cannot be separated"
        )
    return _Design(X, names, bool(single_w), bool(single_d), note)


def _goodness_of_fit(y: np.ndarray, resid: np.ndarray, n_params: int, w: np.ndarray) -> Tuple[float, float]:
    """(R^2, residual standard deviation with ``n_points - n_params`` degrees of freedom), log space;
    ``resid`` are the weighted residuals ``sqrt(w) (y - fit)``, ``w`` the weights (mean 1)."""
    ss_res = float(resid @ resid)
    ss_tot = float((w * (y - (w @ y) / w.sum()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return r2, math.sqrt(ss_res / (y.size - n_params))


def _residual_bootstrap(
    X: np.ndarray, pinv: np.ndarray, fitted: np.ndarray, resid: np.ndarray, n_bootstrap: int, rng: np.random.Generator
) -> np.ndarray:
    """(B, p) refits of fitted values plus leverage-corrected, centred residuals drawn with replacement."""
    h = np.einsum("ij,ji->i", X, pinv)
    mod = np.where(h < 1.0 - 1e-10, resid / np.sqrt(np.clip(1.0 - h, 1e-300, None)), 0.0)
    mod = mod - mod.mean()
    idx = rng.integers(0, resid.size, size=(n_bootstrap, resid.size))
    return (fitted[None, :] + mod[idx]) @ pinv.T


def _case_bootstrap(X: np.ndarray, y: np.ndarray, n_bootstrap: int, rng: np.random.Generator, func: str) -> np.ndarray:
    """(B', p) refits of rows drawn with replacement; replicates with a degenerate grid are dropped."""
    idx = rng.integers(0, y.size, size=(n_bootstrap, y.size))
    Xb, yb = X[idx], y[idx]
    xtx = np.einsum("bnp,bnq->bpq", Xb, Xb)
    xty = np.einsum("bnp,bn->bp", Xb, yb)
    cond = np.linalg.cond(xtx)
    ok = np.isfinite(cond) & (cond < 1e12)
    if ok.sum() < max(2, n_bootstrap // 2):
        raise ValueError(
            f"{func}: only {int(ok.sum())} of {n_bootstrap} case-bootstrap replicates have an identifiable grid; "
            f"use bootstrap='residuals' or more points"
        )
    if not ok.all():
        logger.info("%s: dropped %d of %d degenerate case-bootstrap replicates", func, int((~ok).sum()), n_bootstrap)
    return np.linalg.solve(xtx[ok], xty[ok][..., None])[..., 0]


@dataclasses.dataclass
class _BootstrapSummary:
    """Percentile intervals and standard deviations of the bootstrap draws (``None`` without draws)."""

    draws: Optional[np.ndarray]  # (B, 3): log c, alpha, beta
    confidence: float

    def ci(self, j: int) -> Optional[Tuple[float, float]]:
        if self.draws is None:
            return None
        q = (1.0 - self.confidence) / 2.0
        lo, hi = np.quantile(self.draws[:, j], [q, 1.0 - q])
        return (float(lo), float(hi))

    def se(self, j: int) -> Optional[float]:
        return None if self.draws is None else float(np.std(self.draws[:, j], ddof=1))


def fit_scaling_law(
    widths: ArrayLike,
    depths: ArrayLike,
    values: ArrayLike,
    statistic: str = "spectral_norm",
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    *,
    bootstrap: str = "residuals",
    weights: Optional[ArrayLike] = None,
) -> ScalingFit:
    r"""Fit ``value = c * n^alpha * exp(beta * L)`` over a (width, depth) grid.

    Log-linear least squares

    .. math:: \log v_i = \log c + \alpha \log n_i + \beta L_i + \varepsilon_i,

    i.e. multiplicative noise. Repeated (width, depth) cells are allowed. Confidence intervals
    are percentile intervals of ``n_bootstrap`` bootstrap refits. A single width leaves
    ``alpha=None`` (and a single depth ``beta=None``): not identifiable, said in ``note``; a
    collinear grid raises. The bootstrap schemes and degenerate grids: ``docs/scaling.md``.

    Parameters
    ----------
    widths, depths, values : array-like, shape (n_points,)
        One entry per measurement (lists, numpy arrays or torch tensors).
    statistic : str
        Name of the statistic (label only).
    n_bootstrap : int
        Bootstrap replicates (0: no intervals).
    confidence : float
        Interval level in (0, 1).
    seed : int
        Bootstrap seed.
    bootstrap : {"residuals", "cases"}
        Resampling scheme: fitted values plus resampled leverage-corrected residuals (the design
        is fixed by the experimenter), or (width, depth, value) rows drawn with replacement
        (robust to noise that changes across the grid).
    weights : array-like, shape (n_points,), optional
        Positive relative weights of a weighted least-squares fit (normalized to mean 1), e.g.
        ``1 / (sd_i / value_i)^2`` for values with known measurement sds (the variance of
        ``log v`` is about ``(sd / v)^2``). R^2, the residual std and both bootstraps use the
        weighted problem ``sqrt(w) log v ~ sqrt(w) X``; ``residuals`` stay unweighted.

    Returns
    -------
    ScalingFit

    Raises
    ------
    ValueError
        Mismatched lengths, NaN/Inf, non-positive widths or values, fewer points than parameters
        plus one, collinear grid, bad arguments.
    """
    func = "fit_scaling_law"
    n, L, v, n_bootstrap, confidence = _check_scaling_inputs(widths, depths, values, n_bootstrap, confidence, bootstrap, func)
    design = _design_matrix(n, L, func)
    w = _check_weights(weights, n.size, func)
    y = np.log(v)
    sw = np.sqrt(w)
    Xw, yw = design.X * sw[:, None], y * sw  # the weighted problem (plain least squares for w = 1)
    pinv = np.linalg.pinv(Xw)  # (p, n_points)
    coef = pinv @ yw
    fitted_w = Xw @ coef
    resid_w = yw - fitted_w
    r2, resid_std = _goodness_of_fit(y, resid_w, design.n_params, w)
    draws_full = None
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        if bootstrap == "residuals":
            draws = _residual_bootstrap(Xw, pinv, fitted_w, resid_w, n_bootstrap, rng)
        else:
            draws = _case_bootstrap(Xw, yw, n_bootstrap, rng, func)
        draws_full = design.expand(draws)
    full = design.expand(coef[None, :])[0]
    interval = _BootstrapSummary(draws_full, confidence)
    c_ci = interval.ci(0)
    single_w, single_d = design.single_width, design.single_depth
    res = ScalingFit(
        statistic=str(statistic),
        alpha=None if single_w else float(full[1]),
        beta=None if single_d else float(full[2]),
        c=float(math.exp(full[0])),
        alpha_ci=None if single_w else interval.ci(1),
        beta_ci=None if single_d else interval.ci(2),
        c_ci=None if c_ci is None else (math.exp(c_ci[0]), math.exp(c_ci[1])),
        alpha_se=None if single_w else interval.se(1),
        beta_se=None if single_d else interval.se(2),
        log_c_se=interval.se(0),
        r_squared=float(r2),
        residual_std=float(resid_std),
        residuals=(y - design.X @ coef).tolist(),
        n_points=int(n.size),
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        bootstrap=bootstrap,
        identifiable=design.names,
        note=design.note,
        widths=n.tolist(),
        depths=L.tolist(),
        values=v.tolist(),
        weights=None if weights is None else w.tolist(),
        draws=draws_full,
    )
    logger.debug("%s: %s", func, res)
    return res


# --------------------------------------------------------------------------------------------
# Phi and architecture search
# --------------------------------------------------------------------------------------------
def phi(trace: float, spectral_norm: float, n_params: float, grad_rank: float, data_dim: float) -> float:
    r"""The compatibility metric of the proposal.

    .. math:: \Phi = \frac{\mathrm{tr}(H) / d}{\|H\|_2} \cdot \frac{\mathrm{grad\_rank}}{D},

    with ``d = n_params`` and ``D = data_dim``: the mean curvature relative to the sharpest
    direction, times the fraction of the data dimension that the gradients span.

    Parameters
    ----------
    trace : float
        ``tr(H)`` (may be negative for a non-convex point).
    spectral_norm : float
        ``||H||_2 > 0``.
    n_params : float
        Number of parameters ``d > 0``.
    grad_rank : float
        Gradient (covariance) rank, ``>= 0`` (an effective rank may be fractional).
    data_dim : float
        Data dimension ``D > 0``.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        Non-finite input, ``spectral_norm <= 0``, ``n_params <= 0``, ``grad_rank < 0`` or
        ``data_dim <= 0``. ``|tr(H)| / d > ||H||_2`` (impossible for exact values) is logged as a
        warning, since it usually means noisy or inconsistent estimates.
    """
    func = "phi"
    tr = as_float(trace, "trace", func)
    sn = as_float(spectral_norm, "spectral_norm", func)
    d = as_float(n_params, "n_params", func)
    r = as_float(grad_rank, "grad_rank", func)
    D = as_float(data_dim, "data_dim", func)
    if sn <= 0:
        raise ValueError(f"{func}: spectral_norm must be positive, got {sn}")
    if d <= 0:
        raise ValueError(f"{func}: n_params must be positive, got {d}")
    if r < 0:
        raise ValueError(f"{func}: grad_rank must be >= 0, got {r}")
    if D <= 0:
        raise ValueError(f"{func}: data_dim must be positive, got {D}")
    mean_curv = tr / d
    if abs(mean_curv) > sn * (1.0 + 1e-6):
        logger.warning(
            "%s: |trace| / n_params = %.4g exceeds spectral_norm = %.4g (inconsistent curvature estimates)",
            func, abs(mean_curv), sn,
        )
    return (mean_curv / sn) * (r / D)


_REQUIRED = ("trace", "spectral_norm", "n_params", "grad_rank")
_RESERVED = ("width", "depth", "phi", "rank")


@dataclasses.dataclass
class ArchitectureSearchResult(ResultMixin):
    """Result of :func:`architecture_search`.

    Attributes
    ----------
    table : list of dict
        One row per configuration, sorted by descending Phi: ``rank`` (1 = best), ``width``,
        ``depth``, ``phi`` and every measurement returned by ``evaluate`` (a measurement named like
        one of these four is kept as ``evaluate_<name>``).
    best : dict
        The first row.
    widths, depths : list
        The grid axes.
    data_dim : float or None
        The default data dimension passed in.
    """

    table: List[Dict[str, Any]]
    best: Dict[str, Any]
    widths: List[Any]
    depths: List[Any]
    data_dim: Optional[float]

    def phi_grid(self) -> np.ndarray:
        """Phi as an array of shape ``(len(widths), len(depths))``."""
        out = np.full((len(self.widths), len(self.depths)), np.nan)
        for row in self.table:
            out[self.widths.index(row["width"]), self.depths.index(row["depth"])] = row["phi"]
        return out

    def __str__(self) -> str:
        lines = [f"ArchitectureSearchResult: {len(self.table)} configurations ranked by Phi"]
        lines.append("  rank  width  depth  phi")
        for row in self.table[:10]:
            lines.append(f"  {row['rank']:>4}  {row['width']!s:>5}  {row['depth']!s:>5}  {format_float(row['phi'])}")
        if len(self.table) > 10:
            lines.append(f"  ... ({len(self.table) - 10} more)")
        return "\n".join(lines)


def _measurement_dict(m: Any, func: str, where: str) -> Dict[str, Any]:
    if isinstance(m, Mapping):
        return dict(m)
    if hasattr(m, "to_dict") and callable(m.to_dict):
        out = m.to_dict()
        if isinstance(out, Mapping):
            return dict(out)
    if dataclasses.is_dataclass(m) and not isinstance(m, type):
        return dataclasses.asdict(m)
    raise TypeError(f"{func}: evaluate({where}) must return a dict or an object with to_dict(), got {type(m).__name__}")


def architecture_search(
    widths: Sequence[Any],
    depths: Sequence[Any],
    evaluate: Callable[[Any, Any], Any],
    data_dim: Optional[float] = None,
) -> ArchitectureSearchResult:
    r"""Evaluate every (width, depth) pair, compute :func:`phi` and rank by descending Phi.

    ``evaluate(width, depth)`` returns a dict (or an object with ``to_dict()``) holding at least
    ``trace``, ``spectral_norm``, ``n_params`` and ``grad_rank``, optionally ``data_dim`` and any
    other measurements (all kept in the table). ``data_dim`` here is the default for
    configurations that do not report one; a configuration that reports a different value raises
    (one data set, one ``D``).

    Progress is logged at INFO level on ``landscape_lab.scaling``.

    Parameters
    ----------
    widths, depths : sequence
        Grid axes (every combination is evaluated, width-major).
    evaluate : callable
        ``evaluate(width, depth) -> dict``.
    data_dim : float, optional
        Data dimension ``D``.

    Returns
    -------
    ArchitectureSearchResult
    """
    func = "architecture_search"
    widths, depths = list(widths), list(depths)
    if not widths or not depths:
        raise ValueError(f"{func}: widths and depths must be non-empty, got {len(widths)} widths and {len(depths)} depths")
    if not callable(evaluate):
        raise TypeError(f"{func}: evaluate must be callable, got {type(evaluate).__name__}")
    if data_dim is not None:
        data_dim = as_float(data_dim, "data_dim", func)
    total = len(widths) * len(depths)
    rows = []
    for i, (w, d) in enumerate(itertools.product(widths, depths), start=1):
        where = f"width={w}, depth={d}"
        try:
            meas = _measurement_dict(evaluate(w, d), func, where)
        except Exception:
            logger.error("%s: evaluate(%s) failed", func, where)
            raise
        missing = [k for k in _REQUIRED if k not in meas]
        if missing:
            raise ValueError(f"{func}: evaluate({where}) lacks {', '.join(missing)} (needs {', '.join(_REQUIRED)})")
        D = meas.get("data_dim", None)
        if D is None:
            D = data_dim
        elif data_dim is not None and not math.isclose(as_float(D, "data_dim", f"{func}({where})"), data_dim, rel_tol=1e-12):
            raise ValueError(f"{func}: evaluate({where}) reports data_dim={D} but data_dim={data_dim} was passed")
        if D is None:
            raise ValueError(f"{func}: no data_dim for {where}: pass data_dim or return it from evaluate")
        try:
            value = phi(meas["trace"], meas["spectral_norm"], meas["n_params"], meas["grad_rank"], D)
        except ValueError as exc:
            raise ValueError(f"{func}: configuration {where}: {exc}") from exc
        row: Dict[str, Any] = {"rank": 0, "width": to_builtin(w), "depth": to_builtin(d), "phi": value}
        for k, val in meas.items():
            row[f"evaluate_{k}" if k in _RESERVED else k] = to_builtin(val)
        row.setdefault("data_dim", to_builtin(D))
        rows.append(row)
        logger.info("%s: [%d/%d] %s phi=%.4g", func, i, total, where, value)
    rows.sort(key=lambda r: -r["phi"])  # stable: ties keep grid order
    for k, row in enumerate(rows, start=1):
        row["rank"] = k
    return ArchitectureSearchResult(
        table=rows,
        best=rows[0],
        widths=[to_builtin(w) for w in widths],
        depths=[to_builtin(d) for d in depths],
        data_dim=data_dim,
    )
