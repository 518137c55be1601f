"""Data-parallel curvature: one process against W ranks on the same data, side by side.

    python bench/bench_distributed.py                 # W = 1, 2 on the CPU (gloo)
    python bench/bench_distributed.py --quick         # fewer repeats, top-5
    python bench/bench_distributed.py --world 1 2 4 --device cuda   # NCCL, one GPU per rank

Case: the digits MLP 64-512-512-10 (tanh, d = 301,066) on all 1,797 samples, sharded over the
ranks in contiguous, uneven pieces (batches of 512). Every configuration runs in fresh spawned
processes (a W = 1 run is a single process without a process group: the baseline); on the CPU
each rank gets ``--threads-total / W`` threads, so every row uses the same cores.

Columns: ``ms/dir`` median wall time of one product divided by its k directions (k = 1 and
``--block``); ``comm ms`` the part of that product spent in collectives (the all-reduce of the
k x d product plus the two status exchanges, timed by wrapping them); ``MB/dir sent`` the payload
handed to all-reduce per direction on each rank and, beside it, the ring all-reduce traffic
``2 (W-1)/W`` times that; ``eigsh s`` and ``HVPs`` for the top-k; ``max rel diff`` of the
eigenvalues against the W = 1 run (the only difference is floating-point summation order).

``--fsdp`` adds the FSDP2 case (``fully_shard`` on every Linear and the root, W >= 2): the
sharded operator's products are central differences of FSDP2's gradients (two forward and
backward passes per direction), so its rows add the median and range over ``--repeats`` products, ``FSDP coll. ms/dir`` /
``FSDP MB/dir`` (per direction: the
all-gathers and reduce-scatters FSDP2 makes, timed and counted by wrapping its default
collectives) and ``fd rel err``: the relative error of the finite-difference products against
the exact product of the unsharded model on all the data. ``--hidden 32`` makes the case tiny
(what the test machine runs; timings are taken on a quiet machine).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, markdown_table, write_results  # noqa: E402


def _case(device, hidden=512):
    from torch import nn
    from landscape_lab.data import load_digits
    ds = load_digits(seed=0)
    x = torch.cat([ds.x_train, ds.x_test])
    y = torch.cat([ds.y_train, ds.y_test])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(),
                          nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(device)
    return model, x.to(device), y.to(device)


def _worker(rank, world, tmp, args, queue):
    import landscape_ext as le
    from landscape_ext import distributed as ld
    from torch.nn import functional as F

    dev = "cpu"
    group = None
    if world > 1:
        import torch.distributed as dist
        backend = "nccl" if args.device == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{tmp}/init", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=10))
        group = dist.group.WORLD
    if args.device == "cuda":
        dev = f"cuda:{rank}" if world > 1 else "cuda:0"
    torch.set_num_threads(max(1, args.threads_total // world))
    model, x, y = _case(dev, args.hidden)
    n = x.shape[0]
    lo, hi = n * rank // world, n * (rank + 1) // world
    shard = [(x[s:min(s + 512, hi)], y[s:min(s + 512, hi)]) for s in range(lo, hi, 512)]

    comm = {"s": 0.0, "bytes": 0}
    if group is not None:  # time and count what the operator hands to the collectives
        orig_reduce, orig_status = ld.all_reduce_sum_, ld.exchange_status

        def reduce_(t, g):
            t0 = time.perf_counter()
            out = orig_reduce(t, g)
            if t.is_cuda:
                torch.cuda.synchronize()
            comm["s"] += time.perf_counter() - t0
            comm["bytes"] += t.numel() * t.element_size()
            return out

        def status(*a, **kw):
            t0 = time.perf_counter()
            out = orig_status(*a, **kw)
            comm["s"] += time.perf_counter() - t0
            return out

        ld.all_reduce_sum_, ld.exchange_status = reduce_, status

    op = le.HessianOperator(model, F.cross_entropy, shard, process_group=group,
                            mode=args.mode)
    d = op.d
    rows = []
    for k in (1, args.block):
        V = torch.randn(d, k, generator=torch.Generator().manual_seed(k), device="cpu").to(dev)
        op @ V  # warm-up (first pass also fingerprints the data)
        times, comms, nbytes = [], [], []
        for _ in range(args.repeats):
            comm["s"], comm["bytes"] = 0.0, 0
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            op @ V
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            comms.append(comm["s"])
            nbytes.append(comm["bytes"])
        rows.append({"k": k, "ms_per_dir": statistics.median(times) * 1e3 / k,
                     "comm_ms": statistics.median(comms) * 1e3,
                     "mb_per_dir": (nbytes[0] / k / 1e6) if nbytes else 0.0})
    t0 = time.perf_counter()
    m0 = op.n_matvecs
    r = le.eigsh(op, k=args.k, tol=args.tol, block_size=args.block, seed=0)
    eig_s = time.perf_counter() - t0
    fsdp = _fsdp_rows(model, shard, x, y, args) if args.fsdp and group is not None else None
    if rank == 0:
        queue.put({"world": world, "d": d, "rows": rows, "eigsh_s": eig_s,
                   "hvps": op.n_matvecs - m0, "eigenvalues": r.eigenvalues.tolist(),
                   "mode_used": op.mode_used, "threads": torch.get_num_threads(),
                   "fsdp": fsdp})
    if group is not None:
        import torch.distributed as dist
        dist.destroy_process_group()


def _fsdp_rows(model, shard, x, y, args):
    """The FSDP2 case on this rank: ms per direction, FSDP2's collective time and bytes, and the
    finite-difference error against the exact unsharded product (computed on rank 0)."""
    import copy
    import landscape_ext as le
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as coll
    from torch.nn import functional as F

    plain = copy.deepcopy(model)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    comm = {"s": 0.0, "bytes": 0}

    def counted(call, size_of):
        def wrapped(self, output_tensor, input_tensor, *a, **kw):
            t0 = time.perf_counter()
            out = call(self, output_tensor, input_tensor, *a, **kw)
            comm["s"] += time.perf_counter() - t0
            comm["bytes"] += size_of(output_tensor, input_tensor)
            return out
        return wrapped

    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    coll.DefaultAllGather.__call__ = counted(coll.DefaultAllGather.__call__,
                                             lambda o, i: nbytes(i))
    coll.DefaultReduceScatter.__call__ = counted(coll.DefaultReduceScatter.__call__,
                                                 lambda o, i: nbytes(o))
    out = {}
    for mode in ("central-difference", "richardson"):
        op = le.HessianOperator(model, F.cross_entropy, shard, mode=mode)
        V = torch.randn(args.block, op.d_global, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
        X = op.vector_shards.take(V).to(op.device)
        op.apply_rows(X)  # warm-up
        times, comm_s = [], []
        for _ in range(max(1, args.repeats)):
            comm["s"], comm["bytes"] = 0.0, 0
            t0 = time.perf_counter()
            P = op.apply_rows(X)
            times.append(time.perf_counter() - t0)
            comm_s.append(comm["s"])
        P = op.vector_shards.gather(P)
        ms = sorted(t * 1e3 / args.block for t in times)
        row = {"ms_per_dir": statistics.median(ms), "ms_per_dir_range": [ms[0], ms[-1]],
               "comm_ms": statistics.median(comm_s) * 1e3 / args.block,
               "mb_per_dir": comm["bytes"] / args.block / 1e6, "d_local": op.d}
        if torch.distributed.get_rank() == 0:
            exact = le.HessianOperator(plain, F.cross_entropy, (x, y))
            ref = exact.apply_rows(V.to(exact.device, exact.dtype)).to(torch.float64)
            row["fd_rel_err"] = float((P.cpu() - ref.cpu()).norm() / ref.norm())
        out[mode] = row
    return out


def run_world(world, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, tmp, args, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        result = queue.get(timeout=3600)
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"world {world}: a rank exited with {[p.exitcode for p in procs]}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads-total", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fsdp", action="store_true", help="add the FSDP2 case (W >= 2)")
    ap.add_argument("--hidden", type=int, default=512, help="hidden width of the MLP")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.k = 2, 5

    results = [run_world(w, args) for w in args.world]
    base = torch.tensor(results[0]["eigenvalues"])
    table = []
    for res in results:
        W = res["world"]
        ev = torch.tensor(res["eigenvalues"])
        diff = float(((ev - base).abs() / base.abs()).max())
        for row in res["rows"]:
            table.append({"W": W, "threads/rank": res["threads"], "k": row["k"],
                          "ms/dir": row["ms_per_dir"], "comm ms": row["comm_ms"],
                          "MB/dir sent": row["mb_per_dir"],
                          "ring MB/dir": row["mb_per_dir"] * 2 * (W - 1) / W,
                          f"eigsh top-{args.k} s": res["eigsh_s"], "HVPs": res["hvps"],
                          "max rel diff": diff})
    cols = ["W", "threads/rank", "k", "ms/dir", "comm ms", "MB/dir sent", "ring MB/dir",
            f"eigsh top-{args.k} s", "HVPs", "max rel diff"]
    print(f"digits MLP, d = {results[0]['d']:,}, 1,797 samples, {args.device}, "
          f"mode {results[0]['mode_used']}")
    print(markdown_table(table, cols))
    fsdp_table = [dict(W=res["world"], mode=mode, **{
        "ms/dir": row["ms_per_dir"],
        "range": "{:.0f}-{:.0f}".format(*row["ms_per_dir_range"]),
        "FSDP coll. ms/dir": row["comm_ms"],
        "FSDP MB/dir": row["mb_per_dir"], "d_local": row["d_local"],
        "fd rel err": row.get("fd_rel_err", float("nan"))})
        for res in results if res.get("fsdp") for mode, row in res["fsdp"].items()]
    if fsdp_table:
        print("FSDP2 (sharded vectors, finite-difference products, rank 0):")
        print(markdown_table(fsdp_table, ["W", "mode", "ms/dir", "range", "FSDP coll. ms/dir",
                                          "FSDP MB/dir", "d_local", "fd rel err"]))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    path = write_results(args.out or f"distributed_{args.device}",
                         {"machine": machine_info(args.device), "load_avg_1min": load,
                          "args": vars(args), "results": results, "table": table,
                          "fsdp_table": fsdp_table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
