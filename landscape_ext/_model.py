"""The model and data layer shared by every model-facing part of the engine.

One place owns what the curvature operators, the gradient geometry, the fused MLP path and the
optimizers all need to know about a model and its data:

* parameter selection and the flat layout of the selected parameters (:class:`ParameterLayout`);
* calling the model on given parameter values (:func:`call_model`);
* batches: the accepted forms of ``data``, their iteration and device moves (:class:`DataSource`);
* the data fingerprint that catches data changing between passes (:class:`DataFingerprint`);
* the model-state guard (:func:`model_state_guard`) and DDP unwrapping (:func:`unwrap_ddp`);
* finite checks with one message format (:func:`check_finite`) and cache keys of tensor values
  (:func:`state_key`).
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

__all__ = [
    "ParameterLayout",
    "select_parameter_names",
    "call_model",
    "detached_parameters",
    "DataSource",
    "DataFingerprint",
    "model_state_guard",
    "differentiable_attention",
    "explain_forward_failure",
    "evaluation_context",
    "ATTENTION_BACKEND",
    "BLOCKWISE_ATTENTION",
    "attention_backend_name",
    "unwrap_ddp",
    "check_finite",
    "state_key",
    "is_single_batch",
    "output_loss",
    "tensors_of",
    "to_device",
    "slice_batch",
    "unsqueeze_batch",
    "batch_size",
    "outside_inference",
    "check_no_inference_tensors",
    "is_forward_ad_error",
    "explain_size_mismatch",
]

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
ParamSpec = Optional[Iterable[Union[str, Tensor]]]


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------


def select_parameter_names(model: nn.Module, params: ParamSpec, owner: str,
                           ddp_prefix: bool = False) -> List[str]:
    """Names of the selected parameters in ``model.named_parameters()`` order.

    ``params``: names or parameters of ``model`` (``None``: all with ``requires_grad``). With
    ``ddp_prefix`` (``model`` was unwrapped from ``DistributedDataParallel``), names of the
    wrapper's parameters (``module.<name>``) are accepted too. Unknown entries and an empty
    selection are errors naming ``owner``."""
    named = list(model.named_parameters())
    if params is None:
        selected = [n for n, p in named if p.requires_grad]
    else:
        by_id = {id(p): n for n, p in named}
        names = {n for n, _ in named}
        chosen = set()
        for p in params:
            if isinstance(p, str) and ddp_prefix and p.startswith("module.") and p not in names:
                p = p[len("module."):]
            if isinstance(p, str):
                if p not in names:
                    raise ValueError(f"{owner}: no parameter named {p!r} in the model")
                chosen.add(p)
            elif isinstance(p, Tensor) and id(p) in by_id:
                chosen.add(by_id[id(p)])
            else:
                raise ValueError(f"{owner}: params must be parameter names or parameters of "
                                 f"the model, got {type(p).__name__}")
        selected = [n for n, _ in named if n in chosen]
    if not selected:
        raise ValueError(f"{owner}: the model has no trainable parameters (none with "
                         f"requires_grad=True{' among params' if params is not None else ''})")
    return selected


class ParameterLayout:
    """The flat layout of a list of parameter tensors: vector ``v (d,)`` or rows ``X (k, d)``
    hold the parameters one after the other, each flattened row-major.

    Parameters
    ----------
    names : sequence of str
        One name per parameter (the model's parameter names, or any labels).
    shapes : sequence of torch.Size
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]):
        if len(names) != len(shapes):
            raise ValueError(f"ParameterLayout: {len(names)} names for {len(shapes)} shapes")
        self.names: List[str] = list(names)
        self.shapes: List[torch.Size] = [torch.Size(s) for s in shapes]
        self.sizes: List[int] = [s.numel() for s in self.shapes]
        self.offsets: Dict[str, int] = {}
        self._size_of: Dict[str, int] = dict(zip(self.names, self.sizes))
        self._shape_of: Dict[str, torch.Size] = dict(zip(self.names, self.shapes))
        offset = 0
        for name, size in zip(self.names, self.sizes):
            self.offsets[name] = offset
            offset += size
        self.d = offset
        self.dtype: Optional[torch.dtype] = None
        self.device: Optional[torch.device] = None

    @classmethod
    def of_tensors(cls, tensors: Sequence[Tensor]) -> "ParameterLayout":
        """Layout of an ordered list of tensors (named by their index)."""
        return cls([str(i) for i in range(len(tensors))], [t.shape for t in tensors])

    @classmethod
    def from_model(cls, model: nn.Module, params: ParamSpec, owner: str,
                   ddp_prefix: bool = False) -> "ParameterLayout":
        """Layout of the selected parameters of ``model`` (see :func:`select_parameter_names`),
        which must share one floating dtype and one device (recorded as ``dtype`` /
        ``device``)."""
        selected = select_parameter_names(model, params, owner, ddp_prefix)
        by_name = dict(model.named_parameters())
        layout = cls(selected, [by_name[n].shape for n in selected])
        dtypes = {by_name[n].dtype for n in selected}
        devices = {by_name[n].device for n in selected}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"{owner}: selected parameters must share one dtype and device, got "
                             f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        layout.dtype = dtypes.pop()
        if not layout.dtype.is_floating_point:
            raise ValueError(f"{owner}: parameters must be floating point, got {layout.dtype}")
        layout.device = devices.pop()
        return layout

    def flatten(self, tensors: Union[Dict[str, Tensor], Sequence[Tensor]]) -> Tensor:
        """Concatenate per-parameter tensors (dict by name, or list in layout order) into
        ``(d,)``."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: Tensor) -> Dict[str, Tensor]:
        """Split ``(d,)`` (or ``(..., d)``) into parameter-shaped tensors by name."""
        lead = v.shape[:-1]
        parts = torch.split(v, self.sizes, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes)}

    def split_rows(self, X: Tensor, names: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """Rows ``X (k, d)`` -> per-parameter ``(k, *shape)`` tensors (views where the layout
        allows), for ``names`` (default: all)."""
        k = X.shape[0]
        return {n: self.block(X, n).reshape(k, *self._shape_of[n]) for n in (names or self.names)}

    def block(self, X: Tensor, name: str) -> Tensor:
        """The columns of parameter ``name`` in ``X (k, d)`` (a view)."""
        start = self.offsets[name]
        return X[:, start:start + self._size_of[name]]

    def indices(self, names: Sequence[str]) -> Tensor:
        """The flat coordinates of parameters ``names`` (int64, in the order given)."""
        parts = [torch.arange(self.offsets[n], self.offsets[n] + self._size_of[n]) for n in names]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def join_rows(self, parts: Sequence[Tensor], k: int) -> Tensor:
        """Per-parameter ``(k, *shape)`` tensors in layout order -> rows ``(k, d)``."""
        return torch.cat([p.reshape(k, -1) for p in parts], dim=1)

    def values(self, model: nn.Module) -> Dict[str, Tensor]:
        """The model's current values of the layout's parameters (detached), by name."""
        by_name = dict(model.named_parameters())
        return {n: by_name[n].detach() for n in self.names}


def detached_parameters(model: nn.Module) -> Dict[str, Tensor]:
    """All parameters of ``model``, detached, by name (the base of a functional call)."""
    return {n: p.detach() for n, p in model.named_parameters()}


def call_model(model: nn.Module, params: Dict[str, Tensor], inputs: Any) -> Any:
    """``model(inputs)`` with parameter values ``params`` (a functional call): a dict of inputs
    is passed as keyword arguments (``model(**inputs)``), a tuple or list as positional ones."""
    if isinstance(inputs, dict):
        return functional_call(model, params, args=(), kwargs=inputs, strict=False)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, params, tuple(inputs), strict=False)
    return functional_call(model, params, (inputs,), strict=False)


def unwrap_ddp(model: nn.Module) -> Tuple[nn.Module, Any, bool]:
    """``(module, ddp_group, was_ddp)``: the module inside a ``DistributedDataParallel``
    wrapper (whose forward hooks are for training) and its process group; other models
    unchanged with group ``None``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, model.process_group, True
    return model, None, False


