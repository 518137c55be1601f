"""The options of ``landscape-lab sweep`` (grid, training criterion, measurement and spread,
generated data, execution and fit) and their translation into a :class:`SweepConfig` and
:func:`fit_sweep` arguments. :mod:`landscape_lab.cli` adds the options every subcommand shares.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional

from ..data import DATASETS, GENERATED_DEFAULTS
from .config import DEFAULT_MAX_EPOCHS, DEFAULT_TRAIN_TO_LOSS, TRANSFORMER_HEADS, SweepConfig

__all__ = ["add_sweep_options", "sweep_config_from_args", "fit_kwargs_from_args",
           "fit_lines", "STATISTICS"]

#: Measured quantities the scaling law can be fitted to.
STATISTICS = ("spectral_norm", "lambda_max", "trace", "grad_effective_rank", "phi")

_MEANING = (f"MLP: hidden units / hidden layers; ResNet: channels of the first stage / basic "
            f"blocks per stage; ViT and LM: embedding width (a multiple of {TRANSFORMER_HEADS}, "
            f"the heads) / transformer blocks")


def add_sweep_options(p: argparse.ArgumentParser, ints: Callable[[str], List[int]],
                      strs: Callable[[str], List[str]]) -> None:
    """Add the sweep's own option groups to ``p`` (``ints``/``strs`` parse comma lists)."""
    g = p.add_argument_group("grid", f"--widths/--depths per model: {_MEANING}")
    g.add_argument("--widths", type=ints, default=[8, 16], help="comma-separated widths")
    g.add_argument("--depths", type=ints, default=[1, 2], help="comma-separated depths")
    g.add_argument("--datasets", type=strs, default=["digits"],
                   help=f"comma-separated data sets ({', '.join(DATASETS)}); gaussian-images and "
                        f"synthetic-text are generated, CIFAR and WikiText-2 read from --data-dir")
    g.add_argument("--optimizers", type=strs, default=["sgd"],
                   help="comma-separated optimizers (sgd, adam)")
    g.add_argument("--seeds", type=ints, default=None,
                   help="comma-separated seeds per cell (default: --seed)")
    g.add_argument("--model", default="mlp", choices=["mlp", "resnet", "vit", "lm"],
                   help="architecture of every cell (resnet, vit: image data such as digits or "
                        "gaussian-images; lm: synthetic-text or wikitext2)")
    g.add_argument("--activation", default="tanh", help="MLP activation")
    g = p.add_argument_group(
        "training criterion",
        f"Each cell trains until its training set meets the criterion (checked after every "
        f"epoch) or --max-epochs run out, and is measured there; the fit uses the cells that "
        f"reached it. Without --train-to-* and --measure-epochs the criterion is train loss <= "
        f"{DEFAULT_TRAIN_TO_LOSS:g}; --measure-epochs alone makes a fixed-epoch sweep.")
    g.add_argument("--train-to-loss", type=float, default=None, metavar="L",
                   help="criterion: mean training loss <= L (nats)")
    g.add_argument("--train-to-accuracy", type=float, default=None, metavar="A",
                   help="criterion: training accuracy >= A (with --train-to-loss: both)")
    g.add_argument("--max-epochs", type=int, default=None, metavar="N",
                   help=f"most epochs per cell (default {DEFAULT_MAX_EPOCHS} with a criterion, "
                        f"else the last --measure-epochs)")
    g.add_argument("--measure-epochs", type=ints, default=None,
                   help="comma-separated extra epochs to measure at on the way (0 = "
                        "initialisation): trajectories across training")
    g = p.add_argument_group("training and measurement")
    g.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    g.add_argument("--lr-sgd", type=float, default=0.1, help="SGD learning rate")
    g.add_argument("--lr-adam", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    g.add_argument("--samples", type=int, default=256,
                   help="training samples of each measurement batch")
    g.add_argument("--spread-batches", type=int, default=3, metavar="R",
                   help="measure every statistic on R disjoint batches of --samples and record "
                        "its batch-to-batch sd (<statistic>_batch_sd); fewer when the training "
                        "set is too small, 1 = no spread")
    g.add_argument("--trace-matvecs", type=int, default=30, help="Hutch++ products")
    g.add_argument("--grad-k", type=int, default=256,
                   help="gradient-covariance singular values for the rank, at most --samples "
                        "(0: no rank, no Phi); the rank cannot exceed it")
    g.add_argument("--tol", type=float, default=1e-3, help="eigensolver relative tolerance")
    g.add_argument("--data-dir", default=None,
                   help="directory of the CIFAR pickle files or WikiText-2 token files")
    g.add_argument("--max-train", type=int, default=None,
                   help="use at most this many training samples per data set (the training "
                        "size of a generated one)")
    _generated_options(p)
    _execution_options(p)


def _generated_options(p: argparse.ArgumentParser) -> None:
    img, txt = GENERATED_DEFAULTS["gaussian-images"], GENERATED_DEFAULTS["synthetic-text"]
    g = p.add_argument_group("generated data (--datasets gaussian-images, synthetic-text)")
    shape = f"{img['channels']},{img['image_size'][0]},{img['image_size'][1]}"
    g.add_argument("--image-shape", default=None, metavar="C,H,W",
                   help=f"gaussian-images: channels, height, width (default {shape})")
    g.add_argument("--image-classes", type=int, default=None,
                   help=f"gaussian-images: classes (default {img['n_classes']})")
    g.add_argument("--image-signal", type=float, default=None,
                   help=f"gaussian-images: class-template amplitude against unit pixel noise "
                        f"(default {img['signal']}; larger is easier)")
    g.add_argument("--text-vocab", type=int, default=None,
                   help=f"synthetic-text: vocabulary size (default {txt['vocab_size']})")
    g.add_argument("--text-seq-len", type=int, default=None,
                   help=f"synthetic-text: tokens per sequence (default {txt['seq_len']})")
    g.add_argument("--text-branching", type=int, default=None,
                   help=f"synthetic-text: likely successors of each pair of tokens (default "
                        f"{txt['branching']}); the entropy, hence the best loss, grows with it")


def _execution_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution and fit")
    g.add_argument("--shard", default=None,
                   help="'i/N': run the cells with index %% N == i (all shards append to "
                        "OUT/results.jsonl); 'auto': i/N from torch.distributed, else "
                        "torchrun's RANK/WORLD_SIZE, else a Slurm job array "
                        "(SLURM_ARRAY_TASK_ID/COUNT), else 0/1; 'slurm': from a Slurm job "
                        "array only (default: 'auto' without the Slurm array)")
    g.add_argument("--no-resume", action="store_true",
                   help="recompute this shard's cells (the new lines supersede the old ones; "
                        "other shards' results are kept)")
    g.add_argument("--fit-only", action="store_true",
                   help="no training: fit the scaling law over OUT/results.jsonl (and the "
                        "--compare directories) and write the sweep report")
    g.add_argument("--no-fit", action="store_true", help="do not fit at the end")
    g.add_argument("--statistic", default="spectral_norm", choices=list(STATISTICS),
                   help="measured quantity the scaling law is fitted to")
    g.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap replicates of the fit's confidence intervals")
    g.add_argument("--fit-all", action="store_true",
                   help="also fit the cells that did not reach the training criterion")
    g.add_argument("--weighted", action="store_true",
                   help="weight the fit by the batch-to-batch sds ((value / sd)^2 per point)")
    g.add_argument("--compare", default=None, metavar="DIR[,DIR]",
                   help="with --fit-only: fit these sweep directories (e.g. one per "
                        "architecture) side by side, with OUT's own results if it has any, and "
                        "write the comparison to OUT")


def _generated_kwargs(args: argparse.Namespace, name: str) -> Dict[str, Any]:
    """The generated data set ``name``'s options that were given."""
    if name == "gaussian-images":
        kw: Dict[str, Any] = {}
        if args.image_shape:
            try:
                c, h, w = (int(t) for t in args.image_shape.split(","))
            except ValueError:
                raise ValueError(f"--image-shape must be C,H,W (three integers), got "
                                 f"{args.image_shape!r}") from None
            kw.update(channels=c, image_size=(h, w))
        given = {"n_classes": args.image_classes, "signal": args.image_signal}
    else:
        kw = {}
        given = {"vocab_size": args.text_vocab, "seq_len": args.text_seq_len,
                 "branching": args.text_branching}
    kw.update({k: v for k, v in given.items() if v is not None})
    return kw


def sweep_config_from_args(args: argparse.Namespace, device: str,
                           gaussian_kwargs: Optional[Dict[str, Any]] = None) -> SweepConfig:
    """The :class:`SweepConfig` of the parsed options (``gaussian_kwargs``: the Gaussian
    mixture's, from the options the CLI shares with other subcommands)."""
    dkw: Dict[str, Dict[str, Any]] = {}
    if "gaussian" in args.datasets and gaussian_kwargs:
        dkw["gaussian"] = dict(gaussian_kwargs)
    for name in GENERATED_DEFAULTS:
        if name in args.datasets and _generated_kwargs(args, name):
            dkw[name] = _generated_kwargs(args, name)
    return SweepConfig(widths=args.widths, depths=args.depths, datasets=args.datasets,
                       optimizers=args.optimizers, seeds=args.seeds or [args.seed],
                       measure_epochs=args.measure_epochs, train_to_loss=args.train_to_loss,
                       train_to_accuracy=args.train_to_accuracy, max_epochs=args.max_epochs,
                       spread_batches=args.spread_batches, model=args.model,
                       activation=args.activation, batch_size=args.batch_size,
                       lr={"sgd": args.lr_sgd, "adam": args.lr_adam}, momentum=args.momentum,
                       n_samples=args.samples, trace_matvecs=args.trace_matvecs,
                       grad_k=args.grad_k, tol=args.tol, max_train=args.max_train,
                       data_dir=args.data_dir, dataset_kwargs=dkw, device=device)


def fit_kwargs_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """:func:`fit_sweep`'s keyword arguments from the parsed options."""
    from pathlib import Path

    kw: Dict[str, Any] = dict(statistic=args.statistic, n_bootstrap=args.bootstrap,
                              seed=args.seed, fit_all=args.fit_all, weighted=args.weighted)
    if args.compare:
        own = [Path(args.out)] if (Path(args.out) / "sweep_config.json").exists() else []
        kw["sources"] = own + [Path(d) for d in args.compare.split(",") if d]
    return kw


def fit_lines(summary: Dict[str, Any]) -> List[str]:
    """One line per fitted group of a :func:`fit_sweep` summary: the law with its intervals and
    how many cells it used and left out."""
    lines = []
    for name, e in summary["fits"].items():
        f = e.get("fit")
        left = (f", {e['n_not_reached']} of {e['n_cells']} cells left out (criterion "
                f"not reached)" if e.get("n_not_reached") and not e.get("fit_all") else "")
        if not f:
            lines.append(f"{name}: no fit ({e.get('error')})")
            continue
        ci = {k: ("" if f.get(f"{k}_ci") is None
                  else f" [{f[f'{k}_ci'][0]:.3g}, {f[f'{k}_ci'][1]:.3g}]")
              for k in ("alpha", "beta")}
        alpha = "n/a" if f["alpha"] is None else f"{f['alpha']:.3g}"
        beta = "n/a" if f["beta"] is None else f"{f['beta']:.3g}"
        lines.append(f"{name}: {e['statistic']} ~ c n^alpha exp(beta L), alpha = {alpha}"
                     f"{ci['alpha']}, beta = {beta}{ci['beta']}, R^2 = {f['r_squared']:.3f} "
                     f"({e['n_points']} points{left})")
    return lines
