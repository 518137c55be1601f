r"""Gradient geometry: per-sample gradients, the gradient-covariance spectrum by randomized SVD
(never forming the per-sample gradient matrix), gradient rank, subspace overlaps and the
proposal's claim ``C ~ diag(H)`` as a measured statement.

Conventions
-----------
* ``loss_fn(outputs, targets)`` returns the **per-sample** losses, shape ``(batch,)``, e.g.
  ``nn.CrossEntropyLoss(reduction="none")``. A scalar (a loss without a per-sample dimension) or a
  loss module whose ``reduction`` is not ``"none"`` is an error.
* ``G`` is the ``n x d`` matrix of per-sample gradients, row ``i`` = :math:`g_i = \nabla_\theta
  \ell_i`, over all ``n`` samples of ``data``; :math:`\bar g = G^\top \mathbf 1 / n` is the full-data
  mean gradient. Parameters are flattened in ``model.named_parameters()`` order (restricted to
  ``params``): the layout of :class:`~landscape_ext.HessianOperator`, so vectors of both live in
  one space.
* Uncentred covariance :math:`C = G^\top G / n` (the second moment :math:`E[g g^\top]` of the
  proposal); centred :math:`C = (G - \mathbf 1 \bar g^\top)^\top (G - \mathbf 1 \bar g^\top) / n`.
  **Both divide by n** (population covariance; multiply by ``n / (n - 1)`` for the unbiased one).
* ``singular_values`` are those of :math:`G / \sqrt n` (centred: of the centred ``G``), so
  ``covariance_eigenvalues == singular_values ** 2`` exactly, and the right singular vectors are
  the eigenvectors of ``C``.
* Models are never left changed: everything runs under
  :func:`~landscape_ext.operators.model_state_guard` in eval mode (dropout off, BatchNorm with its
  running statistics — per-sample gradients are not defined with batch statistics), through
  :func:`torch.func.functional_call` on detached copies of the parameters; training flags,
  ``requires_grad`` and buffers are restored on return, also after an exception.
* ``data`` is one ``(inputs, targets)`` batch or a re-iterable of batches (a list, a DataLoader
  **without shuffling**): the randomized SVD passes over the data several times and sample ``i``
  must be the same sample on every pass. Each pass fingerprints every sample and a change of
  order or content (shuffle, augmentation) is an error.

Methods of :func:`gradient_covariance_svd`
------------------------------------------
``"kronecker"``
    Randomized range finder whose products with ``G`` come from layer factors: for a Linear (or
    Conv2d, after im2col) layer the per-sample weight gradient is :math:`g_i = \sum_t e_{i,t}
    a_{i,t}^\top` with ``a`` the layer input and ``e`` the output gradient, so ``G V^T`` is
    :func:`landscape_ext.ops.linear_grad_sketch` and ``G^T W`` is
    :func:`landscape_ext.ops.linear_grad_project`; one forward and one backward of the summed
    losses per batch per pass give all factors (the output gradients of the summed loss are
    per-sample because samples do not interact in eval mode). Parameters of other layers (norm
    affines, embeddings, ...) get per-sample gradients by ``vmap(grad)`` restricted to them. The
    factors (``O(n * layer widths)``) are kept across passes while they fit in 256 MiB, so later
    passes skip the forward and backward.
``"jvp"``
    Any model: ``G Z^T`` by forward-mode products of the per-sample loss vector in ``l``
    directions (``vmap`` of ``jvp``; double backward where forward AD is missing), ``G^T W`` by
    ``vmap`` of ``vjp`` with the columns of ``W`` as sample weights.
``"gram"``
    Exact, for models whose trainable parameters are in Linear layers on 2-D inputs (other small
    parameters allowed): :math:`G G^\top = \sum_\text{layers} (A A^\top + 1) \circ (E E^\top)`
    from the stored factors of all ``n`` samples, in float64, then its top-k eigenpairs (dense
    ``eigh`` for ``n <= 1024``, else block Lanczos to residuals ``<= 1e-12 |K|``). Cost ``n^2``
    times the summed layer widths; memory ``O(n^2 + n \cdot \text{widths})``, no ``n x d``
    matrix; the right singular vectors cost one more product.
``"materialize"``
    ``vmap(grad)`` into the full ``n x d`` matrix and an exact float64 SVD (small problems; the
    test oracle).
``"auto"``
    ``gram`` when it applies (checked against ``jvp`` on the first batch), ``n <= 8192`` and,
    for problems small enough to materialize (``n d <= 2^22``), ``n <= 2 d`` (measured on CPU:
    the Gram route is 2-40x faster than materialize + a full SVD there, and slower once the
    samples outnumber the parameters 3-4 times); else ``materialize`` when ``n d <= 2^22``; else
    ``kronecker`` when most parameters are in supported layers (checked against ``jvp`` on the
    first batch); else ``jvp``.

The randomized algorithm (Halko, Martinsson & Tropp 2011, Alg. 4.4): ``l = k + oversample``
Gaussian directions ``Omega``; ``Y = G_c Omega^T``; ``n_power_iter`` times: ``Q = qr(Y)``,
``Z = G_c^T Q`` orthonormalized by :func:`landscape_ext.block_orthonormalize`, ``Y = G_c Z``; then
``Q = qr(Y)``, ``B = Q^T G_c`` and the SVD of the ``l x d`` matrix ``B``. Centring is analytic:
``G_c Z = P (G Z)`` and ``G_c^T Q = G^T (P Q)`` with ``P = I - 1 1^T / n``. Data passes:
``2 n_power_iter + 2``. Memory: ``O((n + d) l)`` plus one batch.

Data parallel (``process_group=``)
----------------------------------
:func:`gradient_covariance_svd` takes a :mod:`torch.distributed` group: each rank passes its own
shard of the samples (any split; every rank needs at least one sample) and the same model (a
``DistributedDataParallel`` model is unwrapped and its group used by default); the rows of ``G``
are sharded over the ranks (rank order). The sketches are sums over samples or sample-sharded:

* one status exchange first (setup errors, sample counts, parameter count and checksum), so
  every rank knows ``n``, its row offset and that the models agree; ``method="auto"`` decides
  from the gathered facts (the sample count of all ranks; the layer factors only if every rank's
  probe and first-batch check succeed), so all ranks run the same method;
* randomized methods: ``Omega`` comes from the seeded CPU generator with ``(l, d)`` agreed on by
  all ranks (identical everywhere); ``Y = G_c Z^T`` stays row-sharded and is orthonormalized
  across the ranks by TSQR (local QR, all-gather of the ``l x l`` R factors, QR of their stack);
  centring uses all-reduced column sums; ``G_c^T Q`` is all-reduced (one ``l x d`` all-reduce per
  reverse pass). The ``l x d`` and ``l x l`` algebra then runs redundantly on identical inputs;
* ``gram``: the layer factors (``n_local x`` summed layer widths) are all-gathered and every rank
  forms the same ``n x n`` Gram matrix (memory as in one process on all samples);
* ``materialize``: the per-sample gradients are all-gathered (the whole ``n x d`` matrix on
  every rank: small problems only).

Every rank returns the same result except ``left_singular_vectors``: its own rows (samples
``sample_offset ..`` of the global order). Each rank's local work (data passes, probes) is
followed by a status exchange, so an error on one rank (an exception in the model or the loss,
a NaN/Inf) makes every rank raise — the failing rank its own error, the others
:class:`~landscape_ext.distributed.RankFailure` — instead of the others waiting in the next
collective. :func:`per_sample_gradients` and :func:`iter_per_sample_gradients` are local by
nature: in a distributed run each rank gets the rows of its own samples (no communication); the
other functions of this module take no process group (they see this rank's samples only).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from .. import distributed as _dist
from .. import ops, reference
from ..operators import model_state_guard, select_parameter_names
from ..results import Result

__all__ = [
    "per_sample_gradients",
    "iter_per_sample_gradients",
    "gradient_covariance_svd",
    "GradientCovarianceSVDResult",
    "gradient_rank",
    "GradientRankResult",
    "subspace_overlap",
    "SubspaceOverlapResult",
    "gradient_in_top_hessian_subspace",
    "TopHessianSubspaceResult",
    "compare_covariance_to_hessian_diagonal",
    "CovarianceHessianDiagonalResult",
    "SVD_METHODS",
]

log = logging.getLogger(__name__)

SVD_METHODS = ("auto", "kronecker", "jvp", "gram", "materialize")
SKETCH_IMPLS = ("auto", "fused", "composite")
# Which implementation of the Linear-layer sketch the pipeline uses by default, per device type,
# from bench/bench_gradients.py (ops section): the fused kernel where it measured faster than
# the einsum composite; on CUDA the composite (cuBLAS) until the kernel is measured there.
_DEFAULT_SKETCH_IMPL = {"cpu": "fused", "cuda": "composite"}

_MATERIALIZE_MAX = 1 << 22       # n * d elements for auto -> materialize
# auto on a problem small enough to materialize: gram when n <= this * d (measured, CPU, one
# thread: gram 2-40x faster than materialize + SVD for n <= d, even at n ~ 2 d, slower from
# n ~ 3-4 d on, where the n x n Gram matrix outgrows the n x d one)
_GRAM_OVER_MATERIALIZE = 2
_GRAM_MAX_N = 8192               # samples for auto -> gram
_GRAM_MAX_FACTOR_BYTES = 1 << 30  # stored factors for gram
_SAMPLE_CHUNK_ELEMENTS = 1 << 24  # per-sample gradient elements held at once (vmap(grad) chunks)
_FACTOR_CACHE_BYTES = 1 << 28     # layer factors kept across passes by the kronecker engine


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------


@dataclass(repr=False)
class GradientCovarianceSVDResult(Result):
    """Result of :func:`gradient_covariance_svd`.

    Attributes
    ----------
    singular_values : Tensor
        ``(k,)`` float64, descending: singular values of ``G / sqrt(n)`` (centred ``G`` when
        ``centered``).
    covariance_eigenvalues : Tensor
        ``(k,)`` float64, ``singular_values ** 2``: the top eigenvalues of ``C``.
    right_singular_vectors : Tensor or None
        ``(d, k)`` orthonormal columns in parameter space (eigenvectors of ``C``); not in
        ``to_dict()``.
    left_singular_vectors : Tensor or None
        ``(n, k)`` float64 orthonormal columns in sample space; not in ``to_dict()``. With a
        process group: this rank's rows only, ``(n_local, k)`` (see ``sample_offset``).
    n_samples, n_params : int
        ``n_samples`` counts the samples of all ranks.
    trace : float
        ``tr(C)`` (exact for ``gram``/``materialize``; for the randomized methods the
        Girard-Hutchinson estimate ``|G_c Omega^T|_F^2 / (l n)`` from the first sketch, free, with
        ``trace_stderr``).
    mean_gradient_norm : float
        ``|g_bar|`` (from the last reverse product; 0 if not computed).
    method, method_used : str
        Requested and run (``auto`` resolved).
    n_passes : int
        Passes over the data (a first-batch probe counts as none).
    n_forward_products, n_reverse_products : int
        Directions multiplied by ``G`` (``G z``) and by ``G^T`` (``G^T w``) in total, each over
        all ``n`` samples.
    world_size : int
        Ranks of the process group (1 without one).
    sample_offset : int
        Global index of this rank's first sample (0 without a process group); not in
        ``to_dict()``.
    """

    singular_values: Tensor
    covariance_eigenvalues: Tensor
    right_singular_vectors: Optional[Tensor] = field(default=None, metadata={"export": False})
    left_singular_vectors: Optional[Tensor] = field(default=None, metadata={"export": False})
    n_samples: int = 0
    n_params: int = 0
    k: int = 0
    centered: bool = True
    trace: float = float("nan")
    trace_stderr: float = 0.0
    mean_gradient_norm: float = 0.0
    method: str = "auto"
    method_used: str = ""
    forward_mode_used: Optional[str] = None
    sketch_impl: Optional[str] = None
    oversample: int = 0
    n_power_iter: int = 0
    n_passes: int = 0
    n_forward_products: int = 0
    n_reverse_products: int = 0
    seed: int = 0
    world_size: int = 1
    sample_offset: int = field(default=0, metadata={"export": False})
    time_s: float = 0.0

    @property
    def explained_variance_ratio(self) -> Tensor:
        """``covariance_eigenvalues / trace`` (estimated trace for the randomized methods)."""
        return self.covariance_eigenvalues / self.trace


@dataclass(repr=False)
class GradientRankResult(Result):
    """Result of :func:`gradient_rank`.

    Attributes
    ----------
    effective_rank : float
        Roy & Vetterli (2007): ``exp(H(p))`` with ``p = sigma / sum(sigma)`` (singular values).
    effective_rank_covariance : float
        The same entropy rank of the covariance spectrum, ``p = sigma^2 / sum(sigma^2)``.
    stable_rank : float
        ``sum(sigma^2) / max(sigma^2)`` (with ``total_energy`` as numerator when given).
    numerical_rank : int
        ``#{sigma > tol * max(sigma)}``.
    tol : float
        Relative tolerance used.
    n_values : int
    truncated : bool
        The values are a top-k truncation (``numerical_rank == n_values`` then means ``>=``).
    """

    effective_rank: float
    effective_rank_covariance: float
    stable_rank: float
    numerical_rank: int
    tol: float
    n_values: int
    truncated: bool = False


@dataclass(repr=False)
class SubspaceOverlapResult(Result):
    """Result of :func:`subspace_overlap`.

    ``overlap = |Qa^T Qb|_F^2 / min(p, q)`` = mean squared cosine of the principal angles, in
    ``[0, 1]`` (1: one subspace contains the other; ``~ max(p, q) / d`` for random subspaces).
    """

    overlap: float
    cosines: Tensor
    p: int
    q: int
    d: int

    @property
    def angles(self) -> Tensor:
        """Principal angles in radians, ascending."""
        return torch.arccos(self.cosines.clamp(-1.0, 1.0))


@dataclass(repr=False)
class TopHessianSubspaceResult(Result):
    """Result of :func:`gradient_in_top_hessian_subspace`.

    Attributes
    ----------
    gradient_fraction : float
        ``|V^T g_bar|^2 / |g_bar|^2``: share of the full-data gradient's squared norm inside the
        top-k Hessian eigenspace ``V``.
    covariance_trace_fraction : float
        ``tr(V^T C V) / tr(C)`` = ``sum_i |V^T g_i|^2 / sum_i |g_i|^2`` (centred: with
        ``g_i - g_bar``).
    per_direction_variance : Tensor
        ``(k,)`` ``v_j^T C v_j``.
    hessian_eigenvalues : Tensor
        ``(k,)`` of the eigenspace used.
    random_baseline : float
        ``k / d``: the expected fraction for a random k-dimensional subspace.
    """

    gradient_fraction: float
    covariance_trace_fraction: float
    per_direction_variance: Tensor
    hessian_eigenvalues: Tensor
    gradient_norm: float
    covariance_trace: float
    random_baseline: float
    k: int
    n_samples: int
    n_params: int
    centered: bool = False
    which: str = "largest"
    method_used: str = ""
    n_hessian_matvecs: int = 0
    hessian_converged: Optional[bool] = None
    seed: int = 0
    time_s: float = 0.0


@dataclass(repr=False)
class CovarianceHessianDiagonalResult(Result):
    """Result of :func:`compare_covariance_to_hessian_diagonal`.

    Attributes
    ----------
    covariance_diagonal : Tensor
        ``(d,)`` float64, exact ``diag(C)`` (``mean_i g_i^2``; centred: minus ``g_bar^2``).
    hessian_diagonal : Tensor
        ``(d,)`` float64, the engine's Hessian diagonal (an estimate unless ``exact``).
    hessian_diagonal_stderr : Tensor or None
        Its entrywise standard error where the estimator gives one.
    pearson, spearman : float
        Correlations of the two diagonals across parameters.
    relative_error : float
        ``|diag C - diag H| / |diag H|`` (the claim as stated, scale 1).
    scale : float
        Least-squares factor ``s`` in ``diag H ~ s diag C`` (``<c, h> / <c, c>``).
    relative_error_scaled : float
        ``|s diag C - diag H| / |diag H|``.
    hessian_noise : float
        ``|stderr| / |diag H|``: the estimator's own relative error (0 when exact); metrics cannot
        be trusted below about this level.
    fraction_negative_hessian : float
        Share of negative Hessian-diagonal entries (``diag C`` is nonnegative).
    """

    covariance_diagonal: Tensor = field(metadata={"export": False})
    hessian_diagonal: Tensor = field(metadata={"export": False})
    hessian_diagonal_stderr: Optional[Tensor] = field(default=None, metadata={"export": False})
    pearson: float = float("nan")
    spearman: float = float("nan")
    relative_error: float = float("nan")
    scale: float = float("nan")
    relative_error_scaled: float = float("nan")
    hessian_noise: float = 0.0
    fraction_negative_hessian: float = 0.0
    covariance_trace: float = 0.0
    hessian_trace: float = 0.0
    n_samples: int = 0
    n_params: int = 0
    centered: bool = False
    hessian_method: str = ""
    n_hessian_matvecs: int = 0
    method_used: str = ""
    seed: int = 0
    time_s: float = 0.0


# ------------------------------------------------------------------------------------------------
# the problem: parameters, data, per-sample losses
# ------------------------------------------------------------------------------------------------


def _check_reduction(loss_fn: Any, owner: str) -> None:
    red = getattr(loss_fn, "reduction", None)
    if isinstance(red, str) and red != "none":
        raise ValueError(
            f"{owner}: loss_fn has reduction={red!r}, but per-sample losses are needed: use "
            f"reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none')), so that "
            f"loss_fn(outputs, targets) returns one loss per sample, shape (batch,)")


def _check_losses(loss: Any, b: int, owner: str, where: str) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"{owner}: loss_fn must return a tensor of per-sample losses, got "
                        f"{type(loss).__name__} {where}")
    if loss.dim() == 0:
        raise ValueError(
            f"{owner}: loss_fn returned a scalar {where}: a loss without a per-sample dimension. "
            f"Return per-sample losses of shape (batch,) = ({b},), e.g. "
            f"nn.CrossEntropyLoss(reduction='none')")
    if tuple(loss.shape) != (b,):
        raise ValueError(f"{owner}: loss_fn must return per-sample losses of shape (batch,) = "
                         f"({b},), got {tuple(loss.shape)} {where}")
    return loss


def _is_single_batch(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def _to_device(x: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) and t.device != device
                           else t, x)


def _slice(x: Any, s: int, e: int) -> Any:
    return pytree.tree_map(lambda t: t[s:e] if isinstance(t, Tensor) else t, x)


def _unsqueeze0(x: Any) -> Any:
    return pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)


def _unwrap_ddp(model: Any) -> Any:
    """The module inside a DistributedDataParallel wrapper (whose forward hooks are for
    training); other models unchanged."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


