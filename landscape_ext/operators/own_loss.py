"""A model's own loss (``loss_fn=None``, the HuggingFace convention) written as a function of its
logits, which the Gauss-Newton operators need: the Jacobian is taken of the logits and the loss
Hessian is that of a cross-entropy of the logits against the batch's ``labels``.

:class:`OwnLoss` recognises which cross-entropy the model computes (unshifted, or with the
causal-LM shift) by reproducing the model's ``loss`` on the first batch, and checks every later
batch against it. Used by :class:`~landscape_ext.GGNOperator` and the FSDP2 GGN operator.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _losses, _model

__all__ = ["OwnLoss", "gauss_newton_loss_spec", "IGNORE_INDEX", "CROSS_ENTROPY", "CAUSAL_LM_CROSS_ENTROPY", "field"]

#: The label of positions without a loss (HuggingFace's and ``F.cross_entropy``'s default).
IGNORE_INDEX = -100
CROSS_ENTROPY = "cross_entropy"
CAUSAL_LM_CROSS_ENTROPY = "causal_lm_cross_entropy"
#: The loss spec of the recognised losses: a mean cross-entropy skipping ``IGNORE_INDEX``.
OWN_LOSS_SPEC = _losses.LossSpec("ce", "mean", IGNORE_INDEX)


def gauss_newton_loss_spec(loss_fn: Any, owner: str) -> _losses.LossSpec:
    """The loss spec of a GGN operator's ``loss_fn``: :data:`OWN_LOSS_SPEC` for ``None`` (the
    model's own loss, recognised per batch by :class:`OwnLoss`), else
    :func:`landscape_ext._losses.loss_spec` with errors naming ``owner``."""
    if loss_fn is None:
        return OWN_LOSS_SPEC
    try:
        return _losses.loss_spec(loss_fn)
    except ValueError as exc:
        raise ValueError(f"{owner}: {exc}") from None


def field(outputs: Any, name: str) -> Any:
    """``outputs.<name>`` or ``outputs[name]`` (``None`` when absent)."""
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return None if isinstance(outputs, Tensor) else getattr(outputs, name, None)


class OwnLoss:
    """The cross-entropy a model that returns its own loss computes, found on its first batch.

    Parameters
    ----------
    owner : str
        Names the operator in error messages.

    Attributes
    ----------
    inferred : str or None
        ``"cross_entropy"`` or ``"causal_lm_cross_entropy"`` once a batch was seen.
    """

    def __init__(self, owner: str):
        self.owner = owner
        self.inferred: Optional[str] = None

    def gauss_newton_outputs(self, raw: Any, has_loss_fn: bool, where: str = "") -> Tensor:
        """The outputs a GGN takes the Jacobian of: the model's one output tensor when the
        operator has a ``loss_fn``, else the logits as rows (:meth:`logit_rows`)."""
        if not has_loss_fn:
            return self.logit_rows(raw, where)
        if not isinstance(raw, Tensor):
            raise ValueError(f"{self.owner}: the model must return one tensor, got "
                             f"{type(raw).__name__} (loss_fn=None takes an output with .loss "
                             f"and .logits)")
        return raw

    def logit_rows(self, raw: Any, where: str = "") -> Tensor:
        """The model output's logits ``(batch, ..., classes)`` as ``(positions, classes)`` rows."""
        logits = field(raw, "logits")
        if not isinstance(logits, Tensor) or logits.dim() < 2:
            got = (f"logits of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else
                   f"{type(raw).__name__} without logits")
            raise ValueError(f"{self.owner}: loss_fn=None needs a model output with .logits (or "
                             f"a dict with 'logits') of shape (batch, ..., classes) beside its "
                             f"loss, got {got} {where}; pass loss_fn (a function of the outputs)")
        return logits.reshape(-1, logits.shape[-1])

    def targets(self, raw: Any, rows: Tensor, inputs: Any, where: str = "") -> Tensor:
        """The labels of the logit rows under the cross-entropy that reproduces the model's own
        loss (decided on the first batch, checked on every batch)."""
        labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
        logits = field(raw, "logits")
        if not isinstance(labels, Tensor):
            keys = sorted(inputs)[:8] if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(f"{self.owner}: loss_fn=None needs the labels in the batch under "
                             f"'labels' (a dict batch for model(**batch), the HuggingFace "
                             f"convention) to write the loss as a function of the logits; got "
                             f"{keys} {where}. Pass loss_fn instead")
        if labels.is_floating_point() or tuple(labels.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"{self.owner}: loss_fn=None recognises a cross-entropy of logits "
                             f"(batch, ..., classes) {tuple(logits.shape)} against integer "
                             f"labels of shape {tuple(logits.shape[:-1])}; batch['labels'] is "
                             f"{labels.dtype} of shape {tuple(labels.shape)} {where}. Pass "
                             f"loss_fn")
        candidates = {CROSS_ENTROPY: labels}
        if labels.dim() >= 2:
            # HF causal LMs: position t predicts token t + 1; the last position has no target
            shifted = torch.full_like(labels, IGNORE_INDEX)
            shifted[:, :-1] = labels[:, 1:]
            candidates[CAUSAL_LM_CROSS_ENTROPY] = shifted
        if self.inferred is not None:
            candidates = {self.inferred: candidates[self.inferred]}
        own = _model.output_loss(raw, self.owner, where).detach()
        # a NaN/Inf loss or logit matches no candidate: say that, not "not a cross-entropy"
        _model.check_finite(own, "the model's loss", self.owner, where)
        _model.check_finite(rows.detach(), "the model's logits", self.owner, where)
        z = rows.detach().double()
        values = {name: float(F.cross_entropy(z, t.reshape(-1), ignore_index=IGNORE_INDEX))
                  for name, t in candidates.items()}
        self.inferred = self._matching(float(own), values, own.dtype, where)
        return candidates[self.inferred].reshape(-1)

    def _matching(self, own: float, values: dict, dtype: torch.dtype, where: str) -> str:
        """The one candidate whose value reproduces the model's loss ``own`` to the precision
        of its dtype (``sqrt(eps)``, relative)."""
        tol = math.sqrt(torch.finfo(dtype).eps) * max(1.0, abs(own))
        matches = [name for name, value in values.items() if abs(value - own) <= tol]
        described = {CROSS_ENTROPY: "cross-entropy of logits vs labels",
                     CAUSAL_LM_CROSS_ENTROPY: "causal-LM cross-entropy (logits[:, :-1] vs "
                                              "labels[:, 1:])"}
        listed = "; ".join(f"{described[name]}: {value:.10g}" for name, value in values.items())
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ValueError(f"{self.owner}: loss_fn=None: the model's loss {own:.10g} {where} "
                             f"is not a cross-entropy of its logits that the operator recognises "
                             f"({listed}; ignore_index={IGNORE_INDEX}, no label smoothing or "
                             f"class weights, relative tolerance "
                             f"{tol / max(1.0, abs(own)):.1e}); pass loss_fn explicitly")
        raise ValueError(f"{self.owner}: loss_fn=None: the model's loss {own:.10g} {where} is "
                         f"reproduced by more than one cross-entropy ({listed}), so which one "
                         f"the model computes is ambiguous on this batch; pass loss_fn "
                         f"explicitly")
