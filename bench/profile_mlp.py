"""Fused MLP products against the previous code and a plain gradient, interleaved.

Gradients per direction = time of one product of k directions / (k x time of one loss gradient,
forward + backward, same model and batch). The previous code is ``<ref>:landscape_ext/mlp/
products.py`` (``--ref``, default ``main``) loaded from git into this process, so both run
round by round under the same load.

    OMP_NUM_THREADS=<cores> python bench/profile_mlp.py --width 1024 --depth 8 --batch 512 \
        --k 16 --rounds 9 [--rows]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, markdown_table, write_results  # noqa: E402

import landscape_ext.mlp  # noqa: E402
from landscape_ext.mlp import products as new  # noqa: E402


def load_old(ref: str):
    """``products.py`` at git ``ref`` as a module of the package (its relative imports work)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.check_output(["git", "show", f"{ref}:landscape_ext/mlp/products.py"],
                                  cwd=root, text=True)
    name = "landscape_ext.mlp._products_old"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "landscape_ext.mlp"
    sys.modules[name] = mod
    exec(compile(src, f"{ref}:products.py", "exec"), mod.__dict__)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--act", default="gelu", choices=["gelu", "tanh", "relu"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ref", default="main")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--rows", action="store_true",
                    help="time mlp_apply_rows on contiguous (k, d) rows, the layout the operators "
                         "and solvers pass (default: mlp_hvp on a (d, k) block, which adds a "
                         "transpose copy of the directions)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dt = getattr(torch, args.dtype)
    act = {"gelu": nn.GELU, "tanh": nn.Tanh, "relu": nn.ReLU}[args.act]
    layers = []
    n = args.width
    for _ in range(args.depth - 1):
        layers += [nn.Linear(n, args.width), act()]
    layers.append(nn.Linear(args.width, args.classes))
    model = nn.Sequential(*layers).to(dt)
    x = torch.randn(args.batch, n, dtype=dt)
    y = torch.randint(0, args.classes, (args.batch,))
    params = [p for p in model.parameters()]
    d = sum(p.numel() for p in params)
    V = torch.randn(d, args.k, dtype=dt)
    old = load_old(args.ref)

    def grad():
        loss = nn.functional.cross_entropy(model(x), y)
        torch.autograd.grad(loss, params)

    fns = {"gradient": grad}
    if args.rows:   # the operators' layout: directions as contiguous rows (k, d)
        structure = landscape_ext.mlp.mlp_structure(model)
        named = {n: p.detach() for n, p in model.named_parameters()}
        X = V.T.contiguous()

        def product(mod, curv):
            return mod.mlp_apply_rows(structure, named, x, y, X, "cross_entropy", curv)
    else:           # mlp_hvp on a (d, k) column block: includes the transpose to rows
        def product(mod, curv):
            return mod.mlp_hvp(model, x, y, V, curvature=curv)
    for curv in ("hessian", "ggn"):
        for tag, mod in (("old", old), ("new", new)):
            fns[f"{curv}-{tag}"] = (lambda m=mod, c=curv: product(m, c))
        # correctness before timing
        a = product(old, curv)
        b = product(new, curv)
        err = float((a - b).norm() / a.norm())
        if err > (1e-4 if dt == torch.float32 else 1e-10):
            raise SystemExit(f"{curv}: new differs from old by {err:.2e} (relative)")
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, ts in times.items():
        if name == "gradient":
            continue
        ratios = [t / (args.k * g) for t, g in zip(ts, times["gradient"])]
        rows.append({"case": f"w{args.width} L{args.depth} B{args.batch} k{args.k} {args.act}",
                     "impl": name, "median_s": statistics.median(ts),
                     "grads_per_dir": statistics.median(ratios), "min": min(ratios),
                     "max": max(ratios)})
    for curv in ("hessian", "ggn"):
        r = [o / nw for o, nw in zip(times[f"{curv}-old"], times[f"{curv}-new"])]
        rows.append({"case": rows[0]["case"], "impl": f"{curv} old/new",
                     "grads_per_dir": statistics.median(r), "min": min(r), "max": max(r)})
    rows.insert(0, {"case": rows[0]["case"], "impl": "gradient",
                    "median_s": statistics.median(times["gradient"])})
    print(markdown_table(rows, ["case", "impl", "median_s", "grads_per_dir", "min", "max"]))
    write_results("profile_mlp" + ("_rows" if args.rows else ""), {"machine": machine_info("cpu"), "args": vars(args),
                                  "rows": rows, "times": times})


if __name__ == "__main__":
    main()
