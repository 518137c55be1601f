"""The report of a width x depth sweep (or several, side by side): :func:`sweep_report` writes
which cells reached the training criterion, the scaling law per architecture and data set with
alpha and beta compared, what the data say about the proposal's conjectures, the statistics with
their batch-to-batch spread, Phi over the grid and the generalization gap against gradient rank,
from the measurement records of :mod:`landscape_lab.sweep`. See docs/report.md and
docs/sweep.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._results import PathLike
from ..sweep.fitting import final_measurements
from .document import _Doc, _fmt, _fmt_ci
from .sweep_figures import (SPREAD_PANELS, _fig_exponents, _fig_gap_vs_rank, _fig_phi_grid,
                            _fig_scaling_law, _fig_spread)

#: How the report words a conjecture's status.
VERDICTS = ("supported", "rejected", "not resolved")


def sweep_report(measurements: Sequence[Dict[str, Any]], out_dir: PathLike, *,
                 fits: Optional[Dict[str, Any]] = None, statistic: str = "spectral_norm",
                 fmt: str = "markdown", entries: Optional[Dict[str, Dict[str, Any]]] = None
                 ) -> Path:
    """Write ``sweep_report.md`` with its figures (``figures/scaling_law.png``,
    ``exponents.png``, ``statistics.png``, ``phi_grid.png``, ``gap_vs_rank.png``) from sweep
    measurement records.

    Parameters
    ----------
    measurements : list of dict
        ``kind == "measurement"`` records (see :mod:`landscape_lab.sweep`); ``"group"`` names
        their fit group (default ``model|dataset|optimizer``).
    out_dir : path
    fits : dict, optional
        ``{group: ScalingFit}``.
    statistic : str
        The fitted statistic.
    fmt : {"markdown", "html", "both"}
    entries : dict, optional
        ``{group: entry}`` of :func:`~landscape_lab.sweep.fit_sweep` (cells used and left out).
    """
    out = Path(out_dir)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    meas = [r if "group" in r else dict(r, group=_default_group(r)) for r in measurements]
    final = [r for g in sorted({r["group"] for r in meas})
             for r in final_measurements([m for m in meas if m["group"] == g]).values()]
    fits = fits or {}
    bound = max((r.get("grad_k") or 0 for r in final), default=0) or None
    doc = _Doc("Sweep report: landscape statistics over width and depth")
    _write_grid(doc, meas, final)
    _write_scaling_law(doc, fits, entries or {}, statistic, figdir)
    _write_conjectures(doc, fits, final, bound)
    _write_spread(doc, final, figdir)
    _write_phi(doc, final, figdir)
    _write_gap_vs_rank(doc, final, bound, figdir)
    _write_table(doc, meas)
    return doc.write(out, "sweep_report", fmt)


def _default_group(r: Dict[str, Any]) -> str:
    return f"{r.get('model', 'mlp')}|{r['dataset']}|{r['optimizer']}"


def _write_grid(doc: _Doc, meas: List[Dict[str, Any]], final: List[Dict[str, Any]]) -> None:
    """What the grid holds and where each cell was measured (criterion reached or not)."""
    doc.p(f"{len(meas)} measurements, {len({r['cell'] for r in meas})} cells: widths "
          f"{sorted({r['width'] for r in meas})}, depths {sorted({r['depth'] for r in meas})}, "
          f"groups (model | data set | optimizer) {sorted({r['group'] for r in meas})}; epochs "
          f"{sorted({r['epoch'] for r in meas})}.")
    doc.h("Where the cells were measured")
    for grp in sorted({r["group"] for r in final}):
        doc.p(f"{grp}: " + _criterion_text([r for r in final if r["group"] == grp]))


def _criterion_text(final: List[Dict[str, Any]]) -> str:
    """One group's cells against the training criterion, in words."""
    acc = [r["train_acc"] for r in final if r.get("train_acc") is not None]
    acc_txt = f"train accuracy {_fmt(min(acc), 3)} .. {_fmt(max(acc), 3)}" if acc else ""
    criterion = next((r.get("criterion") for r in final if r.get("criterion")), None)
    if criterion is None:
        epochs = sorted({r["epoch"] for r in final})
        return (f"a fixed-epoch sweep: every cell measured after {epochs} epochs whatever its "
                f"training stage ({acc_txt}); the fit compares networks at different stages of "
                f"training, not at comparable minima (train to a criterion with "
                f"--train-to-loss / --train-to-accuracy).")
    reached = [r for r in final if r.get("reached_criterion")]
    missed = [r for r in final if r.get("reached_criterion") is False]
    txt = f"{len(reached)} of {len(final)} cells reached {criterion}"
    if reached:
        ep = np.array([r["epochs_to_criterion"] for r in reached])
        txt += (f" (epochs to criterion: median {np.median(ep):g}, range {ep.min()} .. "
                f"{ep.max()})")
    if missed:
        loss = [r["train_loss"] for r in missed]
        txt += (f"; {len(missed)} stopped at max_epochs = {missed[0].get('max_epochs')} with "
                f"train loss {_fmt(min(loss), 3)} .. {_fmt(max(loss), 3)} "
                f"({', '.join(sorted(r['cell'] for r in missed))})")
    return txt + f". Final measurements: {acc_txt}."


