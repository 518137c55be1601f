"""Curvature sources of the curvature-aware optimizers.

Closures and operators that give Hessian-vector products at the current weights
(:func:`hessian_closure`, :func:`hvp_operator`), the warm-started top-eigenpair estimate that
the optimizers, :class:`~landscape_lab.optim.SharpnessTracker` and
:class:`~landscape_lab.training.CurvatureCallback` share, the NaN/Inf and settings checks, and
the map between an optimizer's parameters and a model operator's flat vector. See docs/optim.md.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from landscape_ext import CallableOperator, CurvatureOperator, HessianOperator, as_operator, eigsh

#: A zero-argument callable returning an operator-like object (see docs/optim.md).
CurvatureClosure = Callable[[], Any]
CurvatureSource = Union[CurvatureClosure, CurvatureOperator, Tensor]

_WHICH = ("magnitude", "largest")


# --------------------------------------------------------------------------------------------
# curvature closures
# --------------------------------------------------------------------------------------------
def hessian_closure(model: nn.Module, loss_fn: Optional[Callable[[Any, Tensor], Tensor]],
                    batch: Any,
                    params: Optional[Iterable[Union[str, Tensor]]] = None,
                    **operator_kwargs: Any) -> Callable[[], HessianOperator]:
    """A curvature closure: ``closure()`` returns ``HessianOperator(model, loss_fn, batch, ...)``.

    The operator is built when the closure is called (only on steps where an estimate is due)
    and reads the model's weights at product time, so a closure made before
    ``optimizer.step()`` gives the Hessian at the weights of that step.

    Parameters
    ----------
    model : nn.Module
    loss_fn : callable or None
        ``loss_fn(outputs, targets) -> scalar`` mean loss of the batch; ``None``: the loss the
        model computes itself (``outputs.loss`` / ``outputs["loss"]``, HuggingFace style).
    batch : (inputs, targets), dict, or iterable of batches
        As :class:`landscape_ext.HessianOperator`'s ``data`` (normally the current mini-batch; a
        dict batch is passed as ``model(**batch)``).
    params : iterable of str or Parameter, optional
        Parameters the Hessian is taken over (default: all with ``requires_grad``). The hybrid
        optimizers need the same set of parameters as their ``param_groups`` (any order).
    **operator_kwargs
        Passed to :class:`landscape_ext.HessianOperator` (``batch_norm``, ``chunk_size``, ...).
        ``mode`` defaults to ``"double-backward"`` here: an estimate is a few single-direction
        products on one batch, where the operator's cached first-order graph (one forward and
        backward with ``create_graph``, then one backward per product) is the cheapest path
        (the HVP modes are compared in bench/README.md). Pass ``mode="auto"`` for models whose
        double backward is unsupported.
    """
    operator_kwargs.setdefault("mode", "double-backward")

    def closure() -> HessianOperator:
        return HessianOperator(model, loss_fn, batch, params, **operator_kwargs)

    return closure


def hvp_operator(hvp_fn: Callable[[Tensor], Tensor], d: int, *, dtype: torch.dtype = torch.float64,
                 device: Union[str, torch.device] = "cpu", batched: bool = False
                 ) -> CurvatureOperator:
    """Wrap a plain Hessian-vector product as an operator (usable as a curvature source).

    Parameters
    ----------
    hvp_fn : callable
        ``hvp_fn(v) -> H v`` for a flat ``v`` of shape ``(d,)`` (the parameters concatenated in
        the optimizer's ``param_groups`` order), or with ``batched=True``
        ``hvp_fn(V) -> H V`` for ``V`` of shape ``(d, k)``. Must be symmetric-linear.
    d : int
        Dimension.
    dtype, device
        Of the products.
    batched : bool
        Whether ``hvp_fn`` takes ``(d, k)`` blocks (otherwise it is called once per column).

    Returns
    -------
    CurvatureOperator
    """
    if batched:
        return CallableOperator(hvp_fn, int(d), dtype, device, rows=False)

    def columns(V: Tensor) -> Tensor:
        return torch.stack([torch.as_tensor(hvp_fn(V[:, j].contiguous())).reshape(-1)
                            for j in range(V.shape[1])], dim=1)

    return CallableOperator(columns, int(d), dtype, device, rows=False)


def _is_operator_like(x: Any) -> bool:
    if isinstance(x, (CurvatureOperator, Tensor, np.ndarray)):
        return True
    shape = getattr(x, "shape", None)
    return shape is not None and hasattr(x, "matmat")


def _resolve_operator(source: Optional[CurvatureSource], owner: str,
                      step: int) -> CurvatureOperator:
    """The operator of a curvature source (closure or operator-like) for the estimate at
    ``step``."""
    if source is None:
        raise ValueError(f"{owner}: a curvature estimate is due at step {step} but no "
                         f"curvature_closure was given (pass one to step() or to the constructor)")
    obj = source
    if not _is_operator_like(obj):
        if not callable(obj):
            raise TypeError(f"{owner}: curvature_closure must be a zero-argument callable or an "
                            f"operator-like object, got {type(obj).__name__}")
        obj = obj()
        if not _is_operator_like(obj):
            raise TypeError(f"{owner}: the curvature closure returned {type(obj).__name__} at step "
                            f"{step}; expected a CurvatureOperator, a square tensor/array or an "
                            f"object with shape and matmat (wrap a plain hvp_fn with hvp_operator)")
    return as_operator(obj)


def _check_settings(owner: str, every: int, max_matvecs: int, tol: float, which: str) -> None:
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"{owner}: every must be a positive integer, got {every!r}")
    if not isinstance(max_matvecs, int) or max_matvecs < 1:
        raise ValueError(f"{owner}: max_matvecs must be a positive integer, got {max_matvecs!r}")
    if not tol > 0:
        raise ValueError(f"{owner}: tol must be positive, got {tol}")
    if which not in _WHICH:
        raise ValueError(f"{owner}: which must be one of {_WHICH}, got {which!r}")


def _top_eigenpairs(op: CurvatureOperator, k: int = 1, *, which: str, tol: float,
                    max_matvecs: Optional[int], seed: int, v0: Optional[Tensor], owner: str,
                    step: Optional[int] = None, warn: bool = False
                    ) -> Tuple[Dict[str, Any], Tensor]:
    """The warm-started top-eigenpair estimate every curvature tracker here shares.

    One :func:`landscape_ext.eigsh` call for the ``k`` top eigenpairs, started from ``v0``
    (``(d,)`` or ``(d, j)``, the previous eigenvectors), checked for NaN/Inf.

    Returns
    -------
    (dict, Tensor)
        ``{"eigenvalues", "residuals", "converged"}`` (lists of ``k``), ``n_matvecs``,
        ``warm_start``, ``time_s``; and the unit eigenvectors ``(d, k)`` in the operator's
        order, detached (the next ``v0``).

    Raises
    ------
    FloatingPointError
        A non-finite product, eigenvalue or eigenvector, or a zero eigenvector; the message
        names ``owner`` and ``step``.
    """
    at = "" if step is None else f" at step {step}"
    if v0 is not None and v0.shape[0] != op.d:
        raise ValueError(f"{owner}: the curvature operator{at} has d = {op.d}, the previous "
                         f"estimate had d = {v0.shape[0]}")
    t0 = time.perf_counter()
    try:
        r = eigsh(op, k=k, which=which, tol=tol, seed=seed, v0=v0, max_matvecs=max_matvecs,
                  warn=warn)
    except FloatingPointError as exc:
        raise FloatingPointError(f"{owner}: the curvature estimate{at} is not finite "
                                 f"({exc})") from exc
    values = r.eigenvalues.tolist()
    vecs = r.eigenvectors
    if not all(math.isfinite(lam) for lam in values) or not bool(torch.isfinite(vecs).all()):
        raise FloatingPointError(f"{owner}: the curvature estimate{at} is not finite "
                                 f"(eigenvalues {values})")
    norms = torch.linalg.vector_norm(vecs, dim=0)
    if not bool((norms > 0).all()):
        raise FloatingPointError(f"{owner}: an eigenvector estimated{at} is zero")
    record = {
        "eigenvalues": values,
        "residuals": r.residuals.tolist(),
        "converged": r.converged.tolist(),
        "n_matvecs": int(r.n_matvecs),
        "warm_start": v0 is not None,
        "time_s": time.perf_counter() - t0,
    }
    return record, (vecs / norms).detach()


def _top_eigenpair(op: CurvatureOperator, *, which: str, tol: float, max_matvecs: int, seed: int,
                   v0: Optional[Tensor], owner: str, step: int) -> Tuple[Dict[str, Any], Tensor]:
    """:func:`_top_eigenpairs` with ``k = 1`` as one history record of the optimizers and the
    tracker: ``(record, unit eigenvector (d,) in op order)``."""
    # called every `every` steps with a small budget: an estimate that stops at the budget is
    # normal and recorded (``converged``), not worth a warning each time
    est, vecs = _top_eigenpairs(op, 1, which=which, tol=tol, max_matvecs=max_matvecs, seed=seed,
                                v0=v0, owner=owner, step=step, warn=False)
    record = {
        "step": int(step),
        "eigenvalue": est["eigenvalues"][0],
        "residual": est["residuals"][0],
        "converged": bool(est["converged"][0]),
        "n_matvecs": est["n_matvecs"],
        "warm_start": est["warm_start"],
        "time_s": est["time_s"],
    }
    return record, vecs[:, 0]


def _check_loss(loss: Any, owner: str, step: int) -> None:
    if loss is None:
        return
    val = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
    if not math.isfinite(val):
        raise FloatingPointError(f"{owner}: the loss is {val} at step {step}; parameters left "
                                 f"unchanged")


def _check_grads(params: Sequence[Tensor], owner: str, step: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    ok = torch.stack([torch.isfinite(g).all() for g in grads])
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0])
        n_bad = int((~torch.isfinite(grads[i])).sum())
        raise FloatingPointError(f"{owner}: the gradient has {n_bad} NaN/Inf value(s) at step "
                                 f"{step} (parameter of shape {tuple(grads[i].shape)}); parameters "
                                 f"left unchanged")


# --------------------------------------------------------------------------------------------
# optimizer parameters <-> operator order
# --------------------------------------------------------------------------------------------
def operator_order(op: CurvatureOperator, params: List[Tensor], owner: str) -> List[Tensor]:
    """The optimizer's parameters in the order of the operator's flat layout (a model operator
    lists its parameters by name; any other operator must match the optimizer's order and
    size). The flat layout itself is :class:`landscape_ext.ParameterLayout`'s."""
    d = sum(p.numel() for p in params)
    names = getattr(op, "param_names", None)
    model = getattr(op, "model", None)
    if names is not None and isinstance(model, nn.Module):
        named = dict(model.named_parameters())
        op_params = [named[n] for n in names]
        mine = {id(p) for p in params}
        if len(op_params) == len(params) and all(id(p) in mine for p in op_params):
            return op_params
        raise ValueError(
            f"{owner}: the curvature operator covers {len(op_params)} parameter tensors "
            f"(d = {op.d}), the optimizer {len(params)} (d = {d}); build it on the "
            f"optimizer's parameters, e.g. hessian_closure(model, loss_fn, batch, "
            f"params=[p for g in opt.param_groups for p in g['params']])")
    if op.d != d:
        raise ValueError(f"{owner}: the curvature operator has d = {op.d}, the optimizer's "
                         f"parameters d = {d}")
    return list(params)
