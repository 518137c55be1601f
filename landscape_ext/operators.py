r"""Curvature operators: Hessian and Gauss-Newton products of a model + loss over data.

An operator is a symmetric ``(d, d)`` matrix known only through products. All operators here
share one protocol (:class:`CurvatureOperator`):

* ``op.shape == (d, d)``, ``op.dtype``, ``op.device``, ``op.n_matvecs`` (columns multiplied so far)
* ``op @ V`` / ``op.matmat(V)`` for ``V`` of shape ``(d,)`` or ``(d, k)``
* ``op.apply_rows(X)`` for ``X`` of shape ``(k, d)`` (the layout the Krylov solvers use:
  vectors as rows), returning ``(k, d)``
* ``op.to_scipy()`` -> :class:`scipy.sparse.linalg.LinearOperator`

:class:`HessianOperator` and :class:`GGNOperator` wrap a model; :func:`as_operator` wraps a dense
symmetric matrix, a callable or any object with ``shape`` and ``matmat``, so the algorithms run
on matrices with known spectra too.

Conventions of the model operators
----------------------------------
* ``loss_fn(outputs, targets)`` returns the **mean** loss of the batch (a scalar tensor; a
  non-scalar loss is an error). Products are the mean over all samples: batch ``b`` of ``n_b``
  samples (the first dimension of its targets) enters with weight ``n_b / N``.
* The parameters are flattened in ``model.named_parameters()`` order (restricted to ``params``
  when given); :meth:`ModelOperator.unflatten` / :meth:`ModelOperator.flatten` convert.
* The model is never changed: products run through :func:`torch.func.functional_call` on
  detached copies of the parameters, and :func:`model_state_guard` restores the ``training``
  flags, ``requires_grad``, buffers (BatchNorm running statistics) and BatchNorm
  ``track_running_stats`` on return, also after an exception.
* Dropout is off (modules in eval mode). BatchNorm runs in eval mode (running statistics) by
  default; ``batch_norm="train"`` uses batch statistics without updating the running ones.
* ``process_group=`` makes the model operators data parallel over :mod:`torch.distributed`
  (see :mod:`landscape_ext.distributed`).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import distributed as _dist
from . import ops as _ops

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "CallableOperator",
    "ModelOperator",
    "HessianOperator",
    "GGNOperator",
    "as_operator",
    "model_state_guard",
    "HVP_MODES",
    "FUSED_MLP_MODE",
]

log = logging.getLogger(__name__)

HVP_MODES = ("auto", "forward-over-reverse", "double-backward")
# dtype codes of the replica check (a product all-reduced between ranks of different dtypes is
# garbage or a crash)
_DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


# ------------------------------------------------------------------------------------------------
# protocol
# ------------------------------------------------------------------------------------------------


class CurvatureOperator:
    """A symmetric ``(d, d)`` linear operator known through products.

    Subclasses implement :meth:`_apply_rows`; the base class checks shapes, counts products and
    provides ``@``, :meth:`matmat`, :meth:`matvec` and :meth:`to_scipy`.

    Attributes
    ----------
    shape : tuple of int
        ``(d, d)``.
    dtype : torch.dtype
        dtype of the products (what :meth:`apply_rows` returns).
    device : torch.device
    n_matvecs : int
        Number of vectors multiplied so far (a ``(d, k)`` product counts ``k``).
    mode_used : str or None
        For model operators, the HVP mode that ran last (``None`` before the first product).
    """

    shape: Tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    mode_used: Optional[str] = None

    def __init__(self, d: int, dtype: torch.dtype, device: Union[str, torch.device]):
        self.shape = (int(d), int(d))
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_matvecs = 0

    # -- to implement ------------------------------------------------------------------------
    def _apply_rows(self, X: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return self.shape[0]

    def apply_rows(self, X: Tensor) -> Tensor:
        """Products with the rows of ``X``: returns ``X @ A`` (``= (A X^T)^T``, ``A`` symmetric).

        Shapes: ``X (k, d)`` -> ``(k, d)``. ``X`` is converted to ``self.dtype``/``device``.
        """
        if X.dim() != 2 or X.shape[1] != self.d:
            raise ValueError(f"{type(self).__name__}: expected rows of shape (k, {self.d}), "
                             f"got {tuple(X.shape)}")
        if X.shape[0] == 0:
            return X.new_zeros((0, self.d), dtype=self.dtype, device=self.device)
        X = X.to(device=self.device, dtype=self.dtype)
        out = self._apply_rows(X)
        self.n_matvecs += X.shape[0]
        return out

    def matmat(self, V: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(d, k)`` (or ``(d,)``) — all columns in one batched
        product."""
        if not isinstance(V, Tensor):
            V = torch.as_tensor(np.asarray(V))
        if V.dim() == 1 and V.shape[0] == self.d:
            return self.apply_rows(V.unsqueeze(0))[0]
        if V.dim() != 2 or V.shape[0] != self.d:
            raise ValueError(f"{type(self).__name__}: expected V of shape ({self.d},) or "
                             f"({self.d}, k), got {tuple(V.shape)}")
        return self.apply_rows(V.T).T

    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for ``v`` of shape ``(d,)``."""
        return self.matmat(v.reshape(-1))

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.matmat(V)

    def to_scipy(self, dtype: Any = np.float64):
        """A :class:`scipy.sparse.linalg.LinearOperator` over this operator (numpy in and out;
        symmetric, so ``rmatvec == matvec``)."""
        from scipy.sparse.linalg import LinearOperator

        def mm(X):
            X = np.asarray(X)
            one = X.ndim == 1
            T = torch.from_numpy(np.ascontiguousarray(X.reshape(self.d, -1)))
            Y = self.apply_rows(T.T).T
            Y = Y.detach().to("cpu", torch.float64).numpy().astype(dtype, copy=False)
            return Y.reshape(-1) if one else Y

        return LinearOperator(self.shape, matvec=mm, matmat=mm, rmatvec=mm, rmatmat=mm,
                              dtype=np.dtype(dtype))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(d={self.d}, dtype={self.dtype}, device={self.device}, "
                f"n_matvecs={self.n_matvecs})")


class DenseOperator(CurvatureOperator):
    """A dense symmetric matrix as an operator (tests, small problems).

    Parameters
    ----------
    A : Tensor
        ``(d, d)``, symmetric (checked to ``1e-6`` relative to its largest entry).
    """

    def __init__(self, A: Tensor):
        if not isinstance(A, Tensor):
            A = torch.as_tensor(np.asarray(A))
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"DenseOperator: expected a square matrix, got shape {tuple(A.shape)}")
        if not A.is_floating_point():
            A = A.double()
        scale = A.abs().max().item() if A.numel() else 0.0
        asym = (A - A.T).abs().max().item() if A.numel() else 0.0
        if asym > 1e-6 * max(scale, 1e-300):
            raise ValueError(f"DenseOperator: matrix is not symmetric (max |A - A^T| = {asym:.3g}, "
                             f"max |A| = {scale:.3g})")
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A = A

    def _apply_rows(self, X: Tensor) -> Tensor:
        return X @ self.A


class CallableOperator(CurvatureOperator):
    """An operator from a function ``fn(V (d, k)) -> (d, k)`` (``rows=False``) or
    ``fn(X (k, d)) -> (k, d)`` (``rows=True``). The function must be symmetric-linear."""

    def __init__(self, fn: Callable[[Tensor], Tensor], d: int, dtype: torch.dtype = torch.float64,
                 device: Union[str, torch.device] = "cpu", rows: bool = False):
        super().__init__(d, dtype, device)
        self.fn = fn
        self.rows = rows

    def _apply_rows(self, X: Tensor) -> Tensor:
        if self.rows:
            Y = self.fn(X)
        else:
            Y = self.fn(X.T)
            if isinstance(Y, Tensor):
                Y = Y.T
            else:
                Y = np.asarray(Y).T
        Y = torch.as_tensor(Y).to(device=self.device, dtype=self.dtype)
        if Y.shape != X.shape:
            raise ValueError(f"CallableOperator: function returned shape {tuple(Y.shape)} for "
                             f"input rows {tuple(X.shape)}")
        return Y


def as_operator(A: Any, dtype: Optional[torch.dtype] = None) -> CurvatureOperator:
    """Wrap ``A`` as a :class:`CurvatureOperator`.

    Accepts a :class:`CurvatureOperator` (returned as is), a dense symmetric ``torch.Tensor`` or
    numpy array, a SciPy ``LinearOperator``, or any object with ``shape`` and ``matmat``
    (torch or numpy in/out).
    """
    if isinstance(A, CurvatureOperator):
        return A
    if isinstance(A, (Tensor, np.ndarray)):
        T = torch.as_tensor(A)
        if dtype is not None:
            T = T.to(dtype)
        return DenseOperator(T)
    shape = getattr(A, "shape", None)
    mm = getattr(A, "matmat", None)
    if shape is not None and mm is not None and len(shape) == 2:
        if shape[0] != shape[1]:
            raise ValueError(f"as_operator: operator must be square, got shape {tuple(shape)}")
        is_scipy = type(A).__module__.startswith("scipy")
        dt = dtype or torch.float64

        def fn(V: Tensor):
            if is_scipy:
                return torch.from_numpy(np.asarray(mm(V.detach().cpu().numpy())))
            try:
                return mm(V)
            except (TypeError, AttributeError):
                return torch.from_numpy(np.asarray(mm(V.detach().cpu().numpy())))

        return CallableOperator(fn, int(shape[0]), dt, "cpu", rows=False)
    raise TypeError(f"as_operator: cannot use {type(A).__name__} as an operator; pass a "
                    f"CurvatureOperator, a square tensor/array or an object with shape and matmat")


# ------------------------------------------------------------------------------------------------
# model state guard
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def model_state_guard(model: nn.Module, batch_norm: Optional[str] = None) -> Iterator[nn.Module]:
    """Snapshot the model's mutable state and restore it on exit, also after an exception.

    Saved and restored: every module's ``training`` flag, every parameter's ``requires_grad``,
    every buffer's values (BatchNorm running statistics and ``num_batches_tracked``) and
    BatchNorm ``track_running_stats``. Inside the block the model is in eval mode (dropout off);
    with ``batch_norm="train"`` BatchNorm layers use batch statistics with
    ``track_running_stats=False`` so their running statistics are not updated.

    Parameters
    ----------
    model : nn.Module
    batch_norm : {"eval", "train", None}
        ``None`` leaves the modes as they are (snapshot/restore only).
    """
    training = [(m, m.training) for m in model.modules()]
    req = [(p, p.requires_grad) for p in model.parameters()]
    bufs = [(b, b.detach().clone()) for b in model.buffers()]
    bn_track = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _BN_TYPES)]
    try:
        if batch_norm is not None:
            model.eval()
            if batch_norm == "train":
                for m, _ in bn_track:
                    m.train()
                    m.track_running_stats = False
        yield model
    finally:
        for m, flag in training:
            m.training = flag
        for m, flag in bn_track:
            m.track_running_stats = flag
        for p, flag in req:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in bufs:
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)


# ------------------------------------------------------------------------------------------------
# data helpers
# ------------------------------------------------------------------------------------------------


def _is_single_batch(data: Any) -> bool:
    """One ``(inputs, targets)`` batch: a pair whose second element is a tensor."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def _tensors_of(x: Any) -> List[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        return [v for v in x.values() if isinstance(v, Tensor)]
    if isinstance(x, (tuple, list)):
        return [v for v in x if isinstance(v, Tensor)]
    return []


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device) if x.device != device else x
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


