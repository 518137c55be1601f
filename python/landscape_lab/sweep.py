r"""Width x depth sweeps: train a grid of models, measure the landscape at chosen epochs, resume
after interruption, shard over processes or job-array tasks, fit the scaling law.

Grid and cells
--------------
A *cell* is one (data set, optimizer, width, depth, seed) combination, in the fixed order of
:meth:`SweepConfig.cells` (its index is stable for a given config). Each cell trains a fresh
model (:class:`~landscape_lab.models.MLP` by default) and at every epoch of
``measure_epochs`` (0 = at initialisation) appends **one JSON line** to the results file:

``{"kind": "measurement", "cell": "digits|sgd|w16|d2|s0", "epoch": 3, "width": 16, "depth": 2,
"spectral_norm": ..., "lambda_max": ..., "trace": ..., "trace_stderr": ...,
"grad_effective_rank": ..., "train_acc": ..., "test_acc": ..., "gen_gap": ..., "phi": ...,
"config_hash": ...}``

and when the cell is complete ``{"kind": "cell_done", "cell": ..., "config_hash": ...}``.

Resume
------
On start every ``results*.jsonl`` file of the output directory is read; cells with a
``cell_done`` line of the same ``config_hash`` (a hash of every setting that changes a
measurement: learning rate, batch size, measurement sizes, ... — not the grid lists) are skipped.
A cell interrupted half-way is trained again from its seed (training is deterministic for a seed
on one machine) and only its missing epochs are written. A line cut by a crash is skipped by the
reader.

Sharding (``--shard i/N``)
--------------------------
Shard ``i`` of ``N`` runs the cells with ``index % N == i``. Each shard appends only to its own
file, ``results.shard{i}of{N}.jsonl`` (``results.jsonl`` when unsharded), and holds an
exclusive ``flock`` on it while running, so parallel shards never interleave writes in one
file and an accidental second copy of the same shard stops with an error. Readers merge all
``results*.jsonl`` files. ``--shard slurm`` takes ``i`` and ``N`` from a Slurm job array
(``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` and ``SLURM_ARRAY_TASK_COUNT``). After all
shards finish, ``landscape-lab sweep --fit-only --out DIR`` fits the scaling law over the
merged results and writes the sweep report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from . import training
from .data import Dataset, get_dataset
from .models import build_model, default_model_kwargs
from .scaling import phi as phi_metric
from .training import Callback, JsonlWriter, TrainConfig, TrainState, json_clean, read_jsonl

__all__ = ["SweepConfig", "SweepSummary", "Cell", "run_sweep", "load_results",
           "parse_shard", "results_path", "fit_sweep"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}


@dataclass(frozen=True)
class Cell:
    """One grid point."""

    index: int
    dataset: str
    optimizer: str
    width: int
    depth: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.dataset}|{self.optimizer}|w{self.width}|d{self.depth}|s{self.seed}"


@dataclass
class SweepConfig:
    """Settings of a sweep (CPU-sized defaults).

    Attributes
    ----------
    widths, depths : list of int
        Grid (``n`` and ``L`` of the scaling law; MLP hidden width and hidden layers).
    datasets : list of str
        ``digits``, ``gaussian``, ``cifar10``, ``cifar100`` (``data_dir`` needed for CIFAR).
    optimizers : list of str
        ``sgd``, ``adam``.
    seeds : list of int
        Model/batch-order seeds (repeated cells; the scaling fit uses all).
    measure_epochs : list of int
        Epochs after which to measure (0 = at initialisation); training runs to the largest.
    model : str
        ``mlp`` (default), ``resnet`` or ``vit`` (image data).
    activation : str
        MLP activation.
    batch_size : int
    lr : dict
        Learning rate per optimizer (defaults: sgd 0.1, adam 1e-3).
    momentum : float
        SGD momentum.
    n_samples : int
        Training samples of the fixed measurement batch (Hessian, gradients).
    trace_matvecs : int
        Hutch++ products for ``tr(H)``.
    grad_k : int
        Gradient-covariance singular values, capped at ``n_samples`` (0: no gradient rank, no
        Phi). The rank cannot exceed it: keep it above 100 to test the proposal's threshold.
    tol : float
        Eigensolver relative tolerance.
    max_train : int, optional
        Cap on training samples (CIFAR on a CPU).
    data_dir : str, optional
    dataset_kwargs : dict
        Extra loader arguments per data set name (e.g. ``{"gaussian": {"intrinsic_dim": 4}}``).
    device : str
    """

    widths: List[int] = field(default_factory=lambda: [8, 16])
    depths: List[int] = field(default_factory=lambda: [1, 2])
    datasets: List[str] = field(default_factory=lambda: ["digits"])
    optimizers: List[str] = field(default_factory=lambda: ["sgd"])
    seeds: List[int] = field(default_factory=lambda: [0])
    measure_epochs: List[int] = field(default_factory=lambda: [2])
    model: str = "mlp"
    activation: str = "tanh"
    batch_size: int = 64
    lr: Dict[str, float] = field(default_factory=dict)
    momentum: float = 0.0
    n_samples: int = 256
    trace_matvecs: int = 30
    grad_k: int = 256
    tol: float = 1e-3
    max_train: Optional[int] = None
    data_dir: Optional[str] = None
    dataset_kwargs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    device: str = "cpu"

    def __post_init__(self):
        for name in ("widths", "depths", "datasets", "optimizers", "seeds", "measure_epochs"):
            v = getattr(self, name)
            if not v:
                raise ValueError(f"SweepConfig: {name} must not be empty")
        if min(self.widths) < 1 or min(self.depths) < 0 or min(self.measure_epochs) < 0:
            raise ValueError(f"SweepConfig: widths must be >= 1, depths and measure_epochs >= 0; "
                             f"got widths={self.widths}, depths={self.depths}, "
                             f"measure_epochs={self.measure_epochs}")
        self.measure_epochs = sorted(set(int(e) for e in self.measure_epochs))

    def lr_for(self, optimizer: str) -> float:
        return float(self.lr.get(optimizer, _DEFAULT_LR.get(optimizer, 0.01)))

    def cells(self) -> List[Cell]:
        """All cells in a fixed order (data set, optimizer, depth, width, seed)."""
        out = []
        for ds in self.datasets:
            for opt in self.optimizers:
                for d in self.depths:
                    for w in self.widths:
                        for s in self.seeds:
                            out.append(Cell(len(out), ds, opt, int(w), int(d), int(s)))
        return out

    def measurement_hash(self) -> str:
        """Hash of the settings that change a measurement (not the grid lists)."""
        keys = ("model", "activation", "batch_size", "lr", "momentum", "n_samples",
                "trace_matvecs", "grad_k", "tol", "max_train", "dataset_kwargs")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


@dataclass
class SweepSummary:
    """Result of :func:`run_sweep`."""

    n_cells: int
    n_shard_cells: int
    n_run: int
    n_skipped: int
    results_path: str
    time_s: float
    fit: Optional[Dict[str, Any]] = None


def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``; ``"slurm"`` reads a Slurm job array;
    ``None`` -> ``(0, 1)``."""
    if text is None or text == "":
        return 0, 1
    if text == "slurm":
        env = os.environ
        if "SLURM_ARRAY_TASK_ID" not in env:
            raise ValueError("--shard slurm: SLURM_ARRAY_TASK_ID is not set (not a job array)")
        tid = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        n = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
        return parse_shard(f"{tid}/{n}")
    try:
        a, b = text.split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise ValueError(f"shard must look like 'i/N' (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need N >= 1 and 0 <= i < N")
    return i, n


