"""HessianOperator / GGNOperator / as_operator against dense float64 references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import landscape_ext as le
from landscape_ext import GGNOperator, HessianOperator, as_operator

from conftest import dense_ggn

MODES = ["forward-over-reverse", "double-backward", "auto"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name", ["mlp", "cnn", "negcurv"])
@pytest.mark.parametrize("mode", MODES)
def test_hessian_products_match_dense(problem, exact_hessian, name, mode):
    model, loss, data = problem(name)
    H = exact_hessian(name)
    op = HessianOperator(model, loss, data, mode=mode)
    assert op.shape == H.shape and op.dtype == torch.float64
    V = torch.randn(op.d, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = op @ V
    torch.testing.assert_close(out, H @ V, rtol=1e-10, atol=1e-12)
    assert op.n_matvecs == 5
    torch.testing.assert_close(op @ V[:, 0], H @ V[:, 0], rtol=1e-10, atol=1e-12)
    assert op.n_matvecs == 6
    if mode != "auto":
        assert op.mode_used == mode
    else:  # plain MLPs (mlp: CE, negcurv: MSE) take the fused path, the CNN autograd
        assert op.mode_used == ("double-backward" if name == "cnn" else "fused-mlp")


def test_auto_mode_choice(problem):
    model, loss, data = problem("cnn")
    op = HessianOperator(model, loss, data)  # single batch: the first-order graph is cached
    assert not op.fused_mlp and "Conv2d" in op.fused_mlp_reason
    # a single product runs on the prior rule (double backward on the cached graph) unmeasured
    op @ torch.randn(op.d, dtype=torch.float64)
    assert op.mode_used == "double-backward" and op.mode_timings == {}
    # several directions: measured per bucket of k (tests/test_modes.py checks the choice)
    for k, bucket in ((2, 2), (6, 8)):
        op @ torch.randn(op.d, k, dtype=torch.float64)
        assert op.mode_used == op.mode_choices[bucket]
        # k = 2: both directions run looped in the probe, none is left for a batched call
        assert set(op.mode_timings[bucket]) == ({"forward-over-reverse", "double-backward-loop"}
                                                | ({"double-backward"} if k > 2 else set()))
    model, loss, data = problem("mlp")
    op = HessianOperator(model, loss, data)
    for k in (1, 2, 6):  # an MLP: the fused products for any number of directions
        op @ torch.randn(op.d, k, dtype=torch.float64)
        assert op.mode_used == "fused-mlp"


# ---- the fused MLP path ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "negcurv"])
@pytest.mark.parametrize("mode", ["auto", "fused-mlp"])
def test_fused_mlp_matches_dense(problem, exact_hessian, name, mode):
    model, loss, data = problem(name)
    H = exact_hessian(name)
    op = HessianOperator(model, loss, data, mode=mode)
    assert op.fused_mlp and op.fused_mlp_reason is None
    V = torch.randn(op.d, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op @ V, H @ V, rtol=1e-10, atol=1e-12)
    assert op.mode_used == "fused-mlp"
    torch.testing.assert_close(op @ V[:, 0], H @ V[:, 0], rtol=1e-10, atol=1e-12)  # k = 1
    chunked = HessianOperator(model, loss, data, mode=mode, chunk_size=2)
    torch.testing.assert_close(chunked @ V, H @ V, rtol=1e-10, atol=1e-12)
    assert op.n_matvecs == 6
    # a loader of several batches: the mean of the batch products
    X, y = data
    batches = [(X[i:i + 7], y[i:i + 7]) for i in range(0, X.shape[0], 7)]
    op2 = HessianOperator(model, loss, batches, mode=mode)
    torch.testing.assert_close(op2 @ V, H @ V, rtol=1e-10, atol=1e-12)
    assert op2.mode_used == "fused-mlp"
    # the same eigenvalues as the dense Hessian
    r = le.eigsh(op, 6, "both", tol=1e-10)
    ev = torch.linalg.eigvalsh(H)
    ref = torch.cat([ev.flip(0)[:3], ev[:3].flip(0)])
    torch.testing.assert_close(r.eigenvalues, ref, rtol=0, atol=1e-9 * float(ev.abs().max()))
    assert r.mode_used == "fused-mlp"


def test_fused_mlp_parameter_subset_and_frozen(problem, exact_hessian):
    model, loss, data = problem("mlp")
    H = exact_hessian("mlp")
    sizes = [p.numel() for p in model.parameters()]
    offs = np.cumsum([0] + sizes)
    names = [n for n, _ in model.named_parameters()]
    pick = [names[1], names[4]]  # a bias and a later weight: the rest held fixed
    idx = torch.cat([torch.arange(offs[1], offs[2]), torch.arange(offs[4], offs[5])])
    op = HessianOperator(model, loss, data, params=pick, mode="fused-mlp")
    V = torch.randn(op.d, 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, H[idx][:, idx] @ V, rtol=1e-10, atol=1e-12)
    assert op.mode_used == "fused-mlp"
    model[0].weight.requires_grad_(False)  # frozen: not in the operator
    try:
        keep = torch.cat([torch.arange(offs[1], offs[-1])])
        op = HessianOperator(model, loss, data)
        V = torch.randn(op.d, 2, dtype=torch.float64)
        torch.testing.assert_close(op @ V, H[keep][:, keep] @ V, rtol=1e-10, atol=1e-12)
        assert op.mode_used == "fused-mlp"
    finally:
        model[0].weight.requires_grad_(True)


def test_fused_mlp_cache_tracks_parameter_updates(problem, hessian_of):
    model, loss, data = problem("mlp")
    op = HessianOperator(model, loss, data)
    V = torch.randn(op.d, 2, dtype=torch.float64)
    op @ V
    assert op.mlp_backend.state is not None  # single batch: forward + first backward kept
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    torch.testing.assert_close(op @ V, hessian_of(model, loss, data) @ V, rtol=1e-10,
                               atol=1e-12)
    nocache = HessianOperator(model, loss, data, cache_graph=False)
    nocache @ V
    assert nocache.mlp_backend.state is None and nocache.mode_used == "fused-mlp"


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_fused_mlp_not_applicable(problem, cls):
    # a CNN: auto uses autograd, the explicit mode says why
    model, loss, data = problem("cnn")
    op = cls(model, loss, data)
    op @ torch.randn(op.d, 2, dtype=torch.float64)
    assert op.mode_used != "fused-mlp" and not op.fused_mlp
    with pytest.raises(ValueError, match="fused-mlp.*not applicable.*Conv2d"):
        cls(model, loss, data, mode="fused-mlp")
    # an MLP with a loss outside the fused path
    model, _, data = problem("mlp")
    custom = lambda z, t: nn.functional.cross_entropy(z, t) + 0.1 * z.pow(2).mean()  # noqa: E731
    op = cls(model, custom, data)
    op @ torch.randn(op.d, dtype=torch.float64)
    assert op.mode_used != "fused-mlp" and "not supported" in op.fused_mlp_reason
    with pytest.raises(ValueError, match="fused-mlp"):
        cls(model, custom, data, mode="fused-mlp")
    # data outside it (probability targets) is found at the first product: auto falls back
    X, y = data
    P = nn.functional.one_hot(y, 3).double() * 0.8 + 0.2 / 3
    ref = cls(model, nn.CrossEntropyLoss(), (X, P), mode="double-backward")
    op = cls(model, nn.CrossEntropyLoss(), (X, P))
    V = torch.randn(op.d, 2, dtype=torch.float64)
    torch.testing.assert_close(op @ V, ref @ V, rtol=1e-10, atol=1e-12)
    assert op.mode_used != "fused-mlp" and "targets" in op.fused_mlp_reason
    op = cls(model, nn.CrossEntropyLoss(), (X, P), mode="fused-mlp")
    with pytest.raises(ValueError, match="fused-mlp.*not applicable.*targets"):
        op @ V


@pytest.mark.parametrize("loss_kind", ["ce", "ce_smooth", "mse"])
def test_ggn_fused_mlp_matches_dense(problem, loss_kind):
    model, _, (X, y) = problem("mlp")
    if loss_kind == "mse":
        loss = nn.MSELoss()
        y = torch.randn(X.shape[0], 3, dtype=torch.float64)
    else:
        loss = nn.CrossEntropyLoss(label_smoothing=0.1 if loss_kind == "ce_smooth" else 0.0)
    G = dense_ggn(model, loss, (X, y))
    op = GGNOperator(model, loss, (X, y))
    V = torch.randn(op.d, 4, dtype=torch.float64)
    torch.testing.assert_close(op @ V, G @ V, rtol=1e-10, atol=1e-12)
    assert op.mode_used == "fused-mlp"
    op = GGNOperator(model, loss, (X, y), mode="fused-mlp", params=["2.weight"])
    Gb = dense_ggn(model, loss, (X, y))
    offs = np.cumsum([0] + [p.numel() for p in model.parameters()])
    idx = torch.arange(offs[2], offs[3])
    torch.testing.assert_close(op @ V[:op.d], Gb[idx][:, idx] @ V[:op.d], rtol=1e-10,
                               atol=1e-12)


def test_fused_mlp_model_state_and_nan(problem):
    model, loss, (X, y) = problem("mlp")
    model.train()
    model[0].bias.requires_grad_(False)
    st = _state(model)
    op = HessianOperator(model, loss, (X, y))
    op @ torch.randn(op.d, 3, dtype=torch.float64)
    assert op.mode_used == "fused-mlp"
    _assert_same_state(model, st)
    batches = [(X[:20], y[:20]), (X[20:].clone().fill_(float("nan")), y[20:])]
    op = HessianOperator(model, loss, batches, mode="fused-mlp")
    with pytest.raises(FloatingPointError, match="loss.*batch 1"):
        op @ torch.randn(op.d, dtype=torch.float64)
    _assert_same_state(model, st)


@pytest.mark.parametrize("mode", ["forward-over-reverse", "double-backward"])
def test_chunked_equals_unchunked(problem, mode):
    model, loss, data = problem("mlp")
    V = torch.randn(279, 7, dtype=torch.float64)
    a = HessianOperator(model, loss, data, mode=mode) @ V
    b = HessianOperator(model, loss, data, mode=mode, chunk_size=3) @ V
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_graph_cache_tracks_parameter_updates(problem):
    model, loss, data = problem("mlp")
    op = HessianOperator(model, loss, data, mode="double-backward")
    assert op.cache_graph
    V = torch.randn(op.d, 2, dtype=torch.float64)
    op @ V
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    ref = HessianOperator(model, loss, data, mode="forward-over-reverse") @ V
    torch.testing.assert_close(op @ V, ref, rtol=1e-10, atol=1e-12)


def test_loader_average_equals_full_batch(problem, exact_hessian):
    model, loss, (X, y) = problem("cnn")
    H = exact_hessian("cnn")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=10)
    op = HessianOperator(model, loss, loader)  # batches of 10, 10, 4
    V = torch.randn(op.d, 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, H @ V, rtol=1e-10, atol=1e-12)
    assert op.n_samples == 24
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=10,
                                           shuffle=True)
    op2 = HessianOperator(model, loss, shuffled)
    op2 @ V
    torch.testing.assert_close(op2 @ V, H @ V, rtol=1e-10, atol=1e-12)  # reordering is fine


def test_parameter_subset_is_the_hessian_block(problem, exact_hessian):
    model, loss, data = problem("mlp")
    H = exact_hessian("mlp")
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offs = np.cumsum([0] + sizes)
    pick = [names[2], names[3]]
    idx = torch.cat([torch.arange(offs[2], offs[3]), torch.arange(offs[3], offs[4])])
    op = HessianOperator(model, loss, data, params=pick)
    assert op.d == len(idx)
    V = torch.randn(op.d, 2, dtype=torch.float64)
    torch.testing.assert_close(op @ V, H[idx][:, idx] @ V, rtol=1e-10, atol=1e-12)
    op2 = HessianOperator(model, loss, data, params=[model[2].weight, model[2].bias])
    torch.testing.assert_close(op2 @ V, op @ V)


@pytest.mark.parametrize("mode", ["fused-mlp", "double-backward"])
def test_float32_model_float64_accumulation(problem, exact_hessian, mode):
    model, loss, (X, y) = problem("mlp")
    H = exact_hessian("mlp")
    m32 = model.float()
    batches = [(X[i:i + 8].float(), y[i:i + 8]) for i in range(0, 40, 8)]
    op = HessianOperator(m32, loss, batches, accumulate_dtype=torch.float64, mode=mode)
    assert op.dtype == torch.float64
    V = torch.randn(op.d, 3, dtype=torch.float64)
    out = op @ V
    assert out.dtype == torch.float64 and op.mode_used == mode
    err = (out - H @ V).abs().max() / (H @ V).abs().max()
    assert err < 1e-5


@pytest.mark.parametrize("mode", ["forward-over-reverse", "double-backward"])
@pytest.mark.parametrize("loss_kind", ["ce", "ce_str", "ce_smooth", "ce_ignore", "mse", "generic"])
def test_ggn_matches_dense(problem, mode, loss_kind):
    model, _, (X, y) = problem("mlp")
    if loss_kind == "mse":
        loss = nn.MSELoss()
        y = torch.randn(40, 3, dtype=torch.float64)
    elif loss_kind == "ce_smooth":
        loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    elif loss_kind == "ce_ignore":
        loss = nn.CrossEntropyLoss(ignore_index=1)
    elif loss_kind == "generic":
        loss = lambda z, t: (torch.log1p(z.pow(2)).mean() + 0.1 * z.pow(4).mean())  # noqa: E731
    else:
        loss = nn.CrossEntropyLoss()
    G = dense_ggn(model, loss, (X, y))
    op = GGNOperator(model, "cross_entropy" if loss_kind == "ce_str" else loss, (X, y), mode=mode)
    V = torch.randn(op.d, 4, dtype=torch.float64)
    torch.testing.assert_close(op @ V, G @ V, rtol=1e-10, atol=1e-12)
    assert op.loss_kind == {"mse": "mse", "generic": "generic"}.get(loss_kind, "ce")


@pytest.mark.parametrize("fused", [True, False])
def test_ggn_fused_and_plain_loss_hessian_agree(problem, fused):
    model, loss, (X, y) = problem("mlp")
    G = dense_ggn(model, nn.CrossEntropyLoss(ignore_index=2), (X, y))
    op = GGNOperator(model, nn.CrossEntropyLoss(ignore_index=2), (X, y),
                     fused_loss_hessian=fused)
    V = torch.randn(op.d, 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, G @ V, rtol=1e-10, atol=1e-12)


def test_ggn_of_cnn_with_batchnorm(problem):
    model, loss, data = problem("cnn")
    G = dense_ggn(model, loss, data)
    op = GGNOperator(model, loss, data)
    V = torch.randn(op.d, 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, G @ V, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(G).min() > -1e-10  # PSD


class _NoForwardAD(torch.autograd.Function):
    """tanh without a jvp rule: forward-mode AD fails, double backward works."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _NoFwdMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 3)

    def forward(self, x):
        return self.b(_NoForwardAD.apply(self.a(x)))


