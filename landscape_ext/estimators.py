r"""Stochastic trace and diagonal estimators with error estimates: Girard-Hutchinson, Hutch++
(Meyer, Musco, Musco & Woodruff 2021), XTrace and XDiag (Epperly, Tropp & Webber 2024).

All probes of an estimator go through the operator as one batched product (``(m, d)`` rows,
split into ``batch_size`` chunks only to bound memory). The estimators and their standard
errors are described in docs/algorithms.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ._args import count_argument
from .lanczos import _products_in_batches
from .operators import CurvatureOperator, as_operator
from .results import Result
from .shards import agree_call, vector_shards

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


def _probes(m: int, d: int, gen: torch.Generator, distribution: str, where: str) -> Tensor:
    """``(m, d)`` float64 probes on the CPU: random signs or standard normal entries."""
    if distribution == "rademacher":
        return torch.randint(0, 2, (m, d), generator=gen, dtype=torch.int8).to(torch.float64) \
            .mul_(2).sub_(1)
    if distribution == "gaussian":
        return torch.randn(m, d, generator=gen, dtype=torch.float64)
    raise ValueError(f"{where}: distribution must be 'rademacher' or 'gaussian', got "
                     f"{distribution!r}")


def _checked_operator(op: Any, n_matvecs: Any, minimum: int,
                      where: str) -> Tuple[CurvatureOperator, int]:
    """``(as_operator(op), n_matvecs as int)``, after checking that ``n_matvecs`` is an integer
    (any integral type) ``>= minimum``."""
    return as_operator(op), count_argument(n_matvecs, "n_matvecs", where, minimum)


# sharded vectors (operators of FSDP2 models, landscape_ext.shards): probes are the local rows
# of the global draws, and every sum over d is all-reduced; identity for other operators


def _local_probes(op: CurvatureOperator, m: int, gen: torch.Generator, distribution: str,
                  where: str) -> Tensor:
    """``(m, op.d)`` probes: this rank's rows of the global probes for sharded vectors."""
    shards = vector_shards(op)
    if shards is None:
        return _probes(m, op.d, gen, distribution, where)
    if distribution not in ("rademacher", "gaussian"):
        _probes(1, 1, torch.Generator(), distribution, where)     # raises the usual error
    return shards.draw(m, lambda n, d: _probes(n, d, gen, distribution, where))


def _reduce(op: CurvatureOperator, t: Tensor) -> Tensor:
    """``t`` (a sum over this rank's rows) summed over the ranks of sharded vectors."""
    shards = vector_shards(op)
    return t if shards is None else shards.sum_(t.contiguous())


def _agree(op: CurvatureOperator, where: str, choices: Optional[dict] = None,
           **values: float) -> None:
    """Raise on every rank of a distributed operator (data parallel or sharded) when the ranks
    call ``where`` with different ``values`` (see :func:`~landscape_ext.shards.agree_call`)."""
    agree_call(op, where, choices, **values)


def _orth_cols(Y: Tensor, op: Optional[CurvatureOperator] = None) -> Tuple[Tensor, Tensor]:
    """Reduced QR of rows ``Y (s, d)``: returns ``Q (d, s)``, ``R (s, s)`` (TSQR over the ranks
    for sharded vectors)."""
    shards = None if op is None else vector_shards(op)
    if shards is not None:
        return shards.orth_cols(Y)
    Q, R = torch.linalg.qr(Y.T)
    return Q, R


def _column_dots(A: Tensor, B: Tensor) -> Tensor:
    """``(A * B).sum(0)``: the dot products of corresponding columns."""
    return (A * B).sum(0)


# ------------------------------------------------------------------------------------------------
# trace