def results_path(out_dir: PathLike, shard: Tuple[int, int] = (0, 1)) -> Path:
    """This shard's results file in ``out_dir``."""
    i, n = shard
    name = "results.jsonl" if n == 1 else f"results.shard{i}of{n}.jsonl"
    return Path(out_dir) / name


def load_results(out_dir: PathLike) -> List[Dict[str, Any]]:
    """All records of all ``results*.jsonl`` files in ``out_dir`` (merged shards)."""
    recs: List[Dict[str, Any]] = []
    for p in sorted(Path(out_dir).glob("results*.jsonl")):
        recs.extend(read_jsonl(p))
    return recs


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path.lock`` (POSIX; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"{path} is in use by another process (lock {lock}); each "
                               f"shard must run once at a time") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Measure(Callback):
    """Writes one measurement line per wanted epoch (callback of the sweep's training)."""

    def __init__(self, cfg: SweepConfig, cell: Cell, dataset: Dataset, writer: JsonlWriter,
                 done_epochs: set, chash: str, lr: float):
        super().__init__(every_steps=None, every_epochs=1, at_start=True, at_end=False)
        self.cfg, self.cell, self.ds, self.writer = cfg, cell, dataset, writer
        self.done_epochs, self.chash, self.lr = done_epochs, chash, lr
        self.batch = None
        self.n_written = 0

    def measure(self, state: TrainState) -> None:
        e = state.epoch
        if e not in self.cfg.measure_epochs or e in self.done_epochs:
            return
        t0 = time.perf_counter()
        if self.batch is None:
            x, y = self.ds.subset(self.cfg.n_samples, "train", seed=0)
            self.batch = (x.to(self.cfg.device), y.to(self.cfg.device))
        stats, _ = training.curvature_stats(
            state.model, state.loss_fn, self.batch, k=0, tol=self.cfg.tol,
            trace_matvecs=self.cfg.trace_matvecs, spectral_norm=True,
            per_sample_loss=state.per_sample_loss, grad_k=self.cfg.grad_k, seed=self.cell.seed)
        tl, ta = training.evaluate(state.model, self.ds.x_train, self.ds.y_train, state.loss_fn,
                                   device=self.cfg.device)
        vl, va = training.evaluate(state.model, self.ds.x_test, self.ds.y_test, state.loss_fn,
                                   device=self.cfg.device)
        c = self.cell
        rec: Dict[str, Any] = dict(
            kind="measurement", cell=c.key, cell_index=c.index, dataset=c.dataset,
            optimizer=c.optimizer, model=self.cfg.model, width=c.width, depth=c.depth,
            seed=c.seed, epoch=e, step=state.step, lr=self.lr, data_dim=self.ds.data_dim,
            train_loss=tl, train_acc=ta, test_loss=vl, test_acc=va, gen_gap=ta - va,
            loss_gap=vl - tl, config_hash=self.chash)
        rec.update(stats)
        rank = stats.get("grad_effective_rank")
        if rank is not None and stats.get("trace") is not None and stats["spectral_norm"] > 0:
            rec["phi"] = phi_metric(stats["trace"], stats["spectral_norm"], stats["n_params"],
                                    rank, self.ds.data_dim)
        rec["measure_time_s"] = time.perf_counter() - t0
        self.writer.write(rec)
        self.done_epochs.add(e)
        self.n_written += 1


