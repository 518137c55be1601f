"""Maximum likelihood of a law's bulk edges, the bulk window grown around it, and the edge bootstrap.

Both fits (semicircle, and Marchenko-Pastur with a free ratio) run the same machinery on
normalised points: :func:`_grow_bulk_window` fits the edges ``(a, b)`` to the points in a
window and grows the window by the law's edge margin until it stops changing;
:func:`_parametric_bootstrap` refits i.i.d. draws from the fitted law for standard errors and
removes the edge MLE's inward bias. The law is picked by name (``"semicircle"`` or
``"marchenko_pastur"``); only the normalising term of the likelihood and the sampler differ.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Tuple

import numpy as np

from .laws import _SAMPLERS
from .sample import _MIN_POINTS

logger = logging.getLogger(__name__)

_START_FRACTION = 0.9  # the window search starts from the central 90 % of the robust bulk
_MAX_REFITS = 200  # the window only grows, so it settles long before this
_BOOT_CHUNK_ELEMENTS = 1_000_000  # bootstrap replicates are refitted in chunks of this many values
_BIAS_CORRECTION = ", parametric-bootstrap bias correction"  # appended to a fit's ``method``


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
    """Gradient ``(ga, gb)`` and Hessian ``(haa, hbb, hab)`` of :func:`_edge_loglik` in the edges."""
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
        sel = da > 0
        tau[sel] = np.minimum(tau[sel], 0.99 * (xmin[act][sel] - aa[sel]) / da[sel])
        sel = db < 0
        tau[sel] = np.minimum(tau[sel], 0.99 * (ba[sel] - xmax[act][sel]) / (-db[sel]))
        if law == "marchenko_pastur":
            sel = da < 0
            tau[sel] = np.minimum(tau[sel], 0.99 * aa[sel] / (-da[sel]))
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


# --------------------------------------------------------------------------------------------
# The bulk window
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _BulkWindow:
    """Edges fitted to the points in ``mask`` (normalised units) and whether the last MLE converged."""

    lower: float
    upper: float
    mask: np.ndarray
    converged: bool


def _grow_bulk_window(
    z: np.ndarray,
    w: np.ndarray,
    law: str,
    rough_edges: Tuple[float, float],
    margin_of_edges: Callable[[float, float], float],
    func: str,
    *,
    lower_floor: float = -np.inf,
) -> _BulkWindow:
    """Fit the edges to a window of the points and grow the window until it stops changing.

    The window starts as the central 90 % of ``rough_edges`` (a robust guess, so a few spikes
    cannot move it; its lower end at least ``lower_floor``), or all points when that holds
    fewer than five. Each round maximises the likelihood of the points in the window over the
    edges ``(a, b)`` (a log-barrier: the fitted support holds every point used) and adds every
    point within ``margin_of_edges(a, b)`` of them. The window only grows, so this ends; points
    separated from the bulk by a gap larger than the margin (spikes) are never used.
    """
    mid, half = 0.5 * (rough_edges[0] + rough_edges[1]), 0.5 * (rough_edges[1] - rough_edges[0]) * _START_FRACTION
    a, b = max(mid - half, lower_floor), mid + half
    mask = (z >= a) & (z <= b)
    if mask.sum() < _MIN_POINTS:
        mask = np.ones_like(mask)
    converged = True
    for _ in range(_MAX_REFITS):
        aa, bb, conv = _edge_mle(z[mask][None, :], w[mask][None, :], [a], [b], law)
        a, b = float(aa[0]), float(bb[0])
        converged = bool(conv[0])
        margin = margin_of_edges(a, b)
        new_mask = (z >= a - margin) & (z <= b + margin)
        if np.array_equal(new_mask, mask):
            break
        mask = new_mask | mask
    else:  # pragma: no cover - the window grows monotonically, so this is not reached
        logger.warning("%s: bulk window did not settle in %d refits", func, _MAX_REFITS)
    return _BulkWindow(a, b, mask, converged)


def _widen_window(z: np.ndarray, mask: np.ndarray, lower: float, upper: float, margin: float) -> np.ndarray:
    """``mask`` plus every point within ``margin`` of the final edges (it only grows, e.g. after the bias correction)."""
    return mask | ((z >= lower - margin) & (z <= upper + margin))


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------
def _bootstrap_edges(
    draw: Callable[[int, int], Tuple[np.ndarray, np.ndarray]], n_rows: int, n_cols: int, a: float, b: float, law: str
) -> Tuple[np.ndarray, np.ndarray]:
    """Edge MLEs of ``n_rows`` replicates, refitted in memory-bounded chunks.

    ``draw(start, k) -> (x, w)`` gives replicates ``start .. start + k - 1`` as ``(k, n_cols)``
    points and weights; chunks are drawn in order of ``start``.
    """
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // max(n_cols, 1))
    out_a, out_b = [], []
    for start in range(0, n_rows, chunk):
        k = min(chunk, n_rows - start)
        x, w = draw(start, k)
        ra, rb, _ = _edge_mle(x, w, np.full(x.shape[0], a), np.full(x.shape[0], b), law)
        out_a.append(ra)
        out_b.append(rb)
    return np.concatenate(out_a), np.concatenate(out_b)


@dataclasses.dataclass
class _EdgeBootstrap:
    """Bias-corrected edges, the replicates' edges and how they were obtained."""

    lower: float
    upper: float
    lower_draws: np.ndarray
    upper_draws: np.ndarray
    se_method: str


def _parametric_bootstrap(
    law: str, lower: float, upper: float, n_points: int, n_bootstrap: int, rng: np.random.Generator
) -> _EdgeBootstrap:
    """Refit ``n_bootstrap`` samples of ``n_points`` i.i.d. draws from the law on ``[lower, upper]``.

    The edge MLE converges fast (``n^(-2/3)``) but is biased inwards by about one standard error
    (the law vanishes like a square root at its edges, so the MLE is not regular); the mean of
    the replicates estimates that bias and it is removed: ``a <- 2 a - mean(a*)``, same for
    ``b`` (a Marchenko-Pastur lower edge stays >= 0).
    """
    sample = _SAMPLERS[law]

    def draw(start: int, k: int) -> Tuple[np.ndarray, np.ndarray]:
        x = sample(rng, (k, n_points), lower, upper)
        return x, np.ones_like(x)

    lower_draws, upper_draws = _bootstrap_edges(draw, n_bootstrap, n_points, lower, upper, law)
    a = 2.0 * lower - float(lower_draws.mean())
    b = 2.0 * upper - float(upper_draws.mean())
    if law == "marchenko_pastur":
        a = max(a, 0.0)
    se_method = f"parametric bootstrap ({n_bootstrap} replicates of {n_points} i.i.d. draws)"
    return _EdgeBootstrap(a, b, lower_draws, upper_draws, se_method)


