"""landscape_lab.optim: the adaptive rate and the hybrid steps on quadratics with known Hessians,
the model path against exact dense Hessians, state_dict round-trips, NaN/Inf reported."""
import io
import json

import pytest
import torch
from torch import nn

from landscape_lab.optim import (CurvatureAdaptiveLR, HybridHessianAdam, HybridHessianSGD,
                                 SharpnessTracker, hessian_closure, hvp_operator)

F64 = torch.float64


def known_matrix(eigs, seed=0, dtype=F64):
    """Symmetric matrix with spectrum ``eigs`` and its eigenvectors (columns)."""
    g = torch.Generator().manual_seed(seed)
    d = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    A = Q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ Q.T
    return (0.5 * (A + A.T)).to(dtype), Q.to(dtype)


class Quadratic:
    """``L(w) = 1/2 w^T A w - b^T w`` over one parameter ``w``; Hessian ``A``."""

    def __init__(self, eigs, seed=0, dtype=F64):
        g = torch.Generator().manual_seed(seed + 100)
        self.A, self.Q = known_matrix(eigs, seed, dtype)
        d = len(eigs)
        self.b = torch.randn(d, generator=g, dtype=F64).to(dtype)
        self.w = nn.Parameter(torch.randn(d, generator=g, dtype=F64).to(dtype))

    def loss(self, w=None):
        w = self.w if w is None else w
        return 0.5 * w @ self.A @ w - self.b @ w

    def grad(self, w=None):
        w = (self.w if w is None else w).detach()
        return self.A @ w - self.b

    def closure(self, opt):
        def c():
            opt.zero_grad()
            loss = self.loss()
            loss.backward()
            return loss
        return c


def top_eigvec(A, which="magnitude"):
    ev, V = torch.linalg.eigh(A.double())
    i = int(ev.abs().argmax()) if which == "magnitude" else int(ev.argmax())
    return float(ev[i]), V[:, i]


