r"""The layer-factor ("kronecker") product engine.

For a Linear (or Conv2d, after im2col) layer the per-sample weight gradient is
:math:`g_i = \sum_t e_{i,t} a_{i,t}^\top` with ``a`` the layer input and ``e`` the output
gradient, so ``G Z^T`` is :func:`landscape_ext.ops.linear_grad_sketch` and ``W^T G`` is
:func:`landscape_ext.ops.linear_grad_project` of the factors. One forward and one backward of the
summed losses per batch give all factors (the output gradients of the summed loss are per-sample
because samples do not interact in eval mode). Selected parameters of other layers get
per-sample gradients by ``vmap(grad)`` restricted to them.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .._model import check_finite
from ._engines import ProductEngine
from ._problem import PerSampleProblem
from .per_sample import per_sample_gradient_chunks

log = logging.getLogger(__name__)

_FACTOR_CACHE_BYTES = 1 << 28     # layer factors kept across passes


class FactorsUnsupported(Exception):
    """The layer factors cannot give the products of this model (or of one of its layers)."""


@dataclass
class FactorLayer:
    """A Linear/Conv2d layer holding selected parameters."""

    module: nn.Module
    label: str
    kind: str                 # "linear" | "conv2d"
    weight: Optional[str]     # selected weight name (None: not selected)
    bias: Optional[str]       # selected bias name
    n_out: int
    n_in: int                 # flattened (conv: C_in * kh * kw)


def _conv2d_padding(module: nn.Conv2d) -> Optional[Tuple[int, int]]:
    """The symmetric padding of a Conv2d as ``unfold`` takes it (``None``: not expressible)."""
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same" and all(s == 1 for s in module.stride):
            pads = []
            for size, dilation in zip(module.kernel_size, module.dilation):
                total = dilation * (size - 1)
                if total % 2:
                    return None  # asymmetric padding: not expressible by unfold
                pads.append(total // 2)
            return (pads[0], pads[1])
        return None
    return (int(padding[0]), int(padding[1]))


def _supported_layer(module: nn.Module) -> Optional[Tuple[str, int, int]]:
    """``(kind, n_out, n_in)`` of a layer the factors handle, else ``None``."""
    if type(module) is nn.Linear:
        return "linear", module.out_features, module.in_features
    if (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and _conv2d_padding(module) is not None):
        return ("conv2d", module.out_channels,
                module.in_channels * module.kernel_size[0] * module.kernel_size[1])
    return None


def factor_plan(problem: PerSampleProblem) -> Tuple[List[FactorLayer], List[str]]:
    """Supported layers holding selected parameters, and the selected parameters left over."""
    model = problem.model
    by_id = {id(p): n for n, p in model.named_parameters()}
    selected = set(problem.names)
    owners: Dict[str, List[nn.Module]] = {}
    for _, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            if p is not None and id(p) in by_id:
                owners.setdefault(by_id[id(p)], []).append(module)

    def covered(param: Optional[Tensor]) -> Optional[str]:
        # a parameter shared with a module of another kind is not covered by the factors: it is
        # left to the per-sample gradients (all of its uses are then seen)
        name = by_id.get(id(param)) if param is not None else None
        if name not in selected or any(type(o) not in (nn.Linear, nn.Conv2d)
                                       for o in owners.get(name, [])):
            return None
        return name

    layers: List[FactorLayer] = []
    for module_name, module in model.named_modules():
        shape = _supported_layer(module)
        if shape is None:
            continue
        weight, bias = covered(module.weight), covered(module.bias)
        if weight is None and bias is None:
            continue
        layers.append(FactorLayer(module, module_name or "<root>", shape[0], weight, bias,
                                  shape[1], shape[2]))
    names_covered = {n for L in layers for n in (L.weight, L.bias) if n is not None}
    return layers, [n for n in problem.names if n not in names_covered]


def _bias_grads(E: Tensor) -> Tensor:
    """Per-sample bias gradients from output gradients ``(b, n_out)`` or ``(b, T, n_out)``."""
    return E if E.dim() == 2 else E.sum(1)


def _per_sample_weight_grads(A: Tensor, E: Tensor) -> Tensor:
    """``sum_t e_t a_t^T`` per sample, ``(b, n_out, n_in)``, from ``A (b, T, n_in)`` and ``E (b,
    T, n_out)`` (materialized: the exact squared sums of token-shared layers)."""
    return torch.einsum("nto,nti->noi", E, A)


class KroneckerEngine(ProductEngine):
    """``G z`` and ``G^T w`` from layer inputs and output gradients (``linear_grad_sketch`` /
    ``linear_grad_project``); other selected parameters by per-sample gradients (``vmap(grad)``
    restricted to them).

    ``sketch_impl``: ``"fused"`` or ``"composite"`` (resolved by
    :func:`landscape_ext.ops.resolve_impl`); the project product takes the ops' default.
    """

    name = "kronecker"

    def __init__(self, problem: PerSampleProblem, chunk_size: Optional[int], sketch_impl: str):
        super().__init__(problem, chunk_size)
        self.layers, self.others = factor_plan(problem)
        if not self.layers:
            raise FactorsUnsupported("no Linear/Conv2d layer holds a selected parameter")
        self.sketch_impl = sketch_impl
        self.project_impl = ops.resolve_impl("linear_grad_project", problem.device)
        self.all_2d = False
        # factors of each batch, kept across passes while they fit in _FACTOR_CACHE_BYTES (the
        # samples are checked to be the same on every pass): later passes skip forward/backward
        self._cache: Optional[Dict[int, Any]] = {}
        self._cache_bytes = 0

    @property
    def covered_fraction(self) -> float:
        """Share of the selected parameters handled by the layer factors."""
        return 1.0 - sum(self.problem.sizes[n] for n in self.others) / self.problem.d

    def plan_signature(self) -> float:
        """A checksum of the split of the parameters (equal on all ranks when the ranks resolved
        the same plan)."""
        text = ";".join([f"{L.label}:{L.weight}:{L.bias}" for L in self.layers] + list(self.others))
        return float(zlib.crc32(text.encode()))

    def demote(self, layer: FactorLayer, why: str) -> None:
        """Hand a layer's parameters (and every layer sharing them) to per-sample gradients."""
        log.info("kronecker: layer %s handled by per-sample gradients (%s)", layer.label, why)
        names = {n for n in (layer.weight, layer.bias) if n is not None}
        gone = [L for L in self.layers if names & {L.weight, L.bias}]
        for L in gone:
            self.layers.remove(L)
            names |= {n for n in (L.weight, L.bias) if n is not None}
        keep = set(self.others) | names
        self.others = [n for n in self.problem.names if n in keep]

    def capture(self, inputs, targets, batch_size, where):
        """Forward with hooks + one backward of the summed per-sample losses:
        ``{id(layer): [(A, E), ...]}`` for each call of each layer."""
        problem = self.problem
        base = problem.base_params()
        leaves = {n: base[n].clone().requires_grad_(True) for n in problem.names}
        full = dict(base)
        full.update(leaves)
        records: Dict[int, List[Tuple[Tensor, Tensor]]] = {id(L): [] for L in self.layers}
        handles = []
        for L in self.layers:
            def hook(module, args, kwargs, out, _key=id(L)):
                x = args[0] if args else kwargs.get("input")
                records[_key].append((x.detach(), out))
            handles.append(L.module.register_forward_hook(hook, with_kwargs=True))
        try:
            with torch.enable_grad():
                losses = problem.losses(full, inputs, targets, batch_size, where)
        finally:
            for handle in handles:
                handle.remove()
        check_finite(losses.detach(), "the per-sample loss", problem.owner, where)
        outs = [o for L in self.layers for _, o in records[id(L)]]
        grads = iter(torch.autograd.grad(losses.sum(), outs, allow_unused=True) if outs else [])
        factors: Dict[int, List[Tuple[Tensor, Tensor]]] = {}
        for L in self.layers:
            layer_factors = []
            for x, out in records[id(L)]:
                e = next(grads)
                if e is None:
                    e = torch.zeros_like(out)
                layer_factors.append(self._layer_factors(L, x, e.detach(), batch_size))
            factors[id(L)] = layer_factors
        return factors

    @staticmethod
    def _layer_factors(L: FactorLayer, x: Tensor, e: Tensor,
                       batch_size: int) -> Tuple[Tensor, Tensor]:
        """``(A, E)``: ``(b, n_in)`` / ``(b, n_out)``, or ``(b, T, .)`` for a layer applied at
        ``T`` positions per sample (tokens, conv patches)."""
        if x.dim() < 2 or x.shape[0] != batch_size:
            raise FactorsUnsupported(f"layer {L.label} input has shape {tuple(x.shape)}: its first "
                                     f"dimension is not the batch of {batch_size} samples")
        if L.kind == "linear":
            if x.dim() == 2:
                return x, e
            return x.reshape(batch_size, -1, L.n_in), e.reshape(batch_size, -1, L.n_out)
        module = L.module
        A = F.unfold(x, module.kernel_size, dilation=module.dilation,
                     padding=_conv2d_padding(module), stride=module.stride)   # (b, C_in kh kw, P)
        return A.transpose(1, 2), e.reshape(batch_size, L.n_out, -1).transpose(1, 2)

    def probe(self, inputs, targets, batch_size, where) -> None:
        """First batch: layers never called (e.g. an out_proj used functionally) or called on
        inputs whose first dimension is not the batch move to per-sample gradients."""
        while True:
            try:
                factors = self.capture(inputs, targets, batch_size, where)
            except FactorsUnsupported as exc:
                bad = next((L for L in self.layers if f"layer {L.label} " in str(exc)), None)
                if bad is None:
                    raise
                self.demote(bad, str(exc))
                continue
            silent = [L for L in self.layers if not factors[id(L)]]
            for L in silent:
                if L in self.layers:
                    self.demote(L, "its forward was never called")
            if not self.layers:
                raise FactorsUnsupported("no Linear/Conv2d layer is called on the batch")
            if silent:
                continue
            # gram needs Linear layers on 2-D inputs, each called once per batch
            self.all_2d = all(L.kind == "linear" and len(factors[id(L)]) == 1
                              and factors[id(L)][0][0].dim() == 2 for L in self.layers)
            return

    def prepare_batch(self, index, inputs, targets, batch_size, where):
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        ctx = self.prepare(inputs, targets, batch_size, where)
        if self._cache is not None:
            factors, G_others, _ = ctx
            tensors = [t for pairs in factors.values() for pair in pairs for t in pair]
            tensors += [G_others] if G_others is not None else []
            self._cache_bytes += sum(t.numel() * t.element_size() for t in tensors)
            if self._cache_bytes <= _FACTOR_CACHE_BYTES:
                self._cache[index] = ctx
            else:
                self._cache = None
        return ctx

    def prepare(self, inputs, targets, batch_size, where):
        """``(factors, G_others, batch_size)``: the layer factors and the per-sample gradients of
        the other selected parameters (``None`` if there are none)."""
        factors = self.capture(inputs, targets, batch_size, where)
        G_others = None
        if self.others:
            G_others = torch.cat([G for _, G in per_sample_gradient_chunks(
                self.problem, inputs, targets, batch_size, self.others, self.chunk_size, where)])
        return factors, G_others, batch_size

    def _add_to_others(self, out: Tensor, R: Tensor) -> None:
        """Add the columns of ``R (k, d_others)`` to the other parameters' columns of ``out``."""
        offset = 0
        for n in self.others:
            size = self.problem.sizes[n]
            self.problem.block(out, n).add_(R[:, offset:offset + size].to(out.dtype))
            offset += size

    def sketch(self, ctx, Z):
        factors, G_others, batch_size = ctx
        problem = self.problem
        Z = Z.to(problem.dtype)
        l = Z.shape[0]
        y = Z.new_zeros((batch_size, l))
        for L in self.layers:
            for A, E in factors[id(L)]:
                if L.weight is not None:
                    V = problem.block(Z, L.weight).view(l, L.n_out, L.n_in)
                    y += ops.linear_grad_sketch(A, E, V, impl=self.sketch_impl)
                if L.bias is not None:
                    y += _bias_grads(E) @ problem.block(Z, L.bias).T
        if G_others is not None:
            y += G_others @ torch.cat([problem.block(Z, n) for n in self.others], 1).T
        return y

    def project(self, ctx, W, out):
        factors, G_others, _ = ctx
        problem = self.problem
        W = W.to(problem.dtype).contiguous()
        l = W.shape[1]
        for L in self.layers:
            for A, E in factors[id(L)]:
                if L.weight is not None:
                    P = ops.linear_grad_project(A, E, W, impl=self.project_impl)
                    problem.block(out, L.weight).add_(P.view(l, -1).to(out.dtype))
                if L.bias is not None:
                    problem.block(out, L.bias).add_((W.T @ _bias_grads(E)).to(out.dtype))
        if G_others is not None:
            self._add_to_others(out, W.T @ G_others)

    def squared_norms(self, ctx):
        factors, G_others, batch_size = ctx
        acc = torch.zeros(batch_size, dtype=torch.float64, device=self.problem.device)
        for L in self.layers:
            for A, E in factors[id(L)]:
                A64, E64 = A.double(), E.double()
                if L.weight is not None:
                    if A.dim() == 2:
                        acc += E64.pow(2).sum(1) * A64.pow(2).sum(1)
                    else:  # |sum_t e_t a_t^T|_F^2 = sum_{t,s} (e_t.e_s)(a_t.a_s)
                        acc += (torch.bmm(E64, E64.transpose(1, 2))
                                * torch.bmm(A64, A64.transpose(1, 2))).sum((1, 2))
                if L.bias is not None:
                    acc += _bias_grads(E64).pow(2).sum(1)
        if G_others is not None:
            acc += G_others.double().pow(2).sum(1)
        return acc

    def add_squared_sum(self, ctx, out):
        factors, G_others, _ = ctx
        rows = out.view(1, -1)
        for L in self.layers:
            for A, E in factors[id(L)]:
                if L.weight is not None:
                    if A.dim() == 2:
                        squares = E.double().pow(2).T @ A.double().pow(2)
                    else:
                        squares = _per_sample_weight_grads(A.double(), E.double()).pow(2).sum(0)
                    self.problem.block(rows, L.weight).add_(squares.reshape(1, -1))
                if L.bias is not None:
                    self.problem.block(rows, L.bias).add_(
                        _bias_grads(E).double().pow(2).sum(0)[None])
        if G_others is not None:
            self._add_to_others(rows, G_others.double().pow(2).sum(0)[None])
