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
On start the results file is read; cells with a ``cell_done`` line of the same ``config_hash`` (a
hash of every setting that changes a measurement: learning rate, batch size, measurement sizes,
... — not the grid lists) and a measurement at every epoch of ``measure_epochs`` are skipped. A
cell whose record is incomplete (interrupted half-way, or asked for a new epoch) is trained again
from its seed (training is deterministic for a seed on one machine) and only its missing epochs
are written. A line cut by a crash is skipped by the reader with a warning, and the next append
starts on a fresh line. Records written later supersede earlier ones of the same
(cell, epoch, settings).

One results file, shards (``--shard``)
---------------------------------------
Shard ``i`` of ``N`` runs the cells with ``index % N == i``. Every shard appends to the one
``results.jsonl`` of the output directory: each line is written under an exclusive ``flock`` of
that file (held for the write, flush and ``fsync`` only), so concurrent shards never interleave
or tear lines. Each shard also holds a non-blocking lock ``.shard{i}of{N}.lock`` while it runs,
so an accidental second copy of the same shard stops with an error. Readers also merge the
``results.shard{i}of{N}.jsonl`` files of older versions.

``--shard i/N`` is explicit; ``--shard slurm`` reads a Slurm job array
(``SLURM_ARRAY_TASK_ID`` relative to ``SLURM_ARRAY_TASK_MIN``, over ``SLURM_ARRAY_TASK_COUNT``
or ``MIN``/``MAX``/``STEP``); ``--shard auto`` takes ``i/N`` from an initialized
``torch.distributed`` (rank, world size), else the ``RANK``/``WORLD_SIZE`` variables of
``torchrun``, else a Slurm job array, else ``0/1``. Without ``--shard`` the first two are used
when present (the Slurm array only when asked: a job array may index something else).

The fit: under ``torch.distributed`` every rank waits at a barrier after its cells and rank 0
alone fits the scaling law and writes the report. Otherwise the shard whose last ``cell_done``
completes the grid does it (decided under the file lock, so exactly one), or, when the grid was
already complete at start, shard 0. ``landscape-lab sweep --fit-only --out DIR`` fits the merged
results at any time.
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
           "parse_shard", "results_path", "fit_sweep", "ShardBusyError"]

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
    shard: Tuple[int, int] = (0, 1)


class ShardBusyError(RuntimeError):
    """This shard of this output directory is already running in another process."""


def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    """The shard ``(i, N)`` (``0 <= i < N``) a process runs.

    ``"i/N"``: explicit. ``"slurm"``: from a Slurm job array (an error outside one). ``"auto"``:
    from an initialized ``torch.distributed`` (rank, world size), else the ``RANK``/``WORLD_SIZE``
    variables ``torchrun`` sets, else a Slurm job array, else ``(0, 1)``. ``None`` or ``""``:
    like ``"auto"`` without the Slurm array (a job array may index something else than shards).
    """
    if text is None or text == "":
        return _shard_from_env(slurm=False)
    if text == "auto":
        return _shard_from_env(slurm=True)
    if text == "slurm":
        s = _slurm_shard()
        if s is None:
            raise ValueError("--shard slurm: SLURM_ARRAY_TASK_ID is not set (not a job array)")
        return s
    try:
        a, b = text.split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise ValueError(f"shard must look like 'i/N' (e.g. 0/4), 'auto' or 'slurm'; got "
                         f"{text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need N >= 1 and 0 <= i < N")
    return i, n


def _rank_sync(error: Optional[BaseException]) -> None:
    """Barrier of the torch.distributed ranks that also propagates failures: if any rank's cells
    raised, every rank raises (that rank its own error, the others a ``RankFailure`` naming it)
    instead of the healthy ranks waiting at the barrier for ever."""
    import torch.distributed as dist
    from landscape_ext.distributed import exchange_status
    exchange_status(dist.group.WORLD, error, (), "in the sweep")


def _dist_shard() -> Optional[Tuple[int, int]]:
    """(rank, world size) of an initialized ``torch.distributed`` process group, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return None


def _shard_from_env(slurm: bool) -> Tuple[int, int]:
    s = _dist_shard()
    if s is not None:
        return s
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        try:
            return parse_shard(f"{int(env['RANK'])}/{int(env['WORLD_SIZE'])}")
        except ValueError as e:
            raise ValueError(f"shard from RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r}: "
                             f"{e}") from None
    if slurm:
        s = _slurm_shard()
        if s is not None:
            return s
    return 0, 1


def _slurm_shard() -> Optional[Tuple[int, int]]:
    """``(i, N)`` of a Slurm job-array task (``--array=MIN-MAX[:STEP]``), None outside one."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    try:
        tid = int(env["SLURM_ARRAY_TASK_ID"])
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = max(int(env.get("SLURM_ARRAY_TASK_STEP", "1")), 1)
        if "SLURM_ARRAY_TASK_COUNT" in env:
            n = int(env["SLURM_ARRAY_TASK_COUNT"])
        elif "SLURM_ARRAY_TASK_MAX" in env:
            n = (int(env["SLURM_ARRAY_TASK_MAX"]) - lo) // step + 1
        else:
            raise ValueError("neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX is set")
    except ValueError as e:
        raise ValueError(f"--shard from a Slurm job array: {e}") from None
    i, r = divmod(tid - lo, step)
    if r or not 0 <= i < n:
        raise ValueError(f"--shard from a Slurm job array: task {tid} is not one of {n} tasks "
                         f"{lo}, {lo + step}, ...; use a range array (--array=0-{n - 1}) or "
                         f"--shard i/N")
    return i, n


