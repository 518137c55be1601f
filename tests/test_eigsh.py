"""eigsh / spectral_norm against matrices with known spectra and exact model Hessians."""
from __future__ import annotations

import json

import pytest
import torch

import landscape_ext as le
from landscape_ext import HessianOperator, eigsh, spectral_norm

from _spectra import known_spectrum as _matrix

pytestmark = pytest.mark.usefixtures("single_thread")


def _spectrum(d=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    top = torch.tensor([20.0, 15.0, 12.0, 11.0, 10.5, 10.0, 9.0, 8.5, 8.0, 7.5],
                       dtype=torch.float64)
    bottom = -torch.tensor([9.5, 7.0, 6.5, 6.0, 5.0, 4.5, 4.2, 4.0, 3.8, 3.5],
                           dtype=torch.float64)
    bulk = torch.rand(d - 20, generator=g, dtype=torch.float64) * 4 - 2
    return torch.cat([top, bulk, bottom])


def _reference(ev, which, k):
    if which == "largest":
        return torch.sort(ev, descending=True).values[:k]
    if which == "smallest":
        return torch.sort(ev).values[:k]
    if which == "magnitude":
        return ev[torch.argsort(ev.abs(), descending=True)][:k]
    top = torch.sort(ev, descending=True).values
    kt = (k + 1) // 2
    return torch.cat([top[:kt], top[top.numel() - (k - kt):]])


def _residuals(A, vals, vecs):
    return torch.linalg.vector_norm(A @ vecs - vecs * vals, dim=0)


@pytest.mark.parametrize("which", ["largest", "smallest", "both", "magnitude"])
@pytest.mark.parametrize("block_size", [1, 3])
def test_known_spectrum(which, block_size):
    ev = _spectrum()
    A, _ = _matrix(ev)
    r = eigsh(A, 8, which, block_size=block_size, seed=1)
    ref = _reference(ev, which, 8)
    assert r.converged.all()
    torch.testing.assert_close(r.eigenvalues, ref, rtol=0, atol=1e-10 * 20)
    # honest residuals: the Lanczos formula equals the recomputed residual up to rounding
    true_res = _residuals(A, r.eigenvalues, r.eigenvectors)
    assert (true_res - r.residuals).abs().max() < 1e-11 * 20
    assert (r.residuals <= r.tol * r.spectral_norm_estimate).all()
    # eigenvectors up to sign (all eigenvalues here are separated)
    for j, lam in enumerate(r.eigenvalues):
        i = int(torch.argmin((ev - lam).abs()))
        _, U = _matrix(ev)
        assert abs(float(U[:, i] @ r.eigenvectors[:, j])) > 1 - 1e-9


def test_verify_recomputes_residuals():
    ev = _spectrum()
    A, _ = _matrix(ev)
    r = eigsh(A, 5, verify=True)
    assert r.residuals_verified
    torch.testing.assert_close(r.residuals, _residuals(A, r.eigenvalues, r.eigenvectors),
                               rtol=1e-6, atol=1e-12)
    r2 = eigsh(A, 5, verify=False)
    assert r.n_matvecs == r2.n_matvecs + 5  # the verification product is counted


def test_multiplicity_clusters_and_restarts():
    g = torch.Generator().manual_seed(3)
    ev = torch.cat([torch.tensor([5.0, 5.0, 5.0, 4.999, 4.998, 3.0], dtype=torch.float64),
                    torch.rand(294, generator=g, dtype=torch.float64) * 2])
    A, _ = _matrix(ev, seed=2)
    r = eigsh(A, 6, block_size=4, max_basis=24, seed=0)
    assert r.n_restarts > 0
    torch.testing.assert_close(r.eigenvalues, torch.sort(ev, descending=True).values[:6],
                               rtol=0, atol=1e-10 * 5)


def test_rank_deficient_operator():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 4, generator=g, dtype=torch.float64))
    A = (U * torch.tensor([4.0, 3.0, -2.0, 1.0], dtype=torch.float64)) @ U.T
    A = 0.5 * (A + A.T)
    r = eigsh(A, 6, "largest", block_size=2)
    assert r.converged.all()
    torch.testing.assert_close(r.eigenvalues, torch.tensor([4.0, 3.0, 1.0, 0.0, 0.0, 0.0],
                                                           dtype=torch.float64),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.bfloat16])
def test_low_precision_basis(basis_dtype):
    ev = _spectrum()
    A, _ = _matrix(ev)
    tol = 1e-5 if basis_dtype == torch.float32 else 1e-2
    r = eigsh(A, 5, basis_dtype=basis_dtype, tol=tol)
    err = (r.eigenvalues - _reference(ev, "largest", 5)).abs().max() / 20
    # the stored basis is orthonormal to its precision only: errors ~ eps(basis_dtype) * |A|
    assert err < (1e-7 if basis_dtype == torch.float32 else 4 * 7.8e-3)
    assert r.basis_dtype == str(basis_dtype)


