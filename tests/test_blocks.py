"""block_eigsh / parameter_blocks (issue 14, item 4) against dense diagonal blocks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import landscape_ext as le

pytestmark = pytest.mark.usefixtures("single_thread")


def _symmetric(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (A + A.T) / 2


def _index_blocks(d=30, seed=1):
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(seed))
    return {"a": perm[:5], "b": perm[5:15], "c": perm[15:]}


@pytest.mark.parametrize("which", ["largest", "smallest", "both", "magnitude"])
def test_blocks_of_a_dense_matrix(which):
    A = _symmetric(30)
    blocks = _index_blocks()
    res = le.block_eigsh(le.DenseOperator(A), blocks, k=3, which=which, tol=1e-10)
    assert set(res) == {"a", "b", "c"}
    for name, idx in blocks.items():
        block = A[idx][:, idx]
        ref = le.eigsh(le.DenseOperator(block), k=3, which=which).eigenvalues
        torch.testing.assert_close(res[name].eigenvalues, ref, rtol=1e-9, atol=1e-10)
        assert bool(res[name].converged.all())
        # eigenvectors live in the operator's layout, zero outside the block
        vec = res[name].eigenvectors
        outside = torch.ones(30, dtype=torch.bool)
        outside[idx] = False
        assert float(vec[outside].abs().max()) == 0.0
        torch.testing.assert_close(block @ vec[idx], vec[idx] * res[name].eigenvalues,
                                   rtol=1e-7, atol=1e-8)
    # one batched product per step for all blocks: no more products than the largest block
    assert res.n_products <= 15 < res.n_matvecs
    assert res.n_matvecs == sum(r.n_matvecs for r in res.values())


def test_multiple_eigenvalues_in_a_block():
    # a block of rank 2 (eigenvalue 0 with multiplicity 8): a Lanczos breakdown, exact result
    g = torch.Generator().manual_seed(3)
    U = torch.randn(10, 2, generator=g, dtype=torch.float64)
    A = torch.zeros(20, 20, dtype=torch.float64)
    A[:10, :10] = U @ U.T
    A[10:, 10:] = _symmetric(10, seed=4)
    res = le.block_eigsh(A, {"low_rank": torch.arange(10), "rest": torch.arange(10, 20)}, k=4)
    ref = torch.linalg.eigvalsh(A[:10, :10]).flip(0)[:4]
    torch.testing.assert_close(res["low_rank"].eigenvalues, ref, rtol=1e-9, atol=1e-10)


def test_blocks_of_a_model_hessian(problem, exact_hessian):
    model, loss, data = problem("mlp")
    H = exact_hessian("mlp")
    op = le.HessianOperator(model, loss, data)
    blocks = le.parameter_blocks(model, "modules")
    assert list(blocks) == ["0", "2", "4"]
    res = le.block_eigsh(op, blocks, k=2, tol=1e-10)
    for name, names in blocks.items():
        idx = op.layout.indices(names)
        ref = torch.linalg.eigvalsh(H[idx][:, idx]).flip(0)[:2]
        torch.testing.assert_close(res[name].eigenvalues, ref, rtol=1e-8, atol=1e-10)
    summary = res.summary()
    assert set(summary["lambda_1"]) == set(blocks) and summary["ratio_max_min"] >= 1.0
    # a preset name works on a model operator too
    assert list(le.block_eigsh(op, "layers", k=1)) == ["0", "2", "4"]


class _TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.pos = nn.Parameter(torch.zeros(5, 4))
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.ff = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7)


def test_parameter_block_presets():
    model = _TinyTransformer()
    kinds = le.parameter_blocks(model, "kinds")
    assert set(kinds) == {"embeddings", "attention", "norms", "mlp", "head"}
    assert kinds["embeddings"] == ["pos", "emb.weight"]      # named_parameters() order
    assert kinds["attention"] == ["attn.in_proj_weight", "attn.in_proj_bias",
                                  "attn.out_proj.weight", "attn.out_proj.bias"]
    assert kinds["norms"] == ["norm.weight", "norm.bias"]
    assert kinds["mlp"] == ["ff.weight", "ff.bias"] and kinds["head"] == ["head.weight",
                                                                          "head.bias"]
    layers = le.parameter_blocks(model, "layers")
    assert list(layers) == ["(root)", "emb", "attn", "norm", "ff", "head"]
    modules = le.parameter_blocks(model, "modules")
    assert modules["attn.out_proj"] == ["attn.out_proj.weight", "attn.out_proj.bias"]
    with pytest.raises(ValueError, match="preset must be one of"):
        le.parameter_blocks(model, "rows")


def test_block_errors(problem):
    model, loss, data = problem("mlp")
    op = le.HessianOperator(model, loss, data)
    with pytest.raises(ValueError, match=r"blocks\['x'\] names 'nope'"):
        le.block_eigsh(op, {"x": ["nope"]})
    with pytest.raises(ValueError, match="blocks overlap: 'second' and 'first'"):
        le.block_eigsh(op, {"first": ["0.weight"], "second": ["0.weight", "0.bias"]})
    with pytest.raises(ValueError, match=r"blocks\['empty'\] is empty"):
        le.block_eigsh(op, {"empty": []})
    with pytest.raises(ValueError, match="k must be a positive integer"):
        le.block_eigsh(op, "layers", k=0)
    with pytest.raises(ValueError, match="outside"):
        le.block_eigsh(torch.eye(4, dtype=torch.float64), {"a": torch.tensor([1, 9])})


def test_block_spectral_density_of_known_blocks():
    g = torch.Generator().manual_seed(5)
    Qa = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    Qb = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))[0]
    ev_a = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)
    ev_b = torch.linspace(100.0, 101.0, 9, dtype=torch.float64)
    A = torch.zeros(15, 15, dtype=torch.float64)
    A[:6, :6] = Qa @ torch.diag(ev_a) @ Qa.T
    A[6:, 6:] = Qb @ torch.diag(ev_b) @ Qb.T
    A[:6, 6:] = A[6:, :6].T.contiguous() + 0.5   # coupling outside the diagonal blocks
    A[6:, :6] = A[:6, 6:].T
    blocks = {"a": torch.arange(6), "b": torch.arange(6, 15)}
    res = le.block_spectral_density(A, blocks, n_steps=9, n_probes=32, seed=0)
    for name, ev in (("a", ev_a), ("b", ev_b)):
        r = res[name]
        assert r.d == ev.numel() and r.nodes.shape == (32, 9)
        # a full Krylov space: every node that carries weight is an eigenvalue of the block
        weighted = r.nodes[r.weights > 1e-10]
        gap = (weighted[:, None] - ev[None, :]).abs().min(1).values
        assert float(gap.max()) < 1e-8 * float(ev.abs().max() + 1)
        # tr(A_bb) / d_b within 5 standard errors of the probe mean
        assert abs(float(r.moments(1)) - float(ev.mean())) <= 5 * float(r.moments_stderr(1)) + 1e-12
    assert res.n_products <= 9 and res.n_matvecs == res.n_products * 64
    summary = res.summary()
    js = summary["js_distance"]
    assert js["a"]["a"] == 0.0 and js["a"]["b"] == js["b"]["a"] and js["a"]["b"] > 0.99
    assert summary["lambda_max"]["b"] == pytest.approx(101.0, abs=1e-8)


def test_block_spectral_density_of_a_model_hessian(problem, exact_hessian):
    model, loss, data = problem("mlp")
    H = exact_hessian("mlp")
    op = le.HessianOperator(model, loss, data)
    res = le.block_spectral_density(op, "modules", n_steps=12, n_probes=24, seed=1)
    for name, names in le.parameter_blocks(model, "modules").items():
        idx = op.layout.indices(names)
        block = H[idx][:, idx]
        r = res[name]
        exact = float(torch.trace(block)) / idx.numel()
        assert abs(float(r.moments(1)) - exact) <= 5 * float(r.moments_stderr(1)) + 1e-12
        ev = torch.linalg.eigvalsh(block)
        lo, hi = float(ev[0]), float(ev[-1])
        tol = 1e-8 * max(abs(lo), abs(hi))
        assert r.spectral_range[0] >= lo - tol and r.spectral_range[1] <= hi + tol