# ------------------------------------------------------------------------------------------------
# model state
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def model_state_guard(model: nn.Module, batch_norm: Optional[str] = None) -> Iterator[nn.Module]:
    """Snapshot the model's mutable state and restore it on exit, also after an exception.

    Saved and restored: every module's ``training`` flag, every parameter's ``requires_grad``,
    every buffer's values (BatchNorm running statistics and ``num_batches_tracked``) and
    BatchNorm ``track_running_stats``. Inside the block the model is in eval mode (dropout off);
    with ``batch_norm="train"`` BatchNorm layers use batch statistics with
    ``track_running_stats=False`` so their running statistics are not updated.

    Parameters
    ----------
    model : nn.Module
    batch_norm : {"eval", "train", None}
        ``None`` leaves the modes as they are (snapshot/restore only).
    """
    training = [(m, m.training) for m in model.modules()]
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    bn_track = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _BN_TYPES)]
    try:
        if batch_norm is not None:
            model.eval()
            if batch_norm == "train":
                for m, _ in bn_track:
                    m.train()
                    m.track_running_stats = False
        yield model
    finally:
        for m, flag in training:
            m.training = flag
        for m, flag in bn_track:
            m.track_running_stats = flag
        for p, flag in requires_grad:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)


#: The attention backend the engine's products run with (see :func:`differentiable_attention`).
ATTENTION_BACKEND = "math"