def results_path(out_dir: PathLike, shard: Tuple[int, int] = (0, 1)) -> Path:
    """The results file of ``out_dir``: ``results.jsonl``, shared by every shard (``shard`` is
    kept for compatibility and does not change the name)."""
    return Path(out_dir) / "results.jsonl"


def _shard_lock_path(out_dir: PathLike, shard: Tuple[int, int]) -> Path:
    return Path(out_dir) / f".shard{shard[0]}of{shard[1]}.lock"


def load_results(out_dir: PathLike) -> List[Dict[str, Any]]:
    """All records of ``out_dir``: the legacy per-shard files ``results.shard*.jsonl`` of older
    versions first, then ``results.jsonl`` (read under a shared lock, so a line being appended is
    never seen half-written). Lines that do not parse (cut by a crash) are skipped with a
    warning."""
    out = Path(out_dir)
    main = results_path(out)
    recs = _legacy_results(out)
    if main.exists():
        with open(main, "rb") as f:
            with _flocked(f, shared=True):
                data = f.read()
        recs.extend(_parse_jsonl(data, main))
    return recs


def _parse_jsonl(data: bytes, path: PathLike, warn: bool = True) -> List[Dict[str, Any]]:
    out = []
    for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if warn:
                log.warning("%s:%d: skipping a line that is not valid JSON (interrupted write?)",
                            path, i)
            continue
        if isinstance(r, dict):
            out.append(r)
    return out


@contextlib.contextmanager
def _flocked(f: Any, shared: bool = False) -> Iterator[None]:
    """Blocking ``flock`` of an open file (POSIX; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _exclusive(path: Path, what: Optional[str] = None) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path.lock`` (POSIX; a no-op elsewhere);
    :class:`ShardBusyError` if another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock = path if path.suffix == ".lock" else path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ShardBusyError(f"{what or path} is in use by another process (lock {lock}); "
                                 f"each shard must run once at a time") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _SharedResults:
    """Appends JSON lines to the results file shared by every shard: each line is written under
    an exclusive ``flock`` of the file (write, flush, ``fsync``, unlock), after a newline if the
    file ends in a line cut by a crash. The same interface as
    :class:`~landscape_lab.training.JsonlWriter`."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # unbuffered, O_APPEND: every write goes to the current end of the file
        self._f = open(self.path, "a+b", buffering=0)

    def write(self, record: Dict[str, Any], read_back: bool = False
              ) -> Optional[List[Dict[str, Any]]]:
        """Append ``record``; with ``read_back``, also return every record of the file, read
        under the same lock (so no other shard's line falls between the two)."""
        line = (json.dumps(json_clean(record), allow_nan=False) + "\n").encode("utf-8")
        f = self._f
        with _flocked(f):
            size = os.fstat(f.fileno()).st_size
            if size and os.pread(f.fileno(), 1, size - 1) != b"\n":
                line = b"\n" + line   # the file ends in a torn line: do not extend it
            view = memoryview(line)
            while view:
                view = view[f.write(view):]
            f.flush()
            os.fsync(f.fileno())
            if read_back:
                f.seek(0)
                return _parse_jsonl(f.read(), self.path, warn=False)
        return None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "_SharedResults":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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