class _Fingerprint:
    """Order-invariant checksum of all samples seen in one pass over the data.

    Each sample of each tensor is reduced to ``c = <x, w>`` with a fixed pseudo-random ``w``;
    a pass records ``(N, sum c, sum c^2, sum sin c)``. Reordering (a shuffled loader) leaves it
    unchanged; augmentation or different data change it.
    """

    def __init__(self):
        self._w: Dict[Tuple[int, str], Tensor] = {}
        self.reset()

    def reset(self):
        self.n = 0
        self.sums: Optional[Tensor] = None

    def _weights(self, f: int, device: torch.device) -> Tensor:
        key = (f, str(device))
        if key not in self._w:
            g = torch.Generator().manual_seed(1234567 + f)
            self._w[key] = torch.rand(f, generator=g, dtype=torch.float64).add_(0.5).to(device)
        return self._w[key]

    def update(self, tensors: Sequence[Tensor]):
        parts = []
        for t in tensors:
            if t.dim() == 0:
                t = t.reshape(1)
            x = t.detach().reshape(t.shape[0], -1).to(torch.float64)
            c = x @ self._weights(x.shape[1], x.device)
            parts.append(torch.stack([c.sum(), (c * c).sum(), torch.sin(c).sum()]))
            self.n += t.shape[0]
        s = torch.cat(parts).cpu()
        self.sums = s if self.sums is None else (self.sums + s if self.sums.shape == s.shape
                                                 else torch.cat([self.sums, s]))

    def matches(self, other: "_Fingerprint") -> bool:
        if self.n != other.n or self.sums is None or other.sums is None:
            return self.n == other.n and self.sums is None and other.sums is None
        if self.sums.shape != other.sums.shape:
            return False
        tol = 1e-9 * (self.sums.abs() + other.sums.abs() + 1.0)
        return bool(((self.sums - other.sums).abs() <= tol).all())


