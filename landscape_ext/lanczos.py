r"""Eigenpairs of symmetric operators: thick-restart block Lanczos (:func:`eigsh`) and the
spectral norm (:func:`spectral_norm`).

Algorithm (:func:`eigsh`)
-------------------------
Block Lanczos with full reorthogonalization and thick restart, after Wu & Simon (TRLan) and
Zhou & Saad (block thick restart):

* The basis is a preallocated ``(max_basis, d)`` buffer of rows in ``basis_dtype``; each new block
  ``W = A Q_j`` (one batched product of ``b`` directions) is orthogonalized against the whole
  basis and within itself by :func:`landscape_ext.block_orthonormalize` (CGS + CholeskyQR2).
  Its large components lie along the last two blocks only (the block three-term recurrence):
  those are subtracted first, then one Gram-Schmidt round over the whole basis removes the
  rounding-level rest, with a second round only for a row that lost more than ``1 - 1/sqrt(2)``
  of its norm (``rounds=1, local_rows=2b``: two passes over the basis instead of three). After
  a restart the residual block couples to every kept Ritz vector, and full CGS2 runs; so it
  does for a basis stored in a narrower dtype than the accumulation (half storage). The
  coefficients fill the projected matrix ``T = Q^T A Q`` column by column, so ``T`` is the
  exact Rayleigh quotient of the stored basis, not an assumed tridiagonal.
* Rayleigh-Ritz in float64 on the CPU: ``T = Y diag(theta) Y^T``. The Ritz residual of pair
  ``i`` is ``|A x_i - theta_i x_i| = |R Y_{last block, i}|`` (``R`` couples the next block), no
  extra product needed. A pair is converged when its residual is at most
  ``tol * max_j |theta_j|`` (the spectral-norm estimate).
* When the basis is full, the wanted Ritz vectors plus extra ones next to them are kept
  (``Q <- Y_keep^T Q``, done in place by column chunks) together with the unmultiplied residual
  block; ``T`` becomes ``diag(theta_keep)`` bordered by the coupling ``R Y_keep``. Memory stays
  ``max_basis * d`` elements.
* Rank deficiency (an invariant subspace, a multiple eigenvalue) is deflated by the krylov op:
  a lost direction (``r[k, k] == 0``) is replaced by a fresh direction orthogonal to the basis.
* For ``d <= max_basis + block_size`` the operator is formed densely (``d`` products) and solved
  by ``torch.linalg.eigh``: cheaper and exact. A Lanczos run that has used ``d`` products
  without converging on an operator with ``d <= 4096`` switches to the dense solve too (at most
  ``2 d`` products in all): tiny operators with large clusters at a wanted end (the null space
  of a GGN for ``which="smallest"`` / ``"both"``) converge slowly in a small basis.
* The projected eigenproblem is solved only once the basis could hold the answer
  (``m >= k + b``), at restarts and at the end; before that an iteration is one product and
  one orthogonalization.
* After an invariant subspace (a lost direction, replaced by a fresh one), the run does not stop
  until multiplying the fresh directions leaves the wanted Ritz values unchanged: an invariant
  subspace holds one copy of each eigenvalue per start direction, so further copies of a
  wanted multiple eigenvalue (zeros of a low-rank operator) only come from fresh directions.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from .distributed import agree_all, is_main_process
from .ops import block_orthonormalize
from .operators import CurvatureOperator, as_operator
from .results import Result

__all__ = ["EigshResult", "SpectralNormResult", "eigsh", "spectral_norm"]

log = logging.getLogger(__name__)

WHICH = ("largest", "smallest", "both", "magnitude")

#: Largest dimension for which a non-converging Lanczos run falls back to a dense solve.
DENSE_MAX_D = 4096


@dataclass(repr=False)
class EigshResult(Result):
    """Result of :func:`eigsh`.

    Attributes
    ----------
    eigenvalues : Tensor
        ``(k,)`` float64; ``largest``/``both``: descending, ``smallest``: ascending,
        ``magnitude``: by ``|lambda|`` descending.
    eigenvectors : Tensor or None
        ``(d, k)`` unit columns (dtype of the operator, float64 for float64 operators); not in
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


