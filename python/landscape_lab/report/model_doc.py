"""The text of the model report: :func:`_write_model_doc` turns the numbers that
:func:`~landscape_lab.report.model_report` measured (the content of ``results.json``) into the
summary table and one part per section."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List

from .document import _Doc, _fmt, _fmt_range


def _write_model_doc(doc: _Doc, r: Dict[str, Any], figs: Dict[str, str], out: Path) -> None:
    """The summary table, one part per measured section, the notes. ``figs`` are the written
    figure paths; the report links them relative to ``out``."""
    rel = {name: os.path.relpath(path, out) for name, path in figs.items()}
    _write_summary(doc, r)
    for name, write in _WRITE.items():
        if name in r:
            write(doc, r, rel)
    if r.get("notes"):
        doc.h("Notes")
        for n in r["notes"]:
            doc.p(n)


def _write_summary(doc: _Doc, r: Dict[str, Any]) -> None:
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
    if "gradients" in r:
        rows.append(["gradient effective rank", r["gradients"]["rank"]["effective_rank"]])
    if "barrier" in r:
        rows.append(["loss barrier", r["barrier"]["height"]])
    for k_, v in (r.get("context") or {}).items():
        rows.append([str(k_), v if not isinstance(v, (dict, list)) else json.dumps(v)])
    rows.append(["report time (s)", r["time_s"]])
    doc.h("Summary")
    doc.table(["quantity", "value"], rows)


def _write_topk(doc: _Doc, r: Dict[str, Any], rel: Dict[str, str]) -> None:
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
    doc.img(rel["topk"], "Top-k eigenvalues with residual bars; right: relative residuals")


def _write_trace(doc: _Doc, r: Dict[str, Any], rel: Dict[str, str]) -> None:
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


def _bulk_text(fit: Dict[str, Any], outside: str) -> str:
    """A random-matrix fit's bulk ``[lower, upper]``, what lies ``outside`` it and its KS
    distance, as report text."""
    return (f"bulk [{_fmt_range(fit['lower_edge'], fit['upper_edge'])}], {outside}, "
            f"KS distance {_fmt(fit['ks_statistic'])}")


def _fmt_values(values: List[float], empty: str) -> str:
    """``values`` formatted and comma-separated, or ``empty`` when there are none."""
    return ", ".join(_fmt(v) for v in values) if values else empty


def _write_esd(doc: _Doc, r: Dict[str, Any], rel: Dict[str, str]) -> None:
    e = r["esd"]
    doc.h("Spectral density (SLQ) and semicircle fit")
    sc = e.get("semicircle")
    if sc is not None:
        verdict = ("close to" if sc["ks_statistic"] < 0.05 else
                   "roughly like" if sc["ks_statistic"] < 0.15 else "far from")
        doc.p(f"Stochastic Lanczos quadrature with {e['n_probes']} probes x {e['n_steps']} "
              f"steps ({e['n_matvecs']} products); the band is a 95% interval across probes. "
              f"Semicircle fitted to the quadrature nodes: centre {_fmt(sc['center'])}, "
              f"sigma {_fmt(sc['sigma'])}, "
              + _bulk_text(sc, f"outside mass {_fmt(sc['outlier_mass'])}")
              + f": the bulk is {verdict} a semicircle. (A trained network's Hessian bulk is "
                f"typically a sharp peak at 0 with heavy shoulders, not a semicircle; the fit "
                f"measures how far.)")
        sp = e.get("spikes")
        if sp is not None:
            doc.p(f"Spikes: {sp['n']} of the {sp['n_topk']} computed eigenvalues lie beyond "
                  f"the bulk edges plus the Tracy-Widom margin (outside "
                  f"[{_fmt_range(sp['cut_low'], sp['cut'])}]): "
                  f"{_fmt_values(sp['values'], 'none')}. Under the spiked-Wigner (BBP) model "
                  f"each corresponds to a rank-one signal of strength theta = "
                  f"{_fmt_values(sp['theta'], 'n/a')}.")
    else:
        doc.p(f"Semicircle fit failed: {e.get('semicircle_error')}")
    doc.img(rel["esd"], "Hessian spectral density (log scale) with the semicircle fit and "
                        "the top eigenvalues (red: spikes); right: cumulative spectral mass "
                        "of the bulk against the fitted semicircle")


def _write_gradients(doc: _Doc, r: Dict[str, Any], rel: Dict[str, str]) -> None:
    g = r["gradients"]
    rk = g["rank"]
    doc.h("Gradient covariance")
    doc.p(f"Per-sample gradients of {g['n_samples']} training samples (method "
          f"{g['method']}), centred covariance C = G_c^T G_c / n, top {g['k']} eigenvalues "
          f"({g['n_zero']} exactly zero: centring removes one direction). Gradient rank: "
          f"effective (entropy) rank {_fmt(rk['effective_rank'])}, stable rank "
          f"{_fmt(rk['stable_rank'])}, numerical rank {rk['numerical_rank']} (tol "
          f"{_fmt(rk['tol'])}).")
    mp = g.get("marchenko_pastur")
    if mp is not None:
        doc.p(f"Marchenko-Pastur fit to the non-zero eigenvalues: ratio {_fmt(mp['ratio'])} "
              f"({mp['ratio_source']}), sigma^2 {_fmt(mp['scale'])}, "
              + _bulk_text(mp, f"{mp['n_outliers']} eigenvalues above it")
              + ". The outliers are the few gradient directions that carry signal; the bulk is "
                "what a random matrix of the same shape would give.")
    else:
        doc.p(f"Marchenko-Pastur fit failed: {g.get('marchenko_pastur_error')}")
    if "gradients" in rel:
        doc.img(rel["gradients"], "Gradient-covariance eigenvalues with the MP bulk and the "
                                  "effective rank")


def _write_training(doc: _Doc, r: Dict[str, Any], rel: Dict[str, str]) -> None:
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
    if "training" in rel:
        doc.img(rel["training"], "lambda_max over training with the edge-of-stability line")


def _write_barrier(doc: _Doc, r: Dict[str, Any], rel: Dict[str, str]) -> None:
    b = r["barrier"]
    doc.h("Loss barrier")
    doc.p(f"Loss on the straight line between the two models ({len(b['ts'])} points, "
          f"{b['n_samples']} samples): barrier height {_fmt(b['height'])} (loss above the "
          f"chord between the end points) at t = {_fmt(b['t_max'])}.")
    doc.img(rel["barrier"], "Loss along (1-t) w_A + t w_B with the chord")


#: One writer per section, in the order of the report (that of ``SECTIONS``).
_WRITE: Dict[str, Callable[[_Doc, Dict[str, Any], Dict[str, str]], None]] = {
    "topk": _write_topk, "trace": _write_trace, "esd": _write_esd,
    "gradients": _write_gradients, "training": _write_training, "barrier": _write_barrier}
