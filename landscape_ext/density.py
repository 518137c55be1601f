r"""Spectral density by stochastic Lanczos quadrature (SLQ), all probes advanced together: one
batched product of all probes per Lanczos step, one :func:`landscape_ext.orthogonalize_batched`
call for their reorthogonalization, then Gauss quadrature nodes and weights per probe and a
Gaussian-broadened density (:meth:`SpectralDensityResult.evaluate`). The estimator, its
breakdown rule and the broadening are described in docs/algorithms.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._args import count_argument
from .distributed import agree_all, is_main_process
from .estimators import _agree, _local_probes, _reduce
from .lanczos import BASIS_DTYPES, _products, _row_norms
from .ops import orthogonalize_batched
from .operators import CurvatureOperator, as_operator
from .results import Result
from .shards import vector_shards

__all__ = ["SpectralDensityResult", "DensityCurve", "spectral_density"]


@dataclass(repr=False)
class DensityCurve(Result):
    """A broadened density on a grid: probe mean and a band (``mean -+ 1.96 stderr`` across
    probes, a 95% interval of the mean)."""

    grid: Tensor
    density: Tensor
    lower: Tensor
    upper: Tensor
    sigma: float


@dataclass(repr=False)
class SpectralDensityResult(Result):
    """Result of :func:`spectral_density`.

    Attributes
    ----------
    nodes : Tensor
        ``(n_probes, n_steps)`` float64 quadrature nodes (Ritz values), ascending per probe.
    weights : Tensor
        ``(n_probes, n_steps)`` float64 weights, each row sums to 1 (zero-padded after an early
        breakdown).
    steps : Tensor
        ``(n_probes,)`` Lanczos steps each probe ran (``< n_steps`` after a breakdown).
    d : int
        Dimension; ``d * density`` is the eigenvalue count density.
    """

    nodes: Tensor
    weights: Tensor
    steps: Tensor
    d: int
    n_steps: int
    n_probes: int
    n_matvecs: int
    distribution: str = "rademacher"
    seed: int = 0
    mode_used: Optional[str] = None
    time_s: float = 0.0
    alpha: Optional[Tensor] = field(default=None, metadata={"export": False})
    beta: Optional[Tensor] = field(default=None, metadata={"export": False})

    # -- quadrature ----------------------------------------------------------------------------
    def probe_moments(self, p: int) -> Tensor:
        """``(n_probes,)``: ``v_i^T A^p v_i`` by quadrature (exact for ``p < 2 n_steps``)."""
        return (self.weights * self.nodes.pow(p)).sum(1)

    def moments(self, p: Union[int, Sequence[int]]) -> Tensor:
        r"""Estimate of the ``p``-th moment of the normalized spectral density,
        :math:`\int \lambda^p \phi(\lambda)\, d\lambda = \mathrm{tr}(A^p) / d` (mean over probes;
        :meth:`moments_stderr` gives its standard error). ``p`` may be a list."""
        ps = [p] if isinstance(p, int) else list(p)
        out = torch.stack([self.probe_moments(q).mean() for q in ps])
        return out[0] if isinstance(p, int) else out

    def moments_stderr(self, p: Union[int, Sequence[int]]) -> Tensor:
        """Standard error across probes of :meth:`moments`."""
        ps = [p] if isinstance(p, int) else list(p)
        r = self.n_probes
        out = torch.stack([self.probe_moments(q).std() / math.sqrt(r) if r > 1
                           else torch.tensor(float("nan"), dtype=torch.float64) for q in ps])
        return out[0] if isinstance(p, int) else out

    @property
    def spectral_range(self):
        """``(min, max)`` over the nodes that carry weight."""
        mask = self.weights > 0
        return float(self.nodes[mask].min()), float(self.nodes[mask].max())

    def default_sigma(self) -> float:
        lo, hi = self.spectral_range
        return max(hi - lo, 1e-12 * max(abs(hi), abs(lo), 1.0)) / 100.0

    # -- broadened density ---------------------------------------------------------------------
    def evaluate(self, grid: Union[Tensor, np.ndarray, Sequence[float], int] = 512,
                 sigma: Optional[float] = None) -> DensityCurve:
        r"""Gaussian-broadened density on ``grid``:

        .. math:: \hat\phi(x) = \frac1r \sum_i \sum_j w_{ij}\,
                  \frac{1}{\sqrt{2\pi}\sigma} e^{-(x - \theta_{ij})^2 / 2\sigma^2}

        Parameters
        ----------
        grid : Tensor, array, list or int
            Points, or a number of points spanning the node range padded by ``5 sigma``.
        sigma : float, optional
            Broadening; default ``(theta_max - theta_min) / 100``.

        Returns
        -------
        DensityCurve
            ``density`` integrates to about 1; ``lower``/``upper`` = ``mean -+ 1.96 stderr``
            across probes.
        """
        sigma = float(sigma) if sigma is not None else self.default_sigma()
        if not sigma > 0:
            raise ValueError(f"evaluate: sigma must be positive, got {sigma}")
        if isinstance(grid, int):
            lo, hi = self.spectral_range
            grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid, dtype=torch.float64)
        x = torch.as_tensor(np.asarray(grid, dtype=np.float64) if not isinstance(grid, Tensor)
                            else grid, dtype=torch.float64).reshape(-1)
        per = torch.empty(self.n_probes, x.numel(), dtype=torch.float64)
        norm = 1.0 / (math.sqrt(2 * math.pi) * sigma)
        for i in range(self.n_probes):
            z = (x[None, :] - self.nodes[i][:, None]) / sigma
            per[i] = (self.weights[i][:, None] * torch.exp(-0.5 * z * z)).sum(0) * norm
        mean = per.mean(0)
        se = per.std(0) / math.sqrt(self.n_probes) if self.n_probes > 1 else torch.zeros_like(mean)
        return DensityCurve(grid=x, density=mean, lower=(mean - 1.96 * se).clamp_min(0),
                            upper=mean + 1.96 * se, sigma=sigma)

    def plot(self, ax: Any = None, grid: Any = 512, sigma: Optional[float] = None,
             log: bool = True, band: bool = True, **kwargs: Any):
        """Plot the broadened density (log scale by default) with its band; returns the axes.
        matplotlib is imported lazily."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        c = self.evaluate(grid, sigma)
        x = c.grid.numpy()
        floor = 1e-12 if log else 0.0
        ax.plot(x, np.maximum(c.density.numpy(), floor), **kwargs)
        if band:
            ax.fill_between(x, np.maximum(c.lower.numpy(), floor),
                            np.maximum(c.upper.numpy(), floor), alpha=0.3)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"SLQ density ({self.n_probes} probes, {self.n_steps} steps, "
                     f"sigma={c.sigma:.3g})")
        return ax


