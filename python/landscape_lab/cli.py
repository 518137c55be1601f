"""``landscape-lab``: the command line of landscape-ext's science layer.

Subcommands (``landscape-lab SUBCOMMAND --help`` explains every option):

* ``report``   — a full landscape report of one model (built-in example or checkpoint);
* ``train``    — train a model with a curvature/metrics log and save a checkpoint;
* ``sweep``    — width x depth sweep: train to a criterion, measure with batch spread,
  resume, shard, fit the scaling law per architecture;
* ``barrier``  — loss along the straight line between two models;
* ``spectrum`` — top-k eigenvalues, trace and spectral density of one model.

Every subcommand takes ``--device``, ``--seed``, ``--out``, ``--quiet``, ``--verbose`` and
``--threads``, and prints where its outputs are and how long it took.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "build_parser"]

log = logging.getLogger("landscape_lab.cli")

_EPILOG = ("Outputs are plain files: Markdown/HTML reports, PNG figures, JSON and JSON-lines. "
           "Data files are never downloaded: CIFAR and WikiText-2 are read from --data-dir.")


# ------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------


def _ints(text: str) -> List[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None


def _strs(text: str) -> List[str]:
    return [t for t in text.replace(" ", "").split(",") if t]


class _Fmt(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` for options whose default says something (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if ("%(default)" not in h and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            h += " (default: %(default)s)"
        return h


def _common(p: argparse.ArgumentParser, out_default: str) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--out", default=out_default,
                   help="output directory (created if missing)")
    g.add_argument("--device", default="auto",
                   help="torch device for training and measurements: 'cpu', 'cuda', 'cuda:1', "
                        "or 'auto' (CUDA when available, else CPU)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of model initialisation, data split/order and random probes")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bars, warnings only in the log")
    g.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _data_opts(p: argparse.ArgumentParser, default: Optional[str] = "digits") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=default,
                   choices=["digits", "gaussian", "cifar10", "cifar100", "wikitext2"],
                   help="data set: scikit-learn digits (built in), a Gaussian mixture "
                        "(synthetic), CIFAR-10/100 (python-pickle files) or WikiText-2 "
                        "(wiki.*.tokens files)")
    g.add_argument("--data-dir", default=None,
                   help="directory with the CIFAR pickles (data_batch_1..5, test_batch / "
                        "train, test) or the WikiText-2 token files; never downloaded")
    g.add_argument("--max-train", type=int, default=None,
                   help="use at most this many training samples (CPU-sized CIFAR runs)")
    g.add_argument("--seq-len", type=int, default=32, help="WikiText-2 sequence length")
    _gaussian_opts(g)


def _gaussian_opts(g: Any) -> None:
    g.add_argument("--gaussian-n", type=int, default=2000,
                   help="Gaussian mixture: samples (train + test)")
    g.add_argument("--ambient-dim", type=int, default=32,
                   help="Gaussian mixture: ambient dimension")
    g.add_argument("--intrinsic-dim", type=int, default=8,
                   help="Gaussian mixture: dimension of the subspace the data lie on "
                        "(the D of Phi)")
    g.add_argument("--n-classes", type=int, default=4, help="Gaussian mixture: classes")
    g.add_argument("--noise", type=float, default=0.1,
                   help="Gaussian mixture: std of the ambient noise")


#: The measurement options and the ReportConfig fields they set; an option left out (None)
#: keeps the example's size or ReportConfig's default (named in its help).
_MEASURE_FIELDS = {"samples": "n_samples", "k": "k", "tol": "tol",
                   "trace_matvecs": "trace_matvecs", "slq_steps": "slq_steps",
                   "slq_probes": "slq_probes", "grad_samples": "grad_samples",
                   "grad_k": "grad_k", "barrier_points": "barrier_points"}
_EXAMPLE_OWN = "; the transformer examples use their own, smaller size"


def _measure_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("curvature measurements")
    g.add_argument("--samples", type=int, default=None,
                   help="training samples (sequences for a language model) of the fixed batch "
                        "the Hessian is measured on (default: 512" + _EXAMPLE_OWN + ")")
    g.add_argument("--k", type=int, default=None,
                   help="top Hessian eigenvalues (block Lanczos) (default: 12" + _EXAMPLE_OWN
                        + ")")
    g.add_argument("--tol", type=float, default=None,
                   help="eigensolver tolerance: converged when ||Hx - lambda x|| <= tol ||H|| "
                        "(default: 1e-4)")
    g.add_argument("--trace-matvecs", type=int, default=None,
                   help="Hessian-vector products for the Hutch++ trace estimate (default: 60)")
    g.add_argument("--slq-steps", type=int, default=None,
                   help="Lanczos steps per probe of the spectral density (SLQ), also of the "
                        "per-block densities (default: 40" + _EXAMPLE_OWN + ")")
    g.add_argument("--slq-probes", type=int, default=None,
                   help="random probes of the spectral density (its error band), also per block "
                        "(default: 5" + _EXAMPLE_OWN + ")")


#: The built-in examples (keys of ``landscape_lab.report.EXAMPLES``; spelled out here so that
#: building the parser does not import torch).
_EXAMPLE_NAMES = ["digits-mlp", "gaussian-mlp", "tiny-lm", "vit"]
#: The examples barrier and spectrum can train (their models save as checkpoints).
_MLP_EXAMPLE_NAMES = ["digits-mlp", "gaussian-mlp"]

#: Type and help of the options that change an example's size, shared by report, barrier and
#: spectrum (each takes a subset, in its own order).
_EXAMPLE_SIZES = {"width": (int, "example: hidden width (transformers: embedding width)"),
                  "depth": (int, "example: hidden layers (transformers: blocks)"),
                  "epochs": (int, "example: training epochs"),
                  "lr": (float, "example: learning rate (SGD for the MLPs, Adam for the "
                                "transformers)")}


#: Each subcommand's one-line help (in the command list) and description (its --help).
_SUBCOMMAND_TEXTS = {
    "report": (
        "full landscape report of one model (example or checkpoint)",
        "Write a landscape report (report.md or .html, figures/*.png, "
        "results.json) for one model: top-k Hessian eigenvalues with residuals, "
        "trace with its error bar, the SLQ spectral density with a semicircle fit "
        "and spikes, per-block spectra (lambda_max, tr(H_bb)/d_b and densities of "
        "embeddings, attention, MLP, norms, head), the gradient-covariance spectrum "
        "with its Marchenko-Pastur fit and gradient rank, lambda_max over training "
        "(with a training log) and the loss barrier to a second model. Without "
        "--checkpoint it trains the built-in example first (two seeds, for the "
        "barrier)."),
    "train": (
        "train a model with a metrics/curvature log; save a checkpoint",
        "Train a model and record, every N steps, loss/accuracy and landscape "
        "statistics (lambda_max and top-k, trace, gradient rank) to "
        "OUT/train_log.jsonl; save OUT/checkpoint.pt and OUT/summary.json. The "
        "checkpoint feeds `report`, `spectrum` and `barrier`."),
    "sweep": (
        "width x depth sweep to a training criterion, with spread, resume, shards, fit",
        "Train every (data set, optimizer, width, depth, seed) cell until its training "
        "set meets the criterion (or --max-epochs), measure ||H||_2, lambda_max, "
        "tr(H), gradient rank, train/test accuracy and Phi there (and at "
        "--measure-epochs), each with its batch-to-batch sd over --spread-batches "
        "disjoint batches, one JSON line per measurement in OUT/results.jsonl. "
        "Finished cells are skipped on a re-run (resume); an interrupted cell is "
        "run again. --shard i/N runs every N-th cell (parallel processes, torchrun "
        "ranks or job-array tasks); every shard appends to the one results file "
        "under a file lock. --shard auto takes i/N from torch.distributed, "
        "torchrun's RANK/WORLD_SIZE or a Slurm job array. When the grid is complete "
        "(or with --fit-only) one process fits the scaling law "
        "||H||_2 = c n^alpha exp(beta L) per model and data set over the cells that "
        "reached the criterion and writes OUT/sweep_report.md with its figures; "
        "--fit-only --compare DIRS puts several sweeps side by side."),
    "barrier": (
        "loss along the straight line between two models",
        "Evaluate the loss (and accuracy) at (1-t) w_A + t w_B for t in [0, 1] and "
        "report the barrier height (maximum of the loss above the chord). Writes "
        "OUT/barrier.json and OUT/barrier.png. Without checkpoints, two seeds of "
        "the digits example are trained first."),
    "spectrum": (
        "top-k eigenvalues, trace and spectral density of one model",
        "Hessian (or Gauss-Newton) spectrum of a checkpoint or of the example "
        "model: top-k eigenpairs with residuals, Hutch++ trace with standard "
        "error, SLQ density with semicircle fit. Writes OUT/spectrum.md, "
        "OUT/results.json and OUT/figures/{topk,esd}.png."),
}


def _add_subparser(sub: Any, name: str) -> argparse.ArgumentParser:
    """The subcommand ``name``'s parser: its texts, the shared formatter and epilog."""
    help_text, description = _SUBCOMMAND_TEXTS[name]
    return sub.add_parser(name, formatter_class=_Fmt, epilog=_EPILOG, help=help_text,
                          description=description)