def tiny_problem(seed=0):
    """Tanh MLP 4-5-3 (d = 43) on 16 samples, float64: Lanczos path, cheap dense Hessian."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(16, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (16,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)


def without_times(history):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


# --------------------------------------------------------------------------------------------
# CurvatureAdaptiveLR
# --------------------------------------------------------------------------------------------
def test_adaptive_lr_equals_formula_two_groups():
    q = Quadratic([3.0, 1.0, -7.0, 0.5])  # ||H||_2 = 7, from a negative eigenvalue
    extra = nn.Parameter(torch.zeros(2, dtype=F64))
    opt = torch.optim.SGD([{"params": [q.w]}, {"params": [extra], "lr": 0.3}], lr=0.1)
    sched = CurvatureAdaptiveLR(opt, gamma=0.5, every=1, curvature_closure=lambda: q.A)
    rec = sched.step()
    assert rec["spectral_norm"] == pytest.approx(7.0, rel=1e-12)
    assert rec["eigenvalue"] == pytest.approx(-7.0, rel=1e-12)
    expected = [0.1 / (1 + 0.5 * 7.0), 0.3 / (1 + 0.5 * 7.0)]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected, rel=1e-12)
    assert sched.get_last_lr() == pytest.approx(expected, rel=1e-12)
    assert rec["lr"] == pytest.approx(expected, rel=1e-12)
    # the optimizer then steps with eta_t exactly
    w0 = q.w.detach().clone()
    q.closure(opt)()
    opt.step()
    torch.testing.assert_close(q.w.detach(), w0 - expected[0] * q.grad(w0), rtol=0, atol=1e-14)


def test_adaptive_lr_holds_between_estimates_and_calls_closure_lazily():
    A, _ = known_matrix([2.0, 1.0, 0.5])
    w = nn.Parameter(torch.zeros(3, dtype=F64))
    opt = torch.optim.SGD([w], lr=1.0)
    calls = []

    def closure():
        calls.append(len(calls))
        return A * (len(calls))  # ||H|| = 2, then 4, ...

    sched = CurvatureAdaptiveLR(opt, gamma=1.0, every=3, curvature_closure=closure)
    lrs = []
    for _ in range(5):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(calls) == 2  # steps 0 and 3 only
    assert lrs[:3] == pytest.approx([1 / 3] * 3, rel=1e-12)
    assert lrs[3:] == pytest.approx([1 / 5] * 2, rel=1e-12)
    assert [h["step"] for h in sched.history] == [0, 3]


def test_adaptive_lr_warm_started_lanczos_budget():
    torch.manual_seed(0)
    eigs = [10.0] + torch.linspace(0.0, 5.0, 59).tolist()
    A, _ = known_matrix(eigs, seed=1)
    w = nn.Parameter(torch.zeros(60, dtype=F64))
    opt = torch.optim.SGD([w], lr=0.2)
    sched = CurvatureAdaptiveLR(opt, gamma=0.1, every=1, max_matvecs=4, tol=1e-14,
                                curvature_closure=lambda: A)
    for _ in range(4):
        sched.step()
    h = sched.history
    assert [r["n_matvecs"] for r in h] == [4, 4, 4, 4]
    assert sched.n_matvecs == 16
    assert [r["warm_start"] for r in h] == [False, True, True, True]
    # warm starts keep improving the estimate (4 products each, gap 10 vs 5)
    res = [r["residual"] for r in h]
    assert res[1] < 0.5 * res[0] and res[3] < 0.5 * res[1]
    assert abs(h[-1]["spectral_norm"] - 10.0) < 1e-6 * 10
    cold = CurvatureAdaptiveLR(torch.optim.SGD([w], lr=0.2), gamma=0.1, every=1, max_matvecs=4,
                               tol=1e-14, warm_start=False, curvature_closure=lambda: A)
    for _ in range(4):
        cold.step()
    assert cold.history[-1]["residual"] > 10 * h[-1]["residual"]
    # the rate is the formula of the recorded estimate
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 / (1 + 0.1 * h[-1]["spectral_norm"]),
                                                      rel=1e-15)


def test_adaptive_lr_model_path_matches_dense_and_leaves_model_alone(hessian_of):
    model, loss_fn, data = tiny_problem()
    H = hessian_of(model, loss_fn, data)
    norm = float(torch.linalg.eigvalsh(H).abs().max())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sched = CurvatureAdaptiveLR(opt, gamma=2.0, every=1, max_matvecs=60, tol=1e-9)
    rec = sched.step(hessian_closure(model, loss_fn, data))
    assert rec["spectral_norm"] == pytest.approx(norm, rel=1e-7)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 / (1 + 2.0 * norm), rel=1e-7)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adaptive_lr_bn_dropout_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5),
                          nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(12, 4, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g))
    with torch.no_grad():  # non-trivial running statistics
        model(3 * torch.randn(12, 4, generator=g, dtype=F64) + 1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    sched = CurvatureAdaptiveLR(torch.optim.SGD(model.parameters(), lr=0.1), every=1,
                                max_matvecs=2)
    rec = sched.step(hessian_closure(model, nn.CrossEntropyLoss(), data))
    assert rec["n_matvecs"] == 2 and rec["spectral_norm"] > 0
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adaptive_lr_state_dict_roundtrip():
    A, _ = known_matrix([10.0] + [1.0 + 0.1 * i for i in range(39)], seed=2)

    def run(sched, opt, w, n):
        for _ in range(n):
            opt.zero_grad()
            (0.5 * w @ A @ w).backward()
            sched.step(lambda: A)
            opt.step()

    def make(w0):
        w = nn.Parameter(w0.clone())
        opt = torch.optim.SGD([w], lr=0.05, momentum=0.9)
        return w, opt, CurvatureAdaptiveLR(opt, gamma=0.3, every=2, max_matvecs=3, tol=1e-14)

    w0 = torch.randn(40, dtype=F64, generator=torch.Generator().manual_seed(3))
    wa, oa, sa = make(w0)
    run(sa, oa, wa, 3)
    buf = io.BytesIO()
    torch.save({"opt": oa.state_dict(), "sched": sa.state_dict(), "w": wa.detach().clone()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    wb, ob, sb = make(saved["w"])
    ob.load_state_dict(saved["opt"])
    sb.load_state_dict(saved["sched"])
    wc, oc, sc = make(saved["w"])  # control: same weights, fresh state
    run(sa, oa, wa, 4)
    run(sb, ob, wb, 4)
    run(sc, oc, wc, 4)
    assert torch.equal(wa.detach(), wb.detach())
    assert without_times(sa.history) == without_times(sb.history)
    assert sa.get_last_lr() == sb.get_last_lr()
    assert not torch.equal(wa.detach(), wc.detach())
    json.dumps(sa.to_dict())


def test_adaptive_lr_nan_is_reported():
    w = nn.Parameter(torch.ones(3, dtype=F64))
    opt = torch.optim.SGD([w], lr=0.1)
    bad = hvp_operator(lambda v: v * float("nan"), 3)
    sched = CurvatureAdaptiveLR(opt, every=1)
    with pytest.raises(FloatingPointError, match="curvature estimate at step 0"):
        sched.step(bad)
    A = torch.eye(3, dtype=F64)
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        sched.step(A, loss=torch.tensor(float("nan")))
    w.grad = torch.tensor([0.0, float("inf"), 1.0], dtype=F64)
    with pytest.raises(FloatingPointError, match=r"gradient has 1 NaN/Inf value\(s\) at step 0"):
        sched.step(A)
    w.grad = torch.zeros(3, dtype=F64)
    assert sched.step(A)["spectral_norm"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="due at step 1 but no curvature_closure"):
        sched.step()


# --------------------------------------------------------------------------------------------
# HybridHessianSGD / HybridHessianAdam on quadratics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["magnitude", "largest"])
def test_hybrid_sgd_moves_as_derived(which):
    q = Quadratic([4.0, 2.0, 1.0, -5.0, 0.25])
    lam, u = top_eigvec(q.A, which)
    assert lam == pytest.approx(-5.0 if which == "magnitude" else 4.0)
    lr, mu, gamma = 0.05, 0.3, 0.2
    opt = HybridHessianSGD([q.w], lr=lr, mu=mu, gamma=gamma, every=1, which=which,
                           curvature_closure=lambda: q.A)
    w = q.w.detach().clone()
    for t in range(3):
        g = q.grad(w)
        s = 1.0 if float(u @ g) >= 0 else -1.0
        w = w - lr / (1 + gamma * abs(lam)) * (g + mu * s * u)
        loss = opt.step(q.closure(opt))
        assert loss is not None
        torch.testing.assert_close(q.w.detach(), w, rtol=0, atol=1e-13)
    assert opt.eigenvalue == pytest.approx(lam, rel=1e-12)
    assert [h["step"] for h in opt.history] == [0, 1, 2]


def test_hybrid_sign_makes_the_eigen_term_descend():
    q = Quadratic([6.0, 1.0, 0.5, 0.2])
    _, u = top_eigvec(q.A)
    for w0 in (3.0 * u - 0.1, -3.0 * u - 0.1):  # u.g of both signs
        q.b.zero_()
        with torch.no_grad():
            q.w.copy_(w0)
        g0 = q.grad().clone()
        opt = HybridHessianSGD([q.w], lr=1e-3, mu=5.0, every=1, curvature_closure=lambda: q.A)
        l0 = float(q.loss().detach())
        opt.step(q.closure(opt))
        step = q.w.detach() - w0
        # eigen term alone: -lr mu s u with s u . g >= 0
        eig_term = step + 1e-3 * g0
        assert float(eig_term @ g0) < 0
        assert opt._curv["sign"] == (1.0 if float(opt.eigenvector()[0] @ g0) >= 0 else -1.0)
        assert float(q.loss().detach()) < l0


def test_hybrid_refresh_every_holds_the_eigenvector():
    q = Quadratic([3.0, 1.0, 0.5])
    A2, _ = known_matrix([0.1, 2.0, -4.0], seed=5)
    mats = []

    def closure():
        mats.append(q.A if len(mats) % 2 == 0 else A2)
        return mats[-1]

    lr, mu = 0.1, 0.5
    opt = HybridHessianSGD([q.w], lr=lr, mu=mu, every=2, curvature_closure=closure)
    w = q.w.detach().clone()
    u = None
    for t in range(5):
        if t % 2 == 0:
            _, u = top_eigvec(q.A if t % 4 == 0 else A2)
        g = q.grad(w)
        s = 1.0 if float(u @ g) >= 0 else -1.0
        w = w - lr * (g + mu * s * u)
        opt.step(q.closure(opt))
        torch.testing.assert_close(q.w.detach(), w, rtol=0, atol=1e-13)
    assert len(mats) == 3


def test_hybrid_sgd_with_mu_zero_is_sgd():
    q = Quadratic([2.0, 1.0, 0.3, 0.1])
    w_ref = nn.Parameter(q.w.detach().clone())
    ref = torch.optim.SGD([w_ref], lr=0.2)
    opt = HybridHessianSGD([q.w], lr=0.2, mu=0.0, every=2, curvature_closure=lambda: q.A)
    for _ in range(4):
        opt.step(q.closure(opt))
        ref.zero_grad()
        q.loss(w_ref).backward()
        ref.step()
    assert torch.equal(q.w.detach(), w_ref.detach())
    assert opt.n_matvecs == 2 * 4  # dense path (d = 4): d products per refresh, 2 refreshes


def test_hybrid_adam_moves_as_derived():
    q = Quadratic([5.0, 2.0, 1.0, 0.5, -0.3], seed=3)
    lam, u = top_eigvec(q.A)
    lr, mu, gamma, (b1, b2), eps = 0.01, 0.7, 0.1, (0.8, 0.95), 1e-6
    opt = HybridHessianAdam([q.w], lr=lr, mu=mu, gamma=gamma, betas=(b1, b2), eps=eps, every=1,
                            curvature_closure=lambda: q.A)
    w = q.w.detach().clone()
    m = torch.zeros_like(w)
    r = torch.zeros_like(w)
    for t in range(1, 5):
        g = q.grad(w)
        m = b1 * m + (1 - b1) * g
        r = b2 * r + (1 - b2) * g * g
        mhat, rhat = m / (1 - b1 ** t), r / (1 - b2 ** t)
        s = 1.0 if float(u @ g) >= 0 else -1.0
        w = w - lr / (1 + gamma * abs(lam)) * (mhat / (rhat.sqrt() + eps) + mu * s * u)
        opt.step(q.closure(opt))
        torch.testing.assert_close(q.w.detach(), w, rtol=0, atol=1e-13)


def test_hybrid_adam_with_mu_zero_is_adam():
    q = Quadratic([2.0, 1.0, 0.3, 0.1], seed=4)
    w_ref = nn.Parameter(q.w.detach().clone())
    ref = torch.optim.Adam([w_ref], lr=0.05, betas=(0.9, 0.99), eps=1e-8)
    opt = HybridHessianAdam([q.w], lr=0.05, mu=0.0, betas=(0.9, 0.99), eps=1e-8, every=3,
                            curvature_closure=lambda: q.A)
    for _ in range(5):
        opt.step(q.closure(opt))
        ref.zero_grad()
        q.loss(w_ref).backward()
        ref.step()
    torch.testing.assert_close(q.w.detach(), w_ref.detach(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("cls", [HybridHessianSGD, HybridHessianAdam])
def test_hybrid_state_dict_roundtrip(cls):
    # d = 40 runs Lanczos; 3 products per refresh leave the estimate unconverged, so the
    # warm-start vector in the state decides the future steps
    A, _ = known_matrix([8.0] + [1.0 + 0.1 * i for i in range(39)], seed=6)
    kw = dict(lr=0.02, mu=0.2, gamma=0.1, every=2, max_matvecs=3, tol=1e-14)
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(40, dtype=F64, generator=gen)

    def make(w_init):
        w = nn.Parameter(w_init.clone())
        return w, cls([w], curvature_closure=lambda: A, **kw)

    def run(w, opt, n):
        for _ in range(n):
            opt.zero_grad()
            (0.5 * w @ A @ w).backward()
            opt.step()

    wa, oa = make(w0)
    run(wa, oa, 3)
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)
    wb, ob = make(wa.detach())
    ob.load_state_dict(sd)
    wc, oc = make(wa.detach())  # control: fresh state from the same weights
    for w, o in ((wa, oa), (wb, ob), (wc, oc)):
        run(w, o, 4)
    assert torch.equal(wa.detach(), wb.detach())
    assert without_times(oa.history) == without_times(ob.history)
    assert oa.n_steps == ob.n_steps == 7
    assert not torch.equal(wa.detach(), wc.detach())
    with pytest.raises(ValueError, match="no 'curvature' entry"):
        ob.load_state_dict(torch.optim.SGD([wb], lr=0.1).state_dict())


def test_hybrid_nan_is_reported_and_nothing_moves():
    q = Quadratic([2.0, 1.0, 0.5])
    opt = HybridHessianSGD([q.w], lr=0.1, mu=0.1, every=1, curvature_closure=lambda: q.A)
    opt.step(q.closure(opt))
    opt.step(q.closure(opt))
    w_before = q.w.detach().clone()

    def nan_loss():
        opt.zero_grad()
        loss = q.loss() * float("nan")
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="HybridHessianSGD: the loss is nan at step 2"):
        opt.step(nan_loss)
    assert torch.equal(q.w.detach(), w_before)
    q.w.grad = torch.tensor([1.0, float("nan"), float("nan")], dtype=F64)
    with pytest.raises(FloatingPointError, match=r"gradient has 2 NaN/Inf value\(s\) at step 2"):
        opt.step()
    q.closure(opt)()
    bad = hvp_operator(lambda v: torch.full_like(v, float("inf")), 3)
    with pytest.raises(FloatingPointError, match="curvature estimate at step 2"):
        opt.step(curvature_closure=bad)
    assert torch.equal(q.w.detach(), w_before)


def test_hybrid_divergence_raises_instead_of_continuing():
    q = Quadratic([4.0, 1.0, 0.5], dtype=torch.float32)
    opt = HybridHessianSGD([q.w], lr=10.0, mu=0.1, every=5, curvature_closure=lambda: q.A)
    with pytest.raises(FloatingPointError) as info:
        for _ in range(200):
            opt.step(q.closure(opt))
    assert f"at step {opt.n_steps}" in str(info.value)
    assert 5 < opt.n_steps < 100


def test_hybrid_model_path_param_order_and_groups(hessian_of):
    model, loss_fn, data = tiny_problem(1)
    H = hessian_of(model, loss_fn, data)
    lam, u = top_eigvec(H)
    params = list(model.parameters())
    # groups in reverse model order, different rates: the engine's flattening is model order
    groups = [{"params": params[2:], "lr": 0.05}, {"params": params[:2], "lr": 0.2}]
    opt = HybridHessianSGD(groups, lr=0.1, mu=0.3, every=1, max_matvecs=60, tol=1e-9)
    X, y = data
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    w0 = torch.cat([p.detach().reshape(-1) for p in params])
    g = torch.cat([p.grad.reshape(-1) for p in params])
    s = 1.0 if float(u @ g) >= 0 else -1.0
    n_last = sum(p.numel() for p in params[2:])
    eta = torch.cat([torch.full((w0.numel() - n_last,), 0.2, dtype=F64),
                     torch.full((n_last,), 0.05, dtype=F64)])
    opt.step(curvature_closure=hessian_closure(model, loss_fn, data))
    w1 = torch.cat([p.detach().reshape(-1) for p in params])
    assert opt.eigenvalue == pytest.approx(lam, rel=1e-7)
    torch.testing.assert_close(w1, w0 - eta * (g + 0.3 * s * u), rtol=0, atol=1e-7)


def test_hybrid_operator_over_other_params_is_an_error():
    model, loss_fn, data = tiny_problem()
    params = list(model.parameters())
    opt = HybridHessianSGD(params[:2], lr=0.1, every=1)
    X, y = data
    loss_fn(model(X), y).backward()
    with pytest.raises(ValueError, match=r"covers 4 parameter tensors \(d = 43\), the optimizer 2"):
        opt.step(curvature_closure=hessian_closure(model, loss_fn, data))
    opt.step(curvature_closure=hessian_closure(model, loss_fn, data, params=params[:2]))
    with pytest.raises(ValueError, match="no curvature_closure"):
        HybridHessianSGD(params, every=1).step()


def test_hyperparameter_validation():
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="mu must be"):
        HybridHessianSGD([w], mu=-1.0)
    with pytest.raises(ValueError, match="every must be"):
        HybridHessianAdam([w], every=0)
    with pytest.raises(ValueError, match="betas"):
        HybridHessianAdam([w], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="gamma"):
        CurvatureAdaptiveLR(torch.optim.SGD([w], lr=0.1), gamma=float("nan"))
    with pytest.raises(ValueError, match="which"):
        SharpnessTracker(which="smallest")


# --------------------------------------------------------------------------------------------
# SharpnessTracker and helpers
# --------------------------------------------------------------------------------------------
def test_tracker_on_known_hessian_and_eos():
    A, _ = known_matrix([3.0, -7.0, 1.0, 0.5])
    tr = SharpnessTracker(every=2)
    assert tr.on_step(1, curvature=A, lr=0.5) is None
    rec = tr.on_step(2, curvature=A, lr=0.5, loss=torch.tensor(1.25))
    assert rec["lambda_max"] == pytest.approx(3.0, rel=1e-12)  # largest, not |.|-largest
    assert rec["eos_threshold"] == 4.0 and rec["sharpness_ratio"] == pytest.approx(0.75)
    assert rec["loss"] == 1.25
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    rec = tr.on_step(4, curvature=lambda: 2 * A, lr=opt)
    assert rec["sharpness_ratio"] == pytest.approx(3.0) and rec["warm_start"]
    assert tr.steps == [2, 4] and tr.lambda_max == pytest.approx([3.0, 6.0])
    d = json.loads(json.dumps(tr.to_dict()))
    assert d["history"][1]["eos_threshold"] == 2.0
    with pytest.raises(FloatingPointError, match="Tracker: the curvature estimate at step 6"):
        tr.on_step(6, curvature=hvp_operator(lambda v: v * float("nan"), 4))
    with pytest.raises(FloatingPointError, match="loss is inf at step 7"):
        tr.on_step(7, curvature=A, loss=float("inf"))
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ax = tr.plot()
    assert len(ax.lines) == 2
    plt.close(ax.figure)


def test_tracker_model_path_matches_dense(hessian_of):
    model, loss_fn, data = tiny_problem(2)
    lam_max = float(torch.linalg.eigvalsh(hessian_of(model, loss_fn, data)).max())
    tr = SharpnessTracker(every=1, max_matvecs=60, tol=1e-9)
    rec = tr.on_step(0, model, loss_fn, data, lr=0.1)
    assert rec["lambda_max"] == pytest.approx(lam_max, rel=1e-7)
    assert rec["eos_threshold"] == pytest.approx(20.0)


def test_hvp_operator_and_hessian_closure(hessian_of):
    A, _ = known_matrix([1.0, 2.0, 3.0])
    V = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hvp_operator(lambda v: A @ v, 3) @ V, A @ V)
    torch.testing.assert_close(hvp_operator(lambda M: A @ M, 3, batched=True) @ V, A @ V)
    model, loss_fn, data = tiny_problem()
    op = hessian_closure(model, loss_fn, data)()
    v = torch.randn(op.d, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op @ v, hessian_of(model, loss_fn, data) @ v, rtol=1e-9,
                               atol=1e-10)
