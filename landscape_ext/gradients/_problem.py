"""The per-sample problem of the gradient geometry: the selected parameters, passes over the data
with a per-sample fingerprint (sample ``i`` must be the same sample on every pass), and the
per-sample losses with their checks. Built from the shared model layer
(:mod:`landscape_ext._model`)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .._model import DataFingerprint, DataSource, ParameterLayout
from .._model import batch_size as batch_size_of
from .._model import (call_model, detached_parameters, explain_size_mismatch, output_loss,
                      unsqueeze_batch, unwrap_ddp)

ParamSpec = Optional[Iterable[Union[str, Tensor]]]


def check_per_sample_reduction(loss_fn: Any, owner: str) -> None:
    """A loss module must have ``reduction="none"`` (one loss per sample)."""
    reduction = getattr(loss_fn, "reduction", None)
    if isinstance(reduction, str) and reduction != "none":
        raise ValueError(
            f"{owner}: loss_fn has reduction={reduction!r}, but per-sample losses are needed: use "
            f"reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none')), so that "
            f"loss_fn(outputs, targets) returns one loss per sample, shape (batch,)")


def check_per_sample_losses(loss: Any, batch_size: int, owner: str, where: str) -> Tensor:
    """``loss`` must be a tensor of shape ``(batch_size,)``; returns it."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{owner}: loss_fn must return a tensor of per-sample losses, got "
                        f"{type(loss).__name__} {where}")
    if loss.dim() == 0:
        raise ValueError(
            f"{owner}: loss_fn returned a scalar {where}: a loss without a per-sample dimension. "
            f"Return per-sample losses of shape (batch,) = ({batch_size},), e.g. "
            f"nn.CrossEntropyLoss(reduction='none')")
    if tuple(loss.shape) != (batch_size,):
        raise ValueError(f"{owner}: loss_fn must return per-sample losses of shape (batch,) = "
                         f"({batch_size},), got {tuple(loss.shape)} {where}")
    return loss


def sample_in_dims(inputs: Any, batch_size: int, owner: str, where: str) -> Any:
    """``vmap`` ``in_dims`` that map over the samples of a batch's inputs: 0 for every tensor
    (one row per sample), ``None`` for 0-d tensors and other values (passed whole)."""
    def dim_of(t: Any) -> Optional[int]:
        if not isinstance(t, Tensor) or t.dim() == 0:
            return None
        if t.shape[0] != batch_size:
            raise ValueError(f"{owner}: per-sample evaluation slices every input tensor along its "
                             f"first dimension, but an input of shape {tuple(t.shape)} does not "
                             f"have the batch's {batch_size} samples there {where}")
        return 0
    return pytree.tree_map(dim_of, inputs)


def own_sample_losses(model: nn.Module, params: Dict[str, Tensor], inputs: Any,
                      batch_size: int, owner: str, where: str) -> Tensor:
    """``(batch_size,)``: the loss the model computes itself (``loss_fn=None``) on each sample
    alone, ``model(**batch[i:i+1]).loss`` (a dict batch sliced per key along dim 0), evaluated
    by ``torch.func.vmap`` over the samples."""
    from torch.func import vmap

    def one(x: Any) -> Tensor:
        return output_loss(call_model(model, params, unsqueeze_batch(x)), owner, where)

    return vmap(one, in_dims=(sample_in_dims(inputs, batch_size, owner, where),))(inputs)