def _model_source_opts(p: argparse.ArgumentParser, checkpoints: Dict[str, str],
                       example_help: str) -> None:
    """Where barrier and spectrum get their models: the ``checkpoints`` options (flag: help),
    else the built-in ``--example`` (digits-mlp by default) with its ``--epochs`` and
    ``--width``."""
    for flag, text in checkpoints.items():
        p.add_argument(flag, default=None, help=text)
    p.add_argument("--example", default="digits-mlp", choices=_MLP_EXAMPLE_NAMES,
                   help=example_help)
    _example_size_opts(p, ["epochs", "width"])


def _example_size_opts(g: Any, sizes: Sequence[str]) -> None:
    """The options ``--<size>`` for ``sizes`` (keys of :data:`_EXAMPLE_SIZES`), in that order."""
    for name in sizes:
        kind, text = _EXAMPLE_SIZES[name]
        g.add_argument(f"--{name}", type=kind, default=None, help=text)


def _add_report_parser(sub: Any) -> None:
    """``report``: one model's full landscape report (example or checkpoint)."""
    p = _add_subparser(sub, "report")
    g = p.add_argument_group("model")
    g.add_argument("--example", default=None, choices=_EXAMPLE_NAMES,
                   help="built-in example to train and report on (the default when no "
                        "--checkpoint is given: digits-mlp): tanh MLPs on digits or a Gaussian "
                        "mixture; tiny-lm, a causal transformer LM on a generated Markov text "
                        "(WikiText-2 characters from --data-dir); vit, a vision transformer on "
                        "generated class-template images (CIFAR-10 from --data-dir)")
    g.add_argument("--quick", action="store_true",
                   help="example: its smallest sizes (model, data, training, measurements; "
                        "seconds, for smoke tests)")
    g.add_argument("--checkpoint", default=None,
                   help="report on this checkpoint (from `landscape-lab train`) instead")
    g.add_argument("--checkpoint-b", default=None,
                   help="second checkpoint (same architecture) for the loss barrier")
    g.add_argument("--train-log", default=None,
                   help="training log (train_log.jsonl) for lambda_max over training")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a report already in --out (its files are removed first; "
                        "without this flag such a folder is refused)")
    _example_size_opts(g, ["width", "depth", "epochs", "lr"])
    g.add_argument("--curvature-every", type=int, default=25,
                   help="example: steps between lambda_max measurements during training")
    g.add_argument("--no-barrier", action="store_true",
                   help="skip the second model and the barrier section")
    _data_opts(p, default=None)
    _measure_opts(p)
    g = p.add_argument_group("gradients, barrier, output")
    g.add_argument("--grad-samples", type=int, default=None,
                   help="samples of the gradient covariance (default: 512" + _EXAMPLE_OWN + ")")
    g.add_argument("--grad-k", type=int, default=None,
                   help="gradient-covariance eigenvalues (default 0: all min(n, d))")
    g.add_argument("--barrier-points", type=int, default=None,
                   help="points on the straight line between the two models (default: 21)")
    g.add_argument("--sections", type=_strs, default=None,
                   help="comma-separated subset of topk,trace,esd,blocks,gradients,training,"
                        "barrier (blocks: per-block spectra of the parameter kinds)")
    g.add_argument("--format", default="both", choices=["markdown", "html", "both"],
                   help="report format (default both: report.md and report.html, the figures "
                        "inline)")
    _common(p, "out/report")