#: Name recorded when ``F.scaled_dot_product_attention`` is routed to :mod:`landscape_ext.attention`.
BLOCKWISE_ATTENTION = "landscape_ext-blockwise"
_ATTENTION_MODES = {"math": ATTENTION_BACKEND, "blockwise": BLOCKWISE_ATTENTION}


def attention_backend_name(mode: Optional[str] = None) -> str:
    """The backend :func:`differentiable_attention` uses: ``mode`` or the environment variable
    ``LANDSCAPE_EXT_ATTENTION`` (``math`` | ``blockwise``, default ``math``: the benchmark on a
    loaded 2-core CPU has not yet shown blockwise faster, see bench/bench_attention.py)."""
    mode = mode if mode is not None else os.environ.get("LANDSCAPE_EXT_ATTENTION", "math")
    if mode not in _ATTENTION_MODES:
        raise ValueError(f"differentiable_attention: mode must be one of {sorted(_ATTENTION_MODES)}, "
                         f"got {mode!r} (argument or LANDSCAPE_EXT_ATTENTION)")
    return _ATTENTION_MODES[mode]


def _blockwise_sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                         scale=None, enable_gqa=False):
    """(q, k, v, mask, is_causal, scale) when the blockwise Function covers the call, else None."""
    qkv = (query, key, value)
    if not all(isinstance(t, Tensor) and t.dim() == 4 for t in qkv):
        return None
    if dropout_p != 0.0 or enable_gqa or query.shape[1] != key.shape[1]:
        return None
    if query.dtype not in (torch.float32, torch.float64) or any(t.dtype != query.dtype for t in qkv):
        return None
    if attn_mask is not None and (is_causal or attn_mask.dim() > 4
                                  or attn_mask.dtype not in (torch.bool, query.dtype)):
        return None
    return query, key, value, attn_mask, bool(is_causal), scale


@contextlib.contextmanager
def _blockwise_sdpa() -> Iterator[None]:
    """Routes supported ``F.scaled_dot_product_attention`` calls to the blockwise Function.

    Rebinds the name in ``torch.nn.functional`` for the block (restored on exit): a
    TorchFunctionMode would not see the call nn.MultiheadAttention makes, because the mode is
    disabled while it handles the enclosing ``multi_head_attention_forward``. Code that imported
    the function object before the block keeps the math backend.
    """
    import torch.nn.functional as F

    from .attention import attention

    math_sdpa = F.scaled_dot_product_attention

    def routed(*args, **kwargs):
        call = _blockwise_sdpa_args(*args, **kwargs)
        return attention(*call) if call is not None else math_sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = routed
    try:
        yield
    finally:
        F.scaled_dot_product_attention = math_sdpa