def test_auto_falls_back_when_forward_ad_is_missing():
    torch.manual_seed(0)
    model = _NoFwdMLP().double()
    X, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    loss = nn.CrossEntropyLoss()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    with pytest.raises((RuntimeError, NotImplementedError)):
        HessianOperator(model, loss, (X, y), mode="forward-over-reverse") @ V
    op = HessianOperator(model, loss, (X, y), mode="auto", cache_graph=False)
    out = op @ V
    # the measurement (k = 3) skips forward-over-reverse once it failed
    assert op.mode_used in ("double-backward", "double-backward-loop") and op.forward_ad_broken
    assert "forward-over-reverse" not in op.mode_timings[4]
    ref = HessianOperator(model, loss, (X, y), mode="double-backward") @ V
    torch.testing.assert_close(out, ref)


def _state(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()},
            [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def _assert_same_state(model, st):
    params, bufs, training, req = st
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, bufs[n]), n
    assert [m.training for m in model.modules()] == training
    assert [p.requires_grad for p in model.parameters()] == req


@pytest.mark.parametrize("batch_norm", ["eval", "train"])
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_model_state_is_unchanged(problem, batch_norm, cls):
    model, loss, data = problem("cnn")
    model.train()  # the user's flag must survive
    model.fc.bias.requires_grad_(False)
    st = _state(model)
    op = cls(model, loss, data, batch_norm=batch_norm)
    op @ torch.randn(op.d, 2, dtype=torch.float64)
    le.trace(op, 4, "hutchinson")
    _assert_same_state(model, st)