def _add_train_parser(sub: Any) -> None:
    """``train``: a model trained with a metrics/curvature log and a checkpoint."""
    p = _add_subparser(sub, "train")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mlp", choices=["mlp", "resnet", "vit", "lm"],
                   help="MLP, CIFAR-style ResNet, small ViT, or causal Transformer LM "
                        "(wikitext2)")
    g.add_argument("--width", type=int, default=32,
                   help="MLP hidden units / ResNet first-stage channels / Transformer width")
    g.add_argument("--depth", type=int, default=2,
                   help="MLP hidden layers / ResNet blocks per stage / Transformer blocks")
    g.add_argument("--activation", default="tanh", choices=["relu", "tanh", "gelu", "silu"],
                   help="MLP activation")
    _data_opts(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5, help="training epochs")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    g.add_argument("--batch-size", type=int, default=32, help="mini-batch size")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="optimizer")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 0.1 for SGD, 1e-3 for Adam)")
    g.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    g = p.add_argument_group("logging")
    g.add_argument("--metrics-every", type=int, default=20,
                   help="steps between train/test loss and accuracy records (0: each epoch)")
    g.add_argument("--curvature-every", type=int, default=20,
                   help="steps between curvature records (0: off)")
    g.add_argument("--curv-samples", type=int, default=256,
                   help="training samples of the fixed curvature batch")
    g.add_argument("--k", type=int, default=3, help="top Hessian eigenvalues per record")
    g.add_argument("--trace-matvecs", type=int, default=0,
                   help="Hutch++ products for the trace per record (0: off)")
    g.add_argument("--grad-k", type=int, default=0,
                   help="gradient-covariance singular values for the gradient rank (0: off)")
    _common(p, "out/train")