def _state_key(tensors: Iterable[Tensor]) -> Tuple[Any, ...]:
    """Cache key of parameter or buffer values: identity, version counter, storage and a float64
    sum per tensor. The version counter alone misses ``p.data = t`` (new storage) and
    ``p.data.copy_(t)`` / ``p.data.add_(...)`` (``.data`` has its own counter), both common in
    hand-written update loops; the sums catch those (one reduction per tensor, negligible
    beside a product)."""
    ts = list(tensors)
    if not ts:
        return ()
    with torch.no_grad():
        sums = torch.stack([t.detach().sum(dtype=torch.float64) for t in ts]).cpu().tolist()
    return tuple((id(t), t._version, t.data_ptr(), s) for t, s in zip(ts, sums))


def _check_finite(t: Tensor, what: str, where: str, owner: str):
    if not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise FloatingPointError(f"{owner}: {what} is not finite ({n_bad} NaN/Inf value(s)) "
                                 f"{where}")


# ------------------------------------------------------------------------------------------------
# model operators
# ------------------------------------------------------------------------------------------------


def select_parameter_names(model: nn.Module, params: Optional[Iterable[Union[str, Tensor]]],
                           owner: str, ddp_prefix: bool = False) -> List[str]:
    """Names of the selected parameters in ``model.named_parameters()`` order.

    ``params``: names or parameters of ``model`` (``None``: all with ``requires_grad``). With
    ``ddp_prefix`` (``model`` was unwrapped from ``DistributedDataParallel``), names of the
    wrapper's parameters (``module.<name>``) are accepted too. Unknown entries and an empty
    selection are errors naming ``owner``."""
    named = list(model.named_parameters())
    if params is None:
        sel = [n for n, p in named if p.requires_grad]
    else:
        by_id = {id(p): n for n, p in named}
        names = {n for n, _ in named}
        chosen = set()
        for p in params:
            if isinstance(p, str) and ddp_prefix and p.startswith("module.") and p not in names:
                p = p[len("module."):]
            if isinstance(p, str):
                if p not in names:
                    raise ValueError(f"{owner}: no parameter named {p!r} in the model")
                chosen.add(p)
            elif isinstance(p, Tensor) and id(p) in by_id:
                chosen.add(by_id[id(p)])
            else:
                raise ValueError(f"{owner}: params must be parameter names or parameters of "
                                 f"the model, got {type(p).__name__}")
        sel = [n for n, _ in named if n in chosen]
    if not sel:
        raise ValueError(f"{owner}: the model has no trainable parameters (none with "
                         f"requires_grad=True{' among params' if params is not None else ''})")
    return sel


