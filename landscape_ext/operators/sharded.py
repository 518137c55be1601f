r"""Curvature operators of models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

:class:`~landscape_ext.HessianOperator` and :class:`~landscape_ext.GGNOperator` return these
operators for a model whose parameters are FSDP2 ``DTensor`` shards. Every rank passes its own
data shard; vectors are the rank's **local rows** (the entries of its parameter shards,
:mod:`landscape_ext.shards`): ``op.shape == (d_local, d_local)``, ``op.d_global`` the full size,
``op @ V`` takes and returns local rows, and the product is the mean over all samples of all
ranks.

Autograd cannot differentiate through FSDP2's gradient hooks (its reduce-scatter is not
differentiable), so the products use the gradients FSDP2 itself produces:

* Hessian: central differences of the reduce-scattered mean gradient,
  :math:`H v \approx (g(w + h v) - g(w - h v)) / 2h` (``mode="central-difference"``), or their
  Richardson extrapolation :math:`(4 D(h/2) - D(h)) / 3` (``mode="richardson"``);
* GGN: :math:`J v` by central differences of the outputs, the loss Hessian in closed form, and
  :math:`J^\top u` exact by FSDP2's backward (``mode_used`` says ``"central-difference"``).

The step is :math:`h = s \max(1, \|w\|) / \|v\|` (global norms) with the relative step ``s =
fd_step`` (default :math:`\epsilon^{1/3}` of the parameter dtype, :math:`\epsilon^{1/5}` for
Richardson), which balances the truncation error :math:`h^2 |\nabla^3 L[v, v, \cdot]| / 6`
(Richardson: :math:`O(h^4)`) against the rounding error :math:`\approx \epsilon |g| / h`. In
float64 the products are accurate to about ``1e-10`` relative on small models (measured in
bench/bench_distributed.py). The parameters' local shards are restored bit for bit after every
product, also on an exception; gradients (``p.grad``) are saved and restored.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _losses, _model
from .. import distributed as _dist
from .._model import DataSource, evaluation_context
from ..shards import VectorShards
from .base import CurvatureOperator
from .own_loss import OwnLoss, gauss_newton_loss_spec

__all__ = ["is_fsdp_model", "ShardedModelOperator", "ShardedHessianOperator",
           "ShardedGGNOperator", "CENTRAL_DIFFERENCE", "RICHARDSON", "SHARDED_MODES"]

CENTRAL_DIFFERENCE = "central-difference"
RICHARDSON = "richardson"
SHARDED_MODES = ("auto", CENTRAL_DIFFERENCE, RICHARDSON)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return None
    return FSDPModule


def is_fsdp_model(model: Any) -> bool:
    """Whether ``model`` is (or contains) an FSDP2 module, i.e. holds ``DTensor`` parameters
    managed by ``fully_shard``."""
    fsdp = _fsdp_module_type()
    if fsdp is None or not isinstance(model, nn.Module):
        return False
    return any(isinstance(m, fsdp) for m in model.modules())


def _fsdp_modules(model: nn.Module) -> List[nn.Module]:
    fsdp = _fsdp_module_type()
    return [m for m in model.modules() if isinstance(m, fsdp)]


def _reshard_all(model: nn.Module) -> None:
    """Free the unsharded parameters: the next forward all-gathers the (perturbed) shards."""
    for m in _fsdp_modules(model):
        m.reshard()


def _gradient_divide_factor(model: nn.Module, world: int, owner: str) -> float:
    """What FSDP2 divides the reduce-scattered gradient sum by (``set_gradient_divide_factor``;
    default the data-parallel size)."""
    factors = set()
    for m in _fsdp_modules(model):
        try:
            groups = m._get_fsdp_state()._fsdp_param_groups
        except AttributeError:  # another FSDP2 version: its documented default
            return float(world)
        for group in groups:
            f = getattr(group, "gradient_divide_factor", None)
            factors.add(float(world) if f is None else float(f))
    if len(factors) > 1:
        raise ValueError(f"{owner}: the FSDP modules divide their gradients by different factors "
                         f"({sorted(factors)}); set one with set_gradient_divide_factor")
    return factors.pop() if factors else float(world)


def _local_index(p: Any, offset: int) -> Tensor:
    """Global positions (in the flattened parameter vector) of the local entries of the
    ``DTensor`` ``p`` whose flattened global tensor starts at ``offset``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, start = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    grid = torch.arange(p.numel(), dtype=torch.int64).reshape(p.shape)
    slices = tuple(slice(s, s + n) for s, n in zip(start, shape))
    return grid[slices].reshape(-1) + offset


