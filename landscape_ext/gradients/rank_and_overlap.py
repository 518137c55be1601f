"""Rank measures of a matrix or of its singular values (:func:`gradient_rank`) and the overlap of
two subspaces (:func:`subspace_overlap`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..results import Result
from .svd import GradientCovarianceSVDResult

__all__ = ["gradient_rank", "GradientRankResult", "subspace_overlap", "SubspaceOverlapResult"]


@dataclass(repr=False)
class GradientRankResult(Result):
    """Result of :func:`gradient_rank`.

    Attributes
    ----------
    effective_rank : float
        Roy & Vetterli (2007): ``exp(H(p))`` with ``p = sigma / sum(sigma)`` (singular values).
    effective_rank_covariance : float
        The same entropy rank of the covariance spectrum, ``p = sigma^2 / sum(sigma^2)``.
    stable_rank : float
        ``sum(sigma^2) / max(sigma^2)`` (with ``total_energy`` as numerator when given).
    numerical_rank : int
        ``#{sigma > tol * max(sigma)}``.
    tol : float
        Relative tolerance used.
    n_values : int
    truncated : bool
        The values are a top-k truncation (``numerical_rank == n_values`` then means ``>=``).
    """

    effective_rank: float
    effective_rank_covariance: float
    stable_rank: float
    numerical_rank: int
    tol: float
    n_values: int
    truncated: bool = False


@dataclass(repr=False)
class SubspaceOverlapResult(Result):
    """Result of :func:`subspace_overlap`.

    ``overlap = |Qa^T Qb|_F^2 / min(p, q)`` = mean squared cosine of the principal angles, in
    ``[0, 1]`` (1: one subspace contains the other; ``~ max(p, q) / d`` for random subspaces).
    """

    overlap: float
    cosines: Tensor
    p: int
    q: int
    d: int

    @property
    def angles(self) -> Tensor:
        """Principal angles in radians, ascending."""
        return torch.arccos(self.cosines.clamp(-1.0, 1.0))


def _singular_values_of(values: Any, shape: Optional[Tuple[int, int]],
                        total_energy: Optional[float]):
    """``(singular values float64, shape, total_energy, truncated, eps dtype)`` of what
    :func:`gradient_rank` accepts."""
    truncated = False
    eps_dtype = None
    if isinstance(values, GradientCovarianceSVDResult):
        s = values.singular_values.to(torch.float64)
        shape = shape or (values.n_samples, values.n_params)
        truncated = values.k < min(values.n_samples, values.n_params)
        if total_energy is None and truncated and math.isfinite(values.trace):
            total_energy = float(values.trace)
        eps_dtype = torch.float32
    elif isinstance(values, Tensor):
        if values.dim() == 2:
            shape = shape or tuple(values.shape)
            eps_dtype = values.dtype if values.dtype.is_floating_point else torch.float64
            s = torch.linalg.svdvals(values.detach().to(torch.float64))
        elif values.dim() == 1:
            s = values.detach().to(torch.float64).abs()
            eps_dtype = values.dtype if values.dtype.is_floating_point else torch.float64
        else:
            raise ValueError(f"gradient_rank: values must be 1-D singular values or a 2-D matrix, "
                             f"got shape {tuple(values.shape)}")
    else:
        raise TypeError(f"gradient_rank: values must be a Tensor or a GradientCovarianceSVDResult, "
                        f"got {type(values).__name__}")
    return s, shape, total_energy, truncated, eps_dtype


def gradient_rank(values: Any, tol: Optional[float] = None, *,
                  shape: Optional[Tuple[int, int]] = None,
                  total_energy: Optional[float] = None) -> GradientRankResult:
    r"""Effective, stable and numerical rank of a matrix or of its singular values.

    Parameters
    ----------
    values : Tensor or GradientCovarianceSVDResult
        A 2-D matrix (e.g. per-sample gradients ``(n, d)``; its singular values are computed in
        float64), a 1-D tensor of singular values, or a :class:`GradientCovarianceSVDResult`
        (its top-k ``singular_values``; ``total_energy`` defaults to its ``trace``, so the
        stable rank uses the full ``tr(C)``).
    tol : float, optional
        Relative tolerance of the numerical rank: ``#{sigma > tol * max sigma}``. Default as
        ``numpy.linalg.matrix_rank``: ``max(m, n) * eps(dtype)``, with ``(m, n)`` the matrix shape
        (``shape=``, else the number of values) and ``eps`` of the matrix's dtype (float32 for a
        result of the randomized SVD, whose products run in the parameters' precision).
    shape : (int, int), optional
        Shape of the matrix the singular values came from (for the default ``tol``).
    total_energy : float, optional
        ``sum of all sigma^2`` when ``values`` holds only the top ones.

    Returns
    -------
    GradientRankResult
        ``effective_rank`` (Roy-Vetterli, entropy of ``sigma / sum sigma``),
        ``effective_rank_covariance`` (entropy of ``sigma^2 / sum sigma^2``), ``stable_rank``
        (``sum sigma^2 / max sigma^2``), ``numerical_rank``.
    """
    s, shape, total_energy, truncated, eps_dtype = _singular_values_of(values, shape,
                                                                       total_energy)
    if s.numel() == 0:
        raise ValueError("gradient_rank: no singular values")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("gradient_rank: singular values are not finite")
    s = s.cpu()
    s_max = float(s.max())
    if tol is None:
        size = max(shape) if shape is not None else s.numel()
        tol = size * torch.finfo(eps_dtype or torch.float64).eps
    if s_max == 0.0:
        return GradientRankResult(0.0, 0.0, 0.0, 0, float(tol), s.numel(), truncated)

    def entropy_rank(w: Tensor) -> float:
        p = w / w.sum()
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))

    energy = float(s.pow(2).sum()) if total_energy is None else float(total_energy)
    return GradientRankResult(
        effective_rank=entropy_rank(s), effective_rank_covariance=entropy_rank(s.pow(2)),
        stable_rank=energy / s_max ** 2, numerical_rank=int((s > tol * s_max).sum()),
        tol=float(tol), n_values=s.numel(), truncated=truncated)


def directions_of(X: Any, what: str) -> Tensor:
    """``(d, p)`` directions from a tensor (``(d,)``: one) or a result holding them (right
    singular vectors, eigenvectors)."""
    if isinstance(X, GradientCovarianceSVDResult):
        X = X.right_singular_vectors
    elif hasattr(X, "eigenvectors") and not isinstance(X, Tensor):
        X = X.eigenvectors
    if not isinstance(X, Tensor):
        raise TypeError(f"subspace_overlap: {what} must be a (d, p) tensor of directions (or a "
                        f"result holding them), got {type(X).__name__}")
    if X.dim() == 1:
        X = X[:, None]
    if X.dim() != 2 or X.shape[1] == 0:
        raise ValueError(f"subspace_overlap: {what} must be (d, p) with p >= 1, got "
                         f"{tuple(X.shape)}")
    return X


def orthonormal_columns(X: Tensor) -> Tensor:
    """An orthonormal basis (float64) of the range of the columns of ``X``."""
    X = X.detach().to(torch.float64)
    Q, R = torch.linalg.qr(X, mode="reduced")
    diag = torch.diagonal(R).abs()
    keep = diag > diag.max().clamp_min(1e-300) * 1e-10 * max(X.shape)
    if bool(keep.all()):
        return Q
    U, S, _ = torch.linalg.svd(X, full_matrices=False)   # rank-deficient: range by SVD
    return U[:, S > S.max() * 1e-10 * max(X.shape)]


def subspace_overlap(A: Any, B: Any) -> SubspaceOverlapResult:
    r"""Overlap of the subspaces spanned by two sets of directions.

    Both sets are orthonormalized (float64; a rank-deficient set keeps its range). With
    orthonormal bases ``Qa (d, p)`` and ``Qb (d, q)``, the cosines of the principal angles are the
    singular values of ``Qa^T Qb`` and

    .. math::
        \text{overlap} = \frac{\|Q_a^\top Q_b\|_F^2}{\min(p, q)} \in [0, 1].

    Parameters
    ----------
    A, B : Tensor or result
        ``(d, p)`` and ``(d, q)`` directions as columns (``(d,)`` for one), or an
        :class:`~landscape_ext.EigshResult` / :class:`GradientCovarianceSVDResult` (their
        eigenvectors / right singular vectors).
    """
    A = directions_of(A, "A")
    B = directions_of(B, "B")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"subspace_overlap: A has d = {A.shape[0]} rows but B has d = "
                         f"{B.shape[0]}")
    Qa = orthonormal_columns(A)
    Qb = orthonormal_columns(B.to(A.device))
    M = Qa.T @ Qb
    cosines = torch.linalg.svdvals(M).clamp(0.0, 1.0).cpu()
    p, q = Qa.shape[1], Qb.shape[1]
    return SubspaceOverlapResult(overlap=float(M.pow(2).sum()) / min(p, q), cosines=cosines, p=p,
                                 q=q, d=A.shape[0])
