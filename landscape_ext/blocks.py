"""Blockwise spectra: eigenpairs of the diagonal blocks ``H[b, b]`` of an operator.

:func:`block_eigsh` runs one Lanczos process per block, all in lockstep: each step multiplies
one direction per unfinished block in **one** batched product (each direction is zero outside
its block; the product's rows are read back inside the block only), so ``B`` blocks cost about
as many products as one. :func:`parameter_blocks` builds blocks of a model's parameters
(``"modules"``, ``"layers"``, ``"kinds"``). The algorithm: docs/algorithms.md, "Blockwise
spectra".
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._args import count_argument
from .density import SpectralDensityResult, _quadrature, _slq_step, _start_slq
from .estimators import _probes
from .lanczos import WHICH, EigshResult, _wanted
from .operators import CallableOperator, CurvatureOperator, as_operator
from .ops import block_orthonormalize
from .shards import agree_call

__all__ = ["block_eigsh", "block_spectral_density", "parameter_blocks", "BlockSpectra",
           "BlockDensities", "BLOCK_PRESETS"]

BLOCK_PRESETS = ("modules", "layers", "kinds")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
               nn.modules.instancenorm._InstanceNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm")
                                                         else ())


# ------------------------------------------------------------------------------------------------
# blocks of parameters
# ------------------------------------------------------------------------------------------------


def _kind(module_name: str, module: nn.Module, attention_prefixes: Sequence[str]) -> str:
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if isinstance(module, nn.MultiheadAttention) or any(
            module_name == p or module_name.startswith(p + ".") for p in attention_prefixes):
        return "attention"
    if isinstance(module, _NORM_TYPES):
        return "norms"
    return "mlp"


def parameter_blocks(model: nn.Module, preset: str = "kinds",
                     params: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """Blocks of a model's parameters by name, for :func:`block_eigsh`.

    Parameters
    ----------
    model : nn.Module
    preset : {"modules", "layers", "kinds"}
        ``modules``: one block per module that owns parameters directly (its dotted name;
        ``"(root)"`` for parameters of the model itself). ``layers``: one block per top-level
        child. ``kinds``: ``embeddings`` (``nn.Embedding`` and parameters of the model itself,
        such as positional embeddings), ``attention`` (``nn.MultiheadAttention`` and everything
        inside it), ``norms`` (LayerNorm, GroupNorm, BatchNorm, InstanceNorm, RMSNorm), ``head``
        (the last module with parameters when it is an ``nn.Linear``) and ``mlp`` (the rest).
    params : sequence of str, optional
        Only these parameter names (default: all with ``requires_grad``).

    Returns
    -------
    dict of str to list of str
        Parameter names per block, in ``named_parameters()`` order; empty blocks are left out.
    """
    if preset not in BLOCK_PRESETS:
        raise ValueError(f"parameter_blocks: preset must be one of {BLOCK_PRESETS}, got "
                         f"{preset!r}")
    wanted = set(params) if params is not None else {
        n for n, p in model.named_parameters() if p.requires_grad}
    owners = []                        # (parameter name, owning module name, module)
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if full in wanted:
                owners.append((full, module_name, module))
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    last_owner = owners[-1][1] if owners else None
    blocks: Dict[str, List[str]] = {}
    for full, module_name, module in owners:
        if preset == "modules":
            key = module_name or "(root)"
        elif preset == "layers":
            key = module_name.split(".")[0] if module_name else "(root)"
        elif module_name == "":
            key = "embeddings"
        elif module_name == last_owner and isinstance(module, nn.Linear) and \
                _kind(module_name, module, attention) == "mlp":
            key = "head"
        else:
            key = _kind(module_name, module, attention)
        blocks.setdefault(key, []).append(full)
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return {k: sorted(v, key=order.__getitem__) for k, v in blocks.items()}


def _block_indices(op: CurvatureOperator, blocks: Mapping[str, Any]) -> Dict[str, Tensor]:
    """Index tensors into the operator's flat layout, one per block; unknown parameter names,
    empty and overlapping blocks are errors naming the argument."""
    if isinstance(blocks, str):
        model = getattr(op, "model", None)
        if model is None:
            raise ValueError(f"block_eigsh: blocks={blocks!r} (a preset) needs a model operator")
        blocks = parameter_blocks(model, blocks, getattr(op, "param_names", None))
    if not isinstance(blocks, Mapping) or not blocks:
        raise ValueError("block_eigsh: blocks must be a non-empty mapping of block names to "
                         "parameter names (or index tensors), or a preset name")
    layout = getattr(op, "layout", None)
    out: Dict[str, Tensor] = {}
    owner = torch.full((op.d,), -1, dtype=torch.long)
    for i, (name, members) in enumerate(blocks.items()):
        if isinstance(members, Tensor):
            idx = members.reshape(-1).to(torch.long)
        else:
            if layout is None:
                raise ValueError(f"block_eigsh: block {name!r} lists parameter names, but the "
                                 f"operator has no parameter layout; give index tensors")
            for pname in members:
                if pname not in layout.offsets:
                    raise ValueError(f"block_eigsh: blocks[{name!r}] names {pname!r}, which is "
                                     f"not a parameter of the operator (its parameters: "
                                     f"{layout.names[:5]}{' ...' if len(layout.names) > 5 else ''})")
            idx = layout.indices(list(members))
        if idx.numel() == 0:
            raise ValueError(f"block_eigsh: blocks[{name!r}] is empty")
        if int(idx.min()) < 0 or int(idx.max()) >= op.d:
            raise ValueError(f"block_eigsh: blocks[{name!r}] has indices outside [0, {op.d})")
        taken = owner[idx]
        if bool((taken >= 0).any()) or idx.unique().numel() != idx.numel():
            other = list(blocks)[int(taken[taken >= 0][0])] if bool((taken >= 0).any()) else name
            raise ValueError(f"block_eigsh: blocks overlap: {name!r} and {other!r} share "
                             f"coordinates (blocks must be disjoint)")
        owner[idx] = i
        out[str(name)] = idx
    return out


# ------------------------------------------------------------------------------------------------
# the lockstep Lanczos runs
# ------------------------------------------------------------------------------------------------


class BlockSpectra(dict):
    """``{block name: EigshResult}`` from :func:`block_eigsh`, with the shared cost.

    Attributes
    ----------
    n_products : int
        Batched operator products (each one direction per unfinished block).
    n_matvecs : int
        Directions multiplied in all (the sum of the blocks' ``n_matvecs``).
    sizes : dict of str to int
        Coordinates per block.
    """

    n_products: int = 0
    n_matvecs: int = 0
    sizes: Dict[str, int] = {}

    def summary(self) -> Dict[str, Any]:
        """Heterogeneity across blocks: each block's extreme eigenvalue, their spread
        (``max / min`` of ``|lambda_1|`` and the standard deviation of ``log10 |lambda_1|``)."""
        top = {n: float(r.eigenvalues[0]) for n, r in self.items() if r.eigenvalues.numel()}
        mags = [abs(v) for v in top.values() if v != 0.0]
        logs = [math.log10(v) for v in mags]
        mean = sum(logs) / len(logs) if logs else float("nan")
        return {"lambda_1": top,
                "ratio_max_min": max(mags) / min(mags) if mags else float("nan"),
                "log10_sd": (math.sqrt(sum((v - mean) ** 2 for v in logs) / len(logs))
                             if logs else float("nan")),
                "n_products": self.n_products, "n_matvecs": self.n_matvecs}


@dataclass
class _BlockRun:
    """One block's Lanczos process: compact basis rows ``(m, d_b)``, projected matrix ``T``."""

    name: str
    index: Tensor
    basis: Tensor
    T: Tensor
    n: int = 0                       # basis rows multiplied so far
    coupling: float = 0.0            # |r| of the last step: couples the next basis row
    broke_down: bool = False         # a lost direction was replaced (invariant subspace)
    done: bool = False
    theta: Optional[Tensor] = None
    Y: Optional[Tensor] = None
    residuals: Optional[Tensor] = None
    converged: Optional[Tensor] = None


def _ritz(run: _BlockRun, which: str, k: int, tol: float) -> None:
    """Rayleigh-Ritz of the block's projected matrix; residual ``|r| |y_last|`` per pair."""
    T = run.T[:run.n, :run.n]
    theta, Y = torch.linalg.eigh(0.5 * (T + T.T))
    idx = _wanted(theta, which, min(k, run.n))
    run.theta, run.Y = theta[idx], Y[:, idx]
    run.residuals = run.coupling * run.Y[-1].abs()
    scale = float(theta.abs().max()) if theta.numel() else 0.0
    run.converged = run.residuals <= tol * max(scale, 1e-300)


def _step(run: _BlockRun, w: Tensor, which: str, k: int, tol: float) -> None:
    """Orthogonalize ``w = H q_n`` (restricted to the block) against the basis, fill column
    ``n`` of ``T`` and append the next basis row; decide whether the block is done."""
    j = run.n
    w = w.to(run.basis.dtype)
    if j + 1 < run.index.numel():
        q, coeffs, r = block_orthonormalize(run.basis, w.unsqueeze(0), j + 1)
        column, run.coupling = coeffs[:, 0].double().cpu(), float(r[0, 0])
    else:   # the basis spans the whole block: the projection is exact, nothing couples on
        q, column, run.coupling = None, (run.basis[:j + 1].double() @ w.double()).cpu(), 0.0
    run.T[:j + 1, j] = column
    run.T[j, :j + 1] = column
    run.n = j + 1
    run.broke_down |= run.coupling == 0.0 and q is not None
    full = run.n >= run.basis.shape[0]
    if not full:
        run.basis[run.n] = q[0]
        run.T[run.n - 1, run.n] = run.T[run.n, run.n - 1] = run.coupling
    if run.n >= min(k, run.index.numel()) or full:
        _ritz(run, which, k, tol)
        exact = run.n >= run.index.numel()
        # after a breakdown only a full Krylov space is trusted (further copies of a multiple
        # eigenvalue only come from fresh directions)
        run.done = full or exact or (not run.broke_down and bool(run.converged.all())
                                     and run.theta.numel() == min(k, run.index.numel()))


def block_eigsh(op: Any, blocks: Union[str, Mapping[str, Any]], k: int = 1,
                which: str = "largest", *, tol: Optional[float] = None,
                max_basis: Optional[int] = None, seed: int = 0,
                return_eigenvectors: bool = True) -> BlockSpectra:
    """Top-``k`` eigenpairs of each diagonal block ``H[b, b]`` of a symmetric operator.

    Parameters
    ----------
    op : CurvatureOperator or array-like
        A model operator (blocks by parameter name) or any symmetric operator (blocks by index).
    blocks : str or mapping
        A preset of :func:`parameter_blocks` (``"modules"``, ``"layers"``, ``"kinds"``), or
        ``{name: [parameter names]}``, or ``{name: LongTensor of coordinates}``. Blocks must be
        disjoint; they need not cover every parameter.
    k : int
        Eigenpairs per block (fewer for a block smaller than ``k``).
    which : {"largest", "smallest", "both", "magnitude"}
    tol : float, optional
        A pair is converged when ``|H_bb x - theta x| <= tol * max |theta|`` of its block.
        Default ``1e-8`` for float64 operators, ``1e-4`` otherwise.
    max_basis : int, optional
        Lanczos steps per block at most (no restart; default ``max(60, 10 k)``, capped at the
        block's size, where the result is exact). A block that has not converged by then reports
        ``converged = False``.
    seed : int
        Seeds the start vectors (one per block, drawn in block order).
    return_eigenvectors : bool
        Eigenvectors ``(d, k)`` in the operator's layout, zero outside the block.

    Returns
    -------
    BlockSpectra
        ``{name: EigshResult}`` (a dict) with ``n_products`` (batched products shared by all
        blocks), ``n_matvecs`` and :meth:`BlockSpectra.summary`.

    Shapes
    ------
    Each product: ``(B_active, d)`` rows, one per unfinished block.
    """
    start_time = time.perf_counter()
    op = as_operator(op)
    if which not in WHICH:
        raise ValueError(f"block_eigsh: which must be one of {WHICH}, got {which!r}")
    k = count_argument(k, "k", "block_eigsh")
    if max_basis is not None and int(max_basis) < 1:
        raise ValueError(f"block_eigsh: max_basis must be >= 1, got {max_basis}")
    tol = (1e-8 if op.dtype == torch.float64 else 1e-4) if tol is None else float(tol)
    index = _block_indices(op, blocks)
    steps = int(max_basis) if max_basis is not None else max(60, 10 * k)
    agree_call(op, "block_eigsh", {"which": WHICH}, k=k, which=WHICH.index(which), tol=tol,
               max_basis=steps, seed=seed, n_blocks=len(index))
    work = torch.float64 if op.dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(int(seed))
    runs = []
    for name, idx in index.items():
        m = min(steps, idx.numel())
        basis = torch.zeros(m, idx.numel(), dtype=work)
        start = torch.randn(idx.numel(), generator=gen, dtype=torch.float64)
        basis[0] = (start / start.norm()).to(work)
        runs.append(_BlockRun(name, idx.to(op.device), basis.to(op.device),
                              torch.zeros(m + 1, m + 1, dtype=torch.float64)))
    n_products = 0
    while True:
        active = [run for run in runs if not run.done]
        if not active:
            break
        X = torch.zeros(len(active), op.d, dtype=op.dtype, device=op.device)
        for row, run in enumerate(active):
            X[row, run.index] = run.basis[run.n].to(op.dtype)
        Y = op.apply_rows(X)
        n_products += 1
        for row, run in enumerate(active):
            _step(run, Y[row, run.index].to(work), which, k, tol)
    return _results(runs, op, which, k, tol, steps, seed, n_products, return_eigenvectors,
                    time.perf_counter() - start_time)


def _results(runs: List[_BlockRun], op: CurvatureOperator, which: str, k: int, tol: float,
             steps: int, seed: int, n_products: int, return_eigenvectors: bool,
             seconds: float) -> BlockSpectra:
    out = BlockSpectra()
    for run in runs:
        vectors = None
        if return_eigenvectors:
            local = run.basis[:run.n].double().T @ run.Y.to(op.device)
            vectors = torch.zeros(op.d, local.shape[1], dtype=run.basis.dtype, device=op.device)
            vectors[run.index] = local.to(run.basis.dtype)
        scale = float(run.theta.abs().max()) if run.theta.numel() else 0.0
        out[run.name] = EigshResult(
            eigenvalues=run.theta, eigenvectors=vectors, residuals=run.residuals,
            converged=run.converged, n_matvecs=run.n, n_iterations=run.n, which=which, k=k,
            tol=tol, block_size=1, max_basis=steps, basis_dtype=str(run.basis.dtype),
            spectral_norm_estimate=scale, seed=seed, mode_used=getattr(op, "mode_used", None),
            method="block-lanczos (lockstep, per block)", time_s=seconds)
    out.n_products = n_products
    out.n_matvecs = sum(run.n for run in runs)
    out.sizes = {run.name: int(run.index.numel()) for run in runs}
    return out


# ------------------------------------------------------------------------------------------------
# blockwise spectral densities
# ------------------------------------------------------------------------------------------------


class BlockDensities(dict):
    """``{block name: SpectralDensityResult}`` from :func:`block_spectral_density`.

    Attributes
    ----------
    n_products : int
        Batched operator products (all probes of all blocks in each).
    n_matvecs : int
        Directions multiplied in all.
    sizes : dict of str to int
    """

    n_products: int = 0
    n_matvecs: int = 0
    sizes: Dict[str, int] = {}

    def summary(self, grid: int = 512, sigma: Optional[float] = None) -> Dict[str, Any]:
        """Heterogeneity across blocks: ``tr(H_bb) / d_b`` (the first moment, with its standard
        error across probes), each block's largest quadrature node (``lambda_max`` estimate),
        and the pairwise Jensen-Shannon distance (base 2, in [0, 1]) of the broadened block
        densities on one common grid (``sigma``: default 1/100 of the joint node range)."""
        lows, highs = zip(*(r.spectral_range for r in self.values()))
        lo, hi = min(lows), max(highs)
        sigma = sigma or max(hi - lo, 1e-12 * max(abs(hi), abs(lo), 1.0)) / 100.0
        points = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid, dtype=torch.float64)
        mass = {}
        for name, res in self.items():
            density = res.evaluate(points, sigma).density.clamp_min(0)
            mass[name] = density / density.sum().clamp_min(1e-300)
        names = list(self)
        js = {a: {b: _js_distance(mass[a], mass[b]) for b in names} for a in names}
        return {"trace_per_dim": {n: float(r.moments(1)) for n, r in self.items()},
                "trace_per_dim_stderr": {n: float(r.moments_stderr(1)) for n, r in self.items()},
                "lambda_max": {n: r.spectral_range[1] for n, r in self.items()},
                "js_distance": js, "sigma": sigma, "n_products": self.n_products,
                "n_matvecs": self.n_matvecs}


