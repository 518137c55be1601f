r"""Data-parallel curvature on :mod:`torch.distributed`.

The engine's operators take ``process_group=`` (a :mod:`torch.distributed` group, e.g.
``dist.group.WORLD``). Every rank holds a shard of the data and the same parameters; a product
``op @ V`` computes the local sum over the rank's samples and all-reduces it, so every rank gets
the mean over all samples of all ranks — the single-process result up to the order of the
floating-point sums. The Krylov solvers and estimators then run redundantly on every rank: their
random probes come from seeded CPU generators (identical everywhere), their inputs are the
all-reduced products (bitwise identical everywhere), so their state stays identical and no
solver-level communication is needed.

The collective helpers of the engine live here: group validation, the status exchange that
makes every rank raise when one fails (:func:`exchange_status`, :func:`collective_errors`),
collectives that stage tensors through the CPU or GPU as the backend needs, the replica check of
the model operators (:func:`sync_replica_inputs`), the sample-sharded state of the distributed
gradient-covariance SVD, and :func:`is_main_process`. What a product communicates and the rules
every rank must follow: README.md, "Several GPUs or nodes".
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "RankFailure",
    "resolve_group",
    "is_distributed",
    "is_main_process",
    "rank_and_world",
    "exchange_status",
    "collective_errors",
    "all_reduce_sum_",
    "agree_all",
    "agree_arguments",
    "broadcast_",
    "all_gather_rows",
    "sync_replica_inputs",
    "parameter_checksum",
    "check_same_parameters",
    "SampleShards",
]

log = logging.getLogger(__name__)


class RankFailure(RuntimeError):
    """Raised on the healthy ranks when another rank's local work failed (the failing rank
    raises its own exception). ``failed`` maps rank -> error message."""

    def __init__(self, message: str, failed: dict):
        super().__init__(message)
        self.failed = failed


def _dist():
    import torch.distributed as dist
    return dist


def is_distributed() -> bool:
    """``torch.distributed`` is available and a default process group is initialized."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def is_main_process(group: Any = None) -> bool:
    """True on rank 0 of ``group`` (default: the default group), and in a non-distributed run.
    Results are written and progress bars are shown only there (on rank 0 of the default
    group). A process outside ``group`` gets False."""
    if not is_distributed():
        return True
    if group is None:
        return _dist().get_rank() == 0
    return _dist().get_rank(group) == 0


def resolve_group(process_group: Any, owner: str) -> Any:
    """Validate a ``process_group`` argument: ``None`` (single process) or a group of an
    initialized :mod:`torch.distributed`. Returns the group (``None`` stays ``None``)."""
    if process_group is None:
        return None
    if not is_distributed():
        raise RuntimeError(f"{owner}: process_group was given but torch.distributed is not "
                           f"initialized; call torch.distributed.init_process_group(...) first "
                           f"(torchrun sets up the environment for it)")
    dist = _dist()
    try:
        dist.get_world_size(process_group)
    except Exception as exc:  # noqa: BLE001 - anything that is not a usable group
        raise TypeError(f"{owner}: process_group must be a torch.distributed process group "
                        f"(e.g. torch.distributed.group.WORLD), got {type(process_group).__name__}"
                        ) from exc
    if dist.get_rank(process_group) < 0:
        raise ValueError(f"{owner}: this process (global rank {dist.get_rank()}) is not a member "
                         f"of process_group")
    return process_group


def rank_and_world(group: Any) -> tuple:
    """``(rank in group, group size)``; ``(0, 1)`` for ``None``."""
    if group is None:
        return 0, 1
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group: Any, like: Optional[Tensor] = None,
                 device: Optional[torch.device] = None) -> torch.device:
    """Device a collective of this group needs: for NCCL the GPU of ``like`` or ``device``, else
    the current GPU; else the CPU."""
    backend = str(_dist().get_backend(group)).lower()
    if "nccl" in backend:
        if like is not None and like.is_cuda:
            return like.device
        if device is not None and torch.device(device).type == "cuda":
            device = torch.device(device)
            return device if device.index is not None else \
                torch.device("cuda", torch.cuda.current_device())
        return torch.device("cuda", torch.cuda.current_device())
    if like is not None and like.is_cuda and "gloo" not in backend:
        return like.device
    return torch.device("cpu")


def all_reduce_sum_(t: Tensor, group: Any) -> Tensor:
    """Sum ``t`` over the ranks of ``group`` in place (a no-op for ``group=None``); returns
    ``t``. Stages through the device the backend needs."""
    if group is None:
        return t
    dist = _dist()
    dev = _comm_device(group, t)
    if dev == t.device and t.is_contiguous():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t
    buf = t.detach().to(dev).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    t.copy_(buf)
    return t


