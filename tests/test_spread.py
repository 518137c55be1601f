"""Batch-to-batch spread (landscape_lab.spread): disjoint batches, mean/sd/values against numpy,
and the sd of a Hessian statistic whose variance is known exactly (the trace of a least-squares
Hessian, 2/m sum |x_i|^2, over Gaussian inputs)."""
import math

import numpy as np
import pytest
import torch

from landscape_lab import BatchSpread, batch_spread, disjoint_batches
from landscape_lab.data import gaussian_mixture


def _exact_trace(batch):
    """tr(H) of loss(w) = mean((x w - y)^2) at w = 0, by the dense float64 Hessian."""
    x, y = batch[0].double(), batch[1].double()
    H = torch.autograd.functional.hessian(lambda w: ((x @ w - y) ** 2).mean(),
                                          torch.zeros(x.shape[1], dtype=torch.float64))
    return float(torch.trace(H))


def test_trace_spread_matches_its_known_variance():
    """H = (2/m) X^T X, so tr(H) = (2/m) sum_i |x_i|^2 with |x_i|^2 ~ chi^2_p: mean 2p and
    variance 4 * 2p / m. The sd of R batch values is within a few of its standard errors
    (relative standard error ~ 1/sqrt(2(R-1)) = 5% here) of sqrt(8p/m)."""
    p, m, R = 4, 10, 200
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m * R, p, generator=g, dtype=torch.float64)
    y = torch.randn(m * R, generator=g, dtype=torch.float64)
    s = batch_spread(_exact_trace, (x, y), batch_size=m, n_batches=R, seed=1)
    assert isinstance(s, BatchSpread) and s.n_batches == R and s.batch_size == m
    want_sd = math.sqrt(8 * p / m)
    assert s.sd == pytest.approx(want_sd, rel=0.2)
    assert s.mean == pytest.approx(2 * p, abs=4 * want_sd / math.sqrt(R))
    assert s.sem == pytest.approx(s.sd / math.sqrt(R))
    # mean and sd are numpy's of the values; the values are the statistic on each batch
    assert s.mean == pytest.approx(np.mean(s.values)) and s.sd == pytest.approx(
        np.std(s.values, ddof=1))
    batches = disjoint_batches((x, y), m, R, seed=1)
    assert s.values[:3] == pytest.approx([_exact_trace(b) for b in batches[:3]])
    # the sample-size advice: sd ~ 1/sqrt(m), so a target sd of half needs 4 m samples
    assert s.samples_for(s.sd / 2) == 4 * m
    assert "disjoint batches of 10" in str(s)


def test_disjoint_batches_partition_and_batch0_is_the_subset():
    ds = gaussian_mixture(n=200, ambient_dim=5, intrinsic_dim=3, n_classes=3, seed=0)
    idx = torch.arange(ds.n_train, dtype=torch.float32)[:, None]
    batches = disjoint_batches((idx, ds.y_train), 30, 4, seed=5)
    seen = torch.cat([b[0][:, 0] for b in batches])
    assert len(batches) == 4 and all(b[0].shape[0] == 30 for b in batches)
    assert seen.unique().numel() == 120                          # disjoint
    x0, y0 = ds.subset(30, "train", seed=5)
    b0 = disjoint_batches(ds, 30, 4, seed=5)[0]
    assert torch.equal(b0[0], x0) and torch.equal(b0[1], y0)
    with pytest.raises(ValueError, match="4 disjoint batches of 40 need 160 samples, the data "
                                         "have 150"):
        disjoint_batches(ds, 40, 4)
    with pytest.raises(TypeError, match="Dataset or an"):
        batch_spread(len, [1, 2, 3], 1)


def test_dict_statistics_one_batch_and_non_finite_values():
    x = torch.arange(12.0)[:, None]
    y = torch.zeros(12, dtype=torch.int64)

    def stats(b):
        return {"mean": b[0].mean(), "max": float(b[0].max()), "label": "text",
                "maybe": None if b[0].min() == 0 else 1.0, "flag": True}

    out = batch_spread(stats, (x, y), batch_size=4, n_batches=3, seed=0)
    assert set(out) == {"mean", "max"}                   # numbers on every batch only
    assert sum(v * 4 for v in out["mean"].values) == pytest.approx(float(x.sum()))
    one = batch_spread(lambda b: float(b[0].sum()), (x, y), batch_size=5, n_batches=1)
    assert one.sd is None and one.sem is None and one.n_batches == 1
    with pytest.raises(ValueError, match="one batch"):
        one.samples_for(1.0)
    calls = []

    def nan_on_the_second_batch(b):
        calls.append(b)
        return float("nan") if len(calls) == 2 else 1.0

    with pytest.raises(ValueError, match="'statistic' is nan on batch 1 of 3"):
        batch_spread(nan_on_the_second_batch, (x, y), 4, 3)