def test_model_state_is_unchanged_after_an_exception(problem):
    model, _, data = problem("cnn")
    model.train()
    st = _state(model)
    calls = {"n": 0}

    def bad_loss(z, t):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise RuntimeError("boom inside loss_fn")
        return nn.functional.cross_entropy(z, t)

    op = HessianOperator(model, bad_loss, data, batch_norm="train", mode="double-backward",
                         cache_graph=False)
    op @ torch.randn(op.d, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="boom"):
        op @ torch.randn(op.d, dtype=torch.float64)
    _assert_same_state(model, st)
    assert all(m.track_running_stats for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))


def test_batch_norm_train_uses_batch_statistics(problem, exact_hessian):
    model, loss, data = problem("cnn")
    Ht = exact_hessian("cnn", batch_norm="train")
    He = exact_hessian("cnn")
    V = torch.randn(Ht.shape[0], 2, dtype=torch.float64)
    op = HessianOperator(model, loss, data, batch_norm="train")
    torch.testing.assert_close(op @ V, Ht @ V, rtol=1e-10, atol=1e-12)
    assert (Ht @ V - He @ V).abs().max() > 1e-6


def test_dropout_is_off(problem):
    model, loss, data = problem("cnn")
    model.train()
    op = HessianOperator(model, loss, data)
    v = torch.randn(op.d, dtype=torch.float64)
    torch.testing.assert_close(op @ v, op @ v, rtol=0, atol=0)


