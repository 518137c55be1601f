"""Benchmark the sketch ops: the kernel against the composite and against materialized
per-sample gradients, side by side in one run.

    python bench/bench_sketch.py                 # CPU grid
    python bench/bench_sketch.py --quick         # two shapes
    python bench/bench_sketch.py --device cuda

For a Linear layer with N samples (T positions each), n_in -> n_out and l directions, with G the
N x (n_out n_in) matrix of per-sample gradients:

  linear_grad_sketch   y = G V^T   (N, l)
  linear_grad_project  P = G^T W   (l, n_out, n_in)

each by
  * fused         ``ops.<op>(..., impl="fused")``: the registered kernel (for linear_grad_project
                  chunked ATen GEMMs);
  * composite     ``ops.<op>(..., impl="composite")``: the einsum reference, the baseline of the
                  ratio column (composite time / this time);
  * materialized  G formed by ``reference.per_sample_linear_grads``, then one GEMM (what a
                  per-sample-gradient pipeline does; forming G is timed). Skipped above
                  ``--max-materialized-mb`` of G.

Correctness first: every impl against the float64 reference. The impls of one shape are timed
interleaved (median of ``--repeats`` rounds). GFLOP/s counts the 2 N T l n_in n_out multiply-adds
of the direct formula, whatever the impl does.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, markdown_table, time_interleaved, write_results  # noqa: E402

import landscape_ext  # noqa: E402
from landscape_ext import ops, reference  # noqa: E402

# (N, T or None, n_in, n_out, l): the layers of bench_gradients.py's MLPs, a wide layer, a
# sequence layer (T = 16, direct route) and a narrow output layer
SHAPES = [(512, None, 784, 320, 42), (512, None, 320, 128, 42), (256, None, 1024, 1024, 42),
          (64, 16, 256, 256, 42), (2048, None, 128, 10, 42)]
QUICK_SHAPES = [(512, None, 784, 320, 42), (64, 16, 256, 256, 42)]


def impls(op: str, A, E, third, materialize: bool):
    """name -> callable for one op; ``third`` is V (sketch) or W (project)."""
    fn = getattr(ops, op)
    out = {"fused": lambda: fn(A, E, third, impl="fused"),
           "composite": lambda: fn(A, E, third, impl="composite")}
    if materialize:
        N = A.shape[0]
        if op == "linear_grad_sketch":
            out["materialized"] = lambda: (reference.per_sample_linear_grads(A, E).reshape(N, -1)
                                           @ third.reshape(third.shape[0], -1).T)
        else:
            out["materialized"] = lambda: (third.T @ reference.per_sample_linear_grads(A, E)
                                           .reshape(N, -1)).view(-1, E.shape[-1], A.shape[-1])
    return out


def check(op: str, fns, A, E, third) -> None:
    """Every impl against the float64 reference (relative Frobenius error)."""
    want = getattr(reference, op)(A.double(), E.double(), third.double())
    for name, fn in fns.items():
        err = ((fn().double() - want).norm() / want.norm()).item()
        assert err < 1e-5, f"{op} ({name}) disagrees with the float64 reference: {err:.2e}"


def bench_shape(shape, device, repeats, max_materialized_mb):
    N, T, n_in, n_out, l = shape
    g = torch.Generator().manual_seed(0)
    lead = (N,) if T is None else (N, T)
    A = torch.randn(*lead, n_in, generator=g).to(device)
    E = torch.randn(*lead, n_out, generator=g).to(device)
    V = torch.randn(l, n_out, n_in, generator=g).to(device)
    W = torch.randn(N, l, generator=g).to(device)
    g_mb = N * n_out * n_in * A.element_size() / 2**20
    materialize = g_mb <= max_materialized_mb
    flops = 2 * N * (T or 1) * l * n_in * n_out
    label = f"N={N} T={T or 1} {n_in}->{n_out} l={l}"
    rows = []
    for op, third in (("linear_grad_sketch", V), ("linear_grad_project", W)):
        fns = impls(op, A, E, third, materialize)
        check(op, fns, A, E, third)
        times = time_interleaved(fns, device, repeats)
        for name, t in times.items():
            rows.append({"op": op, "shape": label, "impl": name, "median_ms": t * 1e3,
                         "GFLOP/s": flops / t / 1e9, "vs composite": times["composite"] / t,
                         "note": None})
        if not materialize:
            rows.append({"op": op, "shape": label, "impl": "materialized", "median_ms": None,
                         "GFLOP/s": None, "vs composite": None,
                         "note": f"skipped: G would take {g_mb:.0f} MB"})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="two representative shapes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-materialized-mb", type=float, default=1024.0,
                   help="largest per-sample gradient matrix G the materialized impl may form")
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    p.add_argument("--name", default=None, help="JSON file name (default sketch_<device>)")
    args = p.parse_args(argv)
    info = machine_info(args.device)
    info["build"] = landscape_ext.build_info()
    print(f"# sketch ops on {info['device_name']} ({args.device}), torch {info['torch']}, "
          f"{info['cpu_threads']} threads")
    rows = []
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        new = bench_shape(shape, args.device, args.repeats, args.max_materialized_mb)
        table = markdown_table(new, list(new[0].keys()))
        print(table if not rows else table.split("\n", 2)[2], flush=True)  # header once
        rows += new
    print()
    print(markdown_table(rows, list(rows[0].keys())))
    dev = args.device.split(":")[0]
    name = args.name or f"sketch_{dev}" + ("_quick" if args.quick else "")
    path = write_results(name, {"machine": info, "rows": rows}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
