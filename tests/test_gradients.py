"""Gradient geometry against exact answers: per-sample gradients vs single-sample autograd,
the gradient-covariance SVD (every method, centred and uncentred) vs torch.linalg.svdvals of the
materialized float64 matrix, rank measures on matrices of known rank, subspace overlaps with
known angles, the top-Hessian-subspace fractions and C vs diag(H) vs dense computations, error
paths, and that models are left unchanged."""
import math

import pytest
import torch
from torch import nn

import landscape_ext  # noqa: F401  (loads the ops)
from landscape_ext.gradients import (
    GradientCovarianceSVDResult, compare_covariance_to_hessian_diagonal,
    gradient_covariance_svd, gradient_in_top_hessian_subspace, gradient_rank,
    iter_per_sample_gradients, per_sample_gradients, subspace_overlap,
)

CE = nn.CrossEntropyLoss(reduction="none")


def mse_per_sample(out, t):
    return (out - t).pow(2).sum(1)


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(),
                         nn.Linear(16, 5)).to(dtype)                         # d = 965


def bn_model(seed=1, dtype=torch.float64):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 4)).to(dtype)
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.2, 0.2)
    return m


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2)
        self.fc = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.tanh(self.conv2(h))
        return self.fc(h.flatten(1))


class SeqNet(nn.Module):
    """A token-shared Linear (per-sample gradient sums over T), LayerNorm (parameters outside
    Linear layers: the per-sample-gradient path) and a head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):            # (N, T, 6)
        h = torch.tanh(self.norm(self.proj(x)))
        return self.head(h.mean(1))


def cls_data(n, n_in, n_cls, seed, dtype=torch.float64, shape=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *(shape or (n_in,)), generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, n_cls, (n,), generator=g)
    return x, y


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


def autograd_rows(model, loss_fn, x, y):
    """Per-sample gradients one sample at a time (the definition), float64, eval mode."""
    was = model.training
    model.eval()
    rows = []
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
        assert loss.shape == (1,)
        g = torch.autograd.grad(loss[0], params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    model.train(was)
    return torch.stack(rows).double()


def state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [b.clone() for b in model.buffers()], [p.detach().clone() for p in model.parameters()])


def assert_unchanged(model, before):
    after = state(model)
    assert after[0] == before[0] and after[1] == before[1]
    for a, b in zip(after[2] + after[3], before[2] + before[3]):
        assert torch.equal(a, b)


# ---- per-sample gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["mlp", "bn", "conv", "seq"])
def test_per_sample_gradients_match_single_sample_autograd(which):
    if which == "mlp":
        model, (x, y), loss = mlp(), cls_data(20, 10, 5, 0), CE
    elif which == "bn":
        model, (x, y), loss = bn_model(), cls_data(20, 8, 4, 1), CE
        model.train()            # eval mode is used (running statistics) and train is restored
    elif which == "conv":
        torch.manual_seed(2)
        model, (x, y), loss = ConvNet().double(), cls_data(12, 0, 3, 2, shape=(2, 5, 5)), CE
    else:
        torch.manual_seed(3)
        model, (x, y), loss = SeqNet().double(), cls_data(12, 0, 3, 3, shape=(4, 6)), CE
    before = state(model)
    G = per_sample_gradients(model, loss, batches(x, y, 7), chunk_size=3)
    assert_unchanged(model, before)
    ref = autograd_rows(model, loss, x, y)
    torch.testing.assert_close(G, ref, rtol=1e-10, atol=1e-12)
    streamed = torch.cat(list(iter_per_sample_gradients(model, loss, (x, y), chunk_size=5)))
    torch.testing.assert_close(streamed, ref, rtol=1e-10, atol=1e-12)


# ---- gradient covariance SVD ---------------------------------------------------------------------

def exact_svdvals(G, centered):
    n = G.shape[0]
    Gc = G - G.mean(0) if centered else G
    return torch.linalg.svdvals(Gc / math.sqrt(n))


@pytest.fixture(scope="module")
def mlp_problem():
    model = mlp(seed=4)
    x, y = cls_data(160, 10, 5, seed=5)
    G = autograd_rows(model, CE, x, y)
    return model, x, y, G


@pytest.mark.parametrize("method", ["kronecker", "jvp", "gram", "materialize"])
@pytest.mark.parametrize("centered", [True, False])
def test_svd_matches_svdvals(mlp_problem, method, centered):
    model, x, y, G = mlp_problem
    k = 8
    before = state(model)
    res = gradient_covariance_svd(model, CE, batches(x, y, 48), k, centered=centered,
                                  method=method, n_power_iter=3, oversample=12, seed=6)
    assert_unchanged(model, before)
    exact = exact_svdvals(G, centered)[:k]
    assert res.method_used == method and res.n_samples == 160 and res.n_params == G.shape[1]
    rel = ((res.singular_values - exact).abs() / exact).max().item()
    tol = 1e-2 if method in ("kronecker", "jvp") else 1e-10
    assert rel <= tol, (method, rel)
    torch.testing.assert_close(res.covariance_eigenvalues, res.singular_values ** 2)
    # eigenvectors of C: C v = lambda v for the leading (well separated) pairs
    Gc = (G - G.mean(0)) if centered else G
    V = res.right_singular_vectors.double()
    assert V.shape == (G.shape[1], k)
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0)
    CV = Gc.T @ (Gc @ V[:, :3]) / G.shape[0]
    resid = (CV - V[:, :3] * res.covariance_eigenvalues[:3]).norm(dim=0) / res.covariance_eigenvalues[:3]
    assert resid.max().item() < (1e-2 if tol > 1e-9 else 1e-8)
    U = res.left_singular_vectors
    assert U.shape == (160, k)
    if method in ("gram", "materialize"):
        torch.testing.assert_close(res.trace, float(Gc.pow(2).sum() / 160), rtol=1e-10, atol=0)
    else:   # Girard-Hutchinson estimate: within 5 standard errors
        assert abs(res.trace - float(Gc.pow(2).sum() / 160)) <= 5 * res.trace_stderr
    assert res.to_dict()["method_used"] == method and "right_singular_vectors" not in res.to_dict()


def test_centred_and_uncentred_definitions_exactly(mlp_problem):
    # G_c = G - 1 gbar^T, divisor n (not n - 1), sigma of G / sqrt(n), lambda = sigma^2
    model, x, y, G = mlp_problem
    n = G.shape[0]
    k = 12
    for centered in (True, False):
        res = gradient_covariance_svd(model, CE, (x, y), k, centered=centered, method="gram")
        C = ((G - G.mean(0)) if centered else G)
        C = C.T @ C / n
        lam = torch.linalg.eigvalsh(C).flip(0)[:k]
        torch.testing.assert_close(res.covariance_eigenvalues, lam, rtol=1e-9, atol=1e-14)
    # the mean gradient the uncentred run reports is |G^T 1 / n|
    res = gradient_covariance_svd(model, CE, (x, y), 3, centered=False, method="kronecker")
    torch.testing.assert_close(res.mean_gradient_norm, float(G.mean(0).norm()), rtol=1e-8, atol=0)


@pytest.mark.parametrize("which", ["bn", "conv", "seq"])
def test_svd_on_other_architectures(which):
    if which == "bn":
        model, (x, y) = bn_model(seed=7), cls_data(96, 8, 4, 8)
    elif which == "conv":
        torch.manual_seed(9)
        model, (x, y) = ConvNet().double(), cls_data(64, 0, 3, 10, shape=(2, 5, 5))
    else:
        torch.manual_seed(11)
        model, (x, y) = SeqNet().double(), cls_data(64, 0, 3, 12, shape=(4, 6))
    G = autograd_rows(model, CE, x, y)
    k = 6
    exact = exact_svdvals(G, True)[:k]
    for method in ("kronecker", "jvp"):
        res = gradient_covariance_svd(model, CE, batches(x, y, 40), k, method=method,
                                      n_power_iter=3, oversample=12, seed=13)
        rel = ((res.singular_values - exact).abs() / exact).max().item()
        assert rel <= 1e-2, (which, method, rel)


def test_kronecker_float32_fused_and_composite_agree():
    model = mlp(seed=14, dtype=torch.float32)
    x, y = cls_data(128, 10, 5, 15, dtype=torch.float32)
    G = autograd_rows(model, CE, x, y)
    exact = exact_svdvals(G, True)[:6]
    for impl in ("fused", "composite"):
        res = gradient_covariance_svd(model, CE, batches(x, y, 50), 6, method="kronecker",
                                      sketch_impl=impl, n_power_iter=3, seed=16)
        assert res.sketch_impl == impl
        assert ((res.singular_values - exact).abs() / exact).max().item() <= 1e-2


def test_auto_method_and_batching_invariance(mlp_problem):
    model, x, y, G = mlp_problem
    a = gradient_covariance_svd(model, CE, (x, y), 5, method="auto")
    assert a.method_used == "gram"                 # n = 160 <= 2 d: gram beats materialize
    b = gradient_covariance_svd(model, CE, batches(x, y, 33), 5, method="kronecker", seed=3,
                                n_power_iter=4)
    torch.testing.assert_close(a.singular_values, b.singular_values, rtol=1e-3, atol=0)


def test_data_that_changes_between_passes_is_an_error(mlp_problem):
    model, x, y, _ = mlp_problem

    class Shuffled:
        def __init__(self):
            self.g = torch.Generator().manual_seed(0)

        def __iter__(self):
            perm = torch.randperm(x.shape[0], generator=self.g)
            return iter(batches(x[perm], y[perm], 40))

    before = state(model)
    with pytest.raises(ValueError, match=r"changed between passes.*shuffle=False"):
        gradient_covariance_svd(model, CE, Shuffled(), 4, method="kronecker")
    assert_unchanged(model, before)


def test_bad_input_errors(mlp_problem):
    model, x, y, _ = mlp_problem
    data = (x[:20], y[:20])
    with pytest.raises(ValueError, match=r"k = 21 exceeds min\(n_samples, n_params\) = "
                                         r"min\(20, 965\) = 20"):
        gradient_covariance_svd(model, CE, data, 21)
    with pytest.raises(ValueError, match=r"k = 21 exceeds min\(n_samples, n_params\) = "
                                         r"min\(20, 965\)"):
        gradient_covariance_svd(model, CE, iter_once(data), 21, method="jvp")
    with pytest.raises(ValueError, match=r"k = 966 exceeds .* d = 965"):
        gradient_covariance_svd(model, CE, data, 966)
    with pytest.raises(ValueError, match=r"a loss without a per-sample dimension.*\(20,\)"):
        gradient_covariance_svd(model, lambda o, t: CE(o, t).mean(), data, 3, method="jvp")
    with pytest.raises(ValueError, match=r"a loss without a per-sample dimension"):
        per_sample_gradients(model, lambda o, t: CE(o, t).sum(), data)
    with pytest.raises(ValueError, match=r"reduction='mean'.*reduction='none'"):
        gradient_covariance_svd(model, nn.CrossEntropyLoss(), data, 3)
    with pytest.raises(ValueError, match=r"reduction='sum'"):
        per_sample_gradients(model, nn.MSELoss(reduction="sum"), data)
    with pytest.raises(ValueError, match=r"per-sample losses of shape \(batch,\) = \(20,\), got "
                                         r"\(20, 5\)"):
        gradient_covariance_svd(model, lambda o, t: o, data, 3, method="kronecker")
    with pytest.raises(ValueError, match=r"method must be one of"):
        gradient_covariance_svd(model, CE, data, 3, method="lanczos")
    with pytest.raises(ValueError, match=r"k must be a positive integer"):
        gradient_covariance_svd(model, CE, data, 0)
    with pytest.raises(TypeError, match=r"one-shot iterator"):
        gradient_covariance_svd(model, CE, iter([data]), 3)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"method='gram' needs Linear layers on 2-D inputs"):
        gradient_covariance_svd(ConvNet().double(), CE, cls_data(8, 0, 3, 0, shape=(2, 5, 5)), 2,
                                method="gram")


class iter_once:
    """A re-iterable of one batch whose size is not known in advance."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return iter([self.batch])


