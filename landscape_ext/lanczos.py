r"""Eigenpairs of symmetric operators: thick-restart block Lanczos (:func:`eigsh`) and the
spectral norm (:func:`spectral_norm`).

The algorithm (the basis and its orthogonalization, Rayleigh-Ritz, thick restart, invariant
subspaces, the dense solve of small operators) is described in docs/algorithms.md; the private
helpers below are named after its steps.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ._args import count_argument
from .distributed import agree_all, is_main_process
from .ops import block_orthonormalize
from .operators import CurvatureOperator, as_operator
from .results import Result
from .shards import agree_call, vector_shards

__all__ = ["EigshResult", "SpectralNormResult", "eigsh", "spectral_norm"]

log = logging.getLogger(__name__)

WHICH = ("largest", "smallest", "both", "magnitude")

#: Largest dimension for which a non-converging Lanczos run falls back to a dense solve.
DENSE_MAX_D = 4096

#: Storage dtypes of a Krylov basis.
BASIS_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(repr=False)
class EigshResult(Result):
    """Result of :func:`eigsh`.

    Attributes
    ----------
    eigenvalues : Tensor
        ``(k,)`` float64; ``largest``/``both``: descending, ``smallest``: ascending,
        ``magnitude``: by ``|lambda|`` descending.
    eigenvectors : Tensor or None
        ``(d, k)`` unit columns (float64 for float64 operators, float32 otherwise); not in
        ``to_dict()``.
    residuals : Tensor
        ``(k,)`` absolute residual norms ``|A x - lambda x|``; recomputed with one batched
        product when ``verify=True`` (``residuals_verified``).
    converged : Tensor
        ``(k,)`` bool, ``residuals <= tol * spectral_norm_estimate``.
    n_matvecs : int
        Operator products used (including the verification product).
    """

    eigenvalues: Tensor
    eigenvectors: Optional[Tensor] = field(default=None, metadata={"export": False})
    residuals: Optional[Tensor] = None
    converged: Optional[Tensor] = None
    n_matvecs: int = 0
    n_restarts: int = 0
    n_iterations: int = 0
    which: str = "largest"
    k: int = 0
    tol: float = 0.0
    block_size: int = 1
    max_basis: int = 0
    basis_dtype: str = ""
    spectral_norm_estimate: float = 0.0
    residuals_verified: bool = False
    seed: int = 0
    mode_used: Optional[str] = None
    method: str = "block-lanczos"
    time_s: float = 0.0

    @property
    def relative_residuals(self) -> Tensor:
        """Residuals divided by the spectral-norm estimate."""
        return self.residuals / max(self.spectral_norm_estimate, 1e-300)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


@dataclass(repr=False)
class SpectralNormResult(Result):
    """Result of :func:`spectral_norm`: ``value = max |lambda|`` and its eigenpair."""

    value: float
    eigenvalue: float = 0.0
    vector: Optional[Tensor] = field(default=None, metadata={"export": False})
    residual: float = 0.0
    converged: bool = False
    n_matvecs: int = 0
    tol: float = 0.0
    seed: int = 0
    mode_used: Optional[str] = None
    time_s: float = 0.0


# ------------------------------------------------------------------------------------------------
# sharded vectors: operators of FSDP2 models (landscape_ext.shards) hold local rows


def _dimension(op: CurvatureOperator) -> int:
    """The global dimension (``op.d`` unless the operator's vectors are sharded)."""
    shards = vector_shards(op)
    return op.d if shards is None else shards.d


def _orthonormalize(op: CurvatureOperator, Q: Tensor, W: Tensor, n_basis: int,
                    **kwargs: Any) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`block_orthonormalize`, or its distributed driver for sharded vectors."""
    shards = vector_shards(op)
    if shards is None:
        return block_orthonormalize(Q, W, n_basis, **kwargs)
    return shards.block_orthonormalize(Q, W, n_basis)


def _row_norms(op: CurvatureOperator, X: Tensor) -> Tensor:
    shards = vector_shards(op)
    if shards is None:
        return torch.linalg.vector_norm(X, dim=1)
    return shards.norms(X)


# ------------------------------------------------------------------------------------------------
# products


def _products(op: CurvatureOperator, X: Tensor, where: str) -> Tensor:
    """Products of the operator with the rows of ``X (n, d)`` (``op.apply_rows``), in the
    operator's dtype and on its device; a NaN/Inf in them is an error that names ``where``."""
    W = op.apply_rows(X)
    if not bool(torch.isfinite(W).all()):
        raise FloatingPointError(f"{where}: the operator product contains "
                                 f"{int((~torch.isfinite(W)).sum())} NaN/Inf value(s)")
    return W


def _products_in_batches(op: CurvatureOperator, X: Tensor, batch_size: Optional[int],
                         where: str) -> Tensor:
    """Products with the rows of ``X (n, d)`` as float64 on the CPU, ``batch_size`` rows per
    product (default: all at once): only one batch and its products are on the device at a
    time."""
    n = X.shape[0]
    step = batch_size or n
    if step >= n:
        return _products(op, X.to(op.device), where).to(torch.float64).cpu()
    out = torch.empty(n, X.shape[1], dtype=torch.float64)
    for start in range(0, n, step):
        batch = X[start:start + step].to(op.device)
        out[start:start + step] = _products(op, batch, where).to(torch.float64).cpu()
    return out


# ------------------------------------------------------------------------------------------------
# which Ritz values are wanted


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of Ritz values in order of preference for ``which`` (wanted first)."""
    if which == "largest":
        return torch.argsort(theta, descending=True)
    if which == "smallest":
        return torch.argsort(theta)
    if which == "magnitude":
        return torch.argsort(theta.abs(), descending=True)
    # both: by distance from the middle of the spectrum (only used as a generic fallback)
    mid = 0.5 * (theta.max() + theta.min())
    return torch.argsort((theta - mid).abs(), descending=True)


def _wanted(theta: Tensor, which: str, k: int) -> Tensor:
    """The ``k`` wanted indices in output order."""
    if which != "both":
        return _order(theta, which)[:k]
    k_top = (k + 1) // 2
    desc = torch.argsort(theta, descending=True)
    if k == k_top:
        return desc[:k_top]
    return torch.cat([desc[:k_top], desc[desc.numel() - (k - k_top):]])


def _keep_order(theta: Tensor, which: str, k: int, n_keep: int) -> Tensor:
    """``n_keep >= k`` indices to keep at a restart: the wanted ones and their neighbours."""
    if which != "both":
        return _order(theta, which)[:n_keep]
    n = theta.numel()
    desc = torch.argsort(theta, descending=True)
    k_top = (k + 1) // 2
    extra = n_keep - k
    top = k_top + (extra + 1) // 2
    bot = min(n_keep - top, n - top)
    return torch.cat([desc[:top], desc[n - bot:]]) if bot > 0 else desc[:top]


# ------------------------------------------------------------------------------------------------
# arguments


def _default_block_size(k: int, which: str) -> int:
    """1 for up to 16 wanted pairs at one end (``ceil(k/2)`` for ``"both"``), 2 up to 128,
    else 8.

    Single-vector Lanczos needs the fewest products for small ``k``, and single products run
    on the cached first-order graph / fused state; for larger ``k`` the passes over the basis
    (memory bound: each block's orthogonalization reads the whole basis twice) grow with the
    basis, and a block shares each pass among its directions for a few more products.
    Measured in bench/bench_spectrum.py, see bench/README.md (figures in docs/algorithms.md).
    """
    if which == "both":
        k = (k + 1) // 2
    if k <= 16:
        return 1
    return 2 if k <= 128 else 8


def _eigsh_settings(op: CurvatureOperator, k: int, which: str, tol: Optional[float],
                    block_size: Optional[int], max_basis: Optional[int],
                    basis_dtype: Optional[torch.dtype], max_matvecs: Optional[int]
                    ) -> Tuple[float, int, int, torch.dtype, int]:
    """Checked arguments of :func:`eigsh` with their defaults filled in:
    ``(tol, block_size, max_basis, basis_dtype, max_matvecs)``."""
    d = _dimension(op)
    if which not in WHICH:
        raise ValueError(f"eigsh: which must be one of {WHICH}, got {which!r}")
    if k > d:
        raise ValueError(f"eigsh: k = {k} is larger than the dimension d = {d}")
    if tol is None:
        tol = 1e-8 if op.dtype == torch.float64 else 1e-4
    if not tol > 0:
        raise ValueError(f"eigsh: tol must be positive, got {tol}")
    b = int(block_size) if block_size is not None else _default_block_size(k, which)
    if b < 1:
        raise ValueError(f"eigsh: block_size must be >= 1, got {b}")
    if max_basis is None:
        rows = max(2 * k + 2 * b, k + 8 * b, 24)
        max_basis = int(math.ceil(rows / b) * b)
    max_basis = int(max_basis)
    if max_basis < k + 2 * b:
        raise ValueError(f"eigsh: max_basis = {max_basis} must be at least k + 2 * block_size = "
                         f"{k + 2 * b}")
    basis_dtype = basis_dtype or op.dtype
    if basis_dtype not in BASIS_DTYPES:
        raise ValueError(f"eigsh: basis_dtype must be float64/32/16 or bfloat16, got {basis_dtype}")
    if max_matvecs is None:
        max_matvecs = max(200 * k, 2000)
    return tol, b, max_basis, basis_dtype, max_matvecs


# ------------------------------------------------------------------------------------------------
# block Lanczos


@dataclass(eq=False)
class _LanczosRun:
    """The state of one block Lanczos run of :func:`eigsh` (docs/algorithms.md).

    The block multiplied next is ``Q[block_start:n_basis]``; after its product,
    ``new_block`` holds the orthonormalized product and ``coupling`` (``R``) its coefficients,
    until the block is appended to the basis (or placed after the kept Ritz vectors by a
    restart)."""

    op: CurvatureOperator
    k: int
    which: str
    tol: float
    max_basis: int
    max_matvecs: int
    acc_dtype: torch.dtype       # accumulation of the orthogonalization and the rotations
    short_recurrence: bool       # the basis is precise enough for the one-round Lanczos mode
    Q: Tensor                    # (max_basis, d) basis rows in basis_dtype
    T: Tensor                    # projected matrix Q^T A Q, float64 on the CPU, bordered by R
    n_matvecs_start: int         # op.n_matvecs before the run
    progress_bar: Any = None
    block_start: int = 0
    n_basis: int = 0
    prev_block_start: int = 0    # first row of the previous block; 0: no recurrence to exploit
    last_block: Tuple[int, int] = (0, 0)   # rows of the block multiplied last
    new_block: Optional[Tensor] = None
    coupling: Optional[Tensor] = None
    theta: Optional[Tensor] = None         # Ritz values of the last Rayleigh-Ritz
    Y: Optional[Tensor] = None             # and their eigenvectors in T
    ritz_residuals: Optional[Tensor] = None
    spectral_norm_estimate: float = 0.0    # largest |theta| of any Rayleigh-Ritz so far
    n_keep: Optional[int] = None           # Ritz vectors kept at a restart (set at the first)
    n_restarts: int = 0
    n_iterations: int = 0
    prev_wanted: Optional[Tensor] = None   # wanted Ritz values of the previous Rayleigh-Ritz
    pending_fresh: bool = False  # fresh directions (after an invariant subspace) not yet multiplied
    fresh_seen: bool = False     # the block just multiplied held fresh directions

    @property
    def n_matvecs(self) -> int:
        return self.op.n_matvecs - self.n_matvecs_start


def _random_rows(n: int, d: int, gen: torch.Generator, device: torch.device) -> Tensor:
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(device)


def _start_rows(op: CurvatureOperator, v0: Any) -> Optional[Tensor]:
    """``v0`` checked and as ``(j, d)`` float64 rows on the operator's device (``None`` stays
    ``None``). ``v0`` is ``(d,)``, ``(d, j)`` columns or ``(j, d)`` rows, with ``d`` this rank's
    local rows for sharded vectors; it must be real, finite and hold values (not ``meta``)."""
    if v0 is None:
        return None
    try:
        V0 = torch.as_tensor(v0)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"eigsh: v0 must be a tensor or array of start directions, got "
                        f"{type(v0).__name__} ({exc})") from None
    if V0.is_complex() or V0.dtype == torch.bool:
        raise TypeError(f"eigsh: v0 must be real (floating point or integer), got dtype "
                        f"{V0.dtype}")
    if V0.device.type == "meta":
        raise ValueError(f"eigsh: v0 is on the meta device (no values); pass start directions "
                         f"with values (they are moved to the operator's device, {op.device})")
    d = op.d
    if not (V0.dim() == 1 and V0.shape[0] == d) and not (
            V0.dim() == 2 and d in V0.shape and V0.numel() > 0):
        local = " (this rank's local rows of the sharded vectors)" if vector_shards(op) else ""
        raise ValueError(f"eigsh: v0 must be (d,) or (d, j) start directions with d = {d}"
                         f"{local}, the operator's dimension, got shape {tuple(V0.shape)}")
    V0 = V0.to(device=op.device, dtype=torch.float64)
    n_bad = int((~torch.isfinite(V0)).sum())
    if n_bad:
        raise ValueError(f"eigsh: v0 holds {n_bad} NaN/Inf value(s) of {V0.numel()}; the start "
                         f"directions must be finite")
    return V0.reshape(d, -1).T if V0.dim() == 1 or V0.shape[0] == d else V0


def _start_run(op: CurvatureOperator, k: int, which: str, tol: float, b: int, max_basis: int,
               basis_dtype: torch.dtype, max_matvecs: int, seed: int, v0: Optional[Tensor],
               progress: bool) -> _LanczosRun:
    """Allocate the basis and ``T`` and orthonormalize the start block (``v0``: the rows of
    :func:`_start_rows`, then random directions) into ``Q[:b]``."""
    d, dev = op.d, op.device
    n_matvecs_start = op.n_matvecs
    gen = torch.Generator().manual_seed(int(seed))
    # the orthogonalization accumulates in float64 unless both the products and the basis are
    # float32 or narrower: their own rounding (~1e-7 relative) then dominates, and float32
    # passes over the (memory-bound) basis are cheaper (docs/algorithms.md)
    acc_dtype = (torch.float32 if op.dtype != torch.float64 and basis_dtype != torch.float64
                 else torch.float64)
    # one round over the basis after the recurrence rows needs a basis orthonormal to the
    # block's precision: a narrower (half) basis leaves components of its own rounding times
    # the large recurrence coefficients, the op would then run a second round (four passes),
    # so CGS2 (three) is used instead
    short_recurrence = torch.finfo(basis_dtype).eps <= torch.finfo(acc_dtype).eps
    Q = torch.empty(max_basis, d, dtype=basis_dtype, device=dev)
    T = torch.zeros(max_basis + b, max_basis + b, dtype=torch.float64)
    shards = vector_shards(op)
    X0 = _random_rows(b, d, gen, dev) if shards is None else shards.draw(
        b, lambda n, m: torch.randn(n, m, generator=gen, dtype=torch.float64)).to(dev)
    if v0 is not None:  # rows checked by _start_rows
        j = min(v0.shape[0], b)
        X0[:j] = v0[:j]
    q, _, _ = _orthonormalize(op, Q, X0, 0)
    Q[:b].copy_(q)
    progress_bar = None
    if progress:
        from tqdm.auto import tqdm
        progress_bar = tqdm(total=max_matvecs, desc=f"eigsh(k={k}, {which})", unit="product",
                            disable=not is_main_process())
    return _LanczosRun(op=op, k=k, which=which, tol=tol, max_basis=max_basis,
                       max_matvecs=max_matvecs, acc_dtype=acc_dtype,
                       short_recurrence=short_recurrence, Q=Q, T=T,
                       n_matvecs_start=n_matvecs_start, progress_bar=progress_bar, n_basis=b)


def _extend_basis(run: _LanczosRun) -> int:
    """One Lanczos step: the product of the block ``Q[block_start:n_basis]``, its
    orthogonalization against the basis, its coefficients into ``T``. Returns the block's
    size."""
    Q, T = run.Q, run.T
    start, end = run.block_start, run.n_basis
    size = end - start
    W = _products(run.op, Q[start:end], "eigsh").to(run.acc_dtype)
    run.n_iterations += 1
    if run.progress_bar is not None:
        run.progress_bar.update(size)
    if run.prev_block_start > 0 and run.short_recurrence:
        # Lanczos: W = A Q[start:end] has large components only along the last two blocks
        # Q[prev_block_start:end] (the block recurrence); the op removes those first (cheap:
        # 2b rows), then the rest is small and one round over the whole basis suffices (two
        # passes instead of three; a second round runs when a row kept less than 1/sqrt(2) of
        # its norm)
        q, C, R = _orthonormalize(run.op, Q, W, end, rounds=1,
                                  local_rows=end - run.prev_block_start)
    else:
        q, C, R = _orthonormalize(run.op, Q, W, end)
    del W
    C = C.cpu().double()
    R = R.cpu().double()
    T[:start, start:end] = C[:start]
    T[start:end, :start] = C[:start].T
    T[start:end, start:end] = 0.5 * (C[start:end] + C[start:end].T)
    T[end:end + size, start:end] = R
    T[start:end, end:end + size] = R.T
    run.last_block = (start, end)
    run.prev_block_start, run.block_start = start, end
    run.new_block, run.coupling = q, R
    # a lost direction, or one (numerically) decoupled from the basis, makes the basis an
    # invariant subspace: the next block then holds fresh directions
    run.fresh_seen, run.pending_fresh = run.pending_fresh, bool(
        (torch.diagonal(R).abs() <= 1e-3 * run.tol * run.spectral_norm_estimate).any()
        or (torch.diagonal(R) == 0).any())
    return size


def _append_block(run: _LanczosRun, size: int) -> None:
    """Store the orthonormalized product as the next block of the basis."""
    run.Q[run.n_basis:run.n_basis + size].copy_(run.new_block)
    run.n_basis += size


def _rayleigh_ritz(run: _LanczosRun) -> None:
    """Ritz values and vectors of ``T`` in float64 and their residuals ``|R Y_{last block}|``
    (no product needed)."""
    theta, Y = torch.linalg.eigh(run.T[:run.n_basis, :run.n_basis])
    run.ritz_residuals = torch.linalg.vector_norm(
        run.coupling @ Y[run.last_block[0]:run.last_block[1]], dim=0)
    run.spectral_norm_estimate = max(run.spectral_norm_estimate, float(theta.abs().max()))
    run.theta, run.Y = theta, Y


def _converged(run: _LanczosRun, size: int) -> Tuple[bool, Tensor]:
    """Whether the run can stop (the same answer on every rank of a process group), and which
    wanted pairs have converged."""
    k = run.k
    scale = run.tol * max(run.spectral_norm_estimate, 1e-300)
    sel = _wanted(run.theta, run.which, k)
    ok = run.ritz_residuals[sel] <= scale
    wanted = run.theta[sel]
    # after an invariant subspace, stop only once the fresh directions left the wanted
    # values unchanged (a further copy of a wanted multiple eigenvalue would move them)
    if run.fresh_seen:
        settled = run.prev_wanted is not None and bool(
            ((wanted - run.prev_wanted).abs() <= scale).all())
    else:
        settled = not run.pending_fresh
    run.prev_wanted = wanted
    if run.progress_bar is not None:
        run.progress_bar.set_postfix(converged=f"{int(ok.sum())}/{k}")
    # an invariant subspace can make k Ritz pairs exact while missing eigenvalues outside
    # it: only declare convergence once the wanted pairs are chosen among > k values
    stop = bool(ok.all()) and run.n_basis >= min(k + size, _dimension(run.op)) and settled
    group = getattr(run.op, "process_group", None)
    if group is not None:  # data parallel: every rank stops at the same product
        stop = agree_all(group, stop, run.op.device)
    return stop, ok


def _thick_restart(run: _LanczosRun, size: int) -> None:
    """Keep the wanted Ritz vectors and their neighbours (``Q <- Y_keep^T Q``) followed by the
    new block; ``T`` becomes ``diag(theta_keep)`` bordered by the coupling ``R Y_keep``."""
    if run.n_keep is None:
        room = run.max_basis - run.k - 2 * size
        run.n_keep = min(run.k + max(room // 2, 0), run.max_basis - 2 * size)
    keep = _keep_order(run.theta, run.which, run.k, run.n_keep)
    n_kept = keep.numel()
    _rotate_rows_(run.Q, run.Y[:, keep], run.n_basis, run.acc_dtype)
    run.Q[n_kept:n_kept + size].copy_(run.new_block)
    coupling = run.coupling @ run.Y[run.last_block[0]:run.last_block[1], keep]
    T = run.T
    T.zero_()
    T[:n_kept, :n_kept] = torch.diag(run.theta[keep])
    T[n_kept:n_kept + size, :n_kept] = coupling
    T[:n_kept, n_kept:n_kept + size] = coupling.T
    # the new block couples to every kept Ritz vector: no short recurrence
    run.prev_block_start, run.block_start, run.n_basis = 0, n_kept, n_kept + size
    run.n_restarts += 1


def _iterate(run: _LanczosRun, warn: bool) -> bool:
    """Extend the basis until the wanted pairs converge or the budget runs out, restarting
    when it is full. Returns True when a dense solve should take over: an operator with
    ``d <= DENSE_MAX_D`` whose next block would take Lanczos past ``d`` products, when ``d``
    more products fit in the budget."""
    d, k = _dimension(run.op), run.k
    while True:
        size = _extend_basis(run)
        used = run.n_matvecs
        restart_due = run.n_basis + size > run.max_basis
        budget_out = used + size > run.max_matvecs
        dense_due = (used + size > d and d <= DENSE_MAX_D and used + d <= run.max_matvecs)
        if run.n_basis < min(k + size, d) and not (restart_due or budget_out or dense_due):
            # the basis cannot hold the answer yet: no Rayleigh-Ritz needed
            _append_block(run, size)
            continue
        _rayleigh_ritz(run)
        stop, ok = _converged(run, size)
        if stop:
            return False
        if dense_due:
            log.debug("eigsh: %d products without convergence on d = %d: dense solve", used, d)
            return True
        if budget_out:
            (log.warning if warn else log.debug)(
                "eigsh: %d of %d eigenpairs converged after %d products (max_matvecs)",
                int(ok.sum()), k, used)
            return False
        if restart_due:
            _thick_restart(run, size)
        else:
            _append_block(run, size)


def eigsh(op: Any, k: int = 6, which: str = "largest", *, tol: Optional[float] = None,
          block_size: Optional[int] = None, max_basis: Optional[int] = None,
          basis_dtype: Optional[torch.dtype] = None, seed: int = 0, v0: Optional[Tensor] = None,
          max_matvecs: Optional[int] = None, return_eigenvectors: bool = True,
          verify: bool = False, progress: bool = False, warn: bool = True) -> EigshResult:
    r"""``k`` eigenpairs of a symmetric operator by thick-restart block Lanczos (the algorithm,
    its switches and defaults: docs/algorithms.md).

    Parameters
    ----------
    op : CurvatureOperator, Tensor or operator-like
        The symmetric ``(d, d)`` operator (:class:`~landscape_ext.HessianOperator`, a dense
        tensor, anything :func:`~landscape_ext.as_operator` accepts).
    k : int
        Number of eigenpairs, ``1 <= k <= d``.
    which : {"largest", "smallest", "both", "magnitude"}
        Algebraically largest, smallest, ``ceil(k/2)`` largest and ``floor(k/2)`` smallest, or
        largest ``|lambda|``.
    tol : float, optional
        Converged when ``|A x - theta x| <= tol * max|theta|`` (the largest ``|theta|`` seen so
        far). Default ``1e-8`` for float64 operators, ``1e-4`` otherwise. Eigenvalue errors are
        about ``(tol |A|)^2 / gap``.
    block_size : int, optional
        Directions per batched product (default 1 for ``k <= 16``, 2 up to 128, else 8). Use at
        least the multiplicity of a wanted eigenvalue cluster: a smaller block can converge
        before it has found every member.
    max_basis : int, optional
        Basis rows kept (memory ``max_basis * d`` elements of ``basis_dtype``). Default
        ``max(2k + 2b, k + 8b, 24)`` rounded up to a multiple of ``b``.
    basis_dtype : torch.dtype, optional
        Storage of the basis (float64/float32/float16/bfloat16; default: the operator's dtype).
        The stored basis is orthonormal only to its own precision, so eigenvalue errors are at
        least about ``eps(basis_dtype) * |A|`` (float16/bfloat16: ~1e-3 / 1e-2 relative).
    seed : int
        Seed of the random start block.
    v0 : Tensor, optional
        ``(d,)`` or ``(d, j)`` start directions (warm start); the rest of the block is random.
        Real and finite (checked: a wrong shape, a NaN/Inf, a complex or bool dtype is an error
        that names them); on another device it is moved to the operator's.
        For an operator of an FSDP2 model (sharded vectors): local rows, ``(d_local,)``; its
        eigenvectors come back as local rows too, the eigenvalues identical on every rank.
    max_matvecs : int, optional
        Budget of products (default ``max(200 * k, 2000)``); on exhaustion the unconverged pairs
        are returned with ``converged=False``. Operators with ``d <= max_basis + block_size``
        (and ``d <= max_matvecs``) are solved densely with ``d`` products; those with ``d <=
        4096`` switch to that dense solve after about ``d`` Lanczos products if ``d`` more fit.
    return_eigenvectors : bool
    verify : bool
        Recompute the final residuals with one more batched product of the ``k`` Ritz vectors
        (counted in ``n_matvecs``) instead of the Lanczos residual formula.
    progress : bool
        Show a tqdm progress bar.
    warn : bool
        Log a WARNING when the budget runs out before convergence (default); ``False`` logs it
        at DEBUG level (for callers that read ``converged`` themselves, e.g. training loops).

    Returns
    -------
    EigshResult
    """
    t0 = time.perf_counter()
    op = as_operator(op)
    k = count_argument(k, "k", "eigsh")  # np.int64 and other integral types as int
    tol, b, max_basis, basis_dtype, max_matvecs = _eigsh_settings(
        op, k, which, tol, block_size, max_basis, basis_dtype, max_matvecs)
    v0 = _start_rows(op, v0)
    common = dict(which=which, k=k, tol=float(tol), block_size=b, seed=int(seed))
    # every rank of a distributed operator must run the same solver (the same collectives)
    agree_call(op, "eigsh", {"which": WHICH}, k=k, which=WHICH.index(which), tol=tol,
               block_size=b, max_basis=max_basis, seed=seed, max_matvecs=max_matvecs,
               v0=v0 is not None, verify=bool(verify))
    if _dimension(op) <= max_basis + b and _dimension(op) <= max_matvecs:  # forming it densely costs d products
        return _dense_eigsh(op, k, which, tol, return_eigenvectors, op.n_matvecs, t0,
                            getattr(op, "mode_used", None), common)
    run = _start_run(op, k, which, tol, b, max_basis, basis_dtype, max_matvecs, seed, v0,
                     progress)
    try:
        dense_due = _iterate(run, warn)
    finally:
        if run.progress_bar is not None:
            run.progress_bar.close()
    if dense_due:
        # a tiny operator that Lanczos has not solved in d products: form it densely
        return _dense_eigsh(op, k, which, tol, return_eigenvectors, run.n_matvecs_start, t0,
                            getattr(op, "mode_used", None), common, run.n_restarts)
    return _lanczos_result(run, return_eigenvectors, verify, basis_dtype, t0, common)


def _lanczos_result(run: _LanczosRun, return_eigenvectors: bool, verify: bool,
                    basis_dtype: torch.dtype, t0: float, common: dict) -> EigshResult:
    """The wanted Ritz pairs of the last Rayleigh-Ritz (eigenvectors ``Y^T Q``, residuals
    recomputed by one product when ``verify``)."""
    op, k = run.op, run.k
    sel = _wanted(run.theta, run.which, k)
    vals = run.theta[sel].clone()
    res = run.ritz_residuals[sel].clone()
    vec_dtype = torch.float64 if op.dtype == torch.float64 else torch.float32
    X = None
    if return_eigenvectors or verify:
        X = _combine_rows(run.Q, run.Y[:, sel], run.last_block[1], vec_dtype, run.acc_dtype)
    verified = False
    if verify:
        HX = _products(op, X, "eigsh").to(torch.float64)
        res = _row_norms(op, HX - vals.to(op.device)[:, None] * X.to(torch.float64)).cpu()
        del HX
        verified = True
    snorm = run.spectral_norm_estimate
    converged = res <= run.tol * max(snorm, 1e-300)
    if run.progress_bar is None:
        log.info("eigsh: %d/%d converged, %d products, %d restarts", int(converged.sum()), k,
                 run.n_matvecs, run.n_restarts)
    return EigshResult(
        eigenvalues=vals, eigenvectors=X.T if (return_eigenvectors and X is not None) else None,
        residuals=res, converged=converged, n_matvecs=run.n_matvecs, n_restarts=run.n_restarts,
        n_iterations=run.n_iterations, max_basis=run.max_basis, basis_dtype=str(basis_dtype),
        spectral_norm_estimate=snorm, residuals_verified=verified,
        mode_used=getattr(op, "mode_used", None), time_s=time.perf_counter() - t0, **common)


def _dense_eigsh(op: CurvatureOperator, k: int, which: str, tol: float,
                 return_eigenvectors: bool, n_matvecs_start: int, t0: float,
                 mode_used: Optional[str], common: dict, n_restarts: int = 0) -> EigshResult:
    """Form the operator densely (``d`` products, ``max(b, 64)`` at a time) and solve by
    ``eigh``."""
    d = _dimension(op)
    shards = vector_shards(op)
    eye = torch.eye(d, dtype=torch.float64)
    if shards is not None:  # rows: the local rows of e_i, products: A[:, i] in local rows
        eye = shards.take(eye)
    A = _products_in_batches(op, eye, max(common["block_size"], 64), "eigsh")
    if shards is not None:
        A = shards.gather(A)
    A = 0.5 * (A + A.T)
    theta, Y = torch.linalg.eigh(A)
    sel = _wanted(theta, which, k)
    vals = theta[sel]
    vecs = Y[:, sel]
    res = torch.linalg.vector_norm(A @ vecs - vecs * vals, dim=0)
    if shards is not None:
        vecs = shards.take(vecs.T).T
    snorm = float(theta.abs().max())
    out_dtype = op.dtype if op.dtype in (torch.float32, torch.float64) else torch.float32
    return EigshResult(
        eigenvalues=vals, eigenvectors=vecs.to(device=op.device, dtype=out_dtype)
        if return_eigenvectors else None, residuals=res,
        converged=res <= tol * max(snorm, 1e-300), n_matvecs=op.n_matvecs - n_matvecs_start,
        n_restarts=n_restarts, max_basis=d, basis_dtype=str(torch.float64),
        spectral_norm_estimate=snorm, residuals_verified=True,
        mode_used=getattr(op, "mode_used", None) or mode_used, method="dense",
        time_s=time.perf_counter() - t0, **common)


def _col_chunk(d: int, rows: int) -> int:
    # ~32 MB of float64 temporaries per chunk
    return max(1024, min(d, (4 << 20) // max(rows, 1)))


def _rotate_rows_(Q: Tensor, Y: Tensor, m: int, acc: torch.dtype = torch.float64) -> None:
    """In place ``Q[:n_keep] = Y^T Q[:m]`` (``Y (m, n_keep)``), column chunk by column chunk,
    summed in ``acc``."""
    d = Q.shape[1]
    Yt = Y.T.to(device=Q.device, dtype=acc).contiguous()
    c = _col_chunk(d, m)
    n_keep = Y.shape[1]
    for s in range(0, d, c):
        e = min(s + c, d)
        blk = Yt @ Q[:m, s:e].to(acc)
        Q[:n_keep, s:e].copy_(blk)


def _combine_rows(Q: Tensor, Y: Tensor, m: int, dtype: torch.dtype,
                  acc: torch.dtype = torch.float64) -> Tensor:
    """``Y^T Q[:m]`` as ``(n, d)`` in ``dtype`` (``Y (m, n)``), summed in ``acc``."""
    d = Q.shape[1]
    Yt = Y.T.to(device=Q.device, dtype=acc).contiguous()
    out = torch.empty(Y.shape[1], d, dtype=dtype, device=Q.device)
    c = _col_chunk(d, m)
    for s in range(0, d, c):
        e = min(s + c, d)
        out[:, s:e] = Yt @ Q[:m, s:e].to(acc)
    return out


def spectral_norm(op: Any, tol: float = 1e-3, seed: int = 0, v0: Optional[Tensor] = None,
                  max_matvecs: Optional[int] = None, block_size: int = 1) -> SpectralNormResult:
    r"""Spectral norm ``max |lambda|`` of a symmetric operator by Lanczos (``which="magnitude"``,
    ``k = 1``).

    Parameters
    ----------
    op : operator-like
    tol : float
        Relative residual tolerance (``|A x - lambda x| <= tol |lambda|``); the value's relative
        error is about ``tol^2 |A| / gap``.
    seed : int
    v0 : Tensor, optional
        ``(d,)`` warm start (e.g. the previous top eigenvector in a training loop).
    max_matvecs : int, optional
    block_size : int

    Returns
    -------
    SpectralNormResult
    """
    r = eigsh(op, k=1, which="magnitude", tol=tol, seed=seed, v0=v0, max_matvecs=max_matvecs,
              block_size=block_size)
    lam = float(r.eigenvalues[0])
    return SpectralNormResult(
        value=abs(lam), eigenvalue=lam,
        vector=r.eigenvectors[:, 0] if r.eigenvectors is not None else None,
        residual=float(r.residuals[0]), converged=bool(r.converged[0]), n_matvecs=r.n_matvecs,
        tol=tol, seed=seed, mode_used=r.mode_used, time_s=r.time_s)
