"""The model operators' common machinery: a model, a loss and data behind the operator protocol.

:class:`ModelOperator` owns everything :class:`~landscape_ext.HessianOperator` and
:class:`~landscape_ext.GGNOperator` share: validation, the parameter layout and the data (from
:mod:`landscape_ext._model`), the pass over the batches with sample-weighted sums, the data
check between passes, the data-parallel reduction, and the choice of how a batch's product is
computed (:meth:`ModelOperator._choose_mode`, the one place that decides; ``auto`` measures, see
:mod:`.modes`) and the optional compiled forward-over-reverse product (``compile``). Subclasses
implement the per-batch product for each autograd mode.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _model
from .. import distributed as _dist
from .._model import DataFingerprint, DataSource, ParameterLayout, check_finite, evaluation_context
from ..mlp import MLPBackend
from .base import CurvatureOperator
from .modes import (AUTOGRAD_MODES, DOUBLE_BACKWARD, DOUBLE_BACKWARD_LOOP, FORWARD_OVER_REVERSE,
                    FUSED_MLP_MODE, GRAPH, HVP_MODES, PROBE, ModeChooser, bucket_of, estimates,
                    wall_timer)

__all__ = ["ModelOperator", "HVP_MODES", "FUSED_MLP_MODE", "FORWARD_OVER_REVERSE",
           "DOUBLE_BACKWARD", "DOUBLE_BACKWARD_LOOP", "COMPILE_DEFAULT", "RowAssembler"]

log = logging.getLogger(__name__)

#: What ``compile="auto"`` means per device type. CPU: off. Measured on the residual CNN of
#: bench/bench_hvp.py's models section (bench/README.md), batch 64, k = 8: the compiled
#: forward-over-reverse product cost 4.18 gradients per direction against 2.47 for the
#: double-backward loop ``auto`` picks; each power-of-two piece of directions compiles for about
#: 40 s; in float32 it is 3.4e-4 off the float64 product where eager is 9.4e-7 off (float64
#: compiled: 1.6e-15, so the error is float32 rounding in the generated kernels).
#: CUDA: off until that section has been measured on a GPU.
COMPILE_DEFAULT = {"cpu": False, "cuda": False}


class RowAssembler:
    """The rows of a ``(k, d)`` product written into one result as the pieces come (a list of
    pieces concatenated at the end would hold the product twice at its peak, e.g. 8 extra
    parameter-sized vectors for the looped double backward at k = 8)."""

    def __init__(self, k: int, n_pieces: int):
        self.k, self.single, self.out = k, n_pieces == 1, None

    def put(self, start: int, rows: Tensor) -> None:
        if self.single:
            self.out = rows
            return
        if self.out is None:
            self.out = rows.new_empty((self.k, rows.shape[1]))
        self.out[start:start + rows.shape[0]] = rows

    def result(self) -> Tensor:
        return self.out


class ModelOperator(CurvatureOperator):
    """Common machinery of :class:`HessianOperator` and :class:`GGNOperator` (see those for the
    parameters)."""

    #: "hessian" or "ggn": which curvature the fused MLP backend computes for this operator
    curvature = ""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], data: Any,
                 params: Optional[Iterable[Union[str, Tensor]]] = None, *, mode: str = "auto",
                 batch_norm: str = "eval", accumulate_dtype: Optional[torch.dtype] = None,
                 chunk_size: Optional[int] = None, check_data: bool = True,
                 cache_graph: Union[bool, str] = "auto", process_group: Any = None,
                 batch_size: Optional[Callable[[Any], int]] = None,
                 compile: Union[bool, str] = "auto"):
        name = type(self).__name__
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"{name}: loss_fn must be callable or None (the model returns its "
                            f"loss), got {type(loss_fn).__name__}")
        if batch_size is not None and not callable(batch_size):
            raise TypeError(f"{name}: batch_size must be a callable batch -> int, got "
                            f"{type(batch_size).__name__}")
        self.batch_size = batch_size
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: model must be an nn.Module, got {type(model).__name__}")
        # a DDP-wrapped model: differentiate its module and reduce over DDP's group unless
        # another one is given
        model, ddp_group, was_ddp = _model.unwrap_ddp(model)
        if process_group is None:
            process_group = ddp_group
        self.process_group = _dist.resolve_group(process_group, name)
        self.n_input_syncs = 0
        if mode not in HVP_MODES + (FUSED_MLP_MODE,):
            raise ValueError(f"{name}: mode must be one of {HVP_MODES + (FUSED_MLP_MODE,)}, "
                             f"got {mode!r}")
        if batch_norm not in ("eval", "train"):
            raise ValueError(f"{name}: batch_norm must be 'eval' or 'train', got {batch_norm!r}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode
        self.batch_norm = batch_norm
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.check_data = bool(check_data)
        if not (isinstance(compile, bool) or compile == "auto"):
            raise ValueError(f"{name}: compile must be True, False or 'auto', got {compile!r}")

        self.layout = ParameterLayout.from_model(model, params, name, ddp_prefix=was_ddp)
        self.param_names: List[str] = list(self.layout.names)
        self.param_shapes: List[torch.Size] = list(self.layout.shapes)
        self.param_sizes: List[int] = list(self.layout.sizes)
        self.param_dtype = self.layout.dtype
        self.accumulate_dtype = accumulate_dtype
        super().__init__(self.layout.d, accumulate_dtype or self.param_dtype, self.layout.device)

        self.data = DataSource(data, name, self.device)
        self.single_batch = self.data.single_batch
        # the cache holds one batch's graph: only meaningful for a single batch
        self.cache_graph = self.single_batch and (cache_graph == "auto" or bool(cache_graph))
        self._fingerprint = DataFingerprint(ordered=False)
        self._empty_batches: set = set()  # indices of batches without samples (skipped)
        self.n_samples: Optional[int] = None
        self.mode_used: Optional[str] = None
        #: auto's measurements and choices per bucket of k (modes.py); its ``timer`` may be
        #: replaced (tests inject timings through it)
        self.mode_chooser = ModeChooser()
        #: freeze_mode() was called: auto measures nothing more and keeps one mode per bucket
        self.mode_frozen = False
        #: whether the forward-over-reverse product runs under torch.compile, and why it stopped
        #: doing so (``compile_error``: the compilation's error; products then run eagerly)
        self.compile = (COMPILE_DEFAULT.get(self.device.type, False) if compile == "auto"
                        else bool(compile))
        self.compile_error: Optional[str] = None
        self._compiled: Dict[str, Callable[..., Any]] = {}
        # the attention backend products run with ("math": the one with second-order
        # derivatives; None before the first product); the user's own setting is restored
        self.attention_backend: Optional[str] = None
        self.forward_ad_broken = False
        # auto's prior, used until a bucket is measured (single products): below this many
        # directions a cached first-order graph + double backward beats vmapped
        # forward-over-reverse (measured by bench/bench_spectrum.py, HVP section)
        self.auto_double_backward_below = 4
        self.mlp_backend = MLPBackend(
            model, self.layout, loss_fn, self.curvature, name, forced=mode == FUSED_MLP_MODE,
            cacheable=self.single_batch and (cache_graph == "auto" or bool(cache_graph)))
        if mode == FUSED_MLP_MODE and not self.mlp_backend.applicable:
            raise ValueError(f"{name}: mode='fused-mlp' is not applicable: "
                             f"{self.mlp_backend.reason} (use mode='auto')")

    # -- the fused MLP path ---------------------------------------------------------------------
    @property
    def fused_mlp(self) -> bool:
        """Whether products run (or will run) through the fused MLP path."""
        return self.mlp_backend.applicable and self.mode in ("auto", FUSED_MLP_MODE)

    @property
    def fused_mlp_reason(self) -> Optional[str]:
        """Why the fused MLP path does not apply (``None`` when it does)."""
        return self.mlp_backend.reason

    # -- layout ---------------------------------------------------------------------------------
    def flatten(self, tensors: Any) -> Tensor:
        """Concatenate per-parameter tensors (dict by name or list in order) into ``(d,)``."""
        return self.layout.flatten(tensors)

    def unflatten(self, v: Tensor) -> Dict[str, Tensor]:
        """Split ``(d,)`` (or ``(k, d)``) into a dict of parameter-shaped tensors."""
        return self.layout.unflatten(v)

    def parameters_vector(self) -> Tensor:
        """The selected parameters flattened, ``(d,)`` (a copy)."""
        return self.layout.flatten(self.layout.values(self.model))

    # -- helpers of the per-batch products ------------------------------------------------------
    def _call_model(self, params: Dict[str, Tensor], inputs: Any) -> Any:
        return _model.call_model(self.model, params, inputs)

    def _loss(self, outputs: Any, targets: Tensor, where: str,
              loss_fn: Optional[Callable[[Any, Tensor], Tensor]] = None) -> Tensor:
        return _model.batch_mean_loss(loss_fn or self.loss_fn, outputs, targets,
                                      type(self).__name__, where)

    def _check_finite(self, t: Tensor, what: str, where: str) -> None:
        check_finite(t, what, type(self).__name__, where)

    def _chunks(self, k: int) -> List[Tuple[int, int]]:
        step = self.chunk_size or k
        return [(s, min(s + step, k)) for s in range(0, k, step)]

    # -- the product ----------------------------------------------------------------------------
    def _apply_rows(self, X: Tensor) -> Tensor:
        X = X.to(self.param_dtype)
        group = self.process_group
        owner = type(self).__name__
        _model.check_no_inference_tensors(self.model, owner)
        if X.shape[0] > 0:
            self.mode_chooser.count(X.shape[0])
        if group is None:
            acc, n_total, n_batches = self._local_sum(X)
            if acc is None or n_total == 0:
                raise ValueError(f"{owner}: data contains no batches"
                                 + (f" with samples ({len(self._empty_batches)} empty)"
                                    if self._empty_batches else ""))
            self.n_samples = n_total
            # a single batch is returned unscaled (it already is the mean)
            return acc.div_(n_total) if n_batches > 1 else acc

        # data parallel: identical inputs on every rank, local sums, one all-reduce
        X = self._sync_replicas(X)
        try:
            acc, n_local, n_batches = self._local_sum(X)
        except Exception as exc:  # every rank raises, none hangs in the all-reduce
            _dist.exchange_status(group, exc, (0.0, 0.0), "in a product", self.device)
            raise
        # with the sample counts, each rank's auto mode for this bucket: all take rank 0's
        table = _dist.exchange_status(group, None, (float(n_local), self._mode_code(X.shape[0])),
                                      "in a product", self.device)
        self._adopt_mode(X.shape[0], table[:, 1])
        n_total = int(round(float(table[:, 0].sum())))
        if n_total == 0:
            raise ValueError(f"{owner}: no rank of the process group has data (0 samples)")
        if acc is None:  # this rank holds no samples: it contributes zeros
            acc = X.new_zeros(X.shape, dtype=self.dtype)
        elif n_batches == 1:
            acc.mul_(n_local)
        _dist.all_reduce_sum_(acc, group)
        self.n_samples = n_total
        return acc.div_(n_total)

    def _mode_code(self, k: int) -> float:
        """This rank's choice for ``k``'s bucket as a number for the exchange (0: none)."""
        if k < 1:
            return 0.0
        chosen = self.mode_chooser.chosen(k)
        return float(AUTOGRAD_MODES.index(chosen) + 1) if chosen in AUTOGRAD_MODES else 0.0

    def _adopt_mode(self, k: int, codes: Tensor) -> None:
        """Take the choice of the lowest rank that has one (rank 0's unless it holds no data),
        so that every rank runs the same mode from the next product on."""
        picked = [int(c) for c in codes.tolist() if int(c) > 0]
        if picked and k >= 1:
            self.mode_chooser.adopt(bucket_of(k), AUTOGRAD_MODES[picked[0] - 1])

    def _sync_replicas(self, X: Tensor) -> Tensor:
        named = dict(self.model.named_parameters())
        X, replaced = _dist.sync_replica_inputs(
            X, self.process_group, lambda: [named[n] for n in self.param_names], self.d,
            self.dtype, self.device, type(self).__name__, warn=self.n_input_syncs == 0)
        self.n_input_syncs += int(replaced)
        return X

    def _local_sum(self, X: Tensor) -> Tuple[Optional[Tensor], int, int]:
        """This process's products over its batches: ``(acc, n, n_batches)`` where ``acc`` is
        ``sum_b n_b P_b`` — except for a single batch, where it is ``P_0`` unscaled."""
        acc = None
        n_total = n_batches = first_n = 0
        with evaluation_context(self.model, self.batch_norm):
            self.attention_backend = _model.attention_backend_name()
            self._fingerprint.start()
            for i, inputs, targets in self.data:
                where = f"on batch {i}"
                n_batch = self._samples_in(inputs, targets, where)
                if n_batch == 0:  # no weight in the mean: skipped, with a warning
                    self._skip_empty_batch(i)
                    continue
                if self.check_data:
                    self._fingerprint.add(inputs, targets, n_batch)
                try:
                    P = self._batch_apply_rows(X, inputs, targets, where)
                except Exception as exc:
                    owner = type(self).__name__
                    clearer = (_model.explain_size_mismatch(inputs, targets, exc, owner, where)
                               or _model.explain_forward_failure(self.model, inputs, exc, owner,
                                                                 where))
                    if clearer is None:
                        raise
                    raise clearer from exc
                self._check_finite(P, "the product", where)
                P = P.to(self.dtype)
                if acc is None:
                    acc = P if P.data_ptr() != X.data_ptr() else P.clone()
                    first_n = n_batch
                else:
                    if n_batches == 1:
                        acc.mul_(first_n)
                    acc.add_(P, alpha=n_batch)
                n_batches += 1
                n_total += n_batch
        if self.check_data and n_batches > 0 and not self._fingerprint.finish():
            raise ValueError(
                f"{type(self).__name__}: the data changed between passes "
                f"({self._fingerprint.n} samples now, {self._fingerprint.reference_n} in the "
                f"first pass, or different values): data augmentation or a random transform "
                f"makes the operator change from product to product. Use fixed data (no "
                f"augmentation) or check_data=False.")
        return acc, n_total, n_batches

    def _skip_empty_batch(self, index: int) -> None:
        """Note a batch without samples (weight 0: the mean over batches is the same without
        it); logged once per operator and batch, not on every product."""
        if index not in self._empty_batches:
            self._empty_batches.add(index)
            log.warning("%s: batch %d holds no samples (weight 0); it is skipped",
                        type(self).__name__, index)

    def _samples_in(self, inputs: Any, targets: Any, where: str) -> int:
        """The batch's weight in the mean over batches (``batch_size`` or the leading size of
        the targets, of the first input tensor for a dict batch)."""
        return _model.batch_weight(self.batch_size, inputs, targets, type(self).__name__, where)

    def _choose_mode(self, k: int) -> str:
        """How the product of ``k`` directions on a batch is computed: the forced ``mode``, or
        for ``auto``: the fused MLP path when it applies; else the mode measured for ``k``'s
        bucket (:mod:`.modes`); else :data:`~.modes.PROBE` (measure now) when the bucket is due;
        else the prior rule (single products, :meth:`_prior_mode`)."""
        if self.mode == FUSED_MLP_MODE or (self.mode == "auto" and self.mlp_backend.applicable):
            return FUSED_MLP_MODE
        if self.mode != "auto":
            return self.mode
        chosen = self.mode_chooser.chosen(k)
        if chosen is not None:
            return DOUBLE_BACKWARD if (chosen == FORWARD_OVER_REVERSE
                                       and self.forward_ad_broken) else chosen
        if self.mode_frozen:  # repeatable: the prior rule's mode, kept for the bucket
            self.mode_chooser.adopt(bucket_of(k), self._prior_mode(k))
            return self.mode_chooser.chosen(k)
        if self.mode_chooser.due(k):
            return PROBE
        return self._prior_mode(k)

    def freeze_mode(self) -> "ModelOperator":
        """Make products repeatable: ``auto`` keeps the modes it has chosen and, for a number of
        directions it has not measured yet, takes the prior rule's mode without timing anything
        (recorded in :attr:`mode_choices`). Without it, the first products of a bucket may run
        in other modes than later ones (the probe measures on the second product), which round
        differently (float64: about 1e-15 relative; float32: 1e-7). Returns the operator."""
        self.mode_frozen = True
        return self

    def _prior_mode(self, k: int) -> str:
        """The rule before measurement (issue 18): double backward when forward-mode AD is broken
        for the model or when fewer than ``auto_double_backward_below`` directions run on a
        cached graph, forward-over-reverse otherwise."""
        if self.forward_ad_broken or (self.cache_graph and k < self.auto_double_backward_below):
            return DOUBLE_BACKWARD
        return FORWARD_OVER_REVERSE

    @property
    def mode_timings(self) -> Dict[int, Dict[str, float]]:
        """``auto``'s measurements: ``{bucket: {mode: estimated seconds of the probed product}}``
        (a bucket is the power of two ``>= k``; see :mod:`landscape_ext.operators.modes`)."""
        return self.mode_chooser.timings

    @property
    def mode_choices(self) -> Dict[int, str]:
        """``auto``'s choices: ``{bucket: mode}`` (data parallel: rank 0's)."""
        return self.mode_chooser.choices

    def _batch_apply_rows(self, X: Tensor, inputs: Any, targets: Any, where: str) -> Tensor:
        """The product of one batch in the mode :meth:`_choose_mode` picks, falling back from
        the fused MLP path (``auto``: for good, when a batch is outside it) and from
        forward-over-reverse (``auto``: for good, when an op of the model has no forward-mode
        derivative, e.g. SDPA attention or a custom Function without ``jvp``:
        :func:`~landscape_ext._model.is_forward_ad_error`; any other error propagates)."""
        mode = self._choose_mode(X.shape[0])
        if mode == FUSED_MLP_MODE:
            out = self.mlp_backend.apply_rows(X, inputs, targets, where, self.chunk_size)
            if out is not None:
                self.mode_used = FUSED_MLP_MODE
                return out
            mode = self._choose_mode(X.shape[0])
        if mode == PROBE:
            return self._probe(X, inputs, targets, where)
        if mode in (DOUBLE_BACKWARD, DOUBLE_BACKWARD_LOOP):
            out = self._apply_rows_double_backward(X, inputs, targets, where,
                                                   loop=mode == DOUBLE_BACKWARD_LOOP)
            self.mode_used = mode
            return out
        try:
            out = self._apply_rows_forward_over_reverse(X, inputs, targets, where)
        except (RuntimeError, NotImplementedError) as exc:
            # only forward-mode AD's own failure switches the route (for good): an error of
            # the model, the loss or the data propagates, as it does from double backward
            if self.mode != "auto" or not _model.is_forward_ad_error(exc):
                raise
            try:
                out = self._apply_rows_double_backward(X, inputs, targets, where)
            except Exception as exc2:
                raise exc2 from exc
            self._forward_ad_failed(exc)
            self.mode_used = DOUBLE_BACKWARD
            return out
        self.mode_used = FORWARD_OVER_REVERSE
        return out

    def _forward_ad_failed(self, exc: BaseException) -> None:
        log.warning("%s: forward-over-reverse failed (%s); using double backward",
                    type(self).__name__, str(exc).splitlines()[0][:200] if str(exc) else
                    type(exc).__name__)
        self.forward_ad_broken = True

    def _probe(self, X: Tensor, inputs: Any, targets: Any, where: str) -> Tensor:
        """``auto``'s measurement for the bucket of ``k = X.shape[0]`` (see :mod:`.modes`): the
        product by double backward (graph, direction 0 looped, the rest batched) and by
        forward-over-reverse, each piece timed; records the estimates and the choice and
        returns the product of the route that won."""
        k = X.shape[0]
        timer = self.mode_chooser.timer or wall_timer(self.device)
        seconds: Dict[str, float] = {}
        state, seconds[GRAPH] = timer(GRAPH, lambda: self._double_backward_state(
            inputs, targets, where))
        if k == 1:  # one direction: looped and batched double backward coincide
            by_double, seconds[DOUBLE_BACKWARD] = timer(DOUBLE_BACKWARD, lambda: (
                self._double_backward_rows(state, X, where, loop=True, retain=False)))
            candidates = (FORWARD_OVER_REVERSE, DOUBLE_BACKWARD)
        else:
            # directions 0 and 1 one at a time (the estimate is k times the faster: the first
            # call through a fresh graph is cold, and k times a cold call would be a bias
            # against the loop), the rest batched
            rows, loop_s = RowAssembler(k, 3), []
            for i in (0, 1):
                row, t = timer(DOUBLE_BACKWARD_LOOP, lambda: self._double_backward_rows(
                    state, X[i:i + 1], where, loop=True, retain=k > 2 or i == 0))
                rows.put(i, row)
                loop_s.append(t)
                del row
            seconds[DOUBLE_BACKWARD_LOOP] = min(loop_s)
            candidates = AUTOGRAD_MODES if k > 2 else (FORWARD_OVER_REVERSE,
                                                         DOUBLE_BACKWARD_LOOP)
            if k > 2:
                rest, seconds[DOUBLE_BACKWARD] = timer(DOUBLE_BACKWARD, lambda: (
                    self._double_backward_rows(state, X[2:], where, loop=False, retain=False,
                                               batched=True)))
                rows.put(2, rest)
                del rest
            by_double = rows.result()
        del state
        by_forward = None
        if not self.forward_ad_broken:
            try:
                if self.compile and self.compile_error is None:
                    # the compiling call is not a product's cost: time the compiled one
                    self._apply_rows_forward_over_reverse(X, inputs, targets, where)
                by_forward, seconds[FORWARD_OVER_REVERSE] = timer(FORWARD_OVER_REVERSE, lambda: (
                    self._apply_rows_forward_over_reverse(X, inputs, targets, where)))
            except (RuntimeError, NotImplementedError) as exc:
                if not _model.is_forward_ad_error(exc):
                    raise
                self._forward_ad_failed(exc)
        # a cached graph (the Hessian on one batch) is paid once, not per product
        mode = self.mode_chooser.decide(bucket_of(k), estimates(k, seconds, self.cache_graph,
                                                                candidates),
                                        prior=self._prior_mode(k))
        log.info("%s: auto mode for k <= %d: %s (estimated seconds %s)", type(self).__name__,
                 bucket_of(k), mode, self.mode_chooser.timings[bucket_of(k)])
        self.mode_used = mode
        return by_forward if mode == FORWARD_OVER_REVERSE else by_double

    # -- compiled products ----------------------------------------------------------------------
    def _row_pieces(self, k: int) -> List[Tuple[int, int]]:
        """The row ranges one product runs as: the chunks (``chunk_size``), and under
        ``compile`` each chunk cut into powers of two (its binary digits, largest first), so
        that the compiled function sees at most ``log2(k) + 1`` shapes of directions — compiled
        once each, never per call, and no padding work."""
        chunks = self._chunks(k)
        if not (self.compile and self.compile_error is None):
            return chunks
        pieces = []
        for start, end in chunks:
            n = end - start
            for bit in reversed(range(n.bit_length())):
                if n >> bit & 1:
                    pieces.append((start, start + (1 << bit)))
                    start += 1 << bit
        return pieces

    def _run_compiled(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, under ``torch.compile(fn, dynamic=False)`` when ``compile`` is on;
        when compilation fails the error is kept in ``compile_error``, logged, and this and all
        later products run ``fn`` eagerly (an error that is not the compiler's then comes from
        the eager call itself)."""
        if self.compile and self.compile_error is None:
            try:
                if key not in self._compiled:
                    self._compiled[key] = torch.compile(fn, dynamic=False)
                return self._compiled[key](*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back
                text = str(exc).strip().splitlines()
                self.compile_error = f"{type(exc).__name__}: {text[0][:300] if text else ''}"
                self._compiled.clear()
                log.warning("%s: torch.compile failed (%s); products run eagerly",
                            type(self).__name__, self.compile_error)
        return fn(*args)

    # -- the per-batch products of the subclasses -----------------------------------------------
    def _apply_rows_forward_over_reverse(self, X: Tensor, inputs: Any, targets: Any,
                                         where: str) -> Tensor:
        raise NotImplementedError

    def _double_backward_state(self, inputs: Any, targets: Any, where: str) -> Any:
        """What the double-backward products of a batch share (a graph), built once per
        product (or cached)."""
        raise NotImplementedError

    def _double_backward_rows(self, state: Any, X: Tensor, where: str, loop: bool,
                              retain: bool, batched: bool = False) -> Tensor:
        """The rows of ``X`` by double backward on ``state``: one batched ``autograd.grad`` per
        chunk, or (``loop``) one per direction; ``retain``: keep the graph for more calls;
        ``batched``: use the batched call even for one direction (the probe times it)."""
        raise NotImplementedError

    def _apply_rows_double_backward(self, X: Tensor, inputs: Any, targets: Any, where: str,
                                    loop: bool = False) -> Tensor:
        state = self._double_backward_state(inputs, targets, where)
        return self._double_backward_rows(state, X, where, loop=loop, retain=False)
