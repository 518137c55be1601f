"""hvp op family: xent_hvp against torch.func second derivatives of F.cross_entropy (float64),
against its reference over dtypes and shapes, strided inputs, the M = 0 convention, opcheck,
torch.compile and error paths; act_derivs against float64 autograd, opcheck, compile; both ops'
composite path (impl="composite") against the kernel. (mlp_hvp: tests/test_mlp_hvp.py.)"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import landscape_ext
from landscape_ext import ops, reference

from _op_common import on_one_and_many_threads

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
ACTS = ["identity", "relu", "gelu", "tanh", "silu"]


def randn(*shape, dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device=device,
                                                                             dtype=dtype)


def targets(N, C, device, seed, ignore_rows=(), ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, C, (N,), generator=g)
    for r in ignore_rows:
        t[r] = ignore_index
    return t.to(device)


def dense_hvp(logits, target, dirs, label_smoothing, ignore_index):
    """torch.func.hessian of the mean cross-entropy w.r.t. the logits, applied to dirs."""
    def loss(z):
        return F.cross_entropy(z, target, ignore_index=ignore_index,
                               label_smoothing=label_smoothing)

    H = torch.func.hessian(loss)(logits)               # (N, C, N, C)
    return torch.einsum("ncmd,kmd->knc", H, dirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("shape", [(7, 5, 3), (7, 5, 1), (4, 1, 2), (1, 3, 1), (9, 13, 4)])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_matches_torch_func_hessian(device, label_smoothing, shape, ignore_index):
    N, C, k = shape
    logits = randn(N, C, device=device, seed=N * C, scale=2.0)
    rows = (1, N - 1) if N > 2 else ()
    target = targets(N, C, device, seed=k, ignore_rows=rows, ignore_index=ignore_index)
    if ignore_index >= 0 and N > 2:
        target[0] = ignore_index  # an in-range ignore_index is ignored too
    dirs = randn(k, N, C, device=device, seed=k + 1)
    expected = dense_hvp(logits, target, dirs, label_smoothing, ignore_index)
    got = ops.xent_hvp(logits, target, dirs, label_smoothing, ignore_index)
    assert got.shape == (k, N, C) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    mask = target == ignore_index
    if mask.any():
        assert got[:, mask].abs().max().item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("logit_dtype", DTYPES)
@pytest.mark.parametrize("dir_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 10, 3), (5, 1031, 2), (3, 17, 1), (2, 50304, 1)])
def test_matches_reference(device, logit_dtype, dir_dtype, shape):
    N, C, k = shape
    logits = randn(N, C, dtype=logit_dtype, device=device, seed=C, scale=3.0)
    target = targets(N, C, device, seed=N, ignore_rows=(1,))
    dirs = randn(k, N, C, dtype=dir_dtype, device=device, seed=k)
    got = ops.xent_hvp(logits, target, dirs)
    assert got.dtype == dir_dtype and got.shape == (k, N, C) and got.is_contiguous()
    # float64 truth from the stored (rounded) inputs; the kernel may err at most about twice what
    # the torch composition at the same precision errs, plus the rounding of the output
    truth = reference.xent_hvp(logits.double(), target, dirs.double())
    torch_err = (reference.xent_hvp(logits, target, dirs).double() - truth).abs().max().item()
    err = (got.double() - truth).abs().max().item()
    # size of the terms of p * r - p * (p . r) (the output itself may be much smaller)
    pd = torch.softmax(logits.double(), dim=-1)
    pr = pd * dirs.double().abs()
    scale = (pr.amax() + (pd * pr.sum(-1, keepdim=True)).amax()).item()
    acc64 = torch.float64 in (logit_dtype, dir_dtype)  # accumulation: float64 or float32
    eps = max(torch.finfo(dir_dtype).eps,
              torch.finfo(torch.float64 if acc64 else torch.float32).eps)
    # The kernel's sums over C (softmax normaliser, p . r) run in another order than torch's:
    # their rounding grows like log2(C) ulps. Where the reference at this precision is exact
    # (float64 data: torch_err = 0) that is all the kernel errs; at C = 50304 it measured 3 ulps
    # of the scale on an AVX2 (x86-64-v3) machine, above a flat 8 eps * scale bound.
    sums = max(1.0, math.log2(C))
    assert err <= 2 * torch_err + 8 * eps * scale * sums + 1e-300, (err, torch_err, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_are_read_in_place(device):
    N, C, k = 11, 37, 4
    wide = randn(N, C + 5, dtype=torch.float32, device=device, seed=1)
    logits = wide[:, :C]                                  # row stride C + 5
    target = targets(2 * N, C, device, seed=2)[::2]       # non-contiguous target
    dirs_bkc = randn(N, k, C, dtype=torch.float32, device=device, seed=3)
    dirs = dirs_bkc.transpose(0, 1)                       # (k, N, C) with strides (C, kC, 1)
    got = ops.xent_hvp(logits, target, dirs)
    want = ops.xent_hvp(logits.contiguous(), target.contiguous(), dirs.contiguous())
    assert torch.equal(got, want)
    # unit stride violated along C: copied, same answer
    dirs_t = randn(k, C, N, dtype=torch.float32, device=device, seed=4).transpose(1, 2)
    torch.testing.assert_close(ops.xent_hvp(logits, target, dirs_t),
                               ops.xent_hvp(logits, target, dirs_t.contiguous()))


@pytest.mark.parametrize("device", DEVICES)
def test_two_dimensional_directions(device):
    logits = randn(6, 4, device=device, seed=5)
    target = targets(6, 4, device, seed=6)
    r = randn(6, 4, device=device, seed=7)
    torch.testing.assert_close(ops.xent_hvp(logits, target, r),
                               ops.xent_hvp(logits, target, r.unsqueeze(0))[0])


@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_ignored_gives_zeros_and_a_warning(device):
    logits = randn(5, 3, device=device, seed=8)
    target = torch.full((5,), -100, dtype=torch.int64, device=device)
    dirs = randn(2, 5, 3, device=device, seed=9)
    with pytest.warns(UserWarning, match=r"all N = 5 targets equal ignore_index = -100"):
        out = ops.xent_hvp(logits, target, dirs)
    assert torch.equal(out, torch.zeros_like(dirs))
    # torch's own loss is NaN there: the convention is ours, documented
    assert torch.isnan(F.cross_entropy(logits, target))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sizes(device):
    logits = randn(4, 3, device=device, seed=10)
    target = targets(4, 3, device, seed=11)
    out = ops.xent_hvp(logits, target, randn(0, 4, 3, device=device))
    assert out.shape == (0, 4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # N = 0 is not "all ignored"
        out = ops.xent_hvp(randn(0, 3, device=device), torch.empty(0, dtype=torch.int64,
                                                                    device=device),
                           randn(2, 0, 3, device=device))
    assert out.shape == (2, 0, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_sum_to_zero_and_operator_is_symmetric_psd(device):
    # H_n = diag(p) - p p^T: every output row sums to 0, <u, H v> = <H u, v>, <v, H v> >= 0
    N, C = 8, 29
    logits = randn(N, C, device=device, seed=12, scale=2.0)
    target = targets(N, C, device, seed=13)
    u, v = randn(2, N, C, device=device, seed=14)
    Hu, Hv = ops.xent_hvp(logits, target, torch.stack([u, v]))
    assert Hv.sum(dim=1).abs().max().item() < 1e-15
    assert abs((u * Hv).sum().item() - (Hu * v).sum().item()) < 1e-14
    assert (v * Hv).sum().item() >= 0


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits = randn(9, 7, dtype=torch.float32, device=device, seed=15)
    target = targets(9, 7, device, seed=16, ignore_rows=(3,))
    dirs = randn(3, 9, 7, dtype=torch.float32, device=device, seed=17)
    torch.library.opcheck(torch.ops.landscape_ext.xent_hvp, (logits, target, dirs, 0.1, -100))
    torch.library.opcheck(torch.ops.landscape_ext.xent_hvp,
                          (logits.half(), torch.where(target == -100, 3, target), dirs.double(),
                           0.0, 3))


def test_torch_compile_fullgraph():
    logits = randn(6, 5, dtype=torch.float32, seed=18)
    target = targets(6, 5, "cpu", seed=19)
    dirs = randn(2, 6, 5, dtype=torch.float32, seed=20)

    def step(logits, target, dirs):
        return (ops.xent_hvp(logits * 2.0, target, dirs) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, target, dirs), step(logits, target, dirs))


def test_results_do_not_depend_on_thread_count():
    logits = randn(257, 1000, dtype=torch.float32, seed=21)
    target = targets(257, 1000, "cpu", seed=22)
    dirs = randn(3, 257, 1000, dtype=torch.float32, seed=23)
    one, many = on_one_and_many_threads(lambda: ops.xent_hvp(logits, target, dirs))
    assert torch.equal(one, many)


def test_cuda_kernels_are_registered_when_a_gpu_exists():
    if not torch.cuda.is_available():
        pytest.skip("no GPU: CUDA kernels are compiled by the CI's nvcc check instead")
    info = landscape_ext.build_info()
    assert "CUDA" in info["kernels"]["xent_hvp"]
    assert "CUDA" in info["kernels"]["act_derivs"]


# ---- error paths: messages name the op, the argument and the sizes -----------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    logits = randn(6, 4, dtype=torch.float32, device=device, seed=24)
    target = targets(6, 4, device, seed=25)
    dirs = randn(2, 6, 4, dtype=torch.float32, device=device, seed=26)
    cases = [
        ((logits[0], target, dirs), r"xent_hvp: logits must be 2-D \(N, C\), got shape \[4\]"),
        ((logits, target[:5], dirs), r"target must be 1-D \(N,\) with N = 6 rows of logits, "
                                     r"got shape \[5\]"),
        ((logits, target, dirs[:, :, :3]), r"directions must be \(k, N, C\) with N = 6, C = 4, "
                                           r"got shape \[2, 6, 3\]"),
        ((logits, target.int(), dirs), r"target must be int64 class indices, got Int"),
        ((logits.long(), target, dirs), r"logits must be float64, float32, float16 or bfloat16"),
        ((logits, target, dirs.int()), r"directions must be float64, float32, float16 or "
                                       r"bfloat16, got Int"),
        ((logits[:, :0], target, dirs[:, :, :0]), r"logits has C = 0 classes"),
    ]
    for args, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            ops.xent_hvp(*args)
    with pytest.raises(RuntimeError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        ops.xent_hvp(logits, target, dirs, label_smoothing=1.5)
    bad = target.clone()
    bad[4] = 4
    with pytest.raises(RuntimeError, match=r"target\[4\] = 4 is outside \[0, 4\) for C = 4 "
                                           r"classes and is not ignore_index = -100"):
        ops.xent_hvp(logits, bad, dirs)
    bad[4] = -1
    with pytest.raises(RuntimeError, match=r"target\[4\] = -1 is outside"):
        ops.xent_hvp(logits, bad, dirs)
    ops.xent_hvp(logits, bad, dirs, ignore_index=-1)  # fine when -1 is the ignore_index
    nan = logits.clone()
    nan[3, 2] = float("inf")
    with pytest.raises(RuntimeError, match=r"logits has non-finite values in row 3 \(of N = 6"):
        ops.xent_hvp(nan, target, dirs)
    nan[3, 2] = float("nan")
    with pytest.raises(RuntimeError, match=r"non-finite values in row 3"):
        ops.xent_hvp(nan, target, dirs)
    t = target.clone()
    t[3] = -100
    ops.xent_hvp(nan, t, dirs)  # an ignored row is not read


def test_mixed_devices_error():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    logits = randn(4, 3, device="cuda", seed=27)
    with pytest.raises(RuntimeError, match=r"logits is on cuda:0 but directions is on cpu"):
        ops.xent_hvp(logits, targets(4, 3, "cuda", 1), randn(1, 4, 3))


# ---- act_derivs --------------------------------------------------------------------------------

def exact_derivs(z, act):
    """sigma, sigma', sigma'' by autograd in float64 (independent of the formulas)."""
    fn = {"identity": lambda x: x, "relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh,
          "silu": F.silu}[act]
    x = z.double().detach().requires_grad_(True)
    a = fn(x)
    (d1,) = torch.autograd.grad(a.sum(), x, create_graph=True)
    d2 = torch.autograd.grad(d1.sum(), x, allow_unused=True)[0] if d1.requires_grad else None
    return a.detach(), d1.detach(), (torch.zeros_like(x) if d2 is None else d2.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTS)
