"""Measuring one cell of a sweep: the training-set criterion checked after every epoch, and the
measurement lines (landscape statistics on the measurement batch with their batch-to-batch
spread, train/test metrics, the criterion fields) written at the chosen epochs and where the
cell stops (see docs/sweep.md)."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor

from landscape_ext.results import JsonlWriter

from .. import training
from ..data import Dataset
from ..scaling import phi as phi_metric
from ..spread import BatchSpread, disjoint_batches
from ..training import Callback, TrainState
from .config import Cell, SweepConfig

__all__ = ["SPREAD_STATISTICS", "measurement_batches"]

#: The statistics of a measurement that get a batch-to-batch sd (``<name>_batch_sd``).
SPREAD_STATISTICS = ("spectral_norm", "lambda_max", "trace", "grad_effective_rank",
                     "grad_stable_rank", "phi")

# probe seed of spread batch j: cell seed + j * this (batch 0 keeps the cell's seed)
_SEED_STRIDE = 7919


def measurement_batches(cfg: SweepConfig, ds: Dataset) -> List[Tuple[Tensor, Tensor]]:
    """The disjoint measurement batches of ``ds``: ``cfg.spread_batches`` of ``cfg.n_samples``
    training samples, fewer when the training set is too small (one: the whole set when it has
    at most ``n_samples``). Batch 0 is the fixed batch whose values a measurement reports."""
    n = ds.n_train
    if cfg.n_samples >= n:
        return [(ds.x_train, ds.y_train)]
    r = max(1, min(cfg.spread_batches, n // cfg.n_samples))
    return disjoint_batches(ds, cfg.n_samples, r, seed=0)


class CellRecorder(Callback):
    """Callback of one cell's training: checks the criterion after every epoch (stopping the
    training when it is met or ``max_epochs`` is reached) and writes a measurement line at the
    wanted epochs and at the stop, unless ``done`` (``{epoch: final}`` of the lines already
    written) has it (for the stop: as a final line)."""

    def __init__(self, cfg: SweepConfig, cell: Cell, dataset: Dataset, writer: JsonlWriter,
                 done: Dict[int, bool], chash: str, lr: float,
                 batches: List[Tuple[Tensor, Tensor]]):
        super().__init__(every_steps=None, every_epochs=None, at_start=True, at_end=False)
        self.cfg, self.cell, self.ds, self.writer = cfg, cell, dataset, writer
        self.done, self.chash, self.lr = done, chash, lr
        self.batches = [(x.to(cfg.device), y.to(cfg.device)) for x, y in batches]
        self.epochs_to_criterion: Optional[int] = None
        self.n_written = 0

    def on_train_begin(self, state: TrainState) -> None:
        # a fixed-epoch sweep with max_epochs = 0 stops (and ends) at initialisation
        self._check(state, final=self.cfg.max_epochs == 0)

    def on_epoch_end(self, state: TrainState) -> None:
        self._check(state, final=state.epoch >= self.cfg.max_epochs)

    def _check(self, state: TrainState, final: bool) -> None:
        cfg, epoch = self.cfg, state.epoch
        wanted = epoch in cfg.measure_epochs
        if not (wanted or final or (cfg.criterion and epoch > 0)):
            return
        train = training.evaluate(state.model, self.ds.x_train, self.ds.y_train, state.loss_fn,
                                  device=cfg.device)
        if (epoch > 0 and self.epochs_to_criterion is None
                and cfg.criterion_met(train[0], train[1])):
            self.epochs_to_criterion = epoch
            final = True
        if final:
            state.stop = True
        if (final and not self.done.get(epoch)) or (wanted and epoch not in self.done):
            self.writer.write(self._record(state, train, final))
            self.done[epoch] = final
            self.n_written += 1

    def _record(self, state: TrainState, train: Tuple[float, float], final: bool
                ) -> Dict[str, Any]:
        """The measurement line of this epoch."""
        t0 = time.perf_counter()
        cfg, cell, ds = self.cfg, self.cell, self.ds
        stats = _stats_with_spread(cfg, cell, ds, state, self.batches)
        test_loss, test_acc = training.evaluate(state.model, ds.x_test, ds.y_test,
                                                state.loss_fn, device=cfg.device)
        reached = None if not cfg.criterion else self.epochs_to_criterion is not None
        rec: Dict[str, Any] = dict(
            kind="measurement", cell=cell.key, cell_index=cell.index, dataset=cell.dataset,
            optimizer=cell.optimizer, model=cfg.model, width=cell.width, depth=cell.depth,
            seed=cell.seed, epoch=state.epoch, step=state.step, lr=self.lr, data_dim=ds.data_dim,
            train_loss=train[0], train_acc=train[1], test_loss=test_loss, test_acc=test_acc,
            gen_gap=train[1] - test_acc, loss_gap=test_loss - train[0],
            criterion=cfg.criterion_text(), reached_criterion=reached,
            epochs_to_criterion=self.epochs_to_criterion, final=final,
            max_epochs=cfg.max_epochs, config_hash=self.chash)
        rec.update(stats)
        rec["measure_time_s"] = time.perf_counter() - t0
        return rec


def _stats_with_spread(cfg: SweepConfig, cell: Cell, ds: Dataset, state: TrainState,
                       batches: List[Tuple[Tensor, Tensor]]) -> Dict[str, Any]:
    """The landscape statistics on batch 0 (with Phi), and for each of
    :data:`SPREAD_STATISTICS` its sd over all the batches (``<name>_batch_sd``; None with one
    batch). Each batch is measured with its own probe seed, as a re-measurement would be."""
    per_batch = []
    for j, batch in enumerate(batches):
        stats, _ = training.curvature_stats(
            state.model, state.loss_fn, batch, k=0, tol=cfg.tol,
            trace_matvecs=cfg.trace_matvecs, spectral_norm=True,
            per_sample_loss=state.per_sample_loss, grad_k=cfg.grad_k,
            seed=cell.seed + _SEED_STRIDE * j)
        rank = stats.get("grad_effective_rank")
        if rank is not None and stats.get("trace") is not None and stats["spectral_norm"] > 0:
            stats["phi"] = phi_metric(stats["trace"], stats["spectral_norm"], stats["n_params"],
                                      rank, ds.data_dim)
        per_batch.append(stats)
    out = dict(per_batch[0])
    out["spread_batches"] = len(batches)
    for name in SPREAD_STATISTICS:
        values = [s.get(name) for s in per_batch]
        if any(v is None for v in values):
            continue
        spread = BatchSpread.from_values(values, _batch_len(batches[0]), name)
        out[f"{name}_batch_sd"] = spread.sd
    return out


def _batch_len(batch: Tuple[Tensor, Tensor]) -> int:
    return int(batch[1].shape[0])