def test_model_restored_after_error():
    model = bn_model()
    model.train()
    before = state(model)
    x, y = cls_data(16, 8, 4, 0)
    with pytest.raises(ValueError):
        gradient_covariance_svd(model, lambda o, t: CE(o, t).mean(), (x, y), 3, method="jvp")
    assert_unchanged(model, before)


# ---- rank measures ---------------------------------------------------------------------------

def test_gradient_rank_of_known_rank_matrices():
    g = torch.Generator().manual_seed(0)
    for r in (1, 5, 17):
        M = torch.randn(60, r, generator=g, dtype=torch.float64) @ torch.randn(
            r, 40, generator=g, dtype=torch.float64)
        res = gradient_rank(M)
        assert res.numerical_rank == r
        assert 1.0 <= res.stable_rank <= r + 1e-9
        assert 1.0 <= res.effective_rank <= r + 1e-9
    res = gradient_rank(torch.eye(7))
    assert res.numerical_rank == 7
    assert res.stable_rank == pytest.approx(7.0)
    assert res.effective_rank == pytest.approx(7.0)
    assert res.effective_rank_covariance == pytest.approx(7.0)
    s = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)
    res = gradient_rank(s)
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert res.effective_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    q = torch.tensor([0.9, 0.1], dtype=torch.float64)
    assert res.effective_rank_covariance == pytest.approx(math.exp(-(q * q.log()).sum().item()))
    assert res.stable_rank == pytest.approx(10.0 / 9.0)
    assert res.numerical_rank == 2
    assert gradient_rank(torch.tensor([1.0, 1e-3, 1e-9]), tol=1e-4).numerical_rank == 2
    # float32 default tolerance: max(m, n) * eps(float32)
    M = torch.randn(50, 3, generator=g) @ torch.randn(3, 30, generator=g)
    res32 = gradient_rank(M.float())
    assert res32.numerical_rank == 3
    assert res32.tol == pytest.approx(50 * torch.finfo(torch.float32).eps)
    with pytest.raises(ValueError, match=r"1-D singular values or a 2-D matrix, got shape"):
        gradient_rank(torch.zeros(2, 2, 2))