@contextlib.contextmanager
def differentiable_attention(mode: Optional[str] = None) -> Iterator[str]:
    """Inside the block, attention runs the way second-order autograd needs it.

    ``F.scaled_dot_product_attention`` runs its math backend: the fused flash, memory-efficient
    and cuDNN kernels PyTorch picks by default have neither a forward-mode derivative nor a
    double backward, so Hessian and GGN products (and forward-mode sketches) through them fail.
    ``nn.MultiheadAttention`` and ``nn.Transformer*Layer`` skip their fused inference fast path
    (``torch.backends.mha``), which has no derivatives either. The user's selection (an enclosing
    ``sdpa_kernel`` context, the ``torch.backends.cuda.enable_*_sdp`` flags, the fast-path flag)
    is restored on exit, also after an exception.

    With ``mode="blockwise"`` (or ``LANDSCAPE_EXT_ATTENTION=blockwise``) the supported calls (4-d
    float32/float64 q, k, v, no dropout, no GQA, boolean or additive mask or causal) go to
    :func:`landscape_ext.attention.attention`, whose Hessian-vector products never hold a
    per-direction S x S_k tensor; anything else keeps the math backend. Yields the backend's name
    (:func:`attention_backend_name`).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = attention_backend_name(mode)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            if name == BLOCKWISE_ATTENTION:
                with _blockwise_sdpa():
                    yield name
            else:
                yield name
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200].rstrip('. ') if lines else ''}"


def _forward_by_backend(model: nn.Module, inputs: Any) -> Dict[str, Optional[str]]:
    """The model's forward (no grad) under each SDPA backend alone: ``{backend: None when it
    ran, else its error's first line}``, the math backend first."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    results: Dict[str, Optional[str]] = {}
    for name in ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with torch.no_grad(), sdpa_kernel([backend]):
                call_model(model, detached_parameters(model), inputs)
            results[name.lower()] = None
        except Exception as exc:  # noqa: BLE001 - each backend's failure is reported
            results[name.lower()] = _first_line(exc)
    return results


def _fused_kernel_in(exc: BaseException) -> bool:
    message = str(exc).lower()
    return "scaled_dot_product" in message and any(
        k in message for k in ("flash", "efficient", "cudnn"))


#: Lower-case fragments of SDPA's errors for a backend that cannot run here at all (no fused
#: kernel for this device or these dtypes), as opposed to an error of the model.
_BACKEND_UNAVAILABLE = ("no available kernel", "no viable backend")


def _backend_unavailable(error: Optional[str]) -> bool:
    return error is not None and any(k in error.lower() for k in _BACKEND_UNAVAILABLE)


def explain_forward_failure(model: nn.Module, inputs: Any, exc: BaseException, owner: str,
                            where: str = "") -> Optional[RuntimeError]:
    """A clearer error for a product that failed with ``exc``, or ``None`` when the model's
    forward is not the cause (the original error is then the clearest).

    Called inside :func:`differentiable_attention` after a failure: the forward is rerun without
    gradients under each SDPA backend alone (math, flash, memory-efficient, cuDNN). Failing
    under every one names the ``model`` argument with each backend's error; failing under math
    only says that second-order products need math; a forward that runs under math while the
    error comes from a fused kernel means the model selects that kernel itself."""
    at = f" {where}" if where else ""
    results = _forward_by_backend(model, inputs)
    if not results:
        return None
    if results.get("math") is None:
        if _fused_kernel_in(exc):
            return RuntimeError(
                f"{owner}: the forward of `model` runs a fused attention kernel{at} although "
                f"the products select the math backend (the fused kernels have no double "
                f"backward or forward-mode derivative): does the model choose its kernel itself "
                f"(an sdpa_kernel context inside forward, a direct call to a flash or "
                f"memory-efficient attention op)? Let it call F.scaled_dot_product_attention "
                f"under the caller's backend selection. Error: {_first_line(exc)}")
        return None
    tried = ", ".join(results)
    working = [name for name, error in results.items() if error is None]
    if not working:
        # backends that merely do not exist here (no fused kernel on this device) say nothing
        # about the model: when the rest fail as math does, the model's own error is the story
        telling = {name: error for name, error in results.items()
                   if name == "math" or not _backend_unavailable(error)}
        if len(set(telling.values())) == 1:
            return RuntimeError(f"{owner}: the forward of `model` fails{at}: {results['math']}. "
                                f"Check the model and the batch it is called on")
        detail = "; ".join(f"{name}: {error}" for name, error in results.items())
        return RuntimeError(f"{owner}: the forward of `model` fails{at} under every attention "
                            f"backend tried ({tried}): {detail}. Check the model and the batch it "
                            f"is called on")
    return RuntimeError(
        f"{owner}: the forward of `model` fails{at} under the math attention backend, the "
        f"only one with the second derivatives the products need, but runs under "
        f"{', '.join(working)}: math: {results['math']}. The model must run with "
        f"torch.nn.attention.sdpa_kernel([SDPBackend.MATH]) (no fused kernel required inside its "
        f"forward)")


