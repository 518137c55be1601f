"""Plain-PyTorch references of every op in :mod:`landscape_ext.ops`, with the op's signature.

Used by the tests (op == reference on random inputs), by the benchmarks (the baseline row), as
the ``impl="composite"`` path of the ops that have one (through :mod:`landscape_ext.ops`; other
modules call the ops) and as readable statements of what each kernel computes: matmuls and
``torch.linalg.qr`` where the kernels fuse passes, no fused passes, no chunking.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._extension import activation_codes
from ._losses import cross_entropy_hessian

# ---- krylov family -------------------------------------------------------------------------------


def _accumulation_dtype(basis_dtype: torch.dtype, block_dtype: torch.dtype) -> torch.dtype:
    """The op's: the block's dtype, but float64 for a float64 basis with a float32 block."""
    return torch.float64 if torch.float64 in (basis_dtype, block_dtype) else block_dtype


def _rank_tol(rank_tol: float, basis_dtype: torch.dtype, block_dtype: torch.dtype) -> float:
    """``rank_tol``, or for a negative one the op's default: 10 x the unit roundoff of the less
    precise of the two dtypes."""
    if rank_tol >= 0:
        return float(rank_tol)
    return 10.0 * max(torch.finfo(basis_dtype).eps, torch.finfo(block_dtype).eps)


def _positive_diagonal(q: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    """Flip signs so that r has a nonnegative diagonal (the convention of CholeskyQR)."""
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2), r * signs.unsqueeze(-1)


def _project_out(Q: Tensor, W: Tensor) -> Tuple[Tensor, Tensor]:
    """One round of classical Gram-Schmidt of the rows of W against the rows of Q:
    ``(W - C^T Q, C)`` with ``C = Q W^T``."""
    C = Q @ W.T
    return W - C.T @ Q, C


def _fresh_direction(index: int, avoid: Tuple[Tensor, ...], like: Tensor) -> Tensor:
    """A unit vector orthogonal to the rows of every tensor in ``avoid``: a seeded Gaussian
    projected against them twice."""
    g = torch.Generator().manual_seed(index)
    z = torch.randn(like.shape[-1], generator=g, dtype=torch.float64).to(like)
    for _ in range(2):
        for rows in avoid:
            z = z - (rows @ z) @ rows
    return z / z.norm()


def _lost(norms: Tensor, norms_before: Tensor, tol: float) -> Tensor:
    """Rows whose remainder kept at most ``tol`` of their norm: numerically dependent."""
    return ~((norms > tol * norms_before) & (norms > 0))


def _orthonormalize_rows(W: Tensor, Q: Tensor, norms_before: Tensor,
                         tol: float) -> Tuple[Tensor, Tensor]:
    """``q, r`` with ``W = r^T q`` for rows of W already orthogonal to the rows of Q:
    ``torch.linalg.qr``, r with a nonnegative diagonal. When a row keeps at most ``tol`` of its
    norm before projection, row-by-row Gram-Schmidt instead: that row gets ``r[k, k] = 0`` and a
    fresh ``q[k]`` orthogonal to Q and ``q[:k]``."""
    q, r = _positive_diagonal(*torch.linalg.qr(W.T))
    if not bool(_lost(torch.diagonal(r), norms_before, tol).any()):
        return q.T.contiguous(), r
    b = W.shape[0]
    q, r = torch.empty_like(W), W.new_zeros(b, b)
    for k in range(b):
        v = W[k]
        for _ in range(2):
            c = q[:k] @ v
            v = v - c @ q[:k]
            r[:k, k] += c
        norm = v.norm()
        if bool(_lost(norm, norms_before[k], tol)):
            q[k] = _fresh_direction(k, (Q, q[:k]), W)
        else:
            q[k], r[k, k] = v / norm, norm
    return q, r


def _one_round_enough(W: Tensor, W1: Tensor, C1: Tensor, basis_dtype: torch.dtype) -> bool:
    """The op's test for skipping the second round (``rounds=1``): every row kept at least
    1/sqrt(2) of its norm (Daniel-Gragg-Kaufman-Stewart) and, for a basis stored narrower than
    the accumulation dtype, ``eps(basis) |C1[:, k]| <= eps(acc) |W1[k]|``."""
    kept, before = W1.norm(dim=1), W.norm(dim=1)
    if not bool((kept.square() >= 0.5 * before.square()).all()):
        return False
    u_basis, eps_acc = torch.finfo(basis_dtype).eps, torch.finfo(W.dtype).eps
    return u_basis <= eps_acc or bool((u_basis * C1.norm(dim=0) <= eps_acc * kept).all())


def block_orthonormalize(basis: Tensor, block: Tensor, n_basis: Optional[int] = None,
                         rank_tol: float = -1.0, rounds: int = 2,
                         local_rows: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Block classical Gram-Schmidt with matmuls, then ``torch.linalg.qr`` of the remainder.

    The arguments mean what they mean for the op: the newest ``local_rows`` rows of
    ``basis[:n_basis]`` are projected out first (one round), then ``rounds`` rounds against the
    whole of it (``rounds=1``: a second one only where :func:`_one_round_enough` says so); a row
    whose remainder keeps at most ``rank_tol`` (negative: the op's default) of its norm gets
    ``r[k, k] = 0`` and a fresh direction. Computed in the op's accumulation dtype (the block's;
    float64 for a float64 basis), returned in the block's dtype; r has a nonnegative diagonal.
    """
    if n_basis is None:
        n_basis = basis.shape[0]
    if rounds not in (1, 2):
        raise ValueError(f"block_orthonormalize: rounds must be 2 or 1, got {rounds}")
    if not 0 <= local_rows <= n_basis:
        raise ValueError(f"block_orthonormalize: local_rows must be in [0, n_basis = {n_basis}], "
                         f"got {local_rows}")
    acc = _accumulation_dtype(basis.dtype, block.dtype)
    tol = _rank_tol(rank_tol, basis.dtype, block.dtype)
    Q = basis[:n_basis].to(acc)
    W = block.to(acc)
    coeffs = W.new_zeros(n_basis, W.shape[0])
    if local_rows:
        W, C_local = _project_out(Q[n_basis - local_rows:], W)
        coeffs[n_basis - local_rows:] = C_local
    W1, C1 = _project_out(Q, W)
    coeffs += C1
    if rounds == 2 or not _one_round_enough(W, W1, C1, basis.dtype):
        W1, C2 = _project_out(Q, W1)
        coeffs += C2
    q, r = _orthonormalize_rows(W1, Q, block.to(acc).norm(dim=1), tol)
    return q.to(block.dtype), coeffs.to(block.dtype), r.to(block.dtype)