class ModelOperator(CurvatureOperator):
    """Common machinery of :class:`HessianOperator` and :class:`GGNOperator` (see those)."""

    _kind = "model"

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], data: Any,
                 params: Optional[Iterable[Union[str, Tensor]]] = None, *, mode: str = "auto",
                 batch_norm: str = "eval", accumulate_dtype: Optional[torch.dtype] = None,
                 chunk_size: Optional[int] = None, check_data: bool = True,
                 cache_graph: Union[bool, str] = "auto", process_group: Any = None):
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: model must be an nn.Module, got {type(model).__name__}")
        # a DDP-wrapped model: differentiate its module (DDP's forward hooks are for training)
        # and reduce over DDP's group unless another one is given
        unwrapped_ddp = False
        if isinstance(model, nn.parallel.DistributedDataParallel):
            if process_group is None:
                process_group = model.process_group
            model = model.module
            unwrapped_ddp = True
        self.process_group = _dist.resolve_group(process_group, name)
        self.n_input_syncs = 0
        if mode not in HVP_MODES:
            raise ValueError(f"{name}: mode must be one of {HVP_MODES}, got {mode!r}")
        if batch_norm not in ("eval", "train"):
            raise ValueError(f"{name}: batch_norm must be 'eval' or 'train', got {batch_norm!r}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode
        self.batch_norm = batch_norm
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.check_data = bool(check_data)

        named = list(model.named_parameters())
        sel = select_parameter_names(model, params, name, ddp_prefix=unwrapped_ddp)
        pdict = dict(named)
        self.param_names: List[str] = sel
        self.param_shapes: List[torch.Size] = [pdict[n].shape for n in sel]
        self.param_sizes: List[int] = [pdict[n].numel() for n in sel]
        dtypes = {pdict[n].dtype for n in sel}
        devices = {pdict[n].device for n in sel}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"{name}: selected parameters must share one dtype and device, got "
                             f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        self.param_dtype = dtypes.pop()
        self.accumulate_dtype = accumulate_dtype
        out_dtype = accumulate_dtype or self.param_dtype
        super().__init__(sum(self.param_sizes), out_dtype, devices.pop())

        # data
        if _is_single_batch(data):
            self._batches: Optional[List[Any]] = [tuple(data)]
            self._loader = None
        else:
            if not hasattr(data, "__iter__"):
                raise TypeError(f"{name}: data must be one (inputs, targets) batch or an iterable "
                                f"of batches, got {type(data).__name__}")
            if iter(data) is data:
                raise TypeError(f"{name}: data is a one-shot iterator; pass a re-iterable (a "
                                f"DataLoader or a list of batches)")
            self._batches = list(data) if isinstance(data, (list, tuple)) else None
            self._loader = data
        self.single_batch = self._batches is not None and len(self._batches) == 1
        # the cache holds one batch's graph: only meaningful for a single batch
        self.cache_graph = self.single_batch and (cache_graph == "auto" or bool(cache_graph))
        self._fp_ref: Optional[_Fingerprint] = None
        self._fp = _Fingerprint()
        self._graph_cache: Optional[Tuple[Any, ...]] = None
        self.n_samples: Optional[int] = None
        self.mode_used: Optional[str] = None
        self._fwd_broken = False
        # auto: below this many directions a cached first-order graph + double backward beats
        # vmapped forward-over-reverse (bench/bench_spectrum.py, HVP section)
        self.auto_double_backward_below = 4

    # -- layout ---------------------------------------------------------------------------------
    def flatten(self, tensors: Union[Dict[str, Tensor], Sequence[Tensor]]) -> Tensor:
        """Concatenate per-parameter tensors (dict by name or list in order) into ``(d,)``."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.param_names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: Tensor) -> Dict[str, Tensor]:
        """Split ``(d,)`` (or ``(k, d)``) into a dict of parameter-shaped tensors."""
        lead = v.shape[:-1]
        parts = torch.split(v, self.param_sizes, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.param_names, parts,
                                                           self.param_shapes)}

    def parameters_vector(self) -> Tensor:
        """The selected parameters flattened, ``(d,)`` (a copy)."""
        pd = dict(self.model.named_parameters())
        return self.flatten([pd[n].detach() for n in self.param_names])

    # -- data -----------------------------------------------------------------------------------
    def _iter_batches(self) -> Iterator[Tuple[Any, Tensor]]:
        src = self._batches if self._batches is not None else self._loader
        for i, batch in enumerate(src):
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise ValueError(f"{type(self).__name__}: batch {i} must be (inputs, targets), "
                                 f"got {type(batch).__name__}")
            yield _to_device(batch[0], self.device), _to_device(batch[1], self.device)

    def _call_model(self, pdict: Dict[str, Tensor], inputs: Any) -> Any:
        if isinstance(inputs, dict):
            return functional_call(self.model, pdict, args=(), kwargs=inputs, strict=False)
        if isinstance(inputs, (tuple, list)):
            return functional_call(self.model, pdict, tuple(inputs), strict=False)
        return functional_call(self.model, pdict, (inputs,), strict=False)

    def _base_params(self) -> Dict[str, Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def _loss(self, outputs: Any, targets: Tensor, where: str,
              loss_fn: Optional[Callable[[Any, Tensor], Tensor]] = None) -> Tensor:
        loss = (loss_fn or self.loss_fn)(outputs, targets)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"{type(self).__name__}: loss_fn must return a scalar (the batch "
                             f"mean), got {shape} {where}")
        return loss

    @staticmethod
    def _batch_size(inputs: Any, targets: Tensor) -> int:
        if isinstance(targets, Tensor) and targets.dim() > 0:
            return int(targets.shape[0])
        ts = _tensors_of(inputs)
        return int(ts[0].shape[0]) if ts and ts[0].dim() > 0 else 1

    # -- products -------------------------------------------------------------------------------
    def _apply_rows(self, X: Tensor) -> Tensor:
        X = X.to(self.param_dtype)
        group = self.process_group
        owner = type(self).__name__
        if group is None:
            acc, n_total, n_batches = self._local_sum(X)
            if acc is None or n_total == 0:
                raise ValueError(f"{owner}: data contains no batches")
            self.n_samples = n_total
            # a single batch is returned unscaled (it already is the mean)
            return acc.div_(n_total) if n_batches > 1 else acc

        # data parallel: identical inputs on every rank, local sums, one all-reduce
        X = self._sync_replicas(X)
        try:
            acc, n_local, n_batches = self._local_sum(X)
        except Exception as exc:  # every rank raises, none hangs in the all-reduce
            _dist.exchange_status(group, exc, (0.0,), "in a product", self.device)
            raise
        counts = _dist.exchange_status(group, None, (float(n_local),), "in a product",
                                       self.device)
        n_total = int(round(float(counts.sum())))
        if n_total == 0:
            raise ValueError(f"{owner}: no rank of the process group has data (0 samples)")
        if acc is None:  # this rank holds no samples: it contributes zeros
            acc = X.new_zeros(X.shape, dtype=self.dtype)
        elif n_batches == 1:
            acc.mul_(n_local)
        _dist.all_reduce_sum_(acc, group)
        self.n_samples = n_total
        return acc.div_(n_total)

    def _local_sum(self, X: Tensor) -> Tuple[Optional[Tensor], int, int]:
        """This process's products over its batches: ``(acc, n, n_batches)`` where ``acc`` is
        ``sum_b n_b P_b`` — except for a single batch, where it is ``P_0`` unscaled."""
        acc = None
        n_total = 0
        n_batches = 0
        first_nb = 0
        with model_state_guard(self.model, self.batch_norm):
            self._fp.reset()
            batches = self._iter_batches()
            for i, (inputs, targets) in enumerate(batches):
                where = f"on batch {i}"
                nb = self._batch_size(inputs, targets)
                if self.check_data:
                    self._fp.update(_tensors_of(inputs) + _tensors_of(targets))
                P = self._batch_rows(X, inputs, targets, where)
                _check_finite(P, "the product", where, type(self).__name__)
                P = P.to(self.dtype)
                if acc is None:
                    acc = P if P.data_ptr() != X.data_ptr() else P.clone()
                    first_nb = nb
                else:
                    if n_batches == 1:
                        acc.mul_(first_nb)
                    acc.add_(P, alpha=nb)
                n_batches += 1
                n_total += nb
        if self.check_data and n_batches > 0:
            if self._fp_ref is None:
                self._fp_ref = self._fp
                self._fp = _Fingerprint()
                self._fp._w = self._fp_ref._w
            elif not self._fp.matches(self._fp_ref):
                raise ValueError(
                    f"{type(self).__name__}: the data changed between passes ({self._fp.n} samples "
                    f"now, {self._fp_ref.n} in the first pass, or different values): data "
                    f"augmentation or a random transform makes the operator change from product to "
                    f"product. Use fixed data (no augmentation) or check_data=False.")
        return acc, n_total, n_batches

    def _sync_replicas(self, X: Tensor) -> Tensor:
        """Check that every rank has the same parameters and multiplies the same directions.

        One tiny collective: each rank contributes (d, number of directions, dtype, parameter
        checksum, norm and 4 partial sums of the directions). Different parameter counts or
        values, numbers of directions or dtypes are an error on every rank; so are directions
        that differ by more than rounding (a ``v0`` or ``seed`` that differs per rank: the
        solvers' state would then differ between the ranks and their control flow diverge).
        Directions that differ only by rounding (a nondeterministic kernel upstream) are
        replaced by rank 0's, so the reduced product is a product of one set of directions."""
        owner = type(self).__name__
        group = self.process_group
        f64 = torch.float64
        error: Optional[BaseException] = None
        vals = [0.0] * 9       # the same length on every rank, failed or not
        try:
            pd = dict(self.model.named_parameters())
            with torch.no_grad():
                p_sums = [pd[n].detach().sum(dtype=f64) * (i + 1) +
                          torch.linalg.vector_norm(pd[n].detach(), dtype=f64)
                          for i, n in enumerate(self.param_names)]
                stats = [torch.stack(p_sums).sum(), torch.linalg.vector_norm(X, dtype=f64)]
                # column blocks: no copy of a non-contiguous X; 4 sums make directions that
                # differ (e.g. independent random ones) very unlikely to look alike
                stats += [c.sum(dtype=f64) for c in torch.tensor_split(X, 4, dim=1)]
                stats = torch.stack(stats).cpu().tolist()
            vals = [float(self.d), float(X.shape[0]), float(10 * _DTYPE_CODES.get(self.dtype, 9) +
                                                        _DTYPE_CODES.get(X.dtype, 9))] + stats
        except Exception as exc:  # noqa: BLE001 - every rank raises in exchange_status
            error = exc
        table = _dist.exchange_status(group, error, vals, "checking the replicas", self.device)
        rank, world = _dist.rank_and_world(group)
        for col, what in ((0, "parameter counts"), (1, "numbers of directions"),
                          (2, "dtypes (codes)")):
            if bool((table[:, col] != table[0, col]).any()):
                sizes = ", ".join(f"rank {r}: {int(v)}"
                                  for r, v in enumerate(table[:, col].tolist()))
                raise ValueError(f"{owner}: the ranks have different {what} in a product "
                                 f"({sizes}); every rank must hold the same model and make the "
                                 f"same products (same solver calls with the same arguments)")
        pc = table[:, 3]
        if not bool(((pc - pc[0]).abs() <= 1e-9 * (pc[0].abs() + 1.0)).all()):
            raise ValueError(f"{owner}: the model parameters differ between ranks (checksums "
                             f"{[f'{v:.12g}' for v in pc.tolist()]}); seed the model identically "
                             f"or broadcast rank 0's parameters (DDP does this at construction)")
        xs = table[:, 4:]
        if not bool(torch.isfinite(xs).all()):
            bad = [r for r in range(world) if not bool(torch.isfinite(xs[r]).all())]
            raise FloatingPointError(f"{owner}: the input directions contain NaN/Inf on rank(s) "
                                     f"{bad}")
        scale = float(xs[0, 0])
        dev = (xs - xs[0]).abs().max(dim=1).values          # per rank, vs rank 0
        if bool((dev <= 1e-10 * scale).all()):
            return X        # identical up to the summation order of the checksums
        if not bool((dev <= 1e-3 * scale).all()):
            far = {r: float(dev[r]) / max(scale, 1e-300) for r in range(world)
                   if not float(dev[r]) <= 1e-3 * scale}
            raise ValueError(
                f"{owner}: the ranks multiply different directions (relative difference from "
                f"rank 0's: {', '.join(f'rank {r}: {v:.3g}' for r, v in far.items())}); every "
                f"rank must make the same products - pass the same seed and the same v0 on "
                f"every rank (compute a v0 on one rank and broadcast it)")
        X = X.contiguous().clone()
        _dist.broadcast_(X, group, src=0)
        self.n_input_syncs += 1
        if self.n_input_syncs == 1:
            log.warning("%s: the input directions differ between ranks by rounding (rank %d of "
                        "%d, relative %.2g); using rank 0's", owner, rank, world,
                        float(dev.max()) / max(scale, 1e-300))
        return X

    def _split_rows(self, X: Tensor) -> Dict[str, Tensor]:
        k = X.shape[0]
        parts = torch.split(X, self.param_sizes, dim=1)
        return {n: p.reshape(k, *s) for n, p, s in zip(self.param_names, parts, self.param_shapes)}

    def _join_rows(self, parts: Sequence[Tensor], k: int) -> Tensor:
        return torch.cat([p.reshape(k, -1) for p in parts], dim=1)

    def _chunks(self, k: int) -> List[Tuple[int, int]]:
        c = self.chunk_size or k
        return [(s, min(s + c, k)) for s in range(0, k, c)]

    def _batch_rows(self, X: Tensor, inputs: Any, targets: Tensor, where: str) -> Tensor:
        raise NotImplementedError

    def _run_modes(self, fwd: Callable[[], Tensor], dbl: Callable[[], Tensor], where: str,
                   prefer_dbl: bool = False) -> Tensor:
        """Run the product in ``self.mode``. ``auto`` runs double backward when
        ``prefer_dbl`` (few directions on a cached graph: measured faster on CPU), otherwise
        forward-over-reverse, falling back to double backward for good if forward-mode AD is
        missing or broken for an op of the model."""
        mode = self.mode
        if mode == "auto":
            mode = "double-backward" if (prefer_dbl or self._fwd_broken) else \
                "forward-over-reverse"
        if mode == "double-backward":
            out = dbl()
            self.mode_used = "double-backward"
            return out
        try:
            out = fwd()
            self.mode_used = "forward-over-reverse"
            return out
        except (RuntimeError, NotImplementedError) as exc:
            if self.mode != "auto":
                raise
            # forward-mode AD missing or broken for an op of the model (SDPA attention, custom
            # autograd Functions without jvp, ...): double backward needs none of it.
            try:
                out = dbl()
            except Exception as exc2:
                raise exc2 from exc
            log.warning("%s: forward-over-reverse failed (%s); using double backward",
                        type(self).__name__, str(exc).splitlines()[0][:200])
            self._fwd_broken = True
            self.mode_used = "double-backward"
            return out


def _forward_ad_safe_loss(loss_fn: Any) -> Any:
    """``mse_loss`` has no working forward-over-reverse rule in torch (its double backward
    writes into a ZeroTensor under ``jvp``); the same loss in elementary ops works."""
    F = nn.functional
    red = None
    if isinstance(loss_fn, nn.MSELoss):
        red = loss_fn.reduction
    elif loss_fn is F.mse_loss:
        red = "mean"
    if red == "mean":
        return lambda z, t: (z - t).pow(2).mean()
    if red == "sum":
        return lambda z, t: (z - t).pow(2).sum()
    return loss_fn


#: The fused MLP products of :mod:`landscape_ext.mlp` as an explicit mode of the model operators.
FUSED_MLP_MODE = "fused-mlp"


class _FusedMLPPath:
    """Fast path of the model operators for plain MLPs: the fused Pearlmutter products of
    :mod:`landscape_ext.mlp` (``k`` directions stacked into every GEMM, no autograd).

    Applicable when :func:`~landscape_ext.mlp.mlp_structure` recognises the model
    (``nn.Sequential`` of ``nn.Linear`` and ReLU / exact GELU / Tanh / SiLU, no BatchNorm), the
    loss is cross-entropy (class-index targets, no class weights) or MSE, and each batch's
    inputs are one tensor. ``mode="auto"`` uses it whenever it applies (measured faster than
    both autograd modes for every number of directions, ``bench/bench_spectrum.py``) and falls
    back to the autograd modes for good the first time a batch is outside it;
    ``mode="fused-mlp"`` raises instead. Parameter subsets are supported (the other parameters
    are held fixed). For a single batch the forward pass and first-order backward are kept
    between products while the parameters are unchanged (as ``cache_graph``), so each product
    costs only the R-forward / R-backward sweeps.
    """

    def _fused_init(self, mode: str, cache_graph: Any, curvature: str) -> None:
        from . import mlp as _mlp
        self._fused_curvature = curvature
        self._fused_state: Optional[Tuple[Any, Any]] = None
        self._fused_cacheable = self.single_batch and (cache_graph == "auto" or bool(cache_graph))
        self._fused_structure = None
        self.fused_mlp_reason: Optional[str] = None
        # directions per fused pass when chunk_size is not given: larger passes only grow the
        # (k, B, width) intermediates (digits MLP: 1.7-1.8 gradients per direction for k <= 8,
        # 2.0 for k = 16-32 in one pass)
        self.fused_chunk = 8
        try:
            if not callable(self.loss_fn):
                raise _mlp.NotAnMLP(f"loss_fn {self.loss_fn!r} is not callable")
            self._fused_structure = _mlp.mlp_structure(self.model, strict=True)
            _mlp._loss_config(self.loss_fn, "mean", -100, 0.0)
        except _mlp.NotAnMLP as exc:
            self._fused_structure = None
            self.fused_mlp_reason = str(exc)
        if mode == FUSED_MLP_MODE:
            self.mode = FUSED_MLP_MODE
            if self._fused_structure is None:
                raise ValueError(f"{type(self).__name__}: mode='fused-mlp' is not applicable: "
                                 f"{self.fused_mlp_reason} (use mode='auto')")

    @property
    def fused_mlp(self) -> bool:
        """Whether products run (or will run) through the fused MLP path."""
        return self._fused_structure is not None and self.mode in ("auto", FUSED_MLP_MODE)

    def _fused_key(self, inputs: Any, targets: Tensor) -> Any:
        return (_state_key(self.model.parameters())
                + (id(inputs), getattr(inputs, "_version", None),
                   id(targets), getattr(targets, "_version", None)))

    def _fused_rows(self, X: Tensor, inputs: Any, targets: Tensor,
                    where: str) -> Optional[Tensor]:
        """The product by the fused path, or None when it does not apply (auto)."""
        if not self.fused_mlp:
            return None
        from . import mlp as _mlp
        name = type(self).__name__
        try:
            state = None
            key = self._fused_key(inputs, targets) if self._fused_cacheable else None
            if key is not None and self._fused_state is not None and \
                    self._fused_state[0] == key:
                state = self._fused_state[1]
            if state is None:
                self._fused_state = None
                base = self._base_params()
                state = _mlp.MLPCurvature(
                    self._fused_structure, {n: base[n] for n in self.param_names}, inputs,
                    targets, self.loss_fn, self._fused_curvature, check_finite=False)
                _check_finite(self._loss(state.f, targets, where).detach(), "the loss", where,
                              name)
                if key is not None:
                    self._fused_state = (key, state)
            out = state.apply_rows(X, self.chunk_size or self.fused_chunk)
        except _mlp.NotAnMLP as exc:
            self._fused_state = None
            if self.mode == FUSED_MLP_MODE:
                raise ValueError(f"{name}: mode='fused-mlp' is not applicable {where}: "
                                 f"{exc}") from exc
            self._fused_structure = None
            self.fused_mlp_reason = str(exc)
            log.debug("%s: fused MLP path not applicable (%s); using autograd", name, exc)
            return None
        self.mode_used = FUSED_MLP_MODE
        return out


class HessianOperator(_FusedMLPPath, ModelOperator):
    r"""Exact Hessian of the mean loss over the data, :math:`H = \nabla^2_\theta
    \frac{1}{N}\sum_b n_b\, \ell_b(\theta)`, as a batched linear operator.

    Parameters
    ----------
    model : nn.Module
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar`` — the **mean** loss of the batch.
    data : (inputs, targets) or iterable of batches
        One batch, or a re-iterable of batches (a DataLoader, a list). ``inputs`` may be a tensor,
        a tuple (``model(*inputs)``) or a dict (``model(**inputs)``).
    params : iterable of str or Parameter, optional
        Subset of parameters (default: all with ``requires_grad``).
    mode : {"auto", "forward-over-reverse", "double-backward", "fused-mlp"}
        ``forward-over-reverse``: ``vmap(jvp(grad))`` over the directions (chunked by
        ``chunk_size``). ``double-backward``: one forward and first backward per batch with
        ``create_graph``, then ``autograd.grad(..., is_grads_batched=True)`` for the directions
        (chunked). ``fused-mlp``: for plain MLPs (``nn.Sequential`` of ``nn.Linear`` and
        ReLU / GELU / Tanh / SiLU) with cross-entropy or MSE, the fused Pearlmutter products of
        :mod:`landscape_ext.mlp` (all directions in single GEMMs, no autograd; about 1.8
        gradients per direction on the digits MLP against 2.1-3.2 for the autograd modes); a
        ``ValueError`` says why when the model, loss or data are outside it. ``auto``
        (default) uses ``fused-mlp`` whenever it applies; otherwise double backward on the
        cached graph for products of fewer than 4 directions on a single batch (faster there)
        and forward-over-reverse otherwise, falling back to double backward when an op has no
        forward-mode derivative (SDPA attention, custom Functions without ``jvp``);
        ``mode_used`` says which ran last and ``fused_mlp_reason`` why the fused path does not
        apply.
    batch_norm : {"eval", "train"}
        BatchNorm with running statistics (default) or with batch statistics (running statistics
        not updated either way).
    accumulate_dtype : torch.dtype, optional
        Sum the per-batch products in this dtype (e.g. ``torch.float64``); products are returned
        in it.
    chunk_size : int, optional
        At most this many directions per vmapped/batched call (memory bound).
    check_data : bool
        Fingerprint the data on the first pass and raise if a later pass differs
        (augmentation).
    cache_graph : bool or "auto"
        For double backward: keep the first-order graph between products while the parameters
        are unchanged (``auto``: when ``data`` is a single batch). Saves one forward + backward
        per product at the cost of keeping the activations.
    process_group : torch.distributed group, optional
        Data parallel: each rank passes its own shard of the data and the same model; every
        product is the mean over the samples of all ranks (local sums all-reduced, weighted by
        each rank's sample count, so uneven shards are exact). Every rank must call every
        product (the solvers do so when they run on every rank with the same seed and ``v0``).
        Before each product the ranks compare checksums: different parameters, numbers of
        directions or dtypes are an error on every rank; inputs that differ by rounding are
        replaced by rank 0's, inputs that differ by more (a per-rank seed or ``v0``) are an
        error on every rank. A rank whose local product fails
        makes every rank raise (:class:`landscape_ext.distributed.RankFailure` on the others).
        A model wrapped in ``DistributedDataParallel`` is unwrapped and reduces over DDP's group
        by default. See :mod:`landscape_ext.distributed` for the bytes sent per product.

    Shapes
    ------
    ``op @ V``: ``V (d,)`` or ``(d, k)`` -> same shape; ``op.apply_rows(X (k, d)) -> (k, d)``.
    """

    _kind = "hessian"

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], data: Any,
                 *args: Any, mode: str = "auto", cache_graph: Union[bool, str] = "auto",
                 **kwargs: Any):
        super().__init__(model, loss_fn, data, *args,
                         mode="auto" if mode == FUSED_MLP_MODE else mode,
                         cache_graph=cache_graph, **kwargs)
        self._fused_init(mode, cache_graph, "hessian")

    def _batch_rows(self, X: Tensor, inputs: Any, targets: Tensor, where: str) -> Tensor:
        out = self._fused_rows(X, inputs, targets, where)
        if out is not None:
            return out
        prefer_dbl = self.cache_graph and X.shape[0] < self.auto_double_backward_below
        return self._run_modes(lambda: self._hvp_fwd(X, inputs, targets, where),
                               lambda: self._hvp_dbl(X, inputs, targets, where), where,
                               prefer_dbl)

    def _hvp_fwd(self, X: Tensor, inputs: Any, targets: Tensor, where: str) -> Tensor:
        from torch.func import grad, jvp, vmap
        base = self._base_params()
        sel = {n: base[n] for n in self.param_names}

        safe = _forward_ad_safe_loss(self.loss_fn)

        def loss_of(p):
            full = dict(base)
            full.update(p)
            loss = self._loss(self._call_model(full, inputs), targets, where, safe)
            return loss, loss.detach()

        g = grad(loss_of, has_aux=True)

        def one(v):
            _, hv, loss = jvp(g, (sel,), (v,), has_aux=True)
            return [hv[n] for n in self.param_names], loss

        k = X.shape[0]
        outs = []
        for s, e in self._chunks(k):
            hv, loss = vmap(one)(self._split_rows(X[s:e]))
            _check_finite(loss.reshape(-1)[:1], "the loss", where, type(self).__name__)
            outs.append(self._join_rows(hv, e - s))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _first_order_graph(self, inputs: Any, targets: Tensor, where: str):
        key = None
        if self.cache_graph:
            key = (_state_key(self.model.parameters()) + _state_key(self.model.buffers())
                   + (self.batch_norm,))
            if self._graph_cache is not None and self._graph_cache[0] == key:
                return self._graph_cache[1:]
            self._graph_cache = None
        base = self._base_params()
        leaves = [base[n].clone().requires_grad_(True) for n in self.param_names]
        full = dict(base)
        full.update(zip(self.param_names, leaves))
        with torch.enable_grad():
            loss = self._loss(self._call_model(full, inputs), targets, where)
            _check_finite(loss.detach(), "the loss", where, type(self).__name__)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        _check_finite(torch.cat([g.detach().reshape(-1) for g in grads if g is not None] or
                                [loss.detach().reshape(1)]), "the gradient", where,
                      type(self).__name__)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        out = (leaves, grads, live)
        if self.cache_graph:
            self._graph_cache = (key,) + out
        return out

    def _hvp_dbl(self, X: Tensor, inputs: Any, targets: Tensor, where: str) -> Tensor:
        leaves, grads, live = self._first_order_graph(inputs, targets, where)
        k = X.shape[0]
        if not live:
            return X.new_zeros(X.shape)
        outs = []
        chunks = self._chunks(k)
        for ci, (s, e) in enumerate(chunks):
            V = self._split_rows(X[s:e])
            cot = [V[self.param_names[i]] for i in live]
            retain = self.cache_graph or ci + 1 < len(chunks)
            with torch.enable_grad():
                if e - s == 1:  # one direction: skip the vmap of is_grads_batched
                    hv = torch.autograd.grad([grads[i] for i in live], leaves,
                                             [c[0] for c in cot], retain_graph=retain,
                                             allow_unused=True)
                    hv = [h.unsqueeze(0) if h is not None else None for h in hv]
                else:
                    hv = torch.autograd.grad([grads[i] for i in live], leaves, cot,
                                             is_grads_batched=True, retain_graph=retain,
                                             allow_unused=True)
            hv = [h if h is not None else X.new_zeros((e - s,) + tuple(l.shape))
                  for h, l in zip(hv, leaves)]
            outs.append(self._join_rows(hv, e - s))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


