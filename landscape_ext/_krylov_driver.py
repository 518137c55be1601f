"""The drivers of the krylov ops ``block_orthonormalize`` and ``orthogonalize_batched``.

The memory-bound passes over the basis are compiled kernels, one set per backend (the internal
ops ``_krylov_coeffs``, ``_krylov_project_coeffs``, ``_krylov_project_gram``; csrc/krylov.h).
Everything else is here: the argument checks, classical Gram-Schmidt twice (CGS2) in three passes,
CholeskyQR2 on the remainder, the rank decisions and the rare rank-deficient fallback. It touches
only b x b matrices or, on the fallback, one block row at a time, and it needs LAPACK (Cholesky,
inverse), which torch's stable C ABI does not offer: in Python it runs the same ATen calls the C++
driver made, in the same order, so outputs are bit-for-bit those of the C++ driver.

``ops.py`` registers :func:`block_orthonormalize` and :func:`orthogonalize_batched` as the kernels
of the public ops for every backend whose passes are compiled in; ``passes`` is the triple of pass
ops (coeffs, project_coeffs, project_gram).
"""
from __future__ import annotations

import math
import sys
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

_aten = torch.ops.aten

_UNIT_ROUNDOFF = {
    torch.float64: sys.float_info.epsilon,
    torch.float32: 1.1920928955078125e-07,
    torch.float16: 9.765625e-4,   # 2^-10
    torch.bfloat16: 7.8125e-3,    # 2^-7
}
_FLOAT_OR_HALF = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# dtypes as torch's C++ (c10::ScalarType) prints them, as the C++ checks did
_DTYPE_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
                torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
                torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
                torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
                torch.complex32: "ComplexHalf"}


class Passes(NamedTuple):
    """The compiled passes (csrc/krylov.h), and the common path of :func:`block_orthonormalize`
    in one compiled call where a backend has it (``fast``, for the device types in
    ``fast_devices``: ``_krylov_fast_orthonormalize``, bitwise this driver's result)."""

    coeffs: Callable[[Tensor, Tensor, int], Tensor]
    project_coeffs: Callable[[Tensor, Tensor, Tensor, int], Tuple[Tensor, Tensor]]
    project_gram: Callable[[Tensor, Tensor, Tensor, int], Tuple[Tensor, Tensor]]
    fast: Optional[Callable[..., Tuple[Tensor, Tensor, Tensor, bool]]] = None
    fast_devices: Tuple[str, ...] = ()


class _Projected(NamedTuple):
    W2: Tensor  # (R, b, d) remainder after the rounds
    C: Tensor   # (R, n, b) total coefficients
    G: Tensor   # (R, b, b) Gram matrix of W2


def _unit_roundoff(dtype: torch.dtype) -> float:
    return _UNIT_ROUNDOFF.get(dtype, _UNIT_ROUNDOFF[torch.float32])


def default_rank_tol(basis_dtype: torch.dtype, block_dtype: torch.dtype) -> float:
    """10 x the unit roundoff of the less precise of the two storage dtypes."""
    return 10.0 * max(_unit_roundoff(basis_dtype), _unit_roundoff(block_dtype))


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check(cond: bool, message: Callable[[], str]) -> None:
    if not cond:
        raise RuntimeError(message())


def _norm_rows(t: Tensor) -> Tensor:
    """2-norms of the rows of a 2-D tensor (the ATen op the C++ driver called)."""
    return _aten.norm.ScalarOpt_dim(t, 2, [1])


def _rows_contiguous(t: Tensor) -> Tensor:
    # A basis transposed or strided in d is copied once (a convenience, not the hot path).
    return t if (t.numel() == 0 or t.stride(-1) == 1) else t.contiguous()


