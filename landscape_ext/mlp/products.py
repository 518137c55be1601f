r"""The fused Pearlmutter products of an MLP for k directions at once (the math: the package
docstring of :mod:`landscape_ext.mlp`), and the public functions :func:`mlp_hvp`,
:func:`mlp_matmat`, :func:`mlp_apply_rows`."""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _losses, _model, ops
from .._losses import LossSpec
from .structure import MLPStructure, NotAnMLP, mlp_structure

__all__ = ["MLPCurvature", "mlp_apply_rows", "mlp_matmat", "mlp_hvp", "FUSED_DEFAULT"]

#: Whether :func:`mlp_hvp` uses the ops' kernels (act_derivs, xent_hvp) by default on the CPU:
#: the choice is :data:`landscape_ext.ops.IMPL_DEFAULTS`' (measured in bench/bench_hvp.py).
FUSED_DEFAULT = ops.resolve_impl("act_derivs", "cpu") == "fused"


# ---- losses ----------------------------------------------------------------------------------


def _loss_config(loss: Any, reduction: str, ignore_index: int, label_smoothing: float) -> LossSpec:
    """The loss as the MLP path needs it: cross-entropy or MSE with mean or sum reduction."""
    try:
        spec = _losses.loss_spec(loss, reduction, ignore_index, label_smoothing)
    except ValueError:
        raise NotAnMLP(f"loss {loss!r} is not supported by the MLP path (use 'cross_entropy' "
                       f"or 'mse')") from None
    if spec.kind == "generic":
        raise NotAnMLP(f"{spec.reason}: not supported by the MLP path (use 'cross_entropy', "
                       f"'mse' or their nn / functional forms)")
    if spec.reduction not in ("mean", "sum"):
        raise NotAnMLP(f"reduction {spec.reduction!r} is not supported by the MLP path ('mean' "
                       f"or 'sum')")
    return spec


def _impl(fused: Optional[bool]) -> str:
    """The ``impl`` of the ops for the public ``fused`` flag (None: the ops' own choice)."""
    return "auto" if fused is None else ("fused" if fused else "composite")


# ---- the products ----------------------------------------------------------------------------


def _act(z: Tensor, act: str, impl: str, order: int):
    """(a, s1, s2) with s1/s2 None where they are 1/0 (identity, ReLU's s2, or order 1)."""
    if act == "identity":
        return z, None, None
    a, s1, s2 = ops.act_derivs(z, act, impl=impl)
    if act == "relu" or order < 2:
        s2 = None
    return a, s1, s2


