"""The hybrid Hessian-eigenvector optimizers :class:`HybridHessianSGD` and
:class:`HybridHessianAdam`: a gradient (or Adam) step plus a step along the top Hessian
eigenvector (see docs/optim.md)."""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from landscape_ext import ParameterLayout

from .curvature import (CurvatureSource, _check_grads, _check_loss, _check_settings, operator_order,
                        _resolve_operator, _top_eigenpair)


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
        ordered = operator_order(op, params, self._owner)
        layout = ParameterLayout.of_tensors(ordered)
        v0 = None
        if all("eigvec" in self.state[p] for p in params):
            v0 = layout.flatten([self.state[p]["eigvec"] for p in ordered])
        record, vec = _top_eigenpair(op, which=self.which, tol=self.tol,
                                     max_matvecs=self.max_matvecs, seed=self.seed, v0=v0,
                                     owner=self._owner, step=step)
        for p, part in zip(ordered, layout.unflatten(vec).values()):
            self.state[p]["eigvec"] = part.to(device=p.device, dtype=p.dtype)
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
        Default curvature source for :meth:`step` (see docs/optim.md).

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