# ---- argument checks (messages name the op, the argument and the sizes) -------------------------
def _check_basis_and_block(op: str, basis_name: str, basis: Tensor, block_name: str,
                           block: Tensor) -> None:
    _check(basis.device == block.device,
           lambda: f"{op}: {basis_name} is on {basis.device} but {block_name} is on {block.device}")
    _check(basis.dtype in _FLOAT_OR_HALF,
           lambda: f"{op}: {basis_name} must be float64, float32, float16 or bfloat16, got "
                   f"{_dtype_name(basis.dtype)}")
    _check(block.dtype in (torch.float64, torch.float32),
           lambda: f"{op}: {block_name} must be float32 or float64, got {_dtype_name(block.dtype)}")


def _check_n_basis_and_rank_tol(op: str, n_basis: int, m: int, rank_tol: float) -> None:
    _check(0 <= n_basis <= m,
           lambda: f"{op}: n_basis = {n_basis} must be in [0, m] with m = {m} basis rows")
    _check(math.isfinite(rank_tol) and rank_tol < 1.0,
           lambda: f"{op}: rank_tol must be finite and < 1 (negative selects the default), got "
                   f"{_fmt(rank_tol)}")


def _fmt(x: float) -> str:
    # numbers as the C++ checks streamed them (std::ostream: 6 significant digits)
    return f"{x:g}"


def check_block_orthonormalize_args(basis: Tensor, block: Tensor, n_basis: int,
                                    rank_tol: float) -> None:
    op = "block_orthonormalize"
    _check(basis.dim() == 2, lambda: f"{op}: basis must be 2-D (m, d), got shape {_shape(basis)}")
    _check(block.dim() == 2, lambda: f"{op}: block must be 2-D (b, d), got shape {_shape(block)}")
    _check_basis_and_block(op, "basis", basis, "block", block)
    m, d = basis.shape
    b = block.shape[0]
    _check(block.shape[1] == d,
           lambda: f"{op}: basis has d = {d} columns but block has d = {block.shape[1]}")
    _check_n_basis_and_rank_tol(op, n_basis, m, rank_tol)
    _check(n_basis + b <= d,
           lambda: f"{op}: n_basis ({n_basis}) + block rows ({b}) exceeds the dimension d = {d}: "
                   f"no room for orthonormal directions")


def check_orthogonalize_batched_args(bases: Tensor, vectors: Tensor, n_basis: int,
                                     rank_tol: float) -> None:
    op = "orthogonalize_batched"
    _check(bases.dim() == 3,
           lambda: f"{op}: bases must be 3-D (r, m, d), got shape {_shape(bases)}")
    _check(vectors.dim() == 2,
           lambda: f"{op}: vectors must be 2-D (r, d), got shape {_shape(vectors)}")
    _check_basis_and_block(op, "bases", bases, "vectors", vectors)
    r, m, d = bases.shape
    _check(vectors.shape[0] == r,
           lambda: f"{op}: bases holds r = {r} runs but vectors has {vectors.shape[0]} rows")
    _check(vectors.shape[1] == d,
           lambda: f"{op}: bases has d = {d} but vectors has d = {vectors.shape[1]}")
    _check_n_basis_and_rank_tol(op, n_basis, m, rank_tol)
    _check(r == 0 or n_basis + 1 <= d,
           lambda: f"{op}: n_basis ({n_basis}) + 1 exceeds the dimension d = {d}: no room for an "
                   f"orthogonal direction")


def _check_finite_rows(norms: Sequence[float], op: str, name: str) -> None:
    for row, value in enumerate(norms):
        if not math.isfinite(value):
            raise RuntimeError(f"{op}: {name} has non-finite values (row {row} of {len(norms)})")