class _Plan:
    """Per-call data shared by all chunks of directions: weights, forward and first-order
    backward results, where each parameter's direction lives in the rows of X."""

    def __init__(self, structure: MLPStructure, params: Mapping[str, Tensor],
                 owner: str = "mlp_matmat"):
        model_params = dict(structure.model.named_parameters())
        unknown = [n for n in params if n not in model_params]
        if unknown:
            raise ValueError(f"{owner}: {unknown[:3]} are not parameters of the model "
                             f"(names as in model.named_parameters())")
        for n, p in params.items():
            if tuple(p.shape) != tuple(model_params[n].shape):
                raise ValueError(f"{owner}: params[{n!r}] has shape {tuple(p.shape)}, the "
                                 f"model's has {tuple(model_params[n].shape)}")
        # where each parameter's direction lives in the rows of X
        self.layout = _model.ParameterLayout(list(params), [p.shape for p in params.values()])
        self.d = self.layout.d

        def value(n):
            return (params[n] if n in params else model_params[n]).detach()

        self.W = [value(layer.weight) for layer in structure.layers]
        self.b = [None if layer.bias is None else value(layer.bias) for layer in structure.layers]
        dtypes = {w.dtype for w in self.W} | {b.dtype for b in self.b if b is not None}
        if len(dtypes) != 1:
            raise NotAnMLP(f"the MLP's parameters have several dtypes {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        self.device = self.W[0].device
        self.acts = [layer.act for layer in structure.layers]
        self.layers = structure.layers
        # first layer whose parameters have directions: nothing varies below it
        has = [layer.weight in self.layout.offsets
               or (layer.bias is not None and layer.bias in self.layout.offsets)
               for layer in structure.layers]
        self.first = has.index(True) if any(has) else len(has)


def _view(T: Tensor, plan: _Plan, name: Optional[str],
          shape: Tuple[int, ...]) -> Optional[Tensor]:
    """The columns of T (k, d) that belong to parameter `name`, as a (k, *shape) view."""
    if name is None or name not in plan.layout.offsets:
        return None
    return plan.layout.block(T, name).view((T.shape[0],) + shape)


def _products(plan: _Plan, A: List[Tensor], S1: List[Optional[Tensor]],
              S2: List[Optional[Tensor]], D: List[Optional[Tensor]], C2: List[Optional[Tensor]],
              f: Tensor, y: Tensor, X: Tensor, cfg: LossSpec, hessian: bool, impl: str) -> Tensor:
    """Rows X (k, d) -> rows (k, d) of H X^T or G X^T for one chunk of directions.

    Layout (k, B, n): products with the shared weight are one GEMM over all k B rows
    (``(k B, n_in) @ (n_in, n_out)``); products with the per-direction dW_j are one batched GEMM
    (``bmm``) that reads dW_j in place from the rows of X, with the activations broadcast (no
    copies). Memory: the only per-direction tensors kept across layers are R z_l (k, B, n_l), for
    the Hessian only (R a_{l-1} is recomputed from R z_{l-1} in the backward sweep); results go
    straight into the output rows.
    """
    k = X.shape[0]
    L = len(plan.layers)
    B = A[0].shape[0]
    dims = [(layer.out_features, layer.in_features) for layer in plan.layers]
    dW = [_view(X, plan, layer.weight, dims[l]) for l, layer in enumerate(plan.layers)]
    db = [_view(X, plan, layer.bias, dims[l][:1]) for l, layer in enumerate(plan.layers)]

    # ---- R-forward ---------------------------------------------------------------------------
    Ra: Optional[Tensor] = None     # R a_{l-1} (k, B, n_in); None = 0
    RZ: List[Optional[Tensor]] = [None] * L
    for l in range(plan.first, L):
        W, (n_out, n_in) = plan.W[l], dims[l]
        Rz: Optional[Tensor] = None
        # bmm first, then the shared-weight GEMM accumulated with addmm_ on the 2-D view: an
        # in-place baddbmm_ with broadcast operands falls back to k addmm_ with copies (measured
        # at half the product's time at width 1024)
        if dW[l] is not None:        # a_{l-1} dW_j^T: one bmm, a broadcast over j
            Rz = torch.bmm(A[l].expand(k, B, n_in), dW[l].transpose(1, 2))
        if Ra is not None:           # R a_{l-1} W^T: one GEMM over k B rows
            if Rz is None:
                Rz = (Ra.view(k * B, n_in) @ W.t()).view(k, B, n_out)
            else:
                Rz.view(k * B, n_out).addmm_(Ra.view(k * B, n_in), W.t())
        if db[l] is not None:
            if Rz is None:
                Rz = db[l].unsqueeze(1).expand(k, B, n_out).contiguous()
            else:
                Rz.add_(db[l].unsqueeze(1))
        if hessian:
            RZ[l] = Rz
        if Rz is None or S1[l] is None:
            Ra = Rz
        elif hessian:                # R z_l is kept for the R-backward: a new tensor
            Ra = Rz * S1[l]
        else:                        # GGN: R z_l is not needed again, scale it in place
            Ra = Rz.mul_(S1[l])
    if Ra is None:
        return X.new_zeros((k, plan.d))

    # ---- loss Hessian and R-backward ------------------------------------------------------------
    out = X.new_empty((k, plan.d))  # every column belongs to a layer >= plan.first: all written
    Rga = _losses.output_hessian(cfg, f, y, Ra, impl=impl)
    del Ra
    buf: Optional[Tensor] = None    # R a_{l-1} of the Hessian's cross term
    dexp: Optional[Tensor] = None   # delta_l broadcast over the k directions (reused buffer)
    for l in range(L - 1, plan.first - 1, -1):
        W, (n_out, n_in) = plan.W[l], dims[l]
        # Rga is always a fresh tensor (the loss Hessian's output or a GEMM's): scale in place
        Rd = Rga.mul_(S1[l]) if S1[l] is not None else Rga.contiguous()
        del Rga
        if hessian and S2[l] is not None and RZ[l] is not None:
            Rd.addcmul_(RZ[l], C2[l])
        RZ[l] = None
        # R a_{l-1} for the Hessian's cross term, recomputed from R z_{l-1}
        Ra_in: Optional[Tensor] = None
        if hessian and l > plan.first and RZ[l - 1] is not None:
            if S1[l - 1] is None:
                Ra_in = RZ[l - 1]
            else:                    # reuse one buffer for R a_{l-1} across layers
                if buf is None or buf.shape != RZ[l - 1].shape:
                    buf = torch.empty_like(RZ[l - 1])
                Ra_in = torch.mul(RZ[l - 1], S1[l - 1], out=buf)
        slot = _view(out, plan, plan.layers[l].weight, dims[l])
        if slot is not None:
            # R g_W_j = R delta_j^T a_{l-1} (+ delta^T R a_{l-1, j}): bmm (+ baddbmm), written
            # straight into the output rows (no (k, n_out, n_in) temporary and copy)
            torch.bmm(Rd.transpose(1, 2), A[l].expand(k, B, n_in), out=slot)
            if Ra_in is not None:    # + delta^T R a_j, accumulated in place
                # delta materialised once per layer: baddbmm_ with a broadcast (stride-0)
                # batch falls back to k addmm_ with copies; stacking [Rd_j; delta] and
                # [a; R a_j] for one bmm copied four such blocks (4% of the product)
                if dexp is None or dexp.shape != (k, B, n_out):
                    dexp = torch.empty((k, B, n_out), dtype=Rd.dtype, device=Rd.device)
                dexp.copy_(D[l].expand(k, B, n_out))
                slot.baddbmm_(dexp.transpose(1, 2), Ra_in)
        del Ra_in
        bslot = _view(out, plan, plan.layers[l].bias, (n_out,))
        if bslot is not None:
            torch.sum(Rd, 1, out=bslot)
        if l > plan.first:
            # R g_a_{l-1} = R delta W (+ delta dW_j): one GEMM (+ one baddbmm)
            if hessian and dW[l] is not None:
                Rga = torch.bmm(D[l].expand(k, B, n_out), dW[l])
                Rga.view(k * B, n_in).addmm_(Rd.view(k * B, n_out), W)
            else:
                Rga = (Rd.view(k * B, n_out) @ W).view(k, B, n_in)
        del Rd
    return out


def _forward(plan: _Plan, x: Tensor, hessian: bool, impl: str):
    A: List[Tensor] = []
    S1: List[Optional[Tensor]] = []
    S2: List[Optional[Tensor]] = []
    a = x
    for l in range(len(plan.layers)):
        A.append(a)
        z = torch.addmm(plan.b[l], a, plan.W[l].t()) if plan.b[l] is not None else a @ plan.W[l].t()
        a, s1, s2 = _act(z, plan.acts[l], impl, 2 if hessian else 1)
        S1.append(s1)
        S2.append(s2)
    return a, A, S1, S2


def _first_order_backward(plan: _Plan, g: Tensor, S1, S2):
    """delta_l = g_{a_l} * s1 and C2_l = g_{a_l} * s2 for every layer."""
    L = len(plan.layers)
    D: List[Optional[Tensor]] = [None] * L
    C2: List[Optional[Tensor]] = [None] * L
    ga = g
    for l in range(L - 1, plan.first - 1, -1):
        d = ga * S1[l] if S1[l] is not None else ga
        D[l] = d
        if S2[l] is not None:
            C2[l] = ga * S2[l]
        if l > plan.first:
            ga = d @ plan.W[l]
    return D, C2


def _prepare_inputs(structure: MLPStructure, plan: _Plan, inputs: Any) -> Tensor:
    if not isinstance(inputs, Tensor):
        raise NotAnMLP(f"inputs must be one tensor for the MLP path, got {type(inputs).__name__}")
    x = inputs.to(device=plan.device)
    if structure.flatten_input:
        x = x.flatten(1)
    n0 = structure.layers[0].in_features
    if x.dim() != 2 or x.shape[1] != n0:
        raise NotAnMLP(f"inputs of shape {tuple(inputs.shape)} do not give (batch, {n0}) rows"
                       + (" after flattening" if structure.flatten_input else "")
                       + " (the MLP path needs 2-D inputs)")
    return x.to(plan.dtype)


def _check_targets(f: Tensor, y: Tensor, cfg: LossSpec) -> Tensor:
    if not isinstance(y, Tensor):
        raise NotAnMLP(f"targets must be a tensor, got {type(y).__name__}")
    y = y.to(f.device)
    if cfg.kind == "ce":
        if y.dtype != torch.int64 or y.shape != (f.shape[0],):
            raise NotAnMLP(f"cross-entropy targets must be int64 class indices of shape "
                           f"({f.shape[0]},) for the MLP path, got {y.dtype} {tuple(y.shape)}")
        return y
    if y.shape != f.shape:
        raise NotAnMLP(f"MSE targets of shape {tuple(y.shape)} do not match the outputs "
                       f"{tuple(f.shape)} (torch would broadcast; the MLP path does not)")
    return y.to(f.dtype)


class MLPCurvature:
    """The per-batch state of the fused products, reusable for any number of them.

    Runs the forward pass (and, for the Hessian, the first-order backward) once; each
    :meth:`apply_rows` then costs only the R-forward / R-backward sweeps. :class:`MLPBackend`
    keeps one of these while the parameters are unchanged (single batch), so single-direction
    products do not repeat the forward and backward.

    Parameters
    ----------
    structure, params, inputs, targets, loss, curvature, reduction, ignore_index,
    label_smoothing, fused
        As :func:`mlp_matmat`. Parameter values are read (detached) at construction.
    check_finite : bool
        Raise ``ValueError`` when the outputs are not finite (the engine checks the loss
        itself, with its own message, and passes False).
    owner : str
        The caller named in error messages (``mlp_matmat``, or the operator's class).

    Attributes
    ----------
    f : Tensor
        The model's outputs on the batch ``(B, n_out)``.
    y : Tensor
        The targets as used (on the outputs' device).

    Raises
    ------
    NotAnMLP
        Loss, inputs or targets outside this path.
    """

    def __init__(self, structure: MLPStructure, params: Mapping[str, Tensor], inputs: Any,
                 targets: Tensor, loss: Any = "cross_entropy", curvature: str = "hessian",
                 reduction: str = "mean", *, ignore_index: int = -100,
                 label_smoothing: float = 0.0, fused: Optional[bool] = None,
                 check_finite: bool = True, owner: str = "mlp_matmat"):
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"{owner}: curvature must be 'hessian' or 'ggn', got "
                             f"{curvature!r}")
        self.owner = owner
        self.cfg = _loss_config(loss, reduction, ignore_index, label_smoothing)
        self.impl = _impl(fused)
        self.hessian = curvature == "hessian"
        self.plan = plan = _Plan(structure, params, owner)
        self.d = plan.d
        with torch.no_grad():
            x = _prepare_inputs(structure, plan, inputs)
            f, self.A, self.S1, self.S2 = _forward(plan, x, self.hessian, self.impl)
            self.y = _check_targets(f, targets, self.cfg)
            if not structure.verified:
                _verify(structure, plan, params, inputs, f)
            if check_finite and not bool(torch.isfinite(f).all()):
                raise ValueError(f"{owner}: the model outputs non-finite values "
                                 f"({structure.describe()})")
            self.f = f
            self.D: List[Optional[Tensor]] = []
            self.C2: List[Optional[Tensor]] = []
            if self.hessian and plan.d > 0:
                self.D, self.C2 = _first_order_backward(
                    plan, _losses.output_gradient(self.cfg, f, self.y), self.S1, self.S2)

    def apply_rows(self, X: Tensor, chunk_size: Optional[int] = None) -> Tensor:
        """``X (k, d) -> (k, d)``: the rows of ``X`` times the Hessian / GGN of the batch."""
        plan = self.plan
        if X.dim() != 2 or X.shape[1] != plan.d:
            raise ValueError(f"{self.owner}: expected directions of shape (k, {plan.d}) as rows, "
                             f"got {tuple(X.shape)}")
        k = X.shape[0]
        if k == 0 or plan.d == 0:
            return X.new_zeros((k, plan.d), dtype=plan.dtype)
        with torch.no_grad():
            # rows contiguous: mlp_matmat passes V.t() (d, k) -> (k, d) strided, and every bmm on
            # a strided dW_j view would copy it per direction (measured ~1 s of 5.5 s at width
            # 1024, k = 16); one copy of X is cheaper
            X = X.to(device=plan.device, dtype=plan.dtype).contiguous()
            step = k if chunk_size is None else max(1, int(chunk_size))
            outs = [_products(plan, self.A, self.S1, self.S2, self.D, self.C2, self.f, self.y,
                              X[s:s + step], self.cfg, self.hessian, self.impl)
                    for s in range(0, k, step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def mlp_apply_rows(structure: MLPStructure, params: Mapping[str, Tensor], inputs: Tensor,
                   targets: Tensor, X: Tensor, loss: Any = "cross_entropy",
                   curvature: str = "hessian", reduction: str = "mean", *,
                   ignore_index: int = -100, label_smoothing: float = 0.0,
                   chunk_size: Optional[int] = None, fused: Optional[bool] = None) -> Tensor:
    """Rows version of :func:`mlp_matmat`: ``X (k, d) -> (k, d)`` (``X @ A``, ``A`` symmetric),
    the layout of ``CurvatureOperator.apply_rows``."""
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"mlp_matmat: curvature must be 'hessian' or 'ggn', got {curvature!r}")
    _loss_config(loss, reduction, ignore_index, label_smoothing)
    d = _Plan(structure, params).d
    if X.dim() != 2 or X.shape[1] != d:
        raise ValueError(f"mlp_matmat: expected directions of shape (k, {d}) as rows, got "
                         f"{tuple(X.shape)}")
    state = MLPCurvature(structure, params, inputs, targets, loss, curvature, reduction,
                         ignore_index=ignore_index, label_smoothing=label_smoothing, fused=fused)
    return state.apply_rows(X, chunk_size)


def mlp_matmat(structure: MLPStructure, params: Mapping[str, Tensor], inputs: Tensor,
               targets: Tensor, V: Tensor, loss: Any = "cross_entropy",
               curvature: str = "hessian", reduction: str = "mean", *,
               ignore_index: int = -100, label_smoothing: float = 0.0,
               chunk_size: Optional[int] = None, fused: Optional[bool] = None) -> Tensor:
    r"""Hessian or GGN of the batch loss of an MLP times ``V``, all columns in one pass.

    Parameters
    ----------
    structure : MLPStructure
        From :func:`mlp_structure`.
    params : mapping of str to Tensor
        The parameters the rows of ``V`` refer to, by their ``model.named_parameters()`` names,
        **in the order of V's rows** (the engine passes its selected parameters in
        ``named_parameters()`` order). Their values are used; parameters of the model not in
        ``params`` are held fixed at the model's current values.
    inputs : Tensor
        ``(B, n0)`` (or ``(B, ...)`` when the model starts with ``nn.Flatten()``).
    targets : Tensor
        Cross-entropy: ``(B,)`` int64. MSE: the shape of the outputs.
    V : Tensor
        ``(d, k)`` or ``(d,)``, ``d`` = total size of ``params``.
    loss : str, nn.CrossEntropyLoss, nn.MSELoss, F.cross_entropy or F.mse_loss
        ``"cross_entropy"`` or ``"mse"``; module forms carry their own reduction, ignore_index
        and label_smoothing.
    curvature : {"hessian", "ggn"}
    reduction : {"mean", "sum"}
        Of the batch loss (as torch's).
    ignore_index, label_smoothing
        Cross-entropy options (as ``F.cross_entropy``).
    chunk_size : int, optional
        At most this many directions per pass (bounds the ``(B, k, width)`` intermediates).
    fused : bool, optional
        Use the fused ops (:func:`ops.act_derivs`, :func:`ops.xent_hvp`); default
        :data:`FUSED_DEFAULT`.

    Returns
    -------
    Tensor
        Shape of ``V``, dtype of the parameters.

    Raises
    ------
    NotAnMLP
        Loss, inputs or targets outside this path (use the generic path), or a non-Sequential
        model whose forward does not match its layers.
    """
    one = V.dim() == 1
    d = _Plan(structure, params).d
    if V.dim() not in (1, 2) or V.shape[0] != d:
        # the message names the layout this function takes (columns), with the shape as passed
        raise ValueError(f"mlp_matmat: expected directions of shape ({d},) or ({d}, k), one "
                         f"direction per column (d = {d} parameters), got {tuple(V.shape)}"
                         + (f"; for k directions as rows pass directions.T"
                            if V.dim() == 2 and V.shape[1] == d else ""))
    X = V.reshape(1, -1) if one else V.t()
    out = mlp_apply_rows(structure, params, inputs, targets, X, loss, curvature, reduction,
                         ignore_index=ignore_index, label_smoothing=label_smoothing,
                         chunk_size=chunk_size, fused=fused)
    return out[0] if one else out.t()


def _verify(structure: MLPStructure, plan: _Plan, params: Mapping[str, Tensor], inputs: Tensor,
            f: Tensor) -> None:
    from torch.func import functional_call
    full = {n: p.detach() for n, p in structure.model.named_parameters()}
    full.update({n: p.detach() for n, p in params.items()})
    out = functional_call(structure.model, full, (inputs,), strict=False)
    if not isinstance(out, Tensor) or out.shape != f.shape:
        raise NotAnMLP(f"the model's forward does not return the output of its layer stack "
                       f"({structure.describe()})")
    eps = torch.finfo(f.dtype).eps
    scale = float(out.abs().max()) if out.numel() else 0.0
    if not torch.allclose(out.to(f.dtype), f, rtol=1e3 * eps, atol=1e3 * eps * max(scale, 1.0)):
        raise NotAnMLP(f"the model's forward is not the composition of its children in order "
                       f"({structure.describe()}): use the generic path")
    structure.verified = True


def mlp_hvp(model: nn.Module, inputs: Tensor, targets: Tensor, directions: Tensor,
            loss: Any = "cross_entropy", curvature: str = "hessian", *,
            reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
            chunk_size: Optional[int] = None, fused: Optional[bool] = None) -> Tensor:
    r"""Exact Hessian (``curvature="hessian"``) or GGN (``"ggn"``) of an MLP's batch loss times
    ``k`` directions, in one fused Pearlmutter pass (see the module docstring for the math).

    Parameters
    ----------
    model : nn.Module
        An MLP as :func:`mlp_structure` accepts; not modified.
    inputs, targets : Tensor
        One batch (cross-entropy targets: int64 class indices).
    directions : Tensor
        ``(d,)`` or ``(d, k)`` over the parameters with ``requires_grad`` in
        ``model.named_parameters()`` order (the engine's layout).
    loss, curvature, reduction, ignore_index, label_smoothing, chunk_size, fused
        As :func:`mlp_matmat`.

    Returns
    -------
    Tensor
        Shape of ``directions``.

    Raises
    ------
    NotAnMLP
        When the model / loss / data are outside the MLP path.

    Shapes
    ------
    directions (d, k) -> (d, k)
    """
    structure = mlp_structure(model, strict=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return mlp_matmat(structure, params, inputs, targets, directions, loss, curvature, reduction,
                      ignore_index=ignore_index, label_smoothing=label_smoothing,
                      chunk_size=chunk_size, fused=fused)