def _write_scaling_law(doc: _Doc, fits: Dict[str, Any], entries: Dict[str, Dict[str, Any]],
                       statistic: str, figdir: Path) -> None:
    doc.h("Scaling law per architecture and data set")
    for name, e in sorted(entries.items()):
        if e.get("error"):
            doc.p(f"{name}: no fit ({e['error']}).")
    if not fits:
        doc.p("No scaling-law fit" + (" (the reasons above)." if entries else
                                      " (too few points or degenerate grid); see "
                                      "scaling_fit.json."))
        return
    doc.p(f"Fit of {statistic} = c n^alpha exp(beta L) (log-linear least squares, 95% "
          f"bootstrap intervals) at each cell's final measurement, over the cells that reached "
          f"the training criterion unless --fit-all. The proposal conjectures 0 < alpha < 1 "
          f"and beta > 0.")
    rows = []
    for name, f in sorted(fits.items()):
        e = entries.get(name, {})
        left: Any = e.get("n_not_reached", 0)
        if e.get("fit_all") and left:
            left = f"none ({left} not reached, kept: --fit-all)"
        rows.append([name, f.n_points, left, f.alpha, _fmt_ci(f.alpha_ci), f.beta,
                     _fmt_ci(f.beta_ci), f.c, f.r_squared,
                     "yes" if f.weights is not None else "no"])
    doc.table(["group", "points", "left out (criterion)", "alpha", "alpha 95% CI", "beta",
               "beta 95% CI", "c", "R^2", "weighted"], rows)
    for name, e in sorted(entries.items()):
        if e.get("weight_note"):
            doc.p(f"{name}: {e['weight_note']}.")
    _fig_scaling_law(fits, statistic, figdir / "scaling_law.png")
    doc.img("figures/scaling_law.png", f"{statistic} against width per depth, fitted law and "
                                       f"95% band")
    _fig_exponents(fits, statistic, figdir / "exponents.png")
    doc.img("figures/exponents.png", "alpha and beta with 95% intervals per group; shaded: the "
                                     "proposal's conjectured region")


def _claim_verdict(ci: Sequence[float], low: float, high: Optional[float] = None) -> str:
    """Whether a confidence interval supports the claim ``low < x < high`` (``high`` None: no
    upper bound): inside it (supported), outside it (rejected), or overlapping its edge (not
    resolved)."""
    lo, hi = ci
    if lo > low and (high is None or hi < high):
        return "supported"
    if hi < low or (high is not None and lo > high):
        return "rejected"
    return "not resolved"


def _write_conjectures(doc: _Doc, fits: Dict[str, Any], final: List[Dict[str, Any]],
                       bound: Optional[int]) -> None:
    """The proposal's three claims, group by group, in words."""
    doc.h("The proposal's conjectures")
    by_claim: Dict[str, Dict[str, List[str]]] = {}

    def note(claim: str, verdict: str, name: str) -> None:
        by_claim.setdefault(claim, {}).setdefault(verdict, []).append(name)

    for name, f in sorted(fits.items()):
        words = []
        for key, claim, lo, hi in (("alpha", "alpha in (0, 1)", 0, 1), ("beta", "beta > 0", 0,
                                                                         None)):
            ci = getattr(f, f"{key}_ci")
            verdict = _claim_verdict(ci, lo, hi) if ci is not None else "not resolved"
            note(claim, verdict, name)
            words.append(f"{claim} is {verdict} by the CI ({_fmt_ci(ci)})" if ci is not None
                         else f"{claim} cannot be tested ({key} not identifiable)")
        if f.note:
            words.append(f.note)
        doc.p(f"{name}: " + "; ".join(words) + ".")
    for grp in sorted({r["group"] for r in final}):
        pts = [r for r in final if r["group"] == grp and r.get("grad_effective_rank") is not None]
        if pts:
            verdict, why = _plateau_verdict(np.array([r["grad_effective_rank"] for r in pts]),
                                            np.array([r["gen_gap"] for r in pts]), bound)
            note("gap plateau beyond gradient rank ~100", verdict, grp)
            doc.p(f"{grp}: the plateau of the generalization gap beyond gradient rank ~100 is "
                  f"{verdict}: {why}.")
    if not by_claim:
        doc.p("No fit and no gradient ranks: nothing to say about the conjectures.")
        return
    doc.p("In short: " + " ".join(
        f"{claim}: " + "; ".join(f"{v} for {', '.join(names)}" for v, names in verdicts.items())
        + "." for claim, verdicts in by_claim.items()))