def _js_distance(p: Tensor, q: Tensor) -> float:
    """Jensen-Shannon distance (square root of the divergence, base 2) of two distributions."""
    m = 0.5 * (p + q)

    def kl(a: Tensor) -> Tensor:
        mask = a > 0
        return (a[mask] * torch.log2(a[mask] / m[mask])).sum()

    return float(torch.sqrt((0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0)))


def block_spectral_density(op: Any, blocks: Union[str, Mapping[str, Any]], n_steps: int = 64,
                           n_probes: int = 8, *, seed: int = 0,
                           distribution: str = "rademacher",
                           basis_dtype: Optional[torch.dtype] = None) -> BlockDensities:
    """Spectral density of each diagonal block ``H[b, b]`` by stochastic Lanczos quadrature,
    all blocks' probes advanced together (one batched product of ``B x n_probes`` directions per
    step; each probe is supported on its block and its products are read back there).

    Parameters
    ----------
    op, blocks
        As :func:`block_eigsh`.
    n_steps, n_probes, distribution, basis_dtype
        Per block, as :func:`landscape_ext.spectral_density` (``n_steps`` is capped at the
        largest block; a smaller block's probes break down, exactly, at its size).
    seed : int
        Seeds the probes (drawn in block order).

    Returns
    -------
    BlockDensities
        ``{name: SpectralDensityResult}`` (``d`` = the block's size, so ``moments(1)`` estimates
        ``tr(H_bb) / d_b``) with the shared cost and :meth:`BlockDensities.summary`.
    """
    start_time = time.perf_counter()
    op = as_operator(op)
    n_steps = count_argument(n_steps, "n_steps", "block_spectral_density")
    n_probes = count_argument(n_probes, "n_probes", "block_spectral_density")
    index = _block_indices(op, blocks)
    agree_call(op, "block_spectral_density", n_steps=n_steps, n_probes=n_probes, seed=seed,
               n_blocks=len(index), distribution=distribution == "gaussian")
    gen = torch.Generator().manual_seed(int(seed))
    rows, owner = [], []
    for i, idx in enumerate(index.values()):
        probes = torch.zeros(n_probes, op.d, dtype=torch.float64)
        probes[:, idx] = _probes(n_probes, idx.numel(), gen, distribution,
                                 "block_spectral_density")
        rows.append(probes)
        owner += [i] * n_probes
    mask = torch.zeros(len(owner), op.d, dtype=torch.bool)
    for row, i in enumerate(owner):
        mask[row, list(index.values())[i]] = True
    mask = mask.to(op.device)

    def restricted(X: Tensor) -> Tensor:   # each row's product read back inside its block
        return op.apply_rows(X) * mask

    masked = CallableOperator(restricted, op.d, op.dtype, op.device, rows=True)
    steps = min(n_steps, max(idx.numel() for idx in index.values()))
    run = _start_slq(masked, steps, len(owner), seed, distribution, basis_dtype, True, False,
                     probes=torch.cat(rows))
    n_products = 0
    for j in range(steps):
        n_products += 1
        if _slq_step(run, j):
            break
    nodes, weights = _quadrature(run.alpha, run.beta, run.steps, steps)
    out = BlockDensities()
    seconds = time.perf_counter() - start_time
    for i, (name, idx) in enumerate(index.items()):
        sel = torch.tensor([row for row, o in enumerate(owner) if o == i])
        out[name] = SpectralDensityResult(
            nodes=nodes[sel], weights=weights[sel], steps=run.steps[sel], d=int(idx.numel()),
            n_steps=steps, n_probes=n_probes, n_matvecs=int(run.steps[sel].sum()),
            distribution=distribution, seed=int(seed), mode_used=getattr(op, "mode_used", None),
            time_s=seconds, alpha=run.alpha[sel], beta=run.beta[sel])
    out.n_products = n_products
    out.n_matvecs = masked.n_matvecs
    out.sizes = {name: int(idx.numel()) for name, idx in index.items()}
    return out