def test_gradient_rank_of_an_svd_result(mlp_problem):
    model, x, y, G = mlp_problem
    res = gradient_covariance_svd(model, CE, (x, y), 6, method="gram", centered=False)
    r = gradient_rank(res)
    assert r.truncated and r.n_values == 6
    full = torch.linalg.svdvals(G / math.sqrt(G.shape[0]))
    assert r.stable_rank == pytest.approx(float(full.pow(2).sum() / full[0] ** 2), rel=1e-9)


# ---- subspaces -------------------------------------------------------------------------------

def test_subspace_overlap_known_angles():
    e = torch.eye(4, dtype=torch.float64)
    assert subspace_overlap(e[:, :2], e[:, :2] @ torch.tensor([[2.0, 1.0], [1.0, 3.0]],
                                                              dtype=torch.float64)).overlap == \
        pytest.approx(1.0)
    assert subspace_overlap(e[:, :2], e[:, 2:]).overlap == pytest.approx(0.0, abs=1e-15)
    th = 0.3
    b = torch.stack([e[:, 0], math.cos(th) * e[:, 1] + math.sin(th) * e[:, 2]], 1)
    res = subspace_overlap(e[:, :2], b)
    torch.testing.assert_close(res.cosines, torch.tensor([1.0, math.cos(th)], dtype=torch.float64))
    assert res.overlap == pytest.approx((1 + math.cos(th) ** 2) / 2)
    torch.testing.assert_close(res.angles, torch.tensor([0.0, th], dtype=torch.float64),
                               atol=1e-7, rtol=0)
    # p != q, a single vector, a rank-deficient set
    assert subspace_overlap(e[:, 0], e[:, :3]).overlap == pytest.approx(1.0)
    dup = torch.stack([e[:, 0], 2 * e[:, 0], e[:, 1]], 1)
    res = subspace_overlap(dup, e[:, :2])
    assert res.p == 2 and res.overlap == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"A has d = 4 rows but B has d = 3"):
        subspace_overlap(e, torch.eye(3))


