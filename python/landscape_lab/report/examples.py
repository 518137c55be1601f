"""The built-in examples: :func:`example_report` trains a small model on a built-in data set
(two seeds, for the loss barrier) and writes its :func:`~landscape_lab.report.model_report`.
It is the README's main command, ``landscape-lab report --example digits-mlp``.

The examples: ``digits-mlp`` and ``gaussian-mlp`` (tanh MLPs, SGD), ``tiny-lm`` (a causal
transformer on a generated second-order Markov text, or WikiText-2 characters from ``data_dir``)
and ``vit`` (a vision transformer on generated class-template images, or CIFAR-10 from
``data_dir``); the transformers' models and data: :mod:`.transformer_examples`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from torch import nn

from .. import training
from ..data import Dataset, get_dataset, load_cifar
from ..models import MLP
from ..training import CurvatureCallback, MetricsCallback, TrainConfig, save_checkpoint
from .model import PathLike, ReportConfig, ReportResult, model_report
from .transformer_examples import (TinyCausalLM, TinyViT, markov_text, template_images,
                                   transformer_blocks, wikitext_chars)

# the logger name of the former module report.py, so logging settings keep applying
log = logging.getLogger("landscape_lab.report")

_MLP_QUICK = dict(width=8, depth=1, epochs=1,
                  report=dict(n_samples=64, k=3, tol=1e-3, trace_matvecs=9, slq_steps=10,
                              slq_probes=2, grad_samples=32, barrier_points=5))
_TRANSFORMER_QUICK_REPORT = dict(n_samples=8, k=3, tol=1e-3, trace_matvecs=6, slq_steps=8,
                                 slq_probes=2, grad_samples=16, barrier_points=5)

#: Built-in examples: data, model, training and measurement settings (CPU-sized). ``data``
#: goes to the data set's generator, ``report`` to :class:`ReportConfig`; ``quick`` replaces
#: settings for a smoke run of seconds (nested dicts are merged).
EXAMPLES: Dict[str, Dict[str, Any]] = {
    "digits-mlp": dict(family="mlp", dataset="digits", dataset_kwargs={}, width=32, depth=2,
                       activation="tanh", epochs=6, batch_size=32, lr=0.5, momentum=0.0,
                       optimizer="sgd", curvature_samples=256, report={}, quick=_MLP_QUICK),
    "gaussian-mlp": dict(family="mlp", dataset="gaussian",
                         dataset_kwargs=dict(n=1600, ambient_dim=32, intrinsic_dim=8,
                                             n_classes=4, noise=0.1),
                         width=32, depth=2, activation="tanh", epochs=6, batch_size=32, lr=0.5,
                         momentum=0.0, optimizer="sgd", curvature_samples=256, report={},
                         quick=_MLP_QUICK),
    "tiny-lm": dict(family="lm", data=dict(n_train=2048, n_test=256, seq_len=32, vocab_size=8,
                                           branching=2),
                    width=32, depth=2, heads=4, epochs=4, batch_size=32, lr=1e-2, momentum=0.0,
                    optimizer="adam", curvature_samples=32,
                    report=dict(n_samples=32, k=8, slq_steps=30, slq_probes=3,
                                grad_samples=128),
                    quick=dict(data=dict(n_train=64, n_test=16, seq_len=8), width=8, depth=1,
                               heads=2, epochs=1, batch_size=16, curvature_samples=8,
                               report=_TRANSFORMER_QUICK_REPORT)),
    "vit": dict(family="vit", data=dict(n_train=2000, n_test=500, signal=0.2), width=32,
                depth=2, heads=4, patch_size=8, pool="mean", epochs=3, batch_size=32, lr=3e-3,
                momentum=0.0, optimizer="adam", curvature_samples=64,
                report=dict(n_samples=64, k=8, slq_steps=30, slq_probes=3, grad_samples=128),
                quick=dict(data=dict(n_train=60, n_test=20, image_size=16), width=8, depth=1,
                           heads=2, epochs=1, batch_size=20, curvature_samples=8,
                           report=_TRANSFORMER_QUICK_REPORT)),
}

#: What ``data_dir`` holds for the examples that read one.
DATA_DIR_SOURCES = {"tiny-lm": "WikiText-2 (wiki.train.tokens, wiki.valid.tokens; characters)",
                    "vit": "CIFAR-10 (python-pickle batches data_batch_1..5, test_batch)"}


def example_settings(name: str, overrides: Optional[Dict[str, Any]] = None,
                     quick: bool = False) -> Dict[str, Any]:
    """The settings of example ``name``: :data:`EXAMPLES` entry, then its ``quick`` settings
    (when ``quick``), then ``overrides`` (``width``, ``depth``, ``epochs``, ``lr``, ...)."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose from {sorted(EXAMPLES)}")
    ex = {k: (dict(v) if isinstance(v, dict) else v) for k, v in EXAMPLES[name].items()}
    for layer in ((ex.pop("quick") if quick else {}), overrides or {}):
        for key, value in layer.items():
            ex[key] = {**ex[key], **value} if isinstance(ex.get(key), dict) else value
    ex.pop("quick", None)
    return ex