def run_sweep(cfg: SweepConfig, out_dir: PathLike, *,
              shard: Union[Tuple[int, int], str, None] = None, resume: bool = True,
              fit: bool = True, progress: bool = True, report: bool = True) -> SweepSummary:
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
    if shard is None or isinstance(shard, str):
        shard = parse_shard(shard)
    shard = (int(shard[0]), int(shard[1]))
    if shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard {shard}: need N >= 1 and 0 <= i < N")
    distributed = _dist_shard() == shard and shard[1] > 1
    out = Path(out_dir)
    path = results_path(out)
    chash = cfg.measurement_hash()
    cells = cfg.cells()
    keys = {c.key for c in cells}
    mine = [c for c in cells if c.index % shard[1] == shard[0]]
    completed_grid = False
    n_run = 0
    todo: List[Cell] = []
    complete_at_start = False
    error: Optional[BaseException] = None
    try:
        # inside the try: under torch.distributed a rank that cannot write here (a directory
        # not mounted on its node, ...) must stop the others at the barrier, not hang them
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "sweep_config.json", json.dumps(
            {"config": json_clean(asdict(cfg)), "config_hash": chash, "n_cells": len(cells)},
            indent=2))
        with _exclusive(_shard_lock_path(out, shard),
                        what=f"shard {shard[0]}/{shard[1]} of {out}"):
            finished, measured = _progress_state(load_results(out) if resume else [], chash,
                                                 cfg.measure_epochs)
            complete_at_start = keys <= finished
            todo = [c for c in mine if c.key not in finished]
            log.info("sweep: %d cells in the grid, %d in shard %d/%d, %d already finished",
                     len(cells), len(mine), shard[0], shard[1], len(mine) - len(todo))
            cache: Dict[str, Dataset] = {}
            pbar = None
            if progress:
                from tqdm.auto import tqdm
                # under torch.distributed every rank shares one terminal: rank 0's bar only
                # (its shard's cells; every shard logs each finished cell at DEBUG level)
                pbar = tqdm(total=len(mine), initial=len(mine) - len(todo),
                            desc=f"sweep shard {shard[0]}/{shard[1]}" if shard[1] > 1 else "sweep",
                            unit="cell", disable=distributed and shard[0] != 0)
            try:
                with _SharedResults(path) as writer:
                    writer.write({"kind": "shard_start", "shard": f"{shard[0]}/{shard[1]}",
                                  "config_hash": chash, "n_todo": len(todo), "pid": os.getpid(),
                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                    for j, c in enumerate(todo):
                        if pbar is not None:
                            pbar.set_postfix_str(c.key, refresh=True)
                        ds = _dataset(cfg, c.dataset, cache)
                        done_epochs = set(measured.get(c.key, ()))
                        tc0 = time.perf_counter()
                        n_new = _run_cell(cfg, c, ds, writer, done_epochs, chash)
                        last = j == len(todo) - 1
                        recs = writer.write({"kind": "cell_done", "cell": c.key,
                                             "cell_index": c.index, "config_hash": chash,
                                             "n_new": n_new, "time_s": time.perf_counter() - tc0},
                                            read_back=last and fit and not distributed)
                        if recs is not None:
                            # under the lock: did this line complete the grid? (exactly one does)
                            done, _ = _progress_state(_legacy_results(out) + recs, chash,
                                                      cfg.measure_epochs, warn=False)
                            completed_grid = keys <= done
                        n_run += 1
                        if pbar is not None:
                            pbar.update(1)
                        log.debug("sweep shard %d/%d: cell %s done (%d of %d)", shard[0],
                                  shard[1], c.key, len(mine) - len(todo) + j + 1, len(mine))
            finally:
                if pbar is not None:
                    pbar.close()
    except Exception as exc:  # noqa: BLE001 - under torch.distributed: every rank stops
        if not distributed:
            raise
        error = exc
    summary = SweepSummary(n_cells=len(cells), n_shard_cells=len(mine), n_run=n_run,
                           n_skipped=len(mine) - len(todo), results_path=str(path),
                           time_s=time.perf_counter() - t0, shard=shard)
    if distributed:
        _rank_sync(error)   # every rank's cells are written (or every rank raises)
    if not fit:
        return summary
    if distributed:
        fitter = shard[0] == 0
    else:
        fitter = completed_grid or (not todo and complete_at_start and shard[0] == 0)
    if not fitter:
        if not distributed and not completed_grid and not complete_at_start:
            log.info("sweep: the grid is not complete yet; the shard that finishes it fits the "
                     "scaling law (or run --fit-only)")
        return summary
    finished, _ = _progress_state(load_results(out), chash, cfg.measure_epochs, warn=False)
    if keys <= finished:
        summary.fit = fit_sweep(out, report=report)
    else:
        log.info("sweep: %d of %d cells finished over all shards; the fit runs when all "
                 "are done (or with --fit-only)", len(finished & keys), len(cells))
    return summary


def _legacy_results(out: Path) -> List[Dict[str, Any]]:
    """Records of the per-shard files of older versions (``results.shard*.jsonl``)."""
    recs: List[Dict[str, Any]] = []
    main = results_path(out)
    for p in sorted(out.glob("results*.jsonl")):
        if p != main:
            recs.extend(r for r in read_jsonl(p) if isinstance(r, dict))
    return recs


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (shards finishing at once
    never leave a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _progress_state(records: Sequence[Dict[str, Any]], chash: str,
                    measure_epochs: Optional[Sequence[int]] = None, warn: bool = True
                    ) -> Tuple[set, Dict[str, List[int]]]:
    """(finished cell keys, measured epochs per cell) of the records with ``config_hash ==
    chash``. A cell is finished when it has a ``cell_done`` line and (given ``measure_epochs``)
    a measurement at each of those epochs; records missing their fields are ignored."""
    done = set()
    measured: Dict[str, List[int]] = {}
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
                measured.setdefault(cell, []).append(int(r["epoch"]))
            except (KeyError, TypeError, ValueError):
                continue
    if measure_epochs is not None:
        want = set(int(e) for e in measure_epochs)
        finished = {c for c in done if want <= set(measured.get(c, ()))}
    else:
        finished = done
    if others and warn:
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
        raise ValueError(f"fit_sweep: no measurements in {out} (results.jsonl)")
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
