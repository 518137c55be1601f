"""The report of a width x depth sweep: :func:`sweep_report` writes the scaling-law fit with its
confidence band, Phi over the (width, depth) grid and the generalization gap against gradient
rank, from the measurement records of :mod:`landscape_lab.sweep`. See docs/report.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._results import PathLike
from .document import _Doc, _fmt, _fmt_ci
from .figures import _fig_gap_vs_rank, _fig_phi_grid, _fig_scaling_law



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
    out = Path(out_dir)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    meas = list(measurements)
    doc = _Doc("Sweep report: landscape statistics over width and depth")
    widths, depths = _write_grid(doc, meas)
    last_epoch = max(r["epoch"] for r in meas)
    last = [r for r in meas if r["epoch"] == last_epoch]
    _write_scaling_law(doc, fits or {}, statistic, figdir)
    _write_phi(doc, last, widths, depths, last_epoch, figdir)
    _write_gap_vs_rank(doc, last, depths, last_epoch, figdir)
    doc.h("Measurements")
    cols = ["cell", "epoch", "n_params", "spectral_norm", "trace", "grad_effective_rank", "phi",
            "train_acc", "test_acc", "gen_gap"]
    doc.table(cols, [[r.get(c) if not isinstance(r.get(c), str) else r[c] for c in cols]
                     for r in sorted(meas, key=lambda r: (r["cell"], r["epoch"]))])
    return doc.write(out, "sweep_report", fmt)


def _write_grid(doc: _Doc, meas: List[Dict[str, Any]]) -> Tuple[List[int], List[int]]:
    """The opening paragraph (what the grid holds); returns its sorted widths and depths."""
    widths = sorted({r["width"] for r in meas})
    depths = sorted({r["depth"] for r in meas})
    doc.p(f"{len(meas)} measurements, {len({r['cell'] for r in meas})} cells: widths {widths}, "
          f"depths {depths}, data sets {sorted({r['dataset'] for r in meas})}, optimizers "
          f"{sorted({r['optimizer'] for r in meas})}; epochs "
          f"{sorted({r['epoch'] for r in meas})}.")
    return widths, depths


def _write_scaling_law(doc: _Doc, fits: Dict[str, Any], statistic: str, figdir: Path) -> None:
    doc.h("Scaling law")
    if not fits:
        doc.p("No scaling-law fit (too few points or degenerate grid); see scaling_fit.json.")
        return
    _fig_scaling_law(fits, statistic, figdir / "scaling_law.png")
    doc.p(f"Fit of {statistic} = c n^alpha exp(beta L) (log-linear least squares, 95% "
          f"bootstrap intervals) at the last measured epoch. The proposal conjectures "
          f"0 < alpha < 1 and beta > 0.")
    doc.table(["group", "alpha", "alpha 95% CI", "beta", "beta 95% CI", "c", "R^2", "points"],
              [[name, f.alpha, _fmt_ci(f.alpha_ci), f.beta, _fmt_ci(f.beta_ci), f.c,
                f.r_squared, f.n_points] for name, f in sorted(fits.items())])
    for name, f in sorted(fits.items()):
        verdict = []
        if f.alpha_ci is not None:
            verdict.append(f"alpha in (0, 1) is {_claim_verdict(f.alpha_ci, 0, 1)} by the CI")
        if f.beta_ci is not None:
            verdict.append(f"beta > 0 is {_claim_verdict(f.beta_ci, 0)} by the CI")
        if f.note:
            verdict.append(f.note)
        if verdict:
            doc.p(f"{name}: " + "; ".join(verdict) + ".")
    doc.img("figures/scaling_law.png",
            "Spectral norm against width per depth, fitted law and 95% band")


def _claim_verdict(ci: Sequence[float], low: float, high: Optional[float] = None) -> str:
    """Whether a confidence interval supports the claim ``low < x < high`` (``high`` None: no
    upper bound): inside it, outside it (contradicted), or overlapping its edge (not
    resolved)."""
    lo, hi = ci
    if lo > low and (high is None or hi < high):
        return "supported"
    if hi < low or (high is not None and lo > high):
        return "contradicted"
    return "not resolved"


def _records_with(doc: _Doc, heading: str, records: List[Dict[str, Any]], key: str,
                  missing: str) -> List[Dict[str, Any]]:
    """Open the part ``heading``; return the records that have ``key``, or say ``missing`` in
    the report when none has it."""
    doc.h(heading)
    found = [r for r in records if r.get(key) is not None]
    if not found:
        doc.p(missing)
    return found


def _write_phi(doc: _Doc, last: List[Dict[str, Any]], widths: List[int], depths: List[int],
               last_epoch: int, figdir: Path) -> None:
    with_phi = _records_with(doc, "Phi over the grid", last, "phi",
                             "Phi needs the gradient rank (grad_k > 0); not available in these "
                             "measurements.")
    if not with_phi:
        return
    _fig_phi_grid(with_phi, widths, depths, figdir / "phi_grid.png")
    best = max(with_phi, key=lambda r: r["phi"])
    doc.p(f"Phi (the proposal's compatibility metric; gradient rank = effective rank, D = "
          f"data dimension {with_phi[0]['data_dim']}) at epoch {last_epoch}, mean over "
          f"seeds. Largest: {_fmt(best['phi'])} at width {best['width']}, depth "
          f"{best['depth']} ({best['dataset']}, {best['optimizer']}).")
    doc.img("figures/phi_grid.png", "Phi over widths and depths")


def _write_gap_vs_rank(doc: _Doc, last: List[Dict[str, Any]], depths: List[int],
                       last_epoch: int, figdir: Path) -> None:
    pts = _records_with(doc, "Generalization gap against gradient rank", last,
                        "grad_effective_rank", "No gradient ranks in these measurements "
                                               "(grad_k = 0).")
    if not pts:
        return
    _fig_gap_vs_rank(pts, depths, last_epoch, figdir / "gap_vs_rank.png")
    rank = np.array([r["grad_effective_rank"] for r in pts])
    gap = np.array([r["gen_gap"] for r in pts])
    bounds = [r.get("grad_k") for r in pts if r.get("grad_k")]
    doc.p(_rank_verdict(rank, gap, max(bounds) if bounds else None))
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
        if hi.size >= 3 and np.ptp(rank[rank >= 100]) > 0:
            slope = np.polyfit(np.log(rank[rank >= 100]), hi, 1)[0]
            txt += (f" Above 100 the gap changes by {slope:.3f} per e-fold of rank "
                    f"({'flat: consistent with a plateau' if abs(slope) < 0.01 else 'not flat'}).")
    return txt
