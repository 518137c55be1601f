"""Blockwise first- and second-order products of softmax attention (issue #14, item 2).

Plain-PyTorch first stage of the ``attention`` op family: every function loops over query
blocks of ``block`` rows, so no tensor larger than ``K x B x H x block x S_k`` is allocated
(``K`` tangent directions); the ``S x S_k`` probabilities are never materialised per direction.
The C++/CUDA ops (csrc) and the routing inside ``_model.differentiable_attention`` are not done
yet; these functions are the contract they will implement (see ``reference.py``).

Notation: ``s = scale * q k^T + mask``, ``P = softmax(s)``, ``out = P v``, ``lse = logsumexp(s)``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "attention",
    "attention_forward",
    "attention_backward",
    "attention_forward_jvp",
    "attention_backward_jvp",
]

DEFAULT_BLOCK = 64


def _check(op: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be (B, H, S, D); got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
            "(B, H, S, D), (B, H, S_k, D), (B, H, S_k, D_v)"
        )
    if q.dtype not in (torch.float32, torch.float64) or q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"{op}: q, k, v must share float32 or float64; got {q.dtype}, {k.dtype}, {v.dtype}")


def _bias_rows(q: Tensor, k: Tensor, mask: Optional[Tensor], is_causal: bool, i0: int, i1: int):
    """Additive bias for query rows i0:i1, shape broadcastable to (B, H, i1 - i0, S_k), or None.

    A boolean mask keeps True (the SDPA convention); causal is top-left aligned like SDPA.
    """
    s, sk = q.shape[-2], k.shape[-2]
    bias = None
    if mask is not None:
        m = mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        m = m.expand(*m.shape[:2], s, sk).narrow(-2, i0, i1 - i0)
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(~m, -math.inf)
        bias = m.to(q.dtype)
    if is_causal:
        rows = torch.arange(i0, i1, device=q.device).unsqueeze(-1)
        cols = torch.arange(sk, device=q.device)
        c = torch.zeros(i1 - i0, sk, dtype=q.dtype, device=q.device).masked_fill(cols > rows, -math.inf)
        bias = c if bias is None else bias + c
    return bias


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                      is_causal: bool = False, scale: Optional[float] = None,
                      block: int = DEFAULT_BLOCK) -> Tuple[Tensor, Tensor]:
    """Softmax attention, blockwise over query rows.

    ``out = softmax(scale * q k^T + mask) v``, ``lse = logsumexp(scale * q k^T + mask, -1)``.

    Shapes
    ------
    q (B, H, S, D), k (B, H, S_k, D), v (B, H, S_k, D_v), mask broadcastable to (B, H, S, S_k)
    -> out (B, H, S, D_v), lse (B, H, S). Largest temporary: B x H x block x S_k.
    """
    _check("attention_forward", q, k, v)
    scale = _scale(q, scale)
    outs, lses = [], []
    for i0 in range(0, q.shape[-2], block):
        i1 = min(i0 + block, q.shape[-2])
        s = scale * (q.narrow(-2, i0, i1 - i0) @ k.transpose(-1, -2))
        bias = _bias_rows(q, k, mask, is_causal, i0, i1)
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.exp(s - lse.unsqueeze(-1)) @ v)
        lses.append(lse)
    if not outs:
        return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1])
    return torch.cat(outs, -2), torch.cat(lses, -1)


def _block_p(q, k, lse, mask, is_causal, scale, i0, i1):
    s = scale * (q.narrow(-2, i0, i1 - i0) @ k.transpose(-1, -2))
    bias = _bias_rows(q, k, mask, is_causal, i0, i1)
    if bias is not None:
        s = s + bias
    return torch.exp(s - lse.narrow(-1, i0, i1 - i0).unsqueeze(-1))


def attention_backward(q, k, v, out, lse, dout, mask=None, is_causal=False, scale=None,
                       block: int = DEFAULT_BLOCK):
    """Gradients (dq, dk, dv) of ``<dout, attention(q, k, v)>``, blockwise over query rows.

    ``dP = dout v^T``, ``D_i = sum_d dout_id out_id``, ``dS = P * (dP - D)``,
    ``dv = P^T dout``, ``dq = scale dS k``, ``dk = scale dS^T q``.

    Shapes
    ------
    as :func:`attention_forward`; dout (B, H, S, D_v) -> dq, dk, dv like q, k, v.
    Largest temporary: B x H x block x S_k.
    """
    _check("attention_backward", q, k, v)
    scale = _scale(q, scale)
    # Out of place (lists, sums) and narrow() for slices so that vmap (also the legacy one behind
    # autograd.grad(is_grads_batched=True)) can batch every step.
    dq, dk, dv = [], torch.zeros_like(k), torch.zeros_like(v)
    for i0 in range(0, q.shape[-2], block):
        i1 = min(i0 + block, q.shape[-2])
        p = _block_p(q, k, lse, mask, is_causal, scale, i0, i1)
        do = dout.narrow(-2, i0, i1 - i0)
        dp = do @ v.transpose(-1, -2)
        dd = (do * out.narrow(-2, i0, i1 - i0)).sum(-1, keepdim=True)
        ds = p * (dp - dd)
        dv = dv + p.transpose(-1, -2) @ do
        dq.append(scale * (ds @ k))
        dk = dk + scale * (ds.transpose(-1, -2) @ q.narrow(-2, i0, i1 - i0))
    return (torch.cat(dq, -2) if dq else torch.zeros_like(q)), dk, dv


def _block_tangents(q, k, v, out, p, tq, tk, tv, scale, i0, i1):
    """ts, m, tout for one query block; tangents carry a leading K dim."""
    ts = scale * (tq.narrow(-2, i0, i1 - i0) @ k.transpose(-1, -2) + q.narrow(-2, i0, i1 - i0) @ tk.transpose(-1, -2))
    pts = p * ts
    m = pts.sum(-1, keepdim=True)
    tout = pts @ v - m * out.narrow(-2, i0, i1 - i0) + p @ tv
    return ts, m, tout


def attention_forward_jvp(q, k, v, out, lse, tq, tk, tv, mask=None, is_causal=False, scale=None,
                          block: int = DEFAULT_BLOCK):
    """Tangent of ``out`` along K directions (tq, tk, tv), blockwise over query rows.

    ``ts = scale (tq k^T + q tk^T)``, ``m_i = sum_j P_ij ts_ij``,
    ``tout = (P * ts) v - m * out + P tv``.

    Shapes
    ------
    q, k, v, out, lse as :func:`attention_forward`; tq, tk, tv (K, B, H, ., .) -> tout
    (K, B, H, S, D_v). Largest temporary: K x B x H x block x S_k.
    """
    _check("attention_forward_jvp", q, k, v)
    scale = _scale(q, scale)
    tout = []
    for i0 in range(0, q.shape[-2], block):
        i1 = min(i0 + block, q.shape[-2])
        p = _block_p(q, k, lse, mask, is_causal, scale, i0, i1)
        tout.append(_block_tangents(q, k, v, out, p, tq, tk, tv, scale, i0, i1)[2])
    return torch.cat(tout, -2) if tout else q.new_zeros(tq.shape[0], *out.shape)


def attention_backward_jvp(q, k, v, out, lse, dout, tq, tk, tv, tdout, mask=None,
                           is_causal=False, scale=None, block: int = DEFAULT_BLOCK):
    """Tangent (tdq, tdk, tdv) of :func:`attention_backward` along K directions.

    With ``tP = P (ts - m)``, ``t(dP) = tdout v^T + dout tv^T``,
    ``tD = rowsum(tdout * out + dout * tout)``, ``t(dS) = tP (dP - D) + P (t(dP) - tD)``:
    ``tdv = tP^T dout + P^T tdout``, ``tdq = scale (t(dS) k + dS tk)``,
    ``tdk = scale (t(dS)^T q + dS^T tq)``.

    Shapes
    ------
    tangents (K, B, H, ., .) like their primals -> tdq, tdk, tdv (K, B, H, ., .).
    Largest temporary: K x B x H x block x S_k.
    """
    _check("attention_backward_jvp", q, k, v)
    scale = _scale(q, scale)
    n = tq.shape[0]
    tdq, tdk, tdv = [], 0, 0
    for i0 in range(0, q.shape[-2], block):
        i1 = min(i0 + block, q.shape[-2])
        p = _block_p(q, k, lse, mask, is_causal, scale, i0, i1)
        ts, m, tout = _block_tangents(q, k, v, out, p, tq, tk, tv, scale, i0, i1)
        do, tdo, o = dout.narrow(-2, i0, i1 - i0), tdout.narrow(-2, i0, i1 - i0), out.narrow(-2, i0, i1 - i0)
        dpd = do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True)
        ds = p * dpd
        tp = p * (ts - m)
        tdp = tdo @ v.transpose(-1, -2) + do @ tv.transpose(-1, -2)
        td = (tdo * o + do * tout).sum(-1, keepdim=True)
        tds = tp * dpd + p * (tdp - td)
        tdv = tdv + tp.transpose(-1, -2) @ do + p.transpose(-1, -2) @ tdo
        tdq.append(scale * (tds @ k + ds @ tk))
        tdk = tdk + scale * (tds.transpose(-1, -2) @ q.narrow(-2, i0, i1 - i0)
                             + ds.transpose(-1, -2) @ tq.narrow(-2, i0, i1 - i0))
    if not tdq:
        return q.new_zeros(n, *q.shape), q.new_zeros(n, *k.shape), q.new_zeros(n, *v.shape)
    return torch.cat(tdq, -2), tdk, tdv


# --- autograd / functorch ---------------------------------------------------------------------
# Forward-over-reverse (vmap(jvp(grad(f)))) reaches _Attention.backward -> _AttentionBackward, whose
# jvp is attention_backward_jvp: no K x S x S_k tensor. Double backward reaches
# _AttentionBackward.backward, which differentiates the math formula (materialises S x S_k once).
# generate_vmap_rule: every staticmethod is plain torch ops, so vmap over directions batches them
# and the bound becomes vmap_size x B x H x block x S_k.


def _zeros_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


class _AttentionBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, out, lse, dout, mask, is_causal, scale):
        return attention_backward(q, k, v, out, lse, dout, mask, is_causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, out, lse, dout, mask, is_causal, scale = inputs
        ctx.save_for_backward(q, k, v, dout)
        ctx.save_for_forward(q, k, v, out, lse, dout)
        ctx.mask, ctx.is_causal, ctx.scale = mask, is_causal, scale

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tout, _tlse, tdout, *_):
        # tout and tlse follow from tq, tk, tv: attention_backward_jvp recomputes tout blockwise.
        q, k, v, out, lse, dout = ctx.saved_tensors
        tq, tk, tv, tdout = (_zeros_if_none(t, x).unsqueeze(0)
                             for t, x in ((tq, q), (tk, k), (tv, v), (tdout, dout)))
        r = attention_backward_jvp(q, k, v, out, lse, dout, tq, tk, tv, tdout,
                                   ctx.mask, ctx.is_causal, ctx.scale)
        return tuple(x.squeeze(0) for x in r)

    @staticmethod
    def backward(ctx, gdq, gdk, gdv):
        # Total derivatives through q, k, v, dout (out and lse are functions of q, k, v, so their
        # slots get zero): differentiate the math backward once, S x S_k materialised.
        from . import reference

        q, k, v, dout = ctx.saved_tensors
        fn = lambda a, b, c, d: reference.attention_backward(a, b, c, d, ctx.mask, ctx.is_causal,  # noqa: E731
                                                             ctx.scale)
        gq, gk, gv, gd = torch.func.vjp(fn, q, k, v, dout)[1]((gdq, gdk, gdv))
        return gq, gk, gv, None, None, gd, None, None, None


class _Attention(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, mask, is_causal, scale):
        return attention_forward(q, k, v, mask, is_causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, is_causal, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.save_for_forward(q, k, v, out, lse)
        ctx.mask, ctx.is_causal, ctx.scale = mask, is_causal, scale

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        q, k, v, out, lse = ctx.saved_tensors
        tq, tk, tv = (_zeros_if_none(t, x).unsqueeze(0) for t, x in ((tq, q), (tk, k), (tv, v)))
        tout = attention_forward_jvp(q, k, v, out, lse, tq, tk, tv, ctx.mask, ctx.is_causal,
                                     ctx.scale).squeeze(0)
        return tout, None

    @staticmethod
    def backward(ctx, gout, _glse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _AttentionBackward.apply(q, k, v, out, lse, gout, ctx.mask, ctx.is_causal,
                                              ctx.scale)
        return dq, dk, dv, None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
              is_causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """Differentiable softmax attention (first and second order) built on the blockwise products.

    Same conventions as ``F.scaled_dot_product_attention`` without dropout (boolean mask keeps
    True, causal top-left). Supports autograd, double backward, ``torch.func.jvp``/``vmap``.

    Shapes
    ------
    q (..., H, S, D), k (..., H, S_k, D), v (..., H, S_k, D_v) -> (..., H, S, D_v); leading dims
    are folded into B.
    """
    lead = q.shape[:-3]
    if q.dim() != 4:
        q, k, v = (x.reshape(-1, *x.shape[-3:]) for x in (q, k, v))
        if mask is not None and mask.dim() > 4:
            mask = mask.reshape(-1, *mask.shape[-3:])
    out = _Attention.apply(q, k, v, mask, is_causal, scale)[0]
    return out.reshape(*lead, *out.shape[-3:]) if len(lead) != 1 else out
