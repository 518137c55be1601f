"""Models that compute their own loss (issue 14, item 3): ``loss_fn=None`` and dict batches
``model(**batch)``, the HuggingFace convention (``outputs.loss``, ``outputs.logits``), in the
Hessian and GGN operators (against dense float64 Hessians and ``J^T H_out J``), the gradient
geometry (against per-sample autograd loops and the explicit per-sample loss) and the
optimizers' curvature closures; and the error of a forward that fails under the attention
backends."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import landscape_ext as le

VOCAB, WIDTH, SEQ = 7, 4, 5

pytestmark = pytest.mark.usefixtures("single_thread")


class HFStyleLM(nn.Module):
    """``model(input_ids=..., labels=...)`` returns an object with ``.loss`` and ``.logits``
    (or a dict with the same keys); a causal self-attention layer in the middle. The loss is
    the token cross-entropy (``ignore_index=-100``), with ``shift`` the causal-LM one of
    HuggingFace's ``*ForCausalLM`` (position t predicts label t + 1)."""

    def __init__(self, as_dict: bool = False, shift: bool = False, label_smoothing: float = 0.0):
        super().__init__()
        self.as_dict, self.shift, self.label_smoothing = as_dict, shift, label_smoothing
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.layer = nn.TransformerEncoderLayer(WIDTH, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids, labels=None, attention_mask=None):
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
        logits = self.head(self.layer(self.emb(input_ids), src_mask=causal, is_causal=True))
        loss = None
        if labels is not None:
            loss = _token_loss(logits, labels, self.shift, self.label_smoothing)
        if self.as_dict:
            return {"loss": loss, "logits": logits}
        return types.SimpleNamespace(loss=loss, logits=logits)


def _token_loss(logits, labels, shift, label_smoothing=0.0, reduction="mean"):
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1),
                           label_smoothing=label_smoothing, reduction=reduction)


def _batches(sizes=(3, 2), padded=False):
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, VOCAB, (n, SEQ), generator=g),
                "labels": torch.randint(0, VOCAB, (n, SEQ), generator=g)} for n in sizes]
    if padded:  # right padding of different lengths: labels -100 there
        for b in batches:
            for i in range(b["labels"].shape[0]):
                b["labels"][i, SEQ - 1 - i % 3:] = -100
    return batches


def _flat_parameters(model):
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def unflatten(t):
        parts = torch.split(t, [params[n].numel() for n in names])
        return {n: c.reshape(params[n].shape) for n, c in zip(names, parts)}

    return theta, unflatten


def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def _field(out, name):
    return out[name] if isinstance(out, dict) else getattr(out, name)


def _dense_batch_ggn(model, batch, shift):
    """``J^T H_out J`` of one batch: ``J`` the Jacobian of the logits, ``H_out`` the Hessian of
    the token cross-entropy written out here (not the operator's)."""
    theta, unflatten = _flat_parameters(model)
    model.eval()
    with _math_attention():
        logits = _field(functional_call(model, unflatten(theta), args=(), kwargs=batch),
                        "logits").detach()
        J = torch.autograd.functional.jacobian(
            lambda t: _field(functional_call(model, unflatten(t), args=(), kwargs=batch),
                             "logits").reshape(-1), theta)
    H = torch.autograd.functional.hessian(
        lambda z: _token_loss(z.reshape(logits.shape), batch["labels"], shift), logits.reshape(-1))
    return J.T @ H @ J


def _dense_batch_hessian(model, batch):
    theta, unflatten = _flat_parameters(model)

    def loss_of(t):
        return _field(functional_call(model, unflatten(t), args=(), kwargs=batch), "loss")

    model.eval()
    with _math_attention():
        return torch.autograd.functional.hessian(loss_of, theta)


