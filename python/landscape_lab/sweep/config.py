"""The grid of a sweep: its settings (:class:`SweepConfig`), its cells and the summary of a run."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["Cell", "SweepConfig", "SweepSummary"]

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
        """The learning rate of ``optimizer``: ``lr[optimizer]``, else its default."""
        return float(self.lr.get(optimizer, _DEFAULT_LR.get(optimizer, 0.01)))

    def cells(self) -> List[Cell]:
        """All cells in a fixed order (data set, optimizer, depth, width, seed)."""
        out: List[Cell] = []
        for dataset in self.datasets:
            for optimizer in self.optimizers:
                for depth in self.depths:
                    for width in self.widths:
                        for seed in self.seeds:
                            out.append(Cell(len(out), dataset, optimizer, int(width), int(depth),
                                            int(seed)))
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
