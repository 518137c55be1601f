"""The choice of the product engine (``method=``) of the gradient-covariance SVD and the studies.

``materialize`` and ``jvp`` need nothing; ``kronecker`` and ``gram`` need the layer factors,
which every rank probes on its first batch; ``auto`` decides from the sample count, the probe and
a check of the factor products against ``jvp`` on the first batch. With the model's own loss
(``loss_fn=None``) there are no per-sample losses of one batched forward, hence no layer
factors: ``auto`` picks ``materialize`` or ``jvp``. The thresholds and their
measurements: docs/gradients.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from ..distributed import SampleShards
from ._engines import JvpEngine, MaterializeEngine, ProductEngine
from ._kronecker import FactorsUnsupported, KroneckerEngine
from ._problem import PerSampleProblem

log = logging.getLogger(__name__)

SVD_METHODS = ("auto", "kronecker", "jvp", "gram", "materialize")
SKETCH_IMPLS = ("auto", "fused", "composite")

_MATERIALIZE_MAX = 1 << 22       # n * d elements for auto -> materialize
# auto on a problem small enough to materialize: gram when n <= this * d (the n x n Gram matrix
# outgrows the n x d one beyond; measured by bench/bench_gradients.py, see docs/gradients.md)
_GRAM_OVER_MATERIALIZE = 2
_GRAM_MAX_N = 8192               # samples for auto -> gram
_GRAM_MAX_FACTOR_BYTES = 1 << 30  # stored factors for gram


def resolve_sketch_impl(sketch_impl: str, device: torch.device, owner: str) -> str:
    """``"fused"`` or ``"composite"``: ``auto`` is the ops layer's default for the device."""
    if sketch_impl not in SKETCH_IMPLS:
        raise ValueError(f"{owner}: sketch_impl must be one of {SKETCH_IMPLS}, got {sketch_impl!r}")
    return ops.resolve_impl("linear_grad_sketch", device, sketch_impl)


def _factors_match_jvp(engine: KroneckerEngine, problem: PerSampleProblem, inputs: Any,
                       targets: Tensor, batch_size: int, where: str, seed: int) -> bool:
    """Compare the factor sketch with jvp on the first batch (2 random directions)."""
    generator = torch.Generator().manual_seed(seed + 991)
    Z = torch.randn(2, problem.d, generator=generator, dtype=torch.float64).to(problem.device,
                                                                                problem.dtype)
    y_factors = engine.sketch(engine.prepare(inputs, targets, batch_size, where), Z).double()
    reference = JvpEngine(problem, None)
    y_jvp = reference.sketch(reference.prepare(inputs, targets, batch_size, where), Z).double()
    tol = 1e-9 if problem.dtype == torch.float64 else 2e-3
    err = (y_factors - y_jvp).norm() / y_jvp.norm().clamp_min(1e-300)
    if not bool(err <= tol):
        log.warning("%s: the layer-factor products disagree with jvp on the first batch (relative "
                    "error %.2e): a Linear/Conv weight is used outside its module's forward, or "
                    "samples interact; using method='jvp'", problem.owner, float(err))
        return False
    return True


def _gram_fits(problem: PerSampleProblem, engine: KroneckerEngine, n: Optional[int]) -> bool:
    """The gram route's size limits: ``n <= _GRAM_MAX_N`` and the stored factors (float64)."""
    if n is None or n > _GRAM_MAX_N:
        return False
    widths = sum(L.n_in + L.n_out for L in engine.layers)
    d_other = sum(problem.sizes[name] for name in engine.others)
    return n * (widths + d_other) * 8 <= _GRAM_MAX_FACTOR_BYTES


@dataclass
class _FactorProbe:
    """The first-batch probe of the layer factors, as gathered from every rank."""

    engine: Optional[KroneckerEngine]    # this rank's (None: unsupported here)
    why: str                             # this rank's reason when unsupported
    first_batch: Tuple[Any, Tensor, int]
    table: Tensor                        # (W, 4): supported, all_2d, covered fraction, plan

    @property
    def supported(self) -> bool:
        return bool((self.table[:, 0] > 0).all())

    @property
    def all_2d(self) -> bool:
        return bool((self.table[:, 1] > 0).all())

    @property
    def same_plan(self) -> bool:
        return bool((self.table[:, 3] == self.table[0, 3]).all())


