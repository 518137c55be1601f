"""Shared fixtures of the curvature-engine tests: small models with exact dense Hessians.

Every model here is small enough (d of a few hundred) for the exact Hessian by
``torch.autograd.functional.hessian`` in float64, computed independently of the operators
under test.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call


class SmallCNN(nn.Module):
    """Conv -> BatchNorm -> tanh -> Conv -> BatchNorm -> tanh -> Linear on (2, 6, 6) inputs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3)
        self.b2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = torch.tanh(self.b1(self.c1(x)))
        x = torch.tanh(self.b2(self.c2(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.fc(self.drop(x))


def make_problem(name: str, dtype=torch.float64, seed: int = 0):
    """``(model, loss_fn, (X, y))`` for ``name`` in {"mlp", "cnn", "negcurv"}."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                              nn.Linear(12, 3))
        X = torch.randn(40, 6, generator=g)
        y = torch.randint(0, 3, (40,), generator=g)
        loss = nn.CrossEntropyLoss()
    elif name == "cnn":
        model = SmallCNN()
        X = torch.randn(24, 2, 6, 6, generator=g)
        y = torch.randint(0, 3, (24,), generator=g)
        with torch.no_grad():  # non-trivial running statistics
            model.train()
            for _ in range(3):
                model(torch.randn(24, 2, 6, 6, generator=g) * 2 + 0.5)
            model.eval()
        loss = nn.CrossEntropyLoss()
    elif name == "negcurv":
        # MSE regression with large weights at a non-minimum: strongly indefinite Hessian
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3.0)
        X = torch.randn(30, 4, generator=g)
        y = torch.randn(30, 2, generator=g)
        loss = nn.MSELoss()
    else:
        raise ValueError(name)
    model = model.to(dtype)
    X = X.to(dtype)
    if y.is_floating_point():
        y = y.to(dtype)
    model.eval()
    return model, loss, (X, y)


def dense_hessian(model, loss_fn, data, batch_norm="eval"):
    """Exact Hessian of the mean loss, float64, by torch.autograd.functional.hessian."""
    X, y = data
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names]).to(torch.float64)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    bn_state = []
    if batch_norm == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                bn_state.append((m, m.track_running_stats))
                m.train()
                m.track_running_stats = False
    mdl = model.double()

    def f(t):
        pd = {n: c.reshape(s) for n, c, s in zip(names, torch.split(t, sizes), shapes)}
        return loss_fn(functional_call(mdl, pd, (X.double(),)), y.double()
                       if y.is_floating_point() else y)

    try:
        H = torch.autograd.functional.hessian(f, theta, vectorize=True)
    finally:
        for m, t in was:
            m.training = t
        for m, t in bn_state:
            m.track_running_stats = t
    return 0.5 * (H + H.T)


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread (tiny problems: threads only add contention on a
    shared machine); restores the previous setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def problem():
    return make_problem


_CACHE: dict = {}


def problem_hessian(name: str, batch_norm: str = "eval"):
    """Cached exact Hessian of ``make_problem(name)`` (float64)."""
    key = (name, batch_norm)
    if key not in _CACHE:
        model, loss, data = make_problem(name)
        _CACHE[key] = dense_hessian(model, loss, data, batch_norm)
    return _CACHE[key]


@pytest.fixture
def hessian_of():
    return dense_hessian


@pytest.fixture
def exact_hessian():
    return problem_hessian


def dense_ggn(model, loss_fn, data):
    """``J^T H_out J`` of the mean loss, float64, by autograd.functional (independent of the
    operators)."""
    X, y = data
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def out(t):
        pd = {n: c.reshape(s) for n, c, s in zip(names, torch.split(t, sizes), shapes)}
        return functional_call(model, pd, (X,))

    z = out(theta).detach()
    J = torch.autograd.functional.jacobian(out, theta).reshape(z.numel(), -1)
    Hz = torch.autograd.functional.hessian(lambda v: loss_fn(v.reshape(z.shape), y),
                                           z.reshape(-1))
    return J.T @ Hz @ J
