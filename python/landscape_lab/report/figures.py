"""The report figures: matplotlib (Agg backend, no display needed), one function per PNG.

Each ``_fig_*`` draws one figure from the numbers a report section computed and saves it with
:func:`_save`, which returns the written path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

#: Hessian eigenvalues are second derivatives of the loss (nats for cross-entropy) with respect to
#: the parameters.
EIG_UNIT = "loss / param$^2$"


def _plt():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: reports are optional)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    """Save ``fig`` as a PNG at ``path`` (parents created), close it, return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return str(path)


def _label(ax: Any, xlabel: str, ylabel: str, title: str, *, title_size: Optional[str] = None,
           legend_size: str = "small", legend_loc: Optional[str] = None,
           grid: Optional[str] = None) -> None:
    """Axis labels, title and legend of one panel; ``grid`` ("major" or "both") adds a light
    grid on those ticks."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, **({"fontsize": title_size} if title_size else {}))
    ax.legend(fontsize=legend_size, **({"loc": legend_loc} if legend_loc else {}))
    if grid is not None:
        ax.grid(alpha=0.3, which=grid)


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


# ---- one model ---------------------------------------------------------------------------------


def _fig_topk(eig: Any, tol: float, path: Path) -> str:
    """Top-k eigenvalues with residual bars; right: relative residuals against ``tol``."""
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
    _label(a1, "index i (largest first)", f"eigenvalue $\\lambda_i$ ({EIG_UNIT})",
           f"Top-{lam.size} Hessian eigenvalues (block Lanczos)", grid="major")
    a2.semilogy(i, np.maximum(rel, 1e-17), "o-", color="C0", label="relative residual")
    a2.axhline(tol, color="k", ls="--", lw=1, label=f"tolerance {tol:g}")
    _label(a2, "index i", "$\\|Hx-\\lambda x\\| / \\|H\\|$ (dimensionless)",
           f"Ritz residuals ({eig.n_matvecs} Hessian-vector products)", grid="both")
    return _save(fig, path)


def _fig_esd(dens: Any, esd: Dict[str, Any], eig: Any, path: Path) -> str:
    """Spectral density with its band, the semicircle fit and the top-k eigenvalues; right:
    cumulative mass of the quadrature nodes against the semicircle."""
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
    _label(a1, f"eigenvalue $\\lambda$ ({EIG_UNIT})", "spectral density (normalized to 1)",
           f"Hessian ESD: {dens.n_probes} probes x {dens.n_steps} Lanczos steps, "
           f"$\\sigma_{{broad}}$={curve.sigma:.2g}", title_size="medium",
           legend_size="x-small", legend_loc="upper right")
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
    ks = f"KS D = {sc['ks_statistic']:.3f}" if sc is not None else "no semicircle fit"
    _label(a2, f"eigenvalue $\\lambda$ ({EIG_UNIT})", "cumulative spectral mass",
           f"Bulk: cumulative distribution, {ks}", title_size="medium", legend_size="x-small",
           legend_loc="upper left")
    return _save(fig, path)


def _value_scale(ax: Any, values: Sequence[float]) -> None:
    """Log scale for positive values; symmetric log (linear near 0) when any is <= 0."""
    vals = np.abs(np.asarray(values, dtype=float))
    if np.all(np.asarray(values, dtype=float) > 0):
        ax.set_yscale("log")
    else:
        positive = vals[vals > 0]
        ax.set_yscale("symlog", linthresh=float(positive.min()) if positive.size else 1.0)


def _fig_blocks(dens: Any, b: Dict[str, Any], path: Path,
                lambda_max: Optional[float] = None) -> str:
    """Per-block spectral densities on one grid (log scale); right: per-block ``lambda_max``
    (bars) and ``tr(H_bb) / d_b`` with one standard error (points), with the whole Hessian's
    ``lambda_max`` when measured."""
    plt = _plt()
    names = b["names"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    sigma = b["sigma"]
    lo = min(dens[n].spectral_range[0] for n in names) - 5 * sigma
    hi = max(dens[n].spectral_range[1] for n in names) + 5 * sigma
    grid = np.linspace(lo, hi, 800)
    floor = 1e-8
    for i, name in enumerate(names):
        curve = dens[name].evaluate(grid, sigma)
        a1.plot(grid, np.maximum(curve.density.numpy(), floor), color=f"C{i}", lw=1.2,
                label=f"{name} (d_b = {b['sizes'][name]})")
    a1.set_yscale("log")
    _label(a1, f"eigenvalue $\\lambda$ of $H_{{bb}}$ ({EIG_UNIT})",
           "spectral density (each block normalized to 1)",
           f"Per-block densities: {b['n_probes']} probes x {b['n_steps']} Lanczos steps, "
           f"$\\sigma_{{broad}}$={sigma:.2g}", title_size="medium", legend_size="x-small",
           legend_loc="upper right")
    x = np.arange(len(names))
    lam = [b["lambda_max"][n] for n in names]
    per_dim = [b["trace_per_dim"][n] for n in names]
    err = [1.96 * b["trace_per_dim_stderr"][n] for n in names]
    a2.bar(x, lam, color=[f"C{i}" for i in range(len(names))], alpha=0.6,
           label="$\\lambda_{max}(H_{bb})$ (Lanczos on the block)")
    a2.errorbar(x, per_dim, yerr=err, fmt="D", color="k", ms=5, capsize=3,
                label="$tr(H_{bb}) / d_b$ (95% interval across probes)")
    if lambda_max is not None:
        a2.axhline(lambda_max, color="C3", ls="--", lw=1,
                   label=f"$\\lambda_{{max}}$ of the whole Hessian ({lambda_max:.3g})")
    _value_scale(a2, lam + per_dim + ([lambda_max] if lambda_max is not None else []))
    a2.set_xticks(x, names)
    _label(a2, "parameter block", f"eigenvalue ({EIG_UNIT})",
           f"Per-block sharpness and mean curvature (max/min $\\lambda_{{max}}$ = "
           f"{b['lambda_max_ratio']:.3g})", title_size="medium", legend_size="x-small",
           grid="major")
    return _save(fig, path)


def _fig_gradients(g: Dict[str, Any], path: Path) -> str:
    """Gradient-covariance eigenvalues with the MP edges and ranks; right: histogram with the
    MP density."""
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
    _label(a1, "index i", "covariance eigenvalue $\\sigma_i^2$ (loss$^2$ / param$^2$)",
           f"Gradient covariance spectrum (n={g['n_samples']}, d={g['n_params']}, "
           f"{g['method']}; {int((~pos).sum())} zero(s) not shown)", title_size="medium",
           legend_size="x-small", grid="both")
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
                label=f"Marchenko-Pastur fit (ratio {mp['ratio']:.2g}, "
                      f"KS D {mp['ks_statistic']:.2f})")
    _label(a2, "covariance eigenvalue (loss$^2$ / param$^2$)", "density",
           "Eigenvalue histogram and MP fit", title_size="medium", legend_size="x-small")
    return _save(fig, path)


def _fig_training(series: Dict[str, Any], path: Path) -> str:
    """``lambda_max`` over training with the edge-of-stability line (and the train loss)."""
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
    """Loss (and accuracy) along the straight line between two models, with the chord."""
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