# ---- the rounds of Gram-Schmidt ------------------------------------------------------------------
def _first_coeffs(passes: Passes, basis: Tensor, W: Tensor, n: int, op: str, basis_name: str,
                  first_row: int = 0) -> Tensor:
    """C1 = basis[:, :n] W^T, checked finite. ``basis`` may be a view whose row 0 is row
    ``first_row`` of the caller's basis (named in the error)."""
    R = W.shape[0]
    C1 = passes.coeffs(basis, W, n)
    # W was checked finite, so a non-finite coefficient can only come from the basis.
    if not bool(torch.isfinite(C1).all()):
        bad = C1.isfinite().logical_not().flatten(1).any(1)
        first = int(bad.nonzero().view(-1)[0])
        rows = (f"its first n_basis = {n} rows" if first_row == 0
                else f"rows [{first_row}, {first_row + n}) (local_rows)")
        run = f" (run {first})" if R > 1 else ""
        raise RuntimeError(f"{op}: {basis_name} has non-finite values in {rows}{run}")
    return C1


def _project_twice(passes: Passes, basis: Tensor, W: Tensor, n: int, op: str,
                   basis_name: str) -> _Projected:
    """CGS2 of W (R, b, d) against basis[:, :n] in three passes."""
    R, b = W.shape[0], W.shape[1]
    if n == 0:
        return _Projected(W, torch.zeros(R, 0, b, dtype=W.dtype, device=W.device),
                          torch.bmm(W, W.transpose(1, 2)))
    C1 = _first_coeffs(passes, basis, W, n, op, basis_name)
    W1, C2 = passes.project_coeffs(basis, W, C1, n)
    W2, G = passes.project_gram(basis, W1, C2, n)
    return _Projected(W2, C1.add_(C2), G)


def _project_adaptive(passes: Passes, basis: Tensor, W: Tensor, n: int, norms0: Tensor, op: str,
                      basis_name: str) -> _Projected:
    """One round of CGS (coefficients, then subtraction fused with the Gram matrix) and a second
    round only when some row kept less than 1/sqrt(2) of its norm (Daniel-Gragg-Kaufman-Stewart).
    A basis stored in a narrower dtype than the block is orthonormal only to its own rounding u:
    the round must also have removed little enough for u |C1_k| <= eps |W1_k|. R == 1."""
    b = W.shape[1]
    if n == 0:
        return _Projected(W, torch.zeros(1, 0, b, dtype=W.dtype, device=W.device),
                          torch.bmm(W, W.transpose(1, 2)))
    C1 = _first_coeffs(passes, basis, W, n, op, basis_name)
    W1, G1 = passes.project_gram(basis, W, C1, n)
    kept = G1[0].diagonal().to("cpu", torch.float64).tolist()
    norms = norms0.tolist()
    u_basis = _unit_roundoff(basis.dtype)
    eps_acc = _unit_roundoff(W.dtype)
    narrow = u_basis > eps_acc
    cnorm = _aten.norm.ScalarOpt_dim(C1[0], 2, [0]).to("cpu", torch.float64).tolist() \
        if narrow else None
    enough = True
    for k in range(b):
        enough = math.isfinite(kept[k]) and kept[k] >= 0.5 * norms[k] * norms[k]
        if enough and narrow:
            enough = u_basis * cnorm[k] <= eps_acc * math.sqrt(kept[k])
        if not enough:
            break
    if enough:
        return _Projected(W1, C1, G1)
    C2 = passes.coeffs(basis, W1, n)
    W2, G = passes.project_gram(basis, W1, C2, n)
    return _Projected(W2, C1.add_(C2), G)


# ---- replacing lost directions -------------------------------------------------------------------
def _fresh_direction(d: int, index: int, attempt: int, like: Tensor) -> Tensor:
    """A deterministic pseudo-random direction for lost direction ``index`` (attempt-th try),
    drawn in float64 on the CPU from a seed fixed by (index, attempt)."""
    mask = (1 << 64) - 1
    seed = (0x9E3779B97F4A7C15 * (index + 1) + attempt * 0xBF58476D1CE4E5B9) & mask
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    z = torch.randn(d, generator=gen, dtype=torch.float64)
    return z.to(dtype=like.dtype, device=like.device)