# ---- errors -------------------------------------------------------------------------------------


def test_error_non_scalar_loss(problem):
    model, _, data = problem("mlp")
    op = HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), data)
    with pytest.raises(ValueError, match=r"scalar.*\(40,\)"):
        op @ torch.randn(op.d, dtype=torch.float64)


def test_error_no_trainable_parameters(problem):
    model, loss, data = problem("mlp")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(model, loss, data)


@pytest.mark.parametrize("mode", ["forward-over-reverse", "double-backward"])
def test_error_nan_loss(problem, mode):
    model, _, (X, y) = problem("mlp")
    X = X.clone()
    batches = [(X[:20], y[:20]), (X[20:].clone().fill_(float("nan")), y[20:])]
    op = HessianOperator(model, nn.CrossEntropyLoss(), batches, mode=mode)
    with pytest.raises(FloatingPointError, match="batch 1"):
        op @ torch.randn(op.d, dtype=torch.float64)


def test_error_nan_in_product():
    A = torch.eye(50, dtype=torch.float64)
    op = le.CallableOperator(lambda V: V * float("nan"), 50)
    with pytest.raises(FloatingPointError, match="NaN"):
        le.eigsh(op, 2)
    with pytest.raises(FloatingPointError):
        le.trace(op, 6)
    with pytest.raises(FloatingPointError):
        le.spectral_density(op, 5, 2)
    torch.testing.assert_close(le.eigsh(A, 2).eigenvalues,
                               torch.ones(2, dtype=torch.float64))


