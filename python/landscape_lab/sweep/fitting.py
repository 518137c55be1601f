"""Fitting a sweep: the scaling law ``statistic ~ c n^alpha exp(beta L)`` per architecture, data
set and optimizer over the merged results of one or several output directories, on the cells
that reached the training criterion, and the sweep report (see docs/sweep.md)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from landscape_ext.results import write_json_atomic

from .._results import PathLike
from ..scaling import fit_scaling_law
from . import store

__all__ = ["measurements", "final_measurements", "fit_points", "fit_sweep"]

log = logging.getLogger(__name__)


#: The fields a measurement record must have to be fitted and reported.
_REQUIRED_FIELDS = ("cell", "epoch", "dataset", "optimizer", "width", "depth")


def _unusable(r: Dict[str, Any]) -> Optional[str]:
    """Why measurement record ``r`` cannot be fitted (a field missing or of the wrong type), or
    None."""
    missing = [f for f in _REQUIRED_FIELDS if r.get(f) is None]
    if missing:
        return f"without {', '.join(missing)}"
    if not isinstance(r["cell"], str):
        return f"whose cell is {r['cell']!r}, not a string"
    for f in ("epoch", "width", "depth"):
        v = r[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
            return f"whose {f} is {v!r}, not an integer"
    return None


def measurements(records: Sequence[Dict[str, Any]], config_hash: Optional[str] = None,
                 where: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Measurement records (deduplicated by (cell, epoch, config_hash); the last wins), in the
    order of their last write, optionally of one ``config_hash``. A record without cell,
    epoch, dataset, optimizer, width or depth (or with a non-integer epoch, width or depth) is
    skipped with a warning naming it: ``where[i]`` (e.g. ``"results.jsonl:7"``) for
    ``records[i]``, else its position."""
    seen: Dict[Tuple[str, int, Optional[str]], Dict[str, Any]] = {}
    for i, r in enumerate(records):
        if r.get("kind") != "measurement":
            continue
        if config_hash is not None and r.get("config_hash") != config_hash:
            continue
        why = _unusable(r)
        if why is not None:
            log.warning("%s: skipping a measurement record %s (a measurement needs %s)",
                        where[i] if where is not None else f"record {i + 1}", why,
                        ", ".join(_REQUIRED_FIELDS))
            continue
        key = (r["cell"], int(r["epoch"]), r.get("config_hash"))
        seen.pop(key, None)
        seen[key] = r
    return list(seen.values())


def final_measurements(group: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Each cell's final measurement (where it stopped: at the criterion or ``max_epochs``; the
    last written when ``max_epochs`` changed), from records in the order of their writing (as
    :func:`measurements` returns them). Records of older versions, without ``final``, count as
    final at the group's last epoch."""
    last = max(int(r["epoch"]) for r in group)
    out: Dict[str, Dict[str, Any]] = {}
    for r in group:
        if r.get("final") if "final" in r else int(r["epoch"]) == last:
            out[r["cell"]] = r
    return out


def fit_points(group: Sequence[Dict[str, Any]], statistic: str, epoch: Optional[int] = None,
               fit_all: bool = False) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """The measurements a fit of ``statistic`` uses, and what was left out.

    ``epoch`` None: each cell's final measurement; else the measurements at that epoch. Unless
    ``fit_all``, cells whose final measurement did not reach the training criterion are left
    out (a fixed-epoch sweep has no criterion and keeps every cell). Points whose statistic is
    missing or not positive are left out too (the law is fitted in log space).

    Returns
    -------
    (list of dict, dict)
        The points, and ``{"n_cells", "n_not_reached", "not_reached", "n_unusable",
        "criterion"}``.
    """
    finals = final_measurements(group)
    if epoch is None:
        candidates = list(finals.values())
    else:
        candidates = [r for r in group if int(r["epoch"]) == int(epoch)]
    not_reached = sorted(c for c, r in finals.items() if r.get("reached_criterion") is False)
    if not fit_all:
        left_out = set(not_reached)
        candidates = [r for r in candidates if r["cell"] not in left_out]
    points = [r for r in candidates if r.get(statistic) is not None and r[statistic] > 0]
    criterion = next((r.get("criterion") for r in finals.values() if r.get("criterion")), None)
    info = {"n_cells": len(finals), "n_not_reached": len(not_reached),
            "not_reached": not_reached, "n_unusable": len(candidates) - len(points),
            "criterion": criterion}
    return sorted(points, key=lambda r: r["cell"]), info


def _weights(points: Sequence[Dict[str, Any]], statistic: str) -> Tuple[Optional[List[float]],
                                                                        str]:
    """Inverse-variance weights of log(value), ``(value / sd)^2`` from the batch-to-batch sds;
    (None, why) when a point has no positive sd."""
    sds = [r.get(f"{statistic}_batch_sd") for r in points]
    if any(sd is None or not sd > 0 for sd in sds):
        return None, (f"not weighted: {sum(sd is None or not sd > 0 for sd in sds)} of "
                      f"{len(points)} points have no batch-to-batch sd of {statistic} "
                      f"(spread_batches < 2)")
    return [(r[statistic] / sd) ** 2 for r, sd in zip(points, sds)], ""