def test_dense_path_for_tiny_problems():
    ev = torch.linspace(-3, 4, 20, dtype=torch.float64)
    A, _ = _matrix(ev)
    r = eigsh(A, 4, "both")
    assert r.method == "dense" and r.n_matvecs == 20
    torch.testing.assert_close(r.eigenvalues, _reference(ev, "both", 4), rtol=0, atol=1e-12)


def test_warm_start_and_spectral_norm():
    ev = _spectrum()
    ev[-1] = -25.0  # the largest magnitude is negative
    A, U = _matrix(ev)
    s = spectral_norm(A, tol=1e-6)
    assert abs(s.value - 25.0) < 1e-8 and s.eigenvalue < 0 and s.converged
    warm = spectral_norm(A, tol=1e-6, v0=U[:, -1] + 1e-3 * U[:, 0])
    assert warm.n_matvecs < s.n_matvecs
    r = eigsh(A, 1, "smallest", v0=U[:, -1], tol=1e-6)
    assert abs(float(r.eigenvalues[0]) + 25.0) < 1e-8
    json.loads(s.to_json())


@pytest.mark.parametrize("name", ["mlp", "cnn", "negcurv"])
def test_model_hessian_float64(problem, exact_hessian, name):
    model, loss, data = problem(name)
    H = exact_hessian(name)
    ev = torch.linalg.eigvalsh(H)
    scale = float(ev.abs().max())
    if name == "negcurv":
        assert ev[0] < -0.2 * scale  # the model really has negative curvature
    op = HessianOperator(model, loss, data, mode="double-backward")
    r = eigsh(op, 20, "both", tol=1e-9, seed=0, max_basis=80)
    assert r.converged.all()
    ref = _reference(ev, "both", 20)
    assert ((r.eigenvalues - ref).abs() / scale).max() < 1e-8
    assert r.n_matvecs == op.n_matvecs
    true_res = _residuals(H, r.eigenvalues, r.eigenvectors)
    assert ((true_res - r.residuals).abs() / scale).max() < 1e-9
    # eigenvectors where the eigenvalue is separated from its neighbours
    U = torch.linalg.eigh(H).eigenvectors
    for j, lam in enumerate(r.eigenvalues):
        i = int(torch.argmin((ev - lam).abs()))
        gap = min(float((ev[i] - ev[i - 1]).abs()) if i > 0 else float("inf"),
                  float((ev[i + 1] - ev[i]).abs()) if i + 1 < ev.numel() else float("inf"))
        if gap > 1e-3 * scale:
            assert abs(float(U[:, i] @ r.eigenvectors[:, j])) > 1 - 1e-6


@pytest.mark.parametrize("name", ["mlp", "cnn", "negcurv"])
def test_model_hessian_float32(problem, exact_hessian, name):
    model, loss, (X, y) = problem(name)
    H = exact_hessian(name)
    ev = torch.linalg.eigvalsh(H)
    scale = float(ev.abs().max())
    m32 = model.float()
    y32 = y.float() if y.is_floating_point() else y
    op = HessianOperator(m32, loss, (X.float(), y32), mode="double-backward")
    r = eigsh(op, 20, "both", tol=1e-4, seed=0, max_basis=80)
    assert r.eigenvectors.dtype == torch.float32
    assert ((r.eigenvalues - _reference(ev, "both", 20)).abs() / scale).max() < 1e-4


def test_errors():
    A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="k = 51 is larger than the dimension d = 50"):
        eigsh(A, 51)
    with pytest.raises(ValueError, match="which"):
        eigsh(A, 2, "top")
    with pytest.raises(ValueError, match="positive integer"):
        eigsh(A, 0)
    with pytest.raises(ValueError, match="max_basis = 5"):
        eigsh(A, 4, max_basis=5)
    with pytest.raises(ValueError, match="tol"):
        eigsh(A, 2, tol=0.0)


def test_result_printing_and_json():
    A, _ = _matrix(_spectrum())
    r = eigsh(A, 3, seed=7)
    s = str(r)
    assert "EigshResult(" in s and "eigenvalues=" in s and "n_matvecs=" in s
    d = json.loads(r.to_json())
    assert d["seed"] == 7 and d["n_matvecs"] == r.n_matvecs and len(d["eigenvalues"]) == 3
    assert "eigenvectors" not in d and d["type"] == "EigshResult"
    assert r.relative_residuals.shape == (3,)


def _tiny_ggn(din, h, c, n):
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(din, h), nn.Tanh(), nn.Linear(h, c)).double()
    X = torch.randn(n, din, dtype=torch.float64)
    y = torch.randint(0, c, (n,))
    op = le.GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    A = torch.stack([op @ e for e in torch.eye(op.d, dtype=torch.float64)])
    op.n_matvecs = 0
    return op, torch.linalg.eigvalsh(0.5 * (A + A.T))


