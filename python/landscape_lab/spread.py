r"""Batch-to-batch spread of a landscape statistic: how much a number measured on one batch
would move on another batch of the same size.

A Hessian or gradient statistic of a network is measured on a finite batch of ``m`` training
samples, so it is itself a random quantity: ``||H||_2``, ``tr(H)`` or the gradient rank of
another batch differ. :func:`batch_spread` repeats any statistic on ``R`` disjoint batches of
the same size and returns their mean, standard deviation and values (:class:`BatchSpread`);
:func:`disjoint_batches` draws the batches.

What the spread says about sample size
--------------------------------------
* The standard deviation ``sd`` across batches is the error bar of *one* measurement: two
  cells whose values differ by less than about ``2 sqrt(sd_1^2 + sd_2^2)`` are not resolved.
* For a statistic that is an average over the samples (the trace ``tr(H) / d``, the loss, a
  gradient norm) ``sd`` shrinks like ``1 / sqrt(m)``: halving it needs four times the samples,
  and :meth:`BatchSpread.samples_for` gives the ``m`` a target ``sd`` needs under that rule. Top
  eigenvalues and ranks are not averages (the top eigenvalue of a batch Hessian is biased
  upward by ``O(1 / sqrt(m))``, the rank grows with ``m`` up to its plateau), so for them the
  rule is only a guide: measure the spread at two batch sizes before relying on it.
* ``R`` does not make one measurement more precise; it sets how well ``sd`` itself is known:
  its relative standard error is about ``1 / sqrt(2 (R - 1))`` for Gaussian values, i.e. 50 %
  at ``R = 3``, 24 % at ``R = 10``, 10 % at ``R = 50``. The mean of the ``R`` values has the
  standard error ``sd / sqrt(R)`` (:attr:`BatchSpread.sem`).
* The spread includes the estimator's own noise (random probes of Hutch++, the eigensolver's
  tolerance) when each batch is measured with its own seed, as a re-measurement would be.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._results import ResultMixin, format_float

__all__ = ["BatchSpread", "batch_spread", "disjoint_batches"]


@dataclasses.dataclass
class BatchSpread(ResultMixin):
    """Values of one statistic on ``R`` disjoint batches of ``batch_size`` samples.

    Attributes
    ----------
    name : str
        The statistic (a label).
    mean : float
        Mean of ``values``.
    sd : float or None
        Sample standard deviation of ``values`` (``ddof = 1``): how much one measurement moves
        from batch to batch. None for a single batch.
    values : list of float
        The statistic on each batch, in batch order (batch 0 first).
    batch_size : int
    """

    name: str
    mean: float
    sd: Optional[float]
    values: List[float]
    batch_size: int

    @classmethod
    def from_values(cls, values: Sequence[float], batch_size: int,
                    name: str = "statistic") -> "BatchSpread":
        """Summarize the per-batch ``values`` (non-empty, finite)."""
        v = np.asarray([float(x) for x in values], dtype=np.float64)
        if v.size == 0:
            raise ValueError(f"BatchSpread: no values for {name!r}")
        if not np.isfinite(v).all():
            i = int(np.argmin(np.isfinite(v)))
            raise ValueError(f"BatchSpread: {name!r} is {v[i]} on batch {i} of {v.size}")
        sd = float(v.std(ddof=1)) if v.size >= 2 else None
        return cls(name=name, mean=float(v.mean()), sd=sd, values=v.tolist(),
                   batch_size=int(batch_size))

    @property
    def n_batches(self) -> int:
        return len(self.values)

    @property
    def sem(self) -> Optional[float]:
        """Standard error of :attr:`mean`: ``sd / sqrt(R)``."""
        return None if self.sd is None else self.sd / math.sqrt(self.n_batches)

    @property
    def relative_sd(self) -> Optional[float]:
        """``sd / |mean|`` (None without a sd or for a zero mean)."""
        if self.sd is None or self.mean == 0:
            return None
        return self.sd / abs(self.mean)

    def samples_for(self, target_sd: float) -> int:
        """Batch size at which the batch-to-batch sd would be ``target_sd``, assuming it falls
        like ``1 / sqrt(m)`` (exact for averages over samples, a guide for top eigenvalues and
        ranks: see the module notes)."""
        if self.sd is None:
            raise ValueError(f"BatchSpread.samples_for: {self.name!r} was measured on one batch; "
                             f"its sd is unknown (need n_batches >= 2)")
        if not target_sd > 0:
            raise ValueError(f"BatchSpread.samples_for: target_sd must be > 0, got {target_sd}")
        return max(1, math.ceil(self.batch_size * (self.sd / target_sd) ** 2))

    def __str__(self) -> str:
        sd = "n/a" if self.sd is None else format_float(self.sd)
        return (f"{self.name} = {format_float(self.mean)} +- {sd} (batch-to-batch sd over "
                f"{self.n_batches} disjoint batches of {self.batch_size})")


def _tensors(data: Any) -> Tuple[Tensor, Tensor]:
    """``(x, y)`` of a :class:`~landscape_lab.data.Dataset` (its training split) or a pair."""
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        return data.x_train, data.y_train
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    raise TypeError(f"batch_spread: data must be a Dataset or an (inputs, targets) pair, got "
                    f"{type(data).__name__}")


def disjoint_batches(data: Any, batch_size: int, n_batches: int, seed: int = 0
                     ) -> List[Tuple[Tensor, Tensor]]:
    """``n_batches`` disjoint random batches of ``batch_size`` samples of ``data`` (a Dataset's
    training split or an ``(x, y)`` pair), each sorted by sample index.

    The batches are consecutive slices of one seeded permutation, so batch 0 is the batch
    :meth:`Dataset.subset(batch_size, "train", seed) <landscape_lab.data.Dataset.subset>`
    returns (when ``batch_size`` is smaller than the data).
    """
    x, y = _tensors(data)
    n = int(x.shape[0])
    if batch_size < 1 or n_batches < 1:
        raise ValueError(f"disjoint_batches: batch_size and n_batches must be >= 1, got "
                         f"batch_size={batch_size}, n_batches={n_batches}")
    if batch_size * n_batches > n:
        raise ValueError(f"disjoint_batches: {n_batches} disjoint batches of {batch_size} need "
                         f"{batch_size * n_batches} samples, the data have {n}")
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=g)
    out = []
    for j in range(n_batches):
        idx = order[j * batch_size:(j + 1) * batch_size].sort().values
        out.append((x[idx], y[idx]))
    return out


def batch_spread(statistic: Callable[[Tuple[Tensor, Tensor]], Any], data: Any, batch_size: int,
                 n_batches: int = 3, seed: int = 0
                 ) -> Union[BatchSpread, Dict[str, BatchSpread]]:
    """Repeat ``statistic`` on ``n_batches`` disjoint batches of ``batch_size`` samples and
    summarize the values (mean, batch-to-batch sd, values).

    Parameters
    ----------
    statistic : callable
        ``statistic((x, y))`` returns a number, or a dict of them (e.g. the dict of
        :func:`landscape_lab.training.curvature_stats`; entries that are not numbers on every
        batch, such as lists or None, are skipped).
    data : Dataset or (Tensor, Tensor)
        A Dataset (its training split is used) or inputs and targets.
    batch_size : int
        Samples per batch: the size the statistic is normally measured at (the spread depends
        on it; see the module notes for what it implies about sample size).
    n_batches : int
        ``R >= 2`` for a sd (1 gives the value and ``sd = None``); needs
        ``R * batch_size`` samples.
    seed : int
        Seeds the batches (see :func:`disjoint_batches`).

    Returns
    -------
    BatchSpread, or dict of BatchSpread
        One per number the statistic returns.

    Raises
    ------
    ValueError
        Too few samples for the batches, or a NaN/Inf value (naming the statistic and batch).
    """
    batches = disjoint_batches(data, batch_size, n_batches, seed)
    results = [statistic(b) for b in batches]
    if not isinstance(results[0], dict):
        return BatchSpread.from_values(results, batch_size)
    keys = [k for k, v in results[0].items() if _is_number(v)
            and all(_is_number(r.get(k)) for r in results)]
    return {k: BatchSpread.from_values([r[k] for r in results], batch_size, k) for k in keys}


def _is_number(v: Any) -> bool:
    if isinstance(v, Tensor):
        return v.numel() == 1
    return isinstance(v, numbers.Real) and not isinstance(v, bool)