# ---- GGN ---------------------------------------------------------------------------------------


def _loss_kind(loss_fn: Any) -> Tuple[str, Dict[str, Any]]:
    """Recognise cross-entropy / MSE losses for the closed-form loss Hessian."""
    F = nn.functional
    if isinstance(loss_fn, str):
        name = loss_fn.lower().replace("-", "_")
        if name in ("cross_entropy", "ce", "crossentropy"):
            return "ce", {"reduction": "mean", "ignore_index": -100}
        if name in ("mse", "mse_loss"):
            return "mse", {"reduction": "mean"}
        raise ValueError(f"GGNOperator: unknown loss {loss_fn!r}; use 'cross_entropy', 'mse' or "
                         f"a callable")
    if (isinstance(loss_fn, nn.CrossEntropyLoss)
             and type(loss_fn).forward is not nn.CrossEntropyLoss.forward) or \
            (isinstance(loss_fn, nn.MSELoss) and type(loss_fn).forward is not nn.MSELoss.forward):
        return "generic", {}  # a subclass that overrides forward: not the torch loss
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None:
        return "ce", {"reduction": loss_fn.reduction, "ignore_index": loss_fn.ignore_index,
                      "label_smoothing": loss_fn.label_smoothing}
    if isinstance(loss_fn, nn.MSELoss):
        return "mse", {"reduction": loss_fn.reduction}
    if loss_fn is F.cross_entropy:
        return "ce", {"reduction": "mean", "ignore_index": -100}
    if loss_fn is F.mse_loss:
        return "mse", {"reduction": "mean"}
    return "generic", {}