class PerSampleProblem:
    """A model (unwrapped from DDP), a per-sample loss, the selected parameters and the data.

    Attributes
    ----------
    model : nn.Module
    layout : ParameterLayout
        The selected parameters (``names``, ``d``, ``dtype``, ``device`` are its).
    sizes : dict
        Elements of each selected parameter, by name.
    n_samples_hint : int or None
        Samples of one pass when known without a pass (all ranks' once agreed on).
    n_samples : int or None
        Samples of the first recorded pass.
    n_passes : int
        Recorded passes so far.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data: Any, params: ParamSpec,
                 owner: str):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
        model, _, self.unwrapped_ddp = unwrap_ddp(model)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"{owner}: loss_fn must be callable or None (the model computes its "
                            f"own loss), got {type(loss_fn).__name__}")
        # loss_fn=None: sample i's loss is the model's own loss on the one-sample batch i
        self.own_loss = loss_fn is None
        if not self.own_loss:
            check_per_sample_reduction(loss_fn, owner)
        self.owner = owner
        self.model = model
        self.loss_fn = loss_fn
        self.layout = ParameterLayout.from_model(model, params, owner,
                                                 ddp_prefix=self.unwrapped_ddp)
        self.names = self.layout.names
        self.d = self.layout.d
        self.dtype = self.layout.dtype
        self.device = self.layout.device
        self.sizes: Dict[str, int] = dict(zip(self.layout.names, self.layout.sizes))
        self.data = DataSource(data, owner, self.device,
                               one_shot_hint="a DataLoader without shuffling, or a list of batches")
        self.n_samples_hint: Optional[int] = self.data.sample_count_hint()
        self._fingerprint = DataFingerprint(ordered=True)
        self.n_samples: Optional[int] = None
        self.n_passes = 0

    def split_rows(self, X: Tensor, names: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
        """``X (l, d)`` -> per-parameter ``(l, *shape)`` views."""
        return self.layout.split_rows(X, list(names) if names is not None else None)

    def block(self, X: Tensor, name: str) -> Tensor:
        """Columns of parameter ``name`` of ``X (l, d)`` (a view)."""
        return self.layout.block(X, name)

    def base_params(self) -> Dict[str, Tensor]:
        """All parameters of the model, detached (the base of a functional call)."""
        return detached_parameters(self.model)

    def losses(self, params: Dict[str, Tensor], inputs: Any, targets: Tensor, batch_size: int,
               where: str) -> Tensor:
        """The checked per-sample losses ``(batch_size,)`` at parameter values ``params``."""
        if self.own_loss:
            losses = own_sample_losses(self.model, params, inputs, batch_size, self.owner, where)
        else:
            try:
                losses = self.loss_fn(call_model(self.model, params, inputs), targets)
            except Exception as exc:
                clearer = explain_size_mismatch(inputs, targets, exc, self.owner, where)
                if clearer is None:
                    raise
                raise clearer from exc
        return check_per_sample_losses(losses, batch_size, self.owner, where)

    def sample_loss(self, params: Dict[str, Tensor], sample: Any, target: Any,
                    where: str) -> Tensor:
        """The scalar loss of one sample (``sample``, ``target`` without their batch dimension,
        as ``vmap`` over the samples passes them)."""
        if self.own_loss:
            return output_loss(call_model(self.model, params, unsqueeze_batch(sample)),
                               self.owner, where)
        loss = self.loss_fn(call_model(self.model, params, unsqueeze_batch(sample)),
                            unsqueeze_batch(target))
        return check_per_sample_losses(loss, 1, self.owner, where)[0]

    def batches(self, record: bool = True) -> Iterator[Tuple[int, Any, Tensor, int]]:
        """Yield ``(index, inputs, targets, batch_size)``; with ``record`` the pass's sample
        fingerprints are compared with the first pass's when the iteration completes."""
        if record:
            self._fingerprint.start()
        for i, inputs, targets in self.data:
            if self.own_loss:
                batch_size = batch_size_of(inputs, targets)
            elif targets is None:
                raise ValueError(f"{self.owner}: batch {i} is a dict for model(**batch) without "
                                 f"targets: pass loss_fn=None to use the loss the model computes "
                                 f"itself, or (inputs, targets) batches for loss_fn")
            elif not isinstance(targets, Tensor) or targets.dim() == 0:
                raise ValueError(f"{self.owner}: batch {i}: targets must be a tensor with a batch "
                                 f"dimension")
            else:
                batch_size = int(targets.shape[0])
            if record:
                self._fingerprint.add(inputs, targets, batch_size)
            yield i, inputs, targets, batch_size
        if record:
            self._finish_pass()

    def _finish_pass(self) -> None:
        fingerprint = self._fingerprint
        if fingerprint.n == 0:
            raise ValueError(f"{self.owner}: data contains no samples")
        self.n_passes += 1
        if not fingerprint.finish():
            raise ValueError(
                f"{self.owner}: the data changed between passes ({fingerprint.n} samples now, "
                f"{fingerprint.reference_n} in the first pass, or different samples or order). "
                f"The randomized SVD reads the data several times and needs sample i to be the "
                f"same sample on every pass: use a DataLoader with shuffle=False and no random "
                f"augmentation, or a list of batches")
        self.n_samples = fingerprint.reference_n

    def first_batch(self) -> Tuple[Any, Optional[Tensor], int]:
        """``(inputs, targets, batch_size)`` of the first batch (not a recorded pass)."""
        for _, inputs, targets, batch_size in self.batches(record=False):
            return inputs, targets, batch_size
        raise ValueError(f"{self.owner}: data contains no batches")
