"""sketch op family: linear_grad_sketch and linear_grad_project against their references and
against materialized per-sample gradients, both routes (direct / formed), every CPU variant,
strides, duality, opcheck, gradcheck, torch.compile, thread-count independence, the composite
path (impl="composite") and error paths."""
import os
import subprocess
import sys

import pytest
import torch

import landscape_ext
from landscape_ext import ops, reference

from _op_common import on_one_and_many_threads

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32]
# rounding of the float32 kernels relative to sum |e| |V| |a| (the condition of each entry)
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-6}

# (N, T or None, n_in, n_out, l): odd/prime sizes, rows not a multiple of the 6-row micro-tile
# or the 48-row block, n_out below/above the 32-column panel, T = 1 as 3-D, the direct route with
# T > 1 (T l <= T + l + 8) and the formed route (T l > T + l + 8), degenerate dimensions.
SHAPES = [
    (37, None, 23, 19, 5), (256, None, 64, 64, 40), (50, None, 1, 33, 3), (7, None, 17, 1, 1),
    (97, None, 130, 70, 11), (5, 1, 9, 8, 4), (13, 2, 11, 7, 3), (9, 7, 12, 10, 5),
    (6, 33, 5, 4, 16), (0, None, 4, 3, 2), (4, None, 3, 5, 0), (3, 0, 4, 2, 3),
]


