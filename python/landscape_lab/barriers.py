r"""Loss along the straight line between two networks, and the barrier on it.

For two networks with weights ``w_a`` and ``w_b`` (same architecture),

.. math:: L(t) = \mathcal L\big((1 - t)\, w_a + t\, w_b\big),
          \qquad B = \max_t \big[L(t) - ((1 - t) L(0) + t L(1))\big],

the barrier ``B`` is the largest excess of the loss over the chord joining the end points (0 when
the two minima are linearly connected, e.g. for a convex loss). BatchNorm running statistics of an
interpolated network are stale, which alone creates false barriers; :func:`interpolate` can
re-estimate them at every ``t``.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ._results import ResultMixin, as_float_array, format_float

__all__ = ["BarrierPath", "interpolate", "barrier_height", "barrier_location"]

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BarrierPath(ResultMixin):
    """Loss (and accuracy) along ``(1 - t) w_a + t w_b``; returned by :func:`interpolate`.

    Attributes
    ----------
    ts : list of float
        Interpolation coefficients, increasing.
    losses : list of float
        Mean loss over the data at each ``t`` (samples weighted equally).
    accuracies : list of float or None
        Classification accuracy at each ``t``; ``None`` when not computed (``accuracy=False`` or
        targets that are not integer class labels).
    n_samples : int
        Samples evaluated per ``t``.
    bn_reestimated : bool
        Whether BatchNorm statistics were re-estimated at each ``t``.
    """

    ts: List[float]
    losses: List[float]
    accuracies: Optional[List[float]]
    n_samples: int
    bn_reestimated: bool

    @property
    def height(self) -> float:
        """:func:`barrier_height` of this path."""
        return barrier_height(self)

    @property
    def t_max(self) -> float:
        """:func:`barrier_location` of this path."""
        return barrier_location(self)

    def plot(self, ax: Any = None) -> Any:
        """Plot loss vs ``t`` with the chord (and accuracy on a twin axis). Returns the axes."""
        import matplotlib.pyplot as plt  # lazy: optional dependency

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        t = np.asarray(self.ts)
        loss = np.asarray(self.losses)
        ax.plot(t, loss, "o-", color="C0", markersize=3, label="loss")
        if _has_endpoints(t):
            l0, l1 = loss[np.argmin(np.abs(t))], loss[np.argmin(np.abs(t - 1.0))]
            ax.plot([0.0, 1.0], [l0, l1], "--", color="C0", alpha=0.6, label="chord")
            ax.set_title(f"barrier = {self.height:.4g} at t = {self.t_max:.3g}")
        ax.set_xlabel("t")
        ax.set_ylabel("loss")
        if self.accuracies is not None:
            ax2 = ax.twinx()
            ax2.plot(t, self.accuracies, "s-", color="C1", markersize=3, label="accuracy")
            ax2.set_ylabel("accuracy")
        ax.legend(loc="upper left", fontsize="small")
        return ax

    def __str__(self) -> str:
        t = np.asarray(self.ts)
        head = (
            f"BarrierPath: {len(self.ts)} points, t in [{format_float(t.min())}, {format_float(t.max())}], "
            f"{self.n_samples} samples{', BatchNorm re-estimated' if self.bn_reestimated else ''}"
        )
        lines = [head, f"  loss: {format_float(self.losses[0])} -> {format_float(self.losses[-1])}, max {format_float(max(self.losses))}"]
        if _has_endpoints(t):
            lines.append(f"  barrier = {format_float(self.height)} at t = {format_float(self.t_max)}")
        if self.accuracies is not None:
            lines.append(
                f"  accuracy: {format_float(self.accuracies[0])} -> {format_float(self.accuracies[-1])}, "
                f"min {format_float(min(self.accuracies))}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Barrier height
# --------------------------------------------------------------------------------------------
def _has_endpoints(t: np.ndarray) -> bool:
    return bool(np.any(np.abs(t) <= 1e-12) and np.any(np.abs(t - 1.0) <= 1e-12))


def _excess(path_or_ts: Any, losses: Any, func: str) -> Tuple[np.ndarray, np.ndarray]:
    if losses is None:
        if isinstance(path_or_ts, BarrierPath) or (hasattr(path_or_ts, "ts") and hasattr(path_or_ts, "losses")):
            ts, losses = path_or_ts.ts, path_or_ts.losses
        elif isinstance(path_or_ts, (tuple, list)) and len(path_or_ts) == 2:
            ts, losses = path_or_ts
        else:
            raise TypeError(f"{func}: expected a BarrierPath, a (ts, losses) pair or ts and losses, got {type(path_or_ts).__name__}")
    else:
        ts = path_or_ts
    t = as_float_array(ts, "ts", func, min_size=2)
    loss = as_float_array(losses, "losses", func, min_size=2)
    if t.size != loss.size:
        raise ValueError(f"{func}: ts and losses must have the same length, got {t.size} and {loss.size}")
    i0 = np.nonzero(np.abs(t) <= 1e-12)[0]
    i1 = np.nonzero(np.abs(t - 1.0) <= 1e-12)[0]
    if i0.size == 0 or i1.size == 0:
        raise ValueError(
            f"{func}: ts must contain 0 and 1 (the end points of the chord), got range "
            f"[{t.min():.6g}, {t.max():.6g}] with {t.size} points"
        )
    l0, l1 = loss[i0[0]], loss[i1[0]]
    return t, loss - ((1.0 - t) * l0 + t * l1)


def barrier_height(path_or_ts: Any, losses: Optional[Any] = None) -> float:
    r"""Height of the loss barrier on a linear path.

    .. math:: B = \max_t \big[L(t) - ((1 - t) L(0) + t L(1))\big],

    the maximum taken over all evaluated ``t`` including the end points, where the excess is 0
    exactly, so ``B >= 0`` (``B = 0`` for a convex loss).

    Parameters
    ----------
    path_or_ts : BarrierPath, (ts, losses) pair, or ts
        The path; or the ``t`` values with ``losses`` as the second argument. ``ts`` must contain
        0 and 1.
    losses : array-like, optional
        Losses at ``ts``.

    Returns
    -------
    float
    """
    _, ex = _excess(path_or_ts, losses, "barrier_height")
    return float(np.max(ex))


def barrier_location(path_or_ts: Any, losses: Optional[Any] = None) -> float:
    """The ``t`` at which :func:`barrier_height` is attained (the first one on ties)."""
    t, ex = _excess(path_or_ts, losses, "barrier_location")
    return float(t[int(np.argmax(ex))])


# --------------------------------------------------------------------------------------------
# Interpolation
# --------------------------------------------------------------------------------------------
def _is_single_batch(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, Mapping))


def _as_batches(data: Any, func: str, name: str) -> Iterable:
    """A re-iterable collection of batches (a single batch becomes a one-element list)."""
    if isinstance(data, torch.Tensor):
        return [data]
    if _is_single_batch(data):
        return [data]
    if not isinstance(data, Iterable):
        raise TypeError(f"{func}: {name} must be an (inputs, targets) batch or an iterable of batches, got {type(data).__name__}")
    if iter(data) is data:  # a one-shot iterator/generator: keep its batches for every t
        data = list(data)
    return data


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _batch_size(inputs: Any, targets: Any) -> int:
    if isinstance(targets, torch.Tensor) and targets.ndim > 0:
        return int(targets.shape[0])
    if isinstance(inputs, torch.Tensor) and inputs.ndim > 0:
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        for v in inputs.values():
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                return int(v.shape[0])
    if isinstance(inputs, (tuple, list)):
        for v in inputs:
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                return int(v.shape[0])
    return 1


def _split_batch(batch: Any, func: str) -> Tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"{func}: each batch must be an (inputs, targets) pair, got {type(batch).__name__}")


def _is_classification(outputs: Any, targets: Any) -> bool:
    return (
        isinstance(outputs, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and outputs.is_floating_point()
        and not targets.is_floating_point()
        and not targets.is_complex()
        and targets.dtype != torch.bool
        and outputs.ndim == targets.ndim + 1
        and outputs.shape[0] == targets.shape[0]
        and outputs.shape[2:] == targets.shape[1:]
    )


def _check_same_architecture(model_a: nn.Module, model_b: nn.Module, func: str) -> None:
    def shapes(named) -> Dict[str, Tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in named}

    for kind, shapes_a, shapes_b in (
        ("parameters", shapes(model_a.named_parameters()), shapes(model_b.named_parameters())),
        ("buffers", shapes(model_a.named_buffers()), shapes(model_b.named_buffers())),
    ):
        if shapes_a == shapes_b:
            continue
        only_a = sorted(set(shapes_a) - set(shapes_b))
        only_b = sorted(set(shapes_b) - set(shapes_a))
        diff = [f"{k}: {shapes_a[k]} vs {shapes_b[k]}" for k in sorted(set(shapes_a) & set(shapes_b)) if shapes_a[k] != shapes_b[k]]
        parts = []
        if only_a:
            parts.append(f"only in model_a: {', '.join(only_a[:5])}{' ...' if len(only_a) > 5 else ''}")
        if only_b:
            parts.append(f"only in model_b: {', '.join(only_b[:5])}{' ...' if len(only_b) > 5 else ''}")
        if diff:
            parts.append(f"shape mismatch: {'; '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}")
        raise ValueError(
            f"{func}: model_a and model_b must have the same architecture; {kind} differ "
            f"({len(shapes_a)} vs {len(shapes_b)} tensors): " + "; ".join(parts)
        )


def _bn_modules(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def _check_ts(ts: Optional[Any], func: str) -> np.ndarray:
    if ts is None:
        return np.linspace(0.0, 1.0, 25)
    t = as_float_array(ts, "ts", func, min_size=1)
    return np.unique(t)


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: Any,
    ts: Optional[Sequence[float]] = None,
    accuracy: bool = True,
    bn_reestimate: Union[bool, Iterable, None] = False,
    device: Optional[Union[str, torch.device]] = None,
) -> BarrierPath:
    r"""Loss (and accuracy) along the straight line between two networks.

    At each ``t`` the network with weights ``(1 - t) w_a + t w_b`` is evaluated on ``data``:

    .. math:: L(t) = \frac{\sum_k n_k\, \ell_k(t)}{\sum_k n_k},

    with ``ell_k`` the batch-mean loss ``loss_fn(outputs, targets)`` of batch ``k`` and ``n_k`` its
    size. All parameters and all floating-point buffers are interpolated; integer buffers
    (``num_batches_tracked``) are taken from ``model_a``. The work happens on a deep copy of
    ``model_a`` in eval mode under ``torch.no_grad()``: ``model_a`` and ``model_b`` are not changed
    (parameters, buffers, ``training`` flag, ``requires_grad``), also when an error is raised.

    Parameters
    ----------
    model_a, model_b : nn.Module
        Same architecture (same parameter and buffer names and shapes; checked).
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar tensor``, the mean over the batch.
    data : batch or iterable of batches
        One ``(inputs, targets)`` pair or an iterable of them (a DataLoader, a list). ``inputs``
        may be a tensor, a tuple of tensors (passed as ``model(*inputs)``; wrap such a single batch
        in a list) or a dict (``model(**inputs)``). A one-shot iterator is materialised once.
    ts : sequence of float, optional
        Interpolation coefficients (sorted and de-duplicated); default 25 evenly spaced points in
        ``[0, 1]`` (0, 1 and 0.5 included). Values outside ``[0, 1]`` extrapolate.
    accuracy : bool
        Also compute accuracy when targets are integer class labels and outputs are logits with
        the class dimension at dim 1 (``argmax(dim=1) == targets``; negative targets, e.g.
        ``ignore_index=-100``, are not counted). Otherwise ``accuracies`` is ``None``.
    bn_reestimate : bool or iterable of batches
        ``True`` re-estimates BatchNorm statistics on ``data``, an iterable (or a single batch or an
        input tensor) on those batches: at each ``t`` the running statistics are reset and
        accumulated as a cumulative average (``momentum=None``) by forward passes with only the
        BatchNorm layers in train mode (dropout etc. stay in eval mode). A no-op for a model
        without BatchNorm.
    device : str or torch.device, optional
        Where to evaluate (default: the device of ``model_a``'s parameters).

    Returns
    -------
    BarrierPath

    Raises
    ------
    ValueError
        Different architectures, empty data, ``ts`` with NaN/Inf, a non-finite loss (the message
        gives ``t`` and the batch index).
    """
    func = "interpolate"
    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise TypeError(f"{func}: model_a and model_b must be nn.Module, got {type(model_a).__name__} and {type(model_b).__name__}")
    _check_same_architecture(model_a, model_b, func)
    t_values = _check_ts(ts, func)
    batches = _as_batches(data, func, "data")
    bn_batches = (batches if bn_reestimate is True else None if bn_reestimate in (False, None)
                  else _as_batches(bn_reestimate, func, "bn_reestimate"))
    if device is None:
        first = next(itertools.chain(model_a.parameters(), model_a.buffers()), None)
    device = torch.device(device if device is not None else
                          first.device if first is not None else "cpu")

    work = copy.deepcopy(model_a).to(device)
    work.eval()
    work.zero_grad(set_to_none=True)  # the copy needs no .grad tensors
    pairs = _interpolation_pairs(work, model_a, model_b, device)
    bns = _bn_modules(work) if bn_batches is not None else []
    if bn_batches is not None and not bns:
        logger.info("%s: bn_reestimate requested but the model has no BatchNorm layer tracking statistics; no-op", func)

    losses: List[float] = []
    accs: List[float] = []
    do_acc = bool(accuracy)
    n_samples = 0
    with torch.no_grad():
        for t in t_values:
            tf = float(t)
            for target, wa, wb in pairs:
                target.copy_(wa * (1.0 - tf) + wb * tf)  # exact at t = 0 and t = 1
            if bns:
                _reestimate_bn(work, bns, bn_batches, device, func)
            total_loss, total_n, correct, counted, do_acc = _evaluate(
                work, batches, loss_fn, device, tf, do_acc, func)
            if total_n == 0:
                raise ValueError(f"{func}: data has no batches")
            losses.append(total_loss / total_n)
            if do_acc:
                accs.append(correct / counted if counted else float("nan"))
            n_samples = total_n
            logger.debug("%s: t=%.4g loss=%.6g", func, tf, losses[-1])
    if do_acc and any(math.isnan(a) for a in accs):
        do_acc = False  # no countable label at some t: do not return NaN
    return BarrierPath(
        ts=[float(t) for t in t_values],
        losses=losses,
        accuracies=accs if do_acc and len(accs) == len(losses) else None,
        n_samples=n_samples,
        bn_reestimated=bool(bns),
    )


def _interpolation_pairs(work: nn.Module, model_a: nn.Module, model_b: nn.Module,
                         device: torch.device) -> list:
    """``(tensor in the copy, its value in model_a, in model_b)`` for every parameter and
    floating-point buffer (integer buffers such as ``num_batches_tracked`` stay model_a's)."""
    named_a, named_b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    buf_a, buf_b = dict(model_a.named_buffers()), dict(model_b.named_buffers())
    pairs = []
    for name, p in work.named_parameters():
        pairs.append((p, named_a[name].detach().to(device, p.dtype),
                      named_b[name].detach().to(device, p.dtype)))
    for name, bfr in work.named_buffers():
        if bfr.is_floating_point() or bfr.is_complex():
            pairs.append((bfr, buf_a[name].detach().to(device, bfr.dtype),
                          buf_b[name].detach().to(device, bfr.dtype)))
    return pairs


def _evaluate(work: nn.Module, batches: list, loss_fn: Callable[[Any, Any], torch.Tensor],
              device: torch.device, tf: float, do_acc: bool, func: str):
    """One pass over the batches at interpolation coefficient ``tf``: ``(sum of n_k * loss_k,
    samples, correct, counted, do_acc)``; ``do_acc`` turns False when the targets are not class
    labels of logits."""
    total_loss, total_n, correct, counted = 0.0, 0, 0, 0
    for k, batch in enumerate(batches):
        inputs, targets = _split_batch(batch, func)
        inputs, targets = _to_device(inputs, device), _to_device(targets, device)
        outputs = _forward(work, inputs)
        loss = loss_fn(outputs, targets)
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"{func}: loss_fn must return a scalar (batch mean), got shape "
                                 f"{tuple(loss.shape)}")
            lv = float(loss.detach().reshape(()))
        else:
            lv = float(loss)
        if not math.isfinite(lv):
            raise ValueError(f"{func}: loss is {lv} at t={tf:.6g} (batch {k})")
        bs = _batch_size(inputs, targets)
        total_loss += lv * bs
        total_n += bs
        if do_acc:
            if _is_classification(outputs, targets):
                valid = targets >= 0
                correct += int(((outputs.argmax(dim=1) == targets) & valid).sum())
                counted += int(valid.sum())
            else:
                logger.debug("%s: targets are not integer class labels for logits; no accuracy",
                             func)
                do_acc = False
    return total_loss, total_n, correct, counted, do_acc


def _reestimate_bn(model: nn.Module, bns: list, batches: Iterable, device: torch.device, func: str) -> None:
    """Reset BatchNorm running statistics and re-accumulate them (cumulative average)."""
    saved = [(m, m.momentum, m.training) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        seen = 0
        for batch in batches:
            inputs = batch if isinstance(batch, torch.Tensor) else _split_batch(batch, func)[0]
            _forward(model, _to_device(inputs, device))
            seen += 1
        if seen == 0:
            raise ValueError(f"{func}: bn_reestimate data has no batches")
    finally:
        for m, mom, tr in saved:
            m.momentum = mom
            m.train(tr)
