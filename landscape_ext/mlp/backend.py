"""The fused MLP products as a backend of the model operators (:class:`MLPBackend`)."""
from __future__ import annotations

import logging
from typing import Any, Optional, Tuple

from torch import Tensor, nn

from .. import _model
from .products import MLPCurvature, _loss_config
from .structure import MLPStructure, NotAnMLP, mlp_structure

__all__ = ["MLPBackend"]

log = logging.getLogger(__name__)


class MLPBackend:
    """The fused MLP products as the fast path of the model operators.

    Applicable when :func:`mlp_structure` recognises the model, the loss is cross-entropy
    (class-index targets, no class weights) or MSE, and each batch's inputs are one tensor.
    Parameter subsets are supported (the other parameters are held fixed). With ``cacheable``
    (a single batch) the :class:`MLPCurvature` state is kept between products while the
    parameters and the batch are unchanged, so each product costs only the R-forward /
    R-backward sweeps.

    Parameters
    ----------
    model : nn.Module
    layout : landscape_ext._model.ParameterLayout
        The operator's selected parameters (the layout of the directions).
    loss_fn : callable
    curvature : {"hessian", "ggn"}
    owner : str
        The operator's name, for error messages.
    forced : bool
        ``mode="fused-mlp"``: a batch outside the path is a ``ValueError``; otherwise the path
        is given up for good (``applicable`` turns False) and the operator uses autograd.
    cacheable : bool

    Attributes
    ----------
    applicable : bool
    reason : str or None
        Why the path does not apply.
    chunk : int
        Directions per pass when the operator's ``chunk_size`` is not given: larger passes only
        grow the ``(k, B, width)`` intermediates (measured in bench/bench_hvp.py).
    """

    def __init__(self, model: nn.Module, layout: "_model.ParameterLayout", loss_fn: Any,
                 curvature: str, owner: str, forced: bool = False, cacheable: bool = False):
        self.model = model
        self.layout = layout
        self.loss_fn = loss_fn
        self.curvature = curvature
        self.owner = owner
        self.forced = forced
        self.cacheable = cacheable
        self.chunk = 8
        self.structure: Optional[MLPStructure] = None
        self.reason: Optional[str] = None
        self.state: Optional[Tuple[Any, MLPCurvature]] = None
        try:
            if not callable(loss_fn):
                raise NotAnMLP(f"loss_fn {loss_fn!r} is not callable")
            structure = mlp_structure(model, strict=True)
            _loss_config(loss_fn, "mean", -100, 0.0)
            self.structure = structure
        except NotAnMLP as exc:
            self.reason = str(exc)

    @property
    def applicable(self) -> bool:
        return self.structure is not None

    def _state_for(self, inputs: Any, targets: Tensor, where: str) -> MLPCurvature:
        key = None
        if self.cacheable:
            key = (_model.state_key(self.model.parameters())
                   + (id(inputs), getattr(inputs, "_version", None),
                      id(targets), getattr(targets, "_version", None)))
            if self.state is not None and self.state[0] == key:
                return self.state[1]
        self.state = None
        state = MLPCurvature(self.structure, self.layout.values(self.model), inputs, targets,
                             self.loss_fn, self.curvature, check_finite=False, owner=self.owner)
        loss = self.loss_fn(state.f, targets)
        _model.check_finite(loss.detach(), "the loss", self.owner, where)
        if key is not None:
            self.state = (key, state)
        return state

    def apply_rows(self, X: Tensor, inputs: Any, targets: Tensor, where: str,
                   chunk_size: Optional[int] = None) -> Optional[Tensor]:
        """The batch's product with the rows of ``X``, or ``None`` when the batch is outside the
        path (not ``forced``; the path is then given up)."""
        if not self.applicable:
            return None
        try:
            state = self._state_for(inputs, targets, where)
            return state.apply_rows(X, chunk_size or self.chunk)
        except NotAnMLP as exc:
            self.state = None
            if self.forced:
                raise ValueError(f"{self.owner}: mode='fused-mlp' is not applicable {where}: "
                                 f"{exc}") from exc
            self.structure = None
            self.reason = str(exc)
            log.debug("%s: fused MLP path not applicable (%s); using autograd", self.owner, exc)
            return None
