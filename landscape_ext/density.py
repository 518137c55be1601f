r"""Spectral density by stochastic Lanczos quadrature (SLQ), all probes advanced together.

For ``r`` unit probes ``v_i`` (Rademacher or Gaussian, normalized), ``n`` Lanczos steps give a
tridiagonal ``T_i = U_i diag(theta_i) U_i^T`` and the Gauss quadrature

.. math:: v_i^\top f(A) v_i \approx \sum_j w_{ij} f(\theta_{ij}), \qquad w_{ij} = U_i[0, j]^2,

exact for polynomials of degree ``< 2n``. Since ``E[v^T f(A) v] = tr f(A) / d`` for unit probes
drawn uniformly (Gaussian) or as normalized sign vectors, the spectral density normalized to 1,
:math:`\phi(\lambda) = \frac1d \sum_k \delta(\lambda - \lambda_k)`, is estimated by
:math:`\frac1r \sum_i \sum_j w_{ij}\, \delta(\lambda - \theta_{ij})`.

Each step is **one** batched product ``A [v_1 .. v_r]``; the reorthogonalization of all probes
against their own bases is one :func:`landscape_ext.orthogonalize_batched` call (CGS2). A probe
whose Krylov space becomes invariant (``norms == 0``) stops there; its remaining nodes carry
weight 0.

Broadening (:meth:`SpectralDensityResult.evaluate`): each node becomes a Gaussian
:math:`N(\lambda; \theta_{ij}, \sigma^2)`, by default :math:`\sigma = (\theta_{\max} -
\theta_{\min}) / 100` over all probes' nodes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .distributed import agree_all
from .ops import orthogonalize_batched
from .operators import as_operator
from .results import Result

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
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature.

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
    group = getattr(op, "process_group", None)
    d = op.d
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"spectral_density: n_steps must be a positive integer, got {n_steps!r}")
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"spectral_density: n_probes must be a positive integer, got "
                         f"{n_probes!r}")
    n_steps = min(n_steps, d)
    r = n_probes
    gen = torch.Generator().manual_seed(int(seed))
    if distribution == "rademacher":
        V = torch.randint(0, 2, (r, d), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    elif distribution == "gaussian":
        V = torch.randn(r, d, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(f"spectral_density: distribution must be 'rademacher' or 'gaussian', "
                         f"got {distribution!r}")
    V /= torch.linalg.vector_norm(V, dim=1, keepdim=True)
    dev = op.device
    V = V.to(dev)
    basis_dtype = basis_dtype or (op.dtype if op.dtype in (torch.float64, torch.float32,
                                                           torch.float16, torch.bfloat16)
                                  else torch.float32)
    alpha = torch.zeros(r, n_steps, dtype=torch.float64)
    beta = torch.zeros(r, n_steps, dtype=torch.float64)
    steps = torch.full((r,), n_steps, dtype=torch.long)
    active = torch.ones(r, dtype=torch.bool)
    n0 = op.n_matvecs
    if reorthogonalize:
        B = torch.empty(r, n_steps, d, dtype=basis_dtype, device=dev)
        B[:, 0] = V
    cur = V
    prev = None
    pbar = None
    if progress:
        from tqdm.auto import tqdm
        from .distributed import is_main_process
        pbar = tqdm(total=n_steps, desc="SLQ", unit="step", disable=not is_main_process())
    try:
        for j in range(n_steps):
            qj = B[:, j] if reorthogonalize else cur
            W = op.apply_rows(qj).to(torch.float64)
            if not bool(torch.isfinite(W).all()):
                raise FloatingPointError(f"spectral_density: the operator product contains "
                                         f"NaN/Inf at step {j}")
            if pbar is not None:
                pbar.update(1)
            last = j == n_steps - 1
            if reorthogonalize:
                if last:
                    a = (W * qj.to(torch.float64)).sum(1)
                    nrm = None
                else:
                    q, coeffs, nrm = orthogonalize_batched(B, W, j + 1)
                    a = coeffs[:, j]
            else:
                qf = cur.to(torch.float64)
                a = (W * qf).sum(1)
                W = W - a[:, None] * qf
                if prev is not None:
                    W = W - beta[:, j - 1].to(dev)[:, None] * prev.to(torch.float64)
                nrm = torch.linalg.vector_norm(W, dim=1)
                q = W / nrm.clamp_min(1e-300)[:, None]
            alpha[:, j] = torch.where(active, a.cpu(), alpha[:, j])
            if nrm is not None:
                nrm = nrm.cpu()
                scale = max(float(alpha[:, : j + 1].abs().max()), 1e-300)
                broke = active & (nrm <= 1e-12 * scale)
                beta[:, j] = torch.where(active & ~broke, nrm, beta[:, j])
                steps[broke] = j + 1
                active &= ~broke
                stop = not bool(active.any())
                if group is not None:  # data parallel: every rank stops at the same step
                    stop = agree_all(group, stop, op.device)
                if stop:
                    break
                if reorthogonalize:
                    B[:, j + 1] = q
                else:
                    prev, cur = cur, q
    finally:
        if pbar is not None:
            pbar.close()

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
    return SpectralDensityResult(
        nodes=nodes, weights=weights, steps=steps, d=d, n_steps=n_steps, n_probes=r,
        n_matvecs=op.n_matvecs - n0, distribution=distribution, seed=int(seed),
        mode_used=getattr(op, "mode_used", None), time_s=time.perf_counter() - t0,
        alpha=alpha, beta=beta)
