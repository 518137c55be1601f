"""The engine on a GPU against the same computation on the CPU: operator products, eigsh, trace,
spectral density, the fused MLP path, a transformer under the attention context, and the
gradient-covariance SVD. Every model is built on the CPU in float64 and copied to the GPU, so the
two runs see the same parameters and data; the CUDA kernels of the krylov, hvp and sketch families
run inside these calls. Skipped without a GPU (scripts/gpu_check.sh runs them on one)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import landscape_ext as le

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _mlp_problem(seed=0, n=64, width=24):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, width), nn.GELU(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 5)).double()
    X = torch.randn(n, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)


def _on(device, model, data):
    return copy.deepcopy(model).to(device), tuple(t.to(device) for t in data)


def _dense(op):
    eye = torch.eye(op.d, dtype=torch.float64, device=op.device)
    return op.apply_rows(eye).cpu()


@pytest.mark.parametrize("operator", [le.HessianOperator, le.GGNOperator])
@pytest.mark.parametrize("mode", ["auto", "double-backward", "forward-over-reverse"])
def test_products_match_cpu(operator, mode):
    model, loss_fn, data = _mlp_problem()
    cpu = operator(model, loss_fn, data, mode=mode)
    gm, gd = _on("cuda", model, data)
    gpu = operator(gm, loss_fn, gd, mode=mode)
    torch.testing.assert_close(_dense(gpu), _dense(cpu), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("basis_dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_eigsh_matches_cpu(basis_dtype):
    model, loss_fn, data = _mlp_problem(seed=1)
    exact = torch.linalg.eigvalsh(_dense(le.HessianOperator(model, loss_fn, data)))
    top = exact.flip(0)[:4]
    gm, gd = _on("cuda", model, data)
    r = le.eigsh(le.HessianOperator(gm, loss_fn, gd), 4, "largest", tol=1e-6, seed=0,
                 basis_dtype=basis_dtype)
    assert r.converged.all()
    # bf16 bases are reorthogonalized in the accumulation type: the Ritz values keep full accuracy
    torch.testing.assert_close(r.eigenvalues.cpu(), top, rtol=1e-5, atol=1e-8)


def test_trace_and_density_match_cpu():
    model, loss_fn, data = _mlp_problem(seed=2)
    H = _dense(le.HessianOperator(model, loss_fn, data))
    gm, gd = _on("cuda", model, data)
    op = le.HessianOperator(gm, loss_fn, gd)
    t = le.trace(op, 300, "hutch++", seed=0)
    assert t.n_matvecs == 300 and t.stderr > 0
    assert abs(t.estimate - float(H.trace())) < 4 * t.stderr
    cpu = le.spectral_density(le.HessianOperator(model, loss_fn, data), 20, 4, seed=3)
    gpu = le.spectral_density(op, 20, 4, seed=3)
    # the same probes (drawn on the CPU generator) give the same Lanczos nodes and weights
    torch.testing.assert_close(torch.as_tensor(gpu.nodes).cpu(), torch.as_tensor(cpu.nodes),
                               rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.as_tensor(gpu.weights).cpu(), torch.as_tensor(cpu.weights),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_mlp_products_match_autograd(dtype):
    model, _, (X, y) = _mlp_problem(seed=4)
    gm = copy.deepcopy(model).to("cuda", dtype)
    Xg, yg = X.to("cuda", dtype), y.cuda()
    d = sum(p.numel() for p in gm.parameters())
    V = torch.randn(3, d, device="cuda", dtype=dtype)
    got = le.mlp_hvp(gm, Xg, yg, V.T, fused=True).T
    want = le.HessianOperator(gm, nn.CrossEntropyLoss(), (Xg, yg),
                              mode="double-backward").apply_rows(V)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert ((got - want).norm() / want.norm()).item() < tol


class _TinyLM(nn.Module):
    def __init__(self, vocab=17, width=16, heads=2, seq=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).triu(1))

    def forward(self, tokens):
        h = self.blocks(self.emb(tokens), mask=self.causal, is_causal=True)
        return self.head(h).flatten(0, 1)


def test_transformer_hessian_under_any_backend_matches_cpu():
    """On a GPU the default SDPA backends (flash, memory-efficient) have no double backward;
    the operator switches to one that has, and gives the CPU's answer."""
    torch.manual_seed(0)
    model = _TinyLM().double().eval()
    tokens = torch.randint(0, 17, (3, 6))
    data = (tokens, torch.randint(0, 17, (18,)))
    cpu = le.HessianOperator(model, nn.CrossEntropyLoss(), data)
    gm, gd = _on("cuda", model, data)
    gpu = le.HessianOperator(gm, nn.CrossEntropyLoss(), gd)
    V = torch.randn(2, cpu.d, dtype=torch.float64)
    torch.testing.assert_close(gpu.apply_rows(V.cuda()).cpu(), cpu.apply_rows(V),
                               rtol=1e-8, atol=1e-10)
    assert gpu.attention_backend is not None


def test_gradient_covariance_svd_matches_cpu():
    model, _, data = _mlp_problem(seed=5, n=48)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    cpu = le.gradient_covariance_svd(model, loss_fn, data, 4, method="gram")
    gm, gd = _on("cuda", model, data)
    for method in ("gram", "kronecker"):
        gpu = le.gradient_covariance_svd(gm, loss_fn, gd, 4, method=method, n_power_iter=4)
        torch.testing.assert_close(torch.as_tensor(gpu.singular_values).cpu(),
                                   torch.as_tensor(cpu.singular_values), rtol=1e-4, atol=1e-10)
