"""Fitting a sweep: the scaling law ``statistic ~ c n^alpha exp(beta L)`` over the merged results
of an output directory, and the sweep report (see docs/sweep.md)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from landscape_ext.results import write_json_atomic

from .._results import PathLike
from ..scaling import fit_scaling_law
from . import store

__all__ = ["measurements", "fit_sweep"]

log = logging.getLogger(__name__)


def measurements(records: Sequence[Dict[str, Any]], config_hash: Optional[str] = None
                 ) -> List[Dict[str, Any]]:
    """Measurement records (deduplicated by (cell, epoch, config_hash); the last wins),
    optionally of one ``config_hash``."""
    seen: Dict[Tuple[str, int, Optional[str]], Dict[str, Any]] = {}
    for r in records:
        if r.get("kind") != "measurement":
            continue
        if config_hash is not None and r.get("config_hash") != config_hash:
            continue
        seen[(r["cell"], int(r["epoch"]), r.get("config_hash"))] = r
    return list(seen.values())


def fit_sweep(out_dir: PathLike, *, statistic: str = "spectral_norm", epoch: Optional[int] = None,
              n_bootstrap: int = 1000, report: bool = True, seed: int = 0) -> Dict[str, Any]:
    """Fit ``statistic ~ c n^alpha exp(beta L)`` over the merged results of ``out_dir`` (per data
    set and optimizer, at ``epoch``, default the last measured) and write
    ``scaling_fit.json`` and, with ``report``, the sweep report.

    Records made with settings other than the latest ``sweep_config.json`` are ignored.
    """
    out = Path(out_dir)
    chash = store._config_hash(out)
    meas = measurements(store.load_results(out), chash)
    if not meas:
        raise ValueError(f"fit_sweep: no measurements in {out} (results.jsonl)")
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in meas:
        groups.setdefault((r["dataset"], r["optimizer"]), []).append(r)
    fits: Dict[str, Any] = {}
    fit_objs: Dict[str, Any] = {}
    for (dataset, optimizer), group in sorted(groups.items()):
        at_epoch = epoch if epoch is not None else max(r["epoch"] for r in group)
        points = [r for r in group if r["epoch"] == at_epoch and r.get(statistic) is not None
                  and r[statistic] > 0]
        name = f"{dataset}|{optimizer}"
        entry: Dict[str, Any] = {"dataset": dataset, "optimizer": optimizer, "epoch": at_epoch,
                                 "statistic": statistic, "n_points": len(points)}
        try:
            law = fit_scaling_law([r["width"] for r in points], [r["depth"] for r in points],
                                  [r[statistic] for r in points], statistic=statistic,
                                  n_bootstrap=n_bootstrap, seed=seed)
            entry["fit"] = law.to_dict()
            fit_objs[name] = law
            log.info("scaling law %s at epoch %d:\n%s", name, at_epoch, law)
        except ValueError as err:
            entry["error"] = str(err)
            log.warning("scaling law %s: %s", name, err)
        fits[name] = entry
    summary = {"config_hash": chash, "n_measurements": len(meas), "fits": fits}
    write_json_atomic(out / "scaling_fit.json", summary)
    if report:
        from ..report import sweep_report   # the report layer sits above the sweep
        summary["report"] = str(sweep_report(meas, out, fits=fit_objs, statistic=statistic))
    return summary