class GGNOperator(_FusedMLPPath, ModelOperator):
    r"""Generalized Gauss-Newton matrix :math:`G = \frac{1}{N}\sum_b n_b\, J_b^\top H_{\text{out},b}
    J_b` (``J``: Jacobian of the outputs w.r.t. the parameters, ``H_out``: Hessian of the batch
    loss w.r.t. the outputs), as a batched linear operator.

    The loss Hessian is in closed form for cross-entropy (class dimension 1, mean or sum
    reduction, ``ignore_index``, label smoothing, probability targets)

    .. math:: H_{\text{out}} r = \frac{1}{n}\left(p \odot r - p\, (p^\top r)\right),
              \quad p = \mathrm{softmax}(z)

    and for MSE (:math:`H_{\text{out}} = \frac{2}{\text{numel}} I` for the mean reduction);
    any other loss uses its exact output Hessian by double backward (PSD only if the loss is
    convex in the outputs). For ``(N, C)`` logits with class-index targets and the mean
    reduction, the cross-entropy term runs in the fused kernel ``landscape_ext.ops.xent_hvp``
    (``fused_loss_hessian=False`` uses the formula in plain PyTorch). ``loss_fn`` may also be the string ``"cross_entropy"`` or ``"mse"``.

    ``mode``: ``forward-over-reverse`` computes ``J V`` by ``vmap(jvp)`` and ``J^T U`` by batched
    vector-Jacobian products; ``double-backward`` obtains ``J V`` by the double-vjp trick (no
    forward AD needed); ``fused-mlp`` runs the fused MLP products (:mod:`landscape_ext.mlp`,
    GGN variant: R-forward + R-backward without the second-order terms) for plain MLPs with
    cross-entropy (class-index targets) or MSE; ``auto`` uses ``fused-mlp`` when it applies,
    otherwise the first and falls back to the second. Other parameters as
    :class:`HessianOperator`.
    """

    _kind = "ggn"

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, *args: Any,
                 fused_loss_hessian: bool = True, mode: str = "auto",
                 cache_graph: Union[bool, str] = "auto", **kwargs: Any):
        self.fused_loss_hessian = bool(fused_loss_hessian)
        kind, opts = _loss_kind(loss_fn)
        self.loss_kind = kind
        self._loss_opts = opts
        if isinstance(loss_fn, str):
            loss_fn = (nn.functional.cross_entropy if kind == "ce" else nn.functional.mse_loss)
        super().__init__(model, loss_fn, data, *args,
                         mode="auto" if mode == FUSED_MLP_MODE else mode,
                         cache_graph=cache_graph, **kwargs)
        self.cache_graph = False
        self._fused_init(mode, cache_graph, "ggn")

    def _out_hessian(self, z: Tensor, R: Tensor, targets: Tensor) -> Tensor:
        """Apply the loss Hessian w.r.t. the outputs ``z`` to ``R (k, *z.shape)``."""
        if self.loss_kind == "ce":
            red = self._loss_opts.get("reduction", "mean")
            zc = z.detach()
            fused = getattr(_ops, "xent_hvp", None) if self.fused_loss_hessian else None
            if (fused is not None and red == "mean" and zc.dim() == 2 and targets.dim() == 1
                    and not targets.is_floating_point() and R.dim() == 3
                    and bool((targets != self._loss_opts.get("ignore_index", -100)).any())):
                try:  # the fused kernel of the hvp op family: one pass over the logits
                    return fused(zc, targets, R, self._loss_opts.get("label_smoothing", 0.0),
                                 self._loss_opts.get("ignore_index", -100))
                except NotImplementedError:  # no kernel for this device
                    pass
            p = torch.softmax(zc, dim=1 if zc.dim() > 1 else 0)
            if zc.dim() == 1:
                p = p.unsqueeze(0)
                R = R.unsqueeze(1)
            pr = (p.unsqueeze(0) * R)
            HR = pr - p.unsqueeze(0) * pr.sum(dim=2, keepdim=True)
            if targets.is_floating_point() and targets.shape == zc.shape:
                mass = targets.sum(dim=1, keepdim=True)
                HR = HR * mass.unsqueeze(0)
                n = zc.shape[0] * (math.prod(zc.shape[2:]) if zc.dim() > 2 else 1)
            else:
                ign = self._loss_opts.get("ignore_index", -100)
                mask = (targets != ign)
                if mask.all():
                    n = targets.numel()
                else:
                    HR = HR * mask.unsqueeze(1).unsqueeze(0).to(HR.dtype)
                    n = int(mask.sum())
            if zc.dim() == 1:
                HR = HR.squeeze(1)
            if red == "mean":
                HR = HR / max(n, 1)
            elif red != "sum":
                raise ValueError(f"GGNOperator: cross-entropy reduction must be 'mean' or 'sum', "
                                 f"got {red!r}")
            return HR.to(R.dtype)
        if self.loss_kind == "mse":
            red = self._loss_opts.get("reduction", "mean")
            if red == "mean":
                return R * (2.0 / z.numel())
            if red == "sum":
                return R * 2.0
            raise ValueError(f"GGNOperator: MSE reduction must be 'mean' or 'sum', got {red!r}")
        # generic: exact output Hessian by double backward
        zl = z.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._loss(zl, targets, "")
            gz = torch.autograd.grad(loss, zl, create_graph=True)[0]
            if not gz.requires_grad:
                return torch.zeros_like(R)
            return torch.autograd.grad(gz, zl, R, is_grads_batched=True)[0]

    def _batch_rows(self, X: Tensor, inputs: Any, targets: Tensor, where: str) -> Tensor:
        fused = self._fused_rows(X, inputs, targets, where)
        if fused is not None:
            return fused
        base = self._base_params()
        leaves = [base[n].clone().requires_grad_(True) for n in self.param_names]
        full = dict(base)
        full.update(zip(self.param_names, leaves))
        with torch.enable_grad():
            out = self._call_model(full, inputs)
        if not isinstance(out, Tensor):
            raise ValueError(f"GGNOperator: the model must return one tensor, got "
                             f"{type(out).__name__}")
        loss = self._loss(out.detach(), targets, where)
        _check_finite(loss, "the loss", where, type(self).__name__)
        chunks = self._chunks(X.shape[0])
        res = []
        for ci, (s, e) in enumerate(chunks):
            Xc = X[s:e]
            JV = self._run_modes(lambda: self._jv_fwd(Xc, inputs),
                                 lambda: self._jv_dbl(Xc, out, leaves), where)
            U = self._out_hessian(out, JV, targets)
            with torch.enable_grad():
                gv = torch.autograd.grad(out, leaves, U, is_grads_batched=True,
                                         retain_graph=ci + 1 < len(chunks), allow_unused=True)
            gv = [g if g is not None else X.new_zeros((e - s,) + tuple(l.shape))
                  for g, l in zip(gv, leaves)]
            res.append(self._join_rows(gv, e - s))
        return res[0] if len(res) == 1 else torch.cat(res)

    def _jv_fwd(self, X: Tensor, inputs: Any) -> Tensor:
        from torch.func import jvp, vmap
        base = self._base_params()
        sel = {n: base[n] for n in self.param_names}

        def f(p):
            full = dict(base)
            full.update(p)
            return self._call_model(full, inputs)

        return vmap(lambda v: jvp(f, (sel,), (v,))[1])(self._split_rows(X))

    def _jv_dbl(self, X: Tensor, out: Tensor, leaves: List[Tensor]) -> Tensor:
        u = torch.zeros_like(out, requires_grad=True)
        with torch.enable_grad():
            g = torch.autograd.grad(out, leaves, u, create_graph=True, retain_graph=True,
                                    allow_unused=True)
            pairs = [(gi, li) for gi, li in zip(g, self.param_names) if gi is not None]
            V = self._split_rows(X)
            return torch.autograd.grad([gi for gi, _ in pairs], u, [V[n] for _, n in pairs],
                                       is_grads_batched=True, retain_graph=True)[0]
