"""The blockwise attention products against plain-PyTorch references (float64) and SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

from landscape_ext import attention as A
from landscape_ext import reference as R

# (B, H, S, S_k, D, D_v): odd sizes, S != S_k, S not a multiple of the block
SHAPES = [(2, 3, 13, 13, 5, 5), (1, 2, 7, 11, 4, 6), (2, 1, 17, 9, 3, 3)]
MASKS = ["none", "causal", "bool", "float"]


def _inputs(shape, mask_kind, k_dirs, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, s, sk, d, dv = shape
    r = lambda *n: torch.randn(*n, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(b, h, s, d), r(b, h, sk, d), r(b, h, sk, dv)
    mask, causal = None, mask_kind == "causal"
    if mask_kind == "bool":
        mask = torch.rand(b, 1, s, sk, generator=g) > 0.3
        mask[..., 0] = True  # no fully masked row: softmax of an empty row is NaN everywhere
    elif mask_kind == "float":
        mask = r(1, h, s, sk)
    tq, tk, tv = r(k_dirs, b, h, s, d), r(k_dirs, b, h, sk, d), r(k_dirs, b, h, sk, dv)
    return q, k, v, mask, causal, (tq, tk, tv), r(b, h, s, dv), r(k_dirs, b, h, s, dv)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("k_dirs", [1, 3])
def test_all_four_against_reference(shape, mask_kind, k_dirs):
    if mask_kind == "causal" and shape[2] > shape[3]:
        pytest.skip("top-left causal leaves rows with no key when S > S_k")
    q, k, v, mask, causal, (tq, tk, tv), dout, tdout = _inputs(shape, mask_kind, k_dirs)
    kw = dict(mask=mask, is_causal=causal, scale=0.37)
    out, lse = A.attention_forward(q, k, v, block=4, **kw)
    out_r, lse_r = R.attention_forward(q, k, v, **kw)
    torch.testing.assert_close(out, out_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_r, rtol=1e-12, atol=1e-12)
    for got, ref in zip(A.attention_backward(q, k, v, out, lse, dout, block=4, **kw),
                        R.attention_backward(q, k, v, dout, **kw)):
        torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)
    tout = A.attention_forward_jvp(q, k, v, out, lse, tq, tk, tv, block=4, **kw)
    torch.testing.assert_close(tout, R.attention_forward_jvp(q, k, v, tq, tk, tv, **kw),
                               rtol=1e-11, atol=1e-11)
    got = A.attention_backward_jvp(q, k, v, out, lse, dout, tq, tk, tv, tdout, block=4, **kw)
    ref = R.attention_backward_jvp(q, k, v, dout, tq, tk, tv, tdout, **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_forward_backward_match_sdpa(causal):
    q, k, v, _, _, _, dout, _ = _inputs((2, 2, 9, 9, 4, 4), "none", 1, seed=3)
    q, k, v = (x.float().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref.backward(dout.float())
    out, lse = A.attention_forward(q.detach(), k.detach(), v.detach(), is_causal=causal, block=4)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    grads = A.attention_backward(q.detach(), k.detach(), v.detach(), out, lse, dout.float(),
                                 is_causal=causal, block=4)
    for got, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-5)


def test_empty_directions_and_batch():
    q, k, v, _, _, (tq, tk, tv), dout, tdout = _inputs((2, 2, 5, 5, 3, 3), "none", 0)
    out, lse = A.attention_forward(q, k, v)
    assert A.attention_forward_jvp(q, k, v, out, lse, tq, tk, tv).shape == (0, 2, 2, 5, 3)
    assert all(t.shape[0] == 0 for t in A.attention_backward_jvp(q, k, v, out, lse, dout, tq, tk, tv, tdout))
    e = q[:0]
    assert A.attention_forward(e, k[:0], v[:0])[0].shape == (0, 2, 5, 3)


def test_block_bound_does_not_change_result():
    q, k, v, mask, causal, (tq, tk, tv), _, _ = _inputs((1, 2, 23, 23, 4, 4), "causal", 2)
    out, lse = A.attention_forward(q, k, v, is_causal=True)
    a = A.attention_forward_jvp(q, k, v, out, lse, tq, tk, tv, is_causal=True, block=1)
    b = A.attention_forward_jvp(q, k, v, out, lse, tq, tk, tv, is_causal=True, block=1000)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_errors_name_op_and_sizes():
    q = torch.zeros(2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"attention_forward: q \(2, 3, 5, 4\), k \(2, 3, 5, 7\)"):
        A.attention_forward(q, torch.zeros(2, 3, 5, 7), torch.zeros(2, 3, 5, 4))
    with pytest.raises(TypeError, match="attention_forward: .*torch.int64"):
        A.attention_forward(q.long(), q.long(), q.long())


def _loss_fn(attn):
    """A small scalar loss of (q, k, v) weights through attention, for second-order tests."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)

    def f(w):
        wq, wk, wv = w[:, :6], w[:, 6:12], w[:, 12:]
        q, k, v = ((x @ m).reshape(2, 9, 2, 3).transpose(1, 2) for m in (wq, wk, wv))
        return (attn(q, k, v).tanh() ** 2).sum()

    return f