def example_config(name: str, quick: bool = False, **fields: Any) -> ReportConfig:
    """The :class:`ReportConfig` of example ``name`` (its measurement sizes, the quick ones when
    ``quick``), with ``fields`` replacing any of them."""
    return ReportConfig(**{**example_settings(name, quick=quick)["report"], **fields})


def _example_data(name: str, ex: Dict[str, Any], data_dir: Optional[PathLike],
                  seed: int) -> Dataset:
    """The example's data: generated, or read from ``data_dir`` for tiny-lm and vit."""
    if data_dir is not None and name not in DATA_DIR_SOURCES:
        raise ValueError(f"example {name!r} reads no files, but data_dir={str(data_dir)!r} was "
                         f"given; data_dir is for " + "; ".join(
                             f"{k}: {v}" for k, v in DATA_DIR_SOURCES.items()))
    data = ex.get("data", {})
    if ex["family"] == "lm":
        if data_dir is not None:
            return wikitext_chars(data_dir, seq_len=data["seq_len"], n_train=data["n_train"],
                                  n_test=data["n_test"])
        return markov_text(seed=seed, **data)
    if ex["family"] == "vit":
        if data_dir is not None:
            return load_cifar(data_dir, "cifar10", n_train=data["n_train"],
                              n_test=data["n_test"], seed=seed)
        return template_images(seed=seed, **data)
    return get_dataset(ex["dataset"], seed=seed, **ex["dataset_kwargs"])


def _model_factory(ex: Dict[str, Any], ds: Dataset) -> Callable[[int], nn.Module]:
    """``seed -> model`` of the example's architecture, fitted to the data set."""
    if ex["family"] == "lm":
        return lambda s: TinyCausalLM(ds.n_classes, width=ex["width"], depth=ex["depth"],
                                      heads=ex["heads"], max_len=ds.input_shape[0], seed=s)
    if ex["family"] == "vit":
        channels, size = ds.input_shape[0], ds.input_shape[1]
        return lambda s: TinyViT(size, min(ex["patch_size"], size), channels, ds.n_classes,
                                 width=ex["width"], depth=ex["depth"], heads=ex["heads"],
                                 pool=ex["pool"], seed=s)
    return lambda s: MLP(int(math.prod(ds.input_shape)), width=ex["width"], depth=ex["depth"],
                         n_classes=ds.n_classes, activation=ex["activation"], seed=s)


def _describe(name: str, ex: Dict[str, Any], ds: Dataset, steps: int) -> Dict[str, Any]:
    """The summary facts of the example: training, architecture and the data's known answer."""
    context: Dict[str, Any] = {
        "example": name,
        "training": f"{ex['optimizer']} lr={ex['lr']}, {ex['epochs']} epochs, batch "
                    f"{ex['batch_size']}, {steps} steps"}
    if ex["family"] == "mlp":
        context["architecture"] = f"MLP width {ex['width']}, depth {ex['depth']}, " \
                                  f"{ex['activation']}"
        return context
    what = "causal transformer LM" if ex["family"] == "lm" else \
        f"ViT ({ex['pool']} pooling, {ex['patch_size']}-pixel patches)"
    context["architecture"] = (f"{what} from nn.TransformerEncoder: width {ex['width']}, "
                               f"{ex['depth']} blocks, {ex['heads']} heads")
    info = ds.info
    if "optimal_loss" in info:
        context["data"] = (f"second-order Markov chain, {info['vocab_size']} tokens, "
                           f"{info['branching']} likely successors per context")
        context["best possible loss (nats/token)"] = info["optimal_loss"]
        context["best loss from the last token alone"] = info["bigram_loss"]
    if "bayes_accuracy" in info:
        context["data"] = f"class templates + unit noise, signal {info['signal']}"
        context["Bayes (nearest-template) test accuracy"] = info["bayes_accuracy"]
    return context


