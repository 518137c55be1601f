"""Models of landscape_lab: parameter counts, seeds, shapes, attention variants, specs."""
import pytest
import torch
from torch import nn

from landscape_lab import models
from landscape_lab.models import (MLP, CausalTransformerLM, ResNet, ViT, build_model, model_spec,
                                  n_params, sequence_cross_entropy)


def test_mlp_parameter_count_and_shape():
    m = MLP(in_dim=7, width=5, depth=3, n_classes=4, seed=0)
    # 7*5+5 + 2*(5*5+5) + 5*4+4
    assert n_params(m) == 40 + 60 + 24
    assert m(torch.randn(3, 7)).shape == (3, 4)
    assert m(torch.randn(3, 1, 7)).shape == (3, 4)  # flattened
    assert n_params(MLP(7, 5, 0, 4)) == 7 * 4 + 4
    assert isinstance(m, nn.Sequential)
    with pytest.raises(ValueError, match="depth"):
        MLP(7, 5, -1, 4)
    with pytest.raises(ValueError, match="activation"):
        MLP(7, 5, 1, 4, activation="nope")


def test_seed_fixes_init_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = MLP(6, 8, 2, 3, seed=5)
    after = torch.rand(3)
    assert torch.equal(before, after)  # global RNG untouched by the seeded init
    b = MLP(6, 8, 2, 3, seed=5)
    c = MLP(6, 8, 2, 3, seed=6)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_resnet_width_and_depth():
    x = torch.randn(2, 3, 16, 16)
    small = ResNet(depth=1, width=4, n_classes=5, seed=0)
    assert small(x).shape == (2, 5)
    wide = ResNet(depth=1, width=8, n_classes=5, seed=0)
    deep = ResNet(depth=2, width=4, n_classes=5, seed=0)
    assert n_params(wide) > 3 * n_params(small)       # ~ width^2
    assert n_params(deep) > 1.5 * n_params(small)
    assert any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ResNet(1, 4, norm=False).modules())


def test_vit_shapes_and_sdpa_matches_plain():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    a = ViT(image_size=8, patch_size=4, in_channels=1, width=16, depth=1, heads=2, n_classes=3,
            seed=1)
    b = ViT(image_size=8, patch_size=4, in_channels=1, width=16, depth=1, heads=2, n_classes=3,
            attention="sdpa", seed=1)
    assert a(x).shape == (2, 3)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="patch_size"):
        ViT(image_size=10, patch_size=4)


def test_causal_lm_is_causal_and_plain_equals_sdpa():
    lm = CausalTransformerLM(vocab_size=11, width=16, depth=2, heads=2, max_len=6, seed=0)
    lm2 = CausalTransformerLM(vocab_size=11, width=16, depth=2, heads=2, max_len=6,
                              attention="sdpa", seed=0)
    tok = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    out = lm(tok)
    assert out.shape == (3, 6, 11)
    torch.testing.assert_close(out, lm2(tok), rtol=1e-5, atol=1e-5)
    tok2 = tok.clone()
    tok2[:, 4:] = (tok2[:, 4:] + 1) % 11   # change the future
    torch.testing.assert_close(lm(tok2)[:, :4], out[:, :4])
    assert not torch.allclose(lm(tok2)[:, 4:], out[:, 4:])
    with pytest.raises(ValueError, match="max_len"):
        lm(torch.zeros(1, 7, dtype=torch.long))
    loss = sequence_cross_entropy(out, tok)
    per = sequence_cross_entropy(out, tok, reduction="none")
    assert loss.dim() == 0 and per.shape == (3,)
    torch.testing.assert_close(per.mean(), loss)


def test_plain_attention_supports_forward_mode_ad():
    lm = CausalTransformerLM(vocab_size=7, width=8, depth=1, heads=2, max_len=4, seed=0)
    tok = torch.randint(0, 7, (2, 4))
    params = {k: v.detach() for k, v in lm.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p):
        return torch.func.functional_call(lm, p, (tok,)).sum()

    _, jvp = torch.func.jvp(f, (params,), (tangents,))
    assert torch.isfinite(jvp)


def test_build_model_and_spec_roundtrip():
    for m in (MLP(5, 4, 1, 3, seed=2), ResNet(1, 4, seed=2), ViT(8, 4, 1, 8, 1, 2, seed=2),
              CausalTransformerLM(9, 8, 1, 2, max_len=4, seed=2)):
        spec = model_spec(m)
        m2 = build_model(spec["name"], **spec["kwargs"])
        assert type(m2) is type(m)
        for p, q in zip(m.parameters(), m2.parameters()):
            assert torch.equal(p, q)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope")
    with pytest.raises(ValueError, match="not built"):
        model_spec(nn.Linear(2, 2))


def test_default_model_kwargs():
    kw = models.default_model_kwargs("mlp", (1, 8, 8), 10, width=4, depth=1)
    assert kw == dict(in_dim=64, n_classes=10, width=4, depth=1)
    kw = models.default_model_kwargs("vit", (1, 8, 8), 10)
    assert kw["patch_size"] == 4 and ViT(**kw)(torch.randn(1, 1, 8, 8)).shape == (1, 10)
    assert models.default_model_kwargs("vit", (3, 32, 32), 10)["patch_size"] == 8
    with pytest.raises(ValueError, match="image"):
        models.default_model_kwargs("resnet", (64,), 10)