def trace(op: Any, n_matvecs: int, method: str = "hutch++", *, seed: int = 0,
          distribution: str = "rademacher", batch_size: Optional[int] = None) -> TraceResult:
    r"""Estimate ``tr(A)`` of a symmetric operator with ``n_matvecs`` products
    (docs/algorithms.md).

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
    op, n_matvecs = _checked_operator(op, n_matvecs, minimum, "trace")
    _agree(op, "trace", {"method": TRACE_METHODS}, n_matvecs=n_matvecs,
           method=TRACE_METHODS.index(method), seed=seed, distribution=distribution == "gaussian")
    gen = torch.Generator().manual_seed(int(seed))
    n_matvecs_start = op.n_matvecs
    if method == "hutchinson":
        estimate, stderr = _hutchinson_trace(op, n_matvecs, gen, distribution, batch_size)
    elif method == "hutch++":
        estimate, stderr = _hutchpp_trace(op, n_matvecs, gen, distribution, batch_size)
    else:
        ests = _xtrace_estimates(op, n_matvecs // 2, gen, distribution, batch_size)
        estimate, stderr = float(ests.mean()), float(ests.std() / math.sqrt(ests.numel()))
    return TraceResult(estimate=estimate, stderr=stderr,
                       n_matvecs=op.n_matvecs - n_matvecs_start, method=method,
                       distribution=distribution, seed=int(seed),
                       mode_used=getattr(op, "mode_used", None), time_s=time.perf_counter() - t0)


def _hutchinson_trace(op: CurvatureOperator, n_matvecs: int, gen: torch.Generator,
                      distribution: str, batch_size: Optional[int]) -> Tuple[float, float]:
    """Girard-Hutchinson: the mean of ``z_i^T A z_i`` and its standard error."""
    Z = _local_probes(op, n_matvecs, gen, distribution, "trace")
    s = _reduce(op, (Z * _products_in_batches(op, Z, batch_size, "trace")).sum(1))
    return float(s.mean()), float(s.std() / math.sqrt(s.numel()))


def _hutchpp_trace(op: CurvatureOperator, n_matvecs: int, gen: torch.Generator,
                   distribution: str, batch_size: Optional[int]) -> Tuple[float, float]:
    """Hutch++: the exact trace on the sketched range plus Hutchinson on the deflated rest
    (whose sample standard error is the estimate's)."""
    k = n_matvecs // 3
    S = _local_probes(op, k, gen, distribution, "trace")
    Q, _ = _orth_cols(_products_in_batches(op, S, batch_size, "trace"), op)
    t_low = float(_reduce(op, (Q.T * _products_in_batches(op, Q.T.contiguous(), batch_size,
                                                          "trace")).sum()))
    G = _local_probes(op, n_matvecs - 2 * k, gen, distribution, "trace")
    G = G - _reduce(op, G @ Q) @ Q.T
    s = _reduce(op, (G * _products_in_batches(op, G, batch_size, "trace")).sum(1))
    stderr = float(s.std() / math.sqrt(s.numel())) if s.numel() > 1 else float("nan")
    return t_low + float(s.mean()), stderr


def _xtrace_setup(op: CurvatureOperator, m: int, gen: torch.Generator, distribution: str,
                  batch_size: Optional[int], where: str
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What XTrace and XDiag share: probes ``Om (m, d)``, the sketch ``Q R = A Om^T``,
    ``Zt = (A Q)^T`` and ``S``, the normalized columns of ``R^{-T}`` (the leave-one-out
    directions)."""
    Om = _local_probes(op, m, gen, distribution, where)                  # (m, d) rows
    Y = _products_in_batches(op, Om, batch_size, where)                  # (m, d) = (A Om)^T
    Q, R = _orth_cols(Y, op)                                             # Q (d, m), R (m, m)
    Zt = _products_in_batches(op, Q.T.contiguous(), batch_size, where)   # (m, d) = (A Q)^T
    eye = torch.eye(m, dtype=torch.float64)
    try:
        X = torch.linalg.solve_triangular(R.T, eye, upper=False)     # R^{-T}
        if not bool(torch.isfinite(X).all()):
            raise RuntimeError
    except RuntimeError:
        X = torch.linalg.pinv(R).T
    S = X / torch.linalg.vector_norm(X, dim=0, keepdim=True).clamp_min(1e-300)
    return Om, Q, R, Zt, S


def _xtrace_estimates(op: CurvatureOperator, m: int, gen: torch.Generator, distribution: str,
                      batch_size: Optional[int]) -> Tensor:
    """The ``m`` leave-one-out trace estimates of XTrace (``2 m`` products)."""
    Om, Q, R, Zt, S = _xtrace_setup(op, m, gen, distribution, batch_size, "trace")
    H = _reduce(op, Zt @ Q)           # Q^T A Q
    H = 0.5 * (H + H.T)
    W = _reduce(op, Om @ Q).T         # Q^T Om  (m, m)
    T = _reduce(op, Zt @ Om.T)        # Z^T Om  (m, m)
    HS, HW = H @ S, H @ W
    c = _column_dots(S, W)
    sHs = _column_dots(S, HS)
    return (torch.trace(H) - sHs + c * _column_dots(S, R) - _column_dots(T, W)
            + _column_dots(W, HW) - 2 * c * _column_dots(S, HW) + c * _column_dots(T, S)
            + c * c * sHs)


# ------------------------------------------------------------------------------------------------
# diagonal


def diagonal(op: Any, n_matvecs: int, method: str = "hutchinson", *, seed: int = 0,
             distribution: str = "rademacher",
             batch_size: Optional[int] = None) -> DiagonalResult:
    r"""Estimate ``diag(A)`` with ``n_matvecs`` products (docs/algorithms.md).

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
        XDiag's leave-one-out estimates). For an operator of an FSDP2 model: this rank's local rows.
    """
    t0 = time.perf_counter()
    if method not in DIAG_METHODS:
        raise ValueError(f"diagonal: method must be one of {DIAG_METHODS}, got {method!r}")
    op, n_matvecs = _checked_operator(op, n_matvecs, 4 if method == "xdiag" else 2,
                                      "diagonal")
    _agree(op, "diagonal", {"method": DIAG_METHODS}, n_matvecs=n_matvecs,
           method=DIAG_METHODS.index(method), seed=seed, distribution=distribution == "gaussian")
    gen = torch.Generator().manual_seed(int(seed))
    n_matvecs_start = op.n_matvecs
    if method == "hutchinson":
        estimate, stderr = _hutchinson_diagonal(op, n_matvecs, gen, distribution, batch_size)
    else:
        estimate, stderr = _xdiag(op, n_matvecs // 2, gen, distribution, batch_size)
    return DiagonalResult(estimate=estimate, stderr=stderr,
                          n_matvecs=op.n_matvecs - n_matvecs_start, method=method,
                          distribution=distribution, seed=int(seed),
                          mode_used=getattr(op, "mode_used", None),
                          time_s=time.perf_counter() - t0)


def _hutchinson_diagonal(op: CurvatureOperator, n_matvecs: int, gen: torch.Generator,
                         distribution: str, batch_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    """The mean of ``z_i * A z_i`` (Gaussian probes: divided by the mean of ``z_i * z_i``) and
    its entrywise standard error."""
    Z = _local_probes(op, n_matvecs, gen, distribution, "diagonal")
    if distribution == "gaussian":
        Z2 = Z * Z
    E = Z * _products_in_batches(op, Z, batch_size, "diagonal")
    if distribution == "gaussian":   # ratio estimator (Bekas et al.)
        return E.sum(0) / Z2.sum(0), E.std(0) / Z2.mean(0) / math.sqrt(E.shape[0])
    return E.mean(0), E.std(0) / math.sqrt(E.shape[0])


def _xdiag(op: CurvatureOperator, m: int, gen: torch.Generator, distribution: str,
           batch_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    """XDiag: the mean of the ``m`` leave-one-out diagonal estimates (``2 m`` products) and
    their entrywise standard error."""
    Om, Q, R, Zt, S = _xtrace_setup(op, m, gen, distribution, batch_size, "diagonal")
    QS = Q @ S                                   # (d, m)
    ZS = Zt.T @ S                                # (d, m)
    c = (S * R).sum(0)                           # s_i^T R_i
    d_qz = (Q * Zt.T).sum(1)                     # diag(Q Q^T A)
    ests = d_qz[:, None] - QS * ZS + Om.T * QS * c[None, :]     # (d, m)
    return ests.mean(1), ests.std(1) / math.sqrt(m)