def _project_rows(v: Tensor, Qrows: Tensor, coef: Optional[Tensor]) -> Tensor:
    """v with its components along the rows of Qrows removed twice; they are added into coef
    (float64 CPU) when given."""
    if Qrows.shape[0] == 0:
        return v
    for _ in range(2):
        c = torch.mv(Qrows, v)
        v = v - torch.mv(Qrows.t(), c)
        if coef is not None:
            coef.add_(c.to("cpu", torch.float64))
    return v


def _fresh_orthogonal_direction(passes: Passes, basis: Tensor, n: int, Qk: Optional[Tensor],
                                index: int, like: Tensor, op: str,
                                basis_name: str) -> Optional[Tensor]:
    """A unit direction orthogonal to basis[:, :n] (a one-run basis) and to the rows of Qk: the
    first of 8 pseudo-random tries that keeps more than half its norm; None if none does."""
    d = like.shape[-1]
    for attempt in range(8):
        z = _fresh_direction(d, index, attempt, like)
        z = z / _aten.norm.Scalar(z, 2)
        if n > 0:
            z = _project_twice(passes, basis, z.view(1, 1, d), n, op, basis_name).W2.view(d)
        if Qk is not None:
            z = _project_rows(z, Qk, None)
        zn = _aten.norm.Scalar(z, 2).item()
        if zn > 0.5:
            return z / zn
    return None


