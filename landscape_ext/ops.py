"""Typed wrappers over ``torch.ops.landscape_ext.*`` and their fake (meta) kernels.

This is the only module that touches ``torch.ops.landscape_ext``; everything else in the
library calls the functions below. Each op has a plain-PyTorch reference of the same name in
:mod:`landscape_ext.reference`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_lib = torch.ops.landscape_ext

# ------------------------------------------------------------------------------------------------
# krylov: block_orthonormalize
# ------------------------------------------------------------------------------------------------


def block_orthonormalize(basis: Tensor, block: Tensor, n_basis: Optional[int] = None,
                         rank_tol: float = -1.0) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Orthonormalize a block against an orthonormal basis and within itself.

    Two rounds of classical Gram-Schmidt against ``basis[:n_basis]`` (CGS2, done in three fused
    passes over the basis) followed by CholeskyQR2 of the remainder, with a row-by-row
    fallback when the remainder is ill-conditioned or rank-deficient:

    .. math::
        \text{block} = C^\top\, Q_{:n} + R^\top q, \qquad q q^\top = I,\quad q\, Q_{:n}^\top = 0

    Parameters
    ----------
    basis : Tensor
        ``(m, d)``; rows ``[:n_basis]`` orthonormal. float64, float32, float16 or bfloat16
        (half storage halves the bytes read; sums accumulate in the block's dtype).
    block : Tensor
        ``(b, d)``, float32 or float64 (the accumulation and output dtype).
    n_basis : int, optional
        How many leading rows of ``basis`` to project against (default: all ``m``).
    rank_tol : float
        A row whose remainder keeps at most ``rank_tol`` of its original norm is numerically
        dependent. Negative (default) selects ``10 * eps`` of the least precise of the two
        dtypes (float32: 1.2e-6, float16: 9.8e-3, bfloat16: 7.8e-2, float64: 2.2e-15).

    Returns
    -------
    q : Tensor
        ``(b, d)`` orthonormal rows, orthogonal to ``basis[:n_basis]``.
    coeffs : Tensor
        ``(n_basis, b)`` projection coefficients.
    r : Tensor
        ``(b, b)`` upper triangular. **Rank convention:** ``r[k, k] == 0`` exactly marks a
        direction lost to rank deficiency; ``q[k]`` is then a fresh direction orthogonal to the
        basis and to ``q[:k]``, and the dropped remainder (at most ``rank_tol * |block[k]|``)
        is the only reconstruction error. :func:`numerical_rank` counts the nonzero diagonal.

    Shapes
    ------
    basis (m, d), block (b, d) -> q (b, d), coeffs (n_basis, b), r (b, b); requires
    ``n_basis + b <= d``.
    """
    if n_basis is None:
        n_basis = basis.shape[0]
    return _lib.block_orthonormalize(basis, block, int(n_basis), float(rank_tol))


@torch.library.register_fake("landscape_ext::block_orthonormalize")
def _block_orthonormalize_fake(basis, block, n_basis, rank_tol=-1.0):
    torch._check(basis.dim() == 2 and block.dim() == 2,
                 lambda: "block_orthonormalize: basis and block must be 2-D")
    b, d = block.shape
    q = block.new_empty((b, d))
    coeffs = block.new_empty((n_basis, b))
    r = block.new_empty((b, b))
    return q, coeffs, r


# ------------------------------------------------------------------------------------------------
# krylov: orthogonalize_batched
# ------------------------------------------------------------------------------------------------


def orthogonalize_batched(bases: Tensor, vectors: Tensor, n_basis: Optional[int] = None,
                          rank_tol: float = -1.0) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Orthogonalize ``r`` vectors, each against its own basis (CGS2), in one call.

    The reorthogonalization step of ``r`` independent Lanczos runs advanced together
    (stochastic Lanczos quadrature with ``r`` probes):

    .. math::
        v_i = c_i^\top B_{i,:n} + \nu_i q_i, \qquad |q_i| = 1,\quad B_{i,:n} q_i = 0

    Parameters
    ----------
    bases : Tensor
        ``(r, m, d)``, rows ``[:n_basis]`` of each run orthonormal; float64/32/16 or bfloat16.
    vectors : Tensor
        ``(r, d)``, float32 or float64.
    n_basis : int, optional
        Leading rows of each basis to use (default ``m``).
    rank_tol : float
        As in :func:`block_orthonormalize`.

    Returns
    -------
    q : Tensor
        ``(r, d)`` unit rows.
    coeffs : Tensor
        ``(r, n_basis)``.
    norms : Tensor
        ``(r,)``; ``norms[i] == 0`` marks a vector numerically inside the span of its basis
        (``q[i]`` is then a fresh unit vector orthogonal to it — a Lanczos run that found an
        invariant subspace).
    """
    if n_basis is None:
        n_basis = bases.shape[1]
    return _lib.orthogonalize_batched(bases, vectors, int(n_basis), float(rank_tol))


@torch.library.register_fake("landscape_ext::orthogonalize_batched")
def _orthogonalize_batched_fake(bases, vectors, n_basis, rank_tol=-1.0):
    torch._check(bases.dim() == 3 and vectors.dim() == 2,
                 lambda: "orthogonalize_batched: bases must be 3-D and vectors 2-D")
    r, d = vectors.shape
    return vectors.new_empty((r, d)), vectors.new_empty((r, n_basis)), vectors.new_empty((r,))


def numerical_rank(r: Tensor) -> int:
    """Numerical rank of a block from the ``r`` factor of :func:`block_orthonormalize`
    (the count of nonzero diagonal entries; see the rank convention there)."""
    return int((torch.diagonal(r) != 0).sum().item())
