"""Training loop and callbacks: JSON-lines log, curvature statistics against the dense Hessian,
gradient rank with and without landscape_ext.gradients, checkpoints, determinism."""
import json
import math

import pytest
import torch

from landscape_lab import training
from landscape_lab.data import gaussian_mixture, load_wikitext2
from landscape_lab.models import MLP, CausalTransformerLM
from landscape_lab.training import (CheckpointCallback, CurvatureCallback, MetricsCallback,
                                    TrainConfig, curvature_stats, load_checkpoint, read_jsonl,
                                    save_checkpoint, train)


@pytest.fixture(scope="module")
def tiny():
    return gaussian_mixture(n=120, ambient_dim=6, intrinsic_dim=3, n_classes=3, seed=0,
                            noise=0.1)


def _model(ds, seed=0, width=4):
    return MLP(6, width=width, depth=1, n_classes=ds.n_classes, seed=seed)


def _dense_hessian(model, loss_fn, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    m64 = MLP(6, width=model.width, depth=model.depth, n_classes=model.n_classes).double()

    def f(flat):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            out[n] = flat[i:i + k].reshape(s)
            i += k
        return loss_fn(torch.func.functional_call(m64, out, (x.double(),)), y)

    return torch.autograd.functional.hessian(f, flat0)


def test_train_log_and_curvature_against_dense_hessian(tiny, tmp_path):
    model = _model(tiny)
    log = tmp_path / "log.jsonl"
    cfg = TrainConfig(epochs=1, batch_size=30, lr=0.2, momentum=0.5, seed=0)
    res = train(model, tiny, cfg, progress=False, log_path=log, callbacks=[
        MetricsCallback(every_steps=3, every_epochs=None),
        CurvatureCallback(every_steps=3, n_samples=40, k=2, trace_matvecs=6, grad_k=5,
                          tol=1e-6)])
    recs = read_jsonl(log)
    assert [r["kind"] for r in recs][0] == "config" and recs[-1]["kind"] == "end"
    assert recs == res.history
    cfg_rec = recs[0]
    assert cfg_rec["eos_threshold"] == pytest.approx(2 * 1.5 / 0.2)
    assert cfg_rec["n_params"] == 6 * 4 + 4 + 4 * 3 + 3
    assert res.steps == math.ceil(tiny.n_train / 30)
    curv = res.records("curvature")
    met = res.records("metrics")
    assert curv[0]["step"] == 0 and curv[-1]["step"] == res.steps
    assert {r["step"] for r in curv} == {0, 3} | {res.steps}
    for r in curv:
        assert len(r["top_eigenvalues"]) == 2 and all(r["converged"])
        assert r["trace_stderr"] is None or r["trace_stderr"] >= 0
        assert 0 < r["grad_effective_rank"] <= 5 + 1e-9
    assert all(0 <= r["train_acc"] <= 1 for r in met)
    # the last lambda_max is the top eigenvalue of the Hessian on the measurement batch
    x, y = tiny.subset(40, "train", seed=0)
    H = _dense_hessian(model, torch.nn.CrossEntropyLoss(), x, y)
    ev = torch.linalg.eigvalsh(H)
    assert curv[-1]["lambda_max"] == pytest.approx(ev[-1].item(), rel=1e-4)
    assert curv[-1]["top_eigenvalues"][1] == pytest.approx(ev[-2].item(), rel=1e-3)
    assert curv[-1]["trace"] == pytest.approx(ev.sum().item(), abs=6 * max(
        curv[-1]["trace_stderr"] or 0, 1e-3 * abs(ev.sum().item())))
    for line in log.read_text().splitlines():   # strict JSON (no NaN)
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def test_curvature_stats_leaves_model_unchanged_and_gradients_optional(tiny, monkeypatch):
    model = _model(tiny)
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    batch = tiny.subset(30)
    stats, vecs = curvature_stats(model, torch.nn.CrossEntropyLoss(), batch, k=1,
                                  spectral_norm=True, trace_matvecs=3, grad_k=3,
                                  per_sample_loss=torch.nn.CrossEntropyLoss(reduction="none"))
    assert model.training and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert stats["spectral_norm"] >= abs(stats["lambda_max"]) * (1 - 1e-3)
    assert vecs.shape == (stats["n_params"], 1)
    assert "grad_effective_rank" in stats
    stats2, _ = curvature_stats(model, torch.nn.CrossEntropyLoss(), batch, k=1, grad_k=0,
                                per_sample_loss=torch.nn.CrossEntropyLoss(reduction="none"))
    assert "grad_effective_rank" not in stats2 and stats2["lambda_max"] > 0


def test_training_is_deterministic_and_checkpoints_roundtrip(tiny, tmp_path):
    a, b = _model(tiny, seed=3), _model(tiny, seed=3)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, seed=7, max_steps=5)
    ra = train(a, tiny, cfg, progress=False,
               callbacks=[CheckpointCallback(tmp_path / "cks", every_steps=2, every_epochs=None,
                                             at_start=False)])
    train(b, tiny, cfg, progress=False)
    assert ra.steps == 5
    assert sorted(p.name for p in (tmp_path / "cks").glob("*.pt")) == [
        "step2.pt", "step4.pt", "step5.pt"]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    path = save_checkpoint(tmp_path / "ck" / "a.pt", a, dataset="gaussian", note=float("nan"))
    m, meta = load_checkpoint(path)
    assert meta["dataset"] == "gaussian" and meta["note"] is None
    for p, q in zip(a.parameters(), m.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_non_finite_loss_stops_with_the_step(tiny):
    bad = tiny.__class__(**{**tiny.__dict__, "x_train": tiny.x_train * float("nan")})
    with pytest.raises(FloatingPointError, match="step 1"):
        train(_model(tiny), bad, TrainConfig(epochs=1), progress=False)


def test_adam_has_no_eos_line_and_language_model_trains(tmp_path):
    assert training.eos_threshold("adam", 1e-3) is None
    d = tmp_path / "wt"
    d.mkdir()
    text = " the cat sat on the mat . \n the dog sat on the cat . \n"
    for f in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        (d / f).write_text(text * 2)
    ds = load_wikitext2(d, seq_len=4)
    lm = CausalTransformerLM(ds.n_classes, width=8, depth=1, heads=2, max_len=4, seed=0)
    res = train(lm, ds, TrainConfig(epochs=1, batch_size=4, optimizer="adam", lr=1e-2),
                progress=False, callbacks=[MetricsCallback(),
                                           CurvatureCallback(every_steps=None, n_samples=4,
                                                             k=1, at_start=False)])
    curv = res.records("curvature")
    assert len(curv) == 1 and math.isfinite(curv[0]["lambda_max"])
    assert 0 <= res.records("metrics")[-1]["test_acc"] <= 1


def test_a_callback_stops_training(tiny):
    """state.stop from on_epoch_end ends training after that epoch; from on_step_end after that
    step; the on_train_end hooks still run."""
    from landscape_lab.training import Callback

    class StopAt(Callback):
        def __init__(self, epoch=None, step=None):
            super().__init__(at_start=False, at_end=False)
            self.epoch, self.step, self.ended = epoch, step, False

        def on_epoch_end(self, state):
            state.stop = state.stop or state.epoch == self.epoch

        def on_step_end(self, state):
            state.stop = state.stop or state.step == self.step

        def on_train_end(self, state):
            self.ended = True

    per_epoch = math.ceil(tiny.n_train / 30)
    cb = StopAt(epoch=2)
    res = train(_model(tiny), tiny, TrainConfig(epochs=5, batch_size=30), callbacks=[cb],
                progress=False)
    assert (res.epochs, res.steps, cb.ended) == (2, 2 * per_epoch, True)
    res = train(_model(tiny), tiny, TrainConfig(epochs=5, batch_size=30),
                callbacks=[StopAt(step=per_epoch + 1)], progress=False)
    assert res.steps == per_epoch + 1
