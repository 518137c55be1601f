"""Product engines: the products of the per-sample gradient matrix ``G`` with blocks of
directions, one batch at a time, without forming ``G`` (except the materialize engine), and the
data passes that run them.

An engine's ``sketch(ctx, Z (l, d)) -> (b, l)`` is ``G_b Z^T`` and ``project(ctx, W (b, l),
out (l, d))`` adds ``W^T G_b`` (the names of the ops :func:`landscape_ext.ops.linear_grad_sketch`
and :func:`landscape_ext.ops.linear_grad_project`, which compute them for one Linear layer).
This module holds the base class, the materialize engine (``vmap(grad)`` then matmuls) and the
jvp engine (any model); the layer-factor engine is in :mod:`._kronecker`.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .._model import check_finite
from ._problem import PerSampleProblem
from .per_sample import per_sample_gradient_chunks

log = logging.getLogger(__name__)


class ProductEngine:
    """Per-batch products with ``G``. ``prepare`` returns a batch context; ``sketch(ctx, Z (l,
    d)) -> (b, l)`` is ``G_b Z^T``; ``project(ctx, W (b, l), out (l, d))`` adds ``W^T G_b``;
    ``squared_norms(ctx) -> (b,)`` is ``|g_i|^2``; ``add_squared_sum(ctx, out (d,))`` adds
    ``sum_i g_i^2``."""

    name = "engine"
    forward_mode_used: Optional[str] = None

    def __init__(self, problem: PerSampleProblem, chunk_size: Optional[int]):
        self.problem = problem
        self.chunk_size = chunk_size

    def prepare(self, inputs: Any, targets: Tensor, batch_size: int, where: str) -> Any:
        raise NotImplementedError

    def prepare_batch(self, index: int, inputs: Any, targets: Tensor, batch_size: int,
                      where: str) -> Any:
        """``prepare`` for batch ``index`` of a pass (engines may reuse work across passes)."""
        return self.prepare(inputs, targets, batch_size, where)

    def sketch(self, ctx: Any, Z: Tensor) -> Tensor:
        raise NotImplementedError

    def project(self, ctx: Any, W: Tensor, out: Tensor) -> None:
        raise NotImplementedError

    def squared_norms(self, ctx: Any) -> Tensor:
        raise NotImplementedError

    def add_squared_sum(self, ctx: Any, out: Tensor) -> None:
        raise NotImplementedError


class MaterializeEngine(ProductEngine):
    """Per-sample gradients of the batch by vmap(grad) (chunked), then plain matmuls."""

    name = "materialize"

    def prepare(self, inputs, targets, batch_size, where):
        problem = self.problem
        blocks = [G for _, G in per_sample_gradient_chunks(problem, inputs, targets, batch_size,
                                                           problem.names, self.chunk_size, where)]
        return torch.cat(blocks)

    def sketch(self, G, Z):
        return G @ Z.to(G.dtype).T

    def project(self, G, W, out):
        out.add_((W.to(G.dtype).T @ G).to(out.dtype))

    def squared_norms(self, G):
        return G.pow(2).sum(1)

    def add_squared_sum(self, G, out):
        out.add_(G.pow(2).sum(0).to(out.dtype))


def _is_missing_forward_ad(exc: BaseException) -> bool:
    message = str(exc).lower()
    return any(k in message for k in ("forward ad", "forward-mode", "forward mode", "jvp",
                                      "not implemented", "does not support", "not supported"))


class JvpEngine(ProductEngine):
    """Any model: ``G z`` by forward-mode AD (vmap over directions of jvp of the per-sample loss
    vector; double backward where forward AD is missing), ``G^T w`` by vmap of vjp; squared
    norms and sums by per-sample gradient chunks (``O(chunk d)`` memory)."""

    name = "jvp"

    def prepare(self, inputs, targets, batch_size, where):
        return (inputs, targets, batch_size, where)

    def _direction_chunks(self, l: int) -> List[Tuple[int, int]]:
        chunk = self.chunk_size or l
        return [(s, min(l, s + chunk)) for s in range(0, l, chunk)]

    def _losses_of_selected(self, ctx):
        """``(f, selected)``: ``f(params)`` the per-sample losses as a function of the selected
        parameters, ``selected`` their current values."""
        inputs, targets, batch_size, where = ctx
        problem = self.problem
        base = problem.base_params()

        def losses(params):
            full = dict(base)
            full.update(params)
            return problem.losses(full, inputs, targets, batch_size, where)

        return losses, {n: base[n] for n in problem.names}

    def sketch(self, ctx, Z):
        if self.forward_mode_used != "double-backward":
            try:
                out = self._sketch_by_jvp(ctx, Z)
                self.forward_mode_used = "jvp"
                return out
            except (RuntimeError, NotImplementedError) as exc:
                if not _is_missing_forward_ad(exc):
                    raise
                log.warning("gradient products: forward-mode AD unavailable (%s); using double "
                            "backward", str(exc).splitlines()[0][:200])
        self.forward_mode_used = "double-backward"
        return self._sketch_by_double_backward(ctx, Z)

    def _sketch_by_jvp(self, ctx, Z):
        from torch.func import jvp, vmap
        losses, selected = self._losses_of_selected(ctx)
        problem = self.problem

        def one_direction(tangent):
            return jvp(losses, (selected,), (tangent,))[1]

        outs = []
        for s, e in self._direction_chunks(Z.shape[0]):
            tangents = problem.split_rows(Z[s:e].to(problem.dtype), problem.names)
            outs.append(vmap(one_direction)(tangents))
        return torch.cat(outs).T

    def _sketch_by_double_backward(self, ctx, Z):
        # G z = d/du <G^T u, z>: one backward with create_graph, then a batched backward.
        inputs, targets, batch_size, where = ctx
        problem = self.problem
        base = problem.base_params()
        leaves = {n: base[n].clone().requires_grad_(True) for n in problem.names}
        full = dict(base)
        full.update(leaves)
        with torch.enable_grad():
            losses = problem.losses(full, inputs, targets, batch_size, where)
            u = torch.zeros_like(losses, requires_grad=True)
            grads_u = torch.autograd.grad(losses, list(leaves.values()), grad_outputs=u,
                                          create_graph=True, allow_unused=True)
            live = [(n, g) for n, g in zip(problem.names, grads_u)
                    if g is not None and g.requires_grad]
            if not live:
                return Z.new_zeros((batch_size, Z.shape[0]), dtype=problem.dtype)
            outs = []
            chunks = self._direction_chunks(Z.shape[0])
            for index, (s, e) in enumerate(chunks):
                rows = problem.split_rows(Z[s:e].to(problem.dtype))
                y = torch.autograd.grad([g for _, g in live], u, [rows[n] for n, _ in live],
                                        is_grads_batched=True,
                                        retain_graph=index + 1 < len(chunks))
                outs.append(y[0])
        return torch.cat(outs).T

    def project(self, ctx, W, out):
        from torch.func import vjp, vmap
        losses, selected = self._losses_of_selected(ctx)
        _, vjp_fn = vjp(losses, selected)
        problem = self.problem
        Wt = W.to(problem.dtype).T.contiguous()
        for s, e in self._direction_chunks(Wt.shape[0]):
            (g,) = vmap(vjp_fn)(Wt[s:e])
            for n in problem.names:
                problem.block(out, n)[s:e].add_(g[n].reshape(e - s, -1).to(out.dtype))

    def _gradient_chunks(self, ctx):
        inputs, targets, batch_size, where = ctx
        return per_sample_gradient_chunks(self.problem, inputs, targets, batch_size,
                                          self.problem.names, self.chunk_size, where)

    def squared_norms(self, ctx):
        return torch.cat([G.pow(2).sum(1) for _, G in self._gradient_chunks(ctx)])

    def add_squared_sum(self, ctx, out):
        for _, G in self._gradient_chunks(ctx):
            out.add_(G.pow(2).sum(0).to(out.dtype))


# ------------------------------------------------------------------------------------------------
# data passes
# ------------------------------------------------------------------------------------------------


def batch_contexts(problem: PerSampleProblem, engine: ProductEngine, progress: bool,
                   desc: str) -> Iterator[Tuple[Any, int, str]]:
    """One recorded pass: ``(engine context, batch size, where)`` per batch."""
    batches: Any = problem.batches()
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=desc, leave=False)
    for i, inputs, targets, batch_size in batches:
        where = f"on batch {i}"
        yield engine.prepare_batch(i, inputs, targets, batch_size, where), batch_size, where


def sketch_pass(problem: PerSampleProblem, engine: ProductEngine, Z: Tensor,
                progress: bool) -> Tensor:
    """``Y = G Z^T`` (n, l), float64."""
    blocks = []
    for ctx, _, where in batch_contexts(problem, engine, progress, "G Z"):
        y = engine.sketch(ctx, Z)
        check_finite(y, "a gradient product", problem.owner, where)
        blocks.append(y.to(torch.float64))
    return torch.cat(blocks)


def project_pass(problem: PerSampleProblem, engine: ProductEngine, W: Tensor, progress: bool,
                 out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``G^T W`` as rows ``(l, d)``; ``W (n, l)``."""
    out = torch.zeros(W.shape[1], problem.d, dtype=out_dtype or problem.dtype,
                      device=problem.device)
    offset = 0
    for ctx, batch_size, _ in batch_contexts(problem, engine, progress, "G^T W"):
        if offset + batch_size > W.shape[0]:
            raise ValueError(f"{problem.owner}: the data has more samples than the first pass "
                             f"({W.shape[0]}): it changed between passes")
        engine.project(ctx, W[offset:offset + batch_size], out)
        offset += batch_size
    check_finite(out, "a gradient product", problem.owner, "in a reverse pass")
    return out
