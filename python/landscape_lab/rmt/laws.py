r"""The bulk laws: semicircle and Marchenko-Pastur on their edges ``[a, b]``, and edge fluctuation scales.

Both laws are written with their bulk edges ``a < b`` (formulas and parametrisations in
``docs/rmt.md``): cdf, pdf, ppf (Marchenko-Pastur by a table in the angle variable), i.i.d.
samplers for the parametric bootstrap, the conversions between edges and ``(ratio, scale)``,
and the Tracy-Widom scale of the Marchenko-Pastur top edge.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Tuple

import numpy as np
from scipy.integrate import cumulative_trapezoid
from scipy.optimize import brentq

from .._results import as_float_array

ArrayLike = Any  # list, numpy array or torch tensor


# --------------------------------------------------------------------------------------------
# Semicircle
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


def _sc_sample(rng: np.random.Generator, shape: Tuple[int, int], a: float, b: float) -> np.ndarray:
    """I.i.d. semicircle draws on [a, b]: the semicircle is Beta(3/2, 3/2) stretched to [a, b]."""
    return a + (b - a) * rng.beta(1.5, 1.5, size=shape)


# Interquartile range of the semicircle with s = 1 (radius 2): F(q) = 3/4 at u = q / 2.
_SC_Q75_UNIT = brentq(lambda u: _sc_cdf_unit(np.array(u)) - 0.75, 0.0, 1.0, xtol=1e-14)
_SC_IQR_S1 = 2.0 * 2.0 * _SC_Q75_UNIT  # IQR = 2 * q75 with q75 = 2 s u75


# --------------------------------------------------------------------------------------------
# Marchenko-Pastur
# --------------------------------------------------------------------------------------------
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


def _mp_sample(rng: np.random.Generator, shape: Tuple[int, int], a: float, b: float) -> np.ndarray:
    """I.i.d. Marchenko-Pastur draws on [a, b] by inversion of the tabulated CDF."""
    return _mp_ppf(rng.random(shape), a, b)


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


# The edge fit and its bootstrap pick the law by name.
_SAMPLERS = {"semicircle": _sc_sample, "marchenko_pastur": _mp_sample}


# --------------------------------------------------------------------------------------------
# What the fit results share
# --------------------------------------------------------------------------------------------
class _FittedBulk:
    """``edges``, ``pdf`` and ``cdf`` of a fit result; the class names its law's ``_law_pdf``/``_law_cdf``."""

    lower_edge: float
    upper_edge: float
    _law_pdf: Callable[[np.ndarray, float, float], np.ndarray]
    _law_cdf: Callable[[np.ndarray, float, float], np.ndarray]

    @property
    def edges(self) -> Tuple[float, float]:
        """``(lower_edge, upper_edge)``."""
        return (self.lower_edge, self.upper_edge)

    def pdf(self, x: ArrayLike) -> np.ndarray:
        """Fitted density, 0 outside the bulk (Marchenko-Pastur: the non-zero part, normalised to 1 on the bulk)."""
        return self._law_pdf(as_float_array(x, "x", f"{type(self).__name__}.pdf", ndim=None), self.lower_edge, self.upper_edge)

    def cdf(self, x: ArrayLike) -> np.ndarray:
        """Fitted cumulative distribution function (Marchenko-Pastur: of the non-zero part)."""
        return self._law_cdf(as_float_array(x, "x", f"{type(self).__name__}.cdf", ndim=None), self.lower_edge, self.upper_edge)
