"""Running a sweep: :func:`run_sweep` trains and measures one shard's cells of the grid and
appends the measurements to the shared results file (see docs/sweep.md)."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from landscape_ext.results import JsonlWriter

from .. import training
from .._results import PathLike
from ..data import GENERATED_DEFAULTS, Dataset, get_dataset
from ..models import build_model, default_model_kwargs
from ..training import TrainConfig
from . import sharding, store
from .config import TRANSFORMER_HEADS, Cell, SweepConfig, SweepSummary
from .fitting import fit_sweep
from .measuring import CellRecorder, measurement_batches

__all__ = ["run_sweep"]

log = logging.getLogger(__name__)


def _dataset(cfg: SweepConfig, name: str, cache: Dict[str, Dataset]) -> Dataset:
    """Data set ``name`` as the sweep uses it (images for ResNet/ViT, text for the LM, capped
    at ``max_train``; a generated set is generated with ``max_train`` training samples), loaded
    once per run."""
    if name not in cache:
        kw = dict(cfg.dataset_kwargs.get(name, {}))
        if name == "digits" and cfg.model in ("resnet", "vit"):
            kw.setdefault("images", True)
        if name in ("cifar10", "cifar100", *GENERATED_DEFAULTS) and cfg.max_train is not None:
            kw.setdefault("n_train", cfg.max_train)
        ds = get_dataset(name, cfg.data_dir, **kw)
        want = "language_model" if cfg.model == "lm" else "classification"
        if ds.task != want:
            kinds = {"language_model": "a language-model data set (synthetic-text, wikitext2)",
                     "classification": "a classification data set"}
            raise ValueError(f"sweep: model {cfg.model!r} needs {kinds[want]}; {name!r} is "
                             f"{kinds[ds.task]}")
        if cfg.max_train is not None and ds.n_train > cfg.max_train:
            ds = dataclasses.replace(ds, x_train=ds.x_train[: cfg.max_train],
                                     y_train=ds.y_train[: cfg.max_train])
        _warn_unreachable(cfg, ds)
        cache[name] = ds
    return cache[name]


def _warn_unreachable(cfg: SweepConfig, ds: Dataset) -> None:
    """Warn when the loss criterion is below the best loss a generated data set allows."""
    best = ds.info.get("optimal_loss")
    if cfg.train_to_loss is not None and best is not None and cfg.train_to_loss < best:
        log.warning("sweep: train_to_loss = %g is below %.4f, the best mean loss a model can "
                    "reach on %s (from its source's entropy); a cell reaches it only by "
                    "memorizing the training sequences", cfg.train_to_loss, best, ds.name)


def _run_cell(cfg: SweepConfig, cell: Cell, ds: Dataset, writer: JsonlWriter,
              done: Dict[int, bool], chash: str) -> int:
    """Train ``cell`` from its seed to the criterion or ``max_epochs``, writing the measurements
    not in ``done`` (``{epoch: final}`` of the lines already written); returns how many were
    written."""
    extra: Dict[str, Any] = {"heads": TRANSFORMER_HEADS} if cfg.model in ("vit", "lm") else {}
    if cfg.model == "mlp":
        extra["activation"] = cfg.activation
    kw = default_model_kwargs(cfg.model, ds.input_shape, ds.n_classes, width=cell.width,
                              depth=cell.depth, seed=cell.seed, **extra)
    model = build_model(cfg.model, **kw)
    lr = cfg.lr_for(cell.optimizer)
    train_cfg = TrainConfig(epochs=cfg.max_epochs, batch_size=cfg.batch_size,
                            optimizer=cell.optimizer, lr=lr,
                            momentum=cfg.momentum if cell.optimizer == "sgd" else 0.0,
                            seed=cell.seed, device=cfg.device)
    recorder = CellRecorder(cfg, cell, ds, writer, done, chash, lr,
                            measurement_batches(cfg, ds))
    training.train(model, ds, train_cfg, callbacks=[recorder], progress=False)
    return recorder.n_written


def _progress_state(records: Sequence[Dict[str, Any]], chash: str,
                    cfg: Optional[SweepConfig] = None, warn: bool = True
                    ) -> Tuple[set, Dict[str, Dict[int, bool]]]:
    """(finished cell keys, ``{cell: {epoch: final}}``: the measured epochs of each cell and
    whether their latest line is a final one) of the records with ``config_hash == chash``;
    records missing their fields are ignored.

    A cell is finished when it has a ``cell_done`` line and (given ``cfg``) a final measurement
    where it stops under ``cfg`` (the first epoch it reached the criterion, if not after
    ``cfg.max_epochs``, else ``cfg.max_epochs``: ``max_epochs`` is not in the hash, so a cell
    trains on when it grows, and is measured again where it stops when it shrinks), and a
    measurement at each of ``cfg.measure_epochs`` up to there."""
    done = set()
    measured: Dict[str, Dict[int, bool]] = {}
    reached: Dict[str, set] = {}
    others = set()
    for r in records:
        if r.get("config_hash") != chash:
            if r.get("config_hash") is not None:
                others.add(r["config_hash"])
            continue
        cell = r.get("cell")
        if not isinstance(cell, str):
            continue
        if r.get("kind") == "cell_done":
            done.add(cell)
        elif r.get("kind") == "measurement":
            try:
                epoch = int(r["epoch"])
            except (KeyError, TypeError, ValueError):
                continue
            measured.setdefault(cell, {})[epoch] = bool(r.get("final"))
            if r.get("final") and r.get("reached_criterion"):
                reached.setdefault(cell, set()).add(epoch)
    finished = done
    if cfg is not None:
        def complete(cell: str) -> bool:
            stop = min([e for e in reached.get(cell, ()) if e <= cfg.max_epochs]
                       or [cfg.max_epochs])
            have = measured.get(cell, {})
            return have.get(stop, False) and all(e in have for e in cfg.measure_epochs
                                                 if e <= stop)

        finished = {c for c in done if complete(c)}
    if others and warn:
        log.warning("sweep: the results directory also holds records made with other settings "
                    "(config hashes %s); they are not reused", sorted(others))
    return finished, measured


def _finished_cells(cfg: SweepConfig, out_dir: PathLike) -> Tuple[int, int]:
    """``(cells finished, cells in the grid)`` of ``cfg`` in ``out_dir``'s results (over all
    shards): where an interrupted sweep stopped."""
    keys = {c.key for c in cfg.cells()}
    finished, _ = _progress_state(store.load_results(out_dir), cfg.measurement_hash(), cfg,
                                  warn=False)
    return len(finished & keys), len(keys)


class _ShardRun:
    """One shard's pass over the grid: its cells, those already finished, those it runs, and
    whether it is the process that fits the scaling law."""

    def __init__(self, cfg: SweepConfig, out: Path, shard: Tuple[int, int], distributed: bool):
        self.cfg, self.out, self.shard, self.distributed = cfg, out, shard, distributed
        self.chash = cfg.measurement_hash()
        self.cells = cfg.cells()
        self.keys = {c.key for c in self.cells}
        self.mine = [c for c in self.cells if c.index % shard[1] == shard[0]]
        self.todo: List[Cell] = []
        self.measured: Dict[str, Dict[int, bool]] = {}
        self.complete_at_start = False
        self.completed_grid = False   # this shard's last cell_done completed the grid
        self.n_run = 0

    def plan(self, resume: bool) -> None:
        """Read the results file (with ``resume``): which cells are finished, which epochs of
        the others are measured."""
        cfg, shard = self.cfg, self.shard
        records = store.load_results(self.out) if resume else []
        finished, self.measured = _progress_state(records, self.chash, cfg)
        self.complete_at_start = self.keys <= finished
        self.todo = [c for c in self.mine if c.key not in finished]
        log.info("sweep: %d cells in the grid, %d in shard %d/%d, %d already finished",
                 len(self.cells), len(self.mine), shard[0], shard[1],
                 len(self.mine) - len(self.todo))

    def run_cells(self, detect_completion: bool, progress: bool) -> None:
        """Train and measure the cells to do, appending to the shared results file. With
        ``detect_completion``, the last ``cell_done`` line is written and the file read back
        under one lock, to learn whether it completed the grid (exactly one shard's does)."""
        shard, todo, n_before = self.shard, self.todo, len(self.mine) - len(self.todo)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            # under torch.distributed every rank shares one terminal: rank 0's bar only
            # (its shard's cells; every shard logs each finished cell at DEBUG level)
            bar = tqdm(total=len(self.mine), initial=n_before, unit="cell",
                       desc=f"sweep shard {shard[0]}/{shard[1]}" if shard[1] > 1 else "sweep",
                       disable=self.distributed and shard[0] != 0)
        cache: Dict[str, Dataset] = {}
        try:
            with store._results_writer(store.results_path(self.out)) as writer:
                writer.write({"kind": "shard_start", "shard": f"{shard[0]}/{shard[1]}",
                              "config_hash": self.chash, "n_todo": len(todo), "pid": os.getpid(),
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                for j, cell in enumerate(todo):
                    if bar is not None:
                        bar.set_postfix_str(cell.key, refresh=True)
                    t0 = time.perf_counter()
                    n_new = _run_cell(self.cfg, cell, _dataset(self.cfg, cell.dataset, cache),
                                      writer, dict(self.measured.get(cell.key, {})),
                                      self.chash)
                    records = writer.write(
                        {"kind": "cell_done", "cell": cell.key, "cell_index": cell.index,
                         "config_hash": self.chash, "n_new": n_new,
                         "time_s": time.perf_counter() - t0},
                        read_back=detect_completion and j == len(todo) - 1)
                    if records is not None:
                        done, _ = _progress_state(store._legacy_results(self.out) + records,
                                                  self.chash, self.cfg, warn=False)
                        self.completed_grid = self.keys <= done
                    self.n_run += 1
                    if bar is not None:
                        bar.update(1)
                    log.debug("sweep shard %d/%d: cell %s done (%d of %d)", shard[0], shard[1],
                              cell.key, n_before + j + 1, len(self.mine))
        finally:
            if bar is not None:
                bar.close()

    def fits_here(self) -> bool:
        """Whether this process fits the scaling law: rank 0 under torch.distributed, else the
        shard that completed the grid, or shard 0 when the grid was complete at start."""
        if self.distributed:
            return self.shard[0] == 0
        if self.completed_grid or (not self.todo and self.complete_at_start
                                   and self.shard[0] == 0):
            return True
        if not self.complete_at_start:
            log.info("sweep: the grid is not complete yet; the shard that finishes it fits the "
                     "scaling law (or run --fit-only)")
        return False

    def fit(self, report: bool, fit_kwargs: Optional[Dict[str, Any]] = None
            ) -> Optional[Dict[str, Any]]:
        """:func:`fit_sweep` (with ``fit_kwargs``) when every cell of the grid is finished (over
        all shards)."""
        finished, _ = _progress_state(store.load_results(self.out), self.chash, self.cfg,
                                      warn=False)
        if self.keys <= finished:
            return fit_sweep(self.out, report=report, **(fit_kwargs or {}))
        log.info("sweep: %d of %d cells finished over all shards; the fit runs when all "
                 "are done (or with --fit-only)", len(finished & self.keys), len(self.cells))
        return None


def run_sweep(cfg: SweepConfig, out_dir: PathLike, *,
              shard: Union[Tuple[int, int], str, None] = None, resume: bool = True,
              fit: bool = True, progress: bool = True, report: bool = True,
              fit_kwargs: Optional[Dict[str, Any]] = None) -> SweepSummary:
    """Run this shard's cells of the grid, appending measurements to ``out_dir/results.jsonl``
    (shared by every shard; each line written under a file lock).

    Parameters
    ----------
    cfg : SweepConfig
    out_dir : path
    shard : (i, N), str or None
        Run the cells with ``index % N == i``. A string or None goes through
        :func:`parse_shard` (``"auto"``, ``"slurm"``, ``"i/N"``; None: ``torch.distributed``
        or ``torchrun``'s ``RANK``/``WORLD_SIZE`` when present, else ``(0, 1)``).
    resume : bool
        Skip cells already finished (in the results file, or the per-shard files of older
        versions) with the same settings. ``False`` recomputes this shard's cells; the new
        records are appended and supersede the old ones (other shards' records are kept).
    fit : bool
        Fit the scaling law over all results at the end (and write the sweep report when
        ``report``). Done by one process: rank 0 after a barrier under ``torch.distributed``
        (when ``shard`` is its rank and world size), else the shard whose last cell completes
        the grid, or shard 0 when the grid was complete at start.
    progress : bool
        tqdm bar over the cells.
    report : bool
        Write the sweep report with the fit.
    fit_kwargs : dict, optional
        Further arguments of :func:`fit_sweep` (``statistic``, ``fit_all``, ``weighted``,
        ``n_bootstrap``, ``seed``).

    Returns
    -------
    SweepSummary
        ``fit`` is None in the processes that did not fit.

    Raises
    ------
    ShardBusyError
        When the same shard of ``out_dir`` is running in another process.
    """
    t0 = time.perf_counter()
    shard = sharding._resolve_shard(shard)
    distributed = sharding._dist_shard() == shard and shard[1] > 1
    run = _ShardRun(cfg, Path(out_dir), shard, distributed)
    error: Optional[BaseException] = None
    try:
        # inside the try: under torch.distributed a rank that cannot write here (a directory
        # not mounted on its node, ...) must stop the others at the barrier, not hang them
        store._write_sweep_config(run.out, cfg, run.chash, len(run.cells))
        with store._exclusive(store._shard_lock_path(run.out, shard),
                              what=f"shard {shard[0]}/{shard[1]} of {run.out}"):
            run.plan(resume)
            run.run_cells(detect_completion=fit and not distributed, progress=progress)
    except Exception as exc:  # noqa: BLE001 - under torch.distributed: every rank stops
        if not distributed:
            raise
        error = exc
    summary = SweepSummary(n_cells=len(run.cells), n_shard_cells=len(run.mine), n_run=run.n_run,
                           n_skipped=len(run.mine) - len(run.todo),
                           results_path=str(store.results_path(run.out)),
                           time_s=time.perf_counter() - t0, shard=shard)
    if distributed:
        sharding._rank_sync(error)   # every rank's cells are written (or every rank raises)
    if fit and run.fits_here():
        summary.fit = run.fit(report, fit_kwargs)
    return summary