def _add_sweep_parser(sub: Any) -> None:
    """``sweep``: the width x depth grid, its training criterion, measurement, execution (resume,
    shards) and fit; the sweep's own options live in :mod:`landscape_lab.sweep.options`."""
    from .sweep.options import add_sweep_options

    p = _add_subparser(sub, "sweep")
    add_sweep_options(p, _ints, _strs)
    _gaussian_opts(p.add_argument_group("Gaussian-mixture data (--datasets gaussian)"))
    _common(p, "out/sweep")


def _add_barrier_parser(sub: Any) -> None:
    """``barrier``: the loss along the line between two models."""
    p = _add_subparser(sub, "barrier")
    _model_source_opts(p, {"--checkpoint-a": "first model (checkpoint.pt)",
                           "--checkpoint-b": "second model, same architecture"},
                       "built-in example to train twice when no checkpoints are given")
    p.add_argument("--points", type=int, default=25, help="points on the line")
    p.add_argument("--samples", type=int, default=1024,
                   help="samples the loss is evaluated on")
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="data split the loss is evaluated on")
    p.add_argument("--bn-reestimate", action="store_true",
                   help="re-estimate BatchNorm statistics at every t")
    _data_opts(p, default=None)
    _common(p, "out/barrier")


def _add_spectrum_parser(sub: Any) -> None:
    """``spectrum``: top-k eigenvalues, trace and density of one model."""
    p = _add_subparser(sub, "spectrum")
    _model_source_opts(p, {"--checkpoint": "model checkpoint (default: example)"},
                       "built-in example to train when no checkpoint is given")
    p.add_argument("--operator", default="hessian", choices=["hessian", "ggn"],
                   help="curvature matrix: exact Hessian or Gauss-Newton")
    p.add_argument("--which", default="largest",
                   choices=["largest", "smallest", "both", "magnitude"],
                   help="which end of the spectrum the k eigenvalues come from")
    _data_opts(p, default=None)
    _measure_opts(p)
    _common(p, "out/spectrum")


def build_parser() -> argparse.ArgumentParser:
    """The ``landscape-lab`` argument parser."""
    ap = argparse.ArgumentParser(
        prog="landscape-lab", formatter_class=_Fmt,
        description="Loss-landscape studies from the command line: Hessian spectra, trace, "
                    "spectral density with random-matrix fits, gradient-covariance rank, loss "
                    "barriers, width/depth sweeps with scaling-law fits.",
        epilog="examples:\n"
               "  landscape-lab report --example digits-mlp --out out/report\n"
               "  landscape-lab report --example tiny-lm --out out/tiny-lm\n"
               "  landscape-lab train --dataset digits --width 64 --depth 3 --out out/run\n"
               "  landscape-lab report --checkpoint out/run/checkpoint.pt "
               "--train-log out/run/train_log.jsonl\n"
               "  landscape-lab sweep --widths 16,48 --depths 1,3 --train-to-loss 0.15 "
               "--max-epochs 40 --out out/sweep\n"
               "  landscape-lab sweep --model vit --datasets gaussian-images --widths 16,32 "
               "--out out/vit\n"
               "  landscape-lab sweep --widths 8,16,32 --depths 1,2,3 --shard 0/4 --out out/sweep\n"
               "  landscape-lab sweep --fit-only --compare out/sweep,out/vit --out out/compare\n\n"
               + _EPILOG)
    sub = ap.add_subparsers(dest="command", metavar="SUBCOMMAND")
    sub.required = True

    for add_parser in (_add_report_parser, _add_train_parser, _add_sweep_parser,
                       _add_barrier_parser, _add_spectrum_parser):
        add_parser(sub)
    return ap


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _setup(args: argparse.Namespace) -> str:
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if not args.verbose:  # the engine's per-call INFO lines (eigsh convergence, ...) are noise here
        logging.getLogger("landscape_ext").setLevel(logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"landscape-lab: --device {dev} requested but CUDA is not available")
    torch.manual_seed(args.seed)
    return dev