@pytest.fixture(scope="module")
def small_dense():
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()   # d = 123
    x, y = cls_data(80, 6, 3, 18)
    G = autograd_rows(model, CE, x, y)
    params = list(model.parameters())

    def mean_loss(*ps):
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()],
                                                         ps)), (x,))
        return CE(out, y).mean()

    H = torch.autograd.functional.hessian(mean_loss, tuple(p.detach() for p in params))
    sizes = [p.numel() for p in params]
    H = torch.cat([torch.cat([H[i][j].reshape(sizes[i], sizes[j]) for j in range(len(params))], 1)
                   for i in range(len(params))], 0)
    return model, x, y, G, H


@pytest.mark.parametrize("centered", [False, True])
def test_gradient_in_top_hessian_subspace_exact(small_dense, centered):
    model, x, y, G, H = small_dense
    k = 5
    w, V = torch.linalg.eigh(H)
    V = V[:, -k:].flip(1)
    n = G.shape[0]
    gbar = G.mean(0)
    Gc = G - gbar if centered else G
    res = gradient_in_top_hessian_subspace(model, CE, batches(x, y, 30), k, hessian=V,
                                           centered=centered, method="kronecker")
    assert res.gradient_fraction == pytest.approx(float((V.T @ gbar).pow(2).sum()
                                                        / gbar.pow(2).sum()), rel=1e-9)
    assert res.covariance_trace_fraction == pytest.approx(
        float((Gc @ V).pow(2).sum() / Gc.pow(2).sum()), rel=1e-9)
    torch.testing.assert_close(res.per_direction_variance, (Gc @ V).pow(2).sum(0) / n,
                               rtol=1e-9, atol=0)
    assert res.random_baseline == pytest.approx(k / G.shape[1])
    jv = gradient_in_top_hessian_subspace(model, CE, (x, y), k, hessian=V, centered=centered,
                                          method="jvp")
    assert jv.covariance_trace_fraction == pytest.approx(res.covariance_trace_fraction, rel=1e-9)


