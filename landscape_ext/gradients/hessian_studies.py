r"""The gradient against the Hessian: how much of the gradient and of its covariance lies in the
top Hessian eigenspace (:func:`gradient_in_top_hessian_subspace`), and the proposal's claim
:math:`C \approx \mathrm{diag}(H)` as a measured statement
(:func:`compare_covariance_to_hessian_diagonal`). Both are process-local: with a DDP model the
Hessian and the gradient statistics are those of this rank's data (the data-parallel versions
are the operators and :func:`~landscape_ext.gradient_covariance_svd`)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .._model import batch_size as batch_size_of
from .._model import check_finite, evaluation_context, unwrap_ddp
from ..operators import HessianOperator
from ..results import Result
from ._engines import ProductEngine, batch_contexts
from ._method import make_engine
from ._problem import ParamSpec, PerSampleProblem, own_sample_losses
from .rank_and_overlap import directions_of, orthonormal_columns

__all__ = ["gradient_in_top_hessian_subspace", "TopHessianSubspaceResult",
           "compare_covariance_to_hessian_diagonal", "CovarianceHessianDiagonalResult"]


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


def _mean_loss(loss_fn: Callable) -> Callable:
    def mean_loss(outputs, targets):
        return loss_fn(outputs, targets).mean()
    return mean_loss


class _OwnSampleLossHessian(HessianOperator):
    """The Hessian of the mean over samples of the model's own loss on each sample alone
    (``loss_fn=None``; ``vmap`` over the samples of a batch, batches weighted by their sample
    counts), not of its batch loss, which weighs the samples differently when they count
    different numbers of tokens."""

    def _call_model(self, params: Dict[str, Tensor], inputs: Any) -> Any:
        n = batch_size_of(inputs, None)
        return own_sample_losses(self.model, params, inputs, n, "HessianOperator", "").mean()


def _hessian_operator(problem: PerSampleProblem, loss_fn: Optional[Callable],
                      data: Any) -> HessianOperator:
    """The Hessian of the mean per-sample loss (``loss_fn=None``: of the model's own one-sample
    losses)."""
    if loss_fn is None:
        return _OwnSampleLossHessian(problem.model, None, data, params=problem.names)
    return HessianOperator(problem.model, _mean_loss(loss_fn), data, params=problem.names)


@dataclass
class _PassStatistics:
    """What :func:`_statistics_pass` measured (``None``: not requested)."""

    n: int
    Y: Optional[Tensor]               # (n, l) G Z^T
    squared_norms: Optional[Tensor]   # (n,) |g_i|^2
    mean_gradient: Optional[Tensor]   # (d,) g_bar
    squared_sum: Optional[Tensor]     # (d,) sum_i g_i^2


def _statistics_pass(problem: PerSampleProblem, engine: ProductEngine, Z: Optional[Tensor],
                     want_sum: bool, want_squared_norms: bool, want_squared_sum: bool,
                     progress: bool) -> _PassStatistics:
    """One data pass: ``Y = G Z^T``, ``sum_i g_i``, ``|g_i|^2``, ``sum_i g_i^2`` as requested."""
    sketches: List[Tensor] = []
    norms: List[Tensor] = []
    f64, device = torch.float64, problem.device
    gradient_sum = torch.zeros(1, problem.d, dtype=f64, device=device) if want_sum else None
    squared_sum = torch.zeros(problem.d, dtype=f64, device=device) if want_squared_sum else None
    for ctx, batch_size, where in batch_contexts(problem, engine, progress, "statistics"):
        if Z is not None:
            y = engine.sketch(ctx, Z)
            check_finite(y, "a gradient product", problem.owner, where)
            sketches.append(y.double())
        if gradient_sum is not None:
            ones = torch.ones(batch_size, 1, dtype=problem.dtype, device=device)
            engine.project(ctx, ones, gradient_sum)
        if want_squared_norms:
            norms.append(engine.squared_norms(ctx).double())
        if squared_sum is not None:
            engine.add_squared_sum(ctx, squared_sum)
    n = problem.n_samples
    assert n is not None
    if gradient_sum is not None:
        check_finite(gradient_sum, "the gradient", problem.owner, "in the statistics pass")
    return _PassStatistics(
        n=n, Y=torch.cat(sketches) if sketches else None,
        squared_norms=torch.cat(norms) if norms else None,
        mean_gradient=gradient_sum[0] / n if gradient_sum is not None else None,
        squared_sum=squared_sum)


def _top_hessian_eigenvectors(problem: PerSampleProblem, loss_fn: Callable, data: Any, k: int,
                              which: str, hessian: Any, seed: int,
                              eigsh_kwargs: Optional[Dict[str, Any]]):
    """``(V, eigenvalues, n_hessian_matvecs, converged)``: by eigsh, or from ``hessian``."""
    if hessian is None:
        from ..lanczos import eigsh
        top = eigsh(_hessian_operator(problem, loss_fn, data), k, which=which, seed=seed,
                    **(eigsh_kwargs or {}))
        converged = bool(top.converged.all()) if top.converged is not None else None
        return top.eigenvectors, top.eigenvalues, top.n_matvecs, converged
    if isinstance(hessian, Tensor):
        n_vectors = hessian.shape[-1] if hessian.dim() == 2 else 1
        return hessian, torch.full((n_vectors,), float("nan"), dtype=torch.float64), 0, None
    return hessian.eigenvectors, hessian.eigenvalues, 0, None


def gradient_in_top_hessian_subspace(model: nn.Module, loss_fn: Optional[Callable], data: Any,
                                     k: int, *,
                                     which: str = "largest", hessian: Any = None,
                                     centered: bool = False, params: ParamSpec = None,
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
        mean; ``loss_fn=None``: of the mean of the model's own one-sample losses).
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
    model = unwrap_ddp(model)[0]        # process-local (module docstring)
    problem = PerSampleProblem(model, loss_fn, data, params, owner)
    if not isinstance(k, int) or k < 1 or k > problem.d:
        raise ValueError(f"{owner}: k must be an integer in [1, d = {problem.d}], got {k!r}")
    V, eigenvalues, n_hvp, converged = _top_hessian_eigenvectors(
        problem, loss_fn, data, k, which, hessian, seed, eigsh_kwargs)
    V = directions_of(V, "hessian eigenvectors")
    if V.shape[0] != problem.d:
        raise ValueError(f"{owner}: the Hessian eigenvectors have d = {V.shape[0]} rows but the "
                         f"selected parameters have d = {problem.d}")
    Qv = orthonormal_columns(V)
    n_directions = Qv.shape[1]
    with evaluation_context(model, "eval"):
        engine_method = "kronecker" if method == "gram" else method
        engine, used = make_engine(problem, engine_method, chunk_size, sketch_impl, seed,
                                   allow_gram=False)
        stats = _statistics_pass(problem, engine,
                                 Qv.T.to(problem.device, problem.dtype).contiguous(), True, True,
                                 False, progress)
    n, Y, mean_gradient = stats.n, stats.Y, stats.mean_gradient
    assert Y is not None and mean_gradient is not None and stats.squared_norms is not None
    projected_mean = Qv.to(mean_gradient.device).T @ mean_gradient
    g2 = float(mean_gradient.pow(2).sum())
    gradient_fraction = float(projected_mean.pow(2).sum()) / g2 if g2 > 0 else float("nan")
    trace = float(stats.squared_norms.sum()) / n
    if centered:
        Y = Y - Y.mean(0, keepdim=True)
        trace = trace - g2
    per_direction = Y.pow(2).sum(0) / n
    trace_fraction = float(per_direction.sum()) / trace if trace > 0 else float("nan")
    return TopHessianSubspaceResult(
        gradient_fraction=gradient_fraction, covariance_trace_fraction=trace_fraction,
        per_direction_variance=per_direction.cpu(),
        hessian_eigenvalues=eigenvalues.detach().cpu()[:n_directions],
        gradient_norm=math.sqrt(g2), covariance_trace=trace,
        random_baseline=n_directions / problem.d, k=n_directions, n_samples=n, n_params=problem.d,
        centered=centered, which=which, method_used=used, n_hessian_matvecs=n_hvp,
        hessian_converged=converged, seed=seed, time_s=time.perf_counter() - t0)


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


def _hessian_diagonal(problem: PerSampleProblem, loss_fn: Callable, data: Any,
                      hessian_diagonal: Any, hessian_method: str, n_matvecs: int,
                      seed: int) -> Tuple[Tensor, Any, int, str]:
    """``(diag H, its stderr or None, Hessian-vector products, method)``: given, exact (``d``
    products) or estimated by :func:`landscape_ext.diagonal`."""
    if hessian_diagonal is not None:
        return (getattr(hessian_diagonal, "estimate", hessian_diagonal),
                getattr(hessian_diagonal, "stderr", None),
                int(getattr(hessian_diagonal, "n_matvecs", 0)), "given")
    op = _hessian_operator(problem, loss_fn, data)
    d = problem.d
    if hessian_method != "exact":
        from ..estimators import diagonal
        estimate = diagonal(op, n_matvecs, method=hessian_method, seed=seed)
        return estimate.estimate, estimate.stderr, estimate.n_matvecs, hessian_method
    if d > 20000:
        raise ValueError(f"{problem.owner}: hessian_method='exact' needs d products; d = {d} "
                         f"is too large (use 'hutchinson' or 'xdiag')")
    h = torch.empty(d, dtype=torch.float64)
    step = 256
    for s in range(0, d, step):
        e = min(d, s + step)
        X = torch.zeros(e - s, d, dtype=op.dtype, device=op.device)
        X[torch.arange(e - s), torch.arange(s, e)] = 1.0
        h[s:e] = torch.diagonal(op.apply_rows(X)[:, s:e]).double().cpu()
    return h, None, d, hessian_method


def compare_covariance_to_hessian_diagonal(
        model: nn.Module, loss_fn: Optional[Callable], data: Any, *, centered: bool = False,
        hessian_diagonal: Any = None, hessian_method: str = "hutchinson",
        n_matvecs: int = 200, params: ParamSpec = None,
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
        As :func:`gradient_covariance_svd` (per-sample ``loss_fn``; ``None``: the model's own
        loss on each sample alone, and the Hessian of their mean).
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
    model = unwrap_ddp(model)[0]        # process-local (module docstring)
    problem = PerSampleProblem(model, loss_fn, data, params, owner)
    if hessian_method not in ("hutchinson", "xdiag", "exact"):
        raise ValueError(f"{owner}: hessian_method must be 'hutchinson', 'xdiag' or 'exact', got "
                         f"{hessian_method!r}")
    with evaluation_context(model, "eval"):
        engine_method = "kronecker" if method == "gram" else method
        engine, used = make_engine(problem, engine_method, chunk_size, sketch_impl, seed,
                                   allow_gram=False)
        stats = _statistics_pass(problem, engine, None, centered, False, True, progress)
    n = stats.n
    assert stats.squared_sum is not None
    c = stats.squared_sum / n
    if centered:
        assert stats.mean_gradient is not None
        c = c - stats.mean_gradient.pow(2)
    c = c.cpu()
    h, stderr, n_hvp, used_hessian_method = _hessian_diagonal(
        problem, loss_fn, data, hessian_diagonal, hessian_method, n_matvecs, seed)
    h = torch.as_tensor(h).detach().to(torch.float64).cpu().reshape(-1)
    if h.numel() != problem.d:
        raise ValueError(f"{owner}: the Hessian diagonal has {h.numel()} entries but the selected "
                         f"parameters have d = {problem.d}")
    h_norm = float(h.norm())
    c_squared = float(c.pow(2).sum())
    scale = float((c * h).sum()) / c_squared if c_squared > 0 else float("nan")
    se = None if stderr is None else torch.as_tensor(stderr).detach().double().cpu().reshape(-1)
    return CovarianceHessianDiagonalResult(
        covariance_diagonal=c, hessian_diagonal=h, hessian_diagonal_stderr=se,
        pearson=_pearson(c, h), spearman=_pearson(_rankdata(c), _rankdata(h)),
        relative_error=float((c - h).norm()) / h_norm if h_norm > 0 else float("nan"),
        scale=scale,
        relative_error_scaled=(float((scale * c - h).norm()) / h_norm
                               if h_norm > 0 and c_squared > 0 else float("nan")),
        hessian_noise=float(se.norm()) / h_norm if se is not None and h_norm > 0 else 0.0,
        fraction_negative_hessian=float((h < 0).double().mean()),
        covariance_trace=float(c.sum()), hessian_trace=float(h.sum()), n_samples=n,
        n_params=problem.d, centered=centered, hessian_method=used_hessian_method,
        n_hessian_matvecs=n_hvp, method_used=used, seed=seed, time_s=time.perf_counter() - t0)
