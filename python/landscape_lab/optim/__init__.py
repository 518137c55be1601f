r"""Curvature-adaptive optimization: a curvature-adaptive learning rate, the hybrid
Hessian-eigenvector optimizers of the proposal, and a sharpness tracker.

* :class:`CurvatureAdaptiveLR` — a scheduler for any :class:`torch.optim.Optimizer`:

  .. math:: \eta_t = \frac{\eta_0}{1 + \gamma \|H_t\|_2},

  with :math:`\|H_t\|_2` estimated every ``every`` steps by a few warm-started Lanczos steps.
* :class:`HybridHessianSGD` / :class:`HybridHessianAdam` — the hybrid update

  .. math:: w_{t+1} = w_t - \eta_t \Big(P(g_t) + \mu\, s_t \frac{v_t}{\|v_t\|}\Big),
            \qquad s_t = \operatorname{sign}(v_t^\top g_t)\ (+1 \text{ if } 0),

  with :math:`P(g) = g` (SGD) or Adam's bias-corrected :math:`\hat m/(\sqrt{\hat v} + \epsilon)`,
  :math:`v_t` the top Hessian eigenvector (warm-started Lanczos, refreshed every ``every`` steps).
* :class:`SharpnessTracker` — :math:`\lambda_{\max}` of the training-batch Hessian over training,
  next to the edge-of-stability threshold :math:`2/\eta` of gradient descent.

Curvature closures
------------------
Curvature estimates need Hessian-vector products at the *current* weights. Every class here gets
them from a **curvature closure**: a zero-argument callable, called only when an estimate is due,
returning an operator-like object:

* a :class:`landscape_ext.HessianOperator` on the current batch — :func:`hessian_closure` builds
  this closure: ``hessian_closure(model, loss_fn, (x, y))``;
* a dense symmetric ``(d, d)`` tensor (a quadratic with a known Hessian);
* any :class:`landscape_ext.CurvatureOperator`, e.g. :func:`hvp_operator` around a plain
  ``hvp_fn(v) -> H v``.

An operator-like object may also be passed where a closure is expected (a fixed Hessian). The
estimate calls :func:`landscape_ext.eigsh` with ``k=1``, the previous eigenvector as ``v0`` and a
budget of ``max_matvecs`` products; the model operators never change the model (weights,
buffers, ``training`` flags). Problems with ``d <= 25`` are solved densely by the engine (``d``
products, exact) whatever the budget.

Typical loop (the closure is cheap to build: no product runs unless an estimate is due)::

    opt = HybridHessianSGD(model.parameters(), lr=0.1, mu=0.01, every=10)
    for x, y in loader:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(curvature_closure=hessian_closure(model, loss_fn, (x, y)))

Non-finite values are errors, never skipped: a NaN/Inf loss, gradient or curvature estimate
raises :class:`FloatingPointError` naming the step, before any parameter is changed.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from landscape_ext import CallableOperator, CurvatureOperator, HessianOperator, as_operator, eigsh

from ._results import to_builtin

__all__ = [
    "CurvatureAdaptiveLR",
    "HybridHessianSGD",
    "HybridHessianAdam",
    "SharpnessTracker",
    "hessian_closure",
    "hvp_operator",
]

logger = logging.getLogger(__name__)

#: A zero-argument callable returning an operator-like object (see the module docstring).
CurvatureClosure = Callable[[], Any]
CurvatureSource = Union[CurvatureClosure, CurvatureOperator, Tensor]

_WHICH = ("magnitude", "largest")


# --------------------------------------------------------------------------------------------
# curvature closures
# --------------------------------------------------------------------------------------------
def hessian_closure(model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], batch: Any,
                    params: Optional[Iterable[Union[str, Tensor]]] = None,
                    **operator_kwargs: Any) -> Callable[[], HessianOperator]:
    """A curvature closure: ``closure()`` returns ``HessianOperator(model, loss_fn, batch, ...)``.

    The operator is built when the closure is called (only on steps where an estimate is due)
    and reads the model's weights at product time, so a closure made before
    ``optimizer.step()`` gives the Hessian at the weights of that step.

    Parameters
    ----------
    model : nn.Module
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar`` mean loss of the batch.
    batch : (inputs, targets) or iterable of batches
        As :class:`landscape_ext.HessianOperator`'s ``data`` (normally the current mini-batch).
    params : iterable of str or Parameter, optional
        Parameters the Hessian is taken over (default: all with ``requires_grad``). The hybrid
        optimizers need the same set of parameters as their ``param_groups`` (any order).
    **operator_kwargs
        Passed to :class:`landscape_ext.HessianOperator` (``batch_norm``, ``chunk_size``, ...).
        ``mode`` defaults to ``"double-backward"`` here: an estimate is a few single-direction
        products on one batch, where the operator's cached first-order graph (one forward and
        backward with ``create_graph``, then one backward per product) is the cheapest path
        (about 3x cheaper per product than ``vmap(jvp(grad))`` for an MLP on a CPU,
        ``bench/bench_optim.py``). Pass ``mode="auto"`` for models whose double backward is
        unsupported.
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