@pytest.mark.parametrize("causal", [False, True])
def test_vmap_jvp_grad_matches_math_sdpa(causal):
    ours = _loss_fn(lambda q, k, v: A.attention(q, k, v, is_causal=causal))
    math_ = _loss_fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 18, generator=g, dtype=torch.float64)
    dirs = torch.randn(4, 6, 18, generator=g, dtype=torch.float64)

    def hvp(f):
        return torch.func.vmap(lambda t: torch.func.jvp(torch.func.grad(f), (w,), (t,))[1])(dirs)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ref = hvp(math_)
    torch.testing.assert_close(hvp(ours), ref, rtol=1e-10, atol=1e-10)
    assert ref.abs().max() > 1e-3  # a zero Hessian would make the comparison vacuous


def test_double_backward_matches_math_sdpa():
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(6, 18, generator=g, dtype=torch.float64)
    t = torch.randn(6, 18, generator=g, dtype=torch.float64)
    res = []
    for attn in (A.attention, F.scaled_dot_product_attention):
        w = w0.clone().requires_grad_()
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            (gr,) = torch.autograd.grad(_loss_fn(attn)(w), w, create_graph=True)
            res.append(torch.autograd.grad(gr, w, t)[0])
    torch.testing.assert_close(res[0], res[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["forward-over-reverse", "double-backward"])
def test_operators_route_sdpa_to_blockwise(monkeypatch, mode):
    import landscape_ext as le
    from landscape_ext import _model

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0,
                                             batch_first=True).double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    params = dict(layer.named_parameters())
    names = list(params)

    def loss(*flat):
        return torch.func.functional_call(layer, dict(zip(names, flat)), (x,)).sin().sum()

    flat = tuple(params[n].detach() for n in names)
    dirs = tuple(torch.randn(2, *p.shape, dtype=torch.float64) for p in flat)

    def hvp():
        if mode == "forward-over-reverse":
            g = torch.func.grad(loss, argnums=tuple(range(len(flat))))
            return torch.func.vmap(lambda *t: torch.func.jvp(g, flat, t)[1])(*dirs)
        w = tuple(p.clone().requires_grad_() for p in flat)
        gr = torch.autograd.grad(loss(*w), w, create_graph=True)
        return torch.autograd.grad(gr, w, dirs, is_grads_batched=True)

    calls = []
    real = A._Attention.apply
    monkeypatch.setattr(A._Attention, "apply", lambda *a: calls.append(1) or real(*a))
    with le.differentiable_attention("math") as name:
        assert name == "math"
        ref = hvp()
    assert not calls
    with le.differentiable_attention("blockwise") as name:
        assert name == _model.BLOCKWISE_ATTENTION
        got = hvp()
    assert calls, "scaled_dot_product_attention was not routed"
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert max(b.abs().max() for b in ref) > 1e-3


def test_attention_mode_errors():
    import landscape_ext as le

    with pytest.raises(ValueError, match="'fast'"):
        with le.differentiable_attention("fast"):
            pass