#: Lower-case fragments of the errors of forward-mode AD and of torch.func's transforms: an op
#: or a custom Function without a forward derivative ("Trying to use forward AD with ... that
#: does not support it", "You must implement the jvp function ...", "... it must override the
#: setup_context staticmethod" for functorch transforms), and vmap's limits (data-dependent
#: control flow, ops without a batching rule, ops that read a wrapped tensor's data pointer).
_FORWARD_AD_ERRORS = ("forward ad", "forward-mode", "forward mode", "jvp", "functorch",
                      "vmap", "batching rule", "batchedtensor", "batched tensor", "data pointer",
                      "not implemented", "does not support", "not supported")


def is_forward_ad_error(exc: BaseException) -> bool:
    """Whether ``exc`` says that forward-mode AD (or a torch.func transform around it) cannot
    run the model, rather than an error of the model, the loss or the data themselves: only
    such an error may switch a product from forward-over-reverse to double backward."""
    if not isinstance(exc, (RuntimeError, NotImplementedError)):
        return False
    message = str(exc).lower()
    return any(key in message for key in _FORWARD_AD_ERRORS)


def explain_size_mismatch(inputs: Any, targets: Any, exc: BaseException, owner: str,
                          where: str = "") -> Optional[ValueError]:
    """A clearer error for a product that failed with ``exc`` on a batch whose inputs and
    targets have different leading sizes (samples), when ``exc``'s message names both sizes
    (torch's ``Expected input batch_size (16) to match target batch_size (12)``, a broadcast
    error); else ``None``."""
    inputs_t = tensors_of(inputs)
    if not (isinstance(targets, Tensor) and targets.dim() > 0 and inputs_t
            and inputs_t[0].dim() > 0):
        return None
    n_in, n_target = int(inputs_t[0].shape[0]), int(targets.shape[0])
    numbers = re.findall(r"\d+", str(exc))
    if n_in == n_target or str(n_in) not in numbers or str(n_target) not in numbers:
        return None
    at = where[len("on "):] if where.startswith("on ") else (where or "the batch")
    return ValueError(f"{owner}: {at}: the inputs hold {n_in} samples (leading size) and the "
                      f"targets {n_target}; every batch needs as many targets as inputs. "
                      f"Error: {_first_line(exc)}")


@contextlib.contextmanager
def evaluation_context(model: nn.Module, batch_norm: Optional[str]) -> Iterator[nn.Module]:
    """Where the engine evaluates a model: :func:`model_state_guard` and
    :func:`differentiable_attention` together."""
    with model_state_guard(model, batch_norm), differentiable_attention():
        yield model