def spectral_density(op: Any, n_steps: int = 64, n_probes: int = 8, *, seed: int = 0,
                     distribution: str = "rademacher", basis_dtype: Optional[torch.dtype] = None,
                     reorthogonalize: bool = True, progress: bool = False) -> SpectralDensityResult:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature
    (docs/algorithms.md).

    Parameters
    ----------
    op : operator-like
    n_steps : int
        Lanczos steps per probe (capped at ``d``); the quadrature is exact for moments of degree
        ``< 2 n_steps``.
    n_probes : int
        Independent probes, advanced together (one ``(d, n_probes)`` product per step).
    seed : int
    distribution : {"rademacher", "gaussian"}
        Probe law (normalized to unit length).
    basis_dtype : torch.dtype, optional
        Storage of the ``(n_probes, n_steps, d)`` bases (default: the operator's dtype;
        float16/bfloat16 halve the memory).
    reorthogonalize : bool
        Full reorthogonalization (default). ``False`` keeps only two vectors per probe (the plain
        three-term recurrence: memory ``O(n_probes d)``; ghost copies of outlying eigenvalues
        then show up as split weights but moments stay accurate).
    progress : bool

    Returns
    -------
    SpectralDensityResult
    """
    t0 = time.perf_counter()
    op = as_operator(op)
    shards = vector_shards(op)
    d = op.d if shards is None else shards.d
    n_steps = min(count_argument(n_steps, "n_steps", "spectral_density"), d)
    n_probes = count_argument(n_probes, "n_probes", "spectral_density")
    _agree(op, "spectral_density", n_steps=n_steps, n_probes=n_probes, seed=seed,
           distribution=distribution == "gaussian", reorthogonalize=bool(reorthogonalize))
    run = _start_slq(op, n_steps, n_probes, seed, distribution, basis_dtype, reorthogonalize,
                     progress)
    try:
        for j in range(n_steps):
            if _slq_step(run, j):
                break
    finally:
        if run.progress_bar is not None:
            run.progress_bar.close()
    nodes, weights = _quadrature(run.alpha, run.beta, run.steps, n_steps)
    return SpectralDensityResult(
        nodes=nodes, weights=weights, steps=run.steps, d=d, n_steps=n_steps, n_probes=n_probes,
        n_matvecs=op.n_matvecs - run.n_matvecs_start, distribution=distribution, seed=int(seed),
        mode_used=getattr(op, "mode_used", None), time_s=time.perf_counter() - t0,
        alpha=run.alpha, beta=run.beta)


@dataclass(eq=False)
class _SlqRun:
    """The state of the ``r`` Lanczos runs of :func:`spectral_density`."""

    op: CurvatureOperator
    n_steps: int
    alpha: Tensor                # (r, n_steps) diagonals of the tridiagonal T_i
    beta: Tensor                 # (r, n_steps) their off-diagonals
    steps: Tensor                # (r,) steps each probe ran
    active: Tensor               # (r,) probes not yet broken down
    n_matvecs_start: int
    basis: Optional[Tensor]      # (r, n_steps, d) bases, or None without reorthogonalization
    current: Tensor              # (r, d) the vectors multiplied next (recurrence only)
    previous: Optional[Tensor] = None      # the vectors before them (recurrence only)
    progress_bar: Any = None


def _start_slq(op: CurvatureOperator, n_steps: int, r: int, seed: int, distribution: str,
               basis_dtype: Optional[torch.dtype], reorthogonalize: bool,
               progress: bool, probes: Optional[Tensor] = None) -> _SlqRun:
    """Unit probes (the first Lanczos vectors; drawn, or ``probes (r, d)`` as given) and the
    buffers of the run."""
    d, dev = op.d, op.device
    if probes is None:
        gen = torch.Generator().manual_seed(int(seed))
        V = _local_probes(op, r, gen, distribution, "spectral_density")
    else:
        V = probes.to(torch.float64)
    V /= _row_norms(op, V)[:, None]
    V = V.to(dev)
    basis_dtype = basis_dtype or (op.dtype if op.dtype in BASIS_DTYPES else torch.float32)
    basis = None
    n_matvecs_start = op.n_matvecs
    if reorthogonalize:
        basis = torch.empty(r, n_steps, d, dtype=basis_dtype, device=dev)
        basis[:, 0] = V
    progress_bar = None
    if progress:
        from tqdm.auto import tqdm
        progress_bar = tqdm(total=n_steps, desc="SLQ", unit="step", disable=not is_main_process())
    return _SlqRun(op=op, n_steps=n_steps, alpha=torch.zeros(r, n_steps, dtype=torch.float64),
                   beta=torch.zeros(r, n_steps, dtype=torch.float64),
                   steps=torch.full((r,), n_steps, dtype=torch.long),
                   active=torch.ones(r, dtype=torch.bool), n_matvecs_start=n_matvecs_start,
                   basis=basis, current=V, progress_bar=progress_bar)


def _slq_step(run: _SlqRun, j: int) -> bool:
    """Lanczos step ``j`` of every probe: one batched product, ``alpha[:, j]``, ``beta[:, j]``
    and the next vectors. Returns True when every probe has broken down (on every rank)."""
    reorthogonalize = run.basis is not None
    q_j = run.basis[:, j] if reorthogonalize else run.current
    W = _products(run.op, q_j, f"spectral_density (step {j})").to(torch.float64)
    if run.progress_bar is not None:
        run.progress_bar.update(1)
    if reorthogonalize:
        a, norms, q = _reorthogonalized_step(run.op, run.basis, W, q_j, j, j == run.n_steps - 1)
    else:
        a, norms, q = _recurrence_step(run.op, W, run.current, run.previous, run.beta, j)
    run.alpha[:, j] = torch.where(run.active, a.cpu(), run.alpha[:, j])
    if norms is None:
        return False
    norms = norms.cpu()
    # breakdown: the probe's Krylov space is (numerically) invariant; its later coefficients
    # are not recorded
    scale = max(float(run.alpha[:, : j + 1].abs().max()), 1e-300)
    broke = run.active & (norms <= 1e-12 * scale)
    run.beta[:, j] = torch.where(run.active & ~broke, norms, run.beta[:, j])
    run.steps[broke] = j + 1
    run.active &= ~broke
    stop = not bool(run.active.any())
    group = getattr(run.op, "process_group", None)
    if group is not None:  # data parallel: every rank stops at the same step
        stop = agree_all(group, stop, run.op.device)
    if stop:
        return True
    if reorthogonalize:
        run.basis[:, j + 1] = q
    else:
        run.previous, run.current = run.current, q
    return False


def _reorthogonalized_step(op: CurvatureOperator, basis: Tensor, W: Tensor, q_j: Tensor, j: int,
                           last: bool) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(alpha_j, beta_j, q_{j+1})`` of every probe by CGS2 against its whole basis; the last
    step needs only ``alpha_j``."""
    if last:
        return _reduce(op, (W * q_j.to(torch.float64)).sum(1)), None, None
    shards = vector_shards(op)
    if shards is not None:
        q, coeffs, norms = shards.orthogonalize_batched(basis, W, j + 1)
    else:
        q, coeffs, norms = orthogonalize_batched(basis, W, j + 1)
    return coeffs[:, j], norms, q