def _dataset(cfg: SweepConfig, name: str, cache: Dict[str, Dataset]) -> Dataset:
    if name not in cache:
        kw = dict(cfg.dataset_kwargs.get(name, {}))
        if name == "digits" and cfg.model in ("resnet", "vit"):
            kw.setdefault("images", True)
        if name in ("cifar10", "cifar100") and cfg.max_train is not None:
            kw.setdefault("n_train", cfg.max_train)
        ds = get_dataset(name, cfg.data_dir, **kw)
        if ds.task != "classification":
            raise ValueError(f"sweep: data set {name!r} is not a classification task")
        if cfg.max_train is not None and ds.n_train > cfg.max_train:
            ds = dataclasses.replace(ds, x_train=ds.x_train[: cfg.max_train],
                                     y_train=ds.y_train[: cfg.max_train])
        cache[name] = ds
    return cache[name]


def _run_cell(cfg: SweepConfig, cell: Cell, ds: Dataset, writer: JsonlWriter,
              done_epochs: set, chash: str) -> int:
    kw = default_model_kwargs(cfg.model, ds.input_shape, ds.n_classes, width=cell.width,
                              depth=cell.depth, seed=cell.seed)
    if cfg.model == "mlp":
        kw["activation"] = cfg.activation
    model = build_model(cfg.model, **kw)
    lr = cfg.lr_for(cell.optimizer)
    tc = TrainConfig(epochs=max(cfg.measure_epochs), batch_size=cfg.batch_size,
                     optimizer=cell.optimizer, lr=lr,
                     momentum=cfg.momentum if cell.optimizer == "sgd" else 0.0,
                     seed=cell.seed, device=cfg.device)
    cb = _Measure(cfg, cell, ds, writer, done_epochs, chash, lr)
    training.train(model, ds, tc, callbacks=[cb], progress=False)
    return cb.n_written