def _order(theta: Tensor, which: str, k: int) -> Tensor:
    """Indices of Ritz values in order of preference for ``which`` (wanted first)."""
    n = theta.numel()
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
        return _order(theta, which, k)[:k]
    k_top = (k + 1) // 2
    desc = torch.argsort(theta, descending=True)
    idx = torch.cat([desc[:k_top], desc[desc.numel() - (k - k_top):]]) if k > k_top else desc[:k_top]
    return idx


def _keep_order(theta: Tensor, which: str, k: int, kk: int) -> Tensor:
    """``kk >= k`` indices to keep at a restart: the wanted ones and their neighbours."""
    if which != "both":
        return _order(theta, which, k)[:kk]
    n = theta.numel()
    desc = torch.argsort(theta, descending=True)
    k_top = (k + 1) // 2
    extra = kk - k
    top = k_top + (extra + 1) // 2
    bot = min(kk - top, n - top)
    return torch.cat([desc[:top], desc[n - bot:]]) if bot > 0 else desc[:top]


def _default_block_size(k: int, which: str) -> int:
    """Single-vector Lanczos needs the fewest products for small k (digits MLP, top-10: 30
    products at b=1, 34 at b=2, 44 at b=4 for the same accuracy) and single products run on
    the cached first-order graph / fused state; for larger k the passes over the basis (memory
    bound: each block's orthogonalization reads the whole basis twice) cost about a third of a
    product per direction at b=1, and small blocks halve that for a few more products. Digits
    MLP, top-100 at tol 1e-4 (fused products, float32, 2-core CPU, the four block sizes
    interleaved): b=1 188 products / 12.0 s, b=2 202 / 11.8 s, b=3 210 / 13.8 s, b=4 220 /
    12.4 s (b=8: 256 products)."""
    if which == "both":
        k = (k + 1) // 2
    if k <= 16:
        return 1
    return 2 if k <= 128 else 8


def _random_rows(n: int, d: int, gen: torch.Generator, device: torch.device) -> Tensor:
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(device)


