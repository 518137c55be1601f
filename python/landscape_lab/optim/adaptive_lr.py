"""The curvature-adaptive learning rate :class:`CurvatureAdaptiveLR` (see docs/optim.md)."""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor

from .._results import to_builtin
from .curvature import (CurvatureSource, _check_grads, _check_loss, _check_settings,
                        _resolve_operator, _top_eigenpair)


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
        Default curvature source when :meth:`step` gets none (see docs/optim.md).
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