def _shard_layout(model: nn.Module, names: List[str], owner: str) -> Tuple[Any, Tensor, int]:
    """``(process group, local index, d)`` of the selected parameters: all ``DTensor`` shards
    on one 1-D device mesh (FSDP2, not HSDP)."""
    DTensor = _dtensor_type()
    named = dict(model.named_parameters())
    mesh = None
    parts, offset = [], 0
    for n in names:
        p = named[n]
        if not isinstance(p, DTensor):
            raise ValueError(f"{owner}: parameter {n!r} is not sharded by FSDP2 (a plain tensor "
                             f"beside DTensor shards); apply fully_shard to the root module "
                             f"so that it manages every parameter")
        if p.device_mesh.ndim != 1:
            raise ValueError(f"{owner}: parameter {n!r} lives on a {p.device_mesh.ndim}-D device "
                             f"mesh; only 1-D FSDP2 meshes are supported (not HSDP)")
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(f"{owner}: the parameters live on different device meshes")
        parts.append(_local_index(p, offset))
        offset += p.numel()
    return mesh.get_group(), torch.cat(parts), offset


class ShardedModelOperator(CurvatureOperator):
    """The machinery shared by :class:`ShardedHessianOperator` and :class:`ShardedGGNOperator`
    (parameters as :class:`~landscape_ext.HessianOperator`; ``mode`` one of
    ``SHARDED_MODES``, ``fd_step`` the relative finite-difference step; ``chunk_size`` and
    ``cache_graph`` have no effect here: FSDP2 runs one parameter value per forward, so the
    directions of a product run one after another)."""

    curvature = ""

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any,
                 params: Optional[Iterable[Union[str, Tensor]]] = None, *, mode: str = "auto",
                 fd_step: Optional[float] = None, batch_norm: str = "eval",
                 accumulate_dtype: Optional[torch.dtype] = None, process_group: Any = None,
                 batch_size: Optional[Callable[[Any], int]] = None, chunk_size: Any = None,
                 check_data: bool = True, cache_graph: Any = "auto"):
        name = type(self).__name__
        if mode not in SHARDED_MODES:
            raise ValueError(f"{name}: mode must be one of {SHARDED_MODES} for an FSDP2 model "
                             f"(autograd cannot differentiate through FSDP2's gradient hooks), "
                             f"got {mode!r}")
        if batch_norm not in ("eval", "train"):
            raise ValueError(f"{name}: batch_norm must be 'eval' or 'train', got {batch_norm!r}")
        if fd_step is not None and not (0 < float(fd_step) < 1):
            raise ValueError(f"{name}: fd_step must be in (0, 1), got {fd_step}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"{name}: loss_fn must be callable or None, got "
                            f"{type(loss_fn).__name__}")
        self.model, self.loss_fn, self.mode, self.batch_norm = model, loss_fn, mode, batch_norm
        self.batch_size = batch_size
        self.check_data = bool(check_data)
        self.param_names = _model.select_parameter_names(model, params, name)
        # a forward under no_grad (an evaluation) leaves FSDP2 modules unsharded, their
        # parameters plain tensors until the next forward: shard them back first (issue 26)
        _reshard_all(model)
        group, local_index, d = _shard_layout(model, self.param_names, name)
        if process_group is not None and _dist.resolve_group(process_group, name) is not None:
            dist = _dist._dist()
            if dist.get_process_group_ranks(process_group) != dist.get_process_group_ranks(group):
                raise ValueError(f"{name}: process_group differs from the FSDP2 mesh's group; "
                                 f"the data shards must be those of the ranks that shard the "
                                 f"model")
        self.process_group = group
        named = dict(model.named_parameters())
        self._params = [named[n] for n in self.param_names]
        self.param_dtype = self._params[0].dtype
        device = self._params[0].to_local().device
        self.vector_shards = VectorShards(group, local_index, d, device, name)
        super().__init__(self.vector_shards.d_local, accumulate_dtype or self.param_dtype, device)
        self.data = DataSource(data, name, device)
        self.divide_factor = _gradient_divide_factor(model, self.vector_shards.world, name)
        self.fd_step = None if fd_step is None else float(fd_step)
        self.n_samples: Optional[int] = None
        self.mode_used: Optional[str] = None
        self.n_forward = 0

    # -- layout ---------------------------------------------------------------------------------
    @property
    def d_global(self) -> int:
        """The full (unsharded) dimension: the sum of ``d`` over the ranks."""
        return self.vector_shards.d

    def _locals(self) -> List[Tensor]:
        with torch.no_grad():
            return [p.to_local() for p in self._params]

    def parameters_vector(self) -> Tensor:
        """This rank's entries of the selected parameters, ``(d_local,)`` (a copy)."""
        return torch.cat([t.detach().reshape(-1) for t in self._locals()]).clone()

    def _set_parameters(self, saved: List[Tensor], x: Optional[Tensor], t: float) -> None:
        """Local shards ``= saved + t x`` (``x`` local rows; ``None``: ``saved`` exactly)."""
        with torch.no_grad():
            offset = 0
            for local, base in zip(self._locals(), saved):
                n = base.numel()
                if x is None:
                    local.copy_(base)
                else:
                    local.copy_(base + t * x[offset:offset + n].reshape(base.shape).to(base.dtype))
                offset += n
        _reshard_all(self.model)

    def _step(self) -> float:
        eps = torch.finfo(self.param_dtype).eps
        if self.fd_step is not None:
            return self.fd_step
        return eps ** (1 / 5) if self.mode == RICHARDSON else eps ** (1 / 3)

    # -- passes over the data -------------------------------------------------------------------
    def _next_batch(self, it: Any, last: Any) -> Tuple[Any, int, bool, Any]:
        """Read this rank's next batch, then agree with every rank whether any still has one
        (failures raise on every rank). Returns ``(batch, weight, more, last)``: a rank whose
        batches are exhausted repeats its last one with weight 0 while others read on."""
        error, batch, n = None, None, 0
        try:
            batch = next(it, None)
            if batch is not None:
                _, inputs, targets = batch
                n = self._samples_in(inputs, targets)
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            error = exc
        table = _dist.exchange_status(self.process_group, error,
                                      (float(batch is not None), float(n)), "reading a batch",
                                      self.device)
        more = bool((table[:, 0] > 0).any())
        if batch is None and more and last is None:
            raise ValueError(f"{type(self).__name__}: rank {self.vector_shards.rank} holds no "
                             f"batch while others do; every rank of an FSDP2 model must hold "
                             f"at least one batch (FSDP2's collectives run in every forward)")
        if batch is None:
            return last, 0, more, last
        return batch, n, more, batch

    def _samples_in(self, inputs: Any, targets: Any) -> int:
        return _model.batch_weight(self.batch_size, inputs, targets, type(self).__name__)

    def _loss(self, outputs: Any, targets: Any) -> Tensor:
        return _model.batch_mean_loss(self.loss_fn, outputs, targets, type(self).__name__)

    def _forward(self, inputs: Any) -> Any:
        self.n_forward += 1
        if isinstance(inputs, dict):
            return self.model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return self.model(*inputs)
        return self.model(inputs)

    def _backward_pass(self, objective: Callable[[Any, Any, int], Tensor]) -> Tensor:
        """Sum over all samples of all ranks of the gradient of ``objective(inputs, targets,
        n_batch)`` (a per-batch scalar whose gradient is the batch's contribution times
        ``n_batch``): one forward and backward per batch (FSDP2's all-gathers and
        reduce-scatter), local rows of the result. Sets ``n_samples``."""
        for p in self.model.parameters():
            p.grad = None
        it, last, n_local = iter(self.data), None, 0
        while True:
            batch, weight, more, last = self._next_batch(it, last)
            if not more:
                break
            error, objective_value = None, None
            try:
                _, inputs, targets = batch
                with torch.enable_grad():
                    objective_value = objective(inputs, targets, weight)
                n_local += weight
            except Exception as exc:  # noqa: BLE001 - raised on every rank before the backward
                error = exc
            _dist.exchange_status(self.process_group, error, (), "in a product", self.device)
            objective_value.mul(self.divide_factor).backward()
            _reshard_all(self.model)
        counts = _dist.exchange_status(self.process_group, None, (float(n_local),),
                                       "in a product", self.device)
        self.n_samples = int(round(float(counts.sum())))
        grads = [p.grad.to_local().reshape(-1) if p.grad is not None
                 else torch.zeros(p.to_local().numel(), dtype=p.dtype, device=self.device)
                 for p in self._params]
        return torch.cat(grads).to(torch.float64)

    # -- the product ----------------------------------------------------------------------------
    def _apply_rows(self, X: Tensor) -> Tensor:
        shards = self.vector_shards
        shards.agree(type(self).__name__, directions=X.shape[0], d=self.d_global)
        X = X.to(torch.float64)
        norms = shards.norms(X)
        saved = [t.detach().clone() for t in self._locals()]
        w_norm = float(shards.norms(torch.cat([t.reshape(1, -1) for t in saved], 1))[0])
        grads = [(p, p.grad) for p in self.model.parameters()]
        out = torch.zeros(X.shape, dtype=torch.float64, device=self.device)
        try:
            with evaluation_context(self.model, self.batch_norm):
                _reshard_all(self.model)
                for i in range(X.shape[0]):
                    if float(norms[i]) == 0.0:
                        continue
                    h = self._step() * max(1.0, w_norm) / float(norms[i])
                    out[i] = self._direction(saved, X[i], h)
        finally:
            self._set_parameters(saved, None, 0.0)
            for p, g in grads:
                p.grad = g
        self.mode_used = RICHARDSON if self.mode == RICHARDSON else CENTRAL_DIFFERENCE
        _model.check_finite(out, "the product", type(self).__name__)
        return out.to(self.dtype)

    def _direction(self, saved: List[Tensor], x: Tensor, h: float) -> Tensor:
        """The product with one direction ``x`` (local rows) with the step ``h``."""
        if self.mode != RICHARDSON:
            return self._central(saved, x, h)
        return (4.0 * self._central(saved, x, h / 2) - self._central(saved, x, h)) / 3.0

    def _central(self, saved: List[Tensor], x: Tensor, h: float) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class ShardedHessianOperator(ShardedModelOperator):
    r"""Hessian of the mean loss of an FSDP2 model by central differences of its
    reduce-scattered gradient (see the module docstring; ``HessianOperator`` returns it for an
    FSDP2 model). Two passes over the data per direction (four with ``mode="richardson"``)."""

    curvature = "hessian"

    def _central(self, saved: List[Tensor], x: Tensor, h: float) -> Tensor:
        def objective(inputs: Any, targets: Any, weight: int) -> Tensor:
            loss = self._loss(self._forward(inputs), targets)
            _model.check_finite(loss.detach(), "the loss", type(self).__name__)
            return loss * weight

        self._set_parameters(saved, x, h)
        plus = self._backward_pass(objective)
        self._set_parameters(saved, x, -h)
        minus = self._backward_pass(objective)
        return (plus - minus) / (2.0 * h * max(self.n_samples, 1))


