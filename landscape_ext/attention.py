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
        m = m.expand(*m.shape[:2], s, sk)[..., i0:i1, :]
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
        s = scale * (q[..., i0:i1, :] @ k.transpose(-1, -2))
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
    s = scale * (q[..., i0:i1, :] @ k.transpose(-1, -2))
    bias = _bias_rows(q, k, mask, is_causal, i0, i1)
    if bias is not None:
        s = s + bias
    return torch.exp(s - lse[..., i0:i1].unsqueeze(-1))


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
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for i0 in range(0, q.shape[-2], block):
        i1 = min(i0 + block, q.shape[-2])
        p = _block_p(q, k, lse, mask, is_causal, scale, i0, i1)
        do = dout[..., i0:i1, :]
        dp = do @ v.transpose(-1, -2)
        dd = (do * out[..., i0:i1, :]).sum(-1, keepdim=True)
        ds = p * (dp - dd)
        dv += p.transpose(-1, -2) @ do
        dq[..., i0:i1, :] = scale * (ds @ k)
        dk += scale * (ds.transpose(-1, -2) @ q[..., i0:i1, :])
    return dq, dk, dv


def _block_tangents(q, k, v, out, p, tq, tk, tv, scale, i0, i1):
    """ts, m, tout for one query block; tangents carry a leading K dim."""
    ts = scale * (tq[..., i0:i1, :] @ k.transpose(-1, -2) + q[..., i0:i1, :] @ tk.transpose(-1, -2))
    pts = p * ts
    m = pts.sum(-1, keepdim=True)
    tout = pts @ v - m * out[..., i0:i1, :] + p @ tv
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
    tout = q.new_empty(tq.shape[0], *out.shape)
    for i0 in range(0, q.shape[-2], block):
        i1 = min(i0 + block, q.shape[-2])
        p = _block_p(q, k, lse, mask, is_causal, scale, i0, i1)
        tout[..., i0:i1, :] = _block_tangents(q, k, v, out, p, tq, tk, tv, scale, i0, i1)[2]
    return tout


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
    tdq = q.new_empty(n, *q.shape)
    tdk = q.new_zeros(n, *k.shape)
    tdv = q.new_zeros(n, *v.shape)
    for i0 in range(0, q.shape[-2], block):
        i1 = min(i0 + block, q.shape[-2])
        p = _block_p(q, k, lse, mask, is_causal, scale, i0, i1)
        ts, m, tout = _block_tangents(q, k, v, out, p, tq, tk, tv, scale, i0, i1)
        do, tdo, o = dout[..., i0:i1, :], tdout[..., i0:i1, :], out[..., i0:i1, :]
        dpd = do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True)
        ds = p * dpd
        tp = p * (ts - m)
        tdp = tdo @ v.transpose(-1, -2) + do @ tv.transpose(-1, -2)
        td = (tdo * o + do * tout).sum(-1, keepdim=True)
        tds = tp * dpd + p * (tdp - td)
        tdv += tp.transpose(-1, -2) @ do + p.transpose(-1, -2) @ tdo
        tdq[..., i0:i1, :] = scale * (tds @ k + ds @ tk)
        tdk += scale * (tds.transpose(-1, -2) @ q[..., i0:i1, :] + ds.transpose(-1, -2) @ tq[..., i0:i1, :])
    return tdq, tdk, tdv