def check_finite(t: Tensor, what: str, owner: str, where: str = "") -> None:
    """Raise ``FloatingPointError("<owner>: <what> is not finite (n NaN/Inf value(s)) <where>")``
    when ``t`` holds a NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise FloatingPointError(f"{owner}: {what} is not finite ({n_bad} NaN/Inf value(s)) "
                                 f"{where}".rstrip())


def state_key(tensors: Iterable[Tensor]) -> Tuple[Any, ...]:
    """Cache key of parameter or buffer values: identity, version counter, storage and a float64
    sum per tensor. The version counter alone misses ``p.data = t`` (new storage) and
    ``p.data.copy_(t)`` / ``p.data.add_(...)`` (``.data`` has its own counter), both common in
    hand-written update loops; the sums catch those (one reduction per tensor, negligible
    beside a product)."""
    ts = list(tensors)
    if not ts:
        return ()
    with torch.no_grad():
        sums = torch.stack([t.detach().sum(dtype=torch.float64) for t in ts]).cpu().tolist()
    return tuple((id(t), t._version, t.data_ptr(), s) for t, s in zip(ts, sums))


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------


def is_single_batch(data: Any) -> bool:
    """One batch: an ``(inputs, targets)`` pair whose second element is a tensor, or a mapping
    of names to tensors (a batch for ``model(**batch)``, e.g. HuggingFace's)."""
    if isinstance(data, Mapping):
        return any(isinstance(v, Tensor) for v in data.values())
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def output_loss(outputs: Any, owner: str, where: str = "") -> Tensor:
    """The loss a model computed itself (``loss_fn=None``): ``outputs.loss`` (the HuggingFace
    convention), ``outputs["loss"]``, or the output itself when it is a scalar tensor."""
    if isinstance(outputs, Mapping) and "loss" in outputs:
        loss = outputs["loss"]
    elif not isinstance(outputs, Tensor) and getattr(outputs, "loss", None) is not None:
        loss = outputs.loss
    else:
        loss = outputs
    if isinstance(loss, Tensor) and loss.dim() == 0:
        return loss
    what = (f"a tensor of shape {tuple(outputs.shape)}" if isinstance(outputs, Tensor) else
            f"{type(outputs).__name__}" + (f" with keys {sorted(outputs)[:6]}"
                                           if isinstance(outputs, Mapping) else ""))
    raise ValueError(f"{owner}: loss_fn=None needs a model that returns its batch-mean loss (an "
                     f"output with .loss, a dict with 'loss' or a scalar tensor; pass the labels "
                     f"in the batch), got {what} {where}".rstrip())


def batch_mean_loss(loss_fn: Optional[Callable[[Any, Any], Tensor]], outputs: Any, targets: Any,
                    owner: str, where: str = "") -> Tensor:
    """The batch's mean loss: ``loss_fn(outputs, targets)``, which must be a scalar, or the loss
    the model computed itself when ``loss_fn`` is None (:func:`output_loss`)."""
    if loss_fn is None:
        return output_loss(outputs, owner, where)
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{owner}: loss_fn must return a scalar (the batch mean), got {shape} "
                         f"{where}".rstrip())
    return loss