def _slope_ci(x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
              n_boot: int = 1000) -> Optional[Tuple[float, float]]:
    """95% case-bootstrap interval of the slope of ``y`` on ``log x`` (None when too few
    resamples have two distinct x)."""
    lx = np.log(x)
    slopes = []
    for _ in range(n_boot):
        i = rng.integers(0, x.size, x.size)
        if np.ptp(lx[i]) > 0:
            slopes.append(np.polyfit(lx[i], y[i], 1)[0])
    if len(slopes) < n_boot // 2:
        return None
    lo, hi = np.quantile(slopes, [0.025, 0.975])
    return float(lo), float(hi)


def _plateau_verdict(rank: np.ndarray, gap: np.ndarray, bound: Optional[int] = None,
                     seed: int = 0) -> Tuple[str, str]:
    """(verdict, reason) for the claim that the gap stops changing with gradient rank beyond
    ~100: supported when the slope of gap on log(rank) is resolved below 100 and not above,
    rejected when it is resolved above 100, else not resolved."""
    if rank.max() < 100 or rank.min() >= 100:
        side = "below" if rank.max() < 100 else "above"
        why = (f"every cell is {side} rank 100 (ranks {rank.min():.1f} .. {rank.max():.1f}), "
               f"so the grid does not straddle the claimed threshold")
        if bound is not None and bound < 100:
            why += f" (the rank cannot exceed {bound}, the covariance eigenvalues computed)"
        return "not resolved", why
    above, below = rank >= 100, rank < 100
    if above.sum() < 3 or below.sum() < 3:
        return "not resolved", (f"{int(below.sum())} cells below and {int(above.sum())} above "
                                f"rank 100; at least 3 on each side are needed")
    rng = np.random.default_rng(seed)
    ci_above = _slope_ci(rank[above], gap[above], rng)
    ci_below = _slope_ci(rank[below], gap[below], rng)
    if ci_above is None or ci_below is None:
        return "not resolved", "the ranks on one side of 100 hardly vary"
    txt = (f"slope of the gap per e-fold of rank {_fmt_ci(ci_below)} below 100, "
           f"{_fmt_ci(ci_above)} above (95% intervals)")
    if ci_above[0] > 0 or ci_above[1] < 0:
        return "rejected", "the gap still changes above rank 100; " + txt
    if ci_below[0] > 0 or ci_below[1] < 0:
        return "supported", "the gap changes below rank 100 and is flat above; " + txt
    return "not resolved", "the gap is flat on both sides within the intervals; " + txt


def _write_spread(doc: _Doc, final: List[Dict[str, Any]], figdir: Path) -> None:
    """The statistics with their batch-to-batch spread against the range over the grid."""
    doc.h("Statistics with their batch-to-batch spread")
    stats = [s for s in SPREAD_PANELS if any(r.get(s) is not None for r in final)]
    with_sd = [r for r in final if r.get("spread_batches", 1) >= 2]
    if not stats:
        doc.p("No landscape statistics in these measurements.")
        return
    if not with_sd:
        doc.p("No batch-to-batch spread: every measurement used one batch (spread_batches < 2, "
              "or a training set no larger than the measurement batch).")
    else:
        nb = sorted({r["spread_batches"] for r in with_sd})
        size = ", ".join(str(n) for n in sorted({r.get("n_samples") for r in with_sd}))
        lines = []
        for s in stats:
            rel = [r[f"{s}_batch_sd"] / abs(r[s]) for r in with_sd
                   if r.get(f"{s}_batch_sd") is not None and r.get(s)]
            vals = [r[s] for r in final if r.get(s) is not None]
            if rel:
                lines.append(f"{s}: sd {100 * np.median(rel):.1f}% of the value (median; up to "
                             f"{100 * max(rel):.1f}%), values {_fmt(min(vals))} .. "
                             f"{_fmt(max(vals))} over the grid")
        doc.p(f"Each statistic was measured on {', '.join(map(str, nb))} disjoint batches of "
              f"{size} training samples; "
              f"the error bars are the sd across them: how far one measurement would move on "
              f"another batch. " + "; ".join(lines) + f". With R = {min(nb)} batches the sd is "
              f"itself uncertain by about {100 / np.sqrt(2 * (min(nb) - 1)):.0f}%; a difference "
              f"between two cells is resolved when it exceeds about 2 sqrt(sd1^2 + sd2^2).")
    _fig_spread(final, stats, figdir / "statistics.png")
    doc.img("figures/statistics.png", "Final measurements against width per depth; error bars: "
                                      "batch-to-batch sd; open markers: criterion not reached")


