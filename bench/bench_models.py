"""The models section of ``bench_hvp.py``: Hessian products of whole models, per product mode,
against one gradient, interleaved (issue 18, item 4).

Models (builders of ``bench_spectrum.py``): ``small_resnet``, a residual CNN (BasicBlocks
32/64/128, BatchNorm in eval mode, 32x32 inputs, batch 64, d ~ 0.31M); ``tiny_lm``, a 2-layer
causal transformer LM (width 64, SDPA attention, 32 sequences of 32 tokens, d = 135,168).

Per model and k (default 1, 8, 32), in one call of :func:`common.paired_rounds` (``--rounds``
rounds, order rotated each round): a gradient (forward + backward of the batch-mean loss, the
unit) and, per mode (``auto``, ``forward-over-reverse``, ``double-backward``,
``double-backward-loop``), the product of k directions through a ``HessianOperator`` built once
per (model, mode) and kept across the k's (a single batch: the double-backward modes keep their
first-order graph between products, as in a Lanczos run). ``auto`` measures its candidates on
its first product of a bucket of k (the first of several directions, the second of one); that
product and the correctness check are done before the timed rounds, so the rounds time the
mode ``auto`` settled on; its choices and probe estimates (``op.mode_choices``,
``op.mode_timings``) are in the JSON.

Correctness first: each mode's product, first direction, against a float64 double-backward
product on a deep copy of the model (relative error < 1e-4, asserted).

Columns: ``grad/dir`` median over the rounds of ``product seconds / (k x the same round's
gradient seconds)``; ``range`` its min-max; ``ms`` median seconds of one product (all k
directions); ``peak MB`` peak memory of the first product of a freshly built operator above
the memory in use before it (``common.peak_call``; ``auto``: that of the mode it picked;
skipped with ``--no-memory``); ``auto picked`` auto's mode for the bucket of k; ``vs previous``
(``auto`` row) median (range) of the per-round ratio of auto's time to the previous rule's;
``rel err`` the correctness check. The row ``previous auto`` is the rule before issue 18
(double backward for k < 4, forward-over-reverse for k >= 4): it repeats that forced mode's
numbers.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench_spectrum import small_resnet, tiny_lm
from common import fmt_range, paired_rounds, peak_call, ratio_summary

import landscape_ext as le
from landscape_ext.operators.modes import bucket_of

MODEL_NAMES = ("small_resnet", "tiny_lm")
MODEL_MODES = ("auto", "forward-over-reverse", "double-backward", "double-backward-loop")
#: modes measured on request (``--model-modes``): ``<mode>+compile`` is that mode with
#: ``compile=True`` (forward-over-reverse under torch.compile), the evidence for
#: ``operators.model.COMPILE_DEFAULT``
COMPILED_MODES = ("forward-over-reverse+compile", "auto+compile")
MODEL_COLUMNS = ["model", "d", "k", "mode", "grad/dir", "range", "ms", "peak MB", "auto picked",
                 "vs previous", "rel err"]
#: the largest relative error of a mode's product against the float64 product
REL_TOL = 1e-4
#: the same for the compiled modes: in float32 the generated kernels round differently (the
#: residual CNN's compiled product is 3.4e-4 off at batch 64, float64 compiled 1.6e-15); the
#: error is reported in the row's ``rel err``
REL_TOL_COMPILED = 1e-3


def previous_auto(k: int) -> str:
    """The ``auto`` rule before issue 18 (cached graph, one batch): double backward below four
    directions, forward-over-reverse from four on."""
    return "double-backward" if k < 4 else "forward-over-reverse"


def build_model(name: str, device: str, batch: Optional[int] = None,
                train_steps: Optional[int] = None) -> Tuple[torch.nn.Module, Any, Tuple]:
    """``(model, loss_fn, (inputs, targets))`` of a named model (``bench_spectrum.py``'s
    builders); ``batch``/``train_steps`` override the builder's defaults."""
    builders = {"small_resnet": small_resnet, "tiny_lm": tiny_lm}
    if name not in builders:
        raise ValueError(f"--models: unknown model {name!r}; choose from {list(builders)}")
    kw: Dict[str, int] = {}
    if batch is not None:
        kw["batch"] = int(batch)
    if train_steps is not None:
        kw["train_steps"] = int(train_steps)
    return builders[name](device, **kw)


