"""Per-sample gradients by ``torch.func.vmap(grad)`` over chunks of samples: the full matrix
(:func:`per_sample_gradients`), a stream of row blocks (:func:`iter_per_sample_gradients`), and
the chunk generator the product engines use for parameters outside Linear/Conv2d layers."""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._model import check_finite, evaluation_context, slice_batch
from ._problem import ParamSpec, PerSampleProblem, sample_in_dims

__all__ = ["per_sample_gradients", "iter_per_sample_gradients"]

_SAMPLE_CHUNK_ELEMENTS = 1 << 24  # per-sample gradient elements held at once (vmap(grad) chunks)


def _sample_chunk(batch_size: int, d: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, min(batch_size, int(chunk_size)))
    return max(1, min(batch_size, _SAMPLE_CHUNK_ELEMENTS // max(d, 1)))


def per_sample_gradient_chunks(problem: PerSampleProblem, inputs: Any, targets: Optional[Tensor],
                               batch_size: int, names: Sequence[str], chunk_size: Optional[int],
                               where: str) -> Iterator[Tuple[int, Tensor]]:
    """Yield ``(start, G_chunk (c, d_names))`` for the samples of one batch, parameters
    ``names`` only (``targets`` ``None``: a dict batch with the model's own loss)."""
    from torch.func import grad, vmap
    base = problem.base_params()
    selected = {n: base[n] for n in names}
    owner = problem.owner

    def single_loss(params, x, t):
        full = dict(base)
        full.update(params)
        return problem.sample_loss(full, x, t, where)

    # every input is sliced by sample: check the whole batch before slicing (a slice would hide
    # inputs with more rows than the batch has targets)
    sample_in_dims(inputs, batch_size, owner, where)
    chunk = _sample_chunk(batch_size, sum(problem.sizes[n] for n in names), chunk_size)
    for start in range(0, batch_size, chunk):
        end = min(batch_size, start + chunk)
        x = slice_batch(inputs, start, end)
        t = targets[start:end] if isinstance(targets, Tensor) else targets
        in_dims = (None, sample_in_dims(x, end - start, owner, where),
                   0 if isinstance(t, Tensor) else None)
        out = vmap(grad(single_loss), in_dims=in_dims)(selected, x, t)
        G = torch.cat([out[n].reshape(end - start, -1) for n in names], dim=1)
        check_finite(G, "a per-sample gradient", owner, where)
        yield start, G


def _all_chunks(problem: PerSampleProblem, chunk_size: Optional[int]) -> Iterator[Tensor]:
    for i, inputs, targets, batch_size in problem.batches(record=False):
        for _, G in per_sample_gradient_chunks(problem, inputs, targets, batch_size,
                                               problem.names, chunk_size, f"on batch {i}"):
            yield G


def iter_per_sample_gradients(model: nn.Module, loss_fn: Optional[Callable], data: Any, *,
                              params: ParamSpec = None,
                              chunk_size: Optional[int] = None) -> Iterator[Tensor]:
    """Stream the per-sample gradients in chunks: yields ``(c, d)`` blocks, rows in data order.

    Same conventions as :func:`per_sample_gradients`; memory is one chunk (``chunk_size``
    samples, default such that a chunk holds about 16M elements).
    """
    problem = PerSampleProblem(model, loss_fn, data, params, "iter_per_sample_gradients")
    chunks = _all_chunks(problem, chunk_size)
    while True:
        # each chunk is computed inside the evaluation context and the model's state (and the
        # attention settings) are the caller's again while the caller holds the chunk
        with evaluation_context(model, "eval"):
            G = next(chunks, None)
        if G is None:
            return
        yield G


def per_sample_gradients(model: nn.Module, loss_fn: Optional[Callable], data: Any, *,
                         params: ParamSpec = None,
                         chunk_size: Optional[int] = None,
                         dtype: Optional[torch.dtype] = None) -> Tensor:
    r"""The ``n x d`` matrix ``G`` of per-sample gradients, ``G[i] = grad of loss_i``.

    Computed by ``torch.func.vmap(grad)`` over chunks of samples, in eval mode (BatchNorm with
    running statistics, dropout off); the model is not changed.

    Parameters
    ----------
    model : nn.Module
    loss_fn : callable or None
        ``loss_fn(outputs, targets) -> (batch,)`` per-sample losses (``reduction="none"``).
        ``None``: the model computes its own loss (``outputs.loss``, ``outputs["loss"]`` or a
        scalar output, HuggingFace style); sample ``i``'s loss is the model's loss on the
        one-sample batch ``i`` (every input tensor, a dict batch's per key, sliced along its
        first dimension), evaluated by ``vmap`` over the samples.
    data : (inputs, targets), dict, or iterable of batches
        A dict batch is passed as ``model(**batch)`` (with ``loss_fn=None``).
    params : iterable of str or Parameter, optional
        Subset of parameters (default: all with ``requires_grad``), flattened in
        ``named_parameters()`` order.
    chunk_size : int, optional
        Samples per vmapped call (default: about 16M gradient elements per chunk).
    dtype : torch.dtype, optional
        dtype of the returned matrix (default: the parameters').

    Returns
    -------
    Tensor
        ``(n, d)``. For large models prefer :func:`iter_per_sample_gradients` or the matrix-free
        :func:`gradient_covariance_svd`.

    Notes
    -----
    Per-sample gradients are local: in a :mod:`torch.distributed` run each rank gets the rows of
    its own ``data`` (no communication; gather them with
    :func:`landscape_ext.distributed.all_gather_rows` if needed). A
    ``DistributedDataParallel`` model is unwrapped (parameter names with or without the
    ``module.`` prefix are accepted).
    """
    problem = PerSampleProblem(model, loss_fn, data, params, "per_sample_gradients")
    rows: List[Tensor] = []
    with evaluation_context(model, "eval"):
        for G in _all_chunks(problem, chunk_size):
            rows.append(G if dtype is None else G.to(dtype))
    if not rows:
        raise ValueError("per_sample_gradients: data contains no samples")
    return torch.cat(rows)