def _dataset_kwargs(args: argparse.Namespace, name: str) -> Dict[str, Any]:
    if name == "gaussian":
        return dict(n=args.gaussian_n, ambient_dim=args.ambient_dim,
                    intrinsic_dim=args.intrinsic_dim, n_classes=args.n_classes, noise=args.noise)
    if name == "wikitext2":
        return dict(seq_len=args.seq_len)
    if name in ("cifar10", "cifar100") and args.max_train:
        return dict(n_train=args.max_train, n_test=max(args.max_train // 5, 1))
    if name == "digits" and getattr(args, "model", "mlp") in ("resnet", "vit"):
        return dict(images=True)   # (1, 8, 8) images for the convolutional / patch models
    return {}


def _load_dataset(args: argparse.Namespace, meta: Optional[Dict[str, Any]] = None):
    """The data set named on the command line, else the one recorded in a checkpoint."""
    from .data import get_dataset

    meta = meta or {}
    name = getattr(args, "dataset", None) or meta.get("dataset") or "digits"
    if getattr(args, "dataset", None):
        kw = _dataset_kwargs(args, name)
    else:
        kw = dict(meta.get("dataset_kwargs") or {})
    data_dir = getattr(args, "data_dir", None) or meta.get("data_dir")
    seed = meta.get("split_seed", args.seed)
    ds = get_dataset(name, data_dir, seed=seed, **kw)
    if getattr(args, "max_train", None) and ds.n_train > args.max_train:
        import dataclasses

        ds = dataclasses.replace(ds, x_train=ds.x_train[: args.max_train],
                                 y_train=ds.y_train[: args.max_train])
    return ds


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    o = {}
    for k in ("width", "depth", "epochs", "lr"):
        v = getattr(args, k, None)
        if v is not None:
            o[k] = v
    return o


def _report_config(args: argparse.Namespace, dev: str, base: Any = None, **kw: Any):
    """``base`` (default ``ReportConfig()``) with the measurement options given on the command
    line, the seed, device, progress and sections, and ``kw``."""
    import dataclasses

    from .report import SECTIONS, ReportConfig

    sections = tuple(getattr(args, "sections", None) or SECTIONS)
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"landscape-lab: unknown section(s) {bad}; choose from {SECTIONS}")
    given = {field: getattr(args, opt) for opt, field in _MEASURE_FIELDS.items()
             if getattr(args, opt, None) is not None}
    return dataclasses.replace(base or ReportConfig(), **{
        **given, "seed": args.seed, "device": dev, "progress": not args.quiet,
        "sections": sections, **kw})


def _train_example(args: argparse.Namespace, dev: str, seeds: Sequence[int]):
    """Train the built-in example ``args.example`` (with the size options given) once per
    seed in ``seeds``; returns the data set, the example's settings and the models."""
    import numpy as np

    from . import training
    from .data import get_dataset
    from .models import MLP
    from .report import EXAMPLES

    ex = {**EXAMPLES[args.example], **_overrides(args)}
    ds = get_dataset(ex["dataset"], seed=args.seed, **ex["dataset_kwargs"])
    models = []
    for seed in seeds:
        model = MLP(int(np.prod(ds.input_shape)), ex["width"], ex["depth"], ds.n_classes,
                    ex["activation"], seed=seed)
        training.train(model, ds, training.TrainConfig(
            epochs=ex["epochs"], batch_size=ex["batch_size"], optimizer=ex["optimizer"],
            lr=ex["lr"], seed=seed, device=dev), progress=not args.quiet)
        models.append(model)
    return ds, ex, models


def _done(what: str, path: Any, t0: float) -> None:
    print(f"{what}: {path}")
    print(f"elapsed: {time.perf_counter() - t0:.1f} s")


# ------------------------------------------------------------------------------------------------
# subcommands
# ------------------------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    dev = _setup(args)
    from . import report, training

    example = args.example or "digits-mlp"
    if args.checkpoint is not None and args.quick:
        raise SystemExit("landscape-lab report: --quick sizes a built-in example; it does not "
                         "apply to --checkpoint")
    base = report.example_config(example, args.quick) if args.checkpoint is None else None
    cfg = _report_config(args, dev, base, format=args.format)
    if args.train_log is not None and Path(args.train_log).resolve().parent == \
            Path(args.out).resolve() and args.overwrite:
        raise SystemExit("landscape-lab report: --train-log lies in --out, which --overwrite "
                         "would clear: copy it elsewhere or choose another --out")
    from .report.outdir import prepare_report_dir

    prepare_report_dir(args.out, args.overwrite, "landscape-lab report")
    if args.no_barrier:
        cfg.sections = tuple(s for s in cfg.sections if s != "barrier")
    if args.checkpoint is None:
        if args.checkpoint_b is not None:
            raise SystemExit("landscape-lab report: --checkpoint-b needs --checkpoint")
        res = report.example_report(example, args.out, config=cfg, seed=args.seed,
                                    overrides=_overrides(args),
                                    curvature_every=args.curvature_every,
                                    barrier=not args.no_barrier, data_dir=args.data_dir,
                                    quick=args.quick)
    else:
        model, meta = training.load_checkpoint(args.checkpoint, dev)
        model_b = None
        if args.checkpoint_b is not None:
            model_b, _ = training.load_checkpoint(args.checkpoint_b, dev)
        ds = _load_dataset(args, meta)
        res = report.model_report(model, ds, args.out, config=cfg, train_log=args.train_log,
                                  model_b=model_b, context={"checkpoint": args.checkpoint})
    r = res.results
    print(f"lambda_max = {r['topk']['eigenvalues'][0]:.6g}" if "topk" in r else "", end="")
    if "trace" in r:
        print(f", trace = {r['trace']['estimate']:.6g} +- {r['trace']['stderr']:.2g}", end="")
    if "gradients" in r:
        print(f", gradient effective rank = {r['gradients']['rank']['effective_rank']:.1f}",
              end="")
    if "barrier" in r:
        print(f", barrier = {r['barrier']['height']:.4g}", end="")
    print()
    print(f"figures: {', '.join(sorted(res.figures))}  results: {res.results_path}")
    _done("report", res.report_path, t0)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    dev = _setup(args)
    from .models import build_model, default_model_kwargs, n_params
    from .training import (CurvatureCallback, MetricsCallback, TrainConfig, json_clean,
                           save_checkpoint, train)

    ds = _load_dataset(args)
    if (args.model == "lm") != (ds.task == "language_model"):
        raise SystemExit(f"landscape-lab train: model {args.model!r} does not fit data set "
                         f"{ds.name!r} ({ds.task}); use --model lm with wikitext2")
    extra = {"activation": args.activation} if args.model == "mlp" else {}
    kw = default_model_kwargs(args.model, ds.input_shape, ds.n_classes, width=args.width,
                              depth=args.depth, seed=args.seed, **extra)
    model = build_model(args.model, **kw)
    lr = args.lr if args.lr is not None else (0.1 if args.optimizer == "sgd" else 1e-3)
    tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                     lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                     seed=args.seed, max_steps=args.max_steps, device=dev)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    if log_path.exists():
        log_path.unlink()
    cbs: list = [MetricsCallback(every_steps=args.metrics_every or None,
                                 every_epochs=None if args.metrics_every else 1,
                                 max_samples=2048)]
    if args.curvature_every > 0:
        cbs.append(CurvatureCallback(every_steps=args.curvature_every,
                                     n_samples=args.curv_samples, k=args.k,
                                     trace_matvecs=args.trace_matvecs, grad_k=args.grad_k,
                                     seed=args.seed))
    logging.getLogger("landscape_lab").info("train: %s, %s with %d parameters", ds.describe(),
                                            args.model, n_params(model))
    res = train(model, ds, tc, callbacks=cbs, log_path=log_path, progress=not args.quiet)
    dkw = _dataset_kwargs(args, ds.name)
    ck = save_checkpoint(out / "checkpoint.pt", model, dataset=ds.name, dataset_kwargs=dkw,
                         data_dir=args.data_dir, split_seed=args.seed, train_config=asdict(tc))
    met = res.records("metrics")
    curv = res.records("curvature")
    summary = {"checkpoint": str(ck), "log": str(log_path), "steps": res.steps,
               "epochs": res.epochs, "n_params": n_params(model), "dataset": ds.name,
               "final": met[-1] if met else None,
               "lambda_max_final": curv[-1].get("lambda_max") if curv else None,
               "time_s": res.time_s}
    (out / "summary.json").write_text(json.dumps(json_clean(summary), indent=2))
    if met:
        m = met[-1]
        print(f"train acc {m['train_acc']:.4f}, test acc {m['test_acc']:.4f}, "
              f"train loss {m['train_loss']:.4f}"
              + (f", lambda_max {curv[-1]['lambda_max']:.4g}" if curv else ""))
    print(f"log: {log_path}")
    _done("checkpoint", ck, t0)
    return 0