# ---- block_orthonormalize ------------------------------------------------------------------------
def block_orthonormalize(passes: Passes, basis_in: Tensor, block: Tensor, n: int,
                         rank_tol: float = -1.0, rounds: int = 2,
                         local_rows: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """The kernel of the op ``block_orthonormalize`` (schema and contract: csrc/registration.cpp)."""
    op = "block_orthonormalize"
    check_block_orthonormalize_args(basis_in, block, n, rank_tol)
    _check(rounds in (1, 2), lambda: f"{op}: rounds must be 2 (CGS2) or 1 (one round, a second "
                                     f"only where needed), got {rounds}")
    _check(0 <= local_rows <= n,
           lambda: f"{op}: local_rows must be in [0, n_basis = {n}], got {local_rows}")
    if basis_in.dtype == torch.float64 and block.dtype == torch.float32:
        # A float64 basis with a float32 block: run in float64 (the passes accumulate in the
        # block's dtype) and return float32, keeping the float32 block's default tolerance.
        tol = default_rank_tol(torch.float64, torch.float32) if rank_tol < 0 else rank_tol
        q, c, r = block_orthonormalize(passes, basis_in, block.to(torch.float64), n, tol, rounds,
                                       local_rows)
        return q.to(torch.float32), c.to(torch.float32), r.to(torch.float32)
    tol = default_rank_tol(basis_in.dtype, block.dtype) if rank_tol < 0 else rank_tol
    b, d = block.shape
    opts = dict(dtype=block.dtype, device=block.device)
    if b == 0:
        return torch.empty(0, d, **opts), torch.zeros(n, 0, **opts), torch.empty(0, 0, **opts)
    basis = _rows_contiguous(basis_in).unsqueeze(0)  # (1, m, d)
    W = block.contiguous().unsqueeze(0)              # (1, b, d)
    norms0 = _norm_rows(W[0]).to("cpu", torch.float64)
    _check_finite_rows(norms0.tolist(), op, "block")
    narrow_basis = _unit_roundoff(basis.dtype) > _unit_roundoff(W.dtype)
    if (passes.fast is not None and W.device.type in passes.fast_devices
            and not (rounds == 1 and narrow_basis)):  # (that case it would decline midway)
        # the common path below in one compiled call; it declines what it does not cover
        q, coeffs, r, ok = passes.fast(basis, W, norms0, n, tol, rounds, local_rows)
        if ok:
            return q, coeffs, r

    # The newest local_rows rows first (one round over just those: a Lanczos block's large
    # components lie along the last two blocks), then the rounds over the whole basis.
    Wg, normsg, CL = W, norms0, None
    l0 = n - local_rows
    if local_rows > 0:
        local = basis.narrow(1, l0, local_rows)
        CL = _first_coeffs(passes, local, W, local_rows, op, "basis", l0)
        Wg, GL = passes.project_gram(local, W, CL, local_rows)
        normsg = GL[0].diagonal().to("cpu", torch.float64).clamp_min(0).sqrt()
    p = (_project_twice(passes, basis, Wg, n, op, "basis") if rounds == 2
         else _project_adaptive(passes, basis, Wg, n, normsg, op, "basis"))
    if CL is not None:
        p.C.narrow(1, l0, local_rows).add_(CL)
    coeffs = p.C[0]
    fast = _cholesky_qr2(passes, p, norms0, tol, _unit_roundoff(block.dtype), opts)
    if fast is not None:
        return fast[0], coeffs, fast[1]
    return _rank_revealing_fallback(passes, basis, p, coeffs, norms0, tol, n, opts, op)


def _cholesky_qr2(passes: Passes, p: _Projected, norms0: Tensor, tol: float, eps_acc: float,
                  opts: dict) -> Optional[Tuple[Tensor, Tensor]]:
    """(q, r) by CholeskyQR2 on W2, or None when the Cholesky factor shows a row kept no more
    than tol of its norm or is too ill-conditioned for CholeskyQR (kappa^2 eps >= 1, checked on
    the diagonal with a safety factor of 10)."""
    b = p.W2.shape[1]
    G = p.G[0].to("cpu", torch.float64)
    G = 0.5 * (G + G.t())
    R1, info = torch.linalg.cholesky_ex(G, upper=True)
    if int(info) != 0:
        return None
    diag = R1.diagonal().tolist()
    norms = norms0.tolist()
    dmin, dmax = math.inf, 0.0
    for k in range(b):
        if not (math.isfinite(diag[k]) and diag[k] > tol * norms[k] and diag[k] > 0.0):
            return None
        dmin, dmax = min(dmin, diag[k]), max(dmax, diag[k])
    if not dmax < 0.1 / math.sqrt(eps_acc) * dmin:
        return None
    # q1 = R1^{-T} W2 and its Gram matrix, then q = R2^{-T} q1, by the backend's own pass
    # (out = 0 - C^T rows with C = -R^{-1}): deterministic chunked sums like the rest of the op.
    zeros = torch.zeros_like(p.W2)

    def transform(rows: Tensor, Rinv: Tensor) -> Tuple[Tensor, Tensor]:
        C = Rinv.neg().to(**opts).unsqueeze(0)  # (1, b, b), contiguous
        return passes.project_gram(rows, zeros, C, b)

    q1, G2 = transform(p.W2, torch.linalg.inv(R1))
    G2 = G2[0].to("cpu", torch.float64)
    G2 = 0.5 * (G2 + G2.t())
    R2, info2 = torch.linalg.cholesky_ex(G2, upper=True)
    if int(info2) != 0:
        return None
    q = transform(q1, torch.linalg.inv(R2))[0][0]
    r = torch.matmul(R2, R1).triu()
    return q, r.to(**opts)


def _rank_revealing_fallback(passes: Passes, basis: Tensor, p: _Projected, coeffs: Tensor,
                             norms0: Tensor, tol: float, n: int, opts: dict,
                             op: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Modified Gram-Schmidt row by row with rank detection. Each row is projected twice against
    the accepted rows, once more (CGS2) against the basis, and once more against the accepted
    rows; a row keeping no more than tol of its norm is numerically dependent: r[k, k] = 0 and
    q[k] is a fresh direction orthogonal to the basis and to q[:k]."""
    W2 = p.W2[0]
    b, d = W2.shape
    cpu64 = dict(dtype=torch.float64, device="cpu")
    q = torch.empty(b, d, **opts)
    r = torch.zeros(b, b, **cpu64)
    C = coeffs.clone()
    norms = norms0.tolist()
    for k in range(b):
        Qk = q.narrow(0, 0, k)
        rk = torch.zeros(k, **cpu64)
        v = _project_rows(W2[k], Qk, rk)
        if n > 0:
            pv = _project_twice(passes, basis, v.view(1, 1, d), n, op, "basis")
            v = pv.W2.view(d)
            C.select(1, k).add_(pv.C.view(n))
        v = _project_rows(v, Qk, rk)
        nrm = _aten.norm.Scalar(v, 2).item()
        if k > 0:
            r.select(1, k).narrow(0, 0, k).copy_(rk)
        if nrm > tol * norms[k] and nrm > 0.0:
            q[k].copy_(v / nrm)
            r[k, k] = nrm
            continue
        # Lost direction: its (tiny) remainder is dropped, r[k, k] stays 0.
        z = _fresh_orthogonal_direction(passes, basis, n, Qk, k, W2, op, "basis")
        _check(z is not None, lambda: f"{op}: could not find a direction orthogonal to the {n} "
                                      f"basis rows and {k} block rows in dimension d = {d}")
        q[k].copy_(z)
    return q, C, r.to(**opts)


# ---- orthogonalize_batched -----------------------------------------------------------------------
def orthogonalize_batched(passes: Passes, bases_in: Tensor, vectors: Tensor, n: int,
                          rank_tol: float = -1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """The kernel of the op ``orthogonalize_batched`` (contract: csrc/registration.cpp)."""
    op = "orthogonalize_batched"
    check_orthogonalize_batched_args(bases_in, vectors, n, rank_tol)
    if bases_in.dtype == torch.float64 and vectors.dtype == torch.float32:
        tol = default_rank_tol(torch.float64, torch.float32) if rank_tol < 0 else rank_tol
        q, c, nr = orthogonalize_batched(passes, bases_in, vectors.to(torch.float64), n, tol)
        return q.to(torch.float32), c.to(torch.float32), nr.to(torch.float32)
    tol = default_rank_tol(bases_in.dtype, vectors.dtype) if rank_tol < 0 else rank_tol
    r, d = vectors.shape
    opts = dict(dtype=vectors.dtype, device=vectors.device)
    if r == 0:
        return torch.empty(0, d, **opts), torch.zeros(0, n, **opts), torch.empty(0, **opts)
    bases = _rows_contiguous(bases_in)
    W = vectors.contiguous().unsqueeze(1)  # (r, 1, d)
    norms0 = _norm_rows(vectors).to("cpu", torch.float64)
    _check_finite_rows(norms0.tolist(), op, "vectors")

    p = _project_twice(passes, bases, W, n, op, "bases")
    norms = p.G.view(r).clamp_min(0).sqrt()
    ncpu = norms.to("cpu", torch.float64).tolist()
    n0 = norms0.tolist()
    safe = norms.clamp_min(sys.float_info.min)
    q = p.W2.view(r, d) / safe.unsqueeze(1)
    for i in range(r):
        if ncpu[i] > tol * n0[i] and ncpu[i] > 0.0:
            continue
        # vectors[i] lies in the span of bases[i, :n]: report norm 0 and a fresh unit direction.
        z = _fresh_orthogonal_direction(passes, bases.narrow(0, i, 1), n, None, i, vectors, op,
                                        "bases")
        _check(z is not None, lambda: f"{op}: could not find a direction orthogonal to the {n} "
                                      f"basis rows of run {i} in dimension d = {d}")
        q[i].copy_(z)
        norms[i] = 0.0
    return q, p.C.view(r, n), norms


__all__: Sequence[str] = ("Passes", "block_orthonormalize", "orthogonalize_batched",
                          "default_rank_tol")
