"""Reports: one model (every section, files exist and parse, numbers match the dense Hessian),
the notes for missing inputs, the models moved back to their device, HTML, and the sweep report
from synthetic measurements."""
import json

import numpy as np
import pytest
import torch

from landscape_lab import report
from landscape_lab.data import gaussian_mixture
from landscape_lab.models import MLP
from landscape_lab.report import ReportConfig, model_report, sweep_report
from landscape_lab.training import CurvatureCallback, MetricsCallback, TrainConfig, train


def _strict(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ds = gaussian_mixture(n=120, ambient_dim=6, intrinsic_dim=3, n_classes=3, seed=0, noise=0.1)
    out = tmp_path_factory.mktemp("train")
    log = out / "log.jsonl"
    a = MLP(6, 5, 1, 3, seed=0)
    train(a, ds, TrainConfig(epochs=1, batch_size=30, lr=0.5), log_path=log, progress=False,
          callbacks=[MetricsCallback(every_steps=2, every_epochs=None),
                     CurvatureCallback(every_steps=2, n_samples=30, k=2)])
    b = MLP(6, 5, 1, 3, seed=1)
    train(b, ds, TrainConfig(epochs=1, batch_size=30, lr=0.5, seed=1), progress=False)
    return ds, a, b, log


CFG = dict(n_samples=40, k=4, tol=1e-8, trace_matvecs=9, slq_steps=12, slq_probes=3,
           grad_samples=30, barrier_points=5, progress=False)


def test_model_report_all_sections(trained, tmp_path):
    ds, a, b, log = trained
    params = [p.detach().clone() for p in a.parameters()]
    res = model_report(a, ds, tmp_path, config=ReportConfig(**CFG, format="both"),
                       train_log=log, model_b=b, context={"note": "test"})
    assert all(torch.equal(p, q) for p, q in zip(params, a.parameters()))
    r = _strict(tmp_path / "results.json")
    for key in ("topk", "trace", "esd", "blocks", "gradients", "training", "barrier", "metrics"):
        assert key in r, key
    for name in ("topk.png", "esd.png", "blocks.png", "gradient_spectrum.png",
                 "lambda_max_training.png", "barrier.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 5000, name
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    for title in ("Top Hessian eigenvalues", "Trace", "Spectral density", "Blockwise spectra",
                  "Gradient covariance", "Sharpness over training", "Loss barrier"):
        assert title in md and title in html
    assert "figures/esd.png" in md
    # numbers: top-k against the dense Hessian of the measurement batch
    x, y = ds.subset(40, "train", seed=0)
    flat = torch.cat([p.detach().double().reshape(-1) for p in a.parameters()])
    a64 = MLP(6, 5, 1, 3).double()
    names = [n for n, _ in a.named_parameters()]
    shapes = [p.shape for p in a.parameters()]

    def f(v):
        d, i = {}, 0
        for n, s in zip(names, shapes):
            d[n] = v[i:i + s.numel()].reshape(s)
            i += s.numel()
        return torch.nn.functional.cross_entropy(torch.func.functional_call(a64, d, (x.double(),)), y)

    dense = torch.autograd.functional.hessian(f, flat)
    ev = torch.linalg.eigvalsh(dense).flip(0)
    np.testing.assert_allclose(r["topk"]["eigenvalues"], ev[:4].numpy(), rtol=1e-4)
    assert all(r["topk"]["converged"])
    assert abs(r["trace"]["estimate"] - ev.sum().item()) <= 5 * r["trace"]["stderr"] + 1e-6
    assert r["barrier"]["height"] == pytest.approx(max(
        l - ((1 - t) * r["barrier"]["losses"][0] + t * r["barrier"]["losses"][-1])
        for t, l in zip(r["barrier"]["ts"], r["barrier"]["losses"])))
    g = r["gradients"]
    assert g["available"] and 0 < g["rank"]["effective_rank"] <= 30
    assert len(r["training"]["lambda_max"]) >= 3
    assert r["training"]["eos_threshold"] == pytest.approx(4.0)
    assert set(res.figures) == {"topk", "esd", "blocks", "gradients", "training", "barrier"}
    _check_blocks(r, dense, ev)


def _check_blocks(r, dense, ev):
    """The blockwise section of the MLP (preset "kinds": the hidden layer is "mlp", the last
    Linear "head") against the diagonal blocks of the dense Hessian."""
    b = r["blocks"]
    assert b["preset"] == "kinds" and b["names"] == ["mlp", "head"]
    assert b["parameters"] == {"mlp": ["1.weight", "1.bias"], "head": ["3.weight", "3.bias"]}
    index = {"mlp": slice(0, 35), "head": slice(35, 53)}
    assert b["sizes"] == {"mlp": 35, "head": 18} and b["covers_all"]
    for name, idx in index.items():
        block = dense[idx, idx]
        assert b["lambda_max"][name] == pytest.approx(
            float(torch.linalg.eigvalsh(block)[-1]), rel=1e-4, abs=1e-6)
        exact = float(block.trace()) / block.shape[0]
        # the block is smaller than the Lanczos steps: each probe's quadrature is exact, the
        # estimate's only error is the probes' (Rademacher) sampling error
        assert abs(b["trace_per_dim"][name] - exact) <= 5 * b["trace_per_dim_stderr"][name] + 1e-6
    # interlacing: no diagonal block is sharper than the whole Hessian
    assert max(b["lambda_max"].values()) <= float(ev[0]) * (1 + 1e-6)
    js = b["js_distance"]
    assert js["mlp"]["mlp"] == pytest.approx(0, abs=1e-6) and 0 < js["mlp"]["head"] <= 1


def test_report_without_optional_inputs(trained, tmp_path):
    ds, a, _, _ = trained
    res = model_report(a, ds, tmp_path, config=ReportConfig(**CFG))
    r = res.results
    assert r["gradients"]["available"] is True and "gradients" in res.figures
    assert "barrier" not in r and "training" not in r
    assert any("--checkpoint-b" in n for n in r["notes"])
    assert any("--train-log" in n for n in r["notes"])
    md = (tmp_path / "report.md").read_text()
    assert "## Notes" in md and "## Loss barrier" not in md


def _record_moves(models, moves, monkeypatch):
    """Make ``.to(device)`` of the models ``{name: model}`` append ``(name, device)`` to
    ``moves`` (copies of them, and every other module, move unrecorded)."""
    real_to = torch.nn.Module.to
    names = {id(m): name for name, m in models.items()}

    def to(self, *args, **kwargs):
        if id(self) in names:
            moves.append((names[id(self)], torch.device(args[0])))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)


def test_model_report_moves_the_models_back(trained, tmp_path, monkeypatch):
    """model_report moves both models to config.device and back to where they were, also when
    a section raises (on a CUDA machine the move is a real one)."""
    import landscape_ext

    ds, a, b, _ = trained
    home = torch.device("cpu")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    moves = []
    _record_moves({"a": a, "b": b}, moves, monkeypatch)
    params = [p.detach().clone() for p in list(a.parameters()) + list(b.parameters())]
    cfg = ReportConfig(**{**CFG, "device": str(dev), "sections": ("trace", "barrier")})
    res = model_report(a, ds, tmp_path / "ok", config=cfg, model_b=b)
    assert "barrier" in res.results
    assert moves == [("a", dev), ("b", dev), ("a", home), ("b", home)]
    after = list(a.parameters()) + list(b.parameters())
    assert all(p.device == home and torch.equal(p, q) for p, q in zip(after, params))

    def fail(*args, **kwargs):
        raise RuntimeError("trace failed")

    monkeypatch.setattr(landscape_ext, "trace", fail)
    moves.clear()
    with pytest.raises(RuntimeError, match="trace failed"):
        model_report(a, ds, tmp_path / "fail", config=cfg, model_b=b)
    assert moves == [("a", dev), ("a", home), ("b", home)]
    assert all(p.device == home for p in after)


def test_report_sections_subset_and_ggn(trained, tmp_path):
    ds, a, _, _ = trained
    res = model_report(a, ds, tmp_path, config=ReportConfig(
        **{**CFG, "sections": ("topk", "trace", "blocks"), "operator": "ggn", "tol": 1e-6,
           "blocks": {"first": ["1.weight"], "last": ["3.weight", "3.bias"]}}), stem="spec")
    assert res.report_path.endswith("spec.md")
    assert set(res.results) >= {"topk", "trace", "blocks"} and "esd" not in res.results
    assert res.results["operator"] == "ggn" and all(res.results["topk"]["converged"])
    assert res.results["trace"]["estimate"] > 0   # the Gauss-Newton matrix is PSD
    b = res.results["blocks"]
    assert b["preset"] == "custom" and b["sizes"] == {"first": 30, "last": 18}
    assert not b["covers_all"] and min(b["lambda_max"].values()) > 0    # PSD blocks
    for blocks, match in (("nope", "preset must be one of"), ({"x": ["9.weight"]}, "9.weight")):
        with pytest.raises(ValueError, match=match):
            model_report(a, ds, tmp_path, config=ReportConfig(**{**CFG, "blocks": blocks}))


def _synthetic(rank_values, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, (w, d) in enumerate([(w, d) for d in (1, 2, 3) for w in (8, 16, 32)]):
        sn = 2.0 * w ** 0.5 * np.exp(0.3 * d) * np.exp(rng.normal(0, 0.02))
        rank = rank_values[i % len(rank_values)]
        out.append(dict(kind="measurement", cell=f"g|sgd|w{w}|d{d}|s0", epoch=1,
                        dataset="g", optimizer="sgd", width=w, depth=d, n_params=100 * w,
                        spectral_norm=sn, trace=sn * 10, grad_effective_rank=rank,
                        phi=0.01 * rank, data_dim=8, train_acc=0.9, test_acc=0.8 - 0.001 * rank,
                        gen_gap=0.1 + 0.001 * rank))
    return out


def test_sweep_report_from_measurements(tmp_path):
    from landscape_lab.scaling import fit_scaling_law

    meas = _synthetic([20, 60, 150, 300])
    fit = fit_scaling_law([m["width"] for m in meas], [m["depth"] for m in meas],
                          [m["spectral_norm"] for m in meas], n_bootstrap=200)
    assert fit.alpha == pytest.approx(0.5, abs=0.05) and fit.beta == pytest.approx(0.3, abs=0.05)
    path = sweep_report(meas, tmp_path, fits={"g|sgd": fit}, fmt="both")
    text = path.read_text()
    assert "alpha in (0, 1) is supported" in text and "beta > 0 is supported" in text
    assert "Below rank 100" in text
    for f in ("scaling_law.png", "phi_grid.png", "gap_vs_rank.png"):
        assert (tmp_path / "figures" / f).stat().st_size > 5000
    assert (tmp_path / "sweep_report.html").exists()
    low = report._rank_verdict(np.array([5.0, 10, 20]), np.array([0.1, 0.2, 0.3]))
    assert "cannot be tested" in low
    no_rank = [{k: v for k, v in m.items() if k not in ("grad_effective_rank", "phi")}
               for m in meas]
    text = sweep_report(no_rank, tmp_path / "b").read_text()
    assert "No gradient ranks" in text and "No scaling-law fit" in text


# ---- the transformer examples ------------------------------------------------------------------

from landscape_lab.data import DataFileNotFoundError  # noqa: E402
from landscape_lab.report import example_config, example_report  # noqa: E402
from landscape_lab.report.transformer_examples import (TinyCausalLM, TinyViT,  # noqa: E402
                                                       markov_text, template_images,
                                                       transformer_blocks, wikitext_chars)

KINDS = ["embeddings", "attention", "mlp", "norms", "head"]


def test_markov_text_losses_match_the_samples():
    """The exact optimal and bigram losses against plug-in conditional entropies of a large
    sample (trigram and bigram counts of the generated tokens)."""
    ds = markov_text(n_train=3000, n_test=10, seq_len=24, vocab_size=4, branching=2, seed=3)
    seq = torch.cat([ds.x_train, ds.y_train[:, -1:]], 1)
    assert torch.equal(ds.x_train[:, 1:], ds.y_train[:, :-1]) and ds.task == "language_model"

    def conditional_entropy(context_len):
        counts = torch.zeros((4,) * (context_len + 1), dtype=torch.float64)
        for t in range(context_len, seq.shape[1]):
            idx = tuple(seq[:, t - context_len + j] for j in range(context_len + 1))
            counts.index_put_(idx, torch.ones(seq.shape[0], dtype=torch.float64), accumulate=True)
        p = counts / counts.sum()
        cond = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        return float(-(p * torch.log(cond.clamp_min(1e-300))).sum())

    info = ds.info
    assert conditional_entropy(2) == pytest.approx(info["entropy_rate"], abs=0.01)
    assert conditional_entropy(1) == pytest.approx(info["bigram_loss"], abs=0.01)
    assert info["entropy_rate"] < info["optimal_loss"] < info["bigram_loss"]
    assert info["optimal_loss"] == pytest.approx(
        (info["bigram_loss"] + 23 * info["entropy_rate"]) / 24)
    with pytest.raises(ValueError, match="branching=5, vocab_size=4"):
        markov_text(vocab_size=4, branching=5)


def test_template_images_and_their_bayes_ceiling():
    easy = template_images(n_train=40, n_test=200, signal=1.0, seed=1)
    hard = template_images(n_train=40, n_test=2000, signal=1e-3, seed=1)
    assert easy.x_train.shape == (40, 3, 32, 32) and easy.n_classes == 10
    labels = torch.cat([easy.y_train, easy.y_test])
    assert torch.bincount(labels, minlength=10).tolist() == [24] * 10   # balanced labels
    assert easy.info["bayes_accuracy"] == 1.0
    assert hard.info["bayes_accuracy"] == pytest.approx(0.1, abs=0.03)   # chance
    with pytest.raises(ValueError, match="signal=0"):
        template_images(signal=0)


@pytest.mark.parametrize("folder, suffix", [("wikitext-2", "tokens"), ("wikitext-2-raw", "raw")])
def test_wikitext_chars_reads_characters(tmp_path, folder, suffix):
    d = tmp_path / folder
    d.mkdir()
    (d / f"wiki.train.{suffix}").write_text("abab\nabcabx" * 3, encoding="utf-8")
    (d / f"wiki.valid.{suffix}").write_text("abzab\n", encoding="utf-8")
    ds = wikitext_chars(tmp_path, seq_len=4, n_train=3, n_test=5, max_vocab=4)
    # vocabulary: <unk> plus the 3 most frequent training characters a, b, \n (c, x: <unk>)
    assert ds.n_classes == 4 and ds.info["characters_head"] == "ab\n"
    assert ds.x_train.shape == (3, 4) and ds.x_test.shape == (1, 4)
    assert ds.x_train[0].tolist() == [1, 2, 1, 2] and ds.y_train[0].tolist() == [2, 1, 2, 3]
    assert ds.x_test[0].tolist() == [1, 2, 0, 1]                 # z is unknown
    (d / f"wiki.valid.{suffix}").unlink()
    with pytest.raises(DataFileNotFoundError) as ei:
        wikitext_chars(tmp_path, seq_len=4)
    assert f"wiki.valid.{suffix}" in str(ei.value) and str(d) in str(ei.value)
    with pytest.raises(DataFileNotFoundError, match="wiki.train.tokens"):
        wikitext_chars(tmp_path / "elsewhere", seq_len=4)
    with pytest.raises(ValueError, match="max_vocab=1"):
        wikitext_chars(tmp_path, max_vocab=1)


def test_example_settings_merge_quick_and_overrides():
    from landscape_lab.report.examples import example_settings

    ex = example_settings("tiny-lm", {"width": 16, "data": {"vocab_size": 5}}, quick=True)
    assert ex["width"] == 16 and ex["depth"] == 1 and "quick" not in ex
    assert ex["data"] == {"n_train": 64, "n_test": 16, "seq_len": 8, "vocab_size": 5,
                          "branching": 2}
    assert example_config("digits-mlp", quick=True, k=2).n_samples == 64
    assert example_config("digits-mlp").n_samples == ReportConfig().n_samples
    assert example_config("vit", tol=1e-3).k == 8 and "quick" in report.EXAMPLES["vit"]
    with pytest.raises(ValueError, match="unknown example 'lm'"):
        example_settings("lm")


def test_tiny_models_and_their_blocks():
    lm = TinyCausalLM(7, width=8, depth=1, heads=2, max_len=6, seed=0)
    tokens = torch.randint(0, 7, (2, 6), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 7
    with torch.no_grad():
        a, b = lm(tokens), lm(changed)
    assert a.shape == (2, 6, 7)
    torch.testing.assert_close(a[:, :4], b[:, :4])                # causal: the past ignores t=4
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    assert list(transformer_blocks(lm)) == KINDS
    vit = TinyViT(16, 8, 3, 5, width=8, depth=1, heads=2, pool="cls", seed=0)
    blocks = transformer_blocks(vit)
    assert list(blocks) == KINDS
    assert blocks["embeddings"] == ["patch.weight", "patch.bias", "cls", "pos"]
    assert sum(len(v) for v in blocks.values()) == len(list(vit.parameters()))
    assert vit(torch.randn(3, 3, 16, 16)).shape == (3, 5)
    with pytest.raises(ValueError, match="width = 9 is not divisible by heads = 2"):
        TinyCausalLM(5, width=9, heads=2)


def _quick(name, out, **kw):
    sections = kw.pop("sections", None)
    cfg = example_config(name, quick=True, progress=False,
                         **({"sections": sections} if sections else {}))
    return example_report(name, out, config=cfg, quick=True, **kw)


@pytest.mark.parametrize("name", ["tiny-lm", "vit"])
def test_transformer_example_reports(name, tmp_path):
    res = _quick(name, tmp_path)
    r = res.results
    assert {"topk", "trace", "esd", "blocks", "gradients", "training", "barrier"} <= set(r)
    b = r["blocks"]
    assert b["names"] == KINDS and sum(b["sizes"].values()) == r["n_params"]
    assert all(np.isfinite(list(b["lambda_max"].values())))
    assert max(b["lambda_max"].values()) <= r["topk"]["eigenvalues"][0] * (1 + 1e-2)
    assert (tmp_path / "figures" / "blocks.png").stat().st_size > 5000
    md = (tmp_path / "report.md").read_text()
    assert "## Blockwise spectra" in md and "figures/blocks.png" in md
    known = "best possible loss" if name == "tiny-lm" else "Bayes (nearest-template)"
    assert known in md
    assert not (tmp_path / "checkpoints").exists()   # no build_model spec for these models


def test_transformer_examples_read_data_dir(tmp_path):
    from test_data import _write_cifar10

    _write_cifar10(tmp_path / "cifar" / "cifar-10-batches-py", n_per=4)
    few = ("topk", "blocks")
    r = _quick("vit", tmp_path / "v", data_dir=tmp_path / "cifar", sections=few).results
    assert r["dataset"] == "cifar10" and r["blocks"]["names"] == KINDS
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    (wiki / "wiki.train.tokens").write_text(" = Title = \n the cat sat on the mat . \n" * 20)
    (wiki / "wiki.valid.tokens").write_text(" the dog sat on the cat . \n" * 5)
    r = _quick("tiny-lm", tmp_path / "l", data_dir=wiki, sections=few).results
    assert r["dataset"] == "wikitext2-chars"
    assert (tmp_path / "l" / "figures" / "blocks.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    for name, missing in (("vit", "data_batch_1"), ("tiny-lm", "wiki.train.tokens")):
        with pytest.raises(DataFileNotFoundError) as ei:
            _quick(name, tmp_path / "x", data_dir=empty, sections=few)
        assert missing in str(ei.value) and str(empty) in str(ei.value)
    with pytest.raises(ValueError, match="example 'digits-mlp' reads no files"):
        _quick("digits-mlp", tmp_path / "x", data_dir=empty)
