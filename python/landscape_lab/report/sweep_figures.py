"""The figures of the sweep report (matplotlib, Agg): the fitted scaling laws, alpha and beta with
their intervals side by side, the landscape statistics with their batch-to-batch spread, Phi
over the grid and the generalization gap against gradient rank. Records carry their fit group
in ``"group"`` (``model|dataset|optimizer``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .figures import EIG_UNIT, _label, _plain_log_ticks, _plt, _save

#: Statistics drawn with their spread, and their axis labels.
SPREAD_PANELS = {
    "spectral_norm": f"||H||_2 ({EIG_UNIT})",
    "trace": f"tr(H) ({EIG_UNIT})",
    "grad_effective_rank": "gradient effective rank",
    "phi": "Phi (dimensionless)",
}


def _groups(records: Sequence[Dict[str, Any]]) -> List[str]:
    return sorted({r["group"] for r in records})


def _fig_scaling_law(fits: Dict[str, Any], statistic: str, path: Path) -> str:
    """One panel per fitted group: the measurements against width, the law and its band."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(fits), figsize=(6.5 * len(fits), 4.5), squeeze=False)
    for ax, (name, f) in zip(axes[0], sorted(fits.items())):
        f.plot(ax)
        _plain_log_ticks(ax.xaxis, sorted(set(f.widths)))
        ax.set_xlabel("width n")
        unit = f" ({EIG_UNIT})" if statistic in ("spectral_norm", "lambda_max", "trace") else ""
        ax.set_ylabel(f"{statistic}{unit}")
        ax.set_title(f"{name}: " + ax.get_title(), fontsize="small")
    return _save(fig, path)


def _fig_exponents(fits: Dict[str, Any], statistic: str, path: Path) -> str:
    """alpha and beta with their intervals, one row per group, over the conjectured regions
    (0 < alpha < 1, beta > 0) shaded."""
    plt = _plt()
    names = sorted(fits)
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.55 * len(names)), squeeze=False)
    for ax, key, region in ((axes[0][0], "alpha", (0.0, 1.0)), (axes[0][1], "beta", (0.0, None))):
        y = np.arange(len(names))
        for i, name in enumerate(names):
            f = fits[name]
            val, ci = getattr(f, key), getattr(f, f"{key}_ci")
            if val is None:
                continue
            err = None if ci is None else [[val - ci[0]], [ci[1] - val]]
            ax.errorbar([val], [i], xerr=err, fmt="o", color=f"C{i % 10}", capsize=4)
        lo, hi = ax.get_xlim()
        ax.axvspan(region[0], region[1] if region[1] is not None else max(hi, 1.0),
                   color="C2", alpha=0.12, label="conjectured region")
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_yticks(y, names, fontsize="small")
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.set_xlabel(f"{key} (95% bootstrap interval)")
        ax.legend(fontsize="small", loc="lower right")
    fig.suptitle(f"Scaling exponents side by side: {statistic} ~ c n^alpha exp(beta L)",
                 fontsize="medium")
    return _save(fig, path)


def _fig_spread(final: Sequence[Dict[str, Any]], stats: Sequence[str], path: Path) -> str:
    """Each statistic against width per depth, error bars = batch-to-batch sd; one row per
    group. Open markers: cells that did not reach the training criterion."""
    plt = _plt()
    groups = _groups(final)
    fig, axes = plt.subplots(len(groups), len(stats), figsize=(4.2 * len(stats),
                                                              3.4 * len(groups)), squeeze=False)
    for row, grp in zip(axes, groups):
        recs = [r for r in final if r["group"] == grp]
        depths = sorted({r["depth"] for r in recs})
        for ax, stat in zip(row, stats):
            for i, dd in enumerate(depths):
                for reached in (True, False):
                    pts = sorted((r for r in recs if r["depth"] == dd and r.get(stat) is not None
                                  and (r.get("reached_criterion") is not False) == reached),
                                 key=lambda r: r["width"])
                    if not pts:
                        continue
                    sd = [r.get(f"{stat}_batch_sd") or 0.0 for r in pts]
                    ax.errorbar([r["width"] for r in pts], [r[stat] for r in pts], yerr=sd,
                                fmt="o" if reached else "o--", capsize=3, color=f"C{i % 10}",
                                mfc=None if reached else "none",
                                label=f"L = {dd}" + ("" if reached else " (not reached)"))
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis, sorted({r["width"] for r in recs}))
            _label(ax, "width n", SPREAD_PANELS.get(stat, stat), f"{grp}", title_size="small",
                   legend_size="x-small", grid="major")
    return _save(fig, path)


def _fig_phi_grid(with_phi: List[Dict[str, Any]], path: Path) -> str:
    """Phi over (width, depth), one heatmap per group, mean over seeds."""
    plt = _plt()
    groups = _groups(with_phi)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, grp in zip(axes[0], groups):
        recs = [r for r in with_phi if r["group"] == grp]
        widths, depths = sorted({r["width"] for r in recs}), sorted({r["depth"] for r in recs})
        Z = np.full((len(depths), len(widths)), np.nan)
        for i, dd in enumerate(depths):
            for j, ww in enumerate(widths):
                v = [r["phi"] for r in recs if r["width"] == ww and r["depth"] == dd]
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
        ax.set_ylabel("depth L")
        ax.set_title(f"Phi = (tr H / d) / ||H||_2 * rank / D  ({grp})", fontsize="small")
        fig.colorbar(im, ax=ax, label="Phi (dimensionless)")
    return _save(fig, path)


def _fig_gap_vs_rank(pts: List[Dict[str, Any]], path: Path,
                     bound: Optional[int] = None) -> str:
    """Generalization gap against gradient effective rank (x error bar: its batch-to-batch
    sd); colour = group, marker size ~ width."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, grp in enumerate(_groups(pts)):
        sel = [r for r in pts if r["group"] == grp]
        ax.errorbar([r["grad_effective_rank"] for r in sel], [r["gen_gap"] for r in sel],
                    xerr=[r.get("grad_effective_rank_batch_sd") or 0.0 for r in sel],
                    fmt="none", ecolor=f"C{i % 10}", alpha=0.5)
        ax.scatter([r["grad_effective_rank"] for r in sel], [r["gen_gap"] for r in sel],
                   s=[12 + 4 * np.log2(r["width"]) ** 2 for r in sel], color=f"C{i % 10}",
                   label=grp, alpha=0.8)
    ax.axvline(100, color="0.4", ls="--", lw=1, label="rank 100 (proposal's plateau)")
    if bound is not None:
        ax.axvline(bound, color="C3", ls=":", lw=1, label=f"largest computable rank ({bound})")
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    _label(ax, "gradient effective rank (Roy-Vetterli, dimensionless)",
           "generalization gap = train acc - test acc",
           "Gap vs gradient rank at the final measurements (marker size ~ width)", grid="both")
    return _save(fig, path)