def tensors_of(x: Any) -> List[Tensor]:
    """The tensors in a (nested) batch structure, in pytree order."""
    return [t for t in pytree.tree_leaves(x) if isinstance(t, Tensor)]


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` with every tensor moved to ``device`` (tensors already there are kept)."""
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) and t.device != device
                           else t, x)


def outside_inference(x: Any) -> Any:
    """``x`` with every inference tensor (made under ``torch.inference_mode()``) replaced by a
    normal copy, which autograd can use; ``x`` itself when it holds none."""
    if not any(t.is_inference() for t in tensors_of(x)):
        return x
    with torch.inference_mode(False):
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) and t.is_inference()
                               else t, x)


def check_no_inference_tensors(model: nn.Module, owner: str) -> None:
    """Raise a ``ValueError`` naming the first parameter or buffer of ``model`` that is an
    inference tensor: autograd cannot differentiate through it, and copying the model on every
    product would double its memory."""
    for kind, named in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_inference():
                raise ValueError(
                    f"{owner}: {kind} {name!r} of `model` is an inference tensor (the model was "
                    f"created or loaded under torch.inference_mode()), which autograd cannot "
                    f"differentiate through. Create or load the model outside inference mode "
                    f"(torch.no_grad() is fine); calling the engine under inference mode is fine")


def slice_batch(x: Any, start: int, end: int) -> Any:
    """Samples ``start:end`` of every tensor in ``x`` (0-d tensors are kept whole)."""
    return pytree.tree_map(lambda t: t[start:end] if isinstance(t, Tensor) and t.dim() > 0
                           else t, x)


def unsqueeze_batch(x: Any) -> Any:
    """A batch dimension of 1 added to every tensor in ``x`` (one sample as a batch)."""
    return pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)


def batch_size(inputs: Any, targets: Any) -> int:
    """Samples in a batch: the leading size of the targets, else of the first input tensor."""
    if isinstance(targets, Tensor) and targets.dim() > 0:
        return int(targets.shape[0])
    ts = tensors_of(inputs)
    return int(ts[0].shape[0]) if ts and ts[0].dim() > 0 else 1


def batch_weight(batch_size_fn: Optional[Callable[[Any], int]], inputs: Any, targets: Any,
                 owner: str, where: str = "") -> int:
    """A batch's weight in the mean over batches: ``batch_size_fn(batch)`` when given (``batch``
    is ``inputs`` for a dict-only batch, else ``(inputs, targets)``), else :func:`batch_size`."""
    if batch_size_fn is None:
        return batch_size(inputs, targets)
    n = batch_size_fn(inputs if targets is None else (inputs, targets))
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{owner}: batch_size must return a sample count >= 0, got {n!r} "
                         f"{where}".rstrip())
    return n


class DataSource:
    """The ``data`` argument of a model-facing function: one ``(inputs, targets)`` batch or a
    re-iterable of batches (a list, a DataLoader); ``inputs`` a tensor, a tuple
    (``model(*inputs)``) or a dict (``model(**inputs)``).

    Parameters
    ----------
    data : (inputs, targets) or iterable of batches
    owner : str
        Names the caller in error messages.
    device : torch.device
        Batches are moved there as they are read.
    one_shot_hint : str
        What to pass instead of a one-shot iterator (ends the error message).

    Notes
    -----
    Tensors made under ``torch.inference_mode()`` cannot enter autograd: a list of batches
    holding them is copied once here (later in-place changes of those tensors are not seen), a
    DataLoader's batch as it is read (:func:`outside_inference`).
    """

    def __init__(self, data: Any, owner: str, device: torch.device,
                 one_shot_hint: str = "a DataLoader or a list of batches"):
        self.owner = owner
        self.device = device
        if is_single_batch(data):
            self.source: Any = [data if isinstance(data, Mapping) else tuple(data)]
        else:
            if not hasattr(data, "__iter__"):
                raise TypeError(f"{owner}: data must be one (inputs, targets) batch or an iterable "
                                f"of batches, got {type(data).__name__}")
            if iter(data) is data:
                raise TypeError(f"{owner}: data is a one-shot iterator; pass a re-iterable "
                                f"({one_shot_hint})")
            self.source = list(data) if isinstance(data, (list, tuple)) else data
        if isinstance(self.source, list):
            self.source = [outside_inference(batch) for batch in self.source]
        self.single_batch = isinstance(self.source, list) and len(self.source) == 1

    def __iter__(self) -> Iterator[Tuple[int, Any, Any]]:
        """``(index, inputs, targets)`` of every batch, on ``device``; a mapping batch (for
        ``model(**batch)``) is ``(batch, None)``."""
        for i, batch in enumerate(self.source):
            batch = outside_inference(batch)
            if isinstance(batch, Mapping):
                yield i, to_device(dict(batch), self.device), None
                continue
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise ValueError(f"{self.owner}: batch {i} must be (inputs, targets) or a dict "
                                 f"for model(**batch), got {type(batch).__name__}")
            yield i, to_device(batch[0], self.device), to_device(batch[1], self.device)

    def sample_count_hint(self) -> Optional[int]:
        """Samples one pass will yield, when known without a pass (else ``None``): the sum over a
        list of batches, or what a DataLoader's sampler draws (a DistributedSampler: this rank's
        share), or its data set's length."""
        if isinstance(self.source, list):
            try:
                return sum(batch_size(b, None) if isinstance(b, Mapping) else int(b[1].shape[0])
                           for b in self.source)
            except Exception:  # noqa: BLE001 - a hint only
                return None
        dataset = getattr(self.source, "dataset", None)
        sampler = getattr(self.source, "sampler", None)
        batch_sampler = getattr(self.source, "batch_sampler", None)
        try:
            if sampler is not None and getattr(batch_sampler, "sampler", None) is sampler:
                n = len(sampler)
                size = getattr(batch_sampler, "batch_size", None)
                if getattr(batch_sampler, "drop_last", False) and size:
                    n = n // int(size) * int(size)
                return int(n)
            if dataset is not None and hasattr(dataset, "__len__"):
                return len(dataset)
        except TypeError:  # a sampler or data set without a length
            return None
        return None


class DataFingerprint:
    """Checksum of the samples of one pass over the data, compared across passes.

    Each sample is reduced to ``c_i = sum_t <x_{t,i}, w_t>`` over the tensors of its batch (inputs
    and targets; ``w_t`` a fixed pseudo-random weight vector per feature size). ``ordered=True``
    keeps the per-sample values, so a change of order is a change (the randomized SVD needs
    sample ``i`` to be the same sample on every pass); ``ordered=False`` keeps
    ``(n, sum c, sum c^2, sum sin c)``, which a shuffled loader leaves unchanged (the curvature
    operators only need the same set of samples). Augmentation or other data change either.
    Tensors whose leading size is not the batch size enter as one summed value per batch.
    """

    def __init__(self, ordered: bool):
        self.ordered = ordered
        self._weights: Dict[int, Tensor] = {}
        self.reference: Optional[Tensor] = None
        self.reference_n = 0
        self._parts: List[Tensor] = []
        self.n = 0

    def start(self) -> None:
        """Begin a pass."""
        self._parts = []
        self.n = 0

    def _weight(self, features: int, device: torch.device) -> Tensor:
        if features not in self._weights:
            gen = torch.Generator().manual_seed(7919 + features)
            self._weights[features] = torch.rand(features, generator=gen,
                                                 dtype=torch.float64).add_(0.5)
        return self._weights[features].to(device)

    def add(self, inputs: Any, targets: Any, n_samples: int) -> None:
        """Record one batch of ``n_samples`` samples."""
        per_sample = None
        extra = []
        for t in tensors_of((inputs, targets)):
            if t.dim() == 0:
                t = t.reshape(1)
            x = t.detach().reshape(t.shape[0], t.shape[1:].numel()).to(torch.float64)
            c = x @ self._weight(x.shape[1], x.device)
            if t.shape[0] == n_samples:
                per_sample = c if per_sample is None else per_sample + c
            else:
                extra.append(c.sum().reshape(1))
        if per_sample is None:
            per_sample = torch.zeros(n_samples, dtype=torch.float64)
        values = per_sample.cpu()
        extra_sum = torch.cat(extra).sum().cpu().reshape(1) if extra else values.new_zeros(1)
        if self.ordered:
            self._parts.append(torch.cat([values, extra_sum]))
        else:
            self._parts.append(torch.stack([values.sum(), (values * values).sum(),
                                            torch.sin(values).sum(), extra_sum[0]]))
        self.n += n_samples

    def finish(self) -> bool:
        """End a pass: the first pass becomes the reference (returns True); later passes return
        whether they match it (to a relative 1e-9)."""
        if self.ordered:
            summary = torch.cat(self._parts) if self._parts else torch.zeros(0, dtype=torch.float64)
        else:
            summary = (torch.stack(self._parts).sum(0) if self._parts
                       else torch.zeros(4, dtype=torch.float64))
        if self.reference is None:
            self.reference, self.reference_n = summary, self.n
            return True
        if self.n != self.reference_n or summary.shape != self.reference.shape:
            return False
        tol = 1e-9 * (summary.abs() + self.reference.abs() + 1.0)
        return bool(((summary - self.reference).abs() <= tol).all())