def gradient_fn(model, loss_fn, data) -> Callable[[], object]:
    """One gradient of the batch-mean loss (forward + backward): the unit of the products."""
    X, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda: torch.autograd.grad(loss_fn(model(X), y), params)


def reference_row(model, loss_fn, data, v: torch.Tensor) -> torch.Tensor:
    """The float64 Hessian product of the direction ``v`` (d,) by double backward on a deep
    copy of the model (the model itself is left as it is)."""
    model64 = copy.deepcopy(model).double()
    X, y = data
    data64 = (X.double() if X.is_floating_point() else X, y)
    op64 = le.HessianOperator(model64, loss_fn, data64, mode="double-backward")
    return op64.apply_rows(v.double().reshape(1, -1))[0]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm())


def make_operator(model, loss_fn, data, mode: str):
    """The operator of a mode name (``<mode>+compile``: that mode with ``compile=True``)."""
    base, _, compiled = mode.partition("+")
    return le.HessianOperator(model, loss_fn, data, mode=base, compile=compiled == "compile")


def _peaks(model, loss_fn, data, V, modes: Sequence[str], device: str) -> Dict[str, float]:
    """Peak MB of the first product of a fresh operator per mode (graph build included)."""
    out: Dict[str, float] = {}
    for mode in modes:
        op = make_operator(model, loss_fn, data, mode)
        out[mode] = peak_call(lambda: op.apply_rows(V), device)[2]
        del op
    return out


def bench_model_k(name: str, model, loss_fn, data, ops: Dict[str, Any], k: int, V_all,
                  ref: torch.Tensor, rounds: int, device: str,
                  memory: bool) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """The rows of one model at one k: the gradient, each mode, ``previous auto``."""
    d = V_all.shape[1]
    V = V_all[:k].contiguous()
    errs: Dict[str, float] = {}
    first_s: Dict[str, float] = {}
    for mode, op in ops.items():   # correctness first (auto: its first product of this bucket)
        t0 = time.perf_counter()
        first = op.apply_rows(V)
        first_s[mode] = time.perf_counter() - t0   # with compile: the compilation's cost
        errs[mode] = _rel_err(first[0], ref)
        del first
        tol = REL_TOL_COMPILED if mode.endswith("+compile") else REL_TOL
        assert errs[mode] < tol, (f"{name} k={k} {mode}: relative error {errs[mode]:.2e} "
                                  f"against the float64 product (limit {tol:g})")
    bucket = bucket_of(k)
    if "auto" in ops and bucket not in ops["auto"].mode_choices:
        ops["auto"].apply_rows(V)  # one direction: auto measures on its second product
    fns = {"gradient": gradient_fn(model, loss_fn, data)}
    fns.update({mode: (lambda op=op: op.apply_rows(V)) for mode, op in ops.items()})
    times = paired_rounds(fns, rounds, device)
    unit = [k * g for g in times["gradient"]]
    picked = ops["auto"].mode_choices.get(bucket) if "auto" in ops else None
    peaks: Dict[str, float] = {}
    if memory:
        peaks["gradient"] = peak_call(fns["gradient"], device)[2]
        forced = [m for m in ops if m != "auto"]
        if picked is not None and picked not in forced:
            forced.append(picked)
        peaks.update(_peaks(model, loss_fn, data, V, forced, device))
        if picked is not None:
            peaks["auto"] = peaks[picked]
    rows = [{"model": name, "d": d, "k": k, "mode": "gradient (unit)", "grad/dir": 1.0,
             "ms": statistics.median(times["gradient"]) * 1e3, "peak MB": peaks.get("gradient")}]
    summaries: Dict[str, Dict[str, float]] = {}
    for mode in ops:
        s = summaries[mode] = ratio_summary(times[mode], unit)
        row = {"model": name, "d": d, "k": k, "mode": mode, "grad/dir": s["median"],
               "range": f"{s['min']:.3g}-{s['max']:.3g}", "grad/dir min": s["min"],
               "grad/dir max": s["max"], "ms": statistics.median(times[mode]) * 1e3,
               "peak MB": peaks.get(mode), "rel err": errs[mode], "rounds": s["n"]}
        if mode == "auto":
            row["auto picked"] = picked
            prev = previous_auto(k)
            if prev in times:
                vs = ratio_summary(times["auto"], times[prev])
                row["vs previous"] = fmt_range(vs)
                row["vs previous median"] = vs["median"]
        rows.append(row)
    prev = previous_auto(k)
    if prev in ops:
        same = next(r for r in rows if r["mode"] == prev)
        rows.append(dict(same, mode=f"previous auto (= {prev})"))
    detail = {"times_s": times, "grad_per_dir": summaries, "rel_err": errs, "peak_mb": peaks,
              "auto_picked": picked, "first_call_s": first_s}
    if "auto" in ops:
        detail["auto_mode_choices"] = dict(ops["auto"].mode_choices)
        detail["auto_mode_timings"] = copy.deepcopy(ops["auto"].mode_timings)
        detail["auto_mode_used"] = ops["auto"].mode_used
    return rows, detail