def broadcast_(t: Tensor, group: Any, src: int = 0) -> Tensor:
    """Overwrite ``t`` on every rank with its value on rank ``src`` of ``group`` (in place)."""
    if group is None:
        return t
    dist = _dist()
    src_global = dist.get_global_rank(group, src) if group is not dist.group.WORLD else src
    dev = _comm_device(group, t)
    if dev == t.device and t.is_contiguous():
        dist.broadcast(t, src=src_global, group=group)
        return t
    buf = t.detach().to(dev).contiguous()
    dist.broadcast(buf, src=src_global, group=group)
    t.copy_(buf)
    return t


def all_gather_rows(t: Tensor, counts: Sequence[int], group: Any) -> Tensor:
    """Concatenate along dim 0 the tensors of all ranks of ``group``, in rank order; every rank
    gets the whole. Rank ``r`` passes ``counts[r]`` rows (``counts`` identical on every rank, e.g.
    from :func:`exchange_status`); the other dimensions and the dtype must agree. Rows are padded
    to ``max(counts)`` for the collective. ``group=None``: returns ``t``."""
    if group is None:
        return t
    dist = _dist()
    rank, world = rank_and_world(group)
    counts = [int(c) for c in counts]
    if len(counts) != world or t.shape[0] != counts[rank]:
        raise ValueError(f"all_gather_rows: rank {rank} has {t.shape[0]} rows but counts = "
                         f"{counts} for {world} ranks")
    m = max(counts)
    dev = _comm_device(group, t)
    buf = torch.zeros((m,) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
    buf[:counts[rank]] = t.detach()
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def _describe(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"[:500]


_MSG_BYTES = 512


def _gather_messages(group: Any, error: Optional[BaseException], world: int,
                     dev: torch.device) -> List[str]:
    """The error messages of all ranks ("" for none), as a tensor all-gather of fixed-size UTF-8
    buffers on ``dev`` (no pickling, no dependence on the current CUDA device)."""
    dist = _dist()
    raw = ("" if error is None else _describe(error)).encode("utf-8")[:_MSG_BYTES]
    mine = torch.zeros(_MSG_BYTES, dtype=torch.uint8)
    if raw:
        mine[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    mine = mine.to(dev)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [bytes(p.cpu().tolist()).rstrip(b"\0").decode("utf-8", errors="replace")
            for p in parts]


def exchange_status(group: Any, error: Optional[BaseException], values: Sequence[float] = (),
                    where: str = "", device: Optional[torch.device] = None) -> Tensor:
    """Collective status exchange: every rank of ``group`` must call it.

    Each rank contributes ``[failed, *values]`` (float64). If any rank failed, every rank raises:
    the failing rank re-raises ``error``, the others raise :class:`RankFailure` naming the failed
    ranks and their messages. Otherwise returns the gathered values, shape ``(W, len(values))``
    (row ``r`` from rank ``r`` of the group). With ``group=None``: re-raises ``error`` if given,
    else returns ``values`` as one row. ``device``: where an NCCL group's exchange runs (e.g. the
    operator's GPU; default the current GPU). Every rank must pass the same number of
    ``values``.
    """
    if group is None:
        if error is not None:
            raise error
        return torch.tensor([list(values)], dtype=torch.float64)
    dist = _dist()
    rank, world = rank_and_world(group)
    dev = _comm_device(group, None, device)
    mine = torch.tensor([1.0 if error is not None else 0.0] + [float(v) for v in values],
                        dtype=torch.float64, device=dev)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).cpu()
    if bool((table[:, 0] > 0).any()):
        messages = _gather_messages(group, error, world, dev)
        failed = {r: m for r, m in enumerate(messages) if table[r, 0] > 0}
        if error is not None:
            raise error
        at = f" {where}" if where else ""
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed.items())
        raise RankFailure(f"rank(s) {sorted(failed)} of {world} failed{at} ({detail}); stopping "
                          f"rank {rank} too", failed)
    return table[:, 1:]


def agree_all(group: Any, flag: bool, device: Optional[torch.device] = None) -> bool:
    """True on every rank iff ``flag`` is True on every rank of ``group`` (``flag`` itself for
    ``group=None``). The solvers run redundantly on every rank and decide to stop from floating
    point (converged Ritz pairs, an SLQ breakdown); ranks that round differently (another
    LAPACK thread count, another CPU) could decide differently and then wait in different
    collectives. Agreeing on the decision keeps their control flow identical."""
    if group is None:
        return bool(flag)
    dist = _dist()
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(group, None, device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(int(t.item()) == 1)


def _shown(value: float, like: Any, choices: Optional[Sequence[str]]) -> str:
    """A rank's exchanged ``value`` as the caller wrote it: a choice by name, a flag as
    True/False, an integer without a decimal point."""
    if choices is not None and float(value).is_integer() and 0 <= int(value) < len(choices):
        return repr(choices[int(value)])
    if isinstance(like, bool):
        return str(bool(value))
    if isinstance(like, int) and float(value).is_integer():
        return str(int(value))
    return f"{value:g}"


def agree_arguments(group: Any, owner: str, values: Mapping[str, Any],
                    device: Optional[torch.device] = None,
                    choices: Optional[Mapping[str, Sequence[str]]] = None) -> None:
    """Raise on every rank of ``group`` when the ranks pass different ``values`` (the arguments
    of a solver call, as numbers: a rank with another ``k`` or ``block_size`` would make other
    collectives, and every rank would wait in a different one until the group's timeout). One
    small collective; a no-op for ``group=None``. The error names the first argument that
    differs and each rank's value (``choices[name]`` maps an index back to its name)."""
    if group is None:
        return
    table = exchange_status(group, None, [float(v) for v in values.values()],
                            "checking the arguments", device)
    choices = choices or {}
    for col, (name, mine) in enumerate(values.items()):
        if bool((table[:, col] != table[0, col]).any()):
            got = ", ".join(f"rank {r}: {_shown(v, mine, choices.get(name))}"
                            for r, v in enumerate(table[:, col].tolist()))
            raise ValueError(f"{owner}: the ranks pass different values of {name} ({got}); "
                             f"every rank must make the same call")


# dtype codes of the replica check (a product all-reduced between ranks of different dtypes is
# garbage or a crash)
_DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}


#: Entries per chunk of the checksum's position weights (bounds its temporary memory).
_CHECKSUM_CHUNK = 1 << 22
_MINSTD = 2147483647   # the modulus 2^31 - 1 of the weights' hash (a prime)


def _position_weights(start: int, n: int, salt: int, device: torch.device) -> Tensor:
    """Fixed pseudo-random weights in ``(-1, 1)`` of the flat positions ``start .. start+n-1``
    of tensor number ``salt``: a Lehmer-style hash of the position, in int64 without overflow
    (positions below 2^31 get distinct weights), the same on every device."""
    j = torch.arange(start, start + n, dtype=torch.int64, device=device) % _MINSTD
    h = (j * 16807 + (salt * 40503 + 12345) % _MINSTD) % _MINSTD
    h = (h * 48271) % _MINSTD
    return h.to(torch.float64) * (2.0 / _MINSTD) - 1.0


def parameter_checksum(params: Sequence[Tensor]) -> Tensor:
    """A float64 checksum of parameter values, compared across ranks to catch replicas that
    differ: ``sum_i <w_i, p_i> + |p_i|`` with fixed pseudo-random weights ``w_i`` of each
    entry's position and the tensor's number ``i``. Position-sensitive: entries permuted
    within a tensor, or tensors of one shape swapped, change it (sums and norms alone do
    not)."""
    f64 = torch.float64
    total = torch.zeros((), dtype=f64)
    with torch.no_grad():
        for i, p in enumerate(params):
            flat = p.detach().reshape(-1)
            term = torch.linalg.vector_norm(flat, dtype=f64)
            for s in range(0, flat.numel(), _CHECKSUM_CHUNK):
                part = flat[s:s + _CHECKSUM_CHUNK].to(f64)
                term = term + (part * _position_weights(s, part.numel(), i + 1,
                                                        part.device)).sum()
            total += term.cpu()
    return total


def check_same_parameters(checksums: Tensor, owner: str) -> None:
    """Raise on every rank when the ranks' parameter checksums (one per rank) differ."""
    if not bool(((checksums - checksums[0]).abs() <= 1e-9 * (checksums[0].abs() + 1.0)).all()):
        raise ValueError(f"{owner}: the model parameters differ between ranks (checksums "
                         f"{[f'{v:.12g}' for v in checksums.tolist()]}); seed the model "
                         f"identically or broadcast rank 0's parameters (DDP does this at "
                         f"construction)")


def _replica_table(group: Any, params: Callable[[], Sequence[Tensor]], X: Tensor, d: int,
                   dtype: torch.dtype, device: torch.device) -> Tensor:
    """Gather ``(d, k, dtype codes, parameter checksum, |X|, 4 partial sums of X)`` of every
    rank (a failure on any rank, also in ``params()``, raises on all)."""
    f64 = torch.float64
    error: Optional[BaseException] = None
    values = [0.0] * 9       # the same length on every rank, failed or not
    try:
        with torch.no_grad():
            stats = [parameter_checksum(params()),
                     torch.linalg.vector_norm(X, dtype=f64).cpu()]
            # column blocks: no copy of a non-contiguous X; 4 sums make directions that
            # differ (e.g. independent random ones) very unlikely to look alike
            stats += [c.sum(dtype=f64).cpu() for c in torch.tensor_split(X, 4, dim=1)]
            stats = torch.stack(stats).cpu().tolist()
        values = [float(d), float(X.shape[0]),
                  float(10 * _DTYPE_CODES.get(dtype, 9) + _DTYPE_CODES.get(X.dtype, 9))] + stats
    except Exception as exc:  # noqa: BLE001 - every rank raises in exchange_status
        error = exc
    return exchange_status(group, error, values, "checking the replicas", device)


def sync_replica_inputs(X: Tensor, group: Any, params: Callable[[], Sequence[Tensor]], d: int,
                        dtype: torch.dtype, device: torch.device, owner: str,
                        warn: bool = True) -> Tuple[Tensor, bool]:
    """Check that every rank has the same parameters and multiplies the same directions ``X``.

    ``params()`` returns the parameter tensors (called inside the guarded region, so a failure
    there raises on every rank). One tiny collective (:func:`_replica_table`). Different parameter counts or values, numbers
    of directions or dtypes are an error on every rank; so are directions that differ by more
    than rounding (a ``v0`` or ``seed`` that differs per rank: the solvers' state would then
    differ between the ranks and their control flow diverge). Directions that differ only by
    rounding (a nondeterministic kernel upstream) are replaced by rank 0's, so the reduced
    product is a product of one set of directions (logged as a warning when ``warn``).
    Returns ``(X, replaced)``."""
    table = _replica_table(group, params, X, d, dtype, device)
    rank, world = rank_and_world(group)
    for col, what in ((0, "parameter counts"), (1, "numbers of directions"),
                      (2, "dtypes (codes)")):
        if bool((table[:, col] != table[0, col]).any()):
            sizes = ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(table[:, col].tolist()))
            raise ValueError(f"{owner}: the ranks have different {what} in a product "
                             f"({sizes}); every rank must hold the same model and make the "
                             f"same products (same solver calls with the same arguments)")
    check_same_parameters(table[:, 3], owner)
    sums = table[:, 4:]
    if not bool(torch.isfinite(sums).all()):
        bad = [r for r in range(world) if not bool(torch.isfinite(sums[r]).all())]
        raise FloatingPointError(f"{owner}: the input directions contain NaN/Inf on rank(s) "
                                 f"{bad}")
    scale = float(sums[0, 0])
    deviation = (sums - sums[0]).abs().max(dim=1).values          # per rank, vs rank 0
    if bool((deviation <= 1e-10 * scale).all()):
        return X, False        # identical up to the summation order of the checksums
    if not bool((deviation <= 1e-3 * scale).all()):
        far = {r: float(deviation[r]) / max(scale, 1e-300) for r in range(world)
               if not float(deviation[r]) <= 1e-3 * scale}
        raise ValueError(
            f"{owner}: the ranks multiply different directions (relative difference from "
            f"rank 0's: {', '.join(f'rank {r}: {v:.3g}' for r, v in far.items())}); every "
            f"rank must make the same products - pass the same seed and the same v0 on "
            f"every rank (compute a v0 on one rank and broadcast it)")
    X = X.contiguous().clone()
    broadcast_(X, group, src=0)
    if warn:
        log.warning("%s: the input directions differ between ranks by rounding (rank %d of %d, "
                    "relative %.2g); using rank 0's", owner, rank, world,
                    float(deviation.max()) / max(scale, 1e-300))
    return X, True


