"""How a model operator's autograd product runs: the modes, and the choice among them by
measurement (``mode="auto"``).

The modes (for a model outside the fused MLP path, :mod:`landscape_ext.mlp`):

* ``forward-over-reverse``: ``vmap(jvp(grad))`` over the directions — one pass for all of them;
* ``double-backward``: the first-order graph (cached between products for a single batch), then
  one ``autograd.grad(..., is_grads_batched=True)`` for the directions;
* ``double-backward-loop``: the same graph, one ``autograd.grad`` per direction (retained graph).

Which is fastest depends on the model and on the number of directions ``k`` (issue 18: a residual
CNN with BatchNorm at k = 8 costs 3.2 gradients per direction by forward-over-reverse, 2.3 by
double backward). ``auto`` therefore measures. Products are grouped by *bucket*, the power of two
``>= k`` (k = 5..8 share bucket 8): the per-direction cost changes slowly within a bucket.

The probe (:meth:`ModelOperator._probe`) runs on the first batch of the first product of a bucket
and computes that product by two routes, timing each piece:

1. double backward: the first-order graph (``graph``), directions 0 and 1 by one
   ``autograd.grad`` each (``double-backward-loop``; the faster of the two counts, since the
   first call through a fresh graph is cold and the estimate multiplies it by ``k``) and
   directions ``2..k-1`` by one batched call (``double-backward``; for ``k = 2`` there are none
   and batched double backward is not a candidate); together these rows are the product;
2. forward-over-reverse on all ``k`` directions.

So the probe costs one extra product (plus, with ``compile=True``, the compiling call). The
estimated seconds of a product of ``k`` directions (``op.mode_timings[bucket][mode]``) are
``forward-over-reverse``: its time; ``double-backward``: the batched time of ``k - 2``
directions scaled to ``k``; ``double-backward-loop``: ``k`` times the one-direction time; both double-backward
estimates add the graph's time unless the graph is cached (then it is paid once, not per product).
The fastest estimate wins (ties: the order of :data:`AUTOGRAD_MODES`), except that the prior
rule's mode (below) is kept when its estimate is within :data:`PRIOR_MARGIN` (5%) of the fastest:
each route is timed once, cold, and a near tie is noise (a causal LM at k = 8 measured 704 ms vs
702 ms in its probe, and forward-over-reverse's later products ran at 630 ms). The product of the
route that won is returned — the probe wastes no product. For one direction the two double
backward modes coincide; bucket 1 compares forward-over-reverse with double backward.

*Single products are not probed*: the first product of one direction (``k = 1``) runs on the
prior rule (double backward on a cached graph, else forward-over-reverse, the rule before
issue 18) without measuring, so a one-off ``op @ v`` costs one product; bucket 1 is probed on the
second one-direction product, i.e. when a solver (power iteration, Lanczos with block size 1)
shows that more follow. Products of several directions are probed on their first call.

The timer is injectable (:class:`ModeChooser`), so the choice is deterministic given the
timings; data-parallel ranks adopt rank 0's choice (:meth:`ModelOperator._apply_rows`).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch

__all__ = ["FORWARD_OVER_REVERSE", "DOUBLE_BACKWARD", "DOUBLE_BACKWARD_LOOP", "FUSED_MLP_MODE",
           "AUTOGRAD_MODES", "HVP_MODES", "PRIOR_MARGIN", "PROBE", "bucket_of", "ModeChooser", "wall_timer"]

FORWARD_OVER_REVERSE = "forward-over-reverse"
DOUBLE_BACKWARD = "double-backward"
DOUBLE_BACKWARD_LOOP = "double-backward-loop"
#: The fused MLP products of :mod:`landscape_ext.mlp` as an explicit mode of the model operators.
FUSED_MLP_MODE = "fused-mlp"
#: The autograd modes, in the order that breaks ties between equal timings.
AUTOGRAD_MODES = (FORWARD_OVER_REVERSE, DOUBLE_BACKWARD, DOUBLE_BACKWARD_LOOP)
HVP_MODES = ("auto",) + AUTOGRAD_MODES
#: A measured mode replaces the prior rule's only when it is faster by more than this fraction.
PRIOR_MARGIN = 0.05
#: What :meth:`ModelOperator._choose_mode` returns when the product is to be measured.
PROBE = "probe"
#: The piece of the probe that builds the first-order graph (a key of the injected timer).
GRAPH = "graph"

#: ``timer(what, fn) -> (fn(), seconds)``: ``what`` is a mode or :data:`GRAPH`.
Timer = Callable[[str, Callable[[], Any]], Tuple[Any, float]]


def bucket_of(k: int) -> int:
    """The power of two ``>= k`` (``k >= 1``): the products whose mode is chosen together."""
    if k < 1:
        raise ValueError(f"bucket_of: k must be >= 1, got {k}")
    return 1 << (int(k) - 1).bit_length()


def wall_timer(device: torch.device) -> Timer:
    """The default timer: wall seconds of ``fn()``, synchronizing a CUDA device around it (the
    launches are asynchronous)."""
    cuda = torch.device(device).type == "cuda"

    def timer(what: str, fn: Callable[[], Any]) -> Tuple[Any, float]:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    return timer


class ModeChooser:
    """The per-bucket record of ``auto``'s measurements and choices.

    Parameters
    ----------
    timer : callable, optional
        ``timer(what, fn) -> (fn(), seconds)`` (default :func:`wall_timer`); tests inject
        timings through it.
    prior_margin : float
        The prior rule's mode is kept while its estimate is within this fraction of the fastest
        (default :data:`PRIOR_MARGIN`).

    Attributes
    ----------
    timings : dict
        ``{bucket: {mode: estimated seconds of a product of the probe's k directions}}``.
    choices : dict
        ``{bucket: mode}``: the measured choice (or rank 0's, data parallel).
    calls : dict
        ``{bucket: products seen}`` (bucket 1 is probed on its second product).
    """

    def __init__(self, timer: Optional[Timer] = None, prior_margin: float = PRIOR_MARGIN):
        if not prior_margin >= 0:
            raise ValueError(f"ModeChooser: prior_margin must be >= 0, got {prior_margin}")
        self.timer = timer
        self.prior_margin = float(prior_margin)
        self.timings: Dict[int, Dict[str, float]] = {}
        self.choices: Dict[int, str] = {}
        self.calls: Dict[int, int] = {}

    def chosen(self, k: int) -> Optional[str]:
        """The mode chosen for ``k`` directions' bucket (``None`` before its probe)."""
        return self.choices.get(bucket_of(k))

    def count(self, k: int) -> None:
        """Note one product of ``k`` directions (once per product, not per batch)."""
        b = bucket_of(k)
        self.calls[b] = self.calls.get(b, 0) + 1

    def due(self, k: int) -> bool:
        """Whether the next batch of a product of ``k`` directions should be measured: its bucket
        has no choice yet, and it is not a single product (bucket 1 before its second call)."""
        b = bucket_of(k)
        return b not in self.choices and (b > 1 or self.calls.get(b, 0) >= 2)

    def decide(self, b: int, timings: Dict[str, float], prior: Optional[str] = None) -> str:
        """Record ``timings`` for bucket ``b`` and choose: the smallest time, ties in the order
        of :data:`AUTOGRAD_MODES`, but ``prior`` (the mode the prior rule would run) when its
        time is within ``prior_margin`` of the smallest (deterministic given the timings)."""
        if not timings:
            raise ValueError("ModeChooser.decide: no timings (every candidate failed)")
        order = {m: i for i, m in enumerate(AUTOGRAD_MODES)}
        mode = min(timings, key=lambda m: (timings[m], order.get(m, len(order))))
        if prior in timings and timings[prior] <= (1.0 + self.prior_margin) * timings[mode]:
            mode = prior
        self.timings[b] = dict(timings)
        self.choices[b] = mode
        return mode

    def adopt(self, b: int, mode: str) -> None:
        """Take ``mode`` for bucket ``b`` (another rank's choice); timings stay this rank's."""
        self.choices[b] = mode


def estimates(k: int, seconds: Dict[str, float], graph_cached: bool,
              modes: Iterable[str]) -> Dict[str, float]:
    """Estimated seconds of a product of ``k`` directions per mode, from the probe's pieces:
    ``seconds`` holds :data:`GRAPH` (the first-order graph), ``double-backward-loop`` (one
    direction), ``double-backward`` (``k - 2`` directions batched; all ``k`` when ``k == 1``)
    and ``forward-over-reverse``
    (``k`` directions); the graph counts unless it is cached. Only ``modes`` are estimated."""
    graph = 0.0 if graph_cached else seconds.get(GRAPH, 0.0)
    out: Dict[str, float] = {}
    for mode in modes:
        if mode not in seconds:
            continue
        if mode == FORWARD_OVER_REVERSE:
            out[mode] = seconds[mode]
        elif mode == DOUBLE_BACKWARD_LOOP:
            out[mode] = graph + k * seconds[mode]
        else:  # batched on k - 2 directions (all k when k == 1)
            out[mode] = graph + (seconds[mode] if k == 1 else seconds[mode] * k / (k - 2))
    return out
