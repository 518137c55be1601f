"""mlp_hvp / mlp_matmat against dense Hessians and GGNs of small MLPs in float64 (every
activation, both losses, with and without biases, k = 1 and k = 3), structure recognition and
the engine interface. (The act_derivs op: tests/test_hvp.py.)"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from landscape_ext import mlp
from landscape_ext.mlp import NotAnMLP, mlp_hvp, mlp_matmat, mlp_structure

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ACTS = ["identity", "relu", "gelu", "tanh", "silu"]
ACT_MODULES = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh,
               "silu": nn.SiLU}


# ---- dense references --------------------------------------------------------------------------

def make_mlp(act, bias=True, sizes=(5, 6, 4, 3), last_act=None, seed=0, flatten=False):
    torch.manual_seed(seed)
    layers = [nn.Flatten()] if flatten else []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if i < len(sizes) - 2:
            layers.append(ACT_MODULES[act]())
    if last_act is not None:
        layers.append(ACT_MODULES[last_act]())
    return nn.Sequential(*layers).double()


def batch(model_in, n_out, loss, B=7, seed=1, ignore=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model_in, generator=g, dtype=torch.float64)
    if loss == "mse":
        y = torch.randn(B, n_out, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, n_out, (B,), generator=g)
        for r in ignore:
            y[r] = -100
    return x, y


def loss_fn(loss, **kw):
    if loss == "mse":
        return lambda out, y: F.mse_loss(out, y, reduction=kw.get("reduction", "mean"))
    return lambda out, y: F.cross_entropy(out, y, **kw)


def flat_params(model, names):
    pd = dict(model.named_parameters())
    return torch.cat([pd[n].detach().reshape(-1) for n in names])


def unflatten(model, names, v):
    pd = dict(model.named_parameters())
    out, off = {}, 0
    for n in names:
        size = pd[n].numel()
        out[n] = v[off:off + size].reshape(pd[n].shape)
        off += size
    return out


def dense_hessian(model, names, x, y, lf):
    def f(v):
        params = {n: p.detach() for n, p in model.named_parameters()}
        params.update(unflatten(model, names, v))
        return lf(functional_call(model, params, (x,)), y)

    return torch.func.hessian(f)(flat_params(model, names))


def dense_ggn(model, names, x, y, lf):
    def out_of(v):
        params = {n: p.detach() for n, p in model.named_parameters()}
        params.update(unflatten(model, names, v))
        return functional_call(model, params, (x,))

    v0 = flat_params(model, names)
    out = out_of(v0)
    J = torch.func.jacrev(out_of)(v0).reshape(out.numel(), -1)
    Hout = torch.func.hessian(lambda o: lf(o.reshape(out.shape), y))(out.reshape(-1).detach())
    return J.T @ Hout @ J


def trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---- mlp_hvp against dense matrices ------------------------------------------------------------

@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("fused", [True, False])
def test_mlp_matches_dense(act, loss, bias, curvature, fused):
    model = make_mlp(act, bias=bias, seed=ACTS.index(act))
    x, y = batch(5, 3, loss, ignore=(2,) if loss == "cross_entropy" else ())
    names = trainable(model)
    lf = loss_fn(loss)
    A = (dense_hessian if curvature == "hessian" else dense_ggn)(model, names, x, y, lf)
    d = A.shape[0]
    assert d == sum(p.numel() for p in model.parameters())
    V = torch.randn(d, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = mlp_hvp(model, x, y, V, loss=loss, curvature=curvature, fused=fused)
    torch.testing.assert_close(got, A @ V, rtol=1e-10, atol=1e-12)
    one = mlp_hvp(model, x, y, V[:, 0], loss=loss, curvature=curvature, fused=fused)  # k = 1
    assert one.shape == (d,)
    torch.testing.assert_close(one, A @ V[:, 0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_mlp_on_each_device(device, loss):
    model = make_mlp("gelu", seed=11)
    x, y = batch(5, 3, loss, ignore=(1,) if loss == "cross_entropy" else ())
    names = trainable(model)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    for curvature, dense in (("hessian", dense_hessian), ("ggn", dense_ggn)):
        A = dense(model, names, x, y, loss_fn(loss))
        got = mlp_hvp(model.to(device), x.to(device), y.to(device), V.to(device), loss, curvature)
        model.cpu()
        assert got.device.type == device
        torch.testing.assert_close(got.cpu(), A @ V, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_cross_entropy_options_and_sum_reduction(curvature):
    model = make_mlp("silu", seed=4, sizes=(4, 5, 6))
    x, y = batch(4, 6, "cross_entropy", B=9, ignore=(0, 5))
    y[3] = 2
    names = trainable(model)
    V = torch.randn(len(flat_params(model, names)), 2, dtype=torch.float64)
    dense = dense_hessian if curvature == "hessian" else dense_ggn
    y2 = torch.where(y == -100, 1, y)  # for ignore_index = 2, -100 would be out of range
    for kw in ({"label_smoothing": 0.2}, {"ignore_index": 2}, {"reduction": "sum"},
               {"reduction": "sum", "label_smoothing": 0.1}):
        yy = y2 if "ignore_index" in kw else y
        A = dense(model, names, x, yy, loss_fn("cross_entropy", **kw))
        got = mlp_hvp(model, x, yy, V, "cross_entropy", curvature, **kw)
        torch.testing.assert_close(got, A @ V, rtol=1e-10, atol=1e-12)
    # the module form carries its options
    crit = nn.CrossEntropyLoss(label_smoothing=0.3, ignore_index=2)
    A = dense(model, names, x, y2, crit)
    torch.testing.assert_close(mlp_hvp(model, x, y2, V, crit, curvature), A @ V, rtol=1e-10,
                               atol=1e-12)


def test_mse_sum_and_last_activation_and_flatten():
    model = make_mlp("gelu", sizes=(6, 7, 4), last_act="tanh", seed=5, flatten=True)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 4, generator=g, dtype=torch.float64)
    names = trainable(model)
    V = torch.randn(len(flat_params(model, names)), 3, generator=g, dtype=torch.float64)
    for red in ("mean", "sum"):
        for curvature, dense in (("hessian", dense_hessian), ("ggn", dense_ggn)):
            A = dense(model, names, x, y, loss_fn("mse", reduction=red))
            got = mlp_hvp(model, x, y, V, nn.MSELoss(reduction=red), curvature)
            torch.testing.assert_close(got, A @ V, rtol=1e-10, atol=1e-12)


def test_frozen_parameters_and_engine_interface():
    model = make_mlp("tanh", sizes=(5, 8, 8, 3), seed=7)
    model[0].weight.requires_grad_(False)      # frozen: held fixed, not in V
    model[2].bias.requires_grad_(False)
    x, y = batch(5, 3, "cross_entropy", B=6)
    names = trainable(model)
    A = dense_hessian(model, names, x, y, loss_fn("cross_entropy"))
    V = torch.randn(A.shape[0], 4, dtype=torch.float64)
    torch.testing.assert_close(mlp_hvp(model, x, y, V), A @ V, rtol=1e-10, atol=1e-12)
    # engine call: params in V's order (any order), values may differ from the model's
    structure = mlp_structure(model)
    pd = dict(model.named_parameters())
    order = list(reversed(names))
    params = {n: pd[n].detach() for n in order}
    A2 = dense_hessian(model, order, x, y, loss_fn("cross_entropy"))
    got = mlp_matmat(structure, params, x, y, V, "cross_entropy", "hessian", "mean")
    torch.testing.assert_close(got, A2 @ V, rtol=1e-10, atol=1e-12)
    rows = mlp.mlp_apply_rows(structure, params, x, y, V.T.contiguous(), "cross_entropy", "ggn")
    G = dense_ggn(model, order, x, y, loss_fn("cross_entropy"))
    torch.testing.assert_close(rows, (G @ V).T, rtol=1e-10, atol=1e-12)
    # chunking over directions gives the same product
    chunked = mlp_matmat(structure, params, x, y, V, chunk_size=3)
    torch.testing.assert_close(chunked, got, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("fused", [True, False])
def test_strided_inputs_and_uneven_chunks(curvature, fused):
    # the fused path writes weight gradients into output rows (bmm out=) and makes the
    # directions contiguous once: non-contiguous inputs, rows taken from a wider buffer, a
    # transposed batch and chunks that do not divide k must give the dense answer
    model = make_mlp("gelu", sizes=(6, 7, 5, 4), seed=12)
    names = trainable(model)
    g = torch.Generator().manual_seed(13)
    x_t = torch.randn(6, 9, generator=g, dtype=torch.float64)
    x = x_t.T                                   # (9, 6), not contiguous
    y = torch.randint(0, 4, (18,), generator=g)[::2]   # strided targets
    assert not x.is_contiguous() and not y.is_contiguous()
    dense = dense_hessian if curvature == "hessian" else dense_ggn
    A = dense(model, names, x.contiguous(), y.contiguous(), loss_fn("cross_entropy"))
    d = A.shape[0]
    wide = torch.randn(7, 2 * d, generator=g, dtype=torch.float64)
    X = wide[:, ::2]                            # (7, d) rows with stride 2
    structure = mlp_structure(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    for chunk in (None, 3, 5):
        got = mlp.mlp_apply_rows(structure, params, x, y, X, "cross_entropy", curvature,
                                 chunk_size=chunk, fused=fused)
        assert got.shape == (7, d) and got.is_contiguous()
        torch.testing.assert_close(got, X @ A, rtol=1e-10, atol=1e-12)
    # the inputs are left as they were
    assert torch.equal(x, x_t.T) and X.data_ptr() == wide.data_ptr()


def test_float32_model_agrees_with_float64():
    model = make_mlp("gelu", sizes=(20, 32, 32, 10), seed=8)
    x, y = batch(20, 10, "cross_entropy", B=64)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 5, dtype=torch.float64)
    want = mlp_hvp(model, x, y, V)
    got = mlp_hvp(model.float(), x.float(), y, V.float())
    assert got.dtype == torch.float32
    assert (got.double() - want).norm() / want.norm() < 1e-5


def test_model_is_not_changed():
    model = make_mlp("relu", seed=9)
    model.train()
    model[0].weight.requires_grad_(False)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    x, y = batch(5, 3, "cross_entropy")
    V = torch.randn(sum(p.numel() for p in model.parameters() if p.requires_grad), 2,
                    dtype=torch.float64)
    mlp_hvp(model, x, y, V)
    assert model.training and not model[0].weight.requires_grad and model[2].weight.requires_grad
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n])
    assert all(p.grad is None for p in model.parameters())


# ---- structure recognition ---------------------------------------------------------------------

class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Dropout(0.1))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x))


class Residual(Wrapped):
    def forward(self, x):
        h = self.body(x)
        return self.head(h + h)


def test_structure_of_supported_models():
    s = mlp_structure(make_mlp("gelu", flatten=True, last_act="relu"))
    assert s is not None and s.flatten_input and s.verified
    assert [layer.act for layer in s.layers] == ["gelu", "gelu", "relu"]
    assert s.describe() == "MLP 5-6(gelu)-4(gelu)-3(relu)"
    nested = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), nn.Identity(),
                           nn.Sequential(nn.Linear(4, 2, bias=False)))
    s = mlp_structure(nested)
    assert s.param_names == ["0.0.weight", "0.0.bias", "2.0.weight"]
    assert [layer.act for layer in s.layers] == ["relu", "identity"]


def test_non_sequential_container_is_verified_on_first_product():
    model = Wrapped().double().eval()
    s = mlp_structure(model)
    assert s is not None and not s.verified
    x, y = batch(4, 3, "cross_entropy", B=5)
    names = trainable(model)
    A = dense_hessian(model, names, x, y, loss_fn("cross_entropy"))
    V = torch.randn(A.shape[0], 2, dtype=torch.float64)
    pd = dict(model.named_parameters())
    got = mlp_matmat(s, {n: pd[n] for n in names}, x, y, V)
    assert s.verified
    torch.testing.assert_close(got, A @ V, rtol=1e-10, atol=1e-12)
    bad = Residual().double().eval()
    s = mlp_structure(bad)
    assert s is not None  # children look like an MLP ...
    with pytest.raises(NotAnMLP, match=r"forward is not the composition of its children"):
        mlp_matmat(s, dict(bad.named_parameters()), x, y, V)  # ... the forward says otherwise


@pytest.mark.parametrize("model, reason", [
    (nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2)), r"Conv1d"),
    (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), r"BatchNorm1d"),
    (nn.Sequential(nn.ReLU(), nn.Linear(3, 4)), r"comes before the first nn.Linear"),
    (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Tanh()), r"follows another activation"),
    (nn.Sequential(nn.Linear(3, 4), nn.GELU(approximate="tanh")), r"approximate='tanh'"),
    (nn.Sequential(nn.Linear(3, 4), nn.Flatten()), r"not at the front"),
    (nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)), r"takes 5 features but the previous "
                                                       r"layer gives 4"),
    (nn.Sequential(nn.Linear(3, 4), nn.Sigmoid()), r"Sigmoid"),
])
def test_structure_rejects(model, reason):
    assert mlp_structure(model) is None
    with pytest.raises(NotAnMLP, match=reason):
        mlp_structure(model, strict=True)


def test_unsupported_losses_and_targets_raise_not_an_mlp():
    model = make_mlp("relu")
    x, y = batch(5, 3, "cross_entropy")
    V = torch.randn(sum(p.numel() for p in model.parameters()), 1, dtype=torch.float64)
    with pytest.raises(NotAnMLP, match=r"class weights"):
        mlp_hvp(model, x, y, V, nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64)))
    with pytest.raises(NotAnMLP, match=r"loss 'huber' is not supported"):
        mlp_hvp(model, x, y, V, "huber")
    with pytest.raises(NotAnMLP, match=r"int64 class indices of shape \(7,\)"):
        mlp_hvp(model, x, F.one_hot(y, 3).double(), V)
    with pytest.raises(NotAnMLP, match=r"MSE targets of shape \(7,\) do not match the outputs "
                                       r"\(7, 3\)"):
        mlp_hvp(model, x, y.double(), V, "mse")
    with pytest.raises(NotAnMLP, match=r"do not give \(batch, 5\) rows"):
        mlp_hvp(model, x[:, :4], y, V)
    with pytest.raises(ValueError, match=r"curvature must be 'hessian' or 'ggn'"):
        mlp_hvp(model, x, y, V, curvature="fisher")
    # the layout mlp_hvp takes (columns) and the shape as passed (issue 26: it printed V.T's)
    with pytest.raises(ValueError, match=r"expected directions of shape \(79,\) or \(79, k\), "
                                         r"one direction per column .* got \(78, \d+\)"):
        mlp_hvp(model, x, y, V[:-1])


def test_structure_rejects_overridden_forwards_and_hooks():
    """Review regressions: a Sequential subclass overriding forward must be verified (not taken
    as plain); Identity/Dropout subclasses and hooked modules are not skipped; loss subclasses
    that override forward are not taken as the torch loss."""
    class MySeq(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    class MyId(nn.Identity):
        def forward(self, x):
            return 3 * x

    assert not mlp_structure(MySeq(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))).verified
    assert mlp_structure(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))).verified
    assert mlp_structure(nn.Sequential(nn.Linear(6, 8), MyId(), nn.Linear(8, 4))) is None
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    m[0].register_forward_hook(lambda mod, i, o: 2 * o)
    with pytest.raises(NotAnMLP, match="hooks"):
        mlp_structure(m, strict=True)

    class Focal(nn.CrossEntropyLoss):
        def forward(self, o, t):
            return super().forward(o, t) ** 2

    with pytest.raises(NotAnMLP, match="overrides forward"):
        mlp._loss_config(Focal(), "mean", -100, 0.0)
    mlp._loss_config(nn.CrossEntropyLoss(), "mean", -100, 0.0)
