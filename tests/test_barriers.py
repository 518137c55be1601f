"""Loss along the line between two networks: exact barriers, model safety, BatchNorm handling."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from landscape_lab.barriers import BarrierPath, barrier_height, barrier_location, interpolate


class Scalar(nn.Module):
    """One-parameter 'model': outputs its weight for every sample."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([float(w)], dtype=torch.float64))

    def forward(self, x):
        return self.w.expand(x.shape[0])


def double_well(out, target):
    return ((out**2 - 1.0) ** 2).mean()


def regression_data(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y[:, None]


def linear(seed):
    torch.manual_seed(seed)
    return nn.Linear(5, 1).double()


def bn_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def classification_data(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 + 3.0 * torch.randn(n, 4, generator=g)  # far from BatchNorm's initial statistics
    y = (x[:, 0] > 2.0).long() + (x[:, 1] > 2.0).long()
    return x, y


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        model.training,
        [m.training for m in model.modules()],
        {k: p.requires_grad for k, p in model.named_parameters()},
    )


def assert_unchanged(model, snap):
    state, training, mods, grads = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert model.training == training
    assert [m.training for m in model.modules()] == mods
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads


# ------------------------------------------------------------------------------ exact barriers
def test_double_well_barrier_is_one():
    data = (torch.zeros(8, 1), torch.zeros(8))
    path = interpolate(Scalar(-1.0), Scalar(1.0), double_well, data)
    assert isinstance(path, BarrierPath)
    assert len(path.ts) == 25 and path.ts[0] == 0.0 and path.ts[-1] == 1.0 and 0.5 in path.ts
    assert path.losses[0] == 0.0 and path.losses[-1] == 0.0
    assert barrier_height(path) == pytest.approx(1.0, abs=1e-12)
    assert barrier_location(path) == 0.5
    assert path.height == barrier_height(path) and path.t_max == 0.5
    t = np.array(path.ts)
    np.testing.assert_allclose(path.losses, ((2 * t - 1) ** 2 - 1) ** 2, atol=1e-12)
    assert path.accuracies is None  # float targets: not classification


def test_convex_problem_has_no_barrier():
    data = regression_data()
    a, b = linear(1), linear(2)
    path = interpolate(a, b, nn.MSELoss(), data, ts=np.linspace(0, 1, 11))
    assert 0.0 <= barrier_height(path) <= 1e-6
    with torch.no_grad():
        assert path.losses[0] == pytest.approx(nn.MSELoss()(a(data[0]), data[1]).item(), rel=1e-12)
        assert path.losses[-1] == pytest.approx(nn.MSELoss()(b(data[0]), data[1]).item(), rel=1e-12)
    # the loss is not flat: the two end points differ, so the check is not vacuous
    assert abs(path.losses[0] - path.losses[-1]) > 1e-3


def test_barrier_height_raw_inputs():
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [1.0, 3.0, 2.5, 2.0, 2.0]
    # excess over the chord 1 + t: [0, 1.75, 1.0, 0.25, 0]
    assert barrier_height(ts, losses) == pytest.approx(1.75)
    assert barrier_height((ts, losses)) == pytest.approx(1.75)
    assert barrier_location(torch.tensor(ts), np.array(losses)) == 0.25
    assert barrier_height([0.0, 0.5, 1.0], [1.0, 0.2, 1.0]) == 0.0  # convex dip: endpoints give 0
    with pytest.raises(ValueError, match=r"ts must contain 0 and 1 .* range \[0.1, 1\]"):
        barrier_height([0.1, 0.5, 1.0], [1.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        barrier_height([0.0, 0.5, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"losses contains 1 non-finite value\(s\) \(first at index 1: nan\)"):
        barrier_height([0.0, 0.5, 1.0], [1.0, float("nan"), 1.0])


# ------------------------------------------------------------------------------ model safety
def test_models_unchanged_including_on_error():
    data = classification_data()
    a, b = bn_net(0), bn_net(1)
    a.train()
    b.eval()
    a[0].weight.requires_grad_(False)
    with torch.no_grad():
        a[1].running_mean.fill_(0.3)
        b[1].running_var.fill_(2.0)
    sa, sb = snapshot(a), snapshot(b)
    path = interpolate(a, b, nn.CrossEntropyLoss(), data, ts=[0.0, 0.5, 1.0], bn_reestimate=True)
    assert len(path.losses) == 3
    assert_unchanged(a, sa)
    assert_unchanged(b, sb)

    calls = {"n": 0}

    def failing_loss(out, y):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        interpolate(a, b, failing_loss, data, bn_reestimate=True)
    assert_unchanged(a, sa)
    assert_unchanged(b, sb)


def test_non_finite_loss_raises_with_location():
    data = (torch.zeros(4, 1), torch.zeros(4))

    def loss(out, y):
        return torch.log(out.mean() - 0.0)  # log of w: nan for w < 0

    with pytest.raises(ValueError, match=r"interpolate: loss is nan at t=0 \(batch 0\)"):
        interpolate(Scalar(-1.0), Scalar(1.0), loss, data)


def test_mismatched_architectures_raise():
    data = regression_data()
    with pytest.raises(ValueError, match=r"parameters differ \(2 vs 2 tensors\): shape mismatch: bias: \(3,\) vs \(4,\); weight: \(3, 5\) vs \(4, 5\)"):
        interpolate(nn.Linear(5, 3), nn.Linear(5, 4), nn.MSELoss(), data)
    with pytest.raises(ValueError, match="only in model_b: 2.bias, 2.weight"):
        interpolate(
            nn.Sequential(nn.Linear(5, 1)), nn.Sequential(nn.Linear(5, 1), nn.ReLU(), nn.Linear(1, 1)), nn.MSELoss(), data
        )
    with pytest.raises(ValueError, match="buffers differ"):
        interpolate(nn.BatchNorm1d(5), nn.BatchNorm1d(5, track_running_stats=False), nn.MSELoss(), data)


# ------------------------------------------------------------------------------ data handling
def test_batches_weighted_by_size_and_iterators():
    x, y = regression_data(n=50)
    a, b = linear(3), linear(4)
    whole = interpolate(a, b, nn.MSELoss(), (x, y), ts=[0.0, 0.3, 1.0])
    batches = [(x[:7], y[:7]), (x[7:40], y[7:40]), (x[40:], y[40:])]  # unequal sizes
    split = interpolate(a, b, nn.MSELoss(), batches, ts=[0.0, 0.3, 1.0])
    np.testing.assert_allclose(split.losses, whole.losses, rtol=1e-12)
    gen = interpolate(a, b, nn.MSELoss(), (bt for bt in batches), ts=[1.0, 0.3, 0.0, 0.3])  # sorted, deduplicated
    assert gen.ts == [0.0, 0.3, 1.0]
    np.testing.assert_allclose(gen.losses, whole.losses, rtol=1e-12)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    np.testing.assert_allclose(interpolate(a, b, nn.MSELoss(), loader, ts=[0.0, 0.3, 1.0]).losses, whole.losses, rtol=1e-12)
    assert whole.n_samples == 50


def test_accuracy_for_classification():
    x, y = classification_data()
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    path = interpolate(a, b, nn.CrossEntropyLoss(), (x, y), ts=[0.0, 0.5, 1.0])
    with torch.no_grad():
        acc_a = (a(x).argmax(1) == y).float().mean().item()
        acc_b = (b(x).argmax(1) == y).float().mean().item()
    assert path.accuracies[0] == pytest.approx(acc_a) and path.accuracies[-1] == pytest.approx(acc_b)
    assert interpolate(a, b, nn.CrossEntropyLoss(), (x, y), accuracy=False).accuracies is None


# ------------------------------------------------------------------------------ BatchNorm
def reference_bn_loss(a, b, t, data):
    """Interpolate by hand, re-estimate BatchNorm statistics, evaluate."""
    m = copy.deepcopy(a)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    m.load_state_dict({k: (1 - t) * sd_a[k] + t * sd_b[k] if sd_a[k].is_floating_point() else sd_a[k] for k in sd_a})
    bn = m[1]
    bn.reset_running_stats()
    bn.momentum = None
    m.eval()
    bn.train()
    with torch.no_grad():
        m(data[0])
        m.eval()
        return nn.functional.cross_entropy(m(data[0]), data[1]).item()


def test_batchnorm_reestimation():
    data = classification_data()
    a, b = bn_net(0), bn_net(1)  # running statistics at their initial values: stale for this data
    ts = [0.0, 0.5, 1.0]
    stale = interpolate(a, b, nn.CrossEntropyLoss(), data, ts=ts)
    fresh = interpolate(a, b, nn.CrossEntropyLoss(), data, ts=ts, bn_reestimate=True)
    assert not stale.bn_reestimated and fresh.bn_reestimated
    assert np.max(np.abs(np.array(fresh.losses) - np.array(stale.losses))) > 0.05
    for t, loss in zip(ts, fresh.losses):
        assert loss == pytest.approx(reference_bn_loss(a, b, t, data), rel=1e-5)
    # re-estimating on other batches (given explicitly, inputs only) gives other statistics
    other = interpolate(a, b, nn.CrossEntropyLoss(), data, ts=ts, bn_reestimate=[classification_data(seed=5)[0]])
    assert other.bn_reestimated and other.losses != fresh.losses


def test_batchnorm_reestimation_is_noop_without_batchnorm():
    data = regression_data()
    a, b = linear(1), linear(2)
    plain = interpolate(a, b, nn.MSELoss(), data)
    again = interpolate(a, b, nn.MSELoss(), data, bn_reestimate=True)
    assert plain.losses == again.losses and not again.bn_reestimated


# ------------------------------------------------------------------------------ result object
def test_path_serialises_prints_and_plots():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = classification_data()
    torch.manual_seed(2)
    path = interpolate(nn.Linear(4, 3), nn.Linear(4, 3), nn.CrossEntropyLoss(), (x, y), ts=np.linspace(0, 1, 5))
    d = json.loads(json.dumps(path.to_dict()))
    assert d["ts"] == [0.0, 0.25, 0.5, 0.75, 1.0] and len(d["accuracies"]) == 5
    assert "barrier" in str(path)
    ax = path.plot()
    assert len(ax.lines) == 2  # loss and chord
    plt.close(ax.figure)