@pytest.mark.parametrize("as_dict", [False, True])
@pytest.mark.parametrize("mode", ["forward-over-reverse", "double-backward"])
def test_the_models_own_loss_over_dict_batches(as_dict, mode):
    torch.manual_seed(0)
    model = HFStyleLM(as_dict).double()
    batches = _batches()
    # the mean over all sequences: batches weighted by their number of sequences
    dense = (3 * _dense_batch_hessian(model, batches[0])
             + 2 * _dense_batch_hessian(model, batches[1])) / 5
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    op = le.HessianOperator(model, None, batches, mode=mode)
    V = torch.randn(op.d, 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, dense @ V, rtol=1e-10, atol=1e-12)
    assert op.n_samples == 5 and model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # one dict batch; a batch_size callable changes the weights
    single = le.HessianOperator(model, None, batches[0], mode=mode)
    torch.testing.assert_close(single @ V, _dense_batch_hessian(model, batches[0]) @ V,
                               rtol=1e-10, atol=1e-12)
    equal = le.HessianOperator(model, None, batches, mode=mode, batch_size=lambda batch: 1)
    dense_equal = (_dense_batch_hessian(model, batches[0])
                   + _dense_batch_hessian(model, batches[1])) / 2
    torch.testing.assert_close(equal @ V, dense_equal @ V, rtol=1e-10, atol=1e-12)


def test_eigsh_on_the_models_own_loss():
    torch.manual_seed(0)
    model = HFStyleLM().double()
    batch = _batches((4,))[0]
    top = le.eigsh(le.HessianOperator(model, None, batch), k=2, tol=1e-10)
    ref = torch.linalg.eigvalsh(_dense_batch_hessian(model, batch)).flip(0)[:2]
    torch.testing.assert_close(top.eigenvalues, ref, rtol=1e-8, atol=1e-10)