def bench_model(name: str, ks: Sequence[int], modes: Sequence[str], rounds: int, device: str,
                memory: bool = True, batch: Optional[int] = None,
                train_steps: Optional[int] = None) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """All rows of one model: operators built once per mode, then each k in turn."""
    for mode in modes:
        if mode not in MODEL_MODES + COMPILED_MODES:
            raise ValueError(f"--model-modes: unknown mode {mode!r}; choose from "
                             f"{list(MODEL_MODES + COMPILED_MODES)}")
    model, loss_fn, data = build_model(name, device, batch, train_steps)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    V_all = torch.randn(max(ks), d, generator=torch.Generator().manual_seed(0)).to(device)
    ref = reference_row(model, loss_fn, data, V_all[0])   # direction 0 is the same for every k
    ops = {mode: make_operator(model, loss_fn, data, mode) for mode in modes}
    rows: List[Dict[str, Any]] = []
    detail: Dict[str, Any] = {"d": d, "batch": int(data[0].shape[0]), "ks": {}}
    for k in ks:
        k_rows, detail["ks"][k] = bench_model_k(name, model, loss_fn, data, ops, k, V_all, ref,
                                                rounds, device, memory)
        rows += k_rows
        auto = next((r for r in k_rows if r["mode"] == "auto"), None)
        print(f"  {name} d={d} k={k}: " + ", ".join(
            f"{r['mode']} {r['grad/dir']:.2f}" for r in k_rows if r["mode"] in modes)
            + (f" (auto picked {auto['auto picked']})" if auto else ""), flush=True)
    return rows, detail


def models_section(names: Sequence[str], ks: Sequence[int], modes: Sequence[str], rounds: int,
                   device: str, memory: bool = True, batch: Optional[Dict[str, int]] = None,
                   train_steps: Optional[int] = None) -> Tuple[List[Dict[str, Any]],
                                                               Dict[str, Any]]:
    """Rows and JSON detail of every model (``batch``: per-model batch overrides)."""
    if not ks or min(ks) < 1:
        raise ValueError(f"--model-ks: every k must be >= 1, got {list(ks)}")
    rows: List[Dict[str, Any]] = []
    detail: Dict[str, Any] = {}
    for name in names:
        r, detail[name] = bench_model(name, ks, modes, rounds, device, memory,
                                      (batch or {}).get(name), train_steps)
        rows += r
    return rows, detail
