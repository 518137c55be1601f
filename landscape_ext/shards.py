r"""Vectors sharded over the ranks of a process group: the collectives of the Krylov solvers on
the operators of FSDP2-sharded models (:mod:`landscape_ext.operators.sharded`).

A global vector of ``d`` entries (the parameters flattened in ``named_parameters()`` order, as
in the unsharded operators) lives on rank ``r`` as its local rows ``x[local_index_r]``: the
entries of the rank's parameter shards. The index sets of the ranks partition ``0 .. d-1``.
Every inner product, norm and Gram matrix of the solvers is a local partial sum followed by one
all-reduce (float64 on the wire for the small ``(n, m)`` results); the projected problems (the
tridiagonal or block matrices, their eigendecompositions, small QRs) are then identical on every
rank and solved redundantly there. The basis of a solver holds local rows only: ``1/W`` of the
memory of the unsharded one.

Random vectors are drawn as global vectors from the seeded CPU generator (the draws of the
unsharded solvers, bit for bit) and each rank keeps its rows, so a sharded run starts where the
unsharded one does given the seed. Drawing costs ``O(n d)`` time and, above
``DRAW_CHUNK_ELEMENTS``, is done one row at a time (the rows then differ from the unsharded
draw, with the same distribution).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .distributed import agree_arguments, all_gather_rows, all_reduce_sum_, broadcast_, \
    exchange_status, rank_and_world

__all__ = ["VectorShards", "vector_shards", "agree_call", "DRAW_CHUNK_ELEMENTS"]

#: Largest ``n * d`` drawn in one call (float64 elements: 1 GiB); larger draws go row by row.
DRAW_CHUNK_ELEMENTS = 1 << 27


def vector_shards(op: Any) -> Optional["VectorShards"]:
    """The :class:`VectorShards` of an operator whose vectors are sharded over ranks (an
    operator of an FSDP2 model), else ``None``."""
    return getattr(op, "vector_shards", None)


def agree_call(op: Any, owner: str, choices: Optional[Mapping[str, Sequence[str]]] = None,
               **values: float) -> None:
    """Before a solver's first collective: raise on every rank of a distributed operator (data
    parallel or sharded vectors: its ``process_group``) when the ranks call ``owner`` with
    different ``values``, naming the argument and each rank's value (``choices[name]``: the
    names of an argument passed as an index). A no-op for a single-process operator."""
    shards = vector_shards(op)
    if shards is not None:
        shards.agree(owner, choices, **values)
    else:
        agree_arguments(getattr(op, "process_group", None), owner, values,
                        getattr(op, "device", None), choices)


def _default_rank_tol(*dtypes: torch.dtype) -> float:
    return 10.0 * max(torch.finfo(t).eps for t in dtypes)


class VectorShards:
    """The layout of sharded vectors and the collectives on them.

    Parameters
    ----------
    group : torch.distributed group
    local_index : Tensor
        ``(d_local,)`` int64: the global positions of this rank's entries, in local order.
    d : int
        Global dimension (the index sets of all ranks partition ``range(d)``; checked).
    device : torch.device
        Where the local vectors live (the parameters' device).
    owner : str
        Names the caller in error messages.
    """

    def __init__(self, group: Any, local_index: Tensor, d: int, device: torch.device,
                 owner: str):
        self.group = group
        self.d = int(d)
        self.device = torch.device(device)
        self.owner = owner
        self.rank, self.world = rank_and_world(group)
        self.local_index = local_index.to(torch.int64).cpu()
        self.d_local = int(self.local_index.numel())
        counts = exchange_status(group, None, (float(self.d_local), float(self.d)),
                                 "sharding the vectors", self.device)
        self.counts = [int(round(v)) for v in counts[:, 0].tolist()]
        if any(int(round(v)) != self.d for v in counts[:, 1].tolist()) or \
                sum(self.counts) != self.d:
            raise ValueError(f"{owner}: the ranks' shards do not partition the parameters "
                             f"(local sizes {self.counts}, global sizes "
                             f"{[int(v) for v in counts[:, 1].tolist()]})")
        self.all_index = all_gather_rows(self.local_index, self.counts, group) \
            if group is not None else self.local_index
        covered = torch.zeros(self.d, dtype=torch.bool)
        covered[self.all_index] = True
        if not bool(covered.all()):
            raise ValueError(f"{owner}: the ranks' shards leave {int((~covered).sum())} of "
                             f"{self.d} entries uncovered")

    # -- layout ---------------------------------------------------------------------------------
    def take(self, X: Tensor) -> Tensor:
        """This rank's rows of global vectors ``X (..., d)`` -> ``(..., d_local)``."""
        return X.index_select(-1, self.local_index.to(X.device))

    def gather(self, X: Tensor) -> Tensor:
        """Global vectors ``(n, d)`` on every rank from the local rows ``X (n, d_local)``."""
        parts = all_gather_rows(X.T.contiguous(), self.counts, self.group)   # (d, n) by rank
        out = torch.empty(X.shape[0], self.d, dtype=X.dtype, device=X.device)
        out[:, self.all_index.to(X.device)] = parts.T.to(X.device)
        return out

    def draw(self, n: int, sampler: Callable[[int, int], Tensor]) -> Tensor:
        """Local rows ``(n, d_local)`` of ``n`` global random vectors ``sampler(n, d)`` (float64
        on the CPU, from a seeded generator the sampler closes over)."""
        if n * self.d <= DRAW_CHUNK_ELEMENTS:
            return self.take(sampler(n, self.d))
        return torch.cat([self.take(sampler(1, self.d)) for _ in range(n)])

    # -- reductions -----------------------------------------------------------------------------
    def sum_(self, t: Tensor) -> Tensor:
        """All-reduce (sum over ranks) in place; returns ``t``."""
        return all_reduce_sum_(t, self.group)

    def gram(self, A: Tensor, B: Tensor) -> Tensor:
        """``A @ B^T`` of global vectors given as local rows ``A (n, d_l)``, ``B (m, d_l)``."""
        return self.sum_((A @ B.T).contiguous())

    def dots(self, A: Tensor, B: Tensor) -> Tensor:
        """Row-wise inner products ``(n,)``."""
        return self.sum_((A * B).sum(-1).contiguous())

    def norms(self, A: Tensor) -> Tensor:
        """Row norms ``(n,)`` (float64)."""
        A = A.to(torch.float64)
        return self.dots(A, A).clamp_min(0).sqrt()

    def agree(self, owner: str, choices: Optional[Mapping[str, Sequence[str]]] = None,
              **values: float) -> None:
        """Raise on every rank when the ranks pass different ``values`` (solver arguments: a
        rank with another ``k`` or ``seed`` would make other collectives); see
        :func:`~landscape_ext.distributed.agree_arguments`."""
        agree_arguments(self.group, owner, values, self.device, choices)

    # -- orthogonalization ----------------------------------------------------------------------
    def _fresh(self, against: Sequence[Tensor], dtype: torch.dtype, seed: int) -> Tensor:
        """A unit vector (local rows) orthogonal to the rows of ``against``, the same on every
        rank (drawn from ``seed``)."""
        gen = torch.Generator().manual_seed(seed)
        x = self.draw(1, lambda n, d: torch.randn(n, d, generator=gen, dtype=torch.float64))
        x = x.to(device=self.device, dtype=dtype)
        for _ in range(2):
            for B in against:
                if B.shape[0]:
                    x = x - self.gram(x, B.to(dtype)) @ B.to(dtype)
        return (x / self.norms(x).to(dtype).clamp_min(1e-300)[:, None])[0]

    def block_orthonormalize(self, basis: Tensor, block: Tensor, n_basis: int,
                             rank_tol: float = -1.0) -> Tuple[Tensor, Tensor, Tensor]:
        """:func:`landscape_ext.block_orthonormalize` on sharded rows, same contract
        (``q (b, d_l)``, ``coeffs (n_basis, b)``, ``r (b, b)``; ``r[k, k] == 0`` marks a lost
        direction, ``q[k]`` then fresh).

        Two rounds of classical Gram-Schmidt against ``basis[:n_basis]`` (one all-reduce of the
        ``(n_basis, b)`` coefficients per round: local passes over the basis), then the block
        row by row, each row by two rounds against the rows before it and its norm (the
        coefficients and the norm of a row share an all-reduce)."""
        dtype = block.dtype
        B = basis[:n_basis]
        B = B if B.dtype == dtype else B.to(dtype)
        X = block.clone()
        tol = rank_tol if rank_tol >= 0 else _default_rank_tol(basis.dtype, dtype)
        original = self.norms(X)
        C = X.new_zeros((n_basis, X.shape[0]))
        if n_basis:
            for _ in range(2):
                c = self.gram(B, X)
                X -= c.T @ B
                C += c
        b = X.shape[0]
        if b > 1:
            qr = self._cholesky_qr2(X, original, tol)
            if qr is not None:
                return qr[0], C, qr[1]
        q = torch.empty_like(X)
        R = torch.zeros(b, b, dtype=dtype, device=X.device)
        for k in range(b):
            x = X[k:k + 1]
            for _ in range(2):
                if k:
                    c = self.gram(q[:k], x)[:, 0]
                    x = x - c[None, :] @ q[:k]
                    R[:k, k] += c
            nrm = float(self.norms(x)[0])
            if nrm <= tol * float(original[k]) or nrm == 0.0:
                q[k] = self._fresh([B, q[:k]], dtype, seed=n_basis * 131 + k)
            else:
                q[k] = x[0] / nrm
                R[k, k] = nrm
        return q, C, R

    def _cholesky_qr2(self, X: Tensor, original: Tensor,
                      tol: float) -> Optional[Tuple[Tensor, Tensor]]:
        """``(q, r)`` with ``X = r^T q``, rows of ``q`` orthonormal and ``r`` upper triangular
        with a positive diagonal (the QR the row-by-row path computes), by CholeskyQR2 (Fukaya
        et al. 2014): two all-reduces in all instead of two per row. ``None`` when the block is
        too ill-conditioned for it (squared condition number past ``1 / eps`` of its dtype:
        the Cholesky factor fails or is not trustworthy) or a direction is lost
        (``r[k, k] <= tol * ||X[k]||``); the caller then takes the row-by-row path."""
        eps = torch.finfo(X.dtype).eps
        Y = X
        factors = []
        for _ in range(2):
            G = self.gram(Y.to(torch.float64), Y.to(torch.float64))
            L, info = torch.linalg.cholesky_ex(G)
            diag = L.diagonal()
            if int(info) != 0 or not bool(torch.isfinite(L).all()) or \
                    float(diag.min()) ** 2 <= 10 * eps * float(diag.max()) ** 2:
                return None
            factors.append(L)
            Y = torch.linalg.solve_triangular(L.to(Y.dtype), Y, upper=False)
        R = (factors[0] @ factors[1]).T
        if bool((R.diagonal() <= tol * original.to(R.dtype)).any()):
            return None
        return Y, R.to(X.dtype)

    def orthogonalize_batched(self, bases: Tensor, vectors: Tensor, n_basis: int,
                              rank_tol: float = -1.0) -> Tuple[Tensor, Tensor, Tensor]:
        """:func:`landscape_ext.orthogonalize_batched` on sharded rows (CGS2, one all-reduce of
        the ``(r, n_basis)`` coefficients per round and one of the norms)."""
        dtype = vectors.dtype
        Bs = bases[:, :n_basis]
        Bs = Bs if Bs.dtype == dtype else Bs.to(dtype)
        x = vectors.clone()
        tol = rank_tol if rank_tol >= 0 else _default_rank_tol(bases.dtype, dtype)
        original = self.norms(x)
        C = x.new_zeros((x.shape[0], n_basis))
        for _ in range(2):
            c = self.sum_(torch.einsum("rmd,rd->rm", Bs, x).contiguous())
            x = x - torch.einsum("rm,rmd->rd", c, Bs)
            C += c
        norms = self.norms(x).to(dtype)
        lost = (norms <= tol * original.to(dtype)) | (norms == 0)
        q = x / norms.clamp_min(1e-300)[:, None]
        for i in torch.nonzero(lost).flatten().tolist():
            norms[i] = 0
            q[i] = self._fresh([Bs[i]], dtype, seed=n_basis * 131 + i)
        return q, C, norms

    def orth_cols(self, Y: Tensor) -> Tuple[Tensor, Tensor]:
        """Reduced QR of the global vectors ``Y (s, d)`` given as local rows: ``Q (d_l, s)``
        (local rows of orthonormal columns), ``R (s, s)`` (the same on every rank). TSQR
        (Demmel et al. 2012): local QR, all-gather of the ``R`` factors, QR of their stack on
        rank 0, broadcast."""
        s = Y.shape[0]
        Q_local, R_local = torch.linalg.qr(Y.T, mode="reduced")       # (d_l, c), (c, s)
        rows = [min(c, s) for c in self.counts]
        stack = all_gather_rows(R_local.cpu().to(torch.float64), rows, self.group)
        Q_s, R = torch.linalg.qr(stack, mode="reduced")                 # (sum c, s'), (s', s)
        if Q_s.shape[1] < s:
            raise ValueError(f"{self.owner}: {s} directions but only d = {self.d} entries")
        Q_s, R = broadcast_(Q_s.contiguous(), self.group), broadcast_(R.contiguous(), self.group)
        start = sum(rows[:self.rank])
        block = Q_s[start:start + rows[self.rank]].to(device=Y.device, dtype=Y.dtype)
        return Q_local @ block, R.to(Y.dtype)
