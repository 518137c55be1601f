"""Second-order products through torch's own attention (issue 14, item 1).

The fused SDPA kernels and the nn.MultiheadAttention fast path have no forward-mode derivative
and no double backward; the engine's products run attention on the math backend with the fast
path off, and restore the user's settings. Checked against dense float64 Hessians and GGNs
computed independently (autograd.functional under the math backend).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel

import landscape_ext as le

VOCAB, WIDTH, HEADS, SEQ = 7, 4, 2, 5

pytestmark = pytest.mark.usefixtures("single_thread")


class TinyLM(nn.Module):
    """nn.TransformerEncoder (pre-norm, GELU), causal and padding masks, tied embeddings."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(0.3 * torch.randn(SEQ, WIDTH))
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.1,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("causal", torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1))

    def forward(self, tokens, padding=None):
        h = self.emb(tokens) + self.pos[: tokens.shape[1]]
        h = self.encoder(h, mask=self.causal, src_key_padding_mask=padding, is_causal=True)
        return self.head(self.norm(h))


class MHAModel(nn.Module):
    """nn.MultiheadAttention with a key padding mask, then a linear read-out."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.out = nn.Linear(WIDTH, 3)

    def forward(self, x, padding):
        h, _ = self.attn(x, x, x, key_padding_mask=padding, need_weights=False)
        return self.out(h.mean(1))


class SDPAModel(nn.Module):
    """A hand-written causal attention block calling F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, 3)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h.transpose(1, 2).reshape(b, t, WIDTH).mean(1))


def _lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)


def _problem(name):
    torch.manual_seed(0)
    if name == "lm":
        model = TinyLM().double()
        tokens = torch.randint(0, VOCAB, (3, SEQ))
        padding = torch.zeros(3, SEQ, dtype=torch.bool)
        padding[1, -2:] = True      # the last two positions of sequence 1 are padding
        targets = torch.randint(0, VOCAB, (3, SEQ))
        targets[padding] = -100
        return model, _lm_loss, ((tokens, padding), targets)
    x = torch.randn(4, SEQ, WIDTH, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    if name == "mha":
        padding = torch.zeros(4, SEQ, dtype=torch.bool)
        padding[0, -1] = True
        return MHAModel().double(), nn.CrossEntropyLoss(), ((x, padding), y)
    return SDPAModel().double(), nn.CrossEntropyLoss(), (x, y)


def _flat_fn(model, fn):
    """``fn(model outputs)`` as a function of the flat parameter vector (the operators' layout)."""
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def of(t):
        pd = {n: c.reshape(params[n].shape) for n, c in zip(names, torch.split(t, sizes))}
        return fn(pd)

    return of, theta


def _dense(model, loss_fn, batch, kind):
    """Dense float64 Hessian or GGN of the batch loss, in eval mode on the math backend."""
    inputs, targets = batch
    model.eval()

    def outputs(pd):
        return functional_call(model, pd, tuple(inputs) if isinstance(inputs, tuple) else (inputs,))

    with sdpa_kernel([SDPBackend.MATH]):
        if kind == "hessian":
            loss_of, theta = _flat_fn(model, lambda pd: loss_fn(outputs(pd), targets))
            return torch.autograd.functional.hessian(loss_of, theta)
        out_of, theta = _flat_fn(model, outputs)
        z = out_of(theta).detach()
        J = torch.autograd.functional.jacobian(out_of, theta).reshape(z.numel(), -1)
        H_out = torch.autograd.functional.hessian(
            lambda zz: loss_fn(zz.reshape(z.shape), targets), z.reshape(-1))
        return J.T @ H_out @ J


@pytest.mark.parametrize("name", ["lm", "mha", "sdpa"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("mode", ["forward-over-reverse", "double-backward", "auto"])
def test_products_through_attention_are_exact(name, kind, mode):
    model, loss_fn, batch = _problem(name)
    dense = _dense(model, loss_fn, batch, kind)
    model.train()   # the operators evaluate in eval mode whatever the model's flag
    cls = le.HessianOperator if kind == "hessian" else le.GGNOperator
    op = cls(model, loss_fn, batch, mode=mode)
    V = torch.randn(op.d, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op @ V, dense @ V, rtol=1e-10, atol=1e-12)
    assert op.attention_backend == "math" and model.training


def test_eigsh_of_a_transformer_matches_the_dense_spectrum():
    model, loss_fn, batch = _problem("lm")
    dense = _dense(model, loss_fn, batch, "hessian")
    top = le.eigsh(le.HessianOperator(model, loss_fn, batch), k=3, tol=1e-10)
    ref = torch.linalg.eigvalsh(dense).flip(0)[:3]
    torch.testing.assert_close(top.eigenvalues, ref, rtol=1e-8, atol=1e-10)


def test_the_users_attention_settings_are_restored():
    model, loss_fn, batch = _problem("lm")
    op = le.HessianOperator(model, loss_fn, batch)
    V = torch.randn(op.d, 2, dtype=torch.float64)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):   # the user forces flash only
        out = op @ V
        assert _cur_sdpa_kernel_backends() == [SDPBackend.FLASH_ATTENTION]
    assert torch.backends.mha.get_fastpath_enabled()
    torch.testing.assert_close(out, le.HessianOperator(model, loss_fn, batch) @ V)
    # also after an exception inside the product (a NaN loss)
    bad = le.HessianOperator(model, lambda z, t: loss_fn(z, t) * float("nan"), batch)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            with pytest.raises(FloatingPointError, match="not finite"):
                bad @ V
            assert _cur_sdpa_kernel_backends() == [SDPBackend.EFFICIENT_ATTENTION]
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_gradient_geometry_through_attention():
    # forward-mode sketches (jvp) and per-sample gradients need the same attention settings
    model, _, (inputs, y) = _problem("sdpa")
    per_sample = nn.CrossEntropyLoss(reduction="none")
    exact = le.gradient_covariance_svd(model, per_sample, (inputs, y), k=2, method="materialize")
    sketched = le.gradient_covariance_svd(model, per_sample, (inputs, y), k=2, method="jvp",
                                          n_power_iter=4, seed=0)
    torch.testing.assert_close(sketched.singular_values, exact.singular_values, rtol=1e-6,
                               atol=1e-10)
    G = le.per_sample_gradients(model, per_sample, (inputs, y))
    assert G.shape == (4, sum(p.numel() for p in model.parameters()))


def test_the_public_attention_context():
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        with le.differentiable_attention() as backend:
            assert backend == "math" and _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
            assert not torch.backends.mha.get_fastpath_enabled()
        assert _cur_sdpa_kernel_backends() == [SDPBackend.FLASH_ATTENTION]
    assert torch.backends.mha.get_fastpath_enabled()
