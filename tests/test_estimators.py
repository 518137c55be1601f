"""trace / diagonal estimators: exact algebra against naive implementations, accuracy within
their reported standard errors."""
from __future__ import annotations

import json

import pytest
import torch

import landscape_ext as le
from landscape_ext import HessianOperator, diagonal, trace
from landscape_ext.estimators import _xtrace_estimates

pytestmark = pytest.mark.usefixtures("single_thread")


def _psd_like(d=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    ev = torch.cat([torch.linspace(60, 10, 10, dtype=torch.float64),
                    torch.rand(d - 10, generator=g, dtype=torch.float64) - 0.3])
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    A = (Q * ev) @ Q.T
    return 0.5 * (A + A.T)


def _naive_xtrace(A, Om):
    """Algorithm 1.2 of Epperly, Tropp & Webber (2024), one leave-one-out QR per probe."""
    d, m = A.shape[0], Om.shape[0]
    Y = A @ Om.T
    I = torch.eye(d, dtype=torch.float64)
    tr_, dg = [], []
    for i in range(m):
        Qi, _ = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1:]], 1))
        P = Qi @ Qi.T
        w = Om[i]
        tr_.append(torch.trace(Qi.T @ A @ Qi) + w @ (I - P) @ A @ (I - P) @ w)
        dg.append(torch.diag(P @ A) + w * ((I - P) @ A @ w))
    return torch.stack(tr_), torch.stack(dg).mean(0)


def _rademacher(m, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (m, d), generator=g, dtype=torch.int8).to(torch.float64) * 2 - 1


def test_xtrace_and_xdiag_equal_the_naive_algorithm():
    A = _psd_like(120)
    ests = _xtrace_estimates(le.as_operator(A), 5, torch.Generator().manual_seed(4),
                             "rademacher", None)
    naive_tr, naive_diag = _naive_xtrace(A, _rademacher(5, 120, 4))
    torch.testing.assert_close(ests, naive_tr, rtol=1e-10, atol=1e-9)
    r = diagonal(A, 10, "xdiag", seed=4)
    torch.testing.assert_close(r.estimate, naive_diag, rtol=1e-10, atol=1e-10)
    assert r.n_matvecs == 10


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
@pytest.mark.parametrize("seed", [0, 1])
def test_trace_within_three_stderr(method, seed):
    A = _psd_like()
    r = trace(A, 60, method, seed=seed)
    truth = float(torch.trace(A))
    assert r.n_matvecs == 60
    assert abs(r.estimate - truth) <= 3 * r.stderr, (r.estimate, truth, r.stderr)
    assert r.stderr > 0


def test_deflation_beats_hutchinson():
    A = _psd_like()
    se = {m: trace(A, 60, m, seed=0).stderr for m in ("hutchinson", "hutch++", "xtrace")}
    assert se["hutch++"] < 0.5 * se["hutchinson"] and se["xtrace"] < 0.5 * se["hutchinson"]


def test_low_rank_trace_is_exact():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(200, 3, generator=g, dtype=torch.float64)
    A = U @ U.T
    for method in ("hutch++", "xtrace"):
        r = trace(A, 12, method)
        assert abs(r.estimate - float(torch.trace(A))) < 1e-8 * float(torch.trace(A))


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_trace_of_model_hessian(problem, exact_hessian, method):
    model, loss, data = problem("mlp")
    H = exact_hessian("mlp")
    op = HessianOperator(model, loss, data, mode="forward-over-reverse")
    r = trace(op, 48, method, seed=3, batch_size=16)
    assert abs(r.estimate - float(torch.trace(H))) <= 3 * r.stderr
    assert r.n_matvecs == op.n_matvecs == 48
    assert r.mode_used == op.mode_used


def test_diagonal_hutchinson():
    D = torch.diag(torch.linspace(-2, 3, 100, dtype=torch.float64))
    r = diagonal(D, 2)  # Rademacher probes give a diagonal matrix's diagonal exactly
    torch.testing.assert_close(r.estimate, torch.diag(D))
    A = _psd_like(100)
    r = diagonal(A, 200, seed=1)
    z = (r.estimate - torch.diag(A)) / r.stderr
    assert (z.abs() < 3).float().mean() > 0.95
    rg = diagonal(A, 200, seed=1, distribution="gaussian")
    assert ((rg.estimate - torch.diag(A)) / rg.stderr).abs().lt(3).float().mean() > 0.9


def test_xdiag_accuracy_on_model_hessian(problem, exact_hessian):
    model, loss, data = problem("mlp")
    H = exact_hessian("mlp")
    op = HessianOperator(model, loss, data, mode="double-backward")
    r = diagonal(op, 100, "xdiag", seed=0)
    hutch = diagonal(op, 100, "hutchinson", seed=0)
    err_x = (r.estimate - torch.diag(H)).norm()
    err_h = (hutch.estimate - torch.diag(H)).norm()
    assert err_x < err_h
    assert err_x < 0.5 * torch.diag(H).norm()


def test_estimator_errors_and_results():
    A = _psd_like(50)
    with pytest.raises(ValueError, match="method"):
        trace(A, 10, "magic")
    with pytest.raises(ValueError, match=">= 3"):
        trace(A, 2, "hutch++")
    with pytest.raises(ValueError, match="distribution"):
        trace(A, 10, "hutchinson", distribution="uniform")
    with pytest.raises(ValueError, match="method"):
        diagonal(A, 10, "exact")
    r = trace(A, 12, seed=5)
    d = json.loads(r.to_json())
    assert d["seed"] == 5 and d["n_matvecs"] == 12 and d["method"] == "hutch++"
    assert "TraceResult(" in str(r) and "stderr=" in str(r)
    lo, hi = r.interval()
    assert lo < r.estimate < hi
    dd = diagonal(A, 4).to_dict()
    assert dd["d"] == 50 and "estimate" not in dd