def _fit_group(group: Sequence[Dict[str, Any]], statistic: str, epoch: Optional[int],
               fit_all: bool, weighted: bool, n_bootstrap: int, seed: int
               ) -> Tuple[Dict[str, Any], Optional[Any]]:
    """The fit entry of one group (what was used and left out) and its ScalingFit (None when
    the fit failed)."""
    first = group[0]
    points, info = fit_points(group, statistic, epoch, fit_all)
    entry: Dict[str, Any] = {"model": first.get("model", "mlp"), "dataset": first["dataset"],
                             "optimizer": first["optimizer"],
                             "epoch": "final" if epoch is None else int(epoch),
                             "statistic": statistic, "n_points": len(points), **info,
                             "fit_all": fit_all, "weighted": False}
    weights = None
    if weighted and points:
        weights, why = _weights(points, statistic)
        entry["weighted"] = weights is not None
        if why:
            entry["weight_note"] = why
    try:
        law = fit_scaling_law([r["width"] for r in points], [r["depth"] for r in points],
                              [r[statistic] for r in points], statistic=statistic,
                              n_bootstrap=n_bootstrap, seed=seed, weights=weights)
    except ValueError as err:
        entry["error"] = str(err)
        if info["n_not_reached"] and not fit_all:
            entry["error"] += (f"; {info['n_not_reached']} of {info['n_cells']} cells were left "
                               f"out for not reaching {info['criterion']} (--fit-all keeps them)")
        return entry, None
    entry["fit"] = law.to_dict()
    return entry, law


def _sources(out: Path, sources: Optional[Sequence[PathLike]]) -> List[Path]:
    """The directories whose results are fitted: ``sources``, else ``out``; each must hold a
    sweep (``sweep_config.json``)."""
    dirs = [Path(s) for s in sources] if sources else [out]
    for d in dirs:
        if not (d / "sweep_config.json").exists():
            raise ValueError(f"fit_sweep: {d} is not a sweep output directory (no "
                             f"sweep_config.json)")
    return dirs


def fit_sweep(out_dir: PathLike, *, statistic: str = "spectral_norm", epoch: Optional[int] = None,
              n_bootstrap: int = 1000, report: bool = True, seed: int = 0,
              fit_all: bool = False, weighted: bool = False,
              sources: Optional[Sequence[PathLike]] = None) -> Dict[str, Any]:
    """Fit ``statistic ~ c n^alpha exp(beta L)`` per (model, data set, optimizer) and write
    ``scaling_fit.json`` and, with ``report``, the sweep report to ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Where the fit and the report are written; also the sweep fitted unless ``sources``.
    statistic : str
        A positive field of the measurements (``spectral_norm``, ``lambda_max``, ``trace``,
        ``grad_effective_rank``, ``phi``).
    epoch : int, optional
        Fit the measurements at this epoch (a trajectory point) instead of each cell's final
        one.
    n_bootstrap, seed : int
        Bootstrap replicates and seed of the confidence intervals.
    report : bool
    fit_all : bool
        Also fit the cells that did not reach the training criterion (by default they are left
        out, and the entry says how many: ``n_not_reached``).
    weighted : bool
        Weight each point by ``(value / <statistic>_batch_sd)^2`` (its inverse variance in log
        space); unweighted, with a ``weight_note``, when a point has no sd.
    sources : list of paths, optional
        Sweep directories to fit together (e.g. one per architecture), each with the records of
        its latest ``sweep_config.json``; default ``[out_dir]``. Groups of the same name from
        different directories get ``@<directory name>`` appended.

    Returns
    -------
    dict
        ``{"config_hash", "sources", "n_measurements", "fits": {group: entry}, ...}``; an entry
        holds the fit (``fit``) or why there is none (``error``).
    """
    out = Path(out_dir)
    dirs = _sources(out, sources)
    meas: List[Dict[str, Any]] = []
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for d in dirs:
        located = store._located_results(d)
        recs = measurements([r for _, r in located], store._config_hash(d),
                            where=[w for w, _ in located])
        meas.extend(recs)
        own: Dict[str, List[Dict[str, Any]]] = {}
        for r in recs:
            own.setdefault(f"{r.get('model', 'mlp')}|{r['dataset']}|{r['optimizer']}",
                           []).append(r)
        for name, group in own.items():
            groups[name if name not in groups else f"{name}@{d.name}"] = group
    if not meas:
        raise ValueError(f"fit_sweep: no measurements in {', '.join(map(str, dirs))} "
                         f"(results.jsonl)")
    fits: Dict[str, Any] = {}
    fit_objs: Dict[str, Any] = {}
    for name, group in sorted(groups.items()):
        entry, law = _fit_group(group, statistic, epoch, fit_all, weighted, n_bootstrap, seed)
        if len(dirs) > 1:
            entry["source"] = str(next(d for d in dirs if _holds(d, group[0])))
        fits[name] = entry
        if law is not None:
            fit_objs[name] = law
            log.info("scaling law %s:\n%s", name, law)
        else:
            log.warning("scaling law %s: %s", name, entry["error"])
        if entry["n_not_reached"] and not fit_all and law is not None:
            log.warning("scaling law %s: %d of %d cells did not reach %s and are left out "
                        "(--fit-all keeps them)", name, entry["n_not_reached"],
                        entry["n_cells"], entry["criterion"])
    summary = {"config_hash": store._config_hash(dirs[0]),
               "sources": [str(d) for d in dirs], "n_measurements": len(meas),
               "statistic": statistic, "fit_all": fit_all, "weighted": weighted, "fits": fits}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "scaling_fit.json", summary)
    if report:
        from ..report import sweep_report   # the report layer sits above the sweep
        grouped = [dict(r, group=name) for name, group in groups.items() for r in group]
        summary["report"] = str(sweep_report(grouped, out, fits=fit_objs, statistic=statistic,
                                             entries=fits))
    return summary


def _holds(d: Path, record: Dict[str, Any]) -> bool:
    """Whether sweep directory ``d``'s latest settings made ``record``."""
    return store._config_hash(d) == record.get("config_hash")
