"""The report of one model: :func:`model_report` measures the sections of :data:`SECTIONS` and
writes the report, its figures and ``results.json``.

Measuring and writing are separate steps: each ``_measure_<section>`` adds its numbers to the
results (and its figure); :mod:`.model_doc` turns those numbers into report text, so every
number in the text is also in ``results.json``. See docs/report.md.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

import landscape_ext as le

from .._results import PathLike
from .. import training
from ..barriers import interpolate
from ..data import Dataset
from ..models import n_params
from ..rmt import fit_marchenko_pastur, fit_semicircle, spike_strength
from ..training import json_clean, read_jsonl
from .document import _Doc, check_format
from .figures import (_fig_barrier, _fig_blocks, _fig_esd, _fig_gradients, _fig_topk,
                      _fig_training)
from .model_doc import _write_model_doc


SECTIONS = ("topk", "trace", "esd", "blocks", "gradients", "training", "barrier")

OPERATORS = ("hessian", "ggn")


@dataclass
class ReportConfig:
    """Sizes of the measurements in :func:`model_report` (CPU-sized defaults).

    Attributes
    ----------
    n_samples : int
        Training samples of the fixed batch on which the Hessian is measured.
    k : int
        Top Hessian eigenvalues.
    tol : float
        Eigensolver relative residual tolerance.
    trace_matvecs : int
        Hutch++ products.
    slq_steps, slq_probes : int
        Lanczos steps per probe and probes of the spectral density.
    grad_samples : int
        Samples of the gradient covariance.
    blocks : str or dict
        Parameter blocks of the blockwise section: a preset of
        :func:`landscape_ext.parameter_blocks` (``"kinds"``: embeddings, attention, mlp, norms,
        head; ``"layers"``; ``"modules"``) or ``{block name: [parameter names]}``.
    operator : {"hessian", "ggn"}
        Curvature matrix of the spectral sections (exact Hessian or Gauss-Newton).
    which : {"largest", "smallest", "both", "magnitude"}
        Which eigenvalues ``eigsh`` returns.
    grad_k : int
        Covariance eigenvalues; 0 = all ``min(n, d)`` (exact SVD when the ``n x d`` gradient
        matrix is small).
    barrier_points : int
        Points on the straight line for the barrier.
    sections : tuple of str
        Which of :data:`SECTIONS` to include.
    format : {"markdown", "html", "both"}
    seed : int
    device : str
    progress : bool
    """

    n_samples: int = 512
    k: int = 12
    tol: float = 1e-4
    trace_matvecs: int = 60
    slq_steps: int = 40
    slq_probes: int = 5
    grad_samples: int = 512
    grad_k: int = 0
    barrier_points: int = 21
    blocks: Union[str, Dict[str, List[str]]] = "kinds"
    operator: str = "hessian"
    which: str = "largest"
    sections: Tuple[str, ...] = SECTIONS
    format: str = "markdown"
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass
class ReportResult:
    """Paths written by a report and its numbers (the content of ``results.json``)."""

    report_path: str
    results_path: str
    figures: Dict[str, str]
    results: Dict[str, Any]
    time_s: float


@dataclass
class _Run:
    """What the sections of one report share (model, batch, operator) and what they found."""

    model: nn.Module
    dataset: Dataset
    cfg: ReportConfig
    device: torch.device
    loss_fn: Callable
    per_sample: Callable
    batch: Tuple[torch.Tensor, torch.Tensor]
    operator: Any
    n_params: int
    figdir: Path
    results: Dict[str, Any]
    train_log: Optional[PathLike] = None
    model_b: Optional[nn.Module] = None
    figures: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    eig: Any = None   # the top-k result: the trace and ESD sections compare against it


def model_report(model: nn.Module, dataset: Dataset, out_dir: PathLike, *,
                 config: Optional[ReportConfig] = None, train_log: Optional[PathLike] = None,
                 model_b: Optional[nn.Module] = None, title: Optional[str] = None,
                 context: Optional[Dict[str, Any]] = None, stem: str = "report"
                 ) -> ReportResult:
    """Measure ``model`` on ``dataset`` and write ``report.md`` (or ``.html``),
    ``figures/*.png`` and ``results.json`` to ``out_dir``.

    Parameters
    ----------
    model : nn.Module
        Its parameters keep their values (the engine's functions restore them; the test suite
        checks it). It is moved to ``config.device`` for the measurements and moved back to the
        device of its first parameter when the report returns or raises.
    dataset : Dataset
    out_dir : path
    config : ReportConfig, optional
    train_log : path, optional
        JSON-lines log of :func:`landscape_lab.training.train` for ``lambda_max`` over training.
    model_b : nn.Module, optional
        A second model of the same architecture for the loss barrier; moved to
        ``config.device`` and back like ``model``.
    title : str, optional
    context : dict, optional
        Extra facts for the summary (how the model was trained, ...).
    stem : str
        File name of the report without extension.

    Returns
    -------
    ReportResult
    """
    cfg = config or ReportConfig()
    if cfg.operator not in OPERATORS:
        raise ValueError(f"model_report: operator must be 'hessian' or 'ggn', got "
                         f"{cfg.operator!r}")
    check_format(cfg.format)   # before the measurements, not after them
    if "blocks" in cfg.sections:
        _check_blocks(model, cfg.blocks)
    t_start = time.perf_counter()
    out = Path(out_dir)
    homes = [(m, _device_of(m)) for m in (model, model_b) if m is not None]
    try:
        run = _prepare(model, dataset, cfg, out / "figures", train_log=train_log,
                       model_b=model_b, context=context)
        _measure_sections(run)
    finally:
        for module, home in homes:
            if home is not None:
                module.to(home)
    res = run.results
    res["time_s"] = time.perf_counter() - t_start
    doc = _Doc(title or f"Loss-landscape report: {type(model).__name__} on {dataset.name}")
    _write_model_doc(doc, res, run.figures, out)
    results_path = out / "results.json"
    results_path.write_text(json.dumps(json_clean(res), indent=2), encoding="utf-8")
    report_path = doc.write(out, stem, cfg.format)
    return ReportResult(report_path=str(report_path), results_path=str(results_path),
                        figures=run.figures, results=res, time_s=time.perf_counter() - t_start)


def _check_blocks(model: nn.Module, blocks: Any) -> None:
    """Raise ValueError for an unknown preset or parameter name in ``ReportConfig.blocks``."""
    if isinstance(blocks, str):
        le.parameter_blocks(model, blocks)           # raises for an unknown preset
        return
    names = {n for n, _ in model.named_parameters()}
    unknown = [m for members in (blocks or {}).values() for m in members if m not in names]
    if not blocks or unknown:
        raise ValueError(f"model_report: config.blocks must be a preset or a non-empty "
                         f"{{block: [parameter names]}}; unknown names {unknown[:5]} (the "
                         f"model has {len(names)} parameters, e.g. {sorted(names)[:3]})")


def _device_of(module: nn.Module) -> Optional[torch.device]:
    """The device of the module's first parameter (or buffer); None when it has neither."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return None


# ---- measuring ---------------------------------------------------------------------------------


def _prepare(model: nn.Module, dataset: Dataset, cfg: ReportConfig, figdir: Path, *,
             train_log: Optional[PathLike], model_b: Optional[nn.Module],
             context: Optional[Dict[str, Any]]) -> _Run:
    """Move the model to the device, draw the measurement batch, evaluate train/test metrics
    and build the curvature operator every section measures."""
    figdir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg.device)
    model.to(dev)
    loss_fn, per_sample = training.loss_functions(dataset.task)
    x, y = dataset.subset(cfg.n_samples, "train", seed=cfg.seed)
    batch = (x.to(dev), y.to(dev))
    d = n_params(model)
    res: Dict[str, Any] = {"model": type(model).__name__, "n_params": d,
                           "dataset": dataset.name, "data_dim": dataset.data_dim,
                           "n_samples": int(batch[1].shape[0]), "config": asdict(cfg),
                           "context": context or {}}
    tl, ta = training.evaluate(model, dataset.x_train, dataset.y_train, loss_fn, device=dev)
    vl, va = training.evaluate(model, dataset.x_test, dataset.y_test, loss_fn, device=dev)
    res["metrics"] = dict(train_loss=tl, train_acc=ta, test_loss=vl, test_acc=va,
                          gen_gap=ta - va)
    operator_class = le.HessianOperator if cfg.operator == "hessian" else le.GGNOperator
    res["operator"] = cfg.operator
    return _Run(model=model, dataset=dataset, cfg=cfg, device=dev, loss_fn=loss_fn,
                per_sample=per_sample, batch=batch,
                operator=operator_class(model, loss_fn, batch), n_params=d, figdir=figdir,
                results=res, train_log=train_log, model_b=model_b)


def _measure_sections(run: _Run) -> None:
    """Run the configured sections in :data:`SECTIONS` order, timing each (progress bar when
    ``cfg.progress``)."""
    steps = [s for s in SECTIONS if s in set(run.cfg.sections)]
    pbar = None
    if run.cfg.progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=len(steps), desc="report", unit="section")
    timings: Dict[str, float] = {}
    try:
        for name in steps:
            t0 = time.perf_counter()
            _MEASURE[name](run)
            timings[name] = time.perf_counter() - t0
            if pbar is not None:
                pbar.set_postfix_str(name)
                pbar.update(1)
    finally:
        if pbar is not None:
            pbar.close()
    run.results["timings_s"] = timings
    run.results["notes"] = run.notes


def _measure_topk(run: _Run) -> None:
    cfg = run.cfg
    eig = le.eigsh(run.operator, k=min(cfg.k, run.n_params), which=cfg.which, tol=cfg.tol,
                   seed=cfg.seed)
    run.eig = eig
    run.results["topk"] = dict(eigenvalues=eig.eigenvalues.tolist(),
                               residuals=eig.residuals.tolist(),
                               relative_residuals=eig.relative_residuals.tolist(),
                               converged=eig.converged.tolist(), n_matvecs=eig.n_matvecs,
                               tol=cfg.tol, hvp_mode=run.operator.mode_used, which=cfg.which)
    run.figures["topk"] = _fig_topk(eig, cfg.tol, run.figdir / "topk.png")


def _measure_trace(run: _Run) -> None:
    tr = le.trace(run.operator, max(run.cfg.trace_matvecs, 3), method="hutch++",
                  seed=run.cfg.seed)
    run.results["trace"] = dict(estimate=tr.estimate, stderr=tr.stderr, n_matvecs=tr.n_matvecs,
                                method=tr.method, mean_eigenvalue=tr.estimate / run.n_params)
    if run.eig is not None:
        run.results["trace"]["topk_sum"] = float(run.eig.eigenvalues.sum())


def _measure_esd(run: _Run) -> None:
    dens = le.spectral_density(run.operator, n_steps=min(run.cfg.slq_steps, run.n_params),
                               n_probes=run.cfg.slq_probes, seed=run.cfg.seed)
    run.results["esd"] = _esd_analysis(dens, run.eig, run.n_params)
    run.figures["esd"] = _fig_esd(dens, run.results["esd"], run.eig, run.figdir / "esd.png")


def _measure_blocks(run: _Run) -> None:
    """Per-block ``lambda_max`` (Lanczos on each diagonal block, all in lockstep) and per-block
    spectral densities (SLQ), with their heterogeneity summary."""
    cfg = run.cfg
    blocks = cfg.blocks
    if isinstance(blocks, str):
        blocks = le.parameter_blocks(run.model, blocks,
                                     getattr(run.operator, "param_names", None))
    spectra = le.block_eigsh(run.operator, blocks, k=1, which="largest", tol=cfg.tol,
                             seed=cfg.seed, return_eigenvectors=False)
    dens = le.block_spectral_density(run.operator, blocks, n_steps=cfg.slq_steps,
                                     n_probes=cfg.slq_probes, seed=cfg.seed)
    run.results["blocks"] = _blocks_analysis(spectra, dens, run.n_params)
    run.results["blocks"].update(
        preset=cfg.blocks if isinstance(cfg.blocks, str) else "custom",
        parameters={name: list(members) for name, members in blocks.items()})
    top = run.results.get("topk", {})
    whole = top["eigenvalues"][0] if top.get("which") == "largest" else None
    run.figures["blocks"] = _fig_blocks(dens, run.results["blocks"], run.figdir / "blocks.png",
                                        lambda_max=whole)


def _measure_gradients(run: _Run) -> None:
    run.results["gradients"] = _gradient_section(run)
    if run.results["gradients"]["covariance_eigenvalues"]:
        run.figures["gradients"] = _fig_gradients(run.results["gradients"],
                                                  run.figdir / "gradient_spectrum.png")


def _measure_training(run: _Run) -> None:
    if run.train_log is None or not Path(run.train_log).exists():
        run.notes.append("lambda_max over training: no training log given (--train-log).")
        return
    series = _eos_and_series(read_jsonl(run.train_log))
    if series["curvature"]:
        run.figures["training"] = _fig_training(series, run.figdir / "lambda_max_training.png")
    config = series["config"]
    run.results["training"] = dict(
        log=str(run.train_log), eos_threshold=config.get("eos_threshold"),
        optimizer=config.get("optimizer"), lr=config.get("lr"), momentum=config.get("momentum"),
        steps=[r["step"] for r in series["curvature"]],
        lambda_max=[r["lambda_max"] for r in series["curvature"]])


def _measure_barrier(run: _Run) -> None:
    if run.model_b is None:
        run.notes.append("loss barrier: no second model given (--checkpoint-b).")
        return
    run.model_b.to(run.device)
    ts = np.linspace(0.0, 1.0, max(run.cfg.barrier_points, 3)).tolist()
    path = interpolate(run.model, run.model_b, run.loss_fn, run.batch, ts=ts)
    run.results["barrier"] = path.to_dict()
    run.results["barrier"]["height"] = path.height
    run.results["barrier"]["t_max"] = path.t_max
    run.figures["barrier"] = _fig_barrier(path, run.figdir / "barrier.png")


_MEASURE: Dict[str, Callable[[_Run], None]] = {
    "topk": _measure_topk, "trace": _measure_trace, "esd": _measure_esd,
    "blocks": _measure_blocks, "gradients": _measure_gradients, "training": _measure_training,
    "barrier": _measure_barrier}


# ---- analyses ----------------------------------------------------------------------------------


def _eos_and_series(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The config record, the curvature records with a ``lambda_max`` and the metrics records
    of a training log."""
    cfg = next((r for r in records if r.get("kind") == "config"), {})
    curv = [r for r in records if r.get("kind") == "curvature" and r.get("lambda_max") is not None]
    met = [r for r in records if r.get("kind") == "metrics"]
    return dict(config=cfg, curvature=curv, metrics=met)


def _esd_analysis(dens: Any, eig: Any, d: int) -> Dict[str, Any]:
    """The spectral density's summary, its semicircle fit and the top-k eigenvalues that lie
    beyond the fitted bulk (spikes)."""
    out: Dict[str, Any] = dict(n_steps=dens.n_steps, n_probes=dens.n_probes,
                               n_matvecs=dens.n_matvecs, spectral_range=list(dens.spectral_range),
                               sigma_broadening=dens.default_sigma(),
                               moments={"1": float(dens.moments(1)), "2": float(dens.moments(2))},
                               moments_stderr={"1": float(dens.moments_stderr(1)),
                                               "2": float(dens.moments_stderr(2))})
    try:
        fit = fit_semicircle(dens, matrix_size=d, n_bootstrap=50)
        out["semicircle"] = fit.to_dict()
    except (ValueError, FloatingPointError) as e:
        out["semicircle_error"] = str(e)
        return out
    if eig is not None:
        # the computed eigenvalues beyond either fitted edge plus the Tracy-Widom margin
        lam = eig.eigenvalues.numpy()
        cut, cut_lo = fit.upper_edge + fit.threshold, fit.lower_edge - fit.threshold
        sp = lam[(lam > cut) | (lam < cut_lo)]
        out["spikes"] = dict(values=sp.tolist(), n=int(sp.size), cut=float(cut),
                             cut_low=float(cut_lo),
                             theta=[float(v) for v in np.atleast_1d(
                                 spike_strength(sp - fit.center, fit.sigma))] if sp.size else [],
                             n_topk=int(lam.size))
    return out


def _blocks_analysis(spectra: Any, dens: Any, d: int) -> Dict[str, Any]:
    """Per block: its size, ``lambda_max`` with residual, ``tr(H_bb) / d_b`` with its standard
    error and ``tr(H_bb)`` (with the standard error of their sum); across blocks: the spread of
    ``lambda_max`` and the Jensen-Shannon distances of the densities (the engine's
    summaries)."""
    spread, shapes = spectra.summary(), dens.summary()
    names, sizes = list(spectra), dict(spectra.sizes)
    per_dim = shapes["trace_per_dim"]
    return dict(
        names=names, sizes=sizes,
        lambda_max={n: float(spectra[n].eigenvalues[0]) for n in names},
        residuals={n: float(spectra[n].residuals[0]) for n in names},
        converged={n: bool(spectra[n].converged[0]) for n in names},
        tol=spectra[names[0]].tol,
        trace_per_dim=per_dim, trace_per_dim_stderr=shapes["trace_per_dim_stderr"],
        block_trace={n: sizes[n] * per_dim[n] for n in names},
        block_trace_sum_stderr=math.sqrt(sum(
            (sizes[n] * shapes["trace_per_dim_stderr"][n]) ** 2 for n in names)),
        slq_lambda_max=shapes["lambda_max"], js_distance=shapes["js_distance"],
        sigma=shapes["sigma"], lambda_max_ratio=spread["ratio_max_min"],
        lambda_max_log10_sd=spread["log10_sd"], covers_all=sum(sizes.values()) == d,
        n_steps=dens[names[0]].n_steps, n_probes=dens[names[0]].n_probes,
        n_products_eigsh=spectra.n_products, n_matvecs_eigsh=spectra.n_matvecs,
        n_products_density=dens.n_products, n_matvecs_density=dens.n_matvecs)


def _gradient_section(run: _Run) -> Dict[str, Any]:
    """Centred gradient-covariance spectrum, gradient ranks and the Marchenko-Pastur fit."""
    gsvd, grank = training.gradient_api()
    cfg, d = run.cfg, run.n_params
    x, y = run.dataset.subset(cfg.grad_samples, "train", seed=cfg.seed + 1)
    n = int(y.shape[0])
    k = min(n, d) if cfg.grad_k <= 0 else min(cfg.grad_k, n, d)
    g = training.gradient_svd(gsvd, run.model, run.per_sample,
                              (x.to(run.device), y.to(run.device)), k, seed=cfg.seed)
    rk = grank(g)
    eigs = g.covariance_eigenvalues.numpy()
    # exact zeros (rank <= n - 1 after centring) are not part of any bulk
    nonzero = eigs[eigs > 1e-10 * max(float(eigs.max()), 1e-300)]
    # "available" stays in results.json for readers of the file format (always true now)
    out: Dict[str, Any] = dict(available=True, n_samples=n, n_params=d, k=k,
                               method=g.method_used, trace=g.trace,
                               covariance_eigenvalues=eigs.tolist(),
                               n_zero=int(eigs.size - nonzero.size), rank=rk.to_dict())
    try:
        # the non-zero eigenvalues of C = G^T G / n are those of the n x n Gram matrix: an MP
        # law with ratio <= 1, fitted
        mp = fit_marchenko_pastur(nonzero, n_bootstrap=50)
        out["marchenko_pastur"] = mp.to_dict()
    except (ValueError, FloatingPointError) as e:
        out["marchenko_pastur_error"] = str(e)
    return out
