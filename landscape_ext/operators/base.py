"""Generic linear operators: the protocol every solver of the engine multiplies with.

An operator is a symmetric ``(d, d)`` matrix known through products. The one product of the
engine is :meth:`CurvatureOperator.apply_rows`: ``k`` directions as the rows of ``X (k, d)``
in, ``(k, d)`` out (the layout of the Krylov solvers). ``op @ V``, :meth:`~CurvatureOperator.matmat`,
:meth:`~CurvatureOperator.matvec` and :meth:`~CurvatureOperator.to_scipy` take columns and are the
one boundary where rows and columns are transposed. ``n_matvecs`` counts directions multiplied.
"""
from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["CurvatureOperator", "DenseOperator", "CallableOperator", "as_operator"]


@contextlib.contextmanager
def _outside_inference_mode() -> Iterator[None]:
    """Under ``torch.inference_mode()``: leave it for the block, with gradients off as under
    ``torch.no_grad()`` (the operators enable them where they differentiate); else nothing."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


class CurvatureOperator(metaclass=abc.ABCMeta):
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

        Shapes: ``X (k, d)`` -> ``(k, d)``. ``X`` is converted to ``self.dtype``/``device``; a
        complex ``X`` is an error (the operator is real: pass real and imaginary parts as
        separate rows). Works the same under ``torch.inference_mode()`` as under
        ``torch.no_grad()``: the product leaves inference mode (autograd needs it), and an ``X``
        made in inference mode enters as a copy.
        """
        self._check_real(X, "X")
        if X.dim() != 2 or X.shape[1] != self.d:
            raise ValueError(f"{type(self).__name__}: expected rows of shape (k, {self.d}), "
                             f"got {tuple(X.shape)}")
        if X.shape[0] == 0:
            return X.new_zeros((0, self.d), dtype=self.dtype, device=self.device)
        with _outside_inference_mode():
            X = X.to(device=self.device, dtype=self.dtype)
            if X.is_inference():
                X = X.clone()
            out = self._apply_rows(X)
        self.n_matvecs += X.shape[0]
        return out

    def _check_real(self, V: Tensor, name: str) -> None:
        """A complex ``V`` is a ``TypeError`` naming ``name`` (converting would drop its
        imaginary part)."""
        if V.is_complex():
            raise TypeError(f"{type(self).__name__}: {name} is complex ({V.dtype}, shape "
                            f"{tuple(V.shape)}); the operator is real symmetric: multiply the "
                            f"real and imaginary parts separately (e.g. as columns of one real V)")

    def matmat(self, V: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(d, k)`` (or ``(d,)``) — all columns in one batched
        product."""
        if not isinstance(V, Tensor):
            V = torch.as_tensor(np.asarray(V))
        self._check_real(V, "V")
        if V.dim() == 1 and V.shape[0] == self.d:
            return self.apply_rows(V.unsqueeze(0))[0]
        if V.dim() != 2 or V.shape[0] != self.d:
            raise ValueError(f"{type(self).__name__}: expected V of shape ({self.d},) or "
                             f"({self.d}, k), got {tuple(V.shape)}")
        return self.apply_rows(V.T).T

    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for ``v`` of shape ``(d,)``."""
        if not isinstance(v, Tensor):
            v = torch.as_tensor(np.asarray(v))
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