def _records_with(doc: _Doc, heading: str, records: List[Dict[str, Any]], key: str,
                  missing: str) -> List[Dict[str, Any]]:
    """Open the part ``heading``; return the records that have ``key``, or say ``missing`` in
    the report when none has it."""
    doc.h(heading)
    found = [r for r in records if r.get(key) is not None]
    if not found:
        doc.p(missing)
    return found


def _write_phi(doc: _Doc, final: List[Dict[str, Any]], figdir: Path) -> None:
    with_phi = _records_with(doc, "Phi over the grid", final, "phi",
                             "Phi needs the gradient rank (grad_k > 0); not available in these "
                             "measurements.")
    if not with_phi:
        return
    _fig_phi_grid(with_phi, figdir / "phi_grid.png")
    best = max(with_phi, key=lambda r: r["phi"])
    doc.p(f"Phi (the proposal's compatibility metric; gradient rank = effective rank, D = "
          f"data dimension) at the final measurements, mean over seeds. Largest: "
          f"{_fmt(best['phi'])} at width {best['width']}, depth {best['depth']} "
          f"({best['group']}).")
    doc.img("figures/phi_grid.png", "Phi over widths and depths")


def _write_gap_vs_rank(doc: _Doc, final: List[Dict[str, Any]], bound: Optional[int],
                       figdir: Path) -> None:
    pts = _records_with(doc, "Generalization gap against gradient rank", final,
                        "grad_effective_rank", "No gradient ranks in these measurements "
                                               "(grad_k = 0).")
    if not pts:
        return
    _fig_gap_vs_rank(pts, figdir / "gap_vs_rank.png", bound)
    rank = np.array([r["grad_effective_rank"] for r in pts])
    gap = np.array([r["gen_gap"] for r in pts])
    doc.p(_rank_verdict(rank, gap, bound))
    doc.img("figures/gap_vs_rank.png", "Generalization gap against gradient rank")


def _rank_verdict(rank: np.ndarray, gap: np.ndarray, bound: Optional[int] = None) -> str:
    """What the (rank, gap) points say about the proposal's plateau of the gap near rank 100;
    ``bound`` is the most covariance eigenvalues any rank was computed from."""
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
    return txt


def _pm(r: Dict[str, Any], key: str) -> str:
    """``value +- batch sd`` of one field (``n/a`` when missing)."""
    sd = r.get(f"{key}_batch_sd")
    return _fmt(r.get(key)) + (f" +- {_fmt(sd, 2)}" if sd is not None else "")


def _write_table(doc: _Doc, meas: List[Dict[str, Any]]) -> None:
    doc.h("Measurements")
    doc.p("Values on the fixed measurement batch, +- the batch-to-batch sd; 'final' marks the "
          "measurement where the cell stopped (criterion reached, or max_epochs).")
    cols = ["cell", "epoch", "final", "reached", "n_params", "spectral_norm", "trace",
            "grad_effective_rank", "phi", "train_loss", "train_acc", "test_acc"]
    rows = []
    for r in sorted(meas, key=lambda r: (r["cell"], r["epoch"])):
        rows.append([r["cell"], r["epoch"], r.get("final"), r.get("reached_criterion"),
                     r.get("n_params"), _pm(r, "spectral_norm"), _pm(r, "trace"),
                     _pm(r, "grad_effective_rank"), _pm(r, "phi"), r.get("train_loss"),
                     r.get("train_acc"), r.get("test_acc")])
    doc.table(cols, rows)
