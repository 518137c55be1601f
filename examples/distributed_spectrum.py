"""Hessian (or Gauss-Newton) spectrum over data sharded across processes with torch.distributed.

Every rank holds a contiguous shard of the training set (uneven shards are fine) and the same
model (wrapped in DistributedDataParallel, which broadcasts rank 0's parameters); every product
of the curvature operator all-reduces the ranks' local sums, so top-k eigenpairs, the trace and
the spectral density are those of the mean loss over *all* samples. Rank 0 writes the results.

    # one machine, 2 processes on the CPU (gloo)
    torchrun --standalone --nproc_per_node=2 examples/distributed_spectrum.py --out out/dist
    # 2 nodes x 8 GPUs (NCCL), a checkpoint written by `landscape-lab train`
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        examples/distributed_spectrum.py --checkpoint ckpt.pt --out out/dist

Without a checkpoint, the built-in digits MLP is used (trained on rank 0 for --epochs epochs
first, then shared by DDP).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import landscape_ext as lx
from landscape_lab import training
from landscape_lab.data import get_dataset
from landscape_lab.models import MLP


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint of `landscape-lab train`")
    ap.add_argument("--dataset", default="digits", help="data set when no checkpoint is given")
    ap.add_argument("--data-dir", default=None, help="directory of CIFAR/WikiText files")
    ap.add_argument("--samples", type=int, default=None,
                    help="use this many training samples in total (default: all)")
    ap.add_argument("--batch-size", type=int, default=512, help="per-rank batch size")
    ap.add_argument("--width", type=int, default=128, help="example MLP width")
    ap.add_argument("--depth", type=int, default=2, help="example MLP hidden layers")
    ap.add_argument("--epochs", type=int, default=2, help="example MLP: epochs on rank 0")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--operator", default="hessian", choices=["hessian", "ggn"])
    ap.add_argument("--k", type=int, default=10, help="top-k eigenpairs")
    ap.add_argument("--tol", type=float, default=1e-4, help="eigsh residual tolerance")
    ap.add_argument("--trace-matvecs", type=int, default=60, help="Hutch++ products")
    ap.add_argument("--slq-steps", type=int, default=40, help="SLQ Lanczos steps")
    ap.add_argument("--slq-probes", type=int, default=4, help="SLQ probes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--out", default="out/distributed-spectrum")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        status = _run(args, rank, world, device)
        # leave together: a rank still writing results while its peer tears down gloo's
        # connections can abort in the teardown ("terminate called without an active exception")
        dist.barrier()
        return status
    finally:
        dist.destroy_process_group()


def _run(args, rank: int, world: int, device: torch.device) -> int:
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.checkpoint is not None:
        model, meta = training.load_checkpoint(args.checkpoint, device)
        ds = get_dataset(meta.get("dataset", args.dataset), data_dir=args.data_dir,
                         seed=args.seed, **(meta.get("dataset_kwargs") or {}))
    else:
        ds = get_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
        model = MLP(int(np.prod(ds.input_shape)), args.width, args.depth, ds.n_classes,
                    "tanh", seed=args.seed)
        if rank == 0 and args.epochs > 0:
            training.train(model, ds, training.TrainConfig(epochs=args.epochs, seed=args.seed),
                           progress=False)
    model = model.to(device=device, dtype=dtype)
    # DDP broadcasts rank 0's parameters and buffers: every rank now holds the same model
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                              else None)

    n_total = ds.n_train if args.samples is None else min(args.samples, ds.n_train)
    x, y = ds.x_train[:n_total], ds.y_train[:n_total]
    lo, hi = (int(v) for v in np.linspace(0, n_total, world + 1)[rank:rank + 2].round())
    shard = [(x[s:min(s + args.batch_size, hi)].to(device, dtype if x.is_floating_point()
                                                     else x.dtype),
              y[s:min(s + args.batch_size, hi)].to(device))
             for s in range(lo, hi, args.batch_size)]
    loss_fn, _ = training.loss_functions(ds.task)
    Op = lx.HessianOperator if args.operator == "hessian" else lx.GGNOperator
    op = Op(ddp, loss_fn, shard)  # reduces over DDP's process group

    top = lx.eigsh(op, k=args.k, tol=args.tol, seed=args.seed)
    n_eig = op.n_matvecs
    tr = lx.trace(op, args.trace_matvecs, seed=args.seed)
    dens = lx.spectral_density(op, n_steps=args.slq_steps, n_probes=args.slq_probes,
                               seed=args.seed)
    elem = torch.empty((), dtype=op.dtype).element_size()
    per_direction = 2 * (world - 1) / world * op.d * elem
    summary = {
        "world_size": world, "backend": dist.get_backend(), "device": str(device),
        "samples_total": op.n_samples, "samples_this_rank": hi - lo, "d": op.d,
        "operator": args.operator, "dtype": args.dtype,
        "bytes_per_direction_per_rank": per_direction,
        "n_matvecs": {"eigsh": n_eig, "total": op.n_matvecs},
        "top_eigenvalues": top.eigenvalues.tolist(), "converged": top.converged.tolist(),
        "trace": tr.estimate, "trace_stderr": tr.stderr, "time_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    top.save(out / "eigsh.json")
    tr.save(out / "trace.json")
    dens.save(out / "density.json")
    if lx.is_main_process():
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{world} ranks ({summary['backend']}), {op.n_samples} samples, d = {op.d}: "
              f"top-{args.k} {', '.join(f'{v:.5g}' for v in top.eigenvalues.tolist())}; "
              f"trace {tr.estimate:.5g} +- {tr.stderr:.2g}; {op.n_matvecs} products, "
              f"{per_direction / 1e6:.2f} MB all-reduced per direction per rank; "
              f"{summary['time_s']:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