class _AugmentedLoader:
    def __init__(self, X, y):
        self.X, self.y, self.g = X, y, torch.Generator().manual_seed(0)

    def __iter__(self):
        for i in range(0, len(self.X), 10):
            noise = 0.01 * torch.randn(self.X[i:i + 10].shape, generator=self.g,
                                       dtype=self.X.dtype)
            yield self.X[i:i + 10] + noise, self.y[i:i + 10]


def test_error_data_change_between_passes(problem):
    model, loss, (X, y) = problem("mlp")
    op = HessianOperator(model, loss, _AugmentedLoader(X, y))
    v = torch.randn(op.d, dtype=torch.float64)
    op @ v
    with pytest.raises(ValueError, match="data changed between passes"):
        op @ v
    op = HessianOperator(model, loss, _AugmentedLoader(X, y), check_data=False)
    op @ v
    op @ v


def test_error_bad_arguments(problem):
    model, loss, data = problem("mlp")
    with pytest.raises(ValueError, match="mode"):
        HessianOperator(model, loss, data, mode="fast")
    with pytest.raises(ValueError, match="batch_norm"):
        HessianOperator(model, loss, data, batch_norm="frozen")
    with pytest.raises(TypeError, match="one-shot iterator"):
        HessianOperator(model, loss, iter([data]))
    with pytest.raises(ValueError, match="no parameter named"):
        HessianOperator(model, loss, data, params=["nope"])
    op = HessianOperator(model, loss, data)
    with pytest.raises(ValueError, match=r"\(279,\)"):
        op @ torch.randn(278, dtype=torch.float64)