def run_sweep(cfg: SweepConfig, out_dir: PathLike, *, shard: Tuple[int, int] = (0, 1),
              resume: bool = True, fit: bool = True, progress: bool = True,
              report: bool = True) -> SweepSummary:
    """Run this shard's cells of the grid, appending measurements to its results file.

    Parameters
    ----------
    cfg : SweepConfig
    out_dir : path
    shard : (i, N)
        Run the cells with ``index % N == i``.
    resume : bool
        Skip cells already finished (in any ``results*.jsonl`` of ``out_dir``) with the same
        settings. ``False`` starts this shard's file afresh.
    fit : bool
        Fit the scaling law over all results at the end (and write the sweep report when
        ``report``): done by the shard that finds every cell of the grid finished.
    progress : bool
        tqdm bar over the cells.

    Returns
    -------
    SweepSummary
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = results_path(out, shard)
    chash = cfg.measurement_hash()
    cells = cfg.cells()
    mine = [c for c in cells if c.index % shard[1] == shard[0]]
    _write_atomic(out / "sweep_config.json", json.dumps(
        {"config": json_clean(asdict(cfg)), "config_hash": chash, "n_cells": len(cells)},
        indent=2))
    with _exclusive(path):
        if not resume and path.exists():
            path.unlink()
        finished, measured = _progress_state(load_results(out) if resume else [], chash)
        todo = [c for c in mine if c.key not in finished]
        log.info("sweep: %d cells in the grid, %d in shard %d/%d, %d already finished",
                 len(cells), len(mine), shard[0], shard[1], len(mine) - len(todo))
        cache: Dict[str, Dataset] = {}
        pbar = None
        if progress:
            from tqdm.auto import tqdm
            pbar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="sweep",
                        unit="cell")
        n_run = 0
        try:
            with JsonlWriter(path) as writer:
                writer.write({"kind": "shard_start", "shard": f"{shard[0]}/{shard[1]}",
                              "config_hash": chash, "n_todo": len(todo),
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                for c in todo:
                    if pbar is not None:
                        pbar.set_postfix_str(c.key, refresh=True)
                    ds = _dataset(cfg, c.dataset, cache)
                    done_epochs = set(measured.get(c.key, ()))
                    tc0 = time.perf_counter()
                    n_new = _run_cell(cfg, c, ds, writer, done_epochs, chash)
                    writer.write({"kind": "cell_done", "cell": c.key, "cell_index": c.index,
                                  "config_hash": chash, "n_new": n_new,
                                  "time_s": time.perf_counter() - tc0})
                    n_run += 1
                    if pbar is not None:
                        pbar.update(1)
        finally:
            if pbar is not None:
                pbar.close()
    summary = SweepSummary(n_cells=len(cells), n_shard_cells=len(mine), n_run=n_run,
                           n_skipped=len(mine) - len(todo), results_path=str(path),
                           time_s=time.perf_counter() - t0)
    if fit:
        finished, _ = _progress_state(load_results(out), chash)
        if all(c.key in finished for c in cells):
            summary.fit = fit_sweep(out, report=report)
        else:
            log.info("sweep: %d of %d cells finished over all shards; the fit runs when all "
                     "are done (or with --fit-only)", len(finished & {c.key for c in cells}),
                     len(cells))
    return summary


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (shards finishing at once
    never leave a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _progress_state(records: Sequence[Dict[str, Any]], chash: str
                    ) -> Tuple[set, Dict[str, List[int]]]:
    finished = set()
    measured: Dict[str, List[int]] = {}
    others = set()
    for r in records:
        if r.get("config_hash") != chash:
            if r.get("config_hash") is not None:
                others.add(r["config_hash"])
            continue
        if r.get("kind") == "cell_done":
            finished.add(r["cell"])
        elif r.get("kind") == "measurement":
            measured.setdefault(r["cell"], []).append(int(r["epoch"]))
    if others:
        log.warning("sweep: the results directory also holds records made with other settings "
                    "(config hashes %s); they are not reused", sorted(others))
    return finished, measured


def measurements(records: Sequence[Dict[str, Any]], config_hash: Optional[str] = None
                 ) -> List[Dict[str, Any]]:
    """Measurement records (deduplicated by (cell, epoch, config_hash); the last wins),
    optionally of one ``config_hash``."""
    seen: Dict[Tuple[str, int, Optional[str]], Dict[str, Any]] = {}
    for r in records:
        if r.get("kind") != "measurement":
            continue
        if config_hash is not None and r.get("config_hash") != config_hash:
            continue
        seen[(r["cell"], int(r["epoch"]), r.get("config_hash"))] = r
    return list(seen.values())


def fit_sweep(out_dir: PathLike, *, statistic: str = "spectral_norm", epoch: Optional[int] = None,
              n_bootstrap: int = 1000, report: bool = True, seed: int = 0) -> Dict[str, Any]:
    """Fit ``statistic ~ c n^alpha exp(beta L)`` over the merged results of ``out_dir`` (per data
    set and optimizer, at ``epoch``, default the last measured) and write
    ``scaling_fit.json`` and, with ``report``, the sweep report.

    Records made with settings other than the latest ``sweep_config.json`` are ignored.
    """
    from .scaling import fit_scaling_law

    out = Path(out_dir)
    recs = load_results(out)
    chash = None
    cfg_file = out / "sweep_config.json"
    if cfg_file.exists():
        chash = json.loads(cfg_file.read_text()).get("config_hash")
    meas = measurements(recs, chash)
    if not meas:
        raise ValueError(f"fit_sweep: no measurements in {out} (results*.jsonl)")
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in meas:
        groups.setdefault((r["dataset"], r["optimizer"]), []).append(r)
    fits: Dict[str, Any] = {}
    fit_objs: Dict[str, Any] = {}
    for (ds, opt), rs in sorted(groups.items()):
        e = epoch if epoch is not None else max(r["epoch"] for r in rs)
        sel = [r for r in rs if r["epoch"] == e and r.get(statistic) is not None
               and r[statistic] > 0]
        name = f"{ds}|{opt}"
        entry: Dict[str, Any] = {"dataset": ds, "optimizer": opt, "epoch": e,
                                 "statistic": statistic, "n_points": len(sel)}
        try:
            f = fit_scaling_law([r["width"] for r in sel], [r["depth"] for r in sel],
                                [r[statistic] for r in sel], statistic=statistic,
                                n_bootstrap=n_bootstrap, seed=seed)
            entry["fit"] = f.to_dict()
            fit_objs[name] = f
            log.info("scaling law %s at epoch %d:\n%s", name, e, f)
        except ValueError as err:
            entry["error"] = str(err)
            log.warning("scaling law %s: %s", name, err)
        fits[name] = entry
    summary = {"config_hash": chash, "n_measurements": len(meas), "fits": fits}
    _write_atomic(out / "scaling_fit.json", json.dumps(json_clean(summary), indent=2))
    if report:
        from .report import sweep_report
        summary["report"] = str(sweep_report(meas, out, fits=fit_objs, statistic=statistic))
    return summary
