"""The built-in examples: :func:`example_report` trains a small model on a built-in data set
(two seeds, for the loss barrier) and writes its :func:`~landscape_lab.report.model_report`.
It is the README's main command, ``landscape-lab report --example digits-mlp``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

from .. import training
from ..data import get_dataset
from ..models import MLP
from ..training import CurvatureCallback, MetricsCallback, TrainConfig, save_checkpoint
from .model import PathLike, ReportConfig, ReportResult, model_report

# the logger name of the former module report.py, so logging settings keep applying
log = logging.getLogger("landscape_lab.report")

#: Built-in examples: data set and model settings (CPU-sized).
EXAMPLES: Dict[str, Dict[str, Any]] = {
    "digits-mlp": dict(dataset="digits", dataset_kwargs={}, width=32, depth=2,
                       activation="tanh", epochs=6, batch_size=32, lr=0.5, momentum=0.0,
                       optimizer="sgd"),
    "gaussian-mlp": dict(dataset="gaussian",
                         dataset_kwargs=dict(n=1600, ambient_dim=32, intrinsic_dim=8,
                                             n_classes=4, noise=0.1),
                         width=32, depth=2, activation="tanh", epochs=6, batch_size=32, lr=0.5,
                         momentum=0.0, optimizer="sgd"),
}


def example_report(name: str = "digits-mlp", out_dir: PathLike = "out/report", *,
                   config: Optional[ReportConfig] = None, seed: int = 0,
                   overrides: Optional[Dict[str, Any]] = None, curvature_every: int = 25,
                   barrier: bool = True) -> ReportResult:
    """Train the built-in example ``name`` (two seeds when ``barrier``) with a curvature log
    and write :func:`model_report` to ``out_dir``.

    Parameters
    ----------
    name : str
        A key of :data:`EXAMPLES`.
    out_dir : path
        Gets ``report.md``, ``figures/``, ``results.json``, ``train_log.jsonl`` and
        ``checkpoints/model_a.pt`` (and ``model_b.pt``).
    config : ReportConfig, optional
    seed : int
        Seed of model A (model B uses ``seed + 1``) and of the measurements.
    overrides : dict, optional
        Replace example settings (``width``, ``depth``, ``epochs``, ``lr``, ...).
    curvature_every : int
        Steps between ``lambda_max`` measurements during training.
    barrier : bool
        Train a second model for the loss barrier.
    """
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose from {sorted(EXAMPLES)}")
    ex = dict(EXAMPLES[name])
    ex.update(overrides or {})
    cfg = config or ReportConfig(seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds = get_dataset(ex["dataset"], seed=seed, **ex["dataset_kwargs"])
    log.info("example %s: %s", name, ds.describe())

    def make(s: int) -> MLP:
        return MLP(int(math.prod(ds.input_shape)), width=ex["width"], depth=ex["depth"],
                   n_classes=ds.n_classes, activation=ex["activation"], seed=s)

    tc = TrainConfig(epochs=ex["epochs"], batch_size=ex["batch_size"], optimizer=ex["optimizer"],
                     lr=ex["lr"], momentum=ex["momentum"], seed=seed, device=cfg.device)
    log_path = out / "train_log.jsonl"
    if log_path.exists():
        log_path.unlink()
    model_a = make(seed)
    cbs = [MetricsCallback(every_steps=curvature_every, every_epochs=None, max_samples=512),
           CurvatureCallback(every_steps=curvature_every, n_samples=256, k=3, tol=1e-3,
                             seed=seed)]
    ra = training.train(model_a, ds, tc, callbacks=cbs, log_path=log_path,
                        progress=cfg.progress)
    meta = dict(dataset=ds.name, dataset_kwargs=ex["dataset_kwargs"], split_seed=seed,
                train_config=asdict(tc), example=name)
    save_checkpoint(out / "checkpoints" / "model_a.pt", model_a, **meta)
    model_b = None
    if barrier and "barrier" in cfg.sections:
        model_b = make(seed + 1)
        tcb = TrainConfig(**{**asdict(tc), "seed": seed + 1})
        training.train(model_b, ds, tcb, progress=cfg.progress)
        save_checkpoint(out / "checkpoints" / "model_b.pt", model_b, **{**meta, "seed": seed + 1})
    t_train = time.perf_counter() - t0
    context = {"example": name, "training": f"{ex['optimizer']} lr={ex['lr']}, "
                                            f"{ex['epochs']} epochs, batch {ex['batch_size']}, "
                                            f"{ra.steps} steps",
               "architecture": f"MLP width {ex['width']}, depth {ex['depth']}, "
                               f"{ex['activation']}",
               "training time (s)": round(t_train, 2)}
    res = model_report(model_a, ds, out, config=cfg, train_log=log_path, model_b=model_b,
                       title=f"Loss-landscape report: {name}", context=context)
    res.time_s = time.perf_counter() - t0
    return res