def _rank_device(dev: str) -> str:
    """Under torchrun (``LOCAL_RANK`` set) a bare ``cuda`` is this rank's GPU,
    ``cuda:{LOCAL_RANK % device_count}`` (made the current device), so the ranks of one node
    do not all train on GPU 0; an explicit ``cuda:i`` or ``cpu`` is kept."""
    import os

    import torch

    if dev != "cuda" or "LOCAL_RANK" not in os.environ:
        return dev
    n = torch.cuda.device_count()
    if n < 2:
        return dev
    dev = f"cuda:{int(os.environ['LOCAL_RANK']) % n}"
    torch.cuda.set_device(torch.device(dev))
    return dev


def cmd_sweep(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    dev = _rank_device(_setup(args))
    from .sweep import ShardBusyError, fit_sweep, parse_shard, run_sweep
    from .sweep.options import fit_kwargs_from_args, fit_lines, sweep_config_from_args

    if args.compare and not args.fit_only:
        raise ValueError("--compare fits existing sweep directories: use it with --fit-only")
    if args.fit_only:
        try:
            s = fit_sweep(args.out, **fit_kwargs_from_args(args))
        except KeyboardInterrupt:
            raise _Interrupted(f"interrupted while fitting; the results in {args.out} are "
                               f"unchanged, the fit and report there may be partial; rerun the "
                               f"same command to fit again") from None
        print("\n".join(fit_lines(s)))
        _done("sweep report", s.get("report"), t0)
        return 0
    gaussian = _dataset_kwargs(args, "gaussian") if "gaussian" in args.datasets else None
    cfg = sweep_config_from_args(args, dev, gaussian)
    shard = parse_shard(args.shard)
    fit_kw = fit_kwargs_from_args(args)
    try:
        s = run_sweep(cfg, args.out, shard=shard, resume=not args.no_resume,
                      fit=not args.no_fit, progress=not args.quiet, fit_kwargs=fit_kw)
    except ShardBusyError as e:
        print(f"landscape-lab sweep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        raise _Interrupted(_sweep_stop(cfg, args.out)) from None
    print(f"cells: {s.n_cells} in the grid, {s.n_shard_cells} in shard {shard[0]}/{shard[1]}, "
          f"{s.n_run} run, {s.n_skipped} already finished")
    print(f"results: {s.results_path}")
    if s.fit:
        print("\n".join(fit_lines(s.fit)))
        _done("sweep report", s.fit.get("report"), t0)
    else:
        _done("results", s.results_path, t0)
    return 0


def _sweep_stop(cfg: Any, out: str) -> str:
    """Where an interrupted sweep stopped, and that a rerun resumes there."""
    from .sweep import results_path
    from .sweep.running import _finished_cells

    results = results_path(out)
    try:
        done, total = _finished_cells(cfg, out)
    except Exception:  # noqa: BLE001 - the line must come out whatever the file holds
        return (f"interrupted; the results so far are in {results}; rerun the same command to "
                f"resume (finished cells are skipped)")
    if done == total:
        return (f"interrupted after all {total} cells finished (results in {results}); rerun "
                f"the same command to fit, or add --fit-only")
    return (f"interrupted with {done} of {total} cells finished (results in {results}); rerun "
            f"the same command to resume (finished cells are skipped, the interrupted one runs "
            f"again)")


def cmd_barrier(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    dev = _setup(args)
    import numpy as np

    from . import training
    from .barriers import interpolate
    from .report.figures import _fig_barrier

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (args.checkpoint_a is None) != (args.checkpoint_b is None):
        raise SystemExit("landscape-lab barrier: give both --checkpoint-a and --checkpoint-b, "
                         "or neither (to train the example twice)")
    if args.checkpoint_a is not None:
        ma, meta = training.load_checkpoint(args.checkpoint_a, dev)
        mb, _ = training.load_checkpoint(args.checkpoint_b, dev)
        ds = _load_dataset(args, meta)
    else:
        ds, ex, (ma, mb) = _train_example(args, dev, (args.seed, args.seed + 1))
        for letter, model in zip("ab", (ma, mb)):
            training.save_checkpoint(out / f"model_{letter}.pt", model, dataset=ds.name,
                                     dataset_kwargs=ex["dataset_kwargs"], split_seed=args.seed)
    loss_fn, _ = training.loss_functions(ds.task)
    x, y = ds.subset(args.samples, args.split, seed=args.seed)
    path = interpolate(ma, mb, loss_fn, (x.to(dev), y.to(dev)),
                       ts=np.linspace(0, 1, max(args.points, 3)).tolist(),
                       bn_reestimate=args.bn_reestimate)
    res = path.to_dict()
    res.update(height=path.height, t_max=path.t_max, split=args.split, dataset=ds.name)
    (out / "barrier.json").write_text(json.dumps(training.json_clean(res), indent=2))
    fig = _fig_barrier(path, out / "barrier.png")
    print(f"barrier height {path.height:.6g} at t = {path.t_max:.3g} "
          f"(loss {path.losses[0]:.4g} -> {path.losses[-1]:.4g})")
    print(f"figure: {fig}")
    _done("barrier", out / "barrier.json", t0)
    return 0


def cmd_spectrum(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    dev = _setup(args)
    from . import report, training

    cfg = _report_config(args, dev, sections=("topk", "trace", "esd"), operator=args.operator,
                         which=args.which)
    if args.checkpoint is not None:
        model, meta = training.load_checkpoint(args.checkpoint, dev)
        ds = _load_dataset(args, meta)
        ctx = {"checkpoint": args.checkpoint}
    else:
        ds, _, (model,) = _train_example(args, dev, (args.seed,))
        ctx = {"example": args.example}
    operator_name = "GGN" if args.operator == "ggn" else "Hessian"
    res = report.model_report(model, ds, args.out, config=cfg, context=ctx, stem="spectrum",
                              title=f"{operator_name} spectrum")
    r = res.results
    ev = r["topk"]["eigenvalues"]
    print(f"top-{len(ev)} ({args.which}): " + ", ".join(f"{v:.5g}" for v in ev))
    print(f"trace = {r['trace']['estimate']:.6g} +- {r['trace']['stderr']:.2g}")
    _done("spectrum", res.report_path, t0)
    return 0


_COMMANDS = {"report": cmd_report, "train": cmd_train, "sweep": cmd_sweep,
             "barrier": cmd_barrier, "spectrum": cmd_spectrum}


#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
_EXIT_INTERRUPTED = 130


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C caught by a subcommand that knows where it stopped: the one line to print."""


def _interrupted_line(args: argparse.Namespace, exc: KeyboardInterrupt) -> str:
    """The one line printed on Ctrl-C: where the subcommand stopped and what its outputs are."""
    if isinstance(exc, _Interrupted):
        text = str(exc)
    else:
        text = (f"interrupted; the outputs in {args.out} are partial (nothing resumes from "
                f"them); rerun the same command to start over")
    return f"landscape-lab {args.command}: {text}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``landscape-lab``; returns the exit status (130 after Ctrl-C, with one
    line on stderr that says where it stopped)."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt as e:
        log.debug("interrupted", exc_info=True)   # the traceback with --verbose
        print(_interrupted_line(args, e), file=sys.stderr)
        return _EXIT_INTERRUPTED
    except (FileNotFoundError, ValueError) as e:
        # missing data files or checkpoints, inconsistent options: one clear line (the
        # traceback with --verbose)
        if getattr(args, "verbose", False):
            raise
        print(f"landscape-lab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