def randn(*shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def factors(N, T, n_in, n_out, dtype, device, seed):
    lead = (N,) if T is None else (N, T)
    return (randn(*lead, n_in, dtype=dtype, device=device, seed=seed),
            randn(*lead, n_out, dtype=dtype, device=device, seed=seed + 1))


def scale_sketch(A, E, V):
    return reference.linear_grad_sketch(A.abs().double(), E.abs().double(), V.abs().double())


def scale_project(A, E, W):
    return reference.linear_grad_project(A.abs().double(), E.abs().double(), W.abs().double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_grad_sketch_matches_reference(device, dtype, shape):
    N, T, n_in, n_out, l = shape
    A, E = factors(N, T, n_in, n_out, dtype, device, seed=N + n_in)
    V = randn(l, n_out, n_in, dtype=dtype, device=device, seed=l + 3)
    y = ops.linear_grad_sketch(A, E, V)
    assert y.shape == (N, l) and y.dtype == dtype and y.device.type == device
    ref = reference.linear_grad_sketch(A.double(), E.double(), V.double())
    tol = REL_TOL[dtype] * scale_sketch(A, E, V).clamp_min(1.0)
    assert ((y.double() - ref).abs() <= tol).all()
    # the promise itself: <g_n, V_j> with the per-sample gradients formed explicitly
    if N and l:
        G = reference.per_sample_linear_grads(A.double(), E.double()).reshape(N, -1)
        torch.testing.assert_close(y.double(), G @ V.double().reshape(l, -1).T,
                                   rtol=0, atol=float(tol.max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_grad_project_matches_reference(device, dtype, shape):
    N, T, n_in, n_out, l = shape
    A, E = factors(N, T, n_in, n_out, dtype, device, seed=2 * N + 1)
    W = randn(N, l, dtype=dtype, device=device, seed=5)
    P = ops.linear_grad_project(A, E, W)
    assert P.shape == (l, n_out, n_in) and P.dtype == dtype
    ref = reference.linear_grad_project(A.double(), E.double(), W.double())
    tol = REL_TOL[dtype] * scale_project(A, E, W).clamp_min(1.0)
    assert ((P.double() - ref).abs() <= tol).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [None, 3, 12])
def test_sketch_and_project_are_transposes(device, T):
    # <G V^T, W> = <V, G^T W> for every V, W
    N, n_in, n_out, l = 41, 13, 21, 6
    A, E = factors(N, T, n_in, n_out, torch.float64, device, seed=7)
    V = randn(l, n_out, n_in, dtype=torch.float64, device=device, seed=8)
    W = randn(N, l, dtype=torch.float64, device=device, seed=9)
    lhs = (ops.linear_grad_sketch(A, E, V) * W).sum()
    rhs = (V * ops.linear_grad_project(A, E, W)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    # directions as the pipeline passes them: a column block of an (l, d) buffer (stride(0) = d),
    # acts/out_grads transposed views; and directions whose inner dims are not contiguous.
    N, n_in, n_out, l, d = 45, 19, 26, 7, 1000
    buf = randn(l, d, dtype=torch.float32, device=device, seed=10)
    V = buf[:, 100:100 + n_out * n_in].view(l, n_out, n_in)
    assert not V.is_contiguous()
    A = randn(n_in, N, dtype=torch.float32, device=device, seed=11).T
    E = randn(n_out, N, dtype=torch.float32, device=device, seed=12).T
    Vt = V.contiguous().transpose(1, 2).contiguous().transpose(1, 2)   # inner stride != 1
    # the fused kernel reads any strides itself: bit-identical to contiguous inputs
    expected = ops.linear_grad_sketch(A.contiguous(), E.contiguous(), V.contiguous(), impl="fused")
    for directions in (V, Vt):
        torch.testing.assert_close(ops.linear_grad_sketch(A, E, directions, impl="fused"),
                                   expected, rtol=0, atol=0)
        # the default (composite on CUDA: vendor GEMMs pick other algorithms for other layouts)
        torch.testing.assert_close(ops.linear_grad_sketch(A, E, directions), expected,
                                   rtol=1e-5, atol=1e-5)
    W = randn(l, N, dtype=torch.float32, device=device, seed=13).T
    torch.testing.assert_close(ops.linear_grad_project(A, E, W),
                               ops.linear_grad_project(A.contiguous(), E.contiguous(),
                                                       W.contiguous()), rtol=1e-6, atol=1e-5)


ISA_LEVELS = ["default", "x86-64-v3", "x86-64-v4"]


def check_cpu_variant():
    """Body of test_every_cpu_variant_matches_reference, run in a fresh process (the kernel reads
    LANDSCAPE_EXT_SKETCH_ISA once); prints the level that ran."""
    for dtype in DTYPES:
        for N, n_in, n_out, l in [(53, 29, 47, 5), (96, 64, 32, 3), (7, 5, 3, 2)]:
            A, E = factors(N, None, n_in, n_out, dtype, "cpu", seed=N)
            V = randn(l, n_out, n_in, dtype=dtype, device="cpu", seed=l)
            y = ops.linear_grad_sketch(A, E, V)
            ref = reference.linear_grad_sketch(A.double(), E.double(), V.double())
            assert ((y.double() - ref).abs()
                    <= REL_TOL[dtype] * scale_sketch(A, E, V).clamp_min(1.0)).all()
    print(landscape_ext.build_info()["sketch_isa_level"])


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_every_cpu_variant_matches_reference(isa):
    # LANDSCAPE_EXT_SKETCH_ISA caps the variant's level (a level above the CPU's: the CPU's runs)
    env = dict(os.environ, LANDSCAPE_EXT_SKETCH_ISA=isa)
    code = "import test_sketch; test_sketch.check_cpu_variant()"
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    native = landscape_ext.build_info()["sketch_isa_level"]
    expected = ISA_LEVELS[min(ISA_LEVELS.index(isa), ISA_LEVELS.index(native))]
    assert run.stdout.split()[-1] == expected


def test_results_do_not_depend_on_thread_count():
    A, E = factors(301, None, 77, 90, torch.float32, "cpu", seed=14)
    V = randn(9, 90, 77, dtype=torch.float32, device="cpu", seed=15)
    one, many = on_one_and_many_threads(lambda: ops.linear_grad_sketch(A, E, V))
    assert torch.equal(one, many)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [None, 2, 9])
def test_opcheck(device, T):
    A, E = factors(11, T, 6, 5, torch.float32, device, seed=16)
    V = randn(4, 5, 6, dtype=torch.float32, device=device, seed=17)
    W = randn(11, 4, dtype=torch.float32, device=device, seed=18)
    torch.library.opcheck(torch.ops.landscape_ext.linear_grad_sketch, (A, E, V))
    torch.library.opcheck(torch.ops.landscape_ext.linear_grad_project, (A, E, W))


@pytest.mark.parametrize("T", [None, 3, 12])
def test_composite_matches_fused(T):
    # impl="composite" runs the einsum reference through the same wrapper (both routes of the
    # kernel: T = 3 direct, T = 12 formed); auto on CPU runs the kernel (ops.IMPL_DEFAULTS)
    A, E = factors(23, T, 9, 7, torch.float64, "cpu", seed=40)
    V = randn(5, 7, 9, dtype=torch.float64, device="cpu", seed=41)
    W = randn(23, 5, dtype=torch.float64, device="cpu", seed=42)
    for op, third in ((ops.linear_grad_sketch, V), (ops.linear_grad_project, W)):
        fused = op(A, E, third, impl="fused")
        composite = op(A, E, third, impl="composite")
        assert composite.shape == fused.shape and composite.dtype == fused.dtype
        torch.testing.assert_close(composite, fused, rtol=1e-12, atol=1e-12)
        assert torch.equal(op(A, E, third), fused)


@pytest.mark.parametrize("T", [None, 2, 9])
def test_gradcheck(T):
    A, E = factors(5, T, 4, 3, torch.float64, "cpu", seed=19)
    V = randn(2, 3, 4, dtype=torch.float64, device="cpu", seed=20)
    W = randn(5, 2, dtype=torch.float64, device="cpu", seed=21)
    for t in (A, E, V, W):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(ops.linear_grad_sketch, (A, E, V))
    assert torch.autograd.gradcheck(ops.linear_grad_project, (A, E, W))
    assert torch.autograd.gradgradcheck(ops.linear_grad_sketch, (A, E, V))
    # the composite path is differentiable where the kernel is
    for op, third in ((ops.linear_grad_sketch, V), (ops.linear_grad_project, W)):
        assert torch.autograd.gradcheck(lambda a, e, t: op(a, e, t, impl="composite"),
                                        (A, E, third))


def test_torch_compile_fullgraph():
    A, E = factors(8, None, 5, 4, torch.float32, "cpu", seed=22)
    V = randn(3, 4, 5, dtype=torch.float32, device="cpu", seed=23)

    def step(A, E, V):
        y = ops.linear_grad_sketch(A * 2.0, E, V)
        return ops.linear_grad_project(A, E, y).sum() + y.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(A, E, V), step(A, E, V))


def test_cuda_kernels_are_registered_when_a_gpu_exists():
    info = landscape_ext.build_info()
    assert "CPU" in info["kernels"]["linear_grad_sketch"]
    assert "CPU" in info["kernels"]["linear_grad_project"]
    if not torch.cuda.is_available():
        pytest.skip("no GPU: CUDA kernels are compiled by the CI's nvcc check instead")
    assert "CUDA" in info["kernels"]["linear_grad_sketch"]
    assert "CUDA" in info["kernels"]["linear_grad_project"]


# ---- error paths: messages name the op, the argument and the sizes -----------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_linear_grad_sketch_errors(device):
    A, E = factors(6, None, 5, 4, torch.float32, device, seed=24)
    V = randn(3, 4, 5, dtype=torch.float32, device=device, seed=25)
    A3, E3 = factors(6, 2, 5, 4, torch.float32, device, seed=26)
    cases = [
        ((A[0], E, V), r"linear_grad_sketch: acts must be 2-D \(N, n_in\) or 3-D \(N, T, n_in\), "
                       r"got shape \[5\]"),
        ((A, E3, V), r"out_grads must be 2-D like acts \(\(N, n_out\)\), got shape \[6, 2, 4\]"),
        ((A[:5], E, V), r"acts has N = 5 samples but out_grads has N = 6"),
        ((A3, E3[:, :1], V), r"acts has T = 2 positions per sample but out_grads has T = 1"),
        ((A, E, V[0]), r"directions must be 3-D \(l, n_out, n_in\), got shape \[4, 5\]"),
        ((A, E, V[:, :3]), r"directions has n_out = 3 but out_grads has n_out = 4"),
        ((A, E, V[:, :, :4]), r"directions has n_in = 4 but acts has n_in = 5"),
        ((A.half(), E.half(), V.half()), r"acts must be float32 or float64, got Half"),
        ((A, E.double(), V), r"acts is Float but out_grads is Double"),
        ((A, E, V.double()), r"acts is Float but directions is Double"),
    ]
    for args, pattern in cases:
        for impl in ("fused", "composite"):  # the same message whichever path runs
            with pytest.raises(RuntimeError, match=pattern):
                ops.linear_grad_sketch(*args, impl=impl)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_grad_project_errors(device):
    A, E = factors(6, None, 5, 4, torch.float32, device, seed=27)
    W = randn(6, 3, dtype=torch.float32, device=device, seed=28)
    cases = [
        ((A, E, W[0]), r"linear_grad_project: weights must be 2-D \(N, l\), got shape \[3\]"),
        ((A, E, W[:4]), r"acts has N = 6 samples but weights has 4 rows"),
        ((A, E, W.double()), r"acts is Float but weights is Double"),
        ((A, E[:5], W), r"acts has N = 6 samples but out_grads has N = 5"),
    ]
    for args, pattern in cases:
        for impl in ("fused", "composite"):
            with pytest.raises(RuntimeError, match=pattern):
                ops.linear_grad_project(*args, impl=impl)


def test_mixed_devices_error():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    A, E = factors(6, None, 5, 4, torch.float32, "cuda", seed=29)
    V = randn(3, 4, 5, dtype=torch.float32, device="cpu", seed=30)
    with pytest.raises(RuntimeError, match=r"acts is on cuda:0 but directions is on cpu"):
        ops.linear_grad_sketch(A, E, V)
