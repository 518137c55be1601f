"""Models that compute their own loss (issue 14, item 3): ``loss_fn=None`` and dict batches
``model(**batch)``, the HuggingFace convention (``outputs.loss``, ``outputs.logits``)."""
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
    (or a dict with the same keys); a causal self-attention layer in the middle."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.as_dict = as_dict
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.layer = nn.TransformerEncoderLayer(WIDTH, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids, labels=None, attention_mask=None):
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
        logits = self.head(self.layer(self.emb(input_ids), src_mask=causal, is_causal=True))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        if self.as_dict:
            return {"loss": loss, "logits": logits}
        return types.SimpleNamespace(loss=loss, logits=logits)


def _batches(sizes=(3, 2)):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (n, SEQ), generator=g),
             "labels": torch.randint(0, VOCAB, (n, SEQ), generator=g)} for n in sizes]


def _dense_batch_hessian(model, batch):
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    sizes = [p.numel() for p in params.values()]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss_of(t):
        pd = {n: c.reshape(params[n].shape) for n, c in zip(names, torch.split(t, sizes))}
        out = functional_call(model, pd, args=(), kwargs=batch)
        return out["loss"] if isinstance(out, dict) else out.loss

    from torch.nn.attention import SDPBackend, sdpa_kernel
    model.eval()
    with sdpa_kernel([SDPBackend.MATH]):
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
    with pytest.raises(ValueError, match="GGNOperator: loss_fn=None"):
        le.GGNOperator(model, None, _batches())
    with pytest.raises(TypeError, match="loss_fn must be callable or None"):
        le.HessianOperator(model, "not a loss", _batches())
    bad = le.HessianOperator(model, None, _batches(), batch_size=lambda batch: -1)
    with pytest.raises(ValueError, match="batch_size must return a sample count >= 0, got -1"):
        bad @ torch.zeros(bad.d, dtype=torch.float64)