# ---- generic operators ---------------------------------------------------------------------------


def test_as_operator_and_scipy(problem, exact_hessian):
    from scipy.sparse.linalg import LinearOperator, aslinearoperator
    from scipy.sparse.linalg import eigsh as sp_eigsh

    model, loss, data = problem("mlp")
    H = exact_hessian("mlp")
    op = HessianOperator(model, loss, data, mode="double-backward")
    lin = op.to_scipy()
    assert isinstance(lin, LinearOperator) and lin.shape == (279, 279)
    x = np.random.default_rng(0).standard_normal((279, 2))
    np.testing.assert_allclose(lin @ x, (H @ torch.from_numpy(x)).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lin @ x[:, 0], (H @ torch.from_numpy(x[:, 0])).numpy(),
                               rtol=1e-10, atol=1e-12)
    top = sp_eigsh(as_operator(H).to_scipy(), k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), torch.linalg.eigvalsh(H)[-2:].numpy(), rtol=1e-8)

    dense = as_operator(H)
    assert isinstance(dense, le.DenseOperator) and dense.d == 279
    wrapped = as_operator(aslinearoperator(H.numpy()))
    V = torch.randn(279, 3, dtype=torch.float64)
    torch.testing.assert_close(wrapped @ V, H @ V)
    assert as_operator(op) is op
    with pytest.raises(ValueError, match="not symmetric"):
        as_operator(torch.randn(5, 5))
    with pytest.raises(TypeError):
        as_operator("matrix")


def _review_dense_hvp(model, loss_fn, x, y, V):
    named = dict(model.named_parameters())
    names = list(named)
    sizes = [named[n].numel() for n in names]
    base = {n: p.detach().double() for n, p in named.items()}

    def f(theta):
        parts = torch.split(theta, sizes)
        d = {n: t.reshape(named[n].shape) for n, t in zip(names, parts)}
        return loss_fn(functional_call(model, d, (x.double(),)), y)

    theta = torch.cat([base[n].reshape(-1) for n in names])
    return torch.autograd.functional.hessian(f, theta) @ V.double()


def test_auto_does_not_use_fused_path_for_overridden_forwards():
    """Review regression: auto mode took a Sequential subclass with its own forward, a
    CrossEntropyLoss subclass with its own forward and hooked modules for plain MLP / CE."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))

    class MySeq(nn.Sequential):
        def forward(self, inp):
            return 2 * super().forward(inp)

    class Focal(nn.CrossEntropyLoss):
        def forward(self, o, t):
            lp = torch.log_softmax(o, 1).gather(1, t[:, None]).squeeze(1)
            return (-(1 - lp.exp()) ** 2 * lp).mean()

    hooked = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    hooked[0].register_forward_hook(lambda mod, i, o: 2 * o)
    cases = [(MySeq(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)), nn.CrossEntropyLoss()),
             (nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)), Focal()),
             (hooked, nn.CrossEntropyLoss())]
    for model, loss_fn in cases:
        op = HessianOperator(model, loss_fn, (x, y))
        V = torch.randn(op.shape[0], 3)
        out = (op @ V).double()
        ref = _review_dense_hvp(model.double(), loss_fn, x, y, V)
        model.float()
        assert op.mode_used != "fused-mlp"
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_cached_products_see_param_data_assignment():
    """Review regression: ``p.data = t`` does not bump ``_version``; the single-batch caches
    (fused MLP state, first-order graph) must still notice the new values."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    for mode in ("auto", "double-backward"):
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), mode=mode)
        V = torch.randn(op.shape[0], 2)
        op @ V
        for p in model.parameters():
            p.data = torch.randn_like(p)
        fresh = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), mode="double-backward",
                                cache_graph=False)
        assert torch.allclose(op @ V, fresh @ V, rtol=1e-4, atol=1e-5)
        # in place through .data (its own version counter): a hand-written SGD step
        for p in model.parameters():
            p.data.add_(torch.randn_like(p), alpha=0.5)
        fresh = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), mode="double-backward",
                                cache_graph=False)
        assert torch.allclose(op @ V, fresh @ V, rtol=1e-4, atol=1e-5)
