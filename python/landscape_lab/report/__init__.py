r"""Landscape reports: Markdown (and optionally HTML) with PNG figures and a ``results.json``.

:func:`model_report` — one model:

* top-``k`` Hessian eigenvalues with their Ritz residuals (:func:`landscape_ext.eigsh`);
* ``tr(H)`` with its standard error (Hutch++, :func:`landscape_ext.trace`);
* the spectral density by stochastic Lanczos quadrature (:func:`landscape_ext.spectral_density`)
  with its 95 % band across probes, the fitted semicircle (:func:`landscape_lab.rmt.fit_semicircle`
  on the quadrature nodes) and the top eigenvalues that lie beyond the fitted bulk (spikes);
* the gradient-covariance spectrum with its Marchenko-Pastur fit and the gradient ranks (when
  :mod:`landscape_ext.gradients` is available);
* ``lambda_max`` over training with the ``2 (1 + beta) / eta`` edge-of-stability line (when a
  training log is given);
* the loss barrier on the straight line to a second model (when one is given).

:func:`sweep_report` — a sweep: the scaling-law fit with its confidence band, Phi over the
(width, depth) grid and the generalization gap against gradient rank.

:func:`example_report` — the README's main command: trains an MLP on scikit-learn's digits
(two seeds, for the barrier) and writes :func:`model_report`.

Figures use matplotlib's Agg backend (no display needed). Every number in the text is also in
``results.json``.
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

import landscape_ext as le

from .. import training
from .._results import format_float
from ..barriers import interpolate
from ..data import Dataset, get_dataset
from ..models import MLP, n_params
from ..rmt import fit_marchenko_pastur, fit_semicircle, spike_strength
from ..training import (CurvatureCallback, MetricsCallback, TrainConfig, json_clean, read_jsonl,
                       save_checkpoint)

__all__ = ["ReportConfig", "ReportResult", "model_report", "sweep_report", "example_report",
           "EXAMPLES", "SECTIONS"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

SECTIONS = ("topk", "trace", "esd", "gradients", "training", "barrier")

#: Hessian eigenvalues are second derivatives of the loss (nats for cross-entropy) with respect to
#: the parameters.
EIG_UNIT = "loss / param$^2$"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return format_float(x, digits)


# ------------------------------------------------------------------------------------------------
# document model: blocks rendered to Markdown or HTML
# ------------------------------------------------------------------------------------------------


class _Doc:
    def __init__(self, title: str):
        self.title = title
        self.blocks: List[Tuple[str, Any]] = []

    def h(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(headers), [[_fmt(c) if not isinstance(c, str) else c
                                                        for c in r] for r in rows])))

    def img(self, rel: str, caption: str) -> None:
        self.blocks.append(("img", (rel, caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, v in self.blocks:
            if kind == "h2":
                out += [f"## {v}", ""]
            elif kind == "p":
                out += [v, ""]
            elif kind == "table":
                hdr, rows = v
                out.append("| " + " | ".join(hdr) + " |")
                out.append("|" + "|".join("---" for _ in hdr) + "|")
                out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"
                        for r in rows]
                out.append("")
            elif kind == "img":
                rel, cap = v
                out += [f"![{cap}]({rel})", "", f"*{cap}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
               f"<title>{e(self.title)}</title>",
               "<style>body{font-family:sans-serif;max-width:60em;margin:auto;padding:1em}"
               "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;"
               "text-align:right}img{max-width:100%}figcaption{font-style:italic}</style>",
               "</head><body>", f"<h1>{e(self.title)}</h1>"]
        for kind, v in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{e(v)}</h2>")
            elif kind == "p":
                out.append(f"<p>{e(v)}</p>")
            elif kind == "table":
                hdr, rows = v
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in hdr) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            elif kind == "img":
                rel, cap = v
                out.append(f"<figure><img src='{e(rel)}' alt='{e(cap)}'>"
                           f"<figcaption>{e(cap)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)

    def write(self, out_dir: Path, stem: str, fmt: str) -> Path:
        if fmt not in ("markdown", "html", "both"):
            raise ValueError(f"report format must be 'markdown', 'html' or 'both', got {fmt!r}")
        main = None
        if fmt in ("markdown", "both"):
            main = out_dir / f"{stem}.md"
            main.write_text(self.markdown(), encoding="utf-8")
        if fmt in ("html", "both"):
            p = out_dir / f"{stem}.html"
            p.write_text(self.html(), encoding="utf-8")
            main = main or p
        return main


def _save(fig: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return str(path)


# ------------------------------------------------------------------------------------------------
# one model
# ------------------------------------------------------------------------------------------------


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


def _eos_and_series(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    cfg = next((r for r in records if r.get("kind") == "config"), {})
    curv = [r for r in records if r.get("kind") == "curvature" and r.get("lambda_max") is not None]
    met = [r for r in records if r.get("kind") == "metrics"]
    return dict(config=cfg, curvature=curv, metrics=met)


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
        Not changed (the engine's functions restore its state).
    dataset : Dataset
    out_dir : path
    config : ReportConfig, optional
    train_log : path, optional
        JSON-lines log of :func:`landscape_lab.training.train` for ``lambda_max`` over training.
    model_b : nn.Module, optional
        A second model of the same architecture for the loss barrier.
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
    t_start = time.perf_counter()
    out = Path(out_dir)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg.device)
    model.to(dev)
    loss_fn, per_sample = training.loss_functions(dataset.task)
    x, y = dataset.subset(cfg.n_samples, "train", seed=cfg.seed)
    batch = (x.to(dev), y.to(dev))
    d = n_params(model)
    doc = _Doc(title or f"Loss-landscape report: {type(model).__name__} on {dataset.name}")
    res: Dict[str, Any] = {"model": type(model).__name__, "n_params": d,
                           "dataset": dataset.name, "data_dim": dataset.data_dim,
                           "n_samples": int(batch[1].shape[0]), "config": asdict(cfg),
                           "context": context or {}}
    figs: Dict[str, str] = {}
    timings: Dict[str, float] = {}
    notes: List[str] = []
    tl, ta = training.evaluate(model, dataset.x_train, dataset.y_train, loss_fn, device=dev)
    vl, va = training.evaluate(model, dataset.x_test, dataset.y_test, loss_fn, device=dev)
    res["metrics"] = dict(train_loss=tl, train_acc=ta, test_loss=vl, test_acc=va,
                          gen_gap=ta - va)

    if cfg.operator not in ("hessian", "ggn"):
        raise ValueError(f"model_report: operator must be 'hessian' or 'ggn', got "
                         f"{cfg.operator!r}")
    Op = le.HessianOperator if cfg.operator == "hessian" else le.GGNOperator
    op = Op(model, loss_fn, batch)
    res["operator"] = cfg.operator
    sections = set(cfg.sections)
    steps = [s for s in SECTIONS if s in sections]
    pbar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=len(steps), desc="report", unit="section")

    def tick(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        if pbar is not None:
            pbar.set_postfix_str(name)
            pbar.update(1)

    eig = None
    try:
        # ---- top-k ------------------------------------------------------------------------
        if "topk" in sections:
            t0 = time.perf_counter()
            k = min(cfg.k, d)
            eig = le.eigsh(op, k=k, which=cfg.which, tol=cfg.tol, seed=cfg.seed)
            res["topk"] = dict(eigenvalues=eig.eigenvalues.tolist(),
                               residuals=eig.residuals.tolist(),
                               relative_residuals=eig.relative_residuals.tolist(),
                               converged=eig.converged.tolist(), n_matvecs=eig.n_matvecs,
                               tol=cfg.tol, hvp_mode=op.mode_used, which=cfg.which)
            figs["topk"] = _fig_topk(eig, cfg.tol, figdir / "topk.png")
            tick("topk", t0)
        # ---- trace ------------------------------------------------------------------------
        if "trace" in sections:
            t0 = time.perf_counter()
            tr = le.trace(op, max(cfg.trace_matvecs, 3), method="hutch++", seed=cfg.seed)
            res["trace"] = dict(estimate=tr.estimate, stderr=tr.stderr, n_matvecs=tr.n_matvecs,
                                method=tr.method, mean_eigenvalue=tr.estimate / d)
            if eig is not None:
                res["trace"]["topk_sum"] = float(eig.eigenvalues.sum())
            tick("trace", t0)
        # ---- ESD --------------------------------------------------------------------------
        if "esd" in sections:
            t0 = time.perf_counter()
            dens = le.spectral_density(op, n_steps=min(cfg.slq_steps, d),
                                       n_probes=cfg.slq_probes, seed=cfg.seed)
            res["esd"] = _esd_analysis(dens, eig, d)
            figs["esd"] = _fig_esd(dens, res["esd"], eig, figdir / "esd.png")
            tick("esd", t0)
        # ---- gradients --------------------------------------------------------------------
        if "gradients" in sections:
            t0 = time.perf_counter()
            res["gradients"] = _gradient_section(model, per_sample, dataset, cfg, d, dev)
            if res["gradients"].get("covariance_eigenvalues"):
                figs["gradients"] = _fig_gradients(res["gradients"],
                                                   figdir / "gradient_spectrum.png")
            tick("gradients", t0)
        # ---- training ---------------------------------------------------------------------
        if "training" in sections:
            t0 = time.perf_counter()
            if train_log is not None and Path(train_log).exists():
                series = _eos_and_series(read_jsonl(train_log))
                if series["curvature"]:
                    figs["training"] = _fig_training(series, figdir / "lambda_max_training.png")
                res["training"] = dict(
                    log=str(train_log),
                    eos_threshold=series["config"].get("eos_threshold"),
                    optimizer=series["config"].get("optimizer"),
                    lr=series["config"].get("lr"), momentum=series["config"].get("momentum"),
                    steps=[r["step"] for r in series["curvature"]],
                    lambda_max=[r["lambda_max"] for r in series["curvature"]])
            else:
                notes.append("lambda_max over training: no training log given (--train-log).")
            tick("training", t0)
        # ---- barrier ----------------------------------------------------------------------
        if "barrier" in sections:
            t0 = time.perf_counter()
            if model_b is not None:
                model_b.to(dev)
                ts = np.linspace(0.0, 1.0, max(cfg.barrier_points, 3)).tolist()
                path = interpolate(model, model_b, loss_fn, batch, ts=ts)
                res["barrier"] = path.to_dict()
                res["barrier"]["height"] = path.height
                res["barrier"]["t_max"] = path.t_max
                figs["barrier"] = _fig_barrier(path, figdir / "barrier.png")
            else:
                notes.append("loss barrier: no second model given (--checkpoint-b).")
            tick("barrier", t0)
    finally:
        if pbar is not None:
            pbar.close()
    res["timings_s"] = timings
    res["notes"] = notes
    res["time_s"] = time.perf_counter() - t_start
    _write_model_doc(doc, res, figs, out)
    results_path = out / "results.json"
    results_path.write_text(json.dumps(json_clean(res), indent=2), encoding="utf-8")
    report_path = doc.write(out, stem, cfg.format)
    return ReportResult(report_path=str(report_path), results_path=str(results_path),
                        figures=figs, results=res, time_s=time.perf_counter() - t_start)


# ---- analyses ----------------------------------------------------------------------------------


def _esd_analysis(dens: Any, eig: Any, d: int) -> Dict[str, Any]:
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


def _gradient_section(model: nn.Module, per_sample: Any, dataset: Dataset, cfg: ReportConfig,
                      d: int, dev: torch.device) -> Dict[str, Any]:
    api = training.gradient_api()
    if api is None:
        return {"available": False,
                "note": "landscape_ext.gradients is not available: gradient-covariance spectrum "
                        "and gradient rank skipped"}
    gsvd, grank = api
    x, y = dataset.subset(cfg.grad_samples, "train", seed=cfg.seed + 1)
    n = int(y.shape[0])
    k = min(n, d) if cfg.grad_k <= 0 else min(cfg.grad_k, n, d)
    g = training.gradient_svd(gsvd, model, per_sample, (x.to(dev), y.to(dev)), k, seed=cfg.seed)
    rk = grank(g)
    eigs = g.covariance_eigenvalues.numpy()
    # exact zeros (rank <= n - 1 after centring) are not part of any bulk
    nonzero = eigs[eigs > 1e-10 * max(float(eigs.max()), 1e-300)]
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


# ---- figures -----------------------------------------------------------------------------------


def _fig_topk(eig: Any, tol: float, path: Path) -> str:
    plt = _plt()
    lam = eig.eigenvalues.numpy()
    res = eig.residuals.numpy()
    rel = eig.relative_residuals.numpy()
    conv = eig.converged.numpy().astype(bool)
    i = np.arange(1, lam.size + 1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.errorbar(i[conv], lam[conv], yerr=res[conv], fmt="o", color="C0", capsize=3,
                label="converged (bar = residual $\\|Hx-\\lambda x\\|$)")
    if (~conv).any():
        a1.errorbar(i[~conv], lam[~conv], yerr=res[~conv], fmt="x", color="C3", capsize=3,
                    label="not converged")
    a1.set_xlabel("index i (largest first)")
    a1.set_ylabel(f"eigenvalue $\\lambda_i$ ({EIG_UNIT})")
    a1.set_title(f"Top-{lam.size} Hessian eigenvalues (block Lanczos)")
    a1.legend(fontsize="small")
    a1.grid(alpha=0.3)
    a2.semilogy(i, np.maximum(rel, 1e-17), "o-", color="C0", label="relative residual")
    a2.axhline(tol, color="k", ls="--", lw=1, label=f"tolerance {tol:g}")
    a2.set_xlabel("index i")
    a2.set_ylabel("$\\|Hx-\\lambda x\\| / \\|H\\|$ (dimensionless)")
    a2.set_title(f"Ritz residuals ({eig.n_matvecs} Hessian-vector products)")
    a2.legend(fontsize="small")
    a2.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _fig_esd(dens: Any, esd: Dict[str, Any], eig: Any, path: Path) -> str:
    plt = _plt()
    curve = dens.evaluate(800)
    xg = curve.grid.numpy()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    floor = 1e-8
    a1.plot(xg, np.maximum(curve.density.numpy(), floor), color="C0", label="SLQ density")
    a1.fill_between(xg, np.maximum(curve.lower.numpy(), floor),
                    np.maximum(curve.upper.numpy(), floor), color="C0", alpha=0.25,
                    label="95% band (probes)")
    a1.set_yscale("log")
    sc = esd.get("semicircle")
    spikes = (esd.get("spikes") or {}).get("values", [])
    if sc is not None:
        lo, hi, c, s = sc["lower_edge"], sc["upper_edge"], sc["center"], sc["sigma"]
        mass = 1.0 - sc["outlier_mass"]
        xs = np.linspace(lo, hi, 400)
        pdf = mass * np.sqrt(np.maximum(4 * s * s - (xs - c) ** 2, 0)) / (2 * np.pi * s * s)
        a1.plot(xs, np.maximum(pdf, floor), color="C1", lw=1.5,
                label=f"semicircle fit (c={c:.3g}, $\\sigma$={s:.3g})")
        for ax in (a1, a2):
            ax.axvline(hi + sc["threshold"], color="C1", ls=":", lw=1,
                       label="bulk edge + Tracy-Widom margin")
    if eig is not None:
        lam = eig.eigenvalues.numpy()
        for j, v in enumerate(lam):
            is_spike = v in spikes
            a1.axvline(v, color="C3" if is_spike else "0.6", lw=1.2 if is_spike else 0.8,
                       ls="-" if is_spike else "--",
                       label=("spike (beyond the bulk)" if is_spike and v == spikes[0] else
                              ("top-k eigenvalue" if (not is_spike and j == len(lam) - 1)
                               else None)))
    a1.set_xlabel(f"eigenvalue $\\lambda$ ({EIG_UNIT})")
    a1.set_ylabel("spectral density (normalized to 1)")
    a1.set_title(f"Hessian ESD: {dens.n_probes} probes x {dens.n_steps} Lanczos steps, "
                 f"$\\sigma_{{broad}}$={curve.sigma:.2g}", fontsize="medium")
    a1.legend(fontsize="x-small", loc="upper right")
    # bulk zoom: cumulative distribution of the quadrature nodes (no broadening) against the
    # semicircle -- the comparison the KS distance measures
    nodes = dens.nodes.numpy().reshape(-1)
    wts = (dens.weights.numpy() / dens.n_probes).reshape(-1)
    order = np.argsort(nodes, kind="stable")
    xs_n, cw = nodes[order], np.cumsum(wts[order])
    if sc is not None:
        w = max(sc["upper_edge"] - sc["lower_edge"], 1e-12)
        lo_z, hi_z = sc["lower_edge"] - 0.5 * w, sc["upper_edge"] + 0.5 * w
    else:
        lo_z, hi_z = float(xs_n.min()), float(xs_n.max())
    a2.step(xs_n, cw, where="post", color="C0", label="SLQ nodes (weighted CDF)")
    if sc is not None:
        c, s = sc["center"], sc["sigma"]
        zg = np.linspace(lo_z, hi_z, 400)
        u = np.clip((zg - c) / (2 * s), -1, 1)
        sc_cdf = 0.5 + (u * np.sqrt(1 - u * u) + np.arcsin(u)) / np.pi
        below = float(wts[nodes < sc["lower_edge"] - sc["threshold"]].sum())
        a2.plot(zg, below + (1 - sc["outlier_mass"]) * sc_cdf, color="C1",
                label="semicircle fit (bulk mass)")
        a2.axvspan(sc["lower_edge"], sc["upper_edge"], color="C1", alpha=0.08,
                   label="fitted bulk")
    a2.set_xlim(lo_z, hi_z)
    a2.set_xlabel(f"eigenvalue $\\lambda$ ({EIG_UNIT})")
    a2.set_ylabel("cumulative spectral mass")
    ks = f"KS D = {sc['ks_statistic']:.3f}" if sc is not None else "no semicircle fit"
    a2.set_title(f"Bulk: cumulative distribution, {ks}", fontsize="medium")
    a2.legend(fontsize="x-small", loc="upper left")
    return _save(fig, path)


def _fig_gradients(g: Dict[str, Any], path: Path) -> str:
    plt = _plt()
    e = np.asarray(g["covariance_eigenvalues"], dtype=float)
    i = np.arange(1, e.size + 1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    pos = e > 1e-10 * max(float(e.max()), 1e-300)
    a1.loglog(i[pos], e[pos], ".-", color="C0", label="eigenvalues of C")
    mp = g.get("marchenko_pastur")
    rk = g.get("rank", {})
    if mp is not None:
        for edge, lab in ((mp["upper_edge"], "MP bulk edges"), (mp["lower_edge"], None)):
            if edge > 0:
                a1.axhline(edge, color="C1", ls="--", lw=1, label=lab)
    if rk.get("effective_rank"):
        a1.axvline(rk["effective_rank"], color="C2", ls=":",
                   label=f"effective rank {rk['effective_rank']:.1f}")
    a1.axvline(100, color="0.5", ls="-.", lw=1, label="rank 100 (proposal's threshold)")
    a1.set_xlabel("index i")
    a1.set_ylabel("covariance eigenvalue $\\sigma_i^2$ (loss$^2$ / param$^2$)")
    a1.set_title(f"Gradient covariance spectrum (n={g['n_samples']}, d={g['n_params']}, "
                 f"{g['method']}; {int((~pos).sum())} zero(s) not shown)", fontsize="medium")
    a1.legend(fontsize="x-small")
    a1.grid(alpha=0.3, which="both")
    ep = e[pos]
    bins = np.geomspace(ep.min(), ep.max(), 40) if ep.size > 1 and ep.max() > ep.min() else 10
    a2.hist(ep, bins=bins, density=True, color="C0", alpha=0.5, label="eigenvalues")
    a2.set_xscale("log")
    if mp is not None:
        xs = np.geomspace(max(mp["lower_edge"], ep.min() * 0.5), mp["upper_edge"], 300)
        lo, hi = mp["lower_edge"], mp["upper_edge"]
        inside = mp["n_used"] / max(mp["n_total"], 1)
        # MP density of the non-zero part (ratio g <= 1 form; for g > 1 the non-zero part has
        # ratio 1/g and scale g sigma^2, which gives the same denominator sigma^2 * 1)
        pdf = np.sqrt(np.maximum((hi - xs) * (xs - lo), 0)) / (
            2 * np.pi * mp["scale"] * min(mp["ratio"], 1.0) * xs)
        a2.plot(xs, inside * pdf, color="C1",
                label=f"Marchenko-Pastur fit (ratio {mp['ratio']:.2g}, KS D {mp['ks_statistic']:.2f})")
    a2.set_xlabel("covariance eigenvalue (loss$^2$ / param$^2$)")
    a2.set_ylabel("density")
    a2.set_title("Eigenvalue histogram and MP fit", fontsize="medium")
    a2.legend(fontsize="x-small")
    return _save(fig, path)


def _fig_training(series: Dict[str, Any], path: Path) -> str:
    plt = _plt()
    curv = series["curvature"]
    cfg = series["config"]
    fig, ax = plt.subplots(figsize=(8, 4))
    steps = [r["step"] for r in curv]
    ax.plot(steps, [r["lambda_max"] for r in curv], "o-", color="C0", ms=3,
            label="$\\lambda_{max}$ (Hessian on a fixed batch)")
    if any(len(r.get("top_eigenvalues", [])) > 1 for r in curv):
        for j in range(1, max(len(r.get("top_eigenvalues", [])) for r in curv)):
            ax.plot(steps, [r["top_eigenvalues"][j] if len(r.get("top_eigenvalues", [])) > j
                            else np.nan for r in curv], "-", color="C0", alpha=0.3, lw=0.8,
                    label="next eigenvalues" if j == 1 else None)
    eos = cfg.get("eos_threshold")
    if eos:
        beta = cfg.get("momentum") or 0.0
        ax.axhline(eos, color="C3", ls="--",
                   label=f"edge of stability 2(1+$\\beta$)/$\\eta$ = {eos:.3g} "
                         f"($\\eta$={cfg.get('lr')}, $\\beta$={beta})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"$\\lambda_{{max}}$ ({EIG_UNIT})")
    lams = [r["lambda_max"] for r in curv]
    top = max(lams + [0.0])
    if eos and eos > 0:
        if eos > 5 * top and min(lams) > 0:
            ax.set_yscale("log")   # keep both the curve and the far-away threshold readable
            ax.set_ylim(min(lams) / 1.5, eos * 1.5)
        else:
            ax.set_ylim(0, max(top, eos) * 1.1)
    met = series["metrics"]
    if met:
        a2 = ax.twinx()
        a2.plot([r["step"] for r in met], [r["train_loss"] for r in met], "s-", color="C2",
                ms=3, alpha=0.7, label="train loss")
        a2.set_ylabel("train loss (cross-entropy, nats)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = a2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize="small", loc="center right")
    else:
        ax.legend(fontsize="small")
    ax.set_title(f"Sharpness over training ({cfg.get('optimizer', '?')})")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _fig_barrier(path_obj: Any, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    path_obj.plot(ax)
    ax.set_xlabel("t  (weights (1-t) w_A + t w_B)")
    ax.set_ylabel("loss (cross-entropy, nats)")
    handles, labels = [], []
    for a in fig.axes:                      # one legend for the loss and the accuracy axes
        h, l = a.get_legend_handles_labels()
        handles += h
        labels += l
        if a.get_legend() is not None:
            a.get_legend().remove()
    ax.legend(handles, labels, fontsize="small", loc="center right")
    return _save(fig, path)


# ---- text --------------------------------------------------------------------------------------


def _write_model_doc(doc: _Doc, r: Dict[str, Any], figs: Dict[str, str], out: Path) -> None:
    def rel(name: str) -> str:
        return os.path.relpath(figs[name], out)

    m = r["metrics"]
    rows = [["parameters d", r["n_params"]], ["data set", r["dataset"]],
            ["measurement batch (train samples)", r["n_samples"]],
            ["train / test accuracy", f"{m['train_acc']:.4f} / {m['test_acc']:.4f}"],
            ["train / test loss", f"{m['train_loss']:.4f} / {m['test_loss']:.4f}"]]
    if "topk" in r:
        label = {"smallest": "lambda_min", "magnitude": "eigenvalue of largest |lambda|"}.get(
            r["topk"].get("which", "largest"), "lambda_max")
        rows.append([label, r["topk"]["eigenvalues"][0]])
    if "trace" in r:
        rows.append(["tr(H) +- 1 s.e.", f"{_fmt(r['trace']['estimate'])} +- "
                                        f"{_fmt(r['trace']['stderr'])}"])
    g = r.get("gradients") or {}
    if g.get("available"):
        rows.append(["gradient effective rank", g["rank"]["effective_rank"]])
    if "barrier" in r:
        rows.append(["loss barrier", r["barrier"]["height"]])
    for k_, v in (r.get("context") or {}).items():
        rows.append([str(k_), v if not isinstance(v, (dict, list)) else json.dumps(v)])
    rows.append(["report time (s)", r["time_s"]])
    doc.h("Summary")
    doc.table(["quantity", "value"], rows)

    if "topk" in r:
        t = r["topk"]
        doc.h(f"Top Hessian eigenvalues ({t.get('which', 'largest')})"
              if r.get("operator", "hessian") == "hessian" else
              f"Top Gauss-Newton eigenvalues ({t.get('which', 'largest')})")
        doc.p(f"Block Lanczos with full reorthogonalization (landscape_ext.eigsh), "
              f"{t['n_matvecs']} Hessian-vector products ({t['hvp_mode']}), relative tolerance "
              f"{t['tol']:g}. A pair is converged when its Ritz residual "
              f"||Hx - lambda x|| is at most tol * ||H||; the eigenvalue error is about "
              f"residual^2 / gap.")
        doc.table(["i", "eigenvalue", "residual", "relative residual", "converged"],
                  [[i + 1, lam, res, rr, c] for i, (lam, res, rr, c) in enumerate(zip(
                      t["eigenvalues"], t["residuals"], t["relative_residuals"], t["converged"]))])
        doc.img(rel("topk"), "Top-k eigenvalues with residual bars; right: relative residuals")
    if "trace" in r:
        t = r["trace"]
        doc.h("Trace")
        txt = (f"tr(H) = {_fmt(t['estimate'])} +- {_fmt(t['stderr'])} (one standard error; "
               f"Hutch++, {t['n_matvecs']} products). Mean eigenvalue tr(H)/d = "
               f"{_fmt(t['mean_eigenvalue'])}.")
        if t.get("topk_sum") is not None and t["estimate"] != 0:
            txt += (f" The top-{len(r['topk']['eigenvalues'])} eigenvalues sum to "
                    f"{_fmt(t['topk_sum'])}, {100 * t['topk_sum'] / t['estimate']:.1f}% of the "
                    f"trace; the rest lies in the bulk of the spectrum.")
        doc.p(txt)
    if "esd" in r:
        e = r["esd"]
        doc.h("Spectral density (SLQ) and semicircle fit")
        sc = e.get("semicircle")
        if sc is not None:
            verdict = ("close to" if sc["ks_statistic"] < 0.05 else
                       "roughly like" if sc["ks_statistic"] < 0.15 else "far from")
            doc.p(f"Stochastic Lanczos quadrature with {e['n_probes']} probes x {e['n_steps']} "
                  f"steps ({e['n_matvecs']} products); the band is a 95% interval across probes. "
                  f"Semicircle fitted to the quadrature nodes: centre {_fmt(sc['center'])}, "
                  f"sigma {_fmt(sc['sigma'])}, bulk [{_fmt(sc['lower_edge'])}, "
                  f"{_fmt(sc['upper_edge'])}], outside mass {_fmt(sc['outlier_mass'])}, "
                  f"KS distance {_fmt(sc['ks_statistic'])}: the bulk is {verdict} a semicircle. "
                  f"(A trained network's Hessian bulk is typically a sharp peak at 0 with heavy "
                  f"shoulders, not a semicircle; the fit measures how far.)")
            sp = e.get("spikes")
            if sp is not None:
                doc.p(f"Spikes: {sp['n']} of the {sp['n_topk']} computed eigenvalues lie beyond "
                      f"the bulk edges plus the Tracy-Widom margin (outside "
                      f"[{_fmt(sp['cut_low'])}, {_fmt(sp['cut'])}]): "
                      + (", ".join(_fmt(v) for v in sp["values"]) if sp["values"] else "none")
                      + ". Under the spiked-Wigner (BBP) model each corresponds to a rank-one "
                        "signal of strength theta = "
                      + (", ".join(_fmt(v) for v in sp["theta"]) if sp["theta"] else "n/a") + ".")
        else:
            doc.p(f"Semicircle fit failed: {e.get('semicircle_error')}")
        doc.img(rel("esd"), "Hessian spectral density (log scale) with the semicircle fit and "
                            "the top eigenvalues (red: spikes); right: cumulative spectral mass "
                            "of the bulk against the fitted semicircle")
    if g:
        doc.h("Gradient covariance")
        if not g.get("available"):
            doc.p(g.get("note", "skipped"))
        else:
            rk = g["rank"]
            doc.p(f"Per-sample gradients of {g['n_samples']} training samples (method "
                  f"{g['method']}), centred covariance C = G_c^T G_c / n, top {g['k']} "
                  f"eigenvalues ({g['n_zero']} exactly zero: centring removes one direction). Gradient rank: effective (entropy) rank "
                  f"{_fmt(rk['effective_rank'])}, stable rank {_fmt(rk['stable_rank'])}, "
                  f"numerical rank {rk['numerical_rank']} (tol {_fmt(rk['tol'])}).")
            mp = g.get("marchenko_pastur")
            if mp is not None:
                doc.p(f"Marchenko-Pastur fit to the non-zero eigenvalues: ratio {_fmt(mp['ratio'])} ({mp['ratio_source']}), "
                      f"sigma^2 {_fmt(mp['scale'])}, bulk [{_fmt(mp['lower_edge'])}, "
                      f"{_fmt(mp['upper_edge'])}], {mp['n_outliers']} eigenvalues above it, KS "
                      f"distance {_fmt(mp['ks_statistic'])}. The outliers are the few gradient "
                      f"directions that carry signal; the bulk is what a random matrix of the "
                      f"same shape would give.")
            else:
                doc.p(f"Marchenko-Pastur fit failed: {g.get('marchenko_pastur_error')}")
            if "gradients" in figs:
                doc.img(rel("gradients"), "Gradient-covariance eigenvalues with the MP bulk and "
                                          "the effective rank")
    if "training" in r:
        t = r["training"]
        doc.h("Sharpness over training")
        lm = t["lambda_max"]
        txt = (f"lambda_max measured at {len(lm)} points of training ({t['optimizer']}, lr "
               f"{t['lr']}); it went from {_fmt(lm[0]) if lm else 'n/a'} to "
               f"{_fmt(lm[-1]) if lm else 'n/a'}.")
        if t.get("eos_threshold"):
            peak = max(lm) if lm else float("nan")
            txt += (f" The edge-of-stability threshold 2(1+beta)/eta is {_fmt(t['eos_threshold'])}; "
                    f"the largest measured lambda_max is {100 * peak / t['eos_threshold']:.0f}% "
                    f"of it.")
        doc.p(txt)
        if "training" in figs:
            doc.img(rel("training"), "lambda_max over training with the edge-of-stability line")
    if "barrier" in r:
        b = r["barrier"]
        doc.h("Loss barrier")
        doc.p(f"Loss on the straight line between the two models ({len(b['ts'])} points, "
              f"{b['n_samples']} samples): barrier height {_fmt(b['height'])} (loss above the "
              f"chord between the end points) at t = {_fmt(b['t_max'])}.")
        doc.img(rel("barrier"), "Loss along (1-t) w_A + t w_B with the chord")
    if r.get("notes"):
        doc.h("Notes")
        for n in r["notes"]:
            doc.p(n)


# ------------------------------------------------------------------------------------------------
# sweep report
# ------------------------------------------------------------------------------------------------


def sweep_report(measurements: Sequence[Dict[str, Any]], out_dir: PathLike, *,
                 fits: Optional[Dict[str, Any]] = None, statistic: str = "spectral_norm",
                 fmt: str = "markdown") -> Path:
    """Write ``sweep_report.md`` with ``figures/scaling_law.png``, ``figures/phi_grid.png`` and
    ``figures/gap_vs_rank.png`` from sweep measurement records.

    Parameters
    ----------
    measurements : list of dict
        ``kind == "measurement"`` records (see :mod:`landscape_lab.sweep`).
    out_dir : path
    fits : dict, optional
        ``{"dataset|optimizer": ScalingFit}`` to plot.
    statistic : str
    fmt : {"markdown", "html", "both"}
    """
    plt = _plt()
    out = Path(out_dir)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    meas = list(measurements)
    doc = _Doc("Sweep report: landscape statistics over width and depth")
    last_epoch = max(r["epoch"] for r in meas)
    widths = sorted({r["width"] for r in meas})
    depths = sorted({r["depth"] for r in meas})
    doc.p(f"{len(meas)} measurements, {len({r['cell'] for r in meas})} cells: widths {widths}, "
          f"depths {depths}, data sets {sorted({r['dataset'] for r in meas})}, optimizers "
          f"{sorted({r['optimizer'] for r in meas})}; epochs "
          f"{sorted({r['epoch'] for r in meas})}.")

    # -- scaling law
    doc.h("Scaling law")
    fits = fits or {}
    if fits:
        nf = len(fits)
        fig, axes = plt.subplots(1, nf, figsize=(6.5 * nf, 4.5), squeeze=False)
        rows = []
        for ax, (name, f) in zip(axes[0], sorted(fits.items())):
            f.plot(ax)
            _plain_log_ticks(ax.xaxis, sorted(set(f.widths)))
            ax.set_xlabel("width n (hidden units)")
            ax.set_ylabel(f"{statistic} ||H||_2 ({EIG_UNIT})")
            ax.set_title(f"{name}: " + ax.get_title(), fontsize="small")
            rows.append([name, f.alpha, f"{_fmt(f.alpha_ci[0])} .. {_fmt(f.alpha_ci[1])}"
                         if f.alpha_ci else "n/a", f.beta,
                         f"{_fmt(f.beta_ci[0])} .. {_fmt(f.beta_ci[1])}" if f.beta_ci else "n/a",
                         f.c, f.r_squared, f.n_points])
        _save(fig, figdir / "scaling_law.png")
        doc.p(f"Fit of {statistic} = c n^alpha exp(beta L) (log-linear least squares, 95% "
              f"bootstrap intervals) at the last measured epoch. The proposal conjectures "
              f"0 < alpha < 1 and beta > 0.")
        doc.table(["group", "alpha", "alpha 95% CI", "beta", "beta 95% CI", "c", "R^2",
                   "points"], rows)
        for name, f in sorted(fits.items()):
            verdict = []
            if f.alpha_ci is not None:
                lo, hi = f.alpha_ci
                verdict.append("alpha in (0, 1) is " + ("supported" if lo > 0 and hi < 1 else
                                                         "contradicted" if hi < 0 or lo > 1
                                                         else "not resolved") + " by the CI")
            if f.beta_ci is not None:
                lo, hi = f.beta_ci
                verdict.append("beta > 0 is " + ("supported" if lo > 0 else "contradicted"
                                                 if hi < 0 else "not resolved") + " by the CI")
            if f.note:
                verdict.append(f.note)
            if verdict:
                doc.p(f"{name}: " + "; ".join(verdict) + ".")
        doc.img("figures/scaling_law.png",
                "Spectral norm against width per depth, fitted law and 95% band")
    else:
        doc.p("No scaling-law fit (too few points or degenerate grid); see scaling_fit.json.")

    # -- Phi heatmap
    doc.h("Phi over the grid")
    last = [r for r in meas if r["epoch"] == last_epoch]
    with_phi = [r for r in last if r.get("phi") is not None]
    if with_phi:
        groups = sorted({(r["dataset"], r["optimizer"]) for r in with_phi})
        fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
        for ax, grp in zip(axes[0], groups):
            Z = np.full((len(depths), len(widths)), np.nan)
            for i, dd in enumerate(depths):
                for j, ww in enumerate(widths):
                    v = [r["phi"] for r in with_phi if (r["dataset"], r["optimizer"]) == grp
                         and r["width"] == ww and r["depth"] == dd]
                    if v:
                        Z[i, j] = float(np.mean(v))
            im = ax.imshow(Z, origin="lower", cmap="viridis", aspect="auto")
            for i in range(len(depths)):
                for j in range(len(widths)):
                    if np.isfinite(Z[i, j]):
                        ax.text(j, i, f"{Z[i, j]:.3g}", ha="center", va="center", color="w",
                                fontsize="small")
            ax.set_xticks(range(len(widths)), [str(w) for w in widths])
            ax.set_yticks(range(len(depths)), [str(d) for d in depths])
            ax.set_xlabel("width n")
            ax.set_ylabel("depth L (hidden layers)")
            ax.set_title(f"Phi = (tr H / d) / ||H||_2 * rank / D  ({grp[0]}, {grp[1]})",
                         fontsize="small")
            fig.colorbar(im, ax=ax, label="Phi (dimensionless)")
        _save(fig, figdir / "phi_grid.png")
        best = max(with_phi, key=lambda r: r["phi"])
        doc.p(f"Phi (the proposal's compatibility metric; gradient rank = effective rank, D = "
              f"data dimension {with_phi[0]['data_dim']}) at epoch {last_epoch}, mean over "
              f"seeds. Largest: {_fmt(best['phi'])} at width {best['width']}, depth "
              f"{best['depth']} ({best['dataset']}, {best['optimizer']}).")
        doc.img("figures/phi_grid.png", "Phi over widths and depths")
    else:
        doc.p("Phi needs the gradient rank (landscape_ext.gradients and grad_k > 0); not "
              "available in these measurements.")

    # -- gap vs rank
    doc.h("Generalization gap against gradient rank")
    pts = [r for r in last if r.get("grad_effective_rank") is not None]
    if pts:
        rank = np.array([r["grad_effective_rank"] for r in pts])
        gap = np.array([r["gen_gap"] for r in pts])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, dd in enumerate(depths):
            sel = [j for j, r in enumerate(pts) if r["depth"] == dd]
            if sel:
                ax.scatter(rank[sel], gap[sel], s=[12 + 4 * np.log2(pts[j]["width"]) ** 2
                                                   for j in sel],
                           color=f"C{i}", label=f"L = {dd}", alpha=0.8)
        ax.axvline(100, color="0.4", ls="--", lw=1, label="rank 100 (proposal's plateau)")
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.set_xlabel("gradient effective rank (Roy-Vetterli, dimensionless)")
        ax.set_ylabel("generalization gap = train acc - test acc")
        ax.set_title(f"Gap vs gradient rank at epoch {last_epoch} (marker size ~ width)")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, which="both")
        _save(fig, figdir / "gap_vs_rank.png")
        bounds = [r.get("grad_k") for r in pts if r.get("grad_k")]
        doc.p(_rank_verdict(rank, gap, max(bounds) if bounds else None))
        doc.img("figures/gap_vs_rank.png", "Generalization gap against gradient rank")
    else:
        doc.p("No gradient ranks in these measurements (landscape_ext.gradients unavailable or "
              "grad_k = 0).")

    # -- table
    doc.h("Measurements")
    cols = ["cell", "epoch", "n_params", "spectral_norm", "trace", "grad_effective_rank", "phi",
            "train_acc", "test_acc", "gen_gap"]
    doc.table(cols, [[r.get(c) if not isinstance(r.get(c), str) else r[c] for c in cols]
                     for r in sorted(meas, key=lambda r: (r["cell"], r["epoch"]))])
    return doc.write(out, "sweep_report", fmt)


def _plain_log_ticks(axis: Any, ticks: Optional[Sequence[float]] = None) -> None:
    """Plain numbers (8, 16, 50, 100) instead of 10^x labels on a log axis."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    if ticks is not None:
        axis.set_ticks(list(ticks))
        axis.set_minor_formatter(NullFormatter())
    else:
        minor = ScalarFormatter()
        minor.set_scientific(False)
        axis.set_minor_formatter(minor)
    major = ScalarFormatter()
    major.set_scientific(False)
    axis.set_major_formatter(major)