def test_act_derivs_float64_matches_autograd(device, act):
    z = torch.linspace(-9, 9, 2001, dtype=torch.float64, device=device)
    z = z[z != 0]  # relu's kink
    got = ops.act_derivs(z, act)
    want = exact_derivs(z, act)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_act_derivs_low_precision_accuracy(device, act, dtype):
    # dense grid through every branch of the vector math (erf: |x| <= 1, 1..4, >= 4; tanh:
    # |x| < 0.625 and above; exp underflow), odd length for the vector tail
    z = torch.cat([torch.linspace(-30, 30, 60_001, dtype=torch.float64),
                   torch.linspace(-1e-3, 1e-3, 1001, dtype=torch.float64)]).to(dtype)
    z = z[z != 0].to(device)
    got = ops.act_derivs(z, act)
    truth = exact_derivs(z, act)
    torch_vals = reference.act_derivs(z, act)
    for name, g, t, r in zip(("a", "d1", "d2"), got, truth, torch_vals):
        assert g.dtype == dtype and g.shape == z.shape
        # error against the float64 truth of the stored inputs: at most ~2x what the torch
        # composition at the same precision errs, plus 3 ulp of the output dtype
        err = (g.double() - t).abs()
        ulp = torch.finfo(dtype).eps * t.abs().clamp_min(torch.finfo(dtype).tiny)
        if r is None:
            r = torch.zeros_like(g)
        torch_err = (r.double() - t).abs()
        bad = err > 2 * torch_err + 3 * ulp + 1e-30
        # absolute floor for values that cancel (d2 crosses 0): 2 ulp of the function's scale
        bad &= err > 2 * torch.finfo(dtype).eps * t.abs().max()
        assert not bad.any(), (name, z[bad][:5], g[bad][:5], t[bad][:5])