class _MethodChooser:
    """The facts ``method`` is resolved from: the sample count (of all ranks), the problem size,
    and the layer-factor probe."""

    def __init__(self, problem: PerSampleProblem, chunk_size: Optional[int],
                 shards: SampleShards, allow_gram: bool):
        self.problem = problem
        self.chunk_size = chunk_size
        self.shards = shards
        self.allow_gram = allow_gram
        n = problem.n_samples_hint
        self.n = n
        self.small = n is not None and n * problem.d <= _MATERIALIZE_MAX
        # gram beats materialize + a full SVD unless the samples far outnumber the parameters
        self.gram_over_materialize = (allow_gram and n is not None
                                      and n <= _GRAM_OVER_MATERIALIZE * problem.d)

    def materialize(self) -> Tuple[ProductEngine, str]:
        return MaterializeEngine(self.problem, self.chunk_size), "materialize"

    def fallback(self) -> Tuple[ProductEngine, str]:
        """Without the layer factors: materialize when small, else jvp."""
        if self.small:
            return self.materialize()
        return JvpEngine(self.problem, self.chunk_size), "jvp"

    def probe(self, sketch_impl: str) -> _FactorProbe:
        """Every rank probes the layer factors on its own first batch."""
        problem = self.problem

        def probe_here():
            inputs, targets, batch_size = problem.first_batch()
            try:
                engine = KroneckerEngine(problem, self.chunk_size, sketch_impl)
                engine.probe(inputs, targets, batch_size, "on batch 0")
            except FactorsUnsupported as exc:
                return None, str(exc), (inputs, targets, batch_size)
            return engine, "", (inputs, targets, batch_size)

        def report(result):
            engine = result[0]
            if engine is None:
                return 0.0, 0.0, 0.0, -1.0
            return (1.0, 1.0 if engine.all_2d else 0.0, engine.covered_fraction,
                    engine.plan_signature())

        (engine, why, first), table = self.shards.run_local(
            "probing the model (choosing the method)", probe_here, report=report, n_report=4)
        return _FactorProbe(engine, why, first, table)

    def requested(self, method: str, probe: _FactorProbe) -> Tuple[ProductEngine, str]:
        """``kronecker`` or ``gram`` as requested, or why not."""
        owner = self.problem.owner
        if not probe.supported:
            bad = [r for r in range(self.shards.world) if probe.table[r, 0] <= 0]
            detail = probe.why if probe.why else f"on rank(s) {bad}"
            raise ValueError(f"{owner}: method={method!r} needs Linear/Conv2d layers holding the "
                             f"parameters: {detail}") from None
        if method == "gram":
            if not probe.all_2d:
                raise ValueError(f"{owner}: method='gram' needs Linear layers on 2-D inputs (one "
                                 f"position per sample, one call per batch); use 'kronecker' or "
                                 f"'jvp'")
            if not probe.same_plan:
                raise ValueError(f"{owner}: method='gram' needs the same layer factors on every "
                                 f"rank, but the ranks' models resolved different layer plans (a "
                                 f"layer not called on some rank's first batch?); use "
                                 f"'kronecker' or 'jvp'")
        assert probe.engine is not None
        return probe.engine, method

    def auto(self, probe: _FactorProbe, seed: int) -> Tuple[ProductEngine, str]:
        """gram, materialize, kronecker or jvp (see docs/gradients.md)."""
        if not probe.supported or float(probe.table[:, 2].min()) < 0.5:
            return self.fallback()
        engine = probe.engine
        assert engine is not None
        inputs, targets, batch_size = probe.first_batch
        _, agreement = self.shards.run_local(
            "checking the layer factors against jvp", _factors_match_jvp, engine, self.problem,
            inputs, targets, batch_size, "on batch 0", seed,
            report=lambda ok: (1.0 if ok else 0.0,), n_report=1)
        if not bool((agreement[:, 0] > 0).all()):
            return self.fallback()
        if (self.allow_gram and probe.all_2d and probe.same_plan
                and _gram_fits(self.problem, engine, self.n)
                and (not self.small or self.gram_over_materialize)):
            return engine, "gram"
        if self.small:
            return self.materialize()
        return engine, "kronecker"


def make_engine(problem: PerSampleProblem, method: str, chunk_size: Optional[int],
                sketch_impl: str, seed: int, allow_gram: bool,
                shards: Optional[SampleShards] = None) -> Tuple[ProductEngine, str]:
    """Resolve ``method`` to an engine; returns ``(engine, method_used)``.

    ``problem.n_samples_hint`` is the number of samples (of all ranks) when known. With a process
    group every rank probes its own first batch and the ranks decide together from the gathered
    facts, so all of them run the same method (``kronecker``/``gram`` only if the layer factors
    work on every rank, ``gram`` only if every rank resolved the same layer plan)."""
    owner = problem.owner
    shards = shards or SampleShards(None, owner)
    if method not in SVD_METHODS:
        raise ValueError(f"{owner}: method must be one of {SVD_METHODS}, got {method!r}")
    impl = resolve_sketch_impl(sketch_impl, problem.device, owner)
    if method == "materialize":
        return MaterializeEngine(problem, chunk_size), "materialize"
    if method == "jvp":
        return JvpEngine(problem, chunk_size), "jvp"
    if problem.own_loss and method != "auto":
        raise ValueError(f"{owner}: method={method!r} takes the layer factors from one forward and "
                         f"backward of the batch's per-sample losses; with loss_fn=None the model "
                         f"returns one loss per batch, so each sample's loss needs a forward of "
                         f"its own: use method='jvp', 'materialize' or 'auto', or pass a "
                         f"per-sample loss_fn (reduction='none')")
    chooser = _MethodChooser(problem, chunk_size, shards, allow_gram)
    if method == "auto" and problem.own_loss:
        return chooser.fallback()
    if method == "auto" and chooser.small and not chooser.gram_over_materialize:
        return chooser.materialize()
    probe = chooser.probe(impl)
    if method == "auto":
        return chooser.auto(probe, seed)
    return chooser.requested(method, probe)
