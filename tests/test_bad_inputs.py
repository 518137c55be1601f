"""Faults and bad inputs (issue 26, items 6-12; third-party item 4): each bad input is either
handled the documented way or rejected with an error that names the argument and the numbers.

Small models (d of a few dozen), seeded; the whole file runs in a few seconds.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import landscape_ext as lx
from landscape_ext import DenseOperator, GGNOperator, HessianOperator, eigsh


class _Net(nn.Module):
    """Linear -> tanh -> Linear, not an ``nn.Sequential``: products run through autograd (the
    fused MLP path does not apply)."""

    def __init__(self, n_in: int = 4, width: int = 6, n_out: int = 3):
        super().__init__()
        self.a = nn.Linear(n_in, width)
        self.b = nn.Linear(width, n_out)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _problem(n: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    model = _Net().double()
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, nn.CrossEntropyLoss(), x, y


def _diagonal_operator(d: int = 100) -> DenseOperator:
    """A float64 diagonal operator with eigenvalues 1..d (Lanczos, not the dense solve)."""
    return DenseOperator(torch.diag(torch.arange(1.0, d + 1.0, dtype=torch.float64)))


# ------------------------------------------------------------------------------------------------
# 6 (and third-party 4): v0


def test_eigsh_v0_with_nan_is_named():
    op = _diagonal_operator()
    v0 = torch.randn(100, dtype=torch.float64)
    v0[[3, 7]] = float("nan")
    with pytest.raises(ValueError, match=r"eigsh: v0 .*2 NaN/Inf value\(s\) of 100"):
        eigsh(op, k=2, v0=v0)
    # also where the operator is small enough for the dense solve
    with pytest.raises(ValueError, match=r"eigsh: v0 .*NaN/Inf"):
        eigsh(_diagonal_operator(10), k=2, v0=torch.full((10,), float("inf")))


@pytest.mark.parametrize("shape", [(99,), (101, 2), (2, 99), (100, 1, 1)])
def test_eigsh_v0_of_wrong_shape_is_named(shape):
    op = _diagonal_operator()
    with pytest.raises(ValueError, match=rf"eigsh: v0 .*d = 100.*got shape {tuple(shape)}"
                       .replace("(", r"\(").replace(")", r"\)")):
        eigsh(op, k=2, v0=torch.randn(*shape, dtype=torch.float64))


def test_eigsh_v0_of_wrong_dtype_or_device_is_named():
    op = _diagonal_operator()
    with pytest.raises(TypeError, match=r"eigsh: v0 .*complex128"):
        eigsh(op, k=2, v0=torch.randn(100, dtype=torch.complex128))
    with pytest.raises(TypeError, match=r"eigsh: v0 .*torch.bool"):
        eigsh(op, k=2, v0=torch.ones(100, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"eigsh: v0 is on the meta device"):
        eigsh(op, k=2, v0=torch.empty(100, device="meta"))


def test_eigsh_valid_v0_forms_still_accepted():
    op = _diagonal_operator()
    top = torch.zeros(100, dtype=torch.float64)
    top[-1] = 1.0
    for v0 in (top, top[:, None], top[None, :], top.float().numpy(), top.tolist()):
        r = eigsh(op, k=1, v0=v0)
        assert abs(float(r.eigenvalues[0]) - 100.0) < 1e-8
    # spectral_norm passes v0 on and reports the same errors
    with pytest.raises(ValueError, match=r"eigsh: v0 .*d = 100"):
        lx.spectral_norm(op, v0=torch.randn(8127))


# ------------------------------------------------------------------------------------------------
# 7: an empty batch among valid ones


def test_empty_batch_is_skipped_with_a_warning(caplog):
    model, loss, x, y = _problem(24)
    data = [(x[:12], y[:12]), (x[:0], y[:0]), (x[12:], y[12:])]
    op = HessianOperator(model, loss, data)
    ref = HessianOperator(model, loss, [data[0], data[2]])
    V = torch.randn(op.d, 2, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="landscape_ext"):
        out = op @ V
        again = op @ V
    torch.testing.assert_close(out, ref @ V, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    warned = [r.getMessage() for r in caplog.records if "batch 1" in r.getMessage()]
    assert len(warned) == 1 and "no samples" in warned[0]  # once per operator, not per product
    assert op.n_samples == 24


def test_empty_batch_fingerprint_does_not_fail():
    from landscape_ext._model import DataFingerprint
    fp = DataFingerprint(ordered=True)
    fp.start()
    fp.add(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 0)
    fp.add(torch.ones(3, 4), torch.ones(3, dtype=torch.long), 3)
    assert fp.finish() and fp.n == 3


# ------------------------------------------------------------------------------------------------
# 8: complex directions


def test_complex_directions_are_rejected():
    model, loss, x, y = _problem()
    for op in (HessianOperator(model, loss, (x, y)), _diagonal_operator(51)):
        d = op.d
        with pytest.raises(TypeError, match=r"V is complex \(torch.complex128, shape \(\d+, 2\)\)"):
            op @ torch.randn(d, 2, dtype=torch.complex128)
        with pytest.raises(TypeError, match=r"V is complex"):
            op.matvec(torch.randn(d, dtype=torch.complex64))
        with pytest.raises(TypeError, match=r"V is complex"):
            op.matmat(np.ones((d, 1), dtype=np.complex128))
        with pytest.raises(TypeError, match=r"X is complex"):
            op.apply_rows(torch.randn(1, d, dtype=torch.complex128))
        assert op.n_matvecs == 0


# ------------------------------------------------------------------------------------------------
# 9: integral types other than int


def test_integral_numpy_types_are_accepted():
    op = _diagonal_operator()
    r = eigsh(op, k=np.int64(2))
    torch.testing.assert_close(r.eigenvalues, torch.tensor([100.0, 99.0], dtype=torch.float64))
    assert type(r.k) is int and r.k == 2
    assert lx.spectral_density(op, n_steps=np.int64(8), n_probes=np.int32(2)).n_probes == 2
    assert lx.trace(op, n_matvecs=np.int64(12)).n_matvecs == 12
    assert lx.diagonal(op, n_matvecs=np.uint16(4)).n_matvecs == 4
    blocks = {"first": torch.arange(50), "second": torch.arange(50, 100)}
    assert len(lx.block_eigsh(op, blocks, k=np.int64(1))["first"].eigenvalues) == 1


@pytest.mark.parametrize("k", [2.0, True, "2", 0, np.int64(-1)])
def test_non_integral_or_non_positive_k_is_still_rejected(k):
    with pytest.raises(ValueError, match=r"eigsh: k must be a positive integer, got"):
        eigsh(_diagonal_operator(), k=k)


def test_non_integral_counts_are_still_rejected():
    op = _diagonal_operator()
    with pytest.raises(ValueError, match=r"trace: n_matvecs must be an integer >= 3, got 12.0"):
        lx.trace(op, n_matvecs=12.0)
    with pytest.raises(ValueError, match=r"spectral_density: n_probes must be a positive"):
        lx.spectral_density(op, n_probes=np.float64(2))


# ------------------------------------------------------------------------------------------------
# 10: only a forward-mode AD error switches auto's route


class _FailingLoss:
    """Cross-entropy that raises a plain RuntimeError on its ``fail_on``-th call."""

    def __init__(self, fail_on: int):
        self.calls, self.fail_on = 0, fail_on

    def __call__(self, outputs, targets):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("loss service unavailable")
        return nn.functional.cross_entropy(outputs, targets)


def test_loss_error_in_forward_over_reverse_propagates():
    model, _, x, y = _problem()
    loss = _FailingLoss(fail_on=1)
    op = HessianOperator(model, loss, (x, y), cache_graph=False)
    v = torch.randn(op.d, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="loss service unavailable"):
        op @ v
    assert not op.forward_ad_broken
    out = op @ v  # the next one (auto's measurement of k = 1) still runs forward-over-reverse
    assert "forward-over-reverse" in op.mode_timings[1] and not op.forward_ad_broken
    ref = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), mode="double-backward") @ v
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_loss_error_in_the_probe_propagates():
    model, _, x, y = _problem()
    # k = 3 is probed: the double-backward graph calls the loss first, forward-over-reverse next
    loss = _FailingLoss(fail_on=2)
    op = HessianOperator(model, loss, (x, y), cache_graph=False)
    with pytest.raises(RuntimeError, match="loss service unavailable"):
        op @ torch.randn(op.d, 3, dtype=torch.float64)
    assert not op.forward_ad_broken


def test_forward_mode_errors_are_recognised():
    from landscape_ext._model import is_forward_ad_error
    assert is_forward_ad_error(NotImplementedError(
        "Trying to use forward AD with _scaled_dot_product_flash_attention that does not "
        "support it because it has not been implemented yet."))
    assert is_forward_ad_error(NotImplementedError(
        "You must implement the jvp function for custom autograd.Function to use it with "
        "forward mode AD."))
    assert is_forward_ad_error(RuntimeError(
        "vmap: It looks like you're calling .item() on a Tensor."))
    assert not is_forward_ad_error(RuntimeError("loss service unavailable"))
    assert not is_forward_ad_error(ValueError("Expected input batch_size (16) to match target "
                                              "batch_size (12)."))


# ------------------------------------------------------------------------------------------------
# 11: x / y size mismatch


@pytest.mark.parametrize("mode", ["auto", "double-backward"])
def test_batch_size_mismatch_names_the_batch(mode):
    model, loss, x, y = _problem()
    data = [(x, y), (x, y[:12])]
    op = HessianOperator(model, loss, data, mode=mode)
    with pytest.raises(ValueError, match=r"HessianOperator: batch 1: the inputs hold 16 samples "
                                         r"\(leading size\) and the targets 12"):
        op @ torch.randn(op.d, dtype=torch.float64)
    # the fused MLP path falls back to autograd for the batch and reports it the same way
    seq = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    op = GGNOperator(seq, loss, (x, y[:12]))
    with pytest.raises(ValueError, match=r"GGNOperator: batch 0: .*16 .*12"):
        op @ torch.randn(op.d, dtype=torch.float64)


def test_batch_size_mismatch_in_per_sample_gradients_names_the_batch():
    model, _, x, y = _problem()
    loss = nn.CrossEntropyLoss(reduction="none")
    data = [(x, y), (x, y[:12])]
    # before: the inputs were sliced to the targets' 12 rows and 4 samples silently dropped
    with pytest.raises(ValueError, match=r"per_sample_gradients: .*\(16, 4\) .*12 samples.* "
                                         r"on batch 1"):
        lx.per_sample_gradients(model, loss, data)
    with pytest.raises(ValueError, match=r"gradient_covariance_svd: batch 1: the inputs hold 16 "
                                         r"samples \(leading size\) and the targets 12"):
        lx.gradient_covariance_svd(model, loss, data, k=3, method="jvp")


# ------------------------------------------------------------------------------------------------
# 12: inference mode


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
@pytest.mark.parametrize("mode", ["auto", "forward-over-reverse", "double-backward",
                                  "double-backward-loop"])
def test_eigsh_under_inference_mode_matches_no_grad(cls, mode):
    model, loss, x, y = _problem()
    with torch.no_grad():
        ref = eigsh(cls(model, loss, (x, y), mode=mode), k=2)
    with torch.inference_mode():
        got = eigsh(cls(model, loss, (x, y), mode=mode), k=2)
        assert torch.is_inference_mode_enabled()
    torch.testing.assert_close(got.eigenvalues, ref.eigenvalues, rtol=1e-9, atol=1e-12)


def test_data_and_directions_made_in_inference_mode():
    model, loss, x, y = _problem()
    with torch.inference_mode():
        xi, yi, vi = x.clone(), y.clone(), torch.randn(51, 2, dtype=torch.float64)
    seq = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    for m in (model, seq):  # autograd and the fused MLP path
        ref = HessianOperator(m, loss, (x.clone(), y.clone()), mode="double-backward") @ vi.clone()
        for mode in ("auto", "double-backward", "forward-over-reverse"):
            op = HessianOperator(m, loss, [(xi, yi), (xi, yi)], mode=mode)
            torch.testing.assert_close(op @ vi, ref, rtol=1e-10, atol=1e-12)
            with torch.inference_mode():
                torch.testing.assert_close(op @ vi, ref, rtol=1e-10, atol=1e-12)


def test_model_made_in_inference_mode_is_named():
    with torch.inference_mode():
        model = _Net().double()
    _, loss, x, y = _problem()
    op = HessianOperator(model, loss, (x, y))
    with pytest.raises(ValueError, match=r"HessianOperator: parameter 'a.weight' of `model` is an "
                                         r"inference tensor"):
        op @ torch.randn(op.d, dtype=torch.float64)


def test_mlp_hvp_names_its_column_layout_and_the_shape_passed():
    # issue 26 (README snippets): directions as rows got a message with the shapes swapped
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    d = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=rf"expected directions of shape \({d},\) or \({d}, k\)"
                                         rf", one direction per column .* got \(4, {d}\); for k "
                                         r"directions as rows pass directions\.T"):
        lx.mlp_hvp(model, x, y, torch.randn(4, d))
    assert lx.mlp_hvp(model, x, y, torch.randn(d, 4)).shape == (d, 4)


def test_freeze_mode_makes_products_repeatable():
    # issue 26 (third-party item 6): auto timed its routes on the second product, so products of
    # the same vector could come back from different modes (1.8e-8 apart in float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(8, 2, 6), torch.randint(0, 3, (8,))
    v = torch.randn(1, sum(p.numel() for p in model.parameters()))
    free = HessianOperator(model, nn.functional.cross_entropy, (x, y))
    for _ in range(3):
        free.apply_rows(v)
    assert free.mode_timings  # the probe measured the routes on a later product

    op = HessianOperator(model, nn.functional.cross_entropy, (x, y)).freeze_mode()
    assert op.mode_frozen
    first = op.apply_rows(v)
    for _ in range(3):
        assert torch.equal(op.apply_rows(v), first)
    assert op.mode_timings == {} and set(op.mode_choices) == {1}
    assert op.mode_used == op.mode_choices[1]