class _Problem:
    """Selected parameters, data iteration with per-sample fingerprints, per-sample losses."""

    def __init__(self, model: nn.Module, loss_fn: Callable, data: Any,
                 params: Optional[Iterable[Union[str, Tensor]]], owner: str):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
        self.unwrapped_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        model = _unwrap_ddp(model)
        if not callable(loss_fn):
            raise TypeError(f"{owner}: loss_fn must be callable, got {type(loss_fn).__name__}")
        _check_reduction(loss_fn, owner)
        self.owner = owner
        self.model = model
        self.loss_fn = loss_fn
        named = list(model.named_parameters())
        sel = select_parameter_names(model, params, owner, ddp_prefix=self.unwrapped_ddp)
        pdict = dict(named)
        self.names: List[str] = sel
        self.shapes = {n: pdict[n].shape for n in sel}
        self.sizes = {n: pdict[n].numel() for n in sel}
        self.offsets: Dict[str, int] = {}
        off = 0
        for n in sel:
            self.offsets[n] = off
            off += self.sizes[n]
        self.d = off
        dtypes = {pdict[n].dtype for n in sel}
        devices = {pdict[n].device for n in sel}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"{owner}: selected parameters must share one dtype and device, got "
                             f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        self.dtype = dtypes.pop()
        if not self.dtype.is_floating_point:
            raise ValueError(f"{owner}: parameters must be floating point, got {self.dtype}")
        self.device = devices.pop()

        if _is_single_batch(data):
            self._src: Any = [tuple(data)]
        else:
            if not hasattr(data, "__iter__"):
                raise TypeError(f"{owner}: data must be one (inputs, targets) batch or an iterable "
                                f"of batches, got {type(data).__name__}")
            if iter(data) is data:
                raise TypeError(f"{owner}: data is a one-shot iterator; pass a re-iterable (a "
                                f"DataLoader without shuffling, or a list of batches)")
            self._src = data
        self.n_hint: Optional[int] = None
        if isinstance(self._src, (list, tuple)):
            try:
                self.n_hint = sum(int(b[1].shape[0]) for b in self._src)
            except Exception:  # noqa: BLE001 - a hint only
                self.n_hint = None
        else:
            # a DataLoader: the samples its sampler draws (a DistributedSampler: this rank's
            # share, not the whole data set), else the data set's length
            ds = getattr(self._src, "dataset", None)
            sampler = getattr(self._src, "sampler", None)
            bsampler = getattr(self._src, "batch_sampler", None)
            try:
                if sampler is not None and getattr(bsampler, "sampler", None) is sampler:
                    n = len(sampler)
                    bs = getattr(bsampler, "batch_size", None)
                    if getattr(bsampler, "drop_last", False) and bs:
                        n = n // int(bs) * int(bs)
                    self.n_hint = int(n)
                elif ds is not None and hasattr(ds, "__len__"):
                    self.n_hint = len(ds)
            except TypeError:  # a sampler or data set without a length
                self.n_hint = None
        self._fp_ref: Optional[Tensor] = None
        self._fp_w: Dict[int, Tensor] = {}
        self.n_samples: Optional[int] = None
        self.n_passes = 0

    # -- layout -------------------------------------------------------------------------------
    def split_rows(self, X: Tensor, names: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """``X (l, d)`` -> per-parameter views ``(l, *shape)``."""
        l = X.shape[0]
        return {n: X[:, self.offsets[n]:self.offsets[n] + self.sizes[n]].view(l, *self.shapes[n])
                for n in (names or self.names)}

    def block(self, X: Tensor, name: str) -> Tensor:
        """Columns of parameter ``name`` of ``X (l, d)`` (a view)."""
        o = self.offsets[name]
        return X[:, o:o + self.sizes[name]]

    def base_params(self) -> Dict[str, Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def call(self, pdict: Dict[str, Tensor], inputs: Any) -> Any:
        if isinstance(inputs, dict):
            return functional_call(self.model, pdict, args=(), kwargs=inputs, strict=False)
        if isinstance(inputs, (tuple, list)):
            return functional_call(self.model, pdict, tuple(inputs), strict=False)
        return functional_call(self.model, pdict, (inputs,), strict=False)

    def losses(self, pdict: Dict[str, Tensor], inputs: Any, targets: Tensor, b: int,
               where: str) -> Tensor:
        return _check_losses(self.loss_fn(self.call(pdict, inputs), targets), b, self.owner, where)

    # -- data -----------------------------------------------------------------------------------
    def _fingerprint(self, inputs: Any, targets: Tensor, b: int) -> Tensor:
        c = torch.zeros(b, dtype=torch.float64, device=targets.device)
        for t in pytree.tree_leaves((inputs, targets)):
            if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != b:
                continue
            x = t.detach().reshape(b, -1).to(torch.float64)
            f = x.shape[1]
            if f not in self._fp_w:
                g = torch.Generator().manual_seed(7919 + f)
                self._fp_w[f] = torch.rand(f, generator=g, dtype=torch.float64).add_(0.5)
            c = c + x @ self._fp_w[f].to(x.device)
        return c.cpu()

    def batches(self, record: bool = True) -> Iterator[Tuple[int, Any, Tensor, int]]:
        """Yield ``(index, inputs, targets, batch_size)``; with ``record`` the pass's sample
        fingerprints are compared with the first pass's when the iteration completes."""
        fps: List[Tensor] = []
        for i, batch in enumerate(self._src):
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise ValueError(f"{self.owner}: batch {i} must be (inputs, targets), got "
                                 f"{type(batch).__name__}")
            inputs, targets = _to_device(batch[0], self.device), _to_device(batch[1], self.device)
            if not isinstance(targets, Tensor) or targets.dim() == 0:
                raise ValueError(f"{self.owner}: batch {i}: targets must be a tensor with a batch "
                                 f"dimension")
            b = int(targets.shape[0])
            if record:
                fps.append(self._fingerprint(inputs, targets, b))
            yield i, inputs, targets, b
        if not record:
            return
        fp = torch.cat(fps) if fps else torch.zeros(0, dtype=torch.float64)
        if fp.numel() == 0:
            raise ValueError(f"{self.owner}: data contains no samples")
        self.n_passes += 1
        if self._fp_ref is None:
            self._fp_ref = fp
            self.n_samples = fp.numel()
            return
        same = fp.shape == self._fp_ref.shape and bool(
            ((fp - self._fp_ref).abs() <= 1e-9 * (fp.abs() + self._fp_ref.abs() + 1.0)).all())
        if not same:
            raise ValueError(
                f"{self.owner}: the data changed between passes ({fp.numel()} samples now, "
                f"{self._fp_ref.numel()} in the first pass, or different samples or order). "
                f"The randomized SVD reads the data several times and needs sample i to be the "
                f"same sample on every pass: use a DataLoader with shuffle=False and no random "
                f"augmentation, or a list of batches")

    def first_batch(self) -> Tuple[Any, Tensor, int]:
        for _, inputs, targets, b in self.batches(record=False):
            return inputs, targets, b
        raise ValueError(f"{self.owner}: data contains no batches")


def _check_finite(t: Tensor, what: str, owner: str, where: str) -> None:
    if not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise FloatingPointError(f"{owner}: {what} is not finite ({n_bad} NaN/Inf value(s)) "
                                 f"{where}")


# ------------------------------------------------------------------------------------------------
# per-sample gradients (vmap(grad), chunked)
# ------------------------------------------------------------------------------------------------


def _sample_chunk(b: int, d: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, min(b, int(chunk_size)))
    return max(1, min(b, _SAMPLE_CHUNK_ELEMENTS // max(d, 1)))


def _per_sample_grad_chunks(pb: _Problem, inputs: Any, targets: Tensor, b: int,
                            names: Sequence[str], chunk_size: Optional[int],
                            where: str) -> Iterator[Tuple[int, Tensor]]:
    """Yield ``(start, G_chunk (c, d_names))`` for the samples of one batch."""
    from torch.func import grad, vmap
    base = pb.base_params()
    sel = {n: base[n] for n in names}
    owner = pb.owner

    def single(p, x, t):
        full = dict(base)
        full.update(p)
        loss = pb.loss_fn(pb.call(full, _unsqueeze0(x)), _unsqueeze0(t))
        return _check_losses(loss, 1, owner, where)[0]

    g = vmap(grad(single), in_dims=(None, 0, 0))
    dn = sum(pb.sizes[n] for n in names)
    c = _sample_chunk(b, dn, chunk_size)
    for s in range(0, b, c):
        e = min(b, s + c)
        out = g(sel, _slice(inputs, s, e), targets[s:e])
        G = torch.cat([out[n].reshape(e - s, -1) for n in names], dim=1)
        _check_finite(G, "a per-sample gradient", owner, where)
        yield s, G


def iter_per_sample_gradients(model: nn.Module, loss_fn: Callable, data: Any, *,
                              params: Optional[Iterable[Union[str, Tensor]]] = None,
                              chunk_size: Optional[int] = None) -> Iterator[Tensor]:
    """Stream the per-sample gradients in chunks: yields ``(c, d)`` blocks, rows in data order.

    Same conventions as :func:`per_sample_gradients`; memory is one chunk (``chunk_size``
    samples, default such that a chunk holds about 16M elements).
    """
    pb = _Problem(model, loss_fn, data, params, "iter_per_sample_gradients")
    with model_state_guard(model, "eval"):
        for i, inputs, targets, b in pb.batches(record=False):
            for _, G in _per_sample_grad_chunks(pb, inputs, targets, b, pb.names, chunk_size,
                                                f"on batch {i}"):
                yield G


def per_sample_gradients(model: nn.Module, loss_fn: Callable, data: Any, *,
                         params: Optional[Iterable[Union[str, Tensor]]] = None,
                         chunk_size: Optional[int] = None,
                         dtype: Optional[torch.dtype] = None) -> Tensor:
    r"""The ``n x d`` matrix ``G`` of per-sample gradients, ``G[i] = grad of loss_i``.

    Computed by ``torch.func.vmap(grad)`` over chunks of samples, in eval mode (BatchNorm with
    running statistics, dropout off); the model is not changed.

    Parameters
    ----------
    model : nn.Module
    loss_fn : callable
        ``loss_fn(outputs, targets) -> (batch,)`` per-sample losses (``reduction="none"``).
    data : (inputs, targets) or iterable of batches
    params : iterable of str or Parameter, optional
        Subset of parameters (default: all with ``requires_grad``), flattened in
        ``named_parameters()`` order.
    chunk_size : int, optional
        Samples per vmapped call (default: about 16M gradient elements per chunk).
    dtype : torch.dtype, optional
        dtype of the returned matrix (default: the parameters').

    Returns
    -------
    Tensor
        ``(n, d)``. For large models prefer :func:`iter_per_sample_gradients` or the matrix-free
        :func:`gradient_covariance_svd`.

    Notes
    -----
    Per-sample gradients are local: in a :mod:`torch.distributed` run each rank gets the rows of
    its own ``data`` (no communication; gather them with
    :func:`landscape_ext.distributed.all_gather_rows` if needed). A
    ``DistributedDataParallel`` model is unwrapped (parameter names with or without the
    ``module.`` prefix are accepted).
    """
    pb = _Problem(model, loss_fn, data, params, "per_sample_gradients")
    rows: List[Tensor] = []
    with model_state_guard(model, "eval"):
        for i, inputs, targets, b in pb.batches(record=False):
            for _, G in _per_sample_grad_chunks(pb, inputs, targets, b, pb.names, chunk_size,
                                                f"on batch {i}"):
                rows.append(G if dtype is None else G.to(dtype))
    if not rows:
        raise ValueError("per_sample_gradients: data contains no samples")
    return torch.cat(rows)


# ------------------------------------------------------------------------------------------------
# engines: products of G and G^T with blocks of directions, one batch at a time
# ------------------------------------------------------------------------------------------------


class _Engine:
    """Per-batch products. ``prepare`` returns a context; ``forward(ctx, Z (l, d)) -> (b, l)`` is
    ``G_b Z^T``; ``reverse(ctx, W (b, l), out (l, d))`` adds ``W^T G_b``; ``sq_norms(ctx) -> (b,)``
    ``|g_i|^2``; ``sq_sum(ctx, out (d,))`` adds ``sum_i g_i^2``."""

    name = "engine"
    forward_mode_used: Optional[str] = None

    def __init__(self, pb: _Problem, chunk_size: Optional[int]):
        self.pb = pb
        self.chunk_size = chunk_size

    def prepare(self, inputs: Any, targets: Tensor, b: int, where: str) -> Any:
        raise NotImplementedError

    def prepare_indexed(self, i: int, inputs: Any, targets: Tensor, b: int, where: str) -> Any:
        """``prepare`` for batch ``i`` of a pass (engines may reuse work across passes)."""
        return self.prepare(inputs, targets, b, where)

    def forward(self, ctx: Any, Z: Tensor) -> Tensor:
        raise NotImplementedError

    def reverse(self, ctx: Any, W: Tensor, out: Tensor) -> None:
        raise NotImplementedError

    def sq_norms(self, ctx: Any) -> Tensor:
        raise NotImplementedError

    def sq_sum(self, ctx: Any, out: Tensor) -> None:
        raise NotImplementedError


class _MaterializeEngine(_Engine):
    """Per-sample gradients of the batch by vmap(grad) (chunked), then plain matmuls."""

    name = "materialize"

    def prepare(self, inputs, targets, b, where):
        blocks = [G for _, G in _per_sample_grad_chunks(self.pb, inputs, targets, b, self.pb.names,
                                                        self.chunk_size, where)]
        return torch.cat(blocks)

    def forward(self, G, Z):
        return G @ Z.to(G.dtype).T

    def reverse(self, G, W, out):
        out.add_((W.to(G.dtype).T @ G).to(out.dtype))

    def sq_norms(self, G):
        return G.pow(2).sum(1)

    def sq_sum(self, G, out):
        out.add_(G.pow(2).sum(0).to(out.dtype))


class _StreamingPerSample:
    """sq_norms / sq_sum by per-sample gradient chunks (O(chunk d) memory), for _JvpEngine."""

    pb: _Problem
    chunk_size: Optional[int]

    def _chunks(self, ctx):
        inputs, targets, b, where = ctx
        return _per_sample_grad_chunks(self.pb, inputs, targets, b, self.pb.names,
                                       self.chunk_size, where)

    def sq_norms(self, ctx):
        return torch.cat([G.pow(2).sum(1) for _, G in self._chunks(ctx)])

    def sq_sum(self, ctx, out):
        for _, G in self._chunks(ctx):
            out.add_(G.pow(2).sum(0).to(out.dtype))


def _is_missing_forward_ad(exc: BaseException) -> bool:
    m = str(exc).lower()
    return any(k in m for k in ("forward ad", "forward-mode", "forward mode", "jvp",
                                "not implemented", "does not support", "not supported"))


class _JvpEngine(_StreamingPerSample, _Engine):
    """Any model: G z by forward-mode AD (vmap over directions of jvp of the per-sample loss
    vector; double backward where forward AD is missing), G^T w by vmap of vjp."""

    name = "jvp"

    def prepare(self, inputs, targets, b, where):
        return (inputs, targets, b, where)

    def _chunks_of(self, l: int) -> List[Tuple[int, int]]:
        c = self.chunk_size or l
        return [(s, min(l, s + c)) for s in range(0, l, c)]

    def _loss_fn_of(self, ctx):
        inputs, targets, b, where = ctx
        base = self.pb.base_params()
        pb = self.pb

        def f(p):
            full = dict(base)
            full.update(p)
            return pb.losses(full, inputs, targets, b, where)

        return f, {n: base[n] for n in pb.names}

    def forward(self, ctx, Z):
        if self.forward_mode_used != "double-backward":
            try:
                out = self._forward_jvp(ctx, Z)
                self.forward_mode_used = "jvp"
                return out
            except (RuntimeError, NotImplementedError) as exc:
                if not _is_missing_forward_ad(exc):
                    raise
                log.warning("gradient products: forward-mode AD unavailable (%s); using double "
                            "backward", str(exc).splitlines()[0][:200])
        self.forward_mode_used = "double-backward"
        return self._forward_dbl(ctx, Z)

    def _forward_jvp(self, ctx, Z):
        from torch.func import jvp, vmap
        f, sel = self._loss_fn_of(ctx)
        names = self.pb.names

        def one(t):
            return jvp(f, (sel,), (t,))[1]

        outs = []
        for s, e in self._chunks_of(Z.shape[0]):
            tang = self.pb.split_rows(Z[s:e].to(self.pb.dtype), names)
            outs.append(vmap(one)(tang))
        return torch.cat(outs).T

    def _forward_dbl(self, ctx, Z):
        # G z = d/du <G^T u, z>: one backward with create_graph, then a batched backward.
        inputs, targets, b, where = ctx
        base = self.pb.base_params()
        leaves = {n: base[n].clone().requires_grad_(True) for n in self.pb.names}
        full = dict(base)
        full.update(leaves)
        with torch.enable_grad():
            losses = self.pb.losses(full, inputs, targets, b, where)
            u = torch.zeros_like(losses, requires_grad=True)
            gu = torch.autograd.grad(losses, list(leaves.values()), grad_outputs=u,
                                     create_graph=True, allow_unused=True)
            live = [(n, g) for n, g in zip(self.pb.names, gu) if g is not None and g.requires_grad]
            if not live:
                return Z.new_zeros((b, Z.shape[0]), dtype=self.pb.dtype)
            outs = []
            chunks = self._chunks_of(Z.shape[0])
            for ci, (s, e) in enumerate(chunks):
                rows = self.pb.split_rows(Z[s:e].to(self.pb.dtype))
                y = torch.autograd.grad([g for _, g in live], u, [rows[n] for n, _ in live],
                                        is_grads_batched=True, retain_graph=ci + 1 < len(chunks))
                outs.append(y[0])
        return torch.cat(outs).T

    def reverse(self, ctx, W, out):
        from torch.func import vjp, vmap
        f, sel = self._loss_fn_of(ctx)
        _, vjp_fn = vjp(f, sel)
        Wt = W.to(self.pb.dtype).T.contiguous()
        for s, e in self._chunks_of(Wt.shape[0]):
            (g,) = vmap(vjp_fn)(Wt[s:e])
            for n in self.pb.names:
                self.pb.block(out, n)[s:e].add_(g[n].reshape(e - s, -1).to(out.dtype))


# ---- Kronecker (layer-factor) engine ------------------------------------------------------------


class _KronUnsupported(Exception):
    pass


@dataclass
class _KronLayer:
    module: nn.Module
    label: str
    kind: str                 # "linear" | "conv2d"
    weight: Optional[str]     # selected weight name (None: not selected)
    bias: Optional[str]       # selected bias name
    n_out: int
    n_in: int                 # flattened (conv: C_in * kh * kw)


def _conv2d_padding(mod: nn.Conv2d) -> Optional[Tuple[int, int]]:
    pad = mod.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        if pad == "same" and all(s == 1 for s in mod.stride):
            p = []
            for k, dl in zip(mod.kernel_size, mod.dilation):
                tot = dl * (k - 1)
                if tot % 2:
                    return None  # asymmetric padding: not expressible by unfold
                p.append(tot // 2)
            return (p[0], p[1])
        return None
    return (int(pad[0]), int(pad[1]))


def _shared_elsewhere(name: str, owners: Dict[str, List[Tuple[str, nn.Module]]]) -> bool:
    return any(type(o) not in (nn.Linear, nn.Conv2d) for _, o in owners.get(name, []))


def _kron_plan(pb: _Problem) -> Tuple[List[_KronLayer], List[str]]:
    """Supported layers holding selected parameters, and the selected parameters left over."""
    by_id = {id(p): n for n, p in pb.model.named_parameters()}
    selected = set(pb.names)
    owners: Dict[str, List[Tuple[str, nn.Module]]] = {}
    for mname, mod in pb.model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if p is not None and id(p) in by_id:
                owners.setdefault(by_id[id(p)], []).append((mname, mod))
    layers: List[_KronLayer] = []
    covered = set()
    for mname, mod in pb.model.named_modules():
        kind = None
        if type(mod) is nn.Linear:
            kind = "linear"
            n_out, n_in = mod.out_features, mod.in_features
        elif (type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros"
              and _conv2d_padding(mod) is not None):
            kind = "conv2d"
            n_out = mod.out_channels
            n_in = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
        if kind is None:
            continue
        w = by_id.get(id(mod.weight))
        bname = by_id.get(id(mod.bias)) if mod.bias is not None else None
        w = w if w in selected else None
        bname = bname if bname in selected else None
        # a parameter shared with a module of another kind is not covered by the factors: it is
        # left to the per-sample gradients (all of its uses are then seen)
        w = None if w is not None and _shared_elsewhere(w, owners) else w
        bname = None if bname is not None and _shared_elsewhere(bname, owners) else bname
        if w is None and bname is None:
            continue
        layers.append(_KronLayer(mod, mname or "<root>", kind, w, bname, n_out, n_in))
        covered.update(x for x in (w, bname) if x is not None)
    others = [n for n in pb.names if n not in covered]
    return layers, others


def _composite_sketch(A: Tensor, E: Tensor, V: Tensor) -> Tensor:
    return reference.linear_grad_sketch(A, E, V)


class _KronEngine(_Engine):
    """G z and G^T w from layer inputs and output gradients (linear_grad_sketch/project); other
    selected parameters by per-sample gradients (vmap(grad) restricted to them)."""

    name = "kronecker"

    def __init__(self, pb: _Problem, chunk_size: Optional[int], sketch_impl: str):
        super().__init__(pb, chunk_size)
        self.layers, self.others = _kron_plan(pb)
        if not self.layers:
            raise _KronUnsupported("no Linear/Conv2d layer holds a selected parameter")
        self.sketch_impl = sketch_impl
        self._sketch = ops.linear_grad_sketch if sketch_impl == "fused" else _composite_sketch
        # factors of each batch, kept across passes while they fit in _FACTOR_CACHE_BYTES (the
        # samples are checked to be the same on every pass): later passes skip forward/backward
        self._cache: Optional[Dict[int, Any]] = {}
        self._cache_bytes = 0

    @property
    def kron_fraction(self) -> float:
        return 1.0 - sum(self.pb.sizes[n] for n in self.others) / self.pb.d

    def demote(self, layer: _KronLayer, why: str) -> None:
        """Hand a layer's parameters (and every layer sharing them) to per-sample gradients."""
        log.info("kronecker: layer %s handled by per-sample gradients (%s)", layer.label, why)
        names = {n for n in (layer.weight, layer.bias) if n is not None}
        gone = [L for L in self.layers if names & {L.weight, L.bias}]
        for L in gone:
            self.layers.remove(L)
            names |= {n for n in (L.weight, L.bias) if n is not None}
        keep = set(self.others) | names
        self.others = [n for n in self.pb.names if n in keep]

    def capture(self, inputs, targets, b, where):
        """Forward with hooks + one backward of the summed per-sample losses:
        ``{layer: [(A, E), ...]}`` for each call of each layer."""
        pb = self.pb
        base = pb.base_params()
        leaves = {n: base[n].clone().requires_grad_(True) for n in pb.names}
        full = dict(base)
        full.update(leaves)
        records: Dict[int, List[Tuple[Tensor, Tensor]]] = {id(L): [] for L in self.layers}
        handles = []
        for L in self.layers:
            def hook(mod, args, kwargs, out, _key=id(L)):
                x = args[0] if args else kwargs.get("input")
                records[_key].append((x.detach(), out))
            handles.append(L.module.register_forward_hook(hook, with_kwargs=True))
        try:
            with torch.enable_grad():
                losses = pb.losses(full, inputs, targets, b, where)
        finally:
            for h in handles:
                h.remove()
        _check_finite(losses.detach(), "the per-sample loss", pb.owner, where)
        outs = [o for L in self.layers for _, o in records[id(L)]]
        grads = (torch.autograd.grad(losses.sum(), outs, allow_unused=True) if outs else [])
        gi = iter(grads)
        factors: Dict[int, List[Tuple[Tensor, Tensor]]] = {}
        for L in self.layers:
            lst = []
            for x, o in records[id(L)]:
                e = next(gi)
                if e is None:
                    e = torch.zeros_like(o)
                lst.append(self._factor(L, x, e.detach(), b))
            factors[id(L)] = lst
        return factors

    @staticmethod
    def _factor(L: _KronLayer, x: Tensor, e: Tensor, b: int) -> Tuple[Tensor, Tensor]:
        if x.dim() < 2 or x.shape[0] != b:
            raise _KronUnsupported(f"layer {L.label} input has shape {tuple(x.shape)}: its first "
                                   f"dimension is not the batch of {b} samples")
        if L.kind == "linear":
            if x.dim() == 2:
                return x, e
            return x.reshape(b, -1, L.n_in), e.reshape(b, -1, L.n_out)
        mod = L.module
        A = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=_conv2d_padding(mod),
                     stride=mod.stride)                    # (b, C_in kh kw, P)
        return A.transpose(1, 2), e.reshape(b, L.n_out, -1).transpose(1, 2)

    def probe(self, inputs, targets, b, where) -> None:
        """First batch: layers never called (e.g. an out_proj used functionally) or called on
        inputs whose first dimension is not the batch move to per-sample gradients."""
        while True:
            try:
                factors = self.capture(inputs, targets, b, where)
            except _KronUnsupported as exc:
                bad = next((L for L in self.layers if f"layer {L.label} " in str(exc)), None)
                if bad is None:
                    raise
                self.demote(bad, str(exc))
                continue
            silent = [L for L in self.layers if not factors[id(L)]]
            for L in silent:
                if L in self.layers:
                    self.demote(L, "its forward was never called")
            if not self.layers:
                raise _KronUnsupported("no Linear/Conv2d layer is called on the batch")
            if silent:
                continue
            # gram needs Linear layers on 2-D inputs, each called once per batch
            self.all_2d = all(L.kind == "linear" and len(factors[id(L)]) == 1
                              and factors[id(L)][0][0].dim() == 2 for L in self.layers)
            return

    def prepare_indexed(self, i, inputs, targets, b, where):
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        ctx = self.prepare(inputs, targets, b, where)
        if self._cache is not None:
            factors, G_o, _ = ctx
            tensors = [t for fs in factors.values() for pair in fs for t in pair]
            tensors += [G_o] if G_o is not None else []
            self._cache_bytes += sum(t.numel() * t.element_size() for t in tensors)
            if self._cache_bytes <= _FACTOR_CACHE_BYTES:
                self._cache[i] = ctx
            else:
                self._cache = None
        return ctx

    def prepare(self, inputs, targets, b, where):
        factors = self.capture(inputs, targets, b, where)
        G_o = None
        if self.others:
            G_o = torch.cat([G for _, G in _per_sample_grad_chunks(
                self.pb, inputs, targets, b, self.others, self.chunk_size, where)])
        return factors, G_o, b

    def forward(self, ctx, Z):
        factors, G_o, b = ctx
        Z = Z.to(self.pb.dtype)
        l = Z.shape[0]
        y = Z.new_zeros((b, l))
        for L in self.layers:
            for A, E in factors[id(L)]:
                if L.weight is not None:
                    V = self.pb.block(Z, L.weight).view(l, L.n_out, L.n_in)
                    y += self._sketch(A, E, V)
                if L.bias is not None:
                    Eb = E if E.dim() == 2 else E.sum(1)
                    y += Eb @ self.pb.block(Z, L.bias).T
        if G_o is not None:
            y += G_o @ torch.cat([self.pb.block(Z, n) for n in self.others], 1).T
        return y

    def reverse(self, ctx, W, out):
        factors, G_o, b = ctx
        W = W.to(self.pb.dtype).contiguous()
        l = W.shape[1]
        for L in self.layers:
            for A, E in factors[id(L)]:
                if L.weight is not None:
                    P = ops.linear_grad_project(A, E, W)
                    self.pb.block(out, L.weight).add_(P.view(l, -1).to(out.dtype))
                if L.bias is not None:
                    Eb = E if E.dim() == 2 else E.sum(1)
                    self.pb.block(out, L.bias).add_((W.T @ Eb).to(out.dtype))
        if G_o is not None:
            R = W.T @ G_o
            off = 0
            for n in self.others:
                s = self.pb.sizes[n]
                self.pb.block(out, n).add_(R[:, off:off + s].to(out.dtype))
                off += s

    def sq_norms(self, ctx):
        factors, G_o, b = ctx
        acc = torch.zeros(b, dtype=torch.float64, device=self.pb.device)
        for L in self.layers:
            for A, E in factors[id(L)]:
                A64, E64 = A.double(), E.double()
                if L.weight is not None:
                    if A.dim() == 2:
                        acc += E64.pow(2).sum(1) * A64.pow(2).sum(1)
                    else:  # |sum_t e_t a_t^T|_F^2 = sum_{t,s} (e_t.e_s)(a_t.a_s)
                        acc += (torch.bmm(E64, E64.transpose(1, 2))
                                * torch.bmm(A64, A64.transpose(1, 2))).sum((1, 2))
                if L.bias is not None:
                    Eb = E64 if E.dim() == 2 else E64.sum(1)
                    acc += Eb.pow(2).sum(1)
        if G_o is not None:
            acc += G_o.double().pow(2).sum(1)
        return acc

    def sq_sum(self, ctx, out):
        factors, G_o, b = ctx
        for L in self.layers:
            for A, E in factors[id(L)]:
                if L.weight is not None:
                    if A.dim() == 2:
                        s = E.double().pow(2).T @ A.double().pow(2)
                    else:
                        s = reference.per_sample_linear_grads(A.double(), E.double()).pow(2).sum(0)
                    self.pb.block(out.view(1, -1), L.weight).add_(s.reshape(1, -1))
                if L.bias is not None:
                    Eb = E if E.dim() == 2 else E.sum(1)
                    self.pb.block(out.view(1, -1), L.bias).add_(Eb.double().pow(2).sum(0)[None])
        if G_o is not None:
            sq = G_o.double().pow(2).sum(0)
            off = 0
            for n in self.others:
                s = self.pb.sizes[n]
                self.pb.block(out.view(1, -1), n).add_(sq[None, off:off + s])
                off += s


# ------------------------------------------------------------------------------------------------
# data parallel: samples (rows of G) sharded over the ranks of a process group
# ------------------------------------------------------------------------------------------------


class _Comm:
    """The collectives of one call over a process group; ``group=None`` (one process): every
    method is the single-process operation (no communication, errors raised directly).

    The rows of ``G`` are sharded: rank ``r`` holds ``counts[r]`` samples, rows ``offset ..
    offset + counts[r]`` of the global matrix (ranks in order). Local work that can fail (a data
    pass, a probe) runs through :meth:`local`, which exchanges a failure status right after it,
    so a rank that raises makes every rank raise (the others :class:`RankFailure`) before the
    next collective instead of leaving them waiting in it."""

    def __init__(self, group: Any, owner: str):
        self.group = group
        self.owner = owner
        self.rank, self.world = _dist.rank_and_world(group)
        self.counts: Optional[List[int]] = None
        self.device: Optional[torch.device] = None   # where an NCCL group's status exchanges run

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def local(self, where: str, fn: Callable, *args: Any,
              report: Optional[Callable[[Any], Sequence[float]]] = None, n_report: int = 0,
              **kwargs: Any) -> Tuple[Any, Tensor]:
        """Run ``fn(*args, **kwargs)`` here, then the status exchange (every rank must call this
        at the same point). ``report(out)`` gives ``n_report`` floats exchanged with the status.
        Returns ``(out, table)``: ``table`` is ``(W, n_report)``, row ``r`` from rank ``r``."""
        error: Optional[BaseException] = None
        out: Any = None
        vals: Sequence[float] = ()
        try:
            out = fn(*args, **kwargs)
            if report is not None:
                vals = [float(v) for v in report(out)]
                if len(vals) != n_report:
                    raise RuntimeError(f"{self.owner}: internal: {len(vals)} status values, "
                                       f"{n_report} expected")
        except Exception as exc:  # noqa: BLE001 - every rank raises in exchange_status
            if self.group is None:
                raise
            error = exc
            vals = [0.0] * n_report
        table = _dist.exchange_status(self.group, error, vals, where, self.device)
        return out, table

    def set_counts(self, table: Tensor) -> None:
        """Sample counts of the ranks from column 0 of a status table."""
        self.counts = [int(round(v)) for v in table[:, 0].tolist()]

    @property
    def n_total(self) -> int:
        assert self.counts is not None
        return sum(self.counts)

    @property
    def n_local(self) -> int:
        assert self.counts is not None
        return self.counts[self.rank]

    @property
    def offset(self) -> int:
        assert self.counts is not None
        return sum(self.counts[:self.rank])

    def sum_(self, t: Tensor) -> Tensor:
        """All-reduce (sum over the ranks) in place."""
        return _dist.all_reduce_sum_(t, self.group)

    def center(self, X: Tensor, centered: bool) -> Tensor:
        """Subtract the column mean over the samples of all ranks."""
        if not centered:
            return X
        if self.group is None:
            return X - X.mean(0, keepdim=True)
        m = self.sum_(X.sum(0, keepdim=True)) / self.n_total
        return X - m

    def orth(self, Y: Tensor) -> Tensor:
        """Orthonormal basis ``Q`` (row-sharded like ``Y``, ``min(n, l)`` columns) of the range of
        the row-sharded ``Y (n, l)``. Distributed: TSQR (Demmel et al. 2012) — local Householder
        QR ``Y_r = Q_r R_r``, all-gather of the ``R_r``, QR of their stack ``= Q_s R``, ``Q`` on
        rank ``r`` = ``Q_r Q_s[block r]``: orthonormal to machine precision for any
        conditioning or rank (unlike CholeskyQR on ``Y^T Y``). Every rank factors the same
        stack."""
        if self.group is None:
            return torch.linalg.qr(Y, mode="reduced")[0]
        assert self.counts is not None
        l = Y.shape[1]
        Q1, R1 = torch.linalg.qr(Y, mode="reduced")          # (n_r, c_r), (c_r, l)
        cs = [min(c, l) for c in self.counts]
        stack = _dist.all_gather_rows(R1, cs, self.group)     # (sum c_r, l)
        Q2, _ = torch.linalg.qr(stack, mode="reduced")
        o = sum(cs[:self.rank])
        return Q1 @ Q2[o:o + cs[self.rank]]

    def gather_rows(self, t: Tensor) -> Tensor:
        """The row-sharded ``t`` whole on every rank."""
        if self.group is None:
            return t
        assert self.counts is not None
        return _dist.all_gather_rows(t, self.counts, self.group)

    def local_rows(self, t: Tensor) -> Tensor:
        """This rank's rows of a global ``(n, ...)`` tensor."""
        if self.group is None:
            return t
        return t[self.offset:self.offset + self.n_local]


def _param_checksum(pb: "_Problem") -> float:
    pd = dict(pb.model.named_parameters())
    with torch.no_grad():
        acc = torch.zeros((), dtype=torch.float64)
        for i, n in enumerate(pb.names):
            p = pd[n].detach()
            acc += (p.sum(dtype=torch.float64) * (i + 1)
                    + torch.linalg.vector_norm(p, dtype=torch.float64)).cpu()
    return float(acc)


def _plan_signature(eng: Any) -> float:
    """A checksum of the layer-factor engine's split of the parameters (equal on all ranks when
    the ranks resolved the same plan)."""
    import zlib
    text = ";".join([f"{L.label}:{L.weight}:{L.bias}" for L in eng.layers] + list(eng.others))
    return float(zlib.crc32(text.encode()))


# ------------------------------------------------------------------------------------------------
# method selection and passes
# ------------------------------------------------------------------------------------------------


def _resolve_sketch_impl(sketch_impl: str, device: torch.device, owner: str) -> str:
    if sketch_impl not in SKETCH_IMPLS:
        raise ValueError(f"{owner}: sketch_impl must be one of {SKETCH_IMPLS}, got {sketch_impl!r}")
    if sketch_impl != "auto":
        return sketch_impl
    return _DEFAULT_SKETCH_IMPL.get(device.type, "composite")


def _kron_validated(eng: _KronEngine, pb: _Problem, inputs, targets, b, where, seed) -> bool:
    """Compare the factor sketch with jvp on the first batch (2 random directions)."""
    g = torch.Generator().manual_seed(seed + 991)
    Z = torch.randn(2, pb.d, generator=g, dtype=torch.float64).to(pb.device, pb.dtype)
    y_k = eng.forward(eng.prepare(inputs, targets, b, where), Z).double()
    ref_eng = _JvpEngine(pb, None)
    y_j = ref_eng.forward(ref_eng.prepare(inputs, targets, b, where), Z).double()
    tol = 1e-9 if pb.dtype == torch.float64 else 2e-3
    err = (y_k - y_j).norm() / y_j.norm().clamp_min(1e-300)
    if not bool(err <= tol):
        log.warning("%s: the layer-factor products disagree with jvp on the first batch (relative "
                    "error %.2e): a Linear/Conv weight is used outside its module's forward, or "
                    "samples interact; using method='jvp'", pb.owner, float(err))
        return False
    return True


def _gram_fits(pb: _Problem, eng: "_KronEngine", n: Optional[int]) -> bool:
    """The gram route's size limits: ``n <= _GRAM_MAX_N`` and the stored factors (float64)."""
    if n is None or n > _GRAM_MAX_N:
        return False
    widths = sum(L.n_in + L.n_out for L in eng.layers)
    d_other = sum(pb.sizes[name] for name in eng.others)
    return n * (widths + d_other) * 8 <= _GRAM_MAX_FACTOR_BYTES


def _make_engine(pb: _Problem, method: str, chunk_size: Optional[int], sketch_impl: str,
                 seed: int, allow_gram: bool, comm: Optional[_Comm] = None) -> Tuple[_Engine, str]:
    """Resolve ``method`` to an engine; returns (engine, method_used).

    ``pb.n_hint`` is the number of samples (of all ranks) when known. With a process group every
    rank probes its own first batch and the ranks decide together from the gathered facts, so
    all of them run the same method (``kronecker``/``gram`` only if the layer factors work on
    every rank, ``gram`` only if every rank resolved the same layer plan)."""
    owner = pb.owner
    comm = comm or _Comm(None, owner)
    if method not in SVD_METHODS:
        raise ValueError(f"{owner}: method must be one of {SVD_METHODS}, got {method!r}")
    impl = _resolve_sketch_impl(sketch_impl, pb.device, owner)
    if method == "materialize":
        return _MaterializeEngine(pb, chunk_size), "materialize"
    if method == "jvp":
        return _JvpEngine(pb, chunk_size), "jvp"
    n = pb.n_hint
    small = n is not None and n * pb.d <= _MATERIALIZE_MAX
    # gram beats materialize + a full SVD unless the samples far outnumber the parameters
    gram_over_materialize = allow_gram and n is not None and n <= _GRAM_OVER_MATERIALIZE * pb.d
    if method == "auto" and small and not gram_over_materialize:
        return _MaterializeEngine(pb, chunk_size), "materialize"

    def probe():
        inputs, targets, b = pb.first_batch()
        try:
            eng = _KronEngine(pb, chunk_size, impl)
            eng.probe(inputs, targets, b, "on batch 0")
        except _KronUnsupported as exc:
            return None, str(exc), (inputs, targets, b)
        return eng, "", (inputs, targets, b)

    (eng, why, first), table = comm.local(
        "probing the model (choosing the method)", probe, n_report=4,
        report=lambda o: ((0.0 if o[0] is None else 1.0),
                          (1.0 if o[0] is not None and o[0].all_2d else 0.0),
                          (o[0].kron_fraction if o[0] is not None else 0.0),
                          (_plan_signature(o[0]) if o[0] is not None else -1.0)))
    supported = bool((table[:, 0] > 0).all())
    if not supported:
        if method in ("kronecker", "gram"):
            bad = [r for r in range(comm.world) if table[r, 0] <= 0]
            detail = why if why else f"on rank(s) {bad}"
            raise ValueError(f"{owner}: method={method!r} needs Linear/Conv2d layers holding the "
                             f"parameters: {detail}") from None
        return ((_MaterializeEngine(pb, chunk_size), "materialize") if small
                else (_JvpEngine(pb, chunk_size), "jvp"))
    assert eng is not None
    all_2d = bool((table[:, 1] > 0).all())
    same_plan = bool((table[:, 3] == table[0, 3]).all())
    if method == "gram":
        if not all_2d:
            raise ValueError(f"{owner}: method='gram' needs Linear layers on 2-D inputs (one "
                             f"position per sample, one call per batch); use 'kronecker' or "
                             f"'jvp'")
        if not same_plan:
            raise ValueError(f"{owner}: method='gram' needs the same layer factors on every rank, "
                             f"but the ranks' models resolved different layer plans (a layer "
                             f"not called on some rank's first batch?); use 'kronecker' or "
                             f"'jvp'")
        return eng, "gram"
    if method == "kronecker":
        return eng, "kronecker"
    # auto
    fallback = ((_MaterializeEngine(pb, chunk_size), "materialize") if small
                else (_JvpEngine(pb, chunk_size), "jvp"))
    if float(table[:, 2].min()) < 0.5:
        return fallback
    inputs, targets, b = first
    _, vt = comm.local("checking the layer factors against jvp", _kron_validated, eng, pb,
                        inputs, targets, b, "on batch 0", seed,
                        report=lambda v: (1.0 if v else 0.0,), n_report=1)
    if not bool((vt[:, 0] > 0).all()):
        return fallback
    if allow_gram and all_2d and same_plan and _gram_fits(pb, eng, n) and (
            not small or gram_over_materialize):
        return eng, "gram"
    if small:
        return _MaterializeEngine(pb, chunk_size), "materialize"
    return eng, "kronecker"


def _iter(pb: _Problem, eng: _Engine, progress: bool, desc: str):
    it = pb.batches()
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=desc, leave=False)
    for i, inputs, targets, b in it:
        where = f"on batch {i}"
        yield eng.prepare_indexed(i, inputs, targets, b, where), b, where


def _forward_pass(pb: _Problem, eng: _Engine, Z: Tensor, progress: bool) -> Tensor:
    """``Y = G Z^T`` (n, l), float64."""
    blocks = []
    for ctx, b, where in _iter(pb, eng, progress, "G Z"):
        y = eng.forward(ctx, Z)
        _check_finite(y, "a gradient product", pb.owner, where)
        blocks.append(y.to(torch.float64))
    return torch.cat(blocks)


def _reverse_pass(pb: _Problem, eng: _Engine, W: Tensor, progress: bool,
                  out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``G^T W`` as rows ``(l, d)``; ``W (n, l)``."""
    out = torch.zeros(W.shape[1], pb.d, dtype=out_dtype or pb.dtype, device=pb.device)
    off = 0
    for ctx, b, where in _iter(pb, eng, progress, "G^T W"):
        if off + b > W.shape[0]:
            raise ValueError(f"{pb.owner}: the data has more samples than the first pass "
                             f"({W.shape[0]}): it changed between passes")
        eng.reverse(ctx, W[off:off + b], out)
        off += b
    _check_finite(out, "a gradient product", pb.owner, "in a reverse pass")
    return out


def _center(X: Tensor, centered: bool) -> Tensor:
    return X - X.mean(0, keepdim=True) if centered else X


def _orthonormal_rows(Z: Tensor) -> Tuple[Tensor, Tensor]:
    """``Z (l, d) = r^T q`` with orthonormal rows q (rank-deficient directions replaced)."""
    dt = Z.dtype if Z.dtype in (torch.float32, torch.float64) else torch.float32
    Zc = Z.to(dt).contiguous()
    basis = Zc.new_empty((0, Zc.shape[1]))
    q, _, r = ops.block_orthonormalize(basis, Zc, 0)
    return q, r


# ------------------------------------------------------------------------------------------------
# gradient_covariance_svd
# ------------------------------------------------------------------------------------------------


def gradient_covariance_svd(model: nn.Module, loss_fn: Callable, data: Any, k: int, *,
                            centered: bool = True, n_power_iter: int = 2, oversample: int = 10,
                            method: str = "auto",
                            params: Optional[Iterable[Union[str, Tensor]]] = None,
                            seed: int = 0, return_vectors: bool = True,
                            chunk_size: Optional[int] = None, sketch_impl: str = "auto",
                            progress: bool = False,
                            process_group: Any = None) -> GradientCovarianceSVDResult:
    r"""Top-``k`` spectrum of the gradient covariance without forming the ``n x d`` matrix of
    per-sample gradients.

    See the module docstring for the conventions (``n`` divisor, scaling of the singular values)
    and the methods, and its section *Data parallel* for ``process_group``.

    Parameters
    ----------
    model : nn.Module
    loss_fn : callable
        ``loss_fn(outputs, targets) -> (batch,)`` per-sample losses (``reduction="none"``).
    data : (inputs, targets) or re-iterable of batches
        Same samples in the same order on every pass (no shuffling).
    k : int
        Singular values wanted, ``1 <= k <= min(n, d)``.
    centered : bool
        Centred covariance (default) or the second moment ``E[g g^T]``.
    n_power_iter : int
        Power (subspace) iterations of the randomized methods (each costs two data passes); the
        error of ``sigma_j`` decays like ``(sigma_{l+1} / sigma_j)^(2 q + 1)``.
    oversample : int
        Extra directions (``l = k + oversample``).
    method : {"auto", "kronecker", "jvp", "gram", "materialize"}
    params : iterable of str or Parameter, optional
        Subset of parameters (default: all with ``requires_grad``).
    seed : int
        Seed of the Gaussian test matrix.
    return_vectors : bool
        Also return the right (``(d, k)``, parameter space) and left (``(n, k)``) singular
        vectors.
    chunk_size : int, optional
        Directions per vmapped jvp/vjp call and samples per vmapped per-sample-gradient call.
    sketch_impl : {"auto", "fused", "composite"}
        Linear-layer sketch: the fused op or the einsum composite (``auto``: the measured faster
        one for the device).
    progress : bool
        tqdm bars per pass.
    process_group : torch.distributed group, optional
        Data parallel: every rank of the group passes its own shard of the samples (any split,
        uneven included) and the same model; the result is that of all samples of all ranks.
        A :class:`~torch.nn.parallel.DistributedDataParallel` model is unwrapped and reduces over
        its own group by default. Every rank must call with the same arguments (but ``data``).

    Returns
    -------
    GradientCovarianceSVDResult
        With a process group: identical on every rank except ``left_singular_vectors``, which
        holds this rank's samples (rows ``sample_offset .. sample_offset + n_local`` of the
        global ``(n, k)`` matrix, ranks in order).

    Raises
    ------
    ValueError
        ``k > min(n, d)``, a loss without a per-sample dimension or with a reduction, data that
        changes between passes, an unknown method; with a process group also ranks with
        different models.
    RankFailure
        With a process group, on every rank when another rank's local work failed (the failing
        rank raises its own error).
    """
    t0 = time.perf_counter()
    owner = "gradient_covariance_svd"
    if isinstance(model, nn.parallel.DistributedDataParallel) and process_group is None:
        process_group = model.process_group      # DDP's group unless another one is given
    group = _dist.resolve_group(process_group, owner)
    comm = _Comm(group, owner)
    if group is not None and isinstance(model, nn.Module):
        comm.device = next((p.device for p in model.parameters()), None)
    progress = bool(progress) and comm.rank == 0     # bars on one rank only

    def setup() -> _Problem:
        pb = _Problem(model, loss_fn, data, params, owner)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{owner}: k must be a positive integer, got {k!r}")
        if k > pb.d:
            raise ValueError(f"{owner}: k = {k} exceeds min(n_samples, n_params): the model has "
                             f"d = {pb.d} parameters")
        if int(n_power_iter) < 0 or int(oversample) < 0:
            raise ValueError(f"{owner}: n_power_iter and oversample must be >= 0, got "
                             f"{n_power_iter} and {oversample}")
        return pb

    # one status exchange: setup errors, sample-count hints, parameter count and checksum
    pb, table = comm.local("setting up", setup, n_report=3,
                           report=lambda pb: (-1.0 if pb.n_hint is None else pb.n_hint, pb.d,
                                              _param_checksum(pb) if group is not None else 0.0))
    if group is not None:
        if bool((table[:, 1] != table[0, 1]).any()):
            sizes = ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(table[:, 1].tolist()))
            raise ValueError(f"{owner}: the ranks have different parameter counts ({sizes}); "
                             f"every rank must hold the same model")
        pc = table[:, 2]
        if bool(((pc - pc[0]).abs() > 1e-9 * (pc[0].abs() + 1.0)).any()):
            raise ValueError(f"{owner}: the model parameters differ between ranks (checksums "
                             f"{[f'{v:.12g}' for v in pc.tolist()]}); seed the model identically "
                             f"or broadcast rank 0's parameters (DDP does this at construction)")
        hints = table[:, 0]
        pb.n_hint = int(hints.sum()) if bool((hints >= 0).all()) else None
    if pb.n_hint is not None and k > min(pb.n_hint, pb.d):
        raise ValueError(f"{owner}: k = {k} exceeds min(n_samples, n_params) = "
                         f"min({pb.n_hint}, {pb.d}) = {min(pb.n_hint, pb.d)}")
    with model_state_guard(pb.model, "eval"):
        eng, used = _make_engine(pb, method, chunk_size, sketch_impl, seed, allow_gram=True,
                                 comm=comm)
        if used == "materialize":
            res = _svd_materialize(pb, eng, k, centered, return_vectors, progress, comm)
        elif used == "gram":
            res = _svd_gram(pb, eng, k, centered, return_vectors, progress, seed, comm)
        else:
            res = _svd_randomized(pb, eng, k, centered, int(n_power_iter), int(oversample), seed,
                                  return_vectors, progress, comm)
    res.method = method
    res.method_used = used
    res.forward_mode_used = eng.forward_mode_used
    res.sketch_impl = getattr(eng, "sketch_impl", None)
    res.centered = centered
    res.seed = seed
    res.k = k
    res.n_params = pb.d
    res.n_passes = pb.n_passes
    res.world_size = comm.world
    res.sample_offset = comm.offset if comm.counts is not None else 0
    res.time_s = time.perf_counter() - t0
    return res


def _check_k_n(pb: _Problem, k: int, n: int) -> None:
    if k > min(n, pb.d):
        raise ValueError(f"{pb.owner}: k = {k} exceeds min(n_samples, n_params) = "
                         f"min({n}, {pb.d}) = {min(n, pb.d)}")


def _finish(S: Tensor, k: int, n: int, U: Optional[Tensor], Vrows: Optional[Tensor],
            trace: float, trace_se: float, gbar_norm: float) -> GradientCovarianceSVDResult:
    S = S[:k].to(torch.float64).cpu()
    return GradientCovarianceSVDResult(
        singular_values=S, covariance_eigenvalues=S.pow(2),
        right_singular_vectors=None if Vrows is None else Vrows[:k].T,
        left_singular_vectors=None if U is None else U[:, :k],
        n_samples=n, trace=trace, trace_stderr=trace_se, mean_gradient_norm=gbar_norm)


def _n_rows(t: Tensor) -> Tuple[float]:
    return (float(t.shape[0]),)


def _svd_materialize(pb, eng, k, centered, return_vectors, progress, comm: _Comm):
    def local():
        blocks = [ctx.to(torch.float64)
                  for ctx, _, _ in _iter(pb, eng, progress, "per-sample grads")]
        return torch.cat(blocks)

    G, table = comm.local("computing the per-sample gradients", local, report=_n_rows,
                          n_report=1)
    comm.set_counts(table)
    G = comm.gather_rows(G)       # distributed: the whole n x d matrix on every rank
    n = G.shape[0]
    _check_k_n(pb, k, n)
    gbar = G.mean(0)
    Gc = (G - gbar) if centered else G
    Gc = Gc / math.sqrt(n)
    U, S, Vh = torch.linalg.svd(Gc, full_matrices=False)
    trace = float(Gc.pow(2).sum())
    res = _finish(S, k, n, comm.local_rows(U) if return_vectors else None,
                  Vh.to(pb.dtype) if return_vectors else None, trace, 0.0, float(gbar.norm()))
    res.n_forward_products = 0
    res.n_reverse_products = 0
    return res


def _top_eigh(K: Tensor, k: int, seed: int) -> Tuple[Tensor, Tensor]:
    """Top-k eigenpairs of the symmetric PSD ``K`` (float64), descending. Dense ``eigh`` for
    small ``n`` or large ``k``; otherwise block Lanczos (:func:`landscape_ext.eigsh`, residuals
    <= 1e-12 |K|: eigenvalues to ~1e-14 relative) at O(n^2) per product instead of ``eigh``'s
    9 n^3, falling back to ``eigh`` if it does not converge."""
    n = K.shape[0]
    if n > 1024 and 8 * k <= n:
        from ..lanczos import eigsh
        r = eigsh(K, k, which="largest", tol=1e-12, seed=seed)
        if bool(r.converged.all()):
            order = torch.argsort(r.eigenvalues, descending=True)
            return r.eigenvalues[order].to(K.device), r.eigenvectors[:, order].to(K)
        log.warning("gram: Lanczos did not converge; using a dense eigh of the %d x %d Gram "
                    "matrix", n, n)
    w, U = torch.linalg.eigh(K)
    return w.flip(0)[:max(k, 1)], U.flip(1)[:, :max(k, 1)]


def _svd_gram(pb, eng: _KronEngine, k, centered, return_vectors, progress, seed=0,
              comm: Optional[_Comm] = None):
    """Exact spectrum from K = G G^T = sum_layers (A A^T + 1) o (E E^T) (+ others).
    Distributed: the factors (``n_local x`` layer widths) are all-gathered, so every rank builds
    the same ``K`` of all samples."""
    comm = comm or _Comm(None, pb.owner)
    store: List[Any] = []

    def local():
        for ctx, b, where in _iter(pb, eng, progress, "factors"):
            factors, G_o, _ = ctx
            store.append((factors, G_o, b))
        for L in eng.layers:
            for f, _, _ in store:
                if len(f[id(L)]) != 1 or f[id(L)][0][0].dim() != 2:
                    raise ValueError(f"{pb.owner}: method='gram' needs each layer called once "
                                     f"per batch on 2-D inputs; layer {L.label} is not")
        return sum(b for _, _, b in store)

    _, table = comm.local("computing the layer factors", local, report=lambda m: (m,),
                          n_report=1)
    comm.set_counts(table)
    n = comm.n_total
    _check_k_n(pb, k, n)
    dev = pb.device
    K = torch.zeros(n, n, dtype=torch.float64, device=dev)
    for L in eng.layers:
        A = comm.gather_rows(torch.cat([f[id(L)][0][0] for f, _, _ in store]).double())
        E = comm.gather_rows(torch.cat([f[id(L)][0][1] for f, _, _ in store]).double())
        KE = E @ E.T
        del E
        if L.weight is None:
            K += KE
        else:
            KA = A @ A.T
            if L.bias is not None:
                KA += 1.0
            K.addcmul_(KA, KE)
            del KA
        del A, KE
    if eng.others:
        Go = comm.gather_rows(torch.cat([G_o for _, G_o, _ in store]).double())
        K.addmm_(Go, Go.T)
        del Go
    gbar_norm = math.sqrt(max(float(K.sum()), 0.0)) / n     # |G^T 1 / n|
    if centered:   # P K P with P = I - 1 1^T / n, in place
        r = K.mean(0, keepdim=True)
        K.sub_(r).sub_(r.T).add_(r.mean())
    K /= n
    trace = float(torch.diagonal(K).sum())
    w, U = _top_eigh(K, k, seed)
    del K
    S = w.clamp_min(0.0).sqrt()
    Vrows = None
    if return_vectors:
        # V = G_c^T U S^-1 / sqrt(n): one product from the stored factors
        kk = min(k, n)
        Wt = U[:, :kk] / (S[:kk].clamp_min(1e-300) * math.sqrt(n))
        Wt = torch.where((S[:kk] > S[0] * 1e-12)[None, :], Wt, torch.zeros_like(Wt))
        Wt = comm.local_rows(_center(Wt, centered))
        Vacc = torch.zeros(kk, pb.d, dtype=pb.dtype, device=dev)

        def reverse():
            off = 0
            for factors, G_o, b in store:
                eng.reverse((factors, G_o, b), Wt[off:off + b], Vacc)
                off += b

        comm.local("in the right-singular-vector product", reverse)
        Vrows, _ = _orthonormal_rows(comm.sum_(Vacc))
    res = _finish(S, k, n, comm.local_rows(U[:, :k]) if return_vectors else None, Vrows, trace,
                  0.0, gbar_norm)
    res.n_forward_products = 0
    res.n_reverse_products = min(k, n) if return_vectors else 0
    return res


def _svd_randomized(pb, eng, k, centered, q, p, seed, return_vectors, progress,
                    comm: Optional[_Comm] = None):
    """Distributed: ``Y = G Z^T`` and ``Q`` stay row-sharded (TSQR, :meth:`_Comm.orth`),
    centring uses the all-reduced column sums, ``G^T W`` is all-reduced; the ``l x d`` and
    ``l x l`` linear algebra then runs on identical inputs on every rank."""
    comm = comm or _Comm(None, pb.owner)
    d = pb.d
    l = min(k + p, d)
    if pb.n_hint is not None:
        l = min(l, pb.n_hint)
    l = max(l, k)
    # the same test matrix on every rank: seeded CPU generator, (l, d) agreed on by all ranks
    g = torch.Generator().manual_seed(seed)
    Omega = torch.randn(l, d, generator=g, dtype=pb.dtype).to(pb.device)
    n_fwd = n_rev = 0
    Y, table = comm.local("in the first pass (G Z^T)", _forward_pass, pb, eng, Omega, progress,
                          report=_n_rows, n_report=1)
    comm.set_counts(table)
    n = comm.n_total
    Y = comm.center(Y, centered)
    del Omega
    n_fwd += l
    _check_k_n(pb, k, n)
    # Girard-Hutchinson: E |G_c w|^2 = |G_c|_F^2 for w ~ N(0, I)
    col = comm.sum_(Y.pow(2).sum(0)) / n
    trace = float(col.mean())
    trace_se = float(col.std() / math.sqrt(l)) if l > 1 else float("nan")
    for _ in range(q):
        Q = comm.orth(Y)
        Z, _ = comm.local("in a reverse pass (G^T Q)", _reverse_pass, pb, eng,
                          comm.center(Q, centered), progress)
        Z = comm.sum_(Z)
        n_rev += Q.shape[1]
        Zq, _ = _orthonormal_rows(Z)
        del Z
        Y, _ = comm.local("in a forward pass (G Z^T)", _forward_pass, pb, eng, Zq, progress)
        Y = comm.center(Y, centered)
        n_fwd += Zq.shape[0]
        del Zq
    Q = comm.orth(Y)
    lq = Q.shape[1]
    # B = Q^T G_c (rows), plus the mean gradient in the same pass
    W = torch.cat([comm.center(Q, centered), Q.new_full((Q.shape[0], 1), 1.0 / n)], 1)
    Bt, _ = comm.local("in the last pass (G^T Q)", _reverse_pass, pb, eng, W, progress)
    Bt = comm.sum_(Bt)
    n_rev += W.shape[1]
    gbar_norm = float(Bt[lq].double().norm())
    B = Bt[:lq]
    del Bt
    qrows, r = _orthonormal_rows(B)          # B = r^T qrows
    Ub, S, Wh = torch.linalg.svd(r.T.double().cpu(), full_matrices=False)
    S = S / math.sqrt(n)
    U = (Q @ Ub.to(Q.device)) if return_vectors else None
    Vrows = (Wh.to(qrows.device, qrows.dtype) @ qrows) if return_vectors else None
    res = _finish(S, k, n, U, Vrows, trace, trace_se, gbar_norm)
    res.oversample = l - k
    res.n_power_iter = q
    res.n_forward_products = n_fwd
    res.n_reverse_products = n_rev
    return res


# ------------------------------------------------------------------------------------------------
# gradient_rank
# ------------------------------------------------------------------------------------------------


def gradient_rank(values: Any, tol: Optional[float] = None, *,
                  shape: Optional[Tuple[int, int]] = None,
                  total_energy: Optional[float] = None) -> GradientRankResult:
    r"""Effective, stable and numerical rank of a matrix or of its singular values.

    Parameters
    ----------
    values : Tensor or GradientCovarianceSVDResult
        A 2-D matrix (e.g. per-sample gradients ``(n, d)``; its singular values are computed in
        float64), a 1-D tensor of singular values, or a :class:`GradientCovarianceSVDResult`
        (its top-k ``singular_values``; ``total_energy`` defaults to its ``trace``, so the
        stable rank uses the full ``tr(C)``).
    tol : float, optional
        Relative tolerance of the numerical rank: ``#{sigma > tol * max sigma}``. Default as
        ``numpy.linalg.matrix_rank``: ``max(m, n) * eps(dtype)``, with ``(m, n)`` the matrix shape
        (``shape=``, else the number of values) and ``eps`` of the matrix's dtype (float32 for a
        result of the randomized SVD, whose products run in the parameters' precision).
    shape : (int, int), optional
        Shape of the matrix the singular values came from (for the default ``tol``).
    total_energy : float, optional
        ``sum of all sigma^2`` when ``values`` holds only the top ones.

    Returns
    -------
    GradientRankResult
        ``effective_rank`` (Roy-Vetterli, entropy of ``sigma / sum sigma``),
        ``effective_rank_covariance`` (entropy of ``sigma^2 / sum sigma^2``), ``stable_rank``
        (``sum sigma^2 / max sigma^2``), ``numerical_rank``.
    """
    truncated = False
    eps_dtype = None
    if isinstance(values, GradientCovarianceSVDResult):
        s = values.singular_values.to(torch.float64)
        shape = shape or (values.n_samples, values.n_params)
        truncated = values.k < min(values.n_samples, values.n_params)
        if total_energy is None and truncated and math.isfinite(values.trace):
            total_energy = float(values.trace)
        eps_dtype = torch.float32
    elif isinstance(values, Tensor):
        if values.dim() == 2:
            shape = shape or tuple(values.shape)
            eps_dtype = values.dtype if values.dtype.is_floating_point else torch.float64
            s = torch.linalg.svdvals(values.detach().to(torch.float64))
        elif values.dim() == 1:
            s = values.detach().to(torch.float64).abs()
            eps_dtype = values.dtype if values.dtype.is_floating_point else torch.float64
        else:
            raise ValueError(f"gradient_rank: values must be 1-D singular values or a 2-D matrix, "
                             f"got shape {tuple(values.shape)}")
    else:
        raise TypeError(f"gradient_rank: values must be a Tensor or a GradientCovarianceSVDResult, "
                        f"got {type(values).__name__}")
    if s.numel() == 0:
        raise ValueError("gradient_rank: no singular values")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("gradient_rank: singular values are not finite")
    s = s.cpu()
    smax = float(s.max())
    if tol is None:
        m = max(shape) if shape is not None else s.numel()
        tol = m * torch.finfo(eps_dtype or torch.float64).eps
    if smax == 0.0:
        return GradientRankResult(0.0, 0.0, 0.0, 0, float(tol), s.numel(), truncated)

    def entropy_rank(w: Tensor) -> float:
        p = w / w.sum()
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))

    energy = float(s.pow(2).sum()) if total_energy is None else float(total_energy)
    return GradientRankResult(
        effective_rank=entropy_rank(s), effective_rank_covariance=entropy_rank(s.pow(2)),
        stable_rank=energy / smax ** 2, numerical_rank=int((s > tol * smax).sum()),
        tol=float(tol), n_values=s.numel(), truncated=truncated)


# ------------------------------------------------------------------------------------------------
# subspaces
# ------------------------------------------------------------------------------------------------


def _directions(X: Any, what: str) -> Tensor:
    if isinstance(X, GradientCovarianceSVDResult):
        X = X.right_singular_vectors
    elif hasattr(X, "eigenvectors") and not isinstance(X, Tensor):
        X = X.eigenvectors
    if not isinstance(X, Tensor):
        raise TypeError(f"subspace_overlap: {what} must be a (d, p) tensor of directions (or a "
                        f"result holding them), got {type(X).__name__}")
    if X.dim() == 1:
        X = X[:, None]
    if X.dim() != 2 or X.shape[1] == 0:
        raise ValueError(f"subspace_overlap: {what} must be (d, p) with p >= 1, got "
                         f"{tuple(X.shape)}")
    return X


def _orth_columns(X: Tensor) -> Tensor:
    X = X.detach().to(torch.float64)
    Q, R = torch.linalg.qr(X, mode="reduced")
    diag = torch.diagonal(R).abs()
    keep = diag > diag.max().clamp_min(1e-300) * 1e-10 * max(X.shape)
    if bool(keep.all()):
        return Q
    U, S, _ = torch.linalg.svd(X, full_matrices=False)   # rank-deficient: range by SVD
    return U[:, S > S.max() * 1e-10 * max(X.shape)]


def subspace_overlap(A: Any, B: Any) -> SubspaceOverlapResult:
    r"""Overlap of the subspaces spanned by two sets of directions.

    Both sets are orthonormalized (float64; a rank-deficient set keeps its range). With
    orthonormal bases ``Qa (d, p)`` and ``Qb (d, q)``, the cosines of the principal angles are the
    singular values of ``Qa^T Qb`` and

    .. math::
        \text{overlap} = \frac{\|Q_a^\top Q_b\|_F^2}{\min(p, q)} \in [0, 1].

    Parameters
    ----------
    A, B : Tensor or result
        ``(d, p)`` and ``(d, q)`` directions as columns (``(d,)`` for one), or an
        :class:`~landscape_ext.EigshResult` / :class:`GradientCovarianceSVDResult` (their
        eigenvectors / right singular vectors).
    """
    A = _directions(A, "A")
    B = _directions(B, "B")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"subspace_overlap: A has d = {A.shape[0]} rows but B has d = "
                         f"{B.shape[0]}")
    Qa = _orth_columns(A)
    Qb = _orth_columns(B.to(A.device))
    M = Qa.T @ Qb
    cos = torch.linalg.svdvals(M).clamp(0.0, 1.0).cpu()
    p, q = Qa.shape[1], Qb.shape[1]
    return SubspaceOverlapResult(overlap=float(M.pow(2).sum()) / min(p, q), cosines=cos, p=p, q=q,
                                 d=A.shape[0])


def _mean_loss(loss_fn: Callable) -> Callable:
    def mean_loss(outputs, targets):
        return loss_fn(outputs, targets).mean()
    return mean_loss


def _stats_pass(pb: _Problem, eng: _Engine, Z: Optional[Tensor], want_sum: bool,
                want_sq_norms: bool, want_sq_sum: bool, progress: bool) -> Dict[str, Any]:
    """One data pass: Y = G Z^T, sum_i g_i, |g_i|^2, sum_i g_i^2 as requested."""
    out: Dict[str, Any] = {"Y": [], "norms": []}
    gsum = torch.zeros(1, pb.d, dtype=torch.float64, device=pb.device) if want_sum else None
    sq = torch.zeros(pb.d, dtype=torch.float64, device=pb.device) if want_sq_sum else None
    for ctx, b, where in _iter(pb, eng, progress, "statistics"):
        if Z is not None:
            y = eng.forward(ctx, Z)
            _check_finite(y, "a gradient product", pb.owner, where)
            out["Y"].append(y.double())
        if gsum is not None:
            eng.reverse(ctx, torch.ones(b, 1, dtype=pb.dtype, device=pb.device), gsum)
        if want_sq_norms:
            out["norms"].append(eng.sq_norms(ctx).double())
        if sq is not None:
            eng.sq_sum(ctx, sq)
    n = pb.n_samples
    out["n"] = n
    out["Y"] = torch.cat(out["Y"]) if out["Y"] else None
    out["norms"] = torch.cat(out["norms"]) if out["norms"] else None
    out["gbar"] = gsum[0] / n if gsum is not None else None
    out["sq_sum"] = sq
    if gsum is not None:
        _check_finite(gsum, "the gradient", pb.owner, "in the statistics pass")
    return out


def gradient_in_top_hessian_subspace(model: nn.Module, loss_fn: Callable, data: Any, k: int, *,
                                     which: str = "largest", hessian: Any = None,
                                     centered: bool = False,
                                     params: Optional[Iterable[Union[str, Tensor]]] = None,
                                     method: str = "auto", seed: int = 0,
                                     eigsh_kwargs: Optional[Dict[str, Any]] = None,
                                     chunk_size: Optional[int] = None, sketch_impl: str = "auto",
                                     progress: bool = False) -> TopHessianSubspaceResult:
    r"""How much of the gradient, and of the gradient covariance, lies in the top-``k`` Hessian
    eigenspace.

    ``V`` (``d x k``) = top-``k`` eigenvectors of the Hessian of the mean loss over ``data``
    (:func:`landscape_ext.eigsh` on :class:`landscape_ext.HessianOperator`, ``which`` as there),
    then in one data pass ``Y = G V`` (sketch products, no ``n x d`` matrix), ``sum_i g_i`` and
    ``|g_i|^2``:

    * ``gradient_fraction = |V^T g_bar|^2 / |g_bar|^2``
    * ``covariance_trace_fraction = sum_i |V^T g_i|^2 / sum_i |g_i|^2 = tr(V^T C V) / tr(C)``
      (centred: with ``g_i - g_bar``).

    Parameters
    ----------
    model, loss_fn, data, params
        As :func:`gradient_covariance_svd` (per-sample ``loss_fn``; the Hessian is that of its
        mean).
    k : int
    which : str
        Passed to :func:`landscape_ext.eigsh` (default ``"largest"``: the sharpest directions).
    hessian : EigshResult or Tensor, optional
        Precomputed eigenvectors ``(d, k)`` (skips ``eigsh``).
    centered : bool
        Centre the covariance (default: the second moment ``E[g g^T]``).
    method : {"auto", "kronecker", "jvp", "materialize"}
        Engine of the gradient products (``gram`` means ``kronecker`` here).
    eigsh_kwargs : dict, optional
        Extra arguments of :func:`landscape_ext.eigsh` (``tol``, ``block_size``, ...).

    Returns
    -------
    TopHessianSubspaceResult
    """
    t0 = time.perf_counter()
    owner = "gradient_in_top_hessian_subspace"
    # process-local: with a DDP model both the Hessian and the gradient statistics are those of
    # this rank's data (the data-parallel versions are the operators and gradient_covariance_svd)
    model = _unwrap_ddp(model)
    pb = _Problem(model, loss_fn, data, params, owner)
    if not isinstance(k, int) or k < 1 or k > pb.d:
        raise ValueError(f"{owner}: k must be an integer in [1, d = {pb.d}], got {k!r}")
    n_hvp = 0
    converged = None
    if hessian is None:
        from ..lanczos import eigsh
        from ..operators import HessianOperator
        op = HessianOperator(model, _mean_loss(loss_fn), data, params=pb.names)
        er = eigsh(op, k, which=which, seed=seed, **(eigsh_kwargs or {}))
        V, evals = er.eigenvectors, er.eigenvalues
        n_hvp = er.n_matvecs
        converged = bool(er.converged.all()) if er.converged is not None else None
    elif isinstance(hessian, Tensor):
        V, evals = hessian, torch.full((hessian.shape[-1] if hessian.dim() == 2 else 1,),
                                       float("nan"), dtype=torch.float64)
    else:
        V, evals = hessian.eigenvectors, hessian.eigenvalues
    V = _directions(V, "hessian eigenvectors")
    if V.shape[0] != pb.d:
        raise ValueError(f"{owner}: the Hessian eigenvectors have d = {V.shape[0]} rows but the "
                         f"selected parameters have d = {pb.d}")
    Qv = _orth_columns(V)
    kk = Qv.shape[1]
    with model_state_guard(model, "eval"):
        m = "kronecker" if method == "gram" else method
        eng, used = _make_engine(pb, m, chunk_size, sketch_impl, seed, allow_gram=False)
        st = _stats_pass(pb, eng, Qv.T.to(pb.device, pb.dtype).contiguous(), True, True, False,
                         progress)
    n = st["n"]
    Y, norms, gbar = st["Y"], st["norms"], st["gbar"]
    Qv_dev = Qv.to(gbar.device)
    proj_bar = Qv_dev.T @ gbar
    g2 = float(gbar.pow(2).sum())
    grad_frac = float(proj_bar.pow(2).sum()) / g2 if g2 > 0 else float("nan")
    tr = float(norms.sum()) / n
    Yc = Y
    if centered:
        Yc = Y - Y.mean(0, keepdim=True)
        tr = tr - g2
    per_dir = Yc.pow(2).sum(0) / n
    cov_frac = float(per_dir.sum()) / tr if tr > 0 else float("nan")
    return TopHessianSubspaceResult(
        gradient_fraction=grad_frac, covariance_trace_fraction=cov_frac,
        per_direction_variance=per_dir.cpu(), hessian_eigenvalues=evals.detach().cpu()[:kk],
        gradient_norm=math.sqrt(g2), covariance_trace=tr, random_baseline=kk / pb.d, k=kk,
        n_samples=n, n_params=pb.d, centered=centered, which=which, method_used=used,
        n_hessian_matvecs=n_hvp, hessian_converged=converged, seed=seed,
        time_s=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# C vs diag(H)
# ------------------------------------------------------------------------------------------------


def _rankdata(x: Tensor) -> Tensor:
    """Ranks with ties averaged (float64)."""
    from scipy.stats import rankdata
    return torch.from_numpy(rankdata(x.cpu().numpy(), method="average")).to(torch.float64)


def _pearson(a: Tensor, b: Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def compare_covariance_to_hessian_diagonal(
        model: nn.Module, loss_fn: Callable, data: Any, *, centered: bool = False,
        hessian_diagonal: Any = None, hessian_method: str = "hutchinson",
        n_matvecs: int = 200, params: Optional[Iterable[Union[str, Tensor]]] = None,
        method: str = "auto", seed: int = 0, chunk_size: Optional[int] = None,
        sketch_impl: str = "auto", progress: bool = False) -> CovarianceHessianDiagonalResult:
    r"""Test the proposal's claim :math:`C \approx \mathrm{diag}(H)` on a model.

    ``diag(C) = mean_i g_i^2`` (centred: minus ``g_bar^2``) is computed exactly in one streaming
    pass (``O(d)`` memory: from layer factors where possible, else chunked per-sample
    gradients). ``diag(H)`` of the Hessian of the mean loss comes from the engine:
    :func:`landscape_ext.diagonal` on :class:`landscape_ext.HessianOperator` (an estimate with its
    own standard error, reported as ``hessian_noise``), or exactly (``hessian_method="exact"``:
    ``d`` Hessian-vector products, small models), or is passed in.

    Parameters
    ----------
    model, loss_fn, data, params
        As :func:`gradient_covariance_svd` (per-sample ``loss_fn``).
    centered : bool
        Default ``False``: the proposal's ``C = E[g g^T]``.
    hessian_diagonal : Tensor or DiagonalResult, optional
        A precomputed ``(d,)`` Hessian diagonal.
    hessian_method : {"hutchinson", "xdiag", "exact"}
    n_matvecs : int
        Hessian-vector products of the estimator.

    Returns
    -------
    CovarianceHessianDiagonalResult
        Pearson and Spearman correlation across parameters, relative error at scale 1, the
        least-squares scale ``s`` (``diag H ~ s diag C``) and the relative error after scaling.
    """
    t0 = time.perf_counter()
    owner = "compare_covariance_to_hessian_diagonal"
    # process-local: with a DDP model both the Hessian and the gradient statistics are those of
    # this rank's data (the data-parallel versions are the operators and gradient_covariance_svd)
    model = _unwrap_ddp(model)
    pb = _Problem(model, loss_fn, data, params, owner)
    if hessian_method not in ("hutchinson", "xdiag", "exact"):
        raise ValueError(f"{owner}: hessian_method must be 'hutchinson', 'xdiag' or 'exact', got "
                         f"{hessian_method!r}")
    with model_state_guard(model, "eval"):
        m = "kronecker" if method == "gram" else method
        eng, used = _make_engine(pb, m, chunk_size, sketch_impl, seed, allow_gram=False)
        st = _stats_pass(pb, eng, None, centered, False, True, progress)
    n = st["n"]
    c = st["sq_sum"] / n
    if centered:
        c = c - st["gbar"].pow(2)
    c = c.cpu()
    stderr = None
    n_hvp = 0
    if hessian_diagonal is not None:
        h = getattr(hessian_diagonal, "estimate", hessian_diagonal)
        stderr = getattr(hessian_diagonal, "stderr", None)
        n_hvp = int(getattr(hessian_diagonal, "n_matvecs", 0))
        hm = "given"
    else:
        from ..operators import HessianOperator
        op = HessianOperator(model, _mean_loss(loss_fn), data, params=pb.names)
        if hessian_method == "exact":
            if pb.d > 20000:
                raise ValueError(f"{owner}: hessian_method='exact' needs d products; d = {pb.d} "
                                 f"is too large (use 'hutchinson' or 'xdiag')")
            h = torch.empty(pb.d, dtype=torch.float64)
            step = 256
            for s in range(0, pb.d, step):
                e = min(pb.d, s + step)
                X = torch.zeros(e - s, pb.d, dtype=op.dtype, device=op.device)
                X[torch.arange(e - s), torch.arange(s, e)] = 1.0
                h[s:e] = torch.diagonal(op.apply_rows(X)[:, s:e]).double().cpu()
            n_hvp = pb.d
        else:
            from ..estimators import diagonal
            dr = diagonal(op, n_matvecs, method=hessian_method, seed=seed)
            h, stderr, n_hvp = dr.estimate, dr.stderr, dr.n_matvecs
        hm = hessian_method
    h = torch.as_tensor(h).detach().to(torch.float64).cpu().reshape(-1)
    if h.numel() != pb.d:
        raise ValueError(f"{owner}: the Hessian diagonal has {h.numel()} entries but the selected "
                         f"parameters have d = {pb.d}")
    hn = float(h.norm())
    cc = float(c.pow(2).sum())
    scale = float((c * h).sum()) / cc if cc > 0 else float("nan")
    se = None if stderr is None else torch.as_tensor(stderr).detach().double().cpu().reshape(-1)
    return CovarianceHessianDiagonalResult(
        covariance_diagonal=c, hessian_diagonal=h, hessian_diagonal_stderr=se,
        pearson=_pearson(c, h), spearman=_pearson(_rankdata(c), _rankdata(h)),
        relative_error=float((c - h).norm()) / hn if hn > 0 else float("nan"),
        scale=scale,
        relative_error_scaled=(float((scale * c - h).norm()) / hn if hn > 0 and cc > 0
                               else float("nan")),
        hessian_noise=float(se.norm()) / hn if se is not None and hn > 0 else 0.0,
        fraction_negative_hessian=float((h < 0).double().mean()),
        covariance_trace=float(c.sum()), hessian_trace=float(h.sum()), n_samples=n,
        n_params=pb.d, centered=centered, hessian_method=hm, n_hessian_matvecs=n_hvp,
        method_used=used, seed=seed, time_s=time.perf_counter() - t0)
