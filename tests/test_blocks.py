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
        idx = torch.cat([torch.arange(op.layout.offsets[n], op.layout.offsets[n]
                                      + op.layout._size_of[n]) for n in names])
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