@contextlib.contextmanager
def collective_errors(group: Any, where: str = "",
                      device: Optional[torch.device] = None) -> Iterator[None]:
    """Run a block of local work; on leaving it all ranks of ``group`` agree whether any rank
    failed and, if so, all raise (see :func:`exchange_status`). Every rank must enter it."""
    error: Optional[BaseException] = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - propagated to every rank below
        if group is None:
            raise
        error = exc
    exchange_status(group, error, (), where, device)


# ------------------------------------------------------------------------------------------------
# sample-sharded state of the distributed gradient-covariance SVD
# ------------------------------------------------------------------------------------------------


class SampleShards:
    """The rows of a matrix sharded over the ranks of a process group, one row per sample, and
    the collectives one call of :func:`landscape_ext.gradient_covariance_svd` makes on them.

    Rank ``r`` holds ``counts[r]`` samples: rows ``offset .. offset + counts[r]`` of the global
    matrix (ranks in order). ``group=None`` (one process): every method is the single-process
    operation (no communication, errors raised directly). Local work that can fail (a data pass,
    a probe) runs through :meth:`run_local`, which exchanges a failure status right after it, so
    a rank that raises makes every rank raise (the others :class:`RankFailure`) before the next
    collective instead of leaving them waiting in it.

    Parameters
    ----------
    group : torch.distributed group or None
    owner : str
        Names the caller in error messages.
    """

    def __init__(self, group: Any, owner: str):
        self.group = group
        self.owner = owner
        self.rank, self.world = rank_and_world(group)
        self.counts: Optional[List[int]] = None
        self.device: Optional[torch.device] = None   # where an NCCL group's status exchanges run

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def run_local(self, where: str, fn: Any, *args: Any, report: Any = None, n_report: int = 0,
                  **kwargs: Any) -> Tuple[Any, Tensor]:
        """Run ``fn(*args, **kwargs)`` here, then the status exchange (every rank must call this
        at the same point). ``report(out)`` gives ``n_report`` floats exchanged with the status.
        Returns ``(out, table)``: ``table`` is ``(W, n_report)``, row ``r`` from rank ``r``."""
        error: Optional[BaseException] = None
        out: Any = None
        values: Sequence[float] = ()
        try:
            out = fn(*args, **kwargs)
            if report is not None:
                values = [float(v) for v in report(out)]
                if len(values) != n_report:
                    raise RuntimeError(f"{self.owner}: internal: {len(values)} status values, "
                                       f"{n_report} expected")
        except Exception as exc:  # noqa: BLE001 - every rank raises in exchange_status
            if self.group is None:
                raise
            error = exc
            values = [0.0] * n_report
        table = exchange_status(self.group, error, values, where, self.device)
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
        return all_reduce_sum_(t, self.group)

    def center(self, X: Tensor, centered: bool) -> Tensor:
        """Subtract from the row-sharded ``X`` its column mean over the samples of all ranks
        (``X`` unchanged unless ``centered``)."""
        if not centered:
            return X
        if self.group is None:
            return X - X.mean(0, keepdim=True)
        mean = self.sum_(X.sum(0, keepdim=True)) / self.n_total
        return X - mean

    def orthonormal_basis(self, Y: Tensor) -> Tensor:
        """Orthonormal basis ``Q`` (row-sharded like ``Y``, ``min(n, l)`` columns) of the range of
        the row-sharded ``Y (n, l)``. Distributed: TSQR (Demmel et al. 2012) - local Householder
        QR ``Y_r = Q_r R_r``, all-gather of the ``R_r``, QR of their stack ``= Q_s R``, ``Q`` on
        rank ``r`` = ``Q_r Q_s[block r]``: orthonormal to machine precision for any
        conditioning or rank (unlike CholeskyQR on ``Y^T Y``). Every rank factors the same
        stack."""
        if self.group is None:
            return torch.linalg.qr(Y, mode="reduced")[0]
        assert self.counts is not None
        l = Y.shape[1]
        Q_local, R_local = torch.linalg.qr(Y, mode="reduced")      # (n_r, c_r), (c_r, l)
        r_rows = [min(c, l) for c in self.counts]
        stack = all_gather_rows(R_local, r_rows, self.group)       # (sum c_r, l)
        Q_stack, _ = torch.linalg.qr(stack, mode="reduced")
        start = sum(r_rows[:self.rank])
        return Q_local @ Q_stack[start:start + r_rows[self.rank]]

    def gather_rows(self, t: Tensor) -> Tensor:
        """The row-sharded ``t`` whole on every rank."""
        if self.group is None:
            return t
        assert self.counts is not None
        return all_gather_rows(t, self.counts, self.group)

    def local_rows(self, t: Tensor) -> Tensor:
        """This rank's rows of a global ``(n, ...)`` tensor."""
        if self.group is None:
            return t
        return t[self.offset:self.offset + self.n_local]