def eigsh(op: Any, k: int = 6, which: str = "largest", *, tol: Optional[float] = None,
          block_size: Optional[int] = None, max_basis: Optional[int] = None,
          basis_dtype: Optional[torch.dtype] = None, seed: int = 0, v0: Optional[Tensor] = None,
          max_matvecs: Optional[int] = None, return_eigenvectors: bool = True,
          verify: bool = False, progress: bool = False, warn: bool = True) -> EigshResult:
    r"""``k`` eigenpairs of a symmetric operator by thick-restart block Lanczos.

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
        Converged when ``|A x - theta x| <= tol * max|theta|``. Default ``1e-8`` for float64
        operators, ``1e-4`` otherwise. Eigenvalue errors are about ``(tol |A|)^2 / gap``.
    block_size : int, optional
        Directions per batched product (default 1 for ``k <= 16``, 2 up to 128, else 8; use at
        least the multiplicity of a wanted eigenvalue cluster — Lanczos with a block smaller
        than a cluster can converge before it has found every member).
    max_basis : int, optional
        Basis rows kept (memory ``max_basis * d`` elements of ``basis_dtype``). Default
        ``max(2k + 2b, k + 8b, 24)`` rounded to a multiple of ``b``.
    basis_dtype : torch.dtype, optional
        Storage of the basis (float64/float32/float16/bfloat16); default: the operator's dtype.
        The projected eigenproblem is float64 whatever this is; the orthogonalization
        accumulates in float64 unless both the operator and the basis are float32 or narrower
        (then in float32: the products carry float32 rounding already). The stored basis is
        orthonormal only to its own precision, so eigenvalue errors are at least about
        ``eps(basis_dtype) * |A|`` (float16/bfloat16: ~1e-3 / 1e-2 relative).
    seed : int
        Seed of the random start block.
    v0 : Tensor, optional
        ``(d,)`` or ``(d, j)`` start directions (warm start); the rest of the block is random.
    max_matvecs : int, optional
        Budget of products (default ``max(200 * k, 2000)``); on exhaustion the unconverged pairs
        are returned with ``converged=False`` and a warning is logged (``warn=False``: a debug
        message). Operators with ``d <= 4096`` switch to a dense solve after ``d`` products when
        the budget allows.
    return_eigenvectors : bool
    verify : bool
        Recompute the final residuals with one more batched product of the ``k`` Ritz vectors
        (counted in ``n_matvecs``) instead of the Lanczos residual formula. The two agree to
        rounding with full reorthogonalization (tests hold this).
    progress : bool
        Show a tqdm progress bar.
    warn : bool
        Log a WARNING when the budget runs out before convergence (default). ``False`` logs it
        at DEBUG level: for callers that run many short, budgeted estimates (training loops)
        and read ``converged`` themselves.

    Returns
    -------
    EigshResult
    """
    t0 = time.perf_counter()
    op = as_operator(op)
    d = op.d
    if which not in WHICH:
        raise ValueError(f"eigsh: which must be one of {WHICH}, got {which!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"eigsh: k must be a positive integer, got {k!r}")
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
        mb = max(2 * k + 2 * b, k + 8 * b, 24)
        max_basis = int(math.ceil(mb / b) * b)
    max_basis = int(max_basis)
    if max_basis < k + 2 * b:
        raise ValueError(f"eigsh: max_basis = {max_basis} must be at least k + 2 * block_size = "
                         f"{k + 2 * b}")
    basis_dtype = basis_dtype or op.dtype
    if basis_dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"eigsh: basis_dtype must be float64/32/16 or bfloat16, got {basis_dtype}")
    if max_matvecs is None:
        max_matvecs = max(200 * k, 2000)
    n0 = op.n_matvecs
    gen = torch.Generator().manual_seed(int(seed))
    mode_of = lambda: getattr(op, "mode_used", None)  # noqa: E731

    common = dict(which=which, k=k, tol=float(tol), block_size=b, seed=int(seed))

    # ---- tiny problems: dense ------------------------------------------------------------------
    if d <= max_basis + b and d <= max_matvecs:  # forming it densely costs d products
        return _dense_eigsh(op, k, which, tol, return_eigenvectors, n0, t0, mode_of(), common)

    # ---- block Lanczos --------------------------------------------------------------------------
    dev = op.device
    group = getattr(op, "process_group", None)
    # the orthogonalization accumulates in float64 unless both the products and the basis are
    # float32 or narrower: their own rounding (~1e-7 relative) then dominates, and float32
    # passes over the (memory-bound) basis cost about 0.6x of float64 ones
    acc_dtype = (torch.float32 if op.dtype != torch.float64 and basis_dtype != torch.float64
                 else torch.float64)
    # one round over the basis after the recurrence rows needs a basis orthonormal to the
    # block's precision: a narrower (half) basis leaves components of its own rounding times
    # the large recurrence coefficients, the op would then run a second round (four passes),
    # so CGS2 (three) is used instead
    short_recurrence = torch.finfo(basis_dtype).eps <= torch.finfo(acc_dtype).eps
    Q = torch.empty(max_basis, d, dtype=basis_dtype, device=dev)
    T = torch.zeros(max_basis + b, max_basis + b, dtype=torch.float64)
    X0 = _random_rows(b, d, gen, dev)
    if v0 is not None:
        V0 = torch.as_tensor(v0).to(device=dev, dtype=torch.float64)
        V0 = V0.reshape(d, -1).T if V0.dim() == 1 or V0.shape[0] == d else V0
        j = min(V0.shape[0], b)
        X0[:j] = V0[:j]
    q, _, _ = block_orthonormalize(Q, X0, 0)
    Q[:b].copy_(q)
    p, m = 0, b
    lo = 0  # first row of the previous block (0: no short recurrence to exploit)
    n_restarts = 0
    n_iter = 0
    theta = Y = res_all = None
    R = None
    last = (0, 0)
    snorm = 0.0
    kk = None
    pbar = None
    if progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=max_matvecs, desc=f"eigsh(k={k}, {which})", unit="matvec",
                    disable=not is_main_process())
    prev_wanted: Optional[Tensor] = None
    pending_fresh = False   # fresh directions (after an invariant subspace) not yet multiplied
    fresh_seen = False      # the block just multiplied held fresh directions
    try:
        while True:
            bs = m - p
            W = _finite(op.apply_rows(Q[p:m]), "eigsh").to(acc_dtype)
            n_iter += 1
            if pbar is not None:
                pbar.update(bs)
            if lo > 0 and short_recurrence:
                # Lanczos: W = A Q[p:m] has large components only along the last two blocks
                # Q[lo:m] (the block recurrence); the op removes those first (cheap: 2b rows),
                # then the rest is small and one round over the whole basis suffices (two passes
                # instead of three; a second round runs where a row lost more than 1/sqrt(2))
                q, C, R = block_orthonormalize(Q, W, m, rounds=1, local_rows=m - lo)
            else:
                q, C, R = block_orthonormalize(Q, W, m)
            del W
            C = C.cpu().double()
            R = R.cpu().double()
            T[:p, p:m] = C[:p]
            T[p:m, :p] = C[:p].T
            T[p:m, p:m] = 0.5 * (C[p:m] + C[p:m].T)
            T[m:m + bs, p:m] = R
            T[p:m, m:m + bs] = R.T
            last = (p, m)
            lo, p = p, m
            # a lost direction, or one (numerically) decoupled from the basis, makes the basis an
            # invariant subspace: the next block then holds fresh directions
            fresh_seen, pending_fresh = pending_fresh, bool(
                (torch.diagonal(R).abs() <= 1e-3 * tol * snorm).any()
                or (torch.diagonal(R) == 0).any())
            used = op.n_matvecs - n0
            restart_due = m + bs > max_basis
            budget_out = used + bs > max_matvecs
            dense_due = (used + bs > d and d <= DENSE_MAX_D and used + d <= max_matvecs)
            if m < min(k + bs, d) and not (restart_due or budget_out or dense_due):
                # the basis cannot hold the answer yet: no Rayleigh-Ritz needed
                Q[m:m + bs].copy_(q)
                m += bs
                continue
            theta, Y = torch.linalg.eigh(T[:m, :m])
            res_all = torch.linalg.vector_norm(R @ Y[last[0]:last[1]], dim=0)
            snorm = max(snorm, float(theta.abs().max()))
            sel = _wanted(theta, which, k)
            ok = res_all[sel] <= tol * max(snorm, 1e-300)
            wanted = theta[sel]
            # after an invariant subspace, stop only once the fresh directions left the wanted
            # values unchanged (a further copy of a wanted multiple eigenvalue would move them)
            if fresh_seen:
                settled = prev_wanted is not None and bool(
                    ((wanted - prev_wanted).abs() <= tol * max(snorm, 1e-300)).all())
            else:
                settled = not pending_fresh
            prev_wanted = wanted
            if pbar is not None:
                pbar.set_postfix(converged=f"{int(ok.sum())}/{k}")
            # an invariant subspace can make k Ritz pairs exact while missing eigenvalues outside
            # it: only declare convergence once the wanted pairs are chosen among > k values
            stop = bool(ok.all()) and m >= min(k + bs, d) and settled
            if group is not None:  # data parallel: every rank stops at the same product
                stop = agree_all(group, stop, op.device)
            if stop:
                break
            if dense_due:
                # a tiny operator that Lanczos has not solved in d products: form it densely
                if pbar is not None:
                    pbar.close()
                    pbar = None
                log.debug("eigsh: %d products without convergence on d = %d: dense solve",
                          used, d)
                return _dense_eigsh(op, k, which, tol, return_eigenvectors, n0, t0,
                                    mode_of(), common, n_restarts)
            if budget_out:
                (log.warning if warn else log.debug)(
                    "eigsh: %d of %d eigenpairs converged after %d products (max_matvecs)",
                    int(ok.sum()), k, used)
                break
            if restart_due:
                # thick restart: keep the wanted Ritz vectors and neighbours + the residual block
                if kk is None:
                    room = max_basis - k - 2 * bs
                    kk = min(k + max(room // 2, 0), max_basis - 2 * bs)
                keep = _keep_order(theta, which, k, kk)
                kk_now = keep.numel()
                Yk = Y[:, keep]
                _rotate_rows_(Q, Yk, m, acc_dtype)
                Q[kk_now:kk_now + bs].copy_(q)
                coup = R @ Y[last[0]:last[1], keep]
                T.zero_()
                T[:kk_now, :kk_now] = torch.diag(theta[keep])
                T[kk_now:kk_now + bs, :kk_now] = coup
                T[:kk_now, kk_now:kk_now + bs] = coup.T
                # the residual block couples to every kept Ritz vector: no short recurrence
                lo, p, m = 0, kk_now, kk_now + bs
                n_restarts += 1
            else:
                Q[m:m + bs].copy_(q)
                m += bs
    finally:
        if pbar is not None:
            pbar.close()

    # ---- results --------------------------------------------------------------------------------
    n_basis = last[1]
    sel = _wanted(theta, which, k)
    vals = theta[sel].clone()
    res = res_all[sel].clone()
    vec_dtype = torch.float64 if op.dtype == torch.float64 else torch.float32
    X = None
    if return_eigenvectors or verify:
        X = _combine_rows(Q, Y[:, sel], n_basis, vec_dtype, acc_dtype)
    verified = False
    if verify:
        HX = _finite(op.apply_rows(X), "eigsh").to(torch.float64)
        res = torch.linalg.vector_norm(HX - vals.to(dev)[:, None] * X.to(torch.float64),
                                       dim=1).cpu()
        del HX
        verified = True
    converged = res <= tol * max(snorm, 1e-300)
    if pbar is None:
        log.info("eigsh: %d/%d converged, %d products, %d restarts", int(converged.sum()), k,
                 op.n_matvecs - n0, n_restarts)
    return EigshResult(
        eigenvalues=vals, eigenvectors=X.T if (return_eigenvectors and X is not None) else None,
        residuals=res, converged=converged, n_matvecs=op.n_matvecs - n0, n_restarts=n_restarts,
        n_iterations=n_iter, max_basis=max_basis, basis_dtype=str(basis_dtype),
        spectral_norm_estimate=snorm, residuals_verified=verified, mode_used=mode_of(),
        time_s=time.perf_counter() - t0, **common)


def _dense_eigsh(op: CurvatureOperator, k: int, which: str, tol: float,
                 return_eigenvectors: bool, n0: int, t0: float, mode_used: Optional[str],
                 common: dict, n_restarts: int = 0) -> EigshResult:
    """Form the operator densely (``d`` products, in chunks) and solve by ``eigh``."""
    d = op.d
    b = common["block_size"]
    A = torch.empty(d, d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    for s in range(0, d, max(b, 64)):
        e = min(s + max(b, 64), d)
        A[s:e] = _finite(op.apply_rows(eye[s:e].to(op.device)), "eigsh").double().cpu()
    A = 0.5 * (A + A.T)
    theta, Y = torch.linalg.eigh(A)
    sel = _wanted(theta, which, k)
    vals = theta[sel]
    vecs = Y[:, sel]
    res = torch.linalg.vector_norm(A @ vecs - vecs * vals, dim=0)
    snorm = float(theta.abs().max())
    out_dtype = op.dtype if op.dtype in (torch.float32, torch.float64) else torch.float32
    return EigshResult(
        eigenvalues=vals, eigenvectors=vecs.to(device=op.device, dtype=out_dtype)
        if return_eigenvectors else None, residuals=res,
        converged=res <= tol * max(snorm, 1e-300), n_matvecs=op.n_matvecs - n0,
        n_restarts=n_restarts, max_basis=d, basis_dtype=str(torch.float64),
        spectral_norm_estimate=snorm, residuals_verified=True,
        mode_used=getattr(op, "mode_used", None) or mode_used, method="dense",
        time_s=time.perf_counter() - t0, **common)


def _finite(W: Tensor, where: str) -> Tensor:
    if not bool(torch.isfinite(W).all()):
        raise FloatingPointError(f"{where}: the operator product contains "
                                 f"{int((~torch.isfinite(W)).sum())} NaN/Inf value(s)")
    return W


def _col_chunk(d: int, rows: int) -> int:
    # ~32 MB of float64 temporaries per chunk
    return max(1024, min(d, (4 << 20) // max(rows, 1)))


def _rotate_rows_(Q: Tensor, Y: Tensor, m: int, acc: torch.dtype = torch.float64) -> None:
    """In place ``Q[:kk] = Y^T Q[:m]`` (``Y (m, kk)``), column chunk by column chunk, summed in
    ``acc``."""
    d = Q.shape[1]
    Yt = Y.T.to(device=Q.device, dtype=acc).contiguous()
    c = _col_chunk(d, m)
    kk = Y.shape[1]
    for s in range(0, d, c):
        e = min(s + c, d)
        blk = Yt @ Q[:m, s:e].to(acc)
        Q[:kk, s:e].copy_(blk)


def _combine_rows(Q: Tensor, Y: Tensor, m: int, dtype: torch.dtype,
                  acc: torch.dtype = torch.float64) -> Tensor:
    """``Y^T Q[:m]`` as ``(kk, d)`` in ``dtype``, summed in ``acc``."""
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