class ShardedGGNOperator(ShardedModelOperator):
    r"""Generalized Gauss-Newton matrix of an FSDP2 model: ``J v`` by central differences of
    the outputs, the loss Hessian in closed form (cross-entropy, MSE, or by double backward on
    the outputs), ``J^T u`` exact by FSDP2's backward; three forwards and one backward per
    batch and direction (``GGNOperator`` returns it for an FSDP2 model; ``loss_fn=None`` as
    for :class:`~landscape_ext.GGNOperator`: the model's own loss recognised as a cross-entropy
    of its logits against ``batch["labels"]``)."""

    curvature = "ggn"

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, *args: Any,
                 fused_loss_hessian: bool = True, **kwargs: Any):
        #: with ``loss_fn=None``: which cross-entropy of the logits the model's loss is (as
        #: :class:`~landscape_ext.GGNOperator`)
        self.own_loss = OwnLoss("ShardedGGNOperator")
        self.loss_spec = gauss_newton_loss_spec(loss_fn, "ShardedGGNOperator")
        self.impl = "auto" if fused_loss_hessian else "composite"
        super().__init__(model, _losses.loss_callable(loss_fn), data, *args, **kwargs)

    @property
    def inferred_loss(self) -> Optional[str]:
        """With ``loss_fn=None``: the cross-entropy found to reproduce the model's own loss."""
        return self.own_loss.inferred

    def _gauss_newton_outputs(self, raw: Any) -> Tensor:
        """The model's output tensor, or with ``loss_fn=None`` its logits as rows."""
        return self.own_loss.gauss_newton_outputs(raw, self.loss_fn is not None)

    def _outputs_at(self, saved: List[Tensor], x: Tensor, t: float, inputs: Any) -> Tensor:
        self._set_parameters(saved, x, t)
        with torch.no_grad():
            out = self._forward(inputs)
        return self._gauss_newton_outputs(out)

    def _central(self, saved: List[Tensor], x: Tensor, h: float) -> Tensor:
        def objective(inputs: Any, targets: Any, weight: int) -> Tensor:
            jv = (self._outputs_at(saved, x, h, inputs)
                  - self._outputs_at(saved, x, -h, inputs)) / (2.0 * h)
            self._set_parameters(saved, None, 0.0)
            raw = self._forward(inputs)
            outputs = self._gauss_newton_outputs(raw)
            loss_fn = self.loss_fn
            if loss_fn is None:  # the model's own loss as a cross-entropy of its logits
                targets = self.own_loss.targets(raw, outputs, inputs)
                loss_fn = F.cross_entropy
            u = _losses.output_hessian(self.loss_spec, outputs.detach(), targets,
                                       jv.unsqueeze(0).to(outputs.dtype), loss_fn=loss_fn,
                                       impl=self.impl)[0]
            _model.check_finite(u, "the loss Hessian product", type(self).__name__)
            return (outputs * u.detach()).sum() * weight

        out = self._backward_pass(objective)
        return out / max(self.n_samples, 1)