def test_gradient_in_top_hessian_subspace_with_eigsh(small_dense):
    model, x, y, G, H = small_dense
    k = 3
    w, V = torch.linalg.eigh(H)
    exact = gradient_in_top_hessian_subspace(model, CE, (x, y), k, hessian=V[:, -k:])
    res = gradient_in_top_hessian_subspace(model, CE, (x, y), k, seed=1,
                                           eigsh_kwargs={"tol": 1e-10})
    torch.testing.assert_close(res.hessian_eigenvalues, w[-k:].flip(0), rtol=1e-6, atol=1e-9)
    assert res.gradient_fraction == pytest.approx(exact.gradient_fraction, rel=1e-4, abs=1e-8)
    assert res.covariance_trace_fraction == pytest.approx(exact.covariance_trace_fraction,
                                                          rel=1e-4)
    assert res.n_hessian_matvecs > 0


# ---- C vs diag(H) ------------------------------------------------------------------------------

@pytest.mark.parametrize("centered", [False, True])
def test_compare_covariance_to_hessian_diagonal_exact(small_dense, centered):
    model, x, y, G, H = small_dense
    before = state(model)
    res = compare_covariance_to_hessian_diagonal(model, CE, batches(x, y, 25), centered=centered,
                                                 hessian_method="exact")
    assert_unchanged(model, before)
    n = G.shape[0]
    c = G.pow(2).mean(0) - (G.mean(0).pow(2) if centered else 0)
    h = torch.diagonal(H)
    torch.testing.assert_close(res.covariance_diagonal, c, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(res.hessian_diagonal, h, rtol=1e-8, atol=1e-12)
    cc, hc = c - c.mean(), h - h.mean()
    assert res.pearson == pytest.approx(float((cc * hc).sum() / (cc.norm() * hc.norm())), rel=1e-9)
    from scipy.stats import spearmanr
    assert res.spearman == pytest.approx(spearmanr(c.numpy(), h.numpy())[0], rel=1e-9)
    assert res.relative_error == pytest.approx(float((c - h).norm() / h.norm()), rel=1e-9)
    s = float((c * h).sum() / (c * c).sum())
    assert res.scale == pytest.approx(s, rel=1e-9)
    assert res.relative_error_scaled == pytest.approx(float((s * c - h).norm() / h.norm()),
                                                      rel=1e-9)
    assert res.n_samples == n and res.hessian_noise == 0.0
    d = res.to_dict()
    assert "covariance_diagonal" not in d and d["pearson"] == res.pearson


def test_compare_covariance_to_hessian_diagonal_estimated(small_dense):
    model, x, y, G, H = small_dense
    res = compare_covariance_to_hessian_diagonal(model, CE, (x, y), n_matvecs=64, seed=2,
                                                 method="jvp")
    assert res.hessian_method == "hutchinson" and res.n_hessian_matvecs == 64
    assert res.hessian_noise > 0
    h = torch.diagonal(H)
    # the estimate is within a few standard errors of the exact diagonal (entrywise, on average)
    z = (res.hessian_diagonal - h) / res.hessian_diagonal_stderr.clamp_min(1e-12)
    assert z.pow(2).mean().sqrt().item() < 3.0
    given = compare_covariance_to_hessian_diagonal(model, CE, (x, y), hessian_diagonal=h)
    assert given.hessian_method == "given"
    torch.testing.assert_close(given.covariance_diagonal, res.covariance_diagonal)


def test_result_prints_and_serialises(mlp_problem):
    model, x, y, _ = mlp_problem
    res = gradient_covariance_svd(model, CE, (x, y), 3, method="kronecker", n_power_iter=1)
    assert isinstance(res, GradientCovarianceSVDResult)
    text = str(res)
    assert "singular_values" in text and "kronecker" in text
    d = res.to_dict()
    assert d["k"] == 3 and len(d["singular_values"]) == 3 and d["n_passes"] == 4
    assert d["n_forward_products"] == 2 * 13 and d["n_reverse_products"] == 13 + 14


# ---- method selection and the layer-factor engine's fallbacks ----------------------------------

class FunctionalHead(nn.Module):
    """``fc`` is never called: its weight is used through F.linear (like MultiheadAttention's
    out_proj). The factor engine must notice and hand it to per-sample gradients."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 10)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        return nn.functional.linear(torch.tanh(self.inner(x)), self.fc.weight, self.fc.bias)


class DoubleUse(nn.Module):
    """``fc`` is called *and* its weight is used functionally: the factors miss a term, which
    only the first-batch check against jvp can see."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x)) + 0.5 * torch.tanh(x @ self.fc.weight.T)
        return self.head(h)


@pytest.fixture
def force_streaming(monkeypatch):
    """Make 'auto' skip materialize and gram so that small models exercise the other branches."""
    import landscape_ext.gradients._method as gm
    monkeypatch.setattr(gm, "_MATERIALIZE_MAX", 0)
    monkeypatch.setattr(gm, "_GRAM_MAX_N", 0)


def test_layer_never_called_goes_to_per_sample_gradients():
    torch.manual_seed(20)
    model = FunctionalHead().double()
    x, y = cls_data(64, 6, 3, 21)
    G = autograd_rows(model, CE, x, y)
    exact = exact_svdvals(G, True)[:5]
    res = gradient_covariance_svd(model, CE, batches(x, y, 30), 5, method="kronecker",
                                  n_power_iter=4, seed=1)
    assert ((res.singular_values - exact).abs() / exact).max().item() <= 1e-2


def test_auto_falls_back_to_jvp_when_factors_miss_a_use(force_streaming):
    torch.manual_seed(22)
    model = DoubleUse().double()
    x, y = cls_data(64, 6, 3, 23)
    G = autograd_rows(model, CE, x, y)
    exact = exact_svdvals(G, True)[:4]
    res = gradient_covariance_svd(model, CE, batches(x, y, 30), 4, method="auto", n_power_iter=4)
    assert res.method_used == "jvp"
    assert ((res.singular_values - exact).abs() / exact).max().item() <= 1e-2


def test_auto_picks_kronecker_and_gram(force_streaming, monkeypatch, mlp_problem):
    import landscape_ext.gradients._method as gm
    model, x, y, G = mlp_problem
    res = gradient_covariance_svd(model, CE, batches(x, y, 60), 4, n_power_iter=3)
    assert res.method_used == "kronecker" and res.sketch_impl == "fused"
    monkeypatch.setattr(gm, "_GRAM_MAX_N", 10_000)
    res = gradient_covariance_svd(model, CE, batches(x, y, 60), 4)
    assert res.method_used == "gram"
    torch.testing.assert_close(res.singular_values, exact_svdvals(G, True)[:4], rtol=1e-9, atol=0)
    # a conv model cannot use gram: auto takes the randomized factor route
    torch.manual_seed(24)
    conv = ConvNet().double()
    xc, yc = cls_data(40, 0, 3, 25, shape=(2, 5, 5))
    assert gradient_covariance_svd(conv, CE, (xc, yc), 3).method_used == "kronecker"


def test_gram_with_parameters_outside_linear_layers():
    model, (x, y) = bn_model(seed=26), cls_data(90, 8, 4, 27)
    G = autograd_rows(model, CE, x, y)
    for centered in (True, False):
        res = gradient_covariance_svd(model, CE, batches(x, y, 40), 6, method="gram",
                                      centered=centered)
        torch.testing.assert_close(res.singular_values, exact_svdvals(G, centered)[:6],
                                   rtol=1e-9, atol=0)


def test_jvp_falls_back_to_double_backward(monkeypatch, mlp_problem):
    # a model with an op lacking forward-mode AD (SDPA attention): G z by double backward instead
    from landscape_ext.gradients._engines import JvpEngine
    model, x, y, G = mlp_problem

    def no_forward_ad(self, ctx, Z):
        raise RuntimeError("derivative for aten::foo is not implemented for forward AD (jvp)")

    monkeypatch.setattr(JvpEngine, "_sketch_by_jvp", no_forward_ad)
    res = gradient_covariance_svd(model, CE, batches(x, y, 70), 5, method="jvp", n_power_iter=3,
                                  chunk_size=4)
    assert res.forward_mode_used == "double-backward"
    exact = exact_svdvals(G, True)[:5]
    assert ((res.singular_values - exact).abs() / exact).max().item() <= 1e-2


def test_gram_top_eigenpairs_by_lanczos_match_eigh():
    # n > 1024, k <= n / 8: the gram method's eigen-solve runs block Lanczos on K
    from landscape_ext.gradients.svd import _top_eigh
    g = torch.Generator().manual_seed(30)
    X = torch.randn(1100, 300, generator=g, dtype=torch.float64) / torch.arange(
        1, 301, dtype=torch.float64)
    K = X @ X.T
    w, U = _top_eigh(K, 10, seed=0)
    w_ref = torch.linalg.eigvalsh(K).flip(0)[:10]
    torch.testing.assert_close(w, w_ref, rtol=1e-11, atol=0)
    torch.testing.assert_close(K @ U, U * w, rtol=0, atol=1e-9 * w_ref[0].item())
