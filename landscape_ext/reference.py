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


# ---- sketch family ---------------------------------------------------------------------------


def linear_grad_sketch(acts: Tensor, out_grads: Tensor, directions: Tensor) -> Tensor:
    """``y[n, j] = sum_t out_grads[n, t]^T directions[j] acts[n, t]`` by ``torch.einsum`` (which
    contracts ``acts`` with ``directions`` first: an ``(N [T], l, n_out)`` temporary)."""
    if acts.dim() == 2:
        return torch.einsum("ni,joi,no->nj", acts, directions, out_grads)
    return torch.einsum("nti,joi,nto->nj", acts, directions, out_grads)


def linear_grad_project(acts: Tensor, out_grads: Tensor, weights: Tensor) -> Tensor:
    """``out[j] = sum_n weights[n, j] sum_t out_grads[n, t] acts[n, t]^T`` by ``torch.einsum``."""
    if acts.dim() == 2:
        return torch.einsum("nj,no,ni->joi", weights, out_grads, acts)
    return torch.einsum("nj,nto,nti->joi", weights, out_grads, acts)


def per_sample_linear_grads(acts: Tensor, out_grads: Tensor) -> Tensor:
    """The per-sample gradients themselves, ``(N, n_out, n_in)`` (materialized; for tests)."""
    if acts.dim() == 2:
        return torch.einsum("no,ni->noi", out_grads, acts)
    return torch.einsum("nto,nti->noi", out_grads, acts)


# ---- hvp family ----------------------------------------------------------------------------------


def xent_hvp(logits: Tensor, target: Tensor, directions: Tensor, label_smoothing: float = 0.0,
             ignore_index: int = -100) -> Tensor:
    """Closed form with torch ops: ``p * r - p * (p . r)``, masked and divided by the number of
    non-ignored rows (zeros when there are none), computed in float32 (float64 if either input
    is float64). Materializes ``k x N x C`` temporaries; ``label_smoothing`` does not enter."""
    acc = torch.float64 if torch.float64 in (logits.dtype, directions.dtype) else torch.float32
    one = directions.dim() == 2
    r = (directions.unsqueeze(0) if one else directions).to(acc)
    p = torch.softmax(logits.to(acc), dim=-1)
    pr = p * r
    out = pr - p * pr.sum(dim=-1, keepdim=True)
    mask = (target != ignore_index).to(acc)
    out = out * (mask / mask.sum().clamp_min(1)).unsqueeze(-1)
    out = out.to(directions.dtype)
    return out[0] if one else out


_ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "tanh": 3, "silu": 4}


def act_derivs(z: Tensor, act, order: int = 2) -> Tuple[Tensor, Optional[Tensor],
                                                        Optional[Tensor]]:
    """sigma(z), sigma'(z), sigma''(z) as a composition of torch ops (half types computed in
    float32 and rounded back). ``order=1`` skips sigma'' (returns None for it): the composite
    path of the MLP GGN products. Identity and ReLU return None for sigma'' (it is 0)."""
    if isinstance(act, str):
        act = _ACT_CODES[act]
    act = int(act)
    dt = z.dtype
    x = z.float() if dt in (torch.float16, torch.bfloat16) else z
    d2 = None
    if act == 0:
        a, d1 = x, torch.ones_like(x)
    elif act == 1:
        a = torch.relu(x)
        d1 = (x > 0).to(x.dtype)
    elif act == 2:
        Phi = 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
        phi = torch.exp(-0.5 * x * x) * 0.3989422804014327
        a = x * Phi
        d1 = Phi + x * phi
        if order > 1:
            d2 = phi * (2.0 - x * x)
    elif act == 3:
        a = torch.tanh(x)
        d1 = 1.0 - a * a
        if order > 1:
            d2 = -2.0 * a * d1
    elif act == 4:
        s = torch.sigmoid(x)
        u = s * (1.0 - s)
        a = x * s
        d1 = s + x * u
        if order > 1:
            d2 = u * (2.0 + x * (1.0 - 2.0 * s))
    else:
        raise ValueError(f"act_derivs: act = {act} is not an activation code")
    cast = (lambda t: t.to(dt)) if x.dtype != dt else (lambda t: t)
    return cast(a), cast(d1), (None if d2 is None else cast(d2))