def orthogonalize_batched(bases: Tensor, vectors: Tensor, n_basis: Optional[int] = None,
                          rank_tol: float = -1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-run CGS2 with batched matmuls, in the op's accumulation dtype. A vector that keeps at
    most ``rank_tol`` of its norm gets ``norms[i] = 0`` and a fresh unit ``q[i]`` orthogonal to
    its basis."""
    if n_basis is None:
        n_basis = bases.shape[1]
    acc = _accumulation_dtype(bases.dtype, vectors.dtype)
    tol = _rank_tol(rank_tol, bases.dtype, vectors.dtype)
    B = bases[:, :n_basis].to(acc)                      # (r, n, d)
    v = vectors.to(acc).unsqueeze(-1)                   # (r, d, 1)
    c1 = B @ v                                          # (r, n, 1)
    v1 = v - B.transpose(1, 2) @ c1
    c2 = B @ v1
    v2 = (v1 - B.transpose(1, 2) @ c2).squeeze(-1)
    norms = v2.norm(dim=1)
    q = v2 / norms.unsqueeze(1)
    lost = _lost(norms, vectors.to(acc).norm(dim=1), tol)
    if bool(lost.any()):
        for i in lost.nonzero().flatten().tolist():
            q[i], norms[i] = _fresh_direction(i, (B[i],), q), 0.0
    return q.to(vectors.dtype), (c1 + c2).squeeze(-1).to(vectors.dtype), norms.to(vectors.dtype)


# ---- sketch family ---------------------------------------------------------------------------


def _einsum_positions(equation: str, *operands: Tensor, positions: bool) -> Tensor:
    """``torch.einsum`` for per-sample factors with (``positions``, 3-D: subscript ``t``) or
    without (2-D: ``t`` dropped from the equation) a sequence dimension."""
    return torch.einsum(equation if positions else equation.replace("t", ""), *operands)


def linear_grad_sketch(acts: Tensor, out_grads: Tensor, directions: Tensor) -> Tensor:
    """``y[n, j] = sum_t out_grads[n, t]^T directions[j] acts[n, t]`` by ``torch.einsum`` (which
    contracts ``acts`` with ``directions`` first: an ``(N [T], l, n_out)`` temporary)."""
    return _einsum_positions("nti,joi,nto->nj", acts, directions, out_grads,
                             positions=acts.dim() == 3)


def linear_grad_project(acts: Tensor, out_grads: Tensor, weights: Tensor) -> Tensor:
    """``out[j] = sum_n weights[n, j] sum_t out_grads[n, t] acts[n, t]^T`` by ``torch.einsum``."""
    return _einsum_positions("nj,nto,nti->joi", weights, out_grads, acts,
                             positions=acts.dim() == 3)


def per_sample_linear_grads(acts: Tensor, out_grads: Tensor) -> Tensor:
    """The per-sample gradients themselves, ``(N, n_out, n_in)`` (materialized; for tests)."""
    return _einsum_positions("nto,nti->noi", out_grads, acts, positions=acts.dim() == 3)


# ---- hvp family ----------------------------------------------------------------------------------


def xent_hvp(logits: Tensor, target: Tensor, directions: Tensor, label_smoothing: float = 0.0,
             ignore_index: int = -100) -> Tensor:
    """Closed form with torch ops: ``p * r - p * (p . r)``, masked and divided by the number of
    non-ignored rows (zeros when there are none), computed in float32 (float64 if either input
    is float64). Materializes ``k x N x C`` temporaries; ``label_smoothing`` does not enter."""
    acc = torch.float64 if torch.float64 in (logits.dtype, directions.dtype) else torch.float32
    one = directions.dim() == 2
    r = (directions.unsqueeze(0) if one else directions).to(acc)
    # the engine's loss layer holds the one closed form (also used by the GGN and MLP products)
    out = cross_entropy_hessian(logits.to(acc), target, r, "mean", ignore_index)
    out = out.to(directions.dtype).contiguous()
    return out[0] if one else out


_ACT_NAMES = {code: name for name, code in activation_codes().items()}


def act_derivs(z: Tensor, act, *, order: int = 2) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """sigma(z), sigma'(z), sigma''(z) as a composition of torch ops, contiguous (half types
    computed in float32 and rounded back). ``act``: a name or code of
    :data:`landscape_ext.ops.ACTIVATIONS`. ``order=1`` skips sigma'' and returns None in its
    place (for callers that need the first derivative only)."""
    name = act if isinstance(act, str) else _ACT_NAMES.get(int(act))
    if name not in _ACT_NAMES.values():
        raise ValueError(f"act_derivs: {act!r} is not an activation name or code; one of "
                         f"{ {n: c for c, n in _ACT_NAMES.items()} }")
    dt = z.dtype
    x = z.contiguous()
    x = x.float() if dt in (torch.float16, torch.bfloat16) else x
    if name == "identity":
        a, d1, d2 = x.clone(), torch.ones_like(x), torch.zeros_like(x)
    elif name == "relu":
        a, d1, d2 = torch.relu(x), (x > 0).to(x.dtype), torch.zeros_like(x)
    elif name == "gelu":
        Phi = 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
        phi = torch.exp(-0.5 * x * x) * 0.3989422804014327
        a, d1 = x * Phi, Phi + x * phi
        d2 = phi * (2.0 - x * x) if order > 1 else None
    elif name == "tanh":
        a = torch.tanh(x)
        d1 = 1.0 - a * a
        d2 = -2.0 * a * d1 if order > 1 else None
    else:  # silu
        s = torch.sigmoid(x)
        u = s * (1.0 - s)
        a, d1 = x * s, s + x * u
        d2 = u * (2.0 + x * (1.0 - 2.0 * s)) if order > 1 else None
    if order < 2:
        d2 = None
    cast = (lambda t: t.to(dt)) if x.dtype != dt else (lambda t: t)
    return cast(a), cast(d1), (None if d2 is None else cast(d2))


def _attention_scores(q: Tensor, k: Tensor, mask: Optional[Tensor], is_causal: bool,
                      scale: Optional[float]) -> Tensor:
    """``scale * q k^T`` with the mask applied, all S x S_k at once (SDPA conventions: a boolean
    mask keeps True, causal is top-left aligned)."""
    import math

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ k.transpose(-1, -2))
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~causal, -math.inf)
    return s


def _attention_math(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool,
                    scale: Optional[float]) -> Tensor:
    """Math softmax attention, materialising the S x S_k probabilities (SDPA conventions)."""
    return torch.softmax(_attention_scores(q, k, mask, is_causal, scale), dim=-1) @ v


def attention_forward(q, k, v, mask=None, is_causal=False, scale=None) -> Tuple[Tensor, Tensor]:
    """Reference for ``attention.attention_forward``: (out, lse), all S x S_k at once."""
    s = _attention_scores(q, k, mask, is_causal, scale)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def attention_backward(q, k, v, dout, mask=None, is_causal=False, scale=None):
    """Reference for ``attention.attention_backward``: torch.func.vjp of math attention."""
    f = lambda q_, k_, v_: _attention_math(q_, k_, v_, mask, is_causal, scale)  # noqa: E731
    return torch.func.vjp(f, q, k, v)[1](dout)


def attention_forward_jvp(q, k, v, tq, tk, tv, mask=None, is_causal=False, scale=None) -> Tensor:
    """Reference for ``attention.attention_forward_jvp``: torch.func.jvp per direction (dim 0)."""
    f = lambda q_, k_, v_: _attention_math(q_, k_, v_, mask, is_causal, scale)  # noqa: E731
    return torch.stack([torch.func.jvp(f, (q, k, v), (a, b, c))[1] for a, b, c in zip(tq, tk, tv)]
                       ) if tq.shape[0] else q.new_empty(0, *q.shape[:-1], v.shape[-1])


def attention_backward_jvp(q, k, v, dout, tq, tk, tv, tdout, mask=None, is_causal=False,
                           scale=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference for ``attention.attention_backward_jvp``: jvp of the vjp, per direction."""
    def back(q_, k_, v_, d_):
        return attention_backward(q_, k_, v_, d_, mask, is_causal, scale)

    outs = [torch.func.jvp(back, (q, k, v, dout), t)[1] for t in zip(tq, tk, tv, tdout)]
    return tuple(torch.stack(x) for x in zip(*outs))