def example_report(name: str = "digits-mlp", out_dir: PathLike = "out/report", *,
                   config: Optional[ReportConfig] = None, seed: int = 0,
                   overrides: Optional[Dict[str, Any]] = None, curvature_every: int = 25,
                   barrier: bool = True, data_dir: Optional[PathLike] = None,
                   quick: bool = False) -> ReportResult:
    """Train the built-in example ``name`` (two seeds when ``barrier``) with a curvature log
    and write :func:`model_report` to ``out_dir``.

    Parameters
    ----------
    name : str
        A key of :data:`EXAMPLES`.
    out_dir : path
        Gets ``report.md``, ``figures/``, ``results.json``, ``train_log.jsonl`` and, for the
        MLP examples, ``checkpoints/model_a.pt`` (and ``model_b.pt``; the transformer examples'
        architectures are not in :func:`landscape_lab.models.build_model`, so they save none).
    config : ReportConfig, optional
        Default: :func:`example_config` (the example's measurement sizes). For the transformer
        examples ``blocks="kinds"`` becomes :func:`transformer_blocks` (the patch embedding
        counts with the embeddings).
    seed : int
        Seed of model A (model B uses ``seed + 1``), of the generated data and of the
        measurements.
    overrides : dict, optional
        Replace example settings (``width``, ``depth``, ``epochs``, ``lr``, ...).
    curvature_every : int
        Steps between ``lambda_max`` measurements during training.
    barrier : bool
        Train a second model for the loss barrier.
    data_dir : path, optional
        ``tiny-lm``: WikiText-2 token files (read as characters); ``vit``: CIFAR-10 batches.
        A missing file raises :class:`~landscape_lab.data.DataFileNotFoundError`; the other
        examples read no files (ValueError).
    quick : bool
        The example's smallest sizes (seconds; smoke tests).
    """
    ex = example_settings(name, overrides, quick)
    cfg = config or example_config(name, quick=quick, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds = _example_data(name, ex, data_dir, seed)
    log.info("example %s: %s", name, ds.describe())
    make = _model_factory(ex, ds)
    tc = TrainConfig(epochs=ex["epochs"], batch_size=ex["batch_size"], optimizer=ex["optimizer"],
                     lr=ex["lr"], momentum=ex["momentum"], seed=seed, device=cfg.device)
    log_path = out / "train_log.jsonl"
    if log_path.exists():
        log_path.unlink()
    model_a = make(seed)
    cbs = [MetricsCallback(every_steps=curvature_every, every_epochs=None, max_samples=512),
           CurvatureCallback(every_steps=curvature_every, n_samples=ex["curvature_samples"],
                             k=3, tol=1e-3, seed=seed)]
    ra = training.train(model_a, ds, tc, callbacks=cbs, log_path=log_path,
                        progress=cfg.progress)
    checkpoints = ex["family"] == "mlp"
    meta = dict(dataset=ds.name, dataset_kwargs=ex.get("dataset_kwargs"), split_seed=seed,
                train_config=asdict(tc), example=name)
    if checkpoints:
        save_checkpoint(out / "checkpoints" / "model_a.pt", model_a, **meta)
    model_b = None
    if barrier and "barrier" in cfg.sections:
        model_b = make(seed + 1)
        training.train(model_b, ds, dataclasses.replace(tc, seed=seed + 1),
                       progress=cfg.progress)
        if checkpoints:
            save_checkpoint(out / "checkpoints" / "model_b.pt", model_b,
                            **{**meta, "seed": seed + 1})
    context = _describe(name, ex, ds, ra.steps)
    context["training time (s)"] = round(time.perf_counter() - t0, 2)
    if ex["family"] != "mlp" and cfg.blocks == "kinds":
        cfg = dataclasses.replace(cfg, blocks=transformer_blocks(model_a))
    res = model_report(model_a, ds, out, config=cfg, train_log=log_path, model_b=model_b,
                       title=f"Loss-landscape report: {name}", context=context)
    res.time_s = time.perf_counter() - t0
    return res
