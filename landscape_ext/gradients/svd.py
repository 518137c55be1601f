"""The top of the gradient-covariance spectrum without the ``n x d`` matrix of per-sample
gradients (:func:`gradient_covariance_svd`): the driver of each method (``materialize``: exact
SVD; ``gram``: exact eigenpairs of ``G G^T`` from the layer factors; ``kronecker`` / ``jvp``:
the randomized range finder), single-process or sample-sharded over a process group. The
conventions, the methods and the algorithm: docs/gradients.md."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import distributed as _dist
from .. import ops
from .._args import count_argument
from .._model import evaluation_context
from ..distributed import SampleShards, resolve_group
from ..results import Result
from ._engines import ProductEngine, batch_contexts, project_pass, sketch_pass
from ._kronecker import KroneckerEngine
from ._method import make_engine
from ._problem import ParamSpec, PerSampleProblem

__all__ = ["gradient_covariance_svd", "GradientCovarianceSVDResult"]

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------
# gradient_covariance_svd
# ------------------------------------------------------------------------------------------------


def gradient_covariance_svd(model: nn.Module, loss_fn: Optional[Callable], data: Any, k: int, *,
                            centered: bool = True, n_power_iter: int = 2, oversample: int = 10,
                            method: str = "auto", params: ParamSpec = None,
                            seed: int = 0, return_vectors: bool = True,
                            chunk_size: Optional[int] = None, sketch_impl: str = "auto",
                            progress: bool = False,
                            process_group: Any = None) -> GradientCovarianceSVDResult:
    r"""Top-``k`` spectrum of the gradient covariance without forming the ``n x d`` matrix of
    per-sample gradients.

    See docs/gradients.md for the conventions (``n`` divisor, scaling of the singular values),
    the methods, and its section *Data parallel* for ``process_group``.

    Parameters
    ----------
    model : nn.Module
    loss_fn : callable or None
        ``loss_fn(outputs, targets) -> (batch,)`` per-sample losses (``reduction="none"``).
        ``None``: each sample's loss is the loss the model computes itself on that sample alone
        (see :func:`per_sample_gradients`); the methods ``kronecker`` and ``gram`` need per-sample
        losses of one batched forward and refuse it, ``auto`` picks ``materialize`` or ``jvp``.
    data : (inputs, targets), dict, or re-iterable of batches
        Same samples in the same order on every pass (no shuffling); a dict batch is passed as
        ``model(**batch)``.
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
        Linear-layer sketch: the fused op or the einsum composite (``auto``: the ops layer's
        default for the device, :func:`landscape_ext.ops.resolve_impl`).
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
    shards = _sample_shards(model, process_group, owner)
    progress = bool(progress) and shards.rank == 0     # bars on one rank only
    problem = _set_up(model, loss_fn, data, params, k, n_power_iter, oversample, shards)
    k = int(k)  # checked by _set_up: any integral type
    with evaluation_context(problem.model, "eval"):
        engine, used = make_engine(problem, method, chunk_size, sketch_impl, seed,
                                   allow_gram=True, shards=shards)
        if used == "materialize":
            res = _svd_materialize(problem, engine, k, centered, return_vectors, progress, shards)
        elif used == "gram":
            assert isinstance(engine, KroneckerEngine)
            res = _svd_gram(problem, engine, k, centered, return_vectors, progress, seed, shards)
        else:
            res = _svd_randomized(problem, engine, k, centered, int(n_power_iter),
                                  int(oversample), seed, return_vectors, progress, shards)
    res.method = method
    res.method_used = used
    res.forward_mode_used = engine.forward_mode_used
    res.sketch_impl = getattr(engine, "sketch_impl", None)
    res.centered = centered
    res.seed = seed
    res.k = k
    res.n_params = problem.d
    res.n_passes = problem.n_passes
    res.world_size = shards.world
    res.sample_offset = shards.offset if shards.counts is not None else 0
    res.time_s = time.perf_counter() - t0
    return res


