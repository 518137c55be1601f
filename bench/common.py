"""Shared helpers for the benchmarks: timing, machine facts, tables and result files.

Timing rules (STYLE.md): check correctness before timing, warm up, take the median of several
repeats, never time allocation of the inputs, synchronize CUDA around each measurement.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str = "cpu", warmup: int = 1, repeats: int = 5,
            min_time_s: float = 0.0) -> Dict[str, float]:
    """Median / min wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    t_start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_start) < min_time_s:
        if str(device).startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str = "cpu",
                     repeats: int = 5) -> Dict[str, float]:
    """Median seconds of each of ``fns`` over ``repeats`` rounds. Each fn is called once to warm
    up, then every round calls each fn once, so load on a shared machine hits all alike."""
    for fn in fns.values():
        fn()
    sync(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_fn(fn, device, warmup=0, repeats=1)["median_s"])
    return {name: statistics.median(t) for name, t in times.items()}


def paired_rounds(fns: Dict[str, Callable[[], object]], rounds: int, device: str = "cpu",
                  warmup: bool = True) -> Dict[str, List[float]]:
    """Seconds per call of each of ``fns``, measured in interleaved rounds.

    Each fn is called once to warm up (unless ``warmup`` is False: the caller has already
    called each one), then every round calls every fn once. The order rotates by one each
    round (round ``r`` starts with the ``r``-th fn), so that no fn always runs first, right
    after another's allocations or at the start of a slow spell. On a shared machine load hits
    all fns of a round alike: compare them by per-round ratios (:func:`ratio_summary`), not by
    ratios of medians taken at different times.

    Parameters
    ----------
    fns : dict
        ``{name: fn}``; ``fn()`` is one call (its result is dropped).
    rounds : int
        Number of rounds (>= 1).
    device : str
        A CUDA device is synchronized before and after each call (launches are asynchronous).
    warmup : bool
        Call each fn once before the rounds.

    Returns
    -------
    dict
        ``{name: [seconds of the call in round 0, round 1, ...]}`` (``rounds`` entries each).
    """
    if int(rounds) < 1:
        raise ValueError(f"paired_rounds: rounds must be >= 1, got {rounds}")
    names = list(fns)
    if warmup:
        for name in names:
            fns[name]()
    sync(device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(int(rounds)):
        shift = r % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_summary(num: Sequence[float], den: Sequence[float]) -> Dict[str, float]:
    """Median, min and max of the per-round ratios ``num[i] / den[i]`` (``n``: the rounds).

    Paired by round (both measured in the same round of :func:`paired_rounds`), so a slow
    spell of a shared machine that slows both cancels out of each ratio; the range shows how
    much it did not.
    """
    if len(num) != len(den) or not num:
        raise ValueError(f"ratio_summary: num and den must be non-empty and of equal length, "
                         f"got {len(num)} and {len(den)}")
    ratios = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "n": len(ratios)}


def fmt_range(summary: Dict[str, float]) -> str:
    """``"2.31 (2.20-2.52)"``: the median and range of a :func:`ratio_summary`."""
    return f"{summary['median']:.3g} ({summary['min']:.3g}-{summary['max']:.3g})"


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_call(fn: Callable[[], object], device: str):
    """Run ``fn()`` once; return ``(result, seconds, peak MB above the memory in use before)``.

    GPU: from ``torch.cuda.max_memory_allocated``. CPU: from the process's peak RSS, reset
    before the call through ``/proc/self/clear_refs``; freed buffers leave the RSS only with
    glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``, set by bench_hvp.py before it
    starts), else memory reused from the heap is not counted.
    """
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    dt = time.perf_counter() - t0
    if str(device).startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _status_mb("VmHWM") - base
    return out, dt, peak


def copy_bandwidth_gbs(device: str = "cpu", n_bytes: int = 1 << 29) -> float:
    """Measured device copy bandwidth in GB/s (read + write bytes per second), the roofline that
    memory-bound kernels are judged against."""
    n = n_bytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=2, repeats=7)["median_s"]
    return 2 * n * 4 / t / 1e9


def git_sha() -> Optional[str]:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return None


def machine_info(device: str = "cpu") -> Dict[str, object]:
    info: Dict[str, object] = {
        "device": device,
        "device_name": (torch.cuda.get_device_name() if str(device).startswith("cuda")
                        else platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not str(device).startswith("cuda"):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        info["device_name"] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return info


def markdown_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, payload: Dict[str, object], out_dir: Optional[str] = None) -> str:
    """Write ``payload`` as JSON to ``bench/results/<name>.json`` (or ``out_dir``)."""
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    return path
