"""The grid of a sweep: its settings (:class:`SweepConfig`), its cells and the summary of a run."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["Cell", "SweepConfig", "SweepSummary"]

_DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}

#: The criterion of a sweep that names none (and no --measure-epochs): train each cell until its
#: mean training loss is at most this (cross-entropy, nats), for at most DEFAULT_MAX_EPOCHS.
DEFAULT_TRAIN_TO_LOSS = 0.1
DEFAULT_MAX_EPOCHS = 100

#: Attention heads of the ViT and LM cells (their widths must be multiples of it).
TRANSFORMER_HEADS = 4


@dataclass(frozen=True)
class Cell:
    """One grid point."""

    index: int
    dataset: str
    optimizer: str
    width: int
    depth: int
    seed: int
    model: str = "mlp"

    @property
    def key(self) -> str:
        return (f"{self.model}|{self.dataset}|{self.optimizer}|w{self.width}|d{self.depth}"
                f"|s{self.seed}")


@dataclass
class SweepConfig:
    """Settings of a sweep (CPU-sized defaults).

    Each cell trains until its training set meets the criterion (``train_to_loss`` and/or
    ``train_to_accuracy``, checked after every epoch) or ``max_epochs`` run out, and is measured
    there (the *final* measurement, which the scaling-law fit uses), plus at the epochs of
    ``measure_epochs`` it passes on the way (trajectories). Without a criterion and without
    ``measure_epochs`` the criterion is ``train_to_loss = DEFAULT_TRAIN_TO_LOSS``; with
    ``measure_epochs`` but no criterion the sweep is a fixed-epoch sweep: every cell trains to
    ``max_epochs`` (default: the last of ``measure_epochs``), whatever its training stage there.
    ``__post_init__`` writes the resolved values into the fields.

    Attributes
    ----------
    widths, depths : list of int
        Grid (``n`` and ``L`` of the scaling law). Per model: MLP hidden units / hidden layers;
        ResNet channels of the first stage / basic blocks per stage (``depth >= 1``); ViT and LM
        embedding width (a multiple of ``TRANSFORMER_HEADS``) / transformer blocks.
    datasets : list of str
        ``digits``, ``gaussian``, ``gaussian-images``, ``synthetic-text`` (generated),
        ``cifar10``, ``cifar100``, ``wikitext2`` (files in ``data_dir``).
    optimizers : list of str
        ``sgd``, ``adam``.
    seeds : list of int
        Model/batch-order seeds (repeated cells; the scaling fit uses all).
    measure_epochs : list of int, optional
        Extra epochs to measure at on the way to the final measurement (0 = at
        initialisation); epochs after a cell stopped are not measured.
    train_to_loss : float, optional
        Criterion: mean training loss ``<=`` this.
    train_to_accuracy : float, optional
        Criterion: training accuracy ``>=`` this (per token for a language model). With both,
        both must hold.
    max_epochs : int, optional
        Most epochs a cell trains (default ``DEFAULT_MAX_EPOCHS`` with a criterion).
    spread_batches : int
        ``R``: every statistic is also measured on ``R`` disjoint batches of ``n_samples``
        (batch 0 is the one whose value is reported) and its batch-to-batch sd recorded
        (``<statistic>_batch_sd``); fewer when the training set is too small, none below 2.
    model : str
        ``mlp`` (default), ``resnet``, ``vit`` (image data) or ``lm`` (text).
    activation : str
        MLP activation.
    batch_size : int
    lr : dict
        Learning rate per optimizer (defaults: sgd 0.1, adam 1e-3).
    momentum : float
        SGD momentum.
    n_samples : int
        Training samples of each measurement batch (Hessian, gradients).
    trace_matvecs : int
        Hutch++ products for ``tr(H)``.
    grad_k : int
        Gradient-covariance singular values, capped at ``n_samples`` (0: no gradient rank, no
        Phi). The rank cannot exceed it: keep it above 100 to test the proposal's threshold.
    tol : float
        Eigensolver relative tolerance.
    max_train : int, optional
        Cap on training samples (CIFAR on a CPU; the size of a generated data set).
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
    measure_epochs: Optional[List[int]] = None
    train_to_loss: Optional[float] = None
    train_to_accuracy: Optional[float] = None
    max_epochs: Optional[int] = None
    spread_batches: int = 3
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
        for name in ("widths", "depths", "datasets", "optimizers", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"SweepConfig: {name} must not be empty")
        if self.measure_epochs is not None and not self.measure_epochs and not self.criterion:
            raise ValueError("SweepConfig: measure_epochs is empty and there is no criterion "
                             "(train_to_loss / train_to_accuracy): nothing says when to measure")
        if min(self.widths) < 1 or min(self.depths) < 0 or min(self.measure_epochs or [0]) < 0:
            raise ValueError(f"SweepConfig: widths must be >= 1, depths and measure_epochs >= 0; "
                             f"got widths={self.widths}, depths={self.depths}, "
                             f"measure_epochs={self.measure_epochs}")
        self._resolve_criterion()
        self._check_model()
        if self.spread_batches < 1 or self.n_samples < 1:
            raise ValueError(f"SweepConfig: spread_batches and n_samples must be >= 1, got "
                             f"spread_batches={self.spread_batches}, n_samples={self.n_samples}")

    def _resolve_criterion(self) -> None:
        """Default criterion, max_epochs and measure_epochs (see the class notes), checked."""
        if self.train_to_loss is not None and not self.train_to_loss > 0:
            raise ValueError(f"SweepConfig: train_to_loss must be > 0, got {self.train_to_loss}")
        if self.train_to_accuracy is not None and not 0 < self.train_to_accuracy <= 1:
            raise ValueError(f"SweepConfig: train_to_accuracy must be in (0, 1], got "
                             f"{self.train_to_accuracy}")
        if not self.criterion and self.measure_epochs is None:
            self.train_to_loss = DEFAULT_TRAIN_TO_LOSS
        self.measure_epochs = sorted(set(int(e) for e in self.measure_epochs or []))
        if self.max_epochs is None:
            self.max_epochs = DEFAULT_MAX_EPOCHS if self.criterion else self.measure_epochs[-1]
        self.max_epochs = int(self.max_epochs)
        least = 1 if self.criterion else 0     # a fixed-epoch sweep may measure at init only
        if self.max_epochs < least or (self.measure_epochs
                                       and self.measure_epochs[-1] > self.max_epochs):
            raise ValueError(f"SweepConfig: max_epochs must be >= {least} and >= every "
                             f"measure_epochs entry, got max_epochs={self.max_epochs}, "
                             f"measure_epochs={self.measure_epochs}")

    def _check_model(self) -> None:
        """The grid fits the model: ResNet depth >= 1, transformer widths divisible by the
        heads."""
        from ..models import MODELS
        if self.model not in MODELS:
            raise ValueError(f"SweepConfig: unknown model {self.model!r}; choose from "
                             f"{sorted(MODELS)}")
        if self.model == "resnet" and min(self.depths) < 1:
            raise ValueError(f"SweepConfig: resnet depths count blocks per stage and must be "
                             f">= 1, got depths={self.depths}")
        if self.model in ("vit", "lm"):
            bad = [w for w in self.widths if w % TRANSFORMER_HEADS]
            if bad:
                raise ValueError(f"SweepConfig: {self.model} widths are embedding widths split "
                                 f"over {TRANSFORMER_HEADS} attention heads; {bad} are not "
                                 f"multiples of {TRANSFORMER_HEADS}")

    @property
    def criterion(self) -> Dict[str, float]:
        """``{"train_loss": L}`` and/or ``{"train_acc": A}``; empty for a fixed-epoch sweep."""
        out: Dict[str, float] = {}
        if self.train_to_loss is not None:
            out["train_loss"] = float(self.train_to_loss)
        if self.train_to_accuracy is not None:
            out["train_acc"] = float(self.train_to_accuracy)
        return out

    def criterion_text(self) -> Optional[str]:
        """The criterion in words (``"train loss <= 0.15"``), None for a fixed-epoch sweep."""
        parts = []
        if self.train_to_loss is not None:
            parts.append(f"train loss <= {self.train_to_loss:g}")
        if self.train_to_accuracy is not None:
            parts.append(f"train accuracy >= {self.train_to_accuracy:g}")
        return " and ".join(parts) or None

    def criterion_met(self, train_loss: float, train_acc: float) -> bool:
        """Whether a training loss and accuracy meet the criterion (False without one)."""
        c = self.criterion
        if not c:
            return False
        return (train_loss <= c.get("train_loss", float("inf"))
                and train_acc >= c.get("train_acc", float("-inf")))

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
                                            int(seed), self.model))
        return out

    def measurement_hash(self) -> str:
        """Hash of the settings that change a measurement (not the grid lists, not
        ``max_epochs``: a cell stopped by it is trained on when it grows)."""
        keys = ("model", "activation", "batch_size", "lr", "momentum", "n_samples",
                "trace_matvecs", "grad_k", "tol", "max_train", "dataset_kwargs",
                "train_to_loss", "train_to_accuracy", "spread_batches")
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