def _recurrence_step(op: CurvatureOperator, W: Tensor, current: Tensor,
                     previous: Optional[Tensor], beta: Tensor,
                     j: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(alpha_j, beta_j, q_{j+1})`` of every probe by the three-term recurrence alone."""
    current = current.to(torch.float64)
    a = _reduce(op, (W * current).sum(1))
    W = W - a[:, None] * current
    if previous is not None:
        W = W - beta[:, j - 1].to(W.device)[:, None] * previous.to(torch.float64)
    norms = _row_norms(op, W)
    return a, norms, W / norms.clamp_min(1e-300)[:, None]


def _quadrature(alpha: Tensor, beta: Tensor, steps: Tensor, n_steps: int
                ) -> Tuple[Tensor, Tensor]:
    """Gauss quadrature nodes (Ritz values of ``T_i``) and weights (squared first components
    of its eigenvectors) per probe; a probe that broke down after ``L`` steps has ``L`` nodes,
    padded with its largest node at weight 0."""
    r = alpha.shape[0]
    nodes = torch.zeros(r, n_steps, dtype=torch.float64)
    weights = torch.zeros(r, n_steps, dtype=torch.float64)
    for i in range(r):
        L = int(steps[i])
        Tm = torch.diag(alpha[i, :L])
        if L > 1:
            off = beta[i, : L - 1]
            Tm += torch.diag(off, 1) + torch.diag(off, -1)
        th, U = torch.linalg.eigh(Tm)
        nodes[i, :L] = th
        weights[i, :L] = U[0] ** 2
        if L < n_steps:
            nodes[i, L:] = th[-1]
    return nodes, weights
