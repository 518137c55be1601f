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
    if "blocks" in r:
        lam = r["blocks"]["lambda_max"]
        sharp = max(lam, key=lam.get)
        rows.append(["sharpest parameter block", f"{sharp} (lambda_max {_fmt(lam[sharp])})"])
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


def _write_blocks(doc: _Doc, r: Dict[str, Any], rel: Dict[str, str]) -> None:
    b = r["blocks"]
    names, lam, per_dim = b["names"], b["lambda_max"], b["trace_per_dim"]
    doc.h("Blockwise spectra (diagonal blocks of the Hessian)")
    preset = f"preset '{b['preset']}'" if b["preset"] != "custom" else "given blocks"
    doc.p(f"The diagonal block H_bb of each parameter block ({preset}: "
          + ", ".join(f"{n} {b['sizes'][n]}" for n in names)
          + f" parameters). lambda_max(H_bb) by Lanczos on each block, all blocks in lockstep "
            f"(landscape_ext.block_eigsh: {b['n_products_eigsh']} batched products, "
            f"{b['n_matvecs_eigsh']} directions, relative tolerance {b['tol']:g}); each block's "
            f"spectral density by stochastic Lanczos quadrature ({b['n_probes']} probes x "
            f"{b['n_steps']} steps per block, landscape_ext.block_spectral_density: "
            f"{b['n_products_density']} batched products). tr(H_bb)/d_b, the block's mean "
            f"eigenvalue, is the density's first moment.")
    doc.table(["block", "d_b", "lambda_max(H_bb)", "residual", "converged", "tr(H_bb)/d_b",
               "+- 1 s.e.", "tr(H_bb)"],
              [[n, b["sizes"][n], lam[n], b["residuals"][n], b["converged"][n], per_dim[n],
                b["trace_per_dim_stderr"][n], b["block_trace"][n]] for n in names])
    doc.p(_blocks_spread_text(r))
    if len(names) > 1:
        pairs = sorted((b["js_distance"][p][q], p, q) for i, p in enumerate(names)
                       for q in names[i + 1:])
        doc.p(f"Shapes: pairwise Jensen-Shannon distances of the broadened block densities "
              f"(base 2: 0 = the same distribution, 1 = disjoint; broadening "
              f"{_fmt(b['sigma'])} on one grid). Most different: {pairs[-1][1]} and "
              f"{pairs[-1][2]} ({_fmt(pairs[-1][0])}); closest: {pairs[0][1]} and "
              f"{pairs[0][2]} ({_fmt(pairs[0][0])}).")
        doc.table(["Jensen-Shannon distance", *names],
                  [[p, *[b["js_distance"][p][q] for q in names]] for p in names])
    doc.img(rel["blocks"], "Per-block spectral densities; right: per-block lambda_max (bars) "
                           "and tr(H_bb)/d_b (points) against the whole Hessian's lambda_max")


def _blocks_spread_text(r: Dict[str, Any]) -> str:
    """How far the blocks' sharpness and mean curvature differ, checked against the whole
    Hessian's lambda_max (interlacing) and trace (the blocks' traces add up to it)."""
    b = r["blocks"]
    lam, per_dim = b["lambda_max"], b["trace_per_dim"]
    sharp, flat = max(lam, key=lam.get), min(lam, key=lam.get)
    curved, level = max(per_dim, key=per_dim.get), min(per_dim, key=per_dim.get)
    txt = (f"Heterogeneity: lambda_max ranges from {_fmt(lam[flat])} ({flat}) to "
           f"{_fmt(lam[sharp])} ({sharp}), max/min |lambda_max| = "
           f"{_fmt(b['lambda_max_ratio'])} (standard deviation of log10 |lambda_max|: "
           f"{_fmt(b['lambda_max_log10_sd'])}); the mean eigenvalue tr(H_bb)/d_b ranges from "
           f"{_fmt(per_dim[level])} ({level}) to {_fmt(per_dim[curved])} ({curved}).")
    top = r.get("topk", {})
    if top.get("which", "largest") == "largest" and top.get("eigenvalues"):
        whole = top["eigenvalues"][0]
        txt += (f" No block's lambda_max can exceed the whole Hessian's ({_fmt(whole)}; Cauchy "
                f"interlacing)")
        txt += (f"; the sharpest block reaches {100 * lam[sharp] / whole:.0f}% of it."
                if whole > 0 else ".")
    if b["covers_all"] and "trace" in r:
        t = r["trace"]
        txt += (f" The blocks cover all {r['n_params']} parameters, so their traces add up to "
                f"tr(H): sum_b tr(H_bb) = {_fmt(sum(b['block_trace'].values()))} +- "
                f"{_fmt(b['block_trace_sum_stderr'])} (SLQ) against the Hutch++ estimate "
                f"{_fmt(t['estimate'])} +- {_fmt(t['stderr'])} (one standard error each).")
    return txt


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
    "topk": _write_topk, "trace": _write_trace, "esd": _write_esd, "blocks": _write_blocks,
    "gradients": _write_gradients, "training": _write_training, "barrier": _write_barrier}