def test_errors_of_the_own_loss_path():
    torch.manual_seed(0)
    logits_only = nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, VOCAB)).double()
    batch = {"input": torch.randint(0, VOCAB, (2, SEQ))}
    with pytest.raises(ValueError, match=r"loss_fn=None .* tensor of shape \(2, 5, 7\)"):
        le.HessianOperator(logits_only, None, batch) @ torch.zeros(
            sum(p.numel() for p in logits_only.parameters()), dtype=torch.float64)
    model = HFStyleLM().double()
    with pytest.raises(TypeError, match="loss_fn must be callable or None"):
        le.HessianOperator(model, "not a loss", _batches())
    bad = le.HessianOperator(model, None, _batches(), batch_size=lambda batch: -1)
    with pytest.raises(ValueError, match="batch_size must return a sample count >= 0, got -1"):
        bad @ torch.zeros(bad.d, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# GGNOperator(model, None, data)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("mode", ["forward-over-reverse", "double-backward"])
def test_ggn_of_the_models_own_cross_entropy(shift, mode):
    torch.manual_seed(0)
    model = HFStyleLM(as_dict=shift, shift=shift).double()
    batches = _batches(padded=True)
    dense = (3 * _dense_batch_ggn(model, batches[0], shift)
             + 2 * _dense_batch_ggn(model, batches[1], shift)) / 5
    model.train()
    op = le.GGNOperator(model, None, batches, mode=mode)
    V = torch.randn(op.d, 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, dense @ V, rtol=1e-10, atol=1e-12)
    assert op.inferred_loss == ("causal_lm_cross_entropy" if shift else "cross_entropy")
    assert op.mode_used == mode and model.training
    # the other reading of the labels is a different matrix: the check above can tell them apart
    other = (3 * _dense_batch_ggn(model, batches[0], not shift)
             + 2 * _dense_batch_ggn(model, batches[1], not shift)) / 5
    assert float((other @ V - dense @ V).norm()) > 1e-3 * float((dense @ V).norm())


def test_ggn_own_loss_eigenvalues_match_the_dense_ggn():
    torch.manual_seed(1)
    model = HFStyleLM(shift=True).double()
    batch = _batches((4,))[0]
    top = le.eigsh(le.GGNOperator(model, None, batch), k=2, tol=1e-10)
    ref = torch.linalg.eigvalsh(_dense_batch_ggn(model, batch, True)).flip(0)[:2]
    torch.testing.assert_close(top.eigenvalues, ref, rtol=1e-8, atol=1e-10)


def test_ggn_own_loss_errors():
    torch.manual_seed(0)
    zeros = torch.zeros(sum(p.numel() for p in HFStyleLM().parameters()), dtype=torch.float64)
    # a loss neither reading reproduces: both values in the message
    smoothed = HFStyleLM(label_smoothing=0.1).double()
    with pytest.raises(ValueError, match=r"loss 2.168\d+ on batch 0 is not a cross-entropy .*\("
                                         r"cross-entropy of logits vs labels: 2.180\d+; causal-LM "
                                         r".*: 2.123\d+;.*pass loss_fn"):
        le.GGNOperator(smoothed, None, _batches()) @ zeros
    # uniform logits (a zero head): both readings give log(VOCAB), the loss is ambiguous
    uniform = HFStyleLM(shift=True).double()
    nn.init.zeros_(uniform.head.weight)
    nn.init.zeros_(uniform.head.bias)
    with pytest.raises(ValueError, match="reproduced by more than one cross-entropy"):
        le.GGNOperator(uniform, None, _batches()) @ zeros
    # no labels in the batch
    model = HFStyleLM().double()
    no_labels = {"input_ids": _batches()[0]["input_ids"]}
    with pytest.raises(ValueError, match="needs the labels in the batch under 'labels'"):
        le.GGNOperator(model, None, no_labels) @ zeros
    # an output without logits
    loss_only = HFStyleLM().double()
    loss_only.forward = lambda input_ids, labels=None: {
        "loss": HFStyleLM.forward(loss_only, input_ids, labels).loss}
    with pytest.raises(ValueError, match="needs a model output with .logits"):
        le.GGNOperator(loss_only, None, _batches()) @ zeros
    # float labels (a regression loss)
    batch = dict(_batches()[0], labels=torch.zeros(3, SEQ, dtype=torch.float64))
    regression = HFStyleLM().double()
    regression.forward = lambda input_ids, labels=None: types.SimpleNamespace(
        logits=HFStyleLM.forward(regression, input_ids).logits, loss=torch.tensor(0.5))
    with pytest.raises(ValueError, match="integer labels .* torch.float64"):
        le.GGNOperator(regression, None, batch) @ zeros


# ------------------------------------------------------------------------------------------------
# a forward that fails under the attention backends
# ------------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    """One SDPA attention over (batch, SEQ, WIDTH) inputs; ``failure`` picks how it breaks:
    ``"shapes"`` (keys of another width: no backend runs it), ``"needs_fused"`` (refuses the
    math backend, as a model wired to a fused kernel would) or ``"forces_flash"`` (selects the
    flash kernel itself, which has no double backward)."""

    def __init__(self, failure):
        super().__init__()
        self.failure = failure
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q = self.proj(x).unflatten(-1, (2, WIDTH // 2)).transpose(1, 2)
        k = q[..., :1] if self.failure == "shapes" else q
        if self.failure == "needs_fused" and torch.backends.cuda.math_sdp_enabled():
            raise RuntimeError("this model needs a fused attention kernel")
        if self.failure == "forces_flash":
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, q).sum((1, 2))
        return F.scaled_dot_product_attention(q, k, q).sum((1, 2))


@pytest.mark.parametrize("failure, message", [
    # issue 26: the fused backends only say they do not exist on this device; the model's own
    # error (the same under math) is reported alone, without a list of backends
    ("shapes", r"HessianOperator: the forward of `model` fails on batch 0: RuntimeError: "
               r"Expected size for first two dimensions of batch2 tensor to be: \[6, 2\] but got: "
               r"\[6, 1\]\. Check the model and the batch it is called on$"),
    ("needs_fused", r"fails on batch 0 under the math attention backend, the only one with the "
                    r"second derivatives .* but runs under flash_attention: math: RuntimeError: "
                    r"this model needs a fused attention kernel"),
    ("forces_flash", r"the forward of `model` runs a fused attention kernel on batch 0 although "
                     r"the products select the math backend .*flash"),
])
def test_a_forward_failing_under_the_attention_backends_names_the_model(failure, message):
    torch.manual_seed(0)
    model = _Attention(failure).double()
    data = (torch.randn(3, SEQ, WIDTH, dtype=torch.float64),
            torch.randn(3, WIDTH // 2, dtype=torch.float64))
    op = le.HessianOperator(model, F.mse_loss, data)
    with pytest.raises(RuntimeError, match=message) as info:
        op @ torch.randn(op.d, 2, dtype=torch.float64)
    assert info.value.__cause__ is not None     # the original error is kept
    assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()


# ------------------------------------------------------------------------------------------------
# gradient geometry with loss_fn=None: sample i's loss is model(**batch[i:i+1]).loss
# ------------------------------------------------------------------------------------------------


def _sample_losses_by_loop(model, batches):
    """The per-sample losses as plain PyTorch: the model on each one-sample batch."""
    return [(lambda p, one=one: _field(functional_call(model, p, args=(), kwargs=one), "loss"))
            for b in batches for one in ({k: v[i:i + 1] for k, v in b.items()}
                                         for i in range(b["input_ids"].shape[0]))]


def _explicit_per_sample_loss(shift):
    """The same loss written as a per-sample ``loss_fn`` of the logits (tuple batches)."""
    def loss_fn(outputs, labels):
        tokens = _token_loss(_field(outputs, "logits"), labels, shift, reduction="none")
        counted = (labels[:, 1:] if shift else labels) != -100
        return tokens.reshape(labels.shape[0], -1).sum(1) / counted.sum(1)
    return loss_fn


@pytest.fixture(scope="module")
def own_loss_problem():
    """A causal LM (dict output) on padded batches: per-sample gradients and the dense Hessian
    of the mean per-sample loss by plain autograd, one sample at a time."""
    torch.manual_seed(0)
    model = HFStyleLM(as_dict=True, shift=True).double()
    batches = _batches(padded=True)
    theta, unflatten = _flat_parameters(model)
    losses = _sample_losses_by_loop(model, batches)
    model.eval()
    with _math_attention():
        G = torch.stack([torch.autograd.functional.jacobian(lambda t, f=f: f(unflatten(t)), theta)
                         for f in losses])
        H = torch.autograd.functional.hessian(
            lambda t: torch.stack([f(unflatten(t)) for f in losses]).mean(), theta)
    model.train()
    return model, batches, G, H


def test_per_sample_gradients_of_the_models_own_loss(own_loss_problem):
    model, batches, G, _ = own_loss_problem
    torch.testing.assert_close(le.per_sample_gradients(model, None, batches), G,
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat(list(le.gradients.iter_per_sample_gradients(
        model, None, batches, chunk_size=2))), G, rtol=1e-10, atol=1e-12)
    # the same as the explicit per-sample loss on (input_ids, labels) batches
    tuples = [(b["input_ids"], b["labels"]) for b in batches]
    torch.testing.assert_close(le.per_sample_gradients(model, _explicit_per_sample_loss(True),
                                                       tuples), G, rtol=1e-10, atol=1e-12)
    assert model.training


@pytest.mark.parametrize("method", ["auto", "jvp", "materialize"])
def test_gradient_covariance_svd_of_the_models_own_loss(own_loss_problem, method):
    model, batches, G, _ = own_loss_problem
    res = le.gradient_covariance_svd(model, None, batches, k=3, method=method, n_power_iter=6)
    Gc = (G - G.mean(0)) / G.shape[0] ** 0.5
    torch.testing.assert_close(res.singular_values, torch.linalg.svdvals(Gc)[:3],
                               rtol=1e-8, atol=1e-10)
    assert res.method_used == ("materialize" if method == "auto" else method)
    tuples = [(b["input_ids"], b["labels"]) for b in batches]
    explicit = le.gradient_covariance_svd(model, _explicit_per_sample_loss(True), tuples, k=3,
                                          method="materialize")
    torch.testing.assert_close(res.singular_values, explicit.singular_values,
                               rtol=1e-8, atol=1e-10)


def test_hessian_studies_of_the_models_own_loss(own_loss_problem):
    model, batches, G, H = own_loss_problem
    claim = le.compare_covariance_to_hessian_diagonal(model, None, batches,
                                                      hessian_method="exact")
    torch.testing.assert_close(claim.hessian_diagonal, torch.diagonal(H), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(claim.covariance_diagonal, G.pow(2).mean(0), rtol=1e-9,
                               atol=1e-12)
    # with padding the batch loss weighs the samples differently: the Hessian of the mean
    # per-sample loss (above) is not HessianOperator(model, None, batches)'s
    batch_loss_diagonal = torch.diagonal(
        le.HessianOperator(model, None, batches) @ torch.eye(H.shape[0], dtype=torch.float64))
    assert float((batch_loss_diagonal - torch.diagonal(H)).norm()) > 1e-3 * float(H.norm())
    top = le.gradient_in_top_hessian_subspace(model, None, batches, k=2,
                                              eigsh_kwargs={"tol": 1e-10})
    evals, evecs = torch.linalg.eigh(H)
    torch.testing.assert_close(top.hessian_eigenvalues, evals.flip(0)[:2], rtol=1e-8, atol=1e-10)
    g = G.mean(0)
    V = evecs[:, -2:]
    assert top.gradient_fraction == pytest.approx(float((V.T @ g).pow(2).sum() / g.pow(2).sum()),
                                                  rel=1e-6)
    assert model.training


def test_errors_of_the_own_loss_gradient_geometry(own_loss_problem):
    model, batches, _, _ = own_loss_problem
    for method in ("kronecker", "gram"):
        with pytest.raises(ValueError, match=f"method='{method}' takes the layer factors .* "
                                             f"loss_fn=None .* use method='jvp'"):
            le.gradient_covariance_svd(model, None, batches, k=2, method=method)
    with pytest.raises(ValueError, match="batch 0 is a dict for model\\(\\*\\*batch\\) without "
                                         "targets: pass loss_fn=None"):
        le.per_sample_gradients(model, nn.CrossEntropyLoss(reduction="none"), batches)
    ragged = dict(batches[0], attention_mask=torch.ones(2, SEQ))
    with pytest.raises(ValueError, match=r"an input of shape \(2, 5\) does not have the batch's 3 "
                                         r"samples"):
        le.per_sample_gradients(model, None, ragged)
    logits_only = nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, VOCAB)).double()
    with pytest.raises(ValueError, match=r"per_sample_gradients: loss_fn=None needs a model that "
                                         r"returns its batch-mean loss .* shape \(1, 5, 7\)"):
        le.per_sample_gradients(logits_only, None, {"input": batches[0]["input_ids"]})


# ------------------------------------------------------------------------------------------------
# the optimizers' curvature closures, SharpnessTracker and curvature_stats with loss_fn=None
# ------------------------------------------------------------------------------------------------


def test_curvature_closures_on_the_models_own_loss():
    from landscape_lab.optim import HybridHessianSGD, SharpnessTracker, hessian_closure
    from landscape_lab.training import curvature_stats

    torch.manual_seed(2)
    model = HFStyleLM(shift=True).double()
    batch = _batches((4,), padded=True)[0]
    evals, evecs = torch.linalg.eigh(_dense_batch_hessian(model, batch))
    model.train()
    record = SharpnessTracker(every=1, max_matvecs=80, tol=1e-10).on_step(0, model, None, batch,
                                                                          lr=0.1)
    assert record["lambda_max"] == pytest.approx(float(evals[-1]), rel=1e-7)
    stats, _ = curvature_stats(model, None, batch, k=1, tol=1e-10, max_matvecs=80, grad_k=2)
    assert stats["lambda_max"] == pytest.approx(float(evals[-1]), rel=1e-7)
    assert stats["n_samples"] == 4 and stats["grad_k"] == 2
    # one hybrid step: w - lr (g + mu s u), u the top eigenvector by |lambda|
    top = int(evals.abs().argmax())
    u = evecs[:, top]
    params = list(model.parameters())
    opt = HybridHessianSGD(params, lr=0.1, mu=0.3, every=1, max_matvecs=80, tol=1e-10)
    opt.zero_grad()
    model(**batch).loss.backward()
    w0 = torch.cat([p.detach().reshape(-1) for p in params])
    g = torch.cat([p.grad.reshape(-1) for p in params])
    s = 1.0 if float(u @ g) >= 0 else -1.0
    opt.step(curvature_closure=hessian_closure(model, None, batch))
    assert opt.eigenvalue == pytest.approx(float(evals[top]), rel=1e-7)
    w1 = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(w1, w0 - 0.1 * (g + 0.3 * s * u), rtol=0, atol=1e-7)
    assert model.training


def test_ggn_own_loss_with_a_nan_weight_says_not_finite():
    # issue 26 (third-party item 3): it said the loss "is not a cross-entropy that the operator
    # recognises"; HessianOperator checks finiteness first, and so does the GGN now
    torch.manual_seed(0)
    model = HFStyleLM(shift=True).double()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    op = le.GGNOperator(model, None, _batches((4,))[0])
    with pytest.raises(FloatingPointError, match=r"GGNOperator: the model's loss is not finite "
                                                 r"\(1 NaN/Inf value\(s\)\) on batch 0"):
        op @ torch.zeros(op.d, dtype=torch.float64)
