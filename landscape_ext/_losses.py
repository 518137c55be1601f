r"""The loss layer: which loss a callable is, and its derivatives with respect to the outputs.

Used by the GGN operator (:math:`J^\top H_\text{out} J`), the fused MLP products (the loss
gradient and Hessian at the top of the R-backward sweep) and the plain-PyTorch reference of the
``xent_hvp`` op. Cross-entropy and MSE have closed forms; any other loss is "generic" (its
output Hessian by double backward).

Cross-entropy's Hessian with respect to the logits ``z`` (class dimension 1) applied to ``r``:

.. math:: H r = p \odot r - p\,(p^\top r), \qquad p = \mathrm{softmax}(z),

divided by the number of counted rows for the mean reduction (rows whose target is
``ignore_index`` are zero). Label smoothing does not enter (the target distribution sums to one).
With probability targets each row is scaled by its target mass. MSE: :math:`H = 2 I /
\text{numel}` (mean) or :math:`2 I` (sum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["LossSpec", "loss_spec", "loss_callable", "cross_entropy_hessian", "output_gradient",
           "output_hessian", "forward_ad_safe_loss"]

F = nn.functional
_CE_NAMES = ("cross_entropy", "ce", "crossentropy")
_MSE_NAMES = ("mse", "mse_loss")


@dataclass(frozen=True)
class LossSpec:
    """What a loss callable is, as far as its output derivatives are concerned.

    Attributes
    ----------
    kind : {"ce", "mse", "generic"}
    reduction : str
        ``"mean"``, ``"sum"`` (or another torch reduction, which the closed forms reject).
    ignore_index, label_smoothing
        Cross-entropy options.
    reason : str
        For ``generic``: why the closed forms do not apply.
    """

    kind: str
    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    reason: str = ""


def loss_spec(loss: Any, reduction: str = "mean", ignore_index: int = -100,
              label_smoothing: float = 0.0) -> LossSpec:
    """Recognise cross-entropy and MSE.

    ``loss`` may be the strings ``"cross_entropy"`` / ``"mse"`` (and aliases), the functions
    ``F.cross_entropy`` / ``F.mse_loss`` (both take the options given here), or the modules
    ``nn.CrossEntropyLoss`` (without class weights) / ``nn.MSELoss`` (which carry their own). A
    subclass overriding ``forward`` and everything else is ``generic``; an unknown string is a
    ``ValueError``.
    """
    if isinstance(loss, str):
        name = loss.lower().replace("-", "_")
        if name in _CE_NAMES:
            return LossSpec("ce", reduction, int(ignore_index), float(label_smoothing))
        if name in _MSE_NAMES:
            return LossSpec("mse", reduction)
        raise ValueError(f"unknown loss {loss!r}; use 'cross_entropy', 'mse' or a callable")
    for base in (nn.CrossEntropyLoss, nn.MSELoss):
        if isinstance(loss, base) and type(loss).forward is not base.forward:
            return LossSpec("generic", reason=f"loss {type(loss).__name__} overrides forward() of "
                                              f"its torch base class")
    if isinstance(loss, nn.CrossEntropyLoss):
        if loss.weight is not None:
            return LossSpec("generic", reason="CrossEntropyLoss with class weights")
        return LossSpec("ce", loss.reduction, int(loss.ignore_index), float(loss.label_smoothing))
    if isinstance(loss, nn.MSELoss):
        return LossSpec("mse", loss.reduction)
    if loss is F.cross_entropy:
        return LossSpec("ce", reduction, int(ignore_index), float(label_smoothing))
    if loss is F.mse_loss:
        return LossSpec("mse", reduction)
    return LossSpec("generic", reason=f"loss {loss!r} is not cross-entropy or MSE")


def loss_callable(loss: Any) -> Callable[[Any, Tensor], Tensor]:
    """The callable of a loss given by name (``"cross_entropy"`` -> ``F.cross_entropy``); other
    losses unchanged."""
    if isinstance(loss, str):
        return F.cross_entropy if loss_spec(loss).kind == "ce" else F.mse_loss
    return loss


def cross_entropy_hessian(logits: Tensor, targets: Tensor, R: Tensor, reduction: str = "mean",
                          ignore_index: int = -100) -> Tensor:
    """Cross-entropy Hessian w.r.t. ``logits`` applied to ``R (k, *logits.shape)``, in plain torch.

    ``logits`` ``(N, C, *extra)`` or ``(C,)``; ``targets`` class indices ``(N, *extra)`` or
    probabilities of the logits' shape. Computed in the dtype of ``logits``/``R`` (promoted).
    """
    z = logits.detach()
    p = torch.softmax(z, dim=1 if z.dim() > 1 else 0)
    if z.dim() == 1:
        p, R = p.unsqueeze(0), R.unsqueeze(1)
    pr = p.unsqueeze(0) * R
    HR = pr - p.unsqueeze(0) * pr.sum(dim=2, keepdim=True)
    if targets.is_floating_point() and targets.shape == z.shape:
        mass = targets.sum(dim=1, keepdim=True)
        HR = HR * mass.unsqueeze(0)
        n = z.shape[0] * (math.prod(z.shape[2:]) if z.dim() > 2 else 1)
    else:
        mask = targets != ignore_index
        if bool(mask.all()):
            n = targets.numel()
        else:
            HR = HR * mask.unsqueeze(1).unsqueeze(0).to(HR.dtype)
            n = int(mask.sum())
    if z.dim() == 1:
        HR = HR.squeeze(1)
    if reduction == "mean":
        return HR / max(n, 1)
    if reduction != "sum":
        raise ValueError(f"cross-entropy reduction must be 'mean' or 'sum', got {reduction!r}")
    return HR


def output_hessian(spec: LossSpec, outputs: Tensor, targets: Tensor, R: Tensor,
                   loss_fn: Optional[Callable[[Any, Tensor], Tensor]] = None,
                   impl: Optional[str] = "auto") -> Tensor:
    """The loss Hessian w.r.t. ``outputs`` applied to ``R (k, *outputs.shape)``.

    Cross-entropy on ``(N, C)`` logits with class-index targets runs the ``xent_hvp`` op
    (``impl`` as :func:`landscape_ext.ops.resolve_impl`); other cross-entropy shapes and MSE use
    the closed forms; ``generic`` needs ``loss_fn`` (exact Hessian by double backward).
    """
    if spec.kind == "mse":
        if spec.reduction == "mean":
            return R * (2.0 / outputs.numel())
        if spec.reduction == "sum":
            return R * 2.0
        raise ValueError(f"MSE reduction must be 'mean' or 'sum', got {spec.reduction!r}")
    if spec.kind == "ce":
        z = outputs.detach()
        counted = targets != spec.ignore_index
        if (spec.reduction in ("mean", "sum") and z.dim() == 2 and targets.dim() == 1
                and not targets.is_floating_point() and R.dim() == 3 and bool(counted.any())):
            from . import ops
            HR = ops.xent_hvp(z, targets, R, spec.label_smoothing, spec.ignore_index, impl=impl)
            return HR * int(counted.sum()) if spec.reduction == "sum" else HR
        return cross_entropy_hessian(z, targets, R, spec.reduction, spec.ignore_index).to(R.dtype)
    if loss_fn is None:
        raise ValueError(f"output_hessian: a generic loss ({spec.reason}) needs loss_fn")
    z = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        gz = torch.autograd.grad(loss_fn(z, targets), z, create_graph=True)[0]
        if not gz.requires_grad:
            return torch.zeros_like(R)
        return torch.autograd.grad(gz, z, R, is_grads_batched=True)[0]


def output_gradient(spec: LossSpec, outputs: Tensor, targets: Tensor) -> Tensor:
    """d loss / d outputs in closed form (``ce`` on ``(N, C)`` with class indices, or ``mse``)."""
    if spec.kind == "mse":
        denom = outputs.numel() if spec.reduction == "mean" else 1
        return (outputs - targets) * (2.0 / denom)
    if spec.kind != "ce":
        raise ValueError(f"output_gradient: no closed form for a generic loss ({spec.reason})")
    C = outputs.shape[1]
    p = torch.softmax(outputs, dim=1)
    counted = targets != spec.ignore_index
    safe = torch.where(counted, targets, torch.zeros_like(targets))
    # p - ((1 - eps) onehot(y) + eps / C): the gradient of cross_entropy with label smoothing eps
    g = p - spec.label_smoothing / C if spec.label_smoothing else p.clone()
    g.scatter_add_(1, safe.unsqueeze(1), torch.full_like(p[:, :1], -(1.0 - spec.label_smoothing)))
    g = g * counted.unsqueeze(1).to(g.dtype)
    if spec.reduction == "mean":
        g = g / max(int(counted.sum()), 1)
    return g


def forward_ad_safe_loss(loss_fn: Any) -> Any:
    """``mse_loss`` has no working forward-over-reverse rule in torch (its double backward
    writes into a ZeroTensor under ``jvp``); the same loss in elementary ops works."""
    spec = loss_spec(loss_fn) if not isinstance(loss_fn, str) else None
    if spec is None or spec.kind != "mse":
        return loss_fn
    if spec.reduction == "mean":
        return lambda z, t: (z - t).pow(2).mean()
    if spec.reduction == "sum":
        return lambda z, t: (z - t).pow(2).sum()
    return loss_fn