def _sample_shards(model: Any, process_group: Any, owner: str) -> SampleShards:
    """The process group of the call (a DDP model's own by default) and its sample shards."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and process_group is None:
        process_group = model.process_group
    group = resolve_group(process_group, owner)
    shards = SampleShards(group, owner)
    if group is not None and isinstance(model, nn.Module):
        shards.device = next((p.device for p in model.parameters()), None)
    return shards


def _parameter_checksum(problem: PerSampleProblem) -> float:
    values = problem.layout.values(problem.model)
    return float(_dist.parameter_checksum([values[n] for n in problem.names]))


def _check_same_model(table: Tensor, owner: str) -> None:
    """Columns 1 and 2 of the setup table: parameter counts and checksums of the ranks."""
    if bool((table[:, 1] != table[0, 1]).any()):
        sizes = ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(table[:, 1].tolist()))
        raise ValueError(f"{owner}: the ranks have different parameter counts ({sizes}); "
                         f"every rank must hold the same model")
    _dist.check_same_parameters(table[:, 2], owner)


def _set_up(model: Any, loss_fn: Callable, data: Any, params: ParamSpec, k: Any,
            n_power_iter: int, oversample: int, shards: SampleShards) -> PerSampleProblem:
    """The problem and the argument checks, then one status exchange (setup errors, sample
    counts, parameter count and checksum): every rank knows ``n`` and that the models agree."""
    owner = shards.owner

    def set_up_here() -> PerSampleProblem:
        problem = PerSampleProblem(model, loss_fn, data, params, owner)
        count_argument(k, "k", owner)
        if k > problem.d:
            raise ValueError(f"{owner}: k = {k} exceeds min(n_samples, n_params): the model has "
                             f"d = {problem.d} parameters")
        if int(n_power_iter) < 0 or int(oversample) < 0:
            raise ValueError(f"{owner}: n_power_iter and oversample must be >= 0, got "
                             f"{n_power_iter} and {oversample}")
        return problem

    def report(problem: PerSampleProblem):
        hint = problem.n_samples_hint
        return (-1.0 if hint is None else hint, problem.d,
                _parameter_checksum(problem) if shards.distributed else 0.0)

    problem, table = shards.run_local("setting up", set_up_here, report=report, n_report=3)
    if shards.distributed:
        _check_same_model(table, owner)
        hints = table[:, 0]
        problem.n_samples_hint = int(hints.sum()) if bool((hints >= 0).all()) else None
    hint = problem.n_samples_hint
    if hint is not None and k > min(hint, problem.d):
        raise ValueError(f"{owner}: k = {k} exceeds min(n_samples, n_params) = "
                         f"min({hint}, {problem.d}) = {min(hint, problem.d)}")
    return problem


# ------------------------------------------------------------------------------------------------
# the drivers
# ------------------------------------------------------------------------------------------------


def _check_k_fits(problem: PerSampleProblem, k: int, n: int) -> None:
    if k > min(n, problem.d):
        raise ValueError(f"{problem.owner}: k = {k} exceeds min(n_samples, n_params) = "
                         f"min({n}, {problem.d}) = {min(n, problem.d)}")


def _result(S: Tensor, k: int, n: int, U: Optional[Tensor], V_rows: Optional[Tensor],
            trace: float, trace_stderr: float,
            mean_gradient_norm: float) -> GradientCovarianceSVDResult:
    S = S[:k].to(torch.float64).cpu()
    return GradientCovarianceSVDResult(
        singular_values=S, covariance_eigenvalues=S.pow(2),
        right_singular_vectors=None if V_rows is None else V_rows[:k].T,
        left_singular_vectors=None if U is None else U[:, :k],
        n_samples=n, trace=trace, trace_stderr=trace_stderr,
        mean_gradient_norm=mean_gradient_norm)


def _n_rows(t: Tensor) -> Tuple[float]:
    return (float(t.shape[0]),)


def _orthonormal_rows(Z: Tensor) -> Tuple[Tensor, Tensor]:
    """``Z (l, d) = r^T q`` with orthonormal rows q (rank-deficient directions replaced)."""
    dtype = Z.dtype if Z.dtype in (torch.float32, torch.float64) else torch.float32
    Zc = Z.to(dtype).contiguous()
    basis = Zc.new_empty((0, Zc.shape[1]))
    q, _, r = ops.block_orthonormalize(basis, Zc, 0)
    return q, r


def _svd_materialize(problem: PerSampleProblem, engine: ProductEngine, k: int, centered: bool,
                     return_vectors: bool, progress: bool,
                     shards: SampleShards) -> GradientCovarianceSVDResult:
    """The exact SVD of the materialized ``G`` (distributed: gathered whole on every rank)."""
    def gradients_here():
        blocks = [ctx.to(torch.float64)
                  for ctx, _, _ in batch_contexts(problem, engine, progress, "per-sample grads")]
        return torch.cat(blocks)

    G, table = shards.run_local("computing the per-sample gradients", gradients_here,
                                report=_n_rows, n_report=1)
    shards.set_counts(table)
    G = shards.gather_rows(G)       # distributed: the whole n x d matrix on every rank
    n = G.shape[0]
    _check_k_fits(problem, k, n)
    mean_gradient = G.mean(0)
    Gc = (G - mean_gradient) if centered else G
    Gc = Gc / math.sqrt(n)
    U, S, Vh = torch.linalg.svd(Gc, full_matrices=False)
    trace = float(Gc.pow(2).sum())
    res = _result(S, k, n, shards.local_rows(U) if return_vectors else None,
                  Vh.to(problem.dtype) if return_vectors else None, trace, 0.0,
                  float(mean_gradient.norm()))
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


def _gram_matrix(problem: PerSampleProblem, engine: KroneckerEngine, store: List[Any], n: int,
                 shards: SampleShards) -> Tensor:
    """``K = G G^T = sum_layers (A A^T + 1) o (E E^T) + G_others G_others^T``, float64, from the
    stored factors (distributed: all-gathered, so every rank builds the same ``K``)."""
    K = torch.zeros(n, n, dtype=torch.float64, device=problem.device)
    for L in engine.layers:
        A = shards.gather_rows(torch.cat([f[id(L)][0][0] for f, _, _ in store]).double())
        E = shards.gather_rows(torch.cat([f[id(L)][0][1] for f, _, _ in store]).double())
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
    if engine.others:
        G_others = shards.gather_rows(torch.cat([G_o for _, G_o, _ in store]).double())
        K.addmm_(G_others, G_others.T)
        del G_others
    return K


def _svd_gram(problem: PerSampleProblem, engine: KroneckerEngine, k: int, centered: bool,
              return_vectors: bool, progress: bool, seed: int,
              shards: SampleShards) -> GradientCovarianceSVDResult:
    """Exact spectrum from the eigenpairs of the Gram matrix ``K = G G^T`` (:func:`_gram_matrix`);
    the right singular vectors by one product from the stored factors."""
    store: List[Any] = []

    def factors_here():
        for ctx, batch_size, _ in batch_contexts(problem, engine, progress, "factors"):
            factors, G_others, _ = ctx
            store.append((factors, G_others, batch_size))
        for L in engine.layers:
            for factors, _, _ in store:
                if len(factors[id(L)]) != 1 or factors[id(L)][0][0].dim() != 2:
                    raise ValueError(f"{problem.owner}: method='gram' needs each layer called "
                                     f"once per batch on 2-D inputs; layer {L.label} is not")
        return sum(batch_size for _, _, batch_size in store)

    _, table = shards.run_local("computing the layer factors", factors_here,
                                report=lambda n: (n,), n_report=1)
    shards.set_counts(table)
    n = shards.n_total
    _check_k_fits(problem, k, n)
    K = _gram_matrix(problem, engine, store, n, shards)
    mean_gradient_norm = math.sqrt(max(float(K.sum()), 0.0)) / n     # |G^T 1 / n|
    if centered:   # P K P with P = I - 1 1^T / n, in place
        row_mean = K.mean(0, keepdim=True)
        K.sub_(row_mean).sub_(row_mean.T).add_(row_mean.mean())
    K /= n
    trace = float(torch.diagonal(K).sum())
    w, U = _top_eigh(K, k, seed)
    del K
    S = w.clamp_min(0.0).sqrt()
    V_rows = None
    if return_vectors:
        # V = G_c^T U S^-1 / sqrt(n): one product from the stored factors
        k_kept = min(k, n)
        Wt = U[:, :k_kept] / (S[:k_kept].clamp_min(1e-300) * math.sqrt(n))
        Wt = torch.where((S[:k_kept] > S[0] * 1e-12)[None, :], Wt, torch.zeros_like(Wt))
        if centered:
            Wt = Wt - Wt.mean(0, keepdim=True)
        Wt = shards.local_rows(Wt)
        V_acc = torch.zeros(k_kept, problem.d, dtype=problem.dtype, device=problem.device)

        def project_here():
            offset = 0
            for factors, G_others, batch_size in store:
                engine.project((factors, G_others, batch_size), Wt[offset:offset + batch_size],
                               V_acc)
                offset += batch_size

        shards.run_local("in the right-singular-vector product", project_here)
        V_rows, _ = _orthonormal_rows(shards.sum_(V_acc))
    res = _result(S, k, n, shards.local_rows(U[:, :k]) if return_vectors else None, V_rows,
                  trace, 0.0, mean_gradient_norm)
    res.n_forward_products = 0
    res.n_reverse_products = min(k, n) if return_vectors else 0
    return res


def _svd_randomized(problem: PerSampleProblem, engine: ProductEngine, k: int, centered: bool,
                    n_power_iter: int, oversample: int, seed: int, return_vectors: bool,
                    progress: bool, shards: SampleShards) -> GradientCovarianceSVDResult:
    """Halko, Martinsson & Tropp (2011), Alg. 4.4, with analytic centring. Distributed: ``Y = G
    Z^T`` and ``Q`` stay row-sharded (TSQR, :meth:`SampleShards.orthonormal_basis`), centring uses
    the all-reduced column sums, ``G^T W`` is all-reduced; the ``l x d`` and ``l x l`` linear
    algebra then runs on identical inputs on every rank."""
    d = problem.d
    l = min(k + oversample, d)
    if problem.n_samples_hint is not None:
        l = min(l, problem.n_samples_hint)
    l = max(l, k)
    # the same test matrix on every rank: seeded CPU generator, (l, d) agreed on by all ranks
    generator = torch.Generator().manual_seed(seed)
    Omega = torch.randn(l, d, generator=generator, dtype=problem.dtype).to(problem.device)
    Y, table = shards.run_local("in the first pass (G Z^T)", sketch_pass, problem, engine, Omega,
                                progress, report=_n_rows, n_report=1)
    shards.set_counts(table)
    n = shards.n_total
    Y = shards.center(Y, centered)
    del Omega
    n_sketched = l
    n_projected = 0
    _check_k_fits(problem, k, n)
    # Girard-Hutchinson: E |G_c w|^2 = |G_c|_F^2 for w ~ N(0, I)
    column_norms = shards.sum_(Y.pow(2).sum(0)) / n
    trace = float(column_norms.mean())
    trace_stderr = float(column_norms.std() / math.sqrt(l)) if l > 1 else float("nan")
    for _ in range(n_power_iter):
        Q = shards.orthonormal_basis(Y)
        Z, _ = shards.run_local("in a reverse pass (G^T Q)", project_pass, problem, engine,
                                shards.center(Q, centered), progress)
        Z = shards.sum_(Z)
        n_projected += Q.shape[1]
        Z_rows, _ = _orthonormal_rows(Z)
        del Z
        Y, _ = shards.run_local("in a forward pass (G Z^T)", sketch_pass, problem, engine, Z_rows,
                                progress)
        Y = shards.center(Y, centered)
        n_sketched += Z_rows.shape[0]
        del Z_rows
    Q = shards.orthonormal_basis(Y)
    lq = Q.shape[1]
    # B = Q^T G_c (rows), plus the mean gradient in the same pass
    W = torch.cat([shards.center(Q, centered), Q.new_full((Q.shape[0], 1), 1.0 / n)], 1)
    Bt, _ = shards.run_local("in the last pass (G^T Q)", project_pass, problem, engine, W,
                             progress)
    Bt = shards.sum_(Bt)
    n_projected += W.shape[1]
    mean_gradient_norm = float(Bt[lq].double().norm())
    B = Bt[:lq]
    del Bt
    q_rows, r = _orthonormal_rows(B)          # B = r^T q_rows
    Ub, S, Wh = torch.linalg.svd(r.T.double().cpu(), full_matrices=False)
    S = S / math.sqrt(n)
    U = (Q @ Ub.to(Q.device)) if return_vectors else None
    V_rows = (Wh.to(q_rows.device, q_rows.dtype) @ q_rows) if return_vectors else None
    res = _result(S, k, n, U, V_rows, trace, trace_stderr, mean_gradient_norm)
    res.oversample = l - k
    res.n_power_iter = n_power_iter
    res.n_forward_products = n_sketched
    res.n_reverse_products = n_projected
    return res