def _top_eigenpair(op: CurvatureOperator, *, which: str, tol: float, max_matvecs: int, seed: int,
                   v0: Optional[Tensor], owner: str, step: int) -> Tuple[Dict[str, Any], Tensor]:
    """One warm-started ``k=1`` Lanczos estimate: ``(record, unit eigenvector in op order)``."""
    if v0 is not None and v0.numel() != op.d:
        raise ValueError(f"{owner}: the curvature operator at step {step} has d = {op.d}, the "
                         f"previous estimate had d = {v0.numel()}")
    t0 = time.perf_counter()
    try:
        # called every `every` steps with a small budget: an estimate that stops at the budget is
        # normal and recorded (``converged``), not worth a warning each time
        r = eigsh(op, k=1, which=which, tol=tol, seed=seed, v0=v0, max_matvecs=max_matvecs,
                  warn=False)
    except FloatingPointError as exc:
        raise FloatingPointError(f"{owner}: the curvature estimate at step {step} is not finite "
                                 f"({exc})") from exc
    lam = float(r.eigenvalues[0])
    vec = r.eigenvectors[:, 0]
    if not math.isfinite(lam) or not bool(torch.isfinite(vec).all()):
        raise FloatingPointError(f"{owner}: the curvature estimate at step {step} is not finite "
                                 f"(eigenvalue {lam})")
    nrm = torch.linalg.vector_norm(vec)
    if not float(nrm) > 0:
        raise FloatingPointError(f"{owner}: the eigenvector estimated at step {step} is zero")
    record = {
        "step": int(step),
        "eigenvalue": lam,
        "residual": float(r.residuals[0]),
        "converged": bool(r.converged[0]),
        "n_matvecs": int(r.n_matvecs),
        "warm_start": v0 is not None,
        "time_s": time.perf_counter() - t0,
    }
    return record, (vec / nrm).detach()


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
# CurvatureAdaptiveLR
# --------------------------------------------------------------------------------------------
class CurvatureAdaptiveLR:
    r"""Curvature-adaptive learning rate :math:`\eta_t = \eta_0 / (1 + \gamma \|H_t\|_2)` for
    any :class:`torch.optim.Optimizer`.

    Every ``every`` calls of :meth:`step` the spectral norm :math:`\|H_t\|_2 = \max|\lambda|`
    of the Hessian given by the curvature closure (normally the current mini-batch at the current
    weights) is estimated by Lanczos with at most ``max_matvecs`` Hessian-vector products,
    warm-started from the previous top eigenvector, and every param group's ``lr`` is set to
    ``eta_0 / (1 + gamma * estimate)``. Between estimates the rate is held.

    Call :meth:`step` once per iteration **before** ``optimizer.step()`` (after ``backward``):
    the rate it sets is used by the step that follows, so step ``t`` uses :math:`\eta_t` from the
    Hessian at :math:`w_t`. (Called after ``optimizer.step()``, as torch schedulers are, the
    rate lags one step.) Other schedulers changing ``lr`` between estimates are overridden at the
    next estimate.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Any optimizer; ``eta_0`` is each group's ``initial_lr`` (set by torch schedulers) or its
        ``lr`` at construction.
    gamma : float
        Curvature sensitivity ``>= 0`` (units of 1/curvature); ``gamma = 0`` gives a constant
        rate. With ``eta_0 = gamma`` the rate tends to ``1/||H||``, half the edge-of-stability
        threshold, where the curvature is large.
    every : int
        Estimate every ``every`` calls (the first call always estimates).
    max_matvecs : int
        Hessian-vector products per estimate (5-20 is typical with warm starts).
    tol : float
        Lanczos stops early once ``|H v - lambda v| <= tol * |lambda|``.
    seed : int
        Seed of the random start vector of the first (cold) estimate.
    warm_start : bool
        Start each estimate from the previous eigenvector.
    curvature_closure : callable or operator-like, optional
        Default curvature source when :meth:`step` gets none (see the module docstring).
    check_finite : bool
        At each :meth:`step`, raise :class:`FloatingPointError` naming the step if a gradient
        of the optimizer's parameters holds NaN/Inf (one reduction per parameter).

    Attributes
    ----------
    history : list of dict
        One record per estimate: ``step``, ``eigenvalue`` (the one of largest magnitude),
        ``spectral_norm``, ``lr`` (list, per group), ``residual``, ``converged``,
        ``n_matvecs``, ``warm_start``, ``time_s``.
    spectral_norm : float or None
        Latest estimate.
    n_matvecs : int
        Hessian-vector products spent so far.
    """

    _owner = "CurvatureAdaptiveLR"

    def __init__(self, optimizer: torch.optim.Optimizer, gamma: float = 1.0, *, every: int = 10,
                 max_matvecs: int = 10, tol: float = 1e-3, seed: int = 0, warm_start: bool = True,
                 curvature_closure: Optional[CurvatureSource] = None, check_finite: bool = True):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{self._owner}: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"{self._owner}: gamma must be finite and >= 0, got {gamma}")
        _check_settings(self._owner, every, max_matvecs, tol, "magnitude")
        self.optimizer = optimizer
        self.gamma = float(gamma)
        self.every = every
        self.max_matvecs = max_matvecs
        self.tol = float(tol)
        self.seed = int(seed)
        self.warm_start = bool(warm_start)
        self.curvature_closure = curvature_closure
        self.check_finite = bool(check_finite)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs: List[float] = [float(g["initial_lr"]) for g in optimizer.param_groups]
        self.last_step = 0
        self.spectral_norm: Optional[float] = None
        self.n_matvecs = 0
        self.history: List[Dict[str, Any]] = []
        self._vector: Optional[Tensor] = None
        self._last_lr = [float(g["lr"]) for g in optimizer.param_groups]

    def lr_at(self, spectral_norm: float) -> List[float]:
        """``[eta_0 / (1 + gamma * spectral_norm)]`` per param group."""
        return [b / (1.0 + self.gamma * float(spectral_norm)) for b in self.base_lrs]

    def step(self, curvature_closure: Optional[CurvatureSource] = None,
             loss: Optional[Union[Tensor, float]] = None) -> Optional[Dict[str, Any]]:
        """Advance one iteration; estimate ``||H||_2`` and set the rate if one is due.

        Parameters
        ----------
        curvature_closure : callable or operator-like, optional
            Curvature source for this step (default: the constructor's). Only called when an
            estimate is due.
        loss : Tensor or float, optional
            The iteration's loss, checked for NaN/Inf.

        Returns
        -------
        dict or None
            The estimate's record (also appended to :attr:`history`), ``None`` between
            estimates.

        Raises
        ------
        FloatingPointError
            NaN/Inf in ``loss``, in a gradient (``check_finite``) or in the estimate.
        """
        t = self.last_step
        _check_loss(loss, self._owner, t)
        if self.check_finite:
            _check_grads([p for g in self.optimizer.param_groups for p in g["params"]],
                         self._owner, t)
        record = None
        if t % self.every == 0:
            op = _resolve_operator(curvature_closure if curvature_closure is not None
                                   else self.curvature_closure, self._owner, t)
            v0 = self._vector if self.warm_start else None
            record, vec = _top_eigenpair(op, which="magnitude", tol=self.tol,
                                         max_matvecs=self.max_matvecs, seed=self.seed, v0=v0,
                                         owner=self._owner, step=t)
            self._vector = vec
            self.spectral_norm = abs(record["eigenvalue"])
            lrs = self.lr_at(self.spectral_norm)
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            record["spectral_norm"] = self.spectral_norm
            record["lr"] = lrs
            self.n_matvecs += record["n_matvecs"]
            self.history.append(record)
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.last_step = t + 1
        return record

    def get_last_lr(self) -> List[float]:
        """The rates set by the last :meth:`step` (per param group)."""
        return list(self._last_lr)

    @property
    def vector(self) -> Optional[Tensor]:
        """Latest top eigenvector (unit, flattened in the operator's parameter order)."""
        return self._vector

    def state_dict(self) -> Dict[str, Any]:
        """Everything but the optimizer and the closure (includes the warm-start vector)."""
        return {
            "gamma": self.gamma, "every": self.every, "max_matvecs": self.max_matvecs,
            "tol": self.tol, "seed": self.seed, "warm_start": self.warm_start,
            "check_finite": self.check_finite, "base_lrs": list(self.base_lrs),
            "last_step": self.last_step, "spectral_norm": self.spectral_norm,
            "n_matvecs": self.n_matvecs, "history": copy.deepcopy(self.history),
            "vector": None if self._vector is None else self._vector.clone(),
            "last_lr": list(self._last_lr),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the optimizer's own state is loaded separately)."""
        missing = {"base_lrs", "last_step", "vector", "history"} - set(state_dict)
        if missing:
            raise ValueError(f"{self._owner}: state_dict lacks {sorted(missing)}")
        if len(state_dict["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(f"{self._owner}: state_dict has {len(state_dict['base_lrs'])} param "
                             f"groups, the optimizer {len(self.optimizer.param_groups)}")
        sd = copy.deepcopy(dict(state_dict))
        vec = sd.pop("vector")
        for key, value in sd.items():
            setattr(self, "_last_lr" if key == "last_lr" else key, value)
        self._vector = None if vec is None else torch.as_tensor(vec)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable summary (settings, totals and :attr:`history`)."""
        sd = self.state_dict()
        sd.pop("vector")
        return to_builtin(sd)

    def __repr__(self) -> str:
        return (f"{self._owner}(gamma={self.gamma}, every={self.every}, "
                f"max_matvecs={self.max_matvecs}, step={self.last_step}, "
                f"spectral_norm={self.spectral_norm}, n_estimates={len(self.history)})")


# --------------------------------------------------------------------------------------------
# hybrid optimizers
# --------------------------------------------------------------------------------------------
class _ParamLayout:
    """Flattening of the optimizer's parameters, and its permutation to a model operator's."""

    def __init__(self, params: List[Tensor]):
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.d = sum(self.sizes)

    def permutation(self, op: CurvatureOperator, owner: str) -> Optional[List[int]]:
        """``perm`` with ``op order == [params[i] for i in perm]``; ``None`` for the same order."""
        names = getattr(op, "param_names", None)
        model = getattr(op, "model", None)
        if names is not None and isinstance(model, nn.Module):
            named = dict(model.named_parameters())
            op_params = [named[n] for n in names]
            index = {id(p): i for i, p in enumerate(self.params)}
            if len(op_params) == len(self.params) and all(id(p) in index for p in op_params):
                perm = [index[id(p)] for p in op_params]
                return None if perm == list(range(len(perm))) else perm
            raise ValueError(
                f"{owner}: the curvature operator covers {len(op_params)} parameter tensors "
                f"(d = {op.d}), the optimizer {len(self.params)} (d = {self.d}); build it on the "
                f"optimizer's parameters, e.g. hessian_closure(model, loss_fn, batch, "
                f"params=[p for g in opt.param_groups for p in g['params']])")
        if op.d != self.d:
            raise ValueError(f"{owner}: the curvature operator has d = {op.d}, the optimizer's "
                             f"parameters d = {self.d}")
        return None

    def to_op(self, parts: Sequence[Tensor], perm: Optional[List[int]]) -> Tensor:
        order = range(len(parts)) if perm is None else perm
        return torch.cat([parts[i].reshape(-1) for i in order])

    def from_op(self, v: Tensor, perm: Optional[List[int]]) -> List[Tensor]:
        order = list(range(len(self.params))) if perm is None else perm
        chunks = torch.split(v, [self.sizes[i] for i in order])
        out: List[Optional[Tensor]] = [None] * len(self.params)
        for i, c in zip(order, chunks):
            p = self.params[i]
            out[i] = c.reshape(p.shape).to(device=p.device, dtype=p.dtype)
        return out  # type: ignore[return-value]


class _HybridHessianBase(torch.optim.Optimizer):
    """Shared machinery: curvature refresh, sign choice, checks and state_dict round-trip."""

    _owner = "HybridHessian"

    def __init__(self, params: Any, defaults: Dict[str, Any], *, every: int, max_matvecs: int,
                 tol: float, which: str, seed: int,
                 curvature_closure: Optional[CurvatureSource]):
        for key in ("lr", "mu", "gamma"):
            val = defaults[key]
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val >= 0):
                raise ValueError(f"{self._owner}: {key} must be a finite number >= 0, got {val!r}")
        _check_settings(self._owner, every, max_matvecs, tol, which)
        super().__init__(params, defaults)
        self.every = every
        self.max_matvecs = max_matvecs
        self.tol = float(tol)
        self.which = which
        self.seed = int(seed)
        self.curvature_closure = curvature_closure
        self._curv: Dict[str, Any] = {"step": 0, "eigenvalue": None, "sign": None,
                                      "n_matvecs": 0, "history": []}

    # -- properties ---------------------------------------------------------------------------
    def _all_params(self) -> List[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def history(self) -> List[Dict[str, Any]]:
        """One record per eigenvector refresh: ``step``, ``eigenvalue``, ``residual``,
        ``converged``, ``n_matvecs``, ``warm_start``, ``time_s``."""
        return self._curv["history"]

    @property
    def eigenvalue(self) -> Optional[float]:
        """Latest top eigenvalue estimate ``lambda_t``."""
        return self._curv["eigenvalue"]

    @property
    def n_matvecs(self) -> int:
        """Hessian-vector products spent so far."""
        return self._curv["n_matvecs"]

    @property
    def n_steps(self) -> int:
        return self._curv["step"]

    def eigenvector(self) -> Optional[List[Tensor]]:
        """The unit top eigenvector ``v_t/||v_t||`` as parameter-shaped tensors (``None`` before
        the first step)."""
        params = self._all_params()
        if any("eigvec" not in self.state[p] for p in params):
            return None
        return [self.state[p]["eigvec"] for p in params]

    def eta(self, group: Dict[str, Any]) -> float:
        """``eta_t = lr / (1 + gamma |lambda_t|)`` for a param group."""
        lam = self._curv["eigenvalue"]
        return group["lr"] / (1.0 + group["gamma"] * abs(lam if lam is not None else 0.0))

    # -- curvature ----------------------------------------------------------------------------
    def _refresh(self, source: Optional[CurvatureSource], step: int) -> None:
        params = self._all_params()
        op = _resolve_operator(source, self._owner, step)
        layout = _ParamLayout(params)
        perm = layout.permutation(op, self._owner)
        v0 = None
        if all("eigvec" in self.state[p] for p in params):
            v0 = layout.to_op([self.state[p]["eigvec"] for p in params], perm)
        record, vec = _top_eigenpair(op, which=self.which, tol=self.tol,
                                     max_matvecs=self.max_matvecs, seed=self.seed, v0=v0,
                                     owner=self._owner, step=step)
        for p, part in zip(params, layout.from_op(vec, perm)):
            self.state[p]["eigvec"] = part
        self._curv["eigenvalue"] = record["eigenvalue"]
        self._curv["n_matvecs"] += record["n_matvecs"]
        self._curv["history"].append(record)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None,
             curvature_closure: Optional[CurvatureSource] = None) -> Any:
        """One hybrid step.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (``loss.backward()`` inside), as for any
            torch optimizer; its loss is checked for NaN/Inf.
        curvature_closure : callable or operator-like, optional
            Curvature source for this step (default: the constructor's); only called on refresh
            steps (``step % every == 0``), at the weights before this step's update.

        Returns
        -------
        The closure's loss, or ``None``.

        Raises
        ------
        FloatingPointError
            NaN/Inf in the loss, a gradient or the curvature estimate (parameters unchanged).
        """
        t = self._curv["step"]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _check_loss(loss, self._owner, t)
        params = self._all_params()
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"{self._owner} does not support sparse gradients")
        _check_grads(params, self._owner, t)
        if t % self.every == 0:
            self._refresh(curvature_closure if curvature_closure is not None
                          else self.curvature_closure, t)
        # sign s_t so that the eigen-direction term descends: s_t v_t . g_t >= 0
        dot = torch.zeros((), dtype=torch.float64)
        for p in params:
            if p.grad is not None:
                dot += torch.sum(self.state[p]["eigvec"].double() * p.grad.double()).cpu()
        sign = -1.0 if float(dot) < 0 else 1.0
        self._curv["sign"] = sign
        for group in self.param_groups:
            eta = self.eta(group)
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, self.state[p], group, eta, sign)
        self._curv["step"] = t + 1
        return loss

    def _update(self, p: Tensor, g: Tensor, state: Dict[str, Any], group: Dict[str, Any],
                eta: float, sign: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- state_dict ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """torch's optimizer state (per-parameter ``eigvec`` and moments, param groups) plus a
        ``"curvature"`` entry: step count, latest eigenvalue and sign, products spent, history."""
        sd = super().state_dict()
        sd["curvature"] = copy.deepcopy(self._curv)
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        sd = dict(state_dict)
        curv = sd.pop("curvature", None)
        if curv is None:
            raise ValueError(f"{self._owner}: state_dict has no 'curvature' entry (not saved by "
                             f"{type(self).__name__}.state_dict())")
        super().load_state_dict(sd)
        self._curv = copy.deepcopy(curv)

    def __repr__(self) -> str:
        base = super().__repr__().rstrip()[:-1]
        return (f"{base}Curvature estimate\n    every: {self.every}\n    max_matvecs: "
                f"{self.max_matvecs}\n    tol: {self.tol}\n    which: {self.which}\n)")


class HybridHessianSGD(_HybridHessianBase):
    r"""SGD plus a step along the top Hessian eigenvector (the proposal's hybrid update):

    .. math:: w_{t+1} = w_t - \eta_t \big(g_t + \mu\, s_t u_t\big), \qquad
              u_t = \frac{v_t}{\|v_t\|}, \quad s_t = \operatorname{sign}(u_t^\top g_t),\quad
              \eta_t = \frac{\mathrm{lr}}{1 + \gamma |\lambda_t|},

    with :math:`(\lambda_t, v_t)` the top eigenpair of the Hessian from the curvature closure,
    re-estimated every ``every`` steps by Lanczos (``max_matvecs`` products, warm-started from
    the previous :math:`v`) and held in between; :math:`s_t` is chosen at every step
    (:math:`+1` when :math:`u_t^\top g_t = 0`), so the eigen term is a descent direction to first
    order: the step's directional derivative is
    :math:`-\eta_t(\|g_t\|^2 + \mu |u_t^\top g_t|) \le 0`.

    Deviation from the proposal: it writes :math:`\operatorname{diag}(\nabla L)` for the first
    term, which is a matrix, not a step; issue 6 fixes the update as :math:`g_t + \mu v_t/\|v_t\|`
    and this follows it. :math:`u_t` is not scaled by the gradient: with :math:`\mu > 0` the
    iterates do not converge to a minimum exactly but stay within about :math:`\eta_t \mu` of it
    along :math:`u_t` (the update has no fixed point), so keep :math:`\mu` small next to
    :math:`\|g_t\|` or lower it with ``param_groups[i]["mu"]`` during training.

    Parameters
    ----------
    params : iterable
        Parameters or param-group dicts, as for any torch optimizer. The Hessian is taken over
        all of them jointly (one eigenvector across groups); ``lr``, ``mu`` and ``gamma`` may
        differ per group. Parameters whose ``.grad`` is ``None`` are skipped (not moved).
    lr : float
        Base rate ``>= 0``.
    mu : float
        Weight ``>= 0`` of the unit eigen-direction (same units as the gradient: a step of
        ``lr * mu`` in parameter space). ``mu = 0`` with ``gamma = 0`` is plain SGD.
    gamma : float
        Curvature damping of the rate, ``eta_t = lr / (1 + gamma |lambda_t|)``, from the same
        estimate at no extra cost (``0``: constant rate; the proposal's adaptive rate otherwise).
    every : int
        Refresh the eigenpair every ``every`` steps (step 0 included).
    max_matvecs : int
        Hessian-vector products per refresh.
    tol : float
        Lanczos stops early once ``|H v - lambda v| <= tol |lambda|``.
    which : {"magnitude", "largest"}
        Top eigenvector by ``|lambda|`` (what power iteration finds; ``|lambda| = ||H||_2``) or
        algebraically largest ``lambda``.
    seed : int
        Seed of the random start vector of the first (cold) estimate.
    curvature_closure : callable or operator-like, optional
        Default curvature source for :meth:`step` (see the module docstring).

    Notes
    -----
    State per parameter: ``eigvec`` (its slice of ``u_t``). :meth:`state_dict` adds a
    ``"curvature"`` entry (step count, ``lambda_t``, last sign, products spent, history), so
    a loaded optimizer continues exactly, warm start included.
    """

    _owner = "HybridHessianSGD"

    def __init__(self, params: Any, lr: float = 1e-2, mu: float = 1e-2, *, gamma: float = 0.0,
                 every: int = 10, max_matvecs: int = 10, tol: float = 1e-3,
                 which: str = "magnitude", seed: int = 0,
                 curvature_closure: Optional[CurvatureSource] = None):
        super().__init__(params, dict(lr=lr, mu=mu, gamma=gamma), every=every,
                         max_matvecs=max_matvecs, tol=tol, which=which, seed=seed,
                         curvature_closure=curvature_closure)

    def _update(self, p, g, state, group, eta, sign):
        p.add_(g, alpha=-eta)
        p.add_(state["eigvec"], alpha=-eta * group["mu"] * sign)


class HybridHessianAdam(_HybridHessianBase):
    r"""Adam-preconditioned gradient plus a step along the top Hessian eigenvector:

    .. math:: m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
              r_t = \beta_2 r_{t-1} + (1-\beta_2) g_t^2, \quad
              \hat m_t = \frac{m_t}{1-\beta_1^t}, \quad \hat r_t = \frac{r_t}{1-\beta_2^t},

    .. math:: w_{t+1} = w_t - \eta_t \Big(\frac{\hat m_t}{\sqrt{\hat r_t} + \epsilon}
              + \mu\, s_t u_t\Big), \qquad u_t = \frac{v_t}{\|v_t\|},\quad
              s_t = \operatorname{sign}(u_t^\top g_t), \quad
              \eta_t = \frac{\mathrm{lr}}{1 + \gamma |\lambda_t|}.

    The Adam part is exactly :class:`torch.optim.Adam` (no weight decay, no AMSGrad); the eigen
    term is **not** preconditioned, and its sign is chosen against the raw gradient
    :math:`g_t` (so the eigen term descends to first order; the Adam term, with momentum, need
    not). Scale: the Adam direction has entries of about :math:`\pm 1`, so its norm is about
    :math:`\sqrt{d}`, while :math:`\|u_t\| = 1`; ``mu`` of order ``0.01 * sqrt(d)`` gives the
    eigen term a percent-level share of the step. Deviation from the proposal's
    :math:`\operatorname{diag}(\nabla L)`: see :class:`HybridHessianSGD`.

    Parameters
    ----------
    params : iterable
        As :class:`HybridHessianSGD`.
    lr : float
        Base rate ``>= 0``.
    mu : float
        Weight ``>= 0`` of the unit eigen-direction (a step of ``lr * mu`` in parameter space).
    betas : (float, float)
        Adam's moment decay rates, each in ``[0, 1)``.
    eps : float
        Adam's denominator offset ``> 0``.
    gamma, every, max_matvecs, tol, which, seed, curvature_closure
        As :class:`HybridHessianSGD`.

    Notes
    -----
    State per parameter: ``step`` (Adam's count), ``exp_avg``, ``exp_avg_sq``, ``eigvec``.
    """

    _owner = "HybridHessianAdam"

    def __init__(self, params: Any, lr: float = 1e-3, mu: float = 0.1, *,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 gamma: float = 0.0, every: int = 10, max_matvecs: int = 10, tol: float = 1e-3,
                 which: str = "magnitude", seed: int = 0,
                 curvature_closure: Optional[CurvatureSource] = None):
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"{self._owner}: betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"{self._owner}: eps must be positive, got {eps}")
        super().__init__(params, dict(lr=lr, mu=mu, gamma=gamma, betas=tuple(betas), eps=eps),
                         every=every, max_matvecs=max_matvecs, tol=tol, which=which, seed=seed,
                         curvature_closure=curvature_closure)

    def _update(self, p, g, state, group, eta, sign):
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        k = state["step"]
        m, r = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1.0 - beta1)
        r.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (r / (1.0 - beta2 ** k)).sqrt_().add_(group["eps"])
        p.addcdiv_(m, denom, value=-eta / (1.0 - beta1 ** k))
        p.add_(state["eigvec"], alpha=-eta * group["mu"] * sign)


# --------------------------------------------------------------------------------------------
# SharpnessTracker
# --------------------------------------------------------------------------------------------
class SharpnessTracker:
    r"""Callback recording the sharpness :math:`\lambda_{\max}(H_t)` over training next to the
    edge-of-stability threshold :math:`2/\eta` (gradient descent on a quadratic diverges along
    an eigendirection with :math:`\lambda > 2/\eta`; Cohen et al. 2021 find full-batch GD
    training hovering at :math:`\lambda_{\max} \approx 2/\eta`).

    Call :meth:`on_step` from any training loop; every ``every``-th step it estimates the top
    eigenvalue of the Hessian of ``loss_fn`` on ``batch`` at the model's current weights
    (Lanczos, ``max_matvecs`` products, warm-started), without changing the model. For adaptive
    optimizers (Adam) ``2/lr`` is not the stability threshold (that is about the preconditioned
    sharpness); the column is recorded anyway.

    Parameters
    ----------
    every : int
        Estimate when ``step % every == 0``.
    which : {"largest", "magnitude"}
        ``lambda_max`` (algebraically largest, default) or the eigenvalue of largest ``|lambda|``.
    tol : float
        Lanczos stops early once ``|H v - lambda v| <= tol |lambda|``.
    max_matvecs : int
        Hessian-vector products per estimate.
    seed : int
        Seed of the first (cold) start vector.
    warm_start : bool
        Start each estimate from the previous eigenvector.
    params : iterable of str or Parameter, optional
        Parameters the Hessian is taken over (default: all with ``requires_grad``).
    operator_kwargs : dict, optional
        Passed to :class:`landscape_ext.HessianOperator` (``mode``, ``batch_norm``, ...).

    Attributes
    ----------
    history : list of dict
        Per estimate: ``step``, ``lambda_max``, ``eigenvalue`` (same), ``lr``,
        ``eos_threshold`` (``2/lr``), ``sharpness_ratio`` (``lambda_max * lr / 2``; above 1 is
        past the edge of stability), ``loss``, ``residual``, ``converged``, ``n_matvecs``,
        ``warm_start``, ``time_s``.
    """

    _owner = "SharpnessTracker"

    def __init__(self, every: int = 1, *, which: str = "largest", tol: float = 1e-3,
                 max_matvecs: int = 20, seed: int = 0, warm_start: bool = True,
                 params: Optional[Iterable[Union[str, Tensor]]] = None,
                 operator_kwargs: Optional[Dict[str, Any]] = None):
        _check_settings(self._owner, every, max_matvecs, tol, which)
        self.every = every
        self.which = which
        self.tol = float(tol)
        self.max_matvecs = max_matvecs
        self.seed = int(seed)
        self.warm_start = bool(warm_start)
        self.params = None if params is None else list(params)
        self.operator_kwargs = dict(operator_kwargs or {})
        self.history: List[Dict[str, Any]] = []
        self._vector: Optional[Tensor] = None

    def on_step(self, step: int, model: Optional[nn.Module] = None,
                loss_fn: Optional[Callable[[Any, Tensor], Tensor]] = None, batch: Any = None,
                lr: Optional[Union[float, torch.optim.Optimizer]] = None, *,
                loss: Optional[Union[Tensor, float]] = None,
                curvature: Optional[CurvatureSource] = None) -> Optional[Dict[str, Any]]:
        """Record ``lambda_max`` if ``step % every == 0``.

        Parameters
        ----------
        step : int
            The training loop's step counter.
        model, loss_fn, batch
            The Hessian is that of ``loss_fn(model(inputs), targets)`` on ``batch``
            (``(inputs, targets)``) at the current weights.
        lr : float or torch.optim.Optimizer, optional
            The learning rate (an optimizer: its first group's ``lr``), for ``2/lr``.
        loss : Tensor or float, optional
            The step's loss: recorded and checked for NaN/Inf (checked on every call).
        curvature : callable or operator-like, optional
            A curvature source instead of ``model``/``loss_fn``/``batch`` (known Hessians).

        Returns
        -------
        dict or None
            The new record, or ``None`` when no estimate was due.

        Raises
        ------
        FloatingPointError
            NaN/Inf loss or curvature estimate (message names the step).
        """
        _check_loss(loss, self._owner, step)
        if step % self.every != 0:
            return None
        if curvature is None:
            if model is None or loss_fn is None or batch is None:
                raise ValueError(f"{self._owner}: on_step needs model, loss_fn and batch (or "
                                 f"curvature=) at step {step}")
            curvature = hessian_closure(model, loss_fn, batch, self.params,
                                        **self.operator_kwargs)
        op = _resolve_operator(curvature, self._owner, step)
        v0 = self._vector if self.warm_start else None
        record, vec = _top_eigenpair(op, which=self.which, tol=self.tol,
                                     max_matvecs=self.max_matvecs, seed=self.seed, v0=v0,
                                     owner=self._owner, step=step)
        self._vector = vec
        if isinstance(lr, torch.optim.Optimizer):
            lr = lr.param_groups[0]["lr"]
        lr = None if lr is None else float(lr)
        lam = record["eigenvalue"]
        record.update(
            lambda_max=lam, lr=lr,
            eos_threshold=(2.0 / lr) if lr else None,
            sharpness_ratio=(lam * lr / 2.0) if lr else None,
            loss=None if loss is None else float(loss.detach() if isinstance(loss, Tensor)
                                                 else loss))
        self.history.append(record)
        return record

    __call__ = on_step

    # -- views --------------------------------------------------------------------------------
    @property
    def steps(self) -> List[int]:
        return [h["step"] for h in self.history]

    @property
    def lambda_max(self) -> List[float]:
        return [h["lambda_max"] for h in self.history]

    @property
    def n_matvecs(self) -> int:
        return sum(h["n_matvecs"] for h in self.history)

    def __len__(self) -> int:
        return len(self.history)

    def to_dict(self) -> Dict[str, Any]:
        """Settings, totals and the history as JSON-serialisable builtins."""
        return to_builtin({
            "every": self.every, "which": self.which, "tol": self.tol,
            "max_matvecs": self.max_matvecs, "seed": self.seed, "warm_start": self.warm_start,
            "n_matvecs": self.n_matvecs, "history": self.history,
        })

    def plot(self, ax: Any = None) -> Any:
        """``lambda_max`` against the step, with ``2/lr`` dashed where known. Returns the axes."""
        import matplotlib.pyplot as plt  # lazy: optional dependency

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        steps = np.asarray(self.steps, dtype=float)
        ax.plot(steps, np.asarray(self.lambda_max, dtype=float), marker="o", ms=3,
                label=r"$\lambda_{\max}$")
        eos = [(h["step"], h["eos_threshold"]) for h in self.history
               if h.get("eos_threshold") is not None]
        if eos:
            s, e = zip(*eos)
            ax.plot(s, e, ls="--", color="k", label=r"$2/\eta$")
        ax.set_xlabel("step")
        ax.set_ylabel("sharpness")
        ax.legend()
        return ax

    def __repr__(self) -> str:
        last = self.history[-1]["lambda_max"] if self.history else None
        return (f"{self._owner}(every={self.every}, which={self.which!r}, "
                f"n_estimates={len(self.history)}, last_lambda_max={last})")
