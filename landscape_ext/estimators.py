r"""Stochastic trace and diagonal estimators with error estimates.

All probes of an estimator go through the operator as one batched product (``(m, d)`` rows,
split into ``batch_size`` chunks only to bound memory).

Trace
-----
* ``hutchinson`` — Girard-Hutchinson: :math:`\hat t = \frac1m \sum_i z_i^\top A z_i`,
  ``stderr = std(z_i^T A z_i) / sqrt(m)``.
* ``hutch++`` — Meyer, Musco, Musco & Woodruff (2021): a third of the products sketch the
  range (``Q = orth(A S)``), a third give the exact ``tr(Q^T A Q)``, a third estimate the trace
  of the deflated remainder ``(I - QQ^T) A (I - QQ^T)`` by Hutchinson; ``stderr`` is that part's
  sample standard error (the deflated part is the only random error given ``Q``).
* ``xtrace`` — Epperly, Tropp & Webber (2024): ``m/2`` probes, each estimate uses the other
  probes' sketch (leave-one-out, exchangeable) and its own probe for the remainder; estimate =
  mean of the ``m/2`` estimates, ``stderr`` = their standard deviation / ``sqrt(m/2)``.

Diagonal
--------
* ``hutchinson`` — :math:`\frac1m \sum_i z_i \odot A z_i` (Rademacher), entrywise stderr.
* ``xdiag`` — the exchangeable diagonal estimator of Epperly, Tropp & Webber (2024):
  :math:`\mathrm{diag}(P_i A) + \omega_i \odot (I - P_i) A \omega_i` averaged over the probes,
  ``P_i`` the projector onto the sketch without probe ``i``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from .operators import CurvatureOperator, as_operator
from .results import Result

__all__ = ["TraceResult", "DiagonalResult", "trace", "diagonal"]

TRACE_METHODS = ("hutch++", "xtrace", "hutchinson")
DIAG_METHODS = ("hutchinson", "xdiag")


@dataclass(repr=False)
class TraceResult(Result):
    """Result of :func:`trace`: ``estimate`` +- ``stderr`` (one standard error)."""

    estimate: float
    stderr: float
    n_matvecs: int
    method: str = "hutch++"
    distribution: str = "rademacher"
    seed: int = 0
    mode_used: Optional[str] = None
    time_s: float = 0.0

    def interval(self, z: float = 3.0) -> Tuple[float, float]:
        """``estimate -+ z * stderr``."""
        return self.estimate - z * self.stderr, self.estimate + z * self.stderr


@dataclass(repr=False)
class DiagonalResult(Result):
    """Result of :func:`diagonal`: ``estimate`` ``(d,)`` and entrywise ``stderr`` ``(d,)``."""

    estimate: Tensor = field(metadata={"export": False})
    stderr: Optional[Tensor] = field(default=None, metadata={"export": False})
    n_matvecs: int = 0
    method: str = "hutchinson"
    distribution: str = "rademacher"
    seed: int = 0
    mode_used: Optional[str] = None
    time_s: float = 0.0

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["estimate_sum"] = float(self.estimate.sum())
        out["d"] = int(self.estimate.numel())
        return out


def _probes(m: int, d: int, gen: torch.Generator, distribution: str) -> Tensor:
    if distribution == "rademacher":
        return torch.randint(0, 2, (m, d), generator=gen, dtype=torch.int8).to(torch.float64) \
            .mul_(2).sub_(1)
    if distribution == "gaussian":
        return torch.randn(m, d, generator=gen, dtype=torch.float64)
    raise ValueError(f"unknown probe distribution {distribution!r}; use 'rademacher' or "
                     f"'gaussian'")


def _apply(op: CurvatureOperator, X: Tensor, batch_size: Optional[int], where: str) -> Tensor:
    """``X A`` for rows ``X (m, d)`` (float64 result on the CPU), ``batch_size`` rows at a
    time."""
    m = X.shape[0]
    c = batch_size or m
    outs = []
    for s in range(0, m, c):
        Y = op.apply_rows(X[s:s + c].to(op.device)).to(torch.float64).cpu()
        if not bool(torch.isfinite(Y).all()):
            raise FloatingPointError(f"{where}: the operator product contains NaN/Inf")
        outs.append(Y)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _check(op: Any, n_matvecs: int, minimum: int, where: str) -> CurvatureOperator:
    op = as_operator(op)
    if not isinstance(n_matvecs, int) or n_matvecs < minimum:
        raise ValueError(f"{where}: n_matvecs must be an integer >= {minimum}, got {n_matvecs!r}")
    return op


def _orth_cols(Y: Tensor) -> Tuple[Tensor, Tensor]:
    """Reduced QR of rows ``Y (s, d)``: returns ``Q (d, s)``, ``R (s, s)``."""
    Q, R = torch.linalg.qr(Y.T)
    return Q, R


def trace(op: Any, n_matvecs: int, method: str = "hutch++", *, seed: int = 0,
          distribution: str = "rademacher", batch_size: Optional[int] = None) -> TraceResult:
    r"""Estimate ``tr(A)`` of a symmetric operator with ``n_matvecs`` products.

    Parameters
    ----------
    op : operator-like
    n_matvecs : int
        Products to spend (Hutch++ uses a multiple of 3, XTrace a multiple of 2 — rounded down;
        at least 3 and 4 respectively, 2 for Hutchinson).
    method : {"hutch++", "xtrace", "hutchinson"}
    seed : int
    distribution : {"rademacher", "gaussian"}
    batch_size : int, optional
        At most this many probes per product (memory); default: all at once.

    Returns
    -------
    TraceResult
        ``estimate``, ``stderr`` (one standard error; the estimate lies within three of the
        truth with high probability), ``n_matvecs`` actually used.
    """
    t0 = time.perf_counter()
    if method not in TRACE_METHODS:
        raise ValueError(f"trace: method must be one of {TRACE_METHODS}, got {method!r}")
    minimum = {"hutch++": 3, "xtrace": 4, "hutchinson": 2}[method]
    op = _check(op, n_matvecs, minimum, "trace")
    d = op.d
    gen = torch.Generator().manual_seed(int(seed))
    n0 = op.n_matvecs
    if method == "hutchinson":
        Z = _probes(n_matvecs, d, gen, distribution)
        s = (Z * _apply(op, Z, batch_size, "trace")).sum(1)
        est, err = float(s.mean()), float(s.std() / math.sqrt(s.numel()))
    elif method == "hutch++":
        k = n_matvecs // 3
        S = _probes(k, d, gen, distribution)
        Q, _ = _orth_cols(_apply(op, S, batch_size, "trace"))
        t_low = float((Q.T * _apply(op, Q.T.contiguous(), batch_size, "trace")).sum())
        G = _probes(n_matvecs - 2 * k, d, gen, distribution)
        G = G - (G @ Q) @ Q.T
        s = (G * _apply(op, G, batch_size, "trace")).sum(1)
        est = t_low + float(s.mean())
        err = float(s.std() / math.sqrt(s.numel())) if s.numel() > 1 else float("nan")
    else:
        ests = _xtrace_estimates(op, n_matvecs // 2, gen, distribution, batch_size)
        est, err = float(ests.mean()), float(ests.std() / math.sqrt(ests.numel()))
    return TraceResult(estimate=est, stderr=err, n_matvecs=op.n_matvecs - n0, method=method,
                       distribution=distribution, seed=int(seed),
                       mode_used=getattr(op, "mode_used", None), time_s=time.perf_counter() - t0)


def _xtrace_setup(op, m, gen, distribution, batch_size, where):
    d = op.d
    Om = _probes(m, d, gen, distribution)             # (m, d) rows
    Y = _apply(op, Om, batch_size, where)             # (m, d) = (A Om)^T
    Q, R = _orth_cols(Y)                              # Q (d, m), R (m, m)
    Zt = _apply(op, Q.T.contiguous(), batch_size, where)   # (m, d) = (A Q)^T
    eye = torch.eye(m, dtype=torch.float64)
    try:
        X = torch.linalg.solve_triangular(R.T, eye, upper=False)     # R^{-T}
        if not bool(torch.isfinite(X).all()):
            raise RuntimeError
    except RuntimeError:
        X = torch.linalg.pinv(R).T
    S = X / torch.linalg.vector_norm(X, dim=0, keepdim=True).clamp_min(1e-300)
    return Om, Q, R, Zt, S


def _xtrace_estimates(op, m, gen, distribution, batch_size) -> Tensor:
    Om, Q, R, Zt, S = _xtrace_setup(op, m, gen, distribution, batch_size, "trace")
    H = Zt @ Q                        # Q^T A Q
    H = 0.5 * (H + H.T)
    W = (Om @ Q).T                    # Q^T Om  (m, m)
    T = Zt @ Om.T                     # Z^T Om  (m, m)

    def dp(A_, B_):
        return (A_ * B_).sum(0)

    HS, HW = H @ S, H @ W
    c = dp(S, W)
    sHs = dp(S, HS)
    ests = (torch.trace(H) - sHs + c * dp(S, R) - dp(T, W) + dp(W, HW) - 2 * c * dp(S, HW)
            + c * dp(T, S) + c * c * sHs)
    return ests


def diagonal(op: Any, n_matvecs: int, method: str = "hutchinson", *, seed: int = 0,
             distribution: str = "rademacher",
             batch_size: Optional[int] = None) -> DiagonalResult:
    r"""Estimate ``diag(A)`` with ``n_matvecs`` products.

    Parameters
    ----------
    op : operator-like
    n_matvecs : int
        Products (XDiag: a multiple of 2, at least 4; Hutchinson: at least 2).
    method : {"hutchinson", "xdiag"}
    seed : int
    distribution : {"rademacher", "gaussian"}
        Probes (Rademacher gives the exact diagonal of a diagonal matrix).
    batch_size : int, optional

    Returns
    -------
    DiagonalResult
        ``estimate (d,)`` float64 and entrywise ``stderr (d,)`` (across probes, or across
        XDiag's leave-one-out estimates).
    """
    t0 = time.perf_counter()
    if method not in DIAG_METHODS:
        raise ValueError(f"diagonal: method must be one of {DIAG_METHODS}, got {method!r}")
    op = _check(op, n_matvecs, 4 if method == "xdiag" else 2, "diagonal")
    gen = torch.Generator().manual_seed(int(seed))
    n0 = op.n_matvecs
    if method == "hutchinson":
        Z = _probes(n_matvecs, op.d, gen, distribution)
        if distribution == "gaussian":
            Z2 = Z * Z
        E = Z * _apply(op, Z, batch_size, "diagonal")
        if distribution == "gaussian":   # ratio estimator (Bekas et al.)
            est = E.sum(0) / Z2.sum(0)
            err = E.std(0) / Z2.mean(0) / math.sqrt(E.shape[0])
        else:
            est = E.mean(0)
            err = E.std(0) / math.sqrt(E.shape[0])
    else:
        m = n_matvecs // 2
        Om, Q, R, Zt, S = _xtrace_setup(op, m, gen, distribution, batch_size, "diagonal")
        QS = Q @ S                                   # (d, m)
        ZS = Zt.T @ S                                # (d, m)
        c = (S * R).sum(0)                           # s_i^T R_i
        d_qz = (Q * Zt.T).sum(1)                     # diag(Q Q^T A)
        ests = d_qz[:, None] - QS * ZS + Om.T * QS * c[None, :]     # (d, m)
        est = ests.mean(1)
        err = ests.std(1) / math.sqrt(m)
    return DiagonalResult(estimate=est, stderr=err, n_matvecs=op.n_matvecs - n0, method=method,
                          distribution=distribution, seed=int(seed),
                          mode_used=getattr(op, "mode_used", None),
                          time_s=time.perf_counter() - t0)
