"""Two builds of landscape-ext, same benchmarks, alternating processes: did a build change move
the kernels' speed?

Two builds cannot share one process (both register the ``landscape_ext`` ops), so the runs
alternate instead (A B A B ..., the order flipped every round), each build in its own python
(two venvs). Per benchmark row the table gives each build's median time over the rounds, its
range, and the ratio new / old with the range of the per-round ratios: within the rounds' spread
means "unchanged within noise".

    python bench/compare_builds.py --old ~/.cache/landscape-ext/venvs/base-2.13/bin/python \
        --new .venv/bin/python --rounds 3 --out bench/results/stable_abi_cpu.json

Benchmarks (``--benches``): krylov (bench_krylov.py --quick), krylov_tiny (--tiny: d = 1e4,
where a call's fixed cost shows), sketch (bench_sketch.py --quick),
hvp (bench_hvp.py --quick --sections act,xent: the op sections; the mlp/models sections time
autograd, which a build change does not touch). Run with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = {
    "krylov": (["bench_krylov.py", "--quick"], ("op", "d", "m", "b", "basis", "impl"), "median_ms"),
    # d = 1e4: where a call's fixed cost (the Python driver since the stable-ABI port) shows
    "krylov_tiny": (["bench_krylov.py", "--tiny"], ("op", "d", "m", "b", "basis", "impl"),
                    "median_ms"),
    "sketch": (["bench_sketch.py", "--quick"], None, None),
    "hvp": (["bench_hvp.py", "--quick", "--sections", "act,xent"], ("case", "impl"), "ms"),
}


def _time_key(row: dict) -> str:
    for key in ("median_ms", "ms", "median ms", "time_ms"):
        if key in row:
            return key
    raise KeyError(f"no time column in {sorted(row)}")


def _row_key(row: dict, fields) -> Tuple:
    if fields is None:  # every non-numeric column names the case
        return tuple((k, v) for k, v in sorted(row.items()) if isinstance(v, str))
    return tuple((f, row.get(f)) for f in fields)


def run_once(python: str, bench: str, out_dir: str, threads: int) -> List[dict]:
    args, _, _ = BENCHES[bench]
    name = f"{bench}_{os.getpid()}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [python, os.path.join(HERE, args[0]), *args[1:], "--out", out_dir, "--name", name]
    where = subprocess.run([python, "-c", "import landscape_ext; print(landscape_ext.__file__)"],
                           capture_output=True, text=True, check=True, cwd=out_dir).stdout.strip()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out_dir, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    path = os.path.join(out_dir, name + ".json")
    with open(path) as f:
        rows = json.load(f)["rows"]
    os.remove(path)
    for row in rows:
        row["_library"] = where
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="python of the venv with the old build")
    p.add_argument("--new", required=True, help="python of the venv with the new build")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--benches", default="krylov,krylov_tiny,sketch,hvp")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=None, help="JSON file for the table")
    args = p.parse_args(argv)
    args.old, args.new = os.path.abspath(args.old), os.path.abspath(args.new)
    benches = args.benches.split(",")
    times: Dict[Tuple, Dict[str, List[float]]] = {}
    libraries = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = ("old", "new") if rnd % 2 == 0 else ("new", "old")
            for bench in benches:
                for which in order:
                    python = args.old if which == "old" else args.new
                    for row in run_once(python, bench, tmp, args.threads):
                        libraries[which] = row.pop("_library")
                        key = (bench,) + _row_key(row, BENCHES[bench][1])
                        times.setdefault(key, {"old": [], "new": []})[which].append(
                            float(row[_time_key(row)]))
                print(f"round {rnd + 1}/{args.rounds}: {bench} done", flush=True)
    rows = []
    for key, t in times.items():
        if len(t["old"]) != len(t["new"]) or not t["old"]:
            continue
        ratios = [n / o for n, o in zip(t["new"], t["old"]) if o > 0]
        rows.append({
            "bench": key[0], "case": " ".join(f"{v}" for _, v in key[1:]),
            "old_ms": statistics.median(t["old"]), "old_range": [min(t["old"]), max(t["old"])],
            "new_ms": statistics.median(t["new"]), "new_range": [min(t["new"]), max(t["new"])],
            "ratio_new_over_old": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
        })
    print(f"\nold: {libraries.get('old')}\nnew: {libraries.get('new')}\n")
    print("| bench | case | old ms | new ms | new / old (range over rounds) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bench']} | {r['case']} | {r['old_ms']:.3g} | {r['new_ms']:.3g} | "
              f"{r['ratio_new_over_old']:.2f} ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) |")
    ratios = [r["ratio_new_over_old"] for r in rows]
    if ratios:
        print(f"\nmedian ratio over {len(rows)} rows: {statistics.median(ratios):.3f} "
              f"(rows {min(ratios):.2f}-{max(ratios):.2f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rounds": args.rounds, "threads": args.threads, "libraries": libraries,
                       "python": {"old": args.old, "new": args.new}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