@pytest.mark.parametrize("which", ["both", "smallest"])
def test_tiny_ggn_both_does_not_exhaust_the_budget(caplog, which):
    # d = 123, rank 80: a 43-dimensional null space at the small end converges slowly in a small
    # restarted basis; after d products the operator is solved densely (it used to run into
    # max_matvecs = 2000 and return unconverged pairs with a warning)
    op, ev = _tiny_ggn(6, 12, 3, 40)
    with caplog.at_level("WARNING", logger="landscape_ext.lanczos"):
        r = eigsh(op, 6, which)
    assert not caplog.records
    assert r.converged.all() and r.n_matvecs <= 2 * op.d and r.method == "dense"
    scale = float(ev.abs().max())
    torch.testing.assert_close(r.eigenvalues, _reference(ev, which, 6), rtol=0,
                               atol=1e-12 * scale)


def test_invariant_subspace_keeps_multiplicities():
    # rank 32 (8 samples x 4): the Krylov space of one start vector is invariant at m = 33 and
    # holds a single zero; the fresh directions after it supply the further zeros of "both"
    op, ev = _tiny_ggn(10, 16, 5, 8)
    r = eigsh(op, 20, "both")
    scale = float(ev.abs().max())
    assert r.method == "block-lanczos" and r.n_matvecs < 80
    torch.testing.assert_close(r.eigenvalues, _reference(ev, "both", 20), rtol=0,
                               atol=1e-12 * scale)
    assert (r.eigenvalues[10:].abs() < 1e-12 * scale).all()


def test_budget_warning_can_be_silenced(caplog):
    A, _ = _matrix(_spectrum())
    with caplog.at_level("DEBUG", logger="landscape_ext.lanczos"):
        r = eigsh(A, 4, max_matvecs=6)
    assert not r.converged.all()
    assert [rec.levelname for rec in caplog.records if "max_matvecs" in rec.getMessage()] == \
        ["WARNING"]
    caplog.clear()
    with caplog.at_level("DEBUG", logger="landscape_ext.lanczos"):
        r2 = eigsh(A, 4, max_matvecs=6, warn=False)
    assert [rec.levelname for rec in caplog.records if "max_matvecs" in rec.getMessage()] == \
        ["DEBUG"]
    torch.testing.assert_close(r2.eigenvalues, r.eigenvalues)


def test_tiny_operator_respects_max_matvecs():
    """Review regression: the up-front dense solve of a tiny operator took d products even
    when max_matvecs was smaller."""
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    A = (Q * torch.arange(1.0, 11.0, dtype=torch.float64)) @ Q.T
    r = eigsh(A, k=3, max_matvecs=5, warn=False)
    assert r.n_matvecs <= 5
    r = eigsh(A, k=3)
    assert r.n_matvecs == 10 and bool(r.converged.all())


@pytest.mark.parametrize("basis_dtype", [torch.float64, torch.float32])
def test_lanczos_mode_orthogonalization_calls(monkeypatch, basis_dtype):
    # eigsh projects out only the last two blocks first (rounds=1, local_rows=2b) on normal
    # steps, and runs full CGS2 on the first blocks, right after a restart and for a basis
    # narrower than the accumulation (float64 operator, float32 basis). A wrong choice would only
    # cost time (the op's second round catches large leftovers): this test pins the choice.
    from landscape_ext import lanczos

    calls = []
    real = lanczos.block_orthonormalize

    def spy(basis, block, n_basis=None, rank_tol=-1.0, rounds=2, local_rows=0):
        calls.append((n_basis, block.shape[0], rounds, local_rows))
        return real(basis, block, n_basis, rank_tol, rounds, local_rows)

    monkeypatch.setattr(lanczos, "block_orthonormalize", spy)
    g = torch.Generator().manual_seed(0)
    evals = torch.linspace(1.0, 2.0, 400, dtype=torch.float64) ** 4
    Qm, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))
    A = (Qm * evals) @ Qm.T
    r = eigsh(A, 20, block_size=2, max_basis=48, basis_dtype=basis_dtype, tol=1e-6)
    assert r.n_restarts >= 1 and bool(r.converged.all())
    torch.testing.assert_close(r.eigenvalues, evals.flip(0)[:20], rtol=1e-6, atol=0)
    steps = calls[1:]  # calls[0]: the start block
    assert len(steps) >= 10
    prev_n = None
    for n, b, rounds, local in steps:
        restarted = prev_n is not None and n < prev_n
        if basis_dtype == torch.float32 or n <= 2 * b or restarted:
            assert (rounds, local) == (2, 0), (n, prev_n, rounds, local)
        else:
            assert (rounds, local) == (1, 2 * b), (n, prev_n, rounds, local)
        prev_n = n
    assert any(rounds == 1 for _, _, rounds, _ in steps) == (basis_dtype == torch.float64)