def _rank_verdict(rank: np.ndarray, gap: np.ndarray, bound: Optional[int] = None) -> str:
    from scipy.stats import spearmanr

    txt = (f"{rank.size} points; gradient effective rank spans {rank.min():.1f} .. "
           f"{rank.max():.1f}, gap {gap.min():.3f} .. {gap.max():.3f}.")
    if rank.size >= 3 and np.ptp(rank) > 0 and np.ptp(gap) > 0:
        rho, p = spearmanr(rank, gap)
        txt += f" Spearman correlation of gap with rank: rho = {rho:.2f} (p = {p:.2g})."
    if rank.max() < 100:
        txt += (" No cell reaches rank 100, so the proposal's claimed plateau near rank 100 "
                "cannot be tested on this grid")
        if bound is not None and bound < 100:
            txt += (f" (the rank is computed from at most {bound} covariance eigenvalues: raise "
                    f"the measurement samples and grad_k above 100)")
        txt += "."
    elif rank.min() >= 100:
        txt += " Every cell is above rank 100; the region below the claimed plateau is not sampled."
    else:
        lo, hi = gap[rank < 100], gap[rank >= 100]
        txt += (f" Below rank 100 the gap averages {lo.mean():.3f} (sd {lo.std():.3f}, "
                f"{lo.size} points); at or above it {hi.mean():.3f} (sd {hi.std():.3f}, "
                f"{hi.size} points).")
        if hi.size >= 3 and np.ptp(rank[rank >= 100]) > 0:
            slope = np.polyfit(np.log(rank[rank >= 100]), hi, 1)[0]
            txt += (f" Above 100 the gap changes by {slope:.3f} per e-fold of rank "
                    f"({'flat: consistent with a plateau' if abs(slope) < 0.01 else 'not flat'}).")
    return txt


# ------------------------------------------------------------------------------------------------
# built-in example
# ------------------------------------------------------------------------------------------------

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
