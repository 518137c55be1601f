"""The generalized Gauss-Newton matrix of a model and loss as an operator (autograd modes; the
fused MLP path is :class:`landscape_ext.mlp.MLPBackend`, the loss Hessian
:mod:`landscape_ext._losses`)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _losses, _model
from .model import ModelOperator, RowAssembler
from .own_loss import OwnLoss, gauss_newton_loss_spec
from .sharded import ShardedGGNOperator, is_fsdp_model

__all__ = ["GGNOperator"]


class GGNOperator(ModelOperator):
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
    reduction, the cross-entropy term runs the op ``landscape_ext.ops.xent_hvp`` (its kernel or
    its plain-PyTorch composite as :func:`landscape_ext.ops.resolve_impl` decides;
    ``fused_loss_hessian=False`` forces the composite). ``loss_fn`` may also be the string
    ``"cross_entropy"`` or ``"mse"``.

    ``loss_fn=None`` (a model that computes its own loss, HuggingFace style: dict batches
    ``model(**batch)`` with ``labels``, an output with ``.loss`` and ``.logits`` or a dict with
    ``"loss"`` and ``"logits"``): the outputs are the logits ``(batch, ..., classes)`` and the
    loss is recognised as the cross-entropy of the logits against ``batch["labels"]``
    (``ignore_index=-100``), unshifted or with the causal-LM shift (``logits[:, :-1]`` against
    ``labels[:, 1:]``): whichever reproduces the model's ``loss`` on the first batch to
    ``sqrt(eps)`` of its dtype (``inferred_loss`` says which); every later batch is checked
    against it. A loss that neither reproduces (label smoothing, class weights, a regression
    loss, a sum), or both, is a ``ValueError`` giving the values: pass ``loss_fn`` then.

    ``mode``: ``forward-over-reverse`` computes ``J V`` by ``vmap(jvp)`` and ``J^T U`` by batched
    vector-Jacobian products; ``double-backward`` obtains ``J V`` by the double-vjp trick (no
    forward AD needed) with batched cotangents, ``double-backward-loop`` the same one direction
    at a time; ``fused-mlp`` runs the fused MLP products (:mod:`landscape_ext.mlp`,
    GGN variant: R-forward + R-backward without the second-order terms) for plain MLPs with
    cross-entropy (class-index targets) or MSE; ``auto`` uses ``fused-mlp`` when it applies,
    otherwise measures the three autograd modes per power-of-two bucket of ``k`` and keeps the
    fastest, like :class:`HessianOperator` (``mode_choices``, ``mode_timings``). ``compile``
    runs ``J V`` by ``vmap(jvp)`` under ``torch.compile``. Other parameters as
    :class:`HessianOperator`.
    """

    curvature = "ggn"

    def __new__(cls, model: Any = None, *args: Any, **kwargs: Any):
        # an FSDP2-sharded model gets the sharded operator (operators/sharded.py)
        if cls is GGNOperator and is_fsdp_model(model):
            return ShardedGGNOperator(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, *args: Any,
                 fused_loss_hessian: bool = True, mode: str = "auto",
                 cache_graph: Union[bool, str] = "auto", **kwargs: Any):
        self.fused_loss_hessian = bool(fused_loss_hessian)
        #: with ``loss_fn=None``: which cross-entropy of the logits the model's loss is
        self.own_loss = OwnLoss("GGNOperator")
        self.loss_spec = gauss_newton_loss_spec(loss_fn, "GGNOperator")
        self.loss_kind = self.loss_spec.kind
        super().__init__(model, _losses.loss_callable(loss_fn), data, *args, mode=mode,
                         cache_graph=cache_graph, **kwargs)
        self.cache_graph = False

    def _out_hessian(self, outputs: Tensor, R: Tensor, targets: Tensor) -> Tensor:
        """The loss Hessian w.r.t. the outputs applied to ``R (k, *outputs.shape)``."""
        try:
            return _losses.output_hessian(
                self.loss_spec, outputs, targets, R,
                loss_fn=lambda z, t: self._loss(z, t, "", self._loss_of_outputs),
                impl="auto" if self.fused_loss_hessian else "composite")
        except ValueError as exc:
            raise ValueError(f"GGNOperator: {exc}") from None

    def _apply_rows_forward_over_reverse(self, X: Tensor, inputs: Any, targets: Tensor,
                                         where: str) -> Tensor:
        return self._ggn_rows(self._forward(inputs, targets, where), X, "forward", False)

    def _double_backward_state(self, inputs: Any, targets: Tensor, where: str) -> Any:
        state = self._forward(inputs, targets, where)
        # the graph of the double-vjp trick, shared by all directions: u -> J^T u
        u = torch.zeros_like(state["out"], requires_grad=True)
        with torch.enable_grad():
            g = torch.autograd.grad(state["out"], state["leaves"], u, create_graph=True,
                                    retain_graph=True, allow_unused=True)
        state["u"] = u
        state["jt_u"] = [(gi, name) for gi, name in zip(g, self.param_names) if gi is not None]
        return state

    def _double_backward_rows(self, state: Any, X: Tensor, where: str, loop: bool,
                              retain: bool, batched: bool = False) -> Tensor:
        return self._ggn_rows(state, X, "loop" if loop else "batched", retain)

    def _forward(self, inputs: Any, targets: Tensor, where: str) -> Dict[str, Any]:
        """One forward pass with its graph: ``{"out", "leaves", "targets"}``."""
        base = _model.detached_parameters(self.model)
        leaves = [base[n].clone().requires_grad_(True) for n in self.param_names]
        full = dict(base)
        full.update(zip(self.param_names, leaves))
        with torch.enable_grad():
            raw = self._call_model(full, inputs)
        out = self._gauss_newton_outputs(raw, where)
        if self.loss_fn is None:
            targets = self._own_loss_targets(raw, out, inputs, where)
        loss = self._loss(out.detach(), targets, where, self._loss_of_outputs)
        self._check_finite(loss, "the loss", where)
        return {"out": out, "leaves": leaves, "targets": targets, "inputs": inputs}

    def _ggn_rows(self, state: Dict[str, Any], X: Tensor, how: str, retain: bool) -> Tensor:
        """``J^T H_out J`` for the rows of ``X`` on one forward pass (``state``): per piece the
        Jacobian products ``J V`` (``how``: ``"forward"`` by ``vmap(jvp)``, ``"batched"`` by
        the double-vjp trick with batched cotangents, ``"loop"`` the same per direction), the
        loss Hessian, and vector-Jacobian products ``J^T U``."""
        out, leaves, targets = state["out"], state["leaves"], state["targets"]
        k = X.shape[0]
        pieces = ([(i, i + 1) for i in range(k)] if how == "loop" else
                  self._row_pieces(k) if how == "forward" else self._chunks(k))
        result = RowAssembler(k, len(pieces))
        for index, (start, end) in enumerate(pieces):
            chunk = X[start:end]
            if how == "forward":
                JV = self._jacobian_rows_forward(chunk, state["inputs"])
            else:
                JV = self._jacobian_rows_double_backward(chunk, state, batched=how != "loop")
            U = self._out_hessian(out, JV, targets)
            keep = retain or index + 1 < len(pieces)
            with torch.enable_grad():
                if how == "loop":
                    gv = torch.autograd.grad(out, leaves, U[0], retain_graph=keep,
                                             allow_unused=True)
                    gv = [g.unsqueeze(0) if g is not None else None for g in gv]
                else:
                    gv = torch.autograd.grad(out, leaves, U, is_grads_batched=True,
                                             retain_graph=keep, allow_unused=True)
            gv = [g if g is not None else X.new_zeros((end - start,) + tuple(leaf.shape))
                  for g, leaf in zip(gv, leaves)]
            result.put(start, self.layout.join_rows(gv, end - start))
            del gv, JV, U
        return result.result()

    @property
    def _loss_of_outputs(self) -> Any:
        """The loss as a function of the outputs the Jacobian is taken of."""
        return F.cross_entropy if self.loss_fn is None else self.loss_fn

    def _gauss_newton_outputs(self, raw: Any, where: str) -> Tensor:
        """The outputs the Jacobian is taken of: the model's output tensor, or with
        ``loss_fn=None`` its logits as ``(positions, classes)`` rows."""
        return self.own_loss.gauss_newton_outputs(raw, self.loss_fn is not None, where)

    def _own_loss_targets(self, raw: Any, rows: Tensor, inputs: Any, where: str) -> Tensor:
        return self.own_loss.targets(raw, rows, inputs, where)

    @property
    def inferred_loss(self) -> Optional[str]:
        """With ``loss_fn=None``: the loss found to reproduce the model's own
        (``"cross_entropy"`` or ``"causal_lm_cross_entropy"``; ``None`` before the first
        product)."""
        return self.own_loss.inferred

    def _jacobian_rows_forward(self, X: Tensor, inputs: Any) -> Tensor:
        """``J v`` for each row ``v`` of ``X`` by ``vmap(jvp)`` (compiled under ``compile``)."""
        base = _model.detached_parameters(self.model)
        selected = {n: base[n] for n in self.param_names}
        rest = {n: t for n, t in base.items() if n not in selected}
        return self._run_compiled("jacobian-forward", self._jv_rows_fn, selected, rest,
                                  self.layout.split_rows(X), inputs)

    def _jv_rows_fn(self, selected: Dict[str, Tensor], rest: Dict[str, Tensor],
                    V: Dict[str, Tensor], inputs: Any) -> Tensor:
        """``J v`` for the rows of ``V``: a function of tensors only (one bound method, so a
        compiled version is reused)."""
        from torch.func import jvp, vmap

        def outputs_of(p):
            full = dict(rest)
            full.update(p)
            return self._gauss_newton_outputs(self._call_model(full, inputs), "")

        return vmap(lambda v: jvp(outputs_of, (selected,), (v,))[1])(V)

    def _jacobian_rows_double_backward(self, X: Tensor, state: Dict[str, Any],
                                       batched: bool = True) -> Tensor:
        """``J v`` for each row ``v`` of ``X`` without forward-mode AD: the vjp of the vjp
        ``u -> J^T u`` built once per forward (``state``); one call per row unless
        ``batched``."""
        pairs, u = state["jt_u"], state["u"]
        V = self.layout.split_rows(X)
        with torch.enable_grad():
            if batched:
                return torch.autograd.grad([gi for gi, _ in pairs], u, [V[n] for _, n in pairs],
                                           is_grads_batched=True, retain_graph=True)[0]
            return torch.autograd.grad([gi for gi, _ in pairs], u, [V[n][0] for _, n in pairs],
                                       retain_graph=True)[0].unsqueeze(0)


# the FSDP2 operator is a GGN operator to its users (isinstance); see hessian.py
GGNOperator.register(ShardedGGNOperator)
