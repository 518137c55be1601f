"""Input handling shared by the fits: eigenvalues or a weighted density, weighted statistics, argument checks."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

from .._results import as_float, as_float_array

logger = logging.getLogger(__name__)

_MIN_POINTS = 5


def _weighted_quantile(x: np.ndarray, w: np.ndarray, q: Sequence[float]) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    xs, ws = x[order], w[order]
    cw = np.cumsum(ws)
    total = cw[-1]
    mid = (cw - 0.5 * ws) / total
    return np.interp(np.asarray(q, dtype=np.float64), mid, xs)


def _weighted_ks(z: np.ndarray, w: np.ndarray, cdf) -> float:
    """Kolmogorov-Smirnov distance between the weighted empirical CDF of z and ``cdf``."""
    ux, inv = np.unique(z, return_inverse=True)
    uw = np.bincount(inv, weights=w)
    cw = np.cumsum(uw) / uw.sum()
    F = cdf(ux)
    before = np.concatenate([[0.0], cw[:-1]])
    return float(max(np.max(np.abs(cw - F)), np.max(np.abs(F - before))))


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


def _input_eps(x: Any) -> float:
    """Machine epsilon of the input's dtype (float64's for integers and lists of ints)."""
    dt = getattr(x, "dtype", None)
    if dt is not None and type(x).__module__.startswith("torch"):
        import torch  # only reached for torch input

        return float(torch.finfo(dt).eps) if dt.is_floating_point else float(np.finfo(np.float64).eps)
    try:
        dt = np.asarray(x).dtype
        return float(np.finfo(dt).eps) if np.issubdtype(dt, np.floating) else float(np.finfo(np.float64).eps)
    except (TypeError, ValueError):
        return float(np.finfo(np.float64).eps)


def _check_positive(value: float, name: str, func: str) -> float:
    value = as_float(value, name, func)
    if value <= 0:
        raise ValueError(f"{func}: {name} must be positive, got {value}")
    return value


def _check_bootstrap(n_bootstrap: int, func: str) -> int:
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 0 or n_bootstrap == 1:
        raise ValueError(f"{func}: n_bootstrap must be 0 or an integer >= 2, got {n_bootstrap}")
    return int(n_bootstrap)


def _ks_test(z: np.ndarray, w: Optional[np.ndarray], cdf) -> Tuple[float, Optional[float]]:
    """(KS distance, p-value) of the points ``z`` to ``cdf``; weighted points (``w``) have no p-value."""
    if w is None:
        ks = stats.kstest(z, cdf)
        return float(ks.statistic), float(ks.pvalue)
    return _weighted_ks(z, w, cdf), None
