"""Plain-PyTorch references of every op in :mod:`landscape_ext.ops`.

Used by the tests (op == reference on random inputs), by the benchmarks (the baseline row) and
as readable statements of what each kernel computes. They assume well-posed input (full-rank
blocks); the rank-deficient conventions of the ops are tested separately.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _positive_diagonal(q: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    """Flip signs so that r has a nonnegative diagonal (the convention of CholeskyQR)."""
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2), r * signs.unsqueeze(-1)


def block_orthonormalize(basis: Tensor, block: Tensor, n_basis: Optional[int] = None,
                         rank_tol: float = -1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Two rounds of matmul projections (CGS2) and ``torch.linalg.qr`` of the remainder.

    The basis is widened to the block's dtype; r gets a nonnegative diagonal.
    ``rank_tol`` is accepted for signature parity and ignored.
    """
    if n_basis is None:
        n_basis = basis.shape[0]
    Q = basis[:n_basis].to(block.dtype)
    c1 = Q @ block.T
    w1 = block - c1.T @ Q
    c2 = Q @ w1.T
    w2 = w1 - c2.T @ Q
    q, r = torch.linalg.qr(w2.T)
    q, r = _positive_diagonal(q, r)
    return q.T.contiguous(), c1 + c2, r


def orthogonalize_batched(bases: Tensor, vectors: Tensor, n_basis: Optional[int] = None,
                          rank_tol: float = -1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-run CGS2 with batched matmuls; ``rank_tol`` is ignored."""
    if n_basis is None:
        n_basis = bases.shape[1]
    B = bases[:, :n_basis].to(vectors.dtype)              # (r, n, d)
    v = vectors.unsqueeze(-1)                            # (r, d, 1)
    c1 = B @ v                                           # (r, n, 1)
    v1 = v - B.transpose(1, 2) @ c1
    c2 = B @ v1
    v2 = v1 - B.transpose(1, 2) @ c2
    norms = v2.squeeze(-1).norm(dim=1)
    q = v2.squeeze(-1) / norms.unsqueeze(1)
    return q, (c1 + c2).squeeze(-1), norms