@pytest.mark.parametrize("device", DEVICES)
def test_act_derivs_shapes_and_strides(device):
    z = torch.randn(7, 5, 3, device=device).transpose(0, 2)   # non-contiguous
    a, d1, d2 = ops.act_derivs(z, "tanh")
    assert a.shape == z.shape and a.is_contiguous()
    torch.testing.assert_close(a, torch.tanh(z))
    e = ops.act_derivs(torch.empty(0, 4, device=device), 2)
    assert all(t.shape == (0, 4) for t in e)


@pytest.mark.parametrize("device", DEVICES)
def test_act_derivs_opcheck_and_errors(device):
    z = torch.randn(33, 17, device=device)
    for code in (1, 2):
        torch.library.opcheck(torch.ops.landscape_ext.act_derivs, (z, code))
    torch.library.opcheck(torch.ops.landscape_ext.act_derivs, (z.bfloat16(), 2))
    with pytest.raises(RuntimeError, match=r"act_derivs: act = 7 is not an activation code"):
        ops.act_derivs(z, 7)
    with pytest.raises(RuntimeError, match=r"act_derivs: z must be float64, float32, float16 or "
                                           r"bfloat16, got Long"):
        ops.act_derivs(z.long(), 1)
    with pytest.raises(ValueError, match=r"unknown activation 'swish'"):
        ops.act_derivs(z, "swish")


