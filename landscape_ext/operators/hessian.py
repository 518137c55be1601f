"""The Hessian of a model's mean loss as an operator (autograd modes; the fused MLP path is
:class:`landscape_ext.mlp.MLPBackend`)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _model
from .._losses import forward_ad_safe_loss
from .model import ModelOperator, RowAssembler
from .sharded import ShardedHessianOperator, is_fsdp_model

__all__ = ["HessianOperator"]


class HessianOperator(ModelOperator):
    r"""Exact Hessian of the mean loss over the data, :math:`H = \nabla^2_\theta
    \frac{1}{N}\sum_b n_b\, \ell_b(\theta)`, as a batched linear operator.

    Parameters
    ----------
    model : nn.Module
    loss_fn : callable or None
        ``loss_fn(outputs, targets) -> scalar`` — the **mean** loss of the batch. ``None``: the
        model computes it (HuggingFace style): the loss is ``outputs.loss``, ``outputs["loss"]``
        or the output itself when it is a scalar.
    data : (inputs, targets), dict, or iterable of batches
        One batch, or a re-iterable of batches (a DataLoader, a list). ``inputs`` may be a tensor,
        a tuple (``model(*inputs)``) or a dict (``model(**inputs)``); a batch may also be a dict
        alone (``model(**batch)``, labels inside it, for ``loss_fn=None``). A batch without
        samples has no weight in the mean: it is skipped, with a warning naming its index (once
        per operator). A batch whose inputs and targets hold different numbers of samples is an
        error naming the batch and both sizes. Tensors made under ``torch.inference_mode()``
        are copied for autograd (a list of batches once, a DataLoader's batches as read).
    params : iterable of str or Parameter, optional
        Subset of parameters (default: all with ``requires_grad``).
    mode : {"auto", "forward-over-reverse", "double-backward", "double-backward-loop", "fused-mlp"}
        ``forward-over-reverse``: ``vmap(jvp(grad))`` over the directions (chunked by
        ``chunk_size``). ``double-backward``: one forward and first backward per batch with
        ``create_graph``, then ``autograd.grad(..., is_grads_batched=True)`` for the directions
        (chunked). ``double-backward-loop``: the same graph, one ``autograd.grad`` per direction
        (the least memory: one direction's second-order temporaries at a time).
        ``fused-mlp``: for plain MLPs (``nn.Sequential`` of ``nn.Linear`` and ReLU / GELU /
        Tanh / SiLU) with cross-entropy or MSE, the fused Pearlmutter products of
        :mod:`landscape_ext.mlp` (all directions in single GEMMs, no autograd); a ``ValueError``
        says why when the model, loss or data are outside it.
        ``auto`` (default) uses ``fused-mlp`` whenever it applies. Otherwise it measures: the
        first product of each power-of-two bucket of ``k`` (k = 5..8 share bucket 8) times the
        three autograd modes at the cost of one extra product and keeps the fastest for that
        bucket, or the prior rule's mode when it is within 5% of the fastest (see
        :mod:`landscape_ext.operators.modes`). A single one-direction product is not measured:
        it runs double backward on a cached graph, else forward-over-reverse. Models with an op
        without a forward-mode derivative (custom Functions without ``jvp``) fall back to double
        backward for good. ``mode_used`` says which mode ran last, ``mode_choices`` /
        ``mode_timings`` what ``auto`` measured and chose per bucket, ``fused_mlp_reason`` why the
        fused path does not apply. Data-parallel ranks run rank 0's choice.
    compile : bool or "auto"
        Run the forward-over-reverse product under ``torch.compile(dynamic=False)``, the
        directions cut into power-of-two pieces so a new ``k`` compiles at most ``log2(k) + 1``
        shapes once (no recompilation per call). When compilation fails the products run
        eagerly and ``compile_error`` says why. ``"auto"`` (default): off on CPU and CUDA
        (``operators.model.COMPILE_DEFAULT``). On the CPU the compiled product of a residual CNN
        (batch 64, k = 8) cost 4.18 gradients per direction against 2.47 for ``auto``'s choice,
        after about 40 s of compilation per power-of-two piece of directions, and in float32 it
        was 3.4e-4 off the float64 product (eager: 9.4e-7; float64 compiled: 1.6e-15); on a GPU
        it is unmeasured.
    batch_norm : {"eval", "train"}
        BatchNorm with running statistics (default) or with batch statistics (running statistics
        not updated either way).
    accumulate_dtype : torch.dtype, optional
        Sum the per-batch products in this dtype (e.g. ``torch.float64``); products are returned
        in it.
    chunk_size : int, optional
        At most this many directions per vmapped/batched call (memory bound).
    check_data : bool
        Fingerprint the data on the first pass and raise if a later pass differs
        (augmentation).
    cache_graph : bool or "auto"
        For double backward: keep the first-order graph between products while the parameters
        are unchanged (``auto``: when ``data`` is a single batch). Saves one forward + backward
        per product at the cost of keeping the activations.
    batch_size : callable, optional
        ``batch_size(batch) -> int``: a batch's weight in the mean over batches (default: the
        leading size of its targets, or of its first tensor for a dict batch).
    process_group : torch.distributed group, optional
        Data parallel: each rank passes its own shard of the data and the same model; every
        product is the mean over the samples of all ranks (local sums all-reduced, weighted by
        each rank's sample count, so uneven shards are exact). Every rank must call every
        product (the solvers do so when they run on every rank with the same seed and ``v0``).
        Before each product the ranks compare checksums: different parameters, numbers of
        directions or dtypes are an error on every rank; inputs that differ by rounding are
        replaced by rank 0's, inputs that differ by more (a per-rank seed or ``v0``) are an
        error on every rank. A rank whose local product fails
        makes every rank raise (:class:`landscape_ext.distributed.RankFailure` on the others).
        A model wrapped in ``DistributedDataParallel`` is unwrapped and reduces over DDP's group
        by default. See :mod:`landscape_ext.distributed` for the bytes sent per product.

    Shapes
    ------
    ``op @ V``: ``V (d,)`` or ``(d, k)`` -> same shape; ``op.apply_rows(X (k, d)) -> (k, d)``.
    """

    curvature = "hessian"

    def __new__(cls, model: Any = None, *args: Any, **kwargs: Any):
        # an FSDP2-sharded model gets the sharded operator (operators/sharded.py)
        if cls is HessianOperator and is_fsdp_model(model):
            return ShardedHessianOperator(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], data: Any,
                 *args: Any, mode: str = "auto", cache_graph: Union[bool, str] = "auto",
                 **kwargs: Any):
        super().__init__(model, loss_fn, data, *args, mode=mode, cache_graph=cache_graph,
                         **kwargs)
        self._graph_cache: Any = None

    def _apply_rows_forward_over_reverse(self, X: Tensor, inputs: Any, targets: Tensor,
                                         where: str) -> Tensor:
        """``vmap(jvp(grad))`` over the directions, chunked (under ``compile``: in pieces of
        powers of two, each through the compiled function)."""
        base = _model.detached_parameters(self.model)
        selected = {n: base[n] for n in self.param_names}
        rest = {n: t for n, t in base.items() if n not in selected}
        pieces = self._row_pieces(X.shape[0])
        result = RowAssembler(X.shape[0], len(pieces))
        for start, end in pieces:
            V = self.layout.split_rows(X[start:end])
            hv, loss = self._run_compiled("forward-over-reverse", self._hvp_rows_fn, selected,
                                          rest, V, inputs, targets)
            self._check_finite(loss.reshape(-1)[:1], "the loss", where)
            result.put(start, self.layout.join_rows(hv, end - start))
            del hv
        return result.result()

    def _hvp_rows_fn(self, selected: Dict[str, Tensor], rest: Dict[str, Tensor],
                     V: Dict[str, Tensor], inputs: Any, targets: Any) -> Tuple[List[Tensor],
                                                                                 Tensor]:
        """``(H v for the rows of V per parameter, the losses)``: a function of tensors only (the
        same bound method every call, so a compiled version is reused, not recompiled)."""
        from torch.func import grad, jvp, vmap
        safe_loss = forward_ad_safe_loss(self.loss_fn)

        def loss_of(p):
            full = dict(rest)
            full.update(p)
            loss = self._loss(self._call_model(full, inputs), targets, "", safe_loss)
            return loss, loss.detach()

        gradient = grad(loss_of, has_aux=True)

        def one(v):
            _, hv, loss = jvp(gradient, (selected,), (v,), has_aux=True)
            return [hv[n] for n in self.param_names], loss

        return vmap(one)(V)

    def _first_order_graph(self, inputs: Any, targets: Tensor,
                           where: str) -> Tuple[List[Tensor], Tuple[Any, ...], List[int]]:
        """``(leaves, gradients with their graph, indices of gradients that have one)``, kept
        between products while parameters and buffers are unchanged (``cache_graph``)."""
        key = None
        if self.cache_graph:
            key = (_model.state_key(self.model.parameters())
                   + _model.state_key(self.model.buffers()) + (self.batch_norm,))
            if self._graph_cache is not None and self._graph_cache[0] == key:
                return self._graph_cache[1:]
            self._graph_cache = None
        base = _model.detached_parameters(self.model)
        leaves = [base[n].clone().requires_grad_(True) for n in self.param_names]
        full = dict(base)
        full.update(zip(self.param_names, leaves))
        with torch.enable_grad():
            loss = self._loss(self._call_model(full, inputs), targets, where)
            self._check_finite(loss.detach(), "the loss", where)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        self._check_finite(torch.cat([g.detach().reshape(-1) for g in grads if g is not None] or
                                     [loss.detach().reshape(1)]), "the gradient", where)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        out = (leaves, grads, live)
        if self.cache_graph:
            self._graph_cache = (key,) + out
        return out

    def _double_backward_state(self, inputs: Any, targets: Tensor, where: str) -> Any:
        return self._first_order_graph(inputs, targets, where)

    def _double_backward_rows(self, state: Any, X: Tensor, where: str, loop: bool,
                              retain: bool, batched: bool = False) -> Tensor:
        """Vector-Jacobian products of the gradient: batched (``is_grads_batched``, chunked;
        one direction without the vmap unless ``batched``) or one call per direction
        (``loop``), on the retained first-order graph."""
        leaves, grads, live = state
        if not live:
            return X.new_zeros(X.shape)
        outputs = [grads[i] for i in live]
        k = X.shape[0]
        pieces = [(i, i + 1) for i in range(k)] if loop else self._chunks(k)
        result = RowAssembler(k, len(pieces))
        for index, (start, end) in enumerate(pieces):
            V = self.layout.split_rows(X[start:end])
            cotangents = [V[self.param_names[i]] for i in live]
            keep = retain or self.cache_graph or index + 1 < len(pieces)
            with torch.enable_grad():
                if end - start == 1 and not batched:  # one direction: no vmap
                    hv = torch.autograd.grad(outputs, leaves, [c[0] for c in cotangents],
                                             retain_graph=keep, allow_unused=True)
                    hv = [h.unsqueeze(0) if h is not None else None for h in hv]
                else:
                    hv = torch.autograd.grad(outputs, leaves, cotangents, is_grads_batched=True,
                                             retain_graph=keep, allow_unused=True)
            hv = [h if h is not None else X.new_zeros((end - start,) + tuple(leaf.shape))
                  for h, leaf in zip(hv, leaves)]
            result.put(start, self.layout.join_rows(hv, end - start))
            del hv
        return result.result()


# the FSDP2 operator is a Hessian operator to its users (isinstance), though its machinery is
# its own (``__new__`` above returns it for a sharded model)
HessianOperator.register(ShardedHessianOperator)
