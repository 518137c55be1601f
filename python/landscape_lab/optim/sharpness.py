r"""Sharpness over training: :math:`\lambda_{\max}` of the Hessian next to the edge-of-stability
threshold. :func:`eos_threshold` and :func:`sharpness_fields` are the one definition used by
:class:`SharpnessTracker` and by :mod:`landscape_lab.training` (its ``config`` record and
:class:`~landscape_lab.training.CurvatureCallback`); see docs/optim.md.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .._results import to_builtin
from .curvature import (CurvatureSource, _check_loss, _check_settings, _resolve_operator,
                        _top_eigenpair, hessian_closure)


def eos_threshold(optimizer: str, lr: Optional[float], momentum: float = 0.0
                  ) -> Optional[float]:
    r"""Edge-of-stability sharpness :math:`2(1+\beta)/\eta` of (heavy-ball) SGD.

    Gradient descent with rate :math:`\eta` and momentum :math:`\beta` on a quadratic diverges
    along an eigendirection with :math:`\lambda > 2(1+\beta)/\eta` (:math:`2/\eta` without
    momentum); full-batch training hovers near it (Cohen et al. 2021).

    Parameters
    ----------
    optimizer : str
        ``"sgd"``, or the name of another optimizer (``"adam"``, ...).
    lr : float or None
    momentum : float
        Heavy-ball ``beta``.

    Returns
    -------
    float or None
        ``None`` for adaptive optimizers (their threshold concerns the preconditioned Hessian)
        and when ``lr`` is ``None`` or not positive.
    """
    if optimizer.lower() != "sgd" or lr is None or lr <= 0:
        return None
    return 2.0 * (1.0 + momentum) / lr


def sharpness_fields(lambda_max: float, optimizer: str, lr: Optional[float],
                     momentum: float = 0.0) -> Dict[str, Optional[float]]:
    """``{"eos_threshold": eos_threshold(...), "sharpness_ratio": lambda_max / eos_threshold}``
    (both ``None`` where :func:`eos_threshold` is); a ratio above 1 is past the edge of
    stability."""
    threshold = eos_threshold(optimizer, lr, momentum)
    if threshold is None:
        return {"eos_threshold": None, "sharpness_ratio": None}
    # lambda * lr / (2 (1 + beta)), the tracker's formula before the threshold was shared: its
    # numbers stay bit for bit
    return {"eos_threshold": threshold,
            "sharpness_ratio": lambda_max * lr / (2.0 * (1.0 + momentum))}


class SharpnessTracker:
    r"""Callback recording the sharpness :math:`\lambda_{\max}(H_t)` over training next to the
    edge-of-stability threshold :func:`eos_threshold`, :math:`2(1+\beta)/\eta` (:math:`2/\eta`
    without momentum; see docs/optim.md).

    Call :meth:`on_step` from any training loop; every ``every``-th step it estimates the top
    eigenvalue of the Hessian of ``loss_fn`` on ``batch`` at the model's current weights
    (Lanczos, ``max_matvecs`` products, warm-started), without changing the model. The rate is
    taken as a (heavy-ball) gradient-descent rate whatever the optimizer: for adaptive
    optimizers (Adam) ``2(1+beta)/lr`` is not the stability threshold (that is about the
    preconditioned sharpness); the column is recorded anyway.

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
    momentum : float
        Heavy-ball momentum ``beta`` of the optimizer, for the threshold ``2(1+beta)/lr``
        (default 0: ``2/lr``).

    Attributes
    ----------
    history : list of dict
        Per estimate: ``step``, ``lambda_max``, ``eigenvalue`` (same), ``lr``,
        ``eos_threshold`` (``2(1+beta)/lr``), ``sharpness_ratio`` (``lambda_max /
        eos_threshold``; above 1 is past the edge of stability), ``loss``, ``residual``,
        ``converged``, ``n_matvecs``, ``warm_start``, ``time_s``.
    """

    _owner = "SharpnessTracker"

    def __init__(self, every: int = 1, *, which: str = "largest", tol: float = 1e-3,
                 max_matvecs: int = 20, seed: int = 0, warm_start: bool = True,
                 params: Optional[Iterable[Union[str, Tensor]]] = None,
                 operator_kwargs: Optional[Dict[str, Any]] = None, momentum: float = 0.0):
        _check_settings(self._owner, every, max_matvecs, tol, which)
        if not (math.isfinite(momentum) and momentum >= 0.0):
            raise ValueError(f"{self._owner}: momentum must be finite and >= 0, got {momentum}")
        self.every = every
        self.which = which
        self.tol = float(tol)
        self.max_matvecs = max_matvecs
        self.seed = int(seed)
        self.warm_start = bool(warm_start)
        self.params = None if params is None else list(params)
        self.operator_kwargs = dict(operator_kwargs or {})
        self.momentum = float(momentum)
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
            (``(inputs, targets)``) at the current weights; ``loss_fn=None``: of the loss the
            model computes itself (``model(**batch).loss`` for a dict batch, HuggingFace style;
            see :class:`landscape_ext.HessianOperator`).
        lr : float or torch.optim.Optimizer, optional
            The learning rate (an optimizer: its first group's ``lr``), for the threshold.
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
            # loss_fn=None is the model's own loss (model(**batch).loss, HuggingFace style)
            if model is None or batch is None:
                raise ValueError(f"{self._owner}: on_step needs model and batch, with loss_fn "
                                 f"or None for the model's own loss (or curvature=) at step "
                                 f"{step}")
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
        record.update(lambda_max=lam, lr=lr)
        record.update(sharpness_fields(lam, "sgd", lr, self.momentum))
        record["loss"] = None if loss is None else float(loss.detach() if isinstance(loss, Tensor)
                                                         else loss)
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
            "momentum": self.momentum, "n_matvecs": self.n_matvecs, "history": self.history,
        })

    def plot(self, ax: Any = None) -> Any:
        """``lambda_max`` against the step, with the edge-of-stability threshold dashed where
        known. Returns the axes."""
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
            label = r"$2(1+\beta)/\eta$" if self.momentum else r"$2/\eta$"
            ax.plot(s, e, ls="--", color="k", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("sharpness")
        ax.legend()
        return ax

    def __repr__(self) -> str:
        last = self.history[-1]["lambda_max"] if self.history else None
        return (f"{self._owner}(every={self.every}, which={self.which!r}, "
                f"n_estimates={len(self.history)}, last_lambda_max={last})")