def test_act_derivs_torch_compile_fullgraph():
    z = torch.randn(5, 6)

    def step(z):
        a, d1, d2 = ops.act_derivs(z * 2.0, 2)
        return a.sum() + d1.sum() + d2.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z), step(z))


# ---- impl="composite": the reference through the op's wrapper, against the kernel --------------

@pytest.mark.parametrize("device", DEVICES)
def test_xent_hvp_composite_matches_fused(device):
    logits = randn(9, 13, device=device, seed=30, scale=2.0)
    target = targets(9, 13, device, seed=31, ignore_rows=(2,))
    for dirs in (randn(3, 9, 13, device=device, seed=32), randn(9, 13, device=device, seed=33)):
        fused = ops.xent_hvp(logits, target, dirs, 0.1, impl="fused")
        composite = ops.xent_hvp(logits, target, dirs, 0.1, impl="composite")
        assert composite.shape == fused.shape and composite.is_contiguous()
        torch.testing.assert_close(composite, fused, rtol=1e-12, atol=1e-15)
        if device == "cpu":  # auto on CPU runs the kernel (ops.IMPL_DEFAULTS)
            assert torch.equal(ops.xent_hvp(logits, target, dirs, 0.1), fused)
    # the all-ignored convention and its warning hold on the composite path too
    with pytest.warns(UserWarning, match=r"all N = 9 targets equal ignore_index = -100"):
        out = ops.xent_hvp(logits, torch.full_like(target, -100), dirs, impl="composite")
    assert torch.equal(out, torch.zeros_like(dirs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTS)
def test_act_derivs_composite_matches_fused(device, act):
    z = randn(7, 33, device=device, seed=34, scale=3.0)
    fused = ops.act_derivs(z, act, impl="fused")
    for c, f in zip(ops.act_derivs(z, act, impl="composite"), fused):
        assert c.shape == f.shape and c.dtype == f.dtype
        torch.testing.assert_close(c, f, rtol=1e-13, atol=1e-14)
    # by code, on a transposed view: contiguous results, like the kernel's
    for c, f in zip(ops.act_derivs(z.T, ops.ACTIVATIONS[act], impl="composite"), fused):
        assert c.is_contiguous()
        torch.testing.assert_close(c, f.T, rtol=1e-13, atol=1e-14)
    if device == "cpu":  # auto on CPU runs the kernel
        assert all(torch.equal(a, f) for a, f in zip(ops.act_derivs(z, act), fused))


def test_impl_is_checked():
    z = randn(4, 3, seed=35)
    with pytest.raises(ValueError, match=r"act_derivs: impl must be 'auto', 'fused' or "
                                         r"'composite' .*got 'kernel'"):
        ops.act_derivs(z, "gelu", impl="kernel")
    with pytest.raises(ValueError, match=r"xent_hvp: impl must be .*got 'Fused'"):
        ops.xent_hvp(z, targets(4, 3, "cpu", seed=36), z, impl="Fused")
