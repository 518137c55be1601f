"""Benchmark Hessian products through attention: a batched product of k directions against one
gradient, on a GPT-2-shaped causal LM written with torch.nn's layers, side by side in one run.

    python bench/bench_attention.py --quick      # 2 layers x 128 wide x 4 heads x 64 tokens
    python bench/bench_attention.py              # 4 x 256 x 4 x 128 (the issue's CPU shape)
    python bench/bench_attention.py --device cuda --layers 12 --width 768 --heads 12 --seq 1024

Rows per k in {1, 8, 32}: ours (``HessianOperator`` in ``auto``: attention on SDPA's math backend,
forward-over-reverse or double backward as measured; ``--ours-modes`` adds forced modes as rows
``ours-<route>@<mode>``, e.g. ``double-backward-loop``, the least memory), and curvlinops' ``HessianLinearOperator``
(math backend forced for it) where installed. Columns: median seconds, gradients per direction
(product time / (k x gradient time), the exact product's floor is about 2), peak MB above the
memory in use before the call (CPU: peak RSS, see bench_hvp.py) and its ratio to a gradient's.
Correctness first: every impl's product with the first direction against a float64
double-backward product (``rel err``; ours must be within 1e-4). Targets of the issue: <= 2.5 gradients per direction and peak
memory at k = 8 <= 3x a gradient's.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_hvp import peak_call  # noqa: E402
from bench_spectrum import TinyLM  # noqa: E402
from common import machine_info, markdown_table, write_results  # noqa: E402

import landscape_ext as le  # noqa: E402


def _timed(fn, device, repeats):
    """Median seconds of ``repeats`` calls (the first one warms up)."""
    fn()
    return statistics.median(peak_call(fn, device)[1] for _ in range(repeats))


def _build(args):
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.width, args.layers, args.heads, args.seq).to(args.device)
    model.eval()
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    targets = torch.randint(0, args.vocab, (args.batch * args.seq,), device=args.device)
    return model, nn.CrossEntropyLoss(), tokens, targets


def _call(args, model, loss_fn, tokens, targets, impl, k):
    """The callable of one row: a gradient, or one impl's product with k directions."""
    params = [p for p in model.parameters() if p.requires_grad]
    if impl == "gradient":
        return lambda: torch.autograd.grad(loss_fn(model(tokens), targets), params)
    d = sum(p.numel() for p in params)
    V = torch.randn(d, k, generator=torch.Generator().manual_seed(k)).to(args.device)
    if impl.startswith("ours"):
        # ours-<route>[@<mode>]: the attention route differentiable_attention() takes (math,
        # blockwise) and the operator's mode (default auto)
        route, _, mode = impl[len("ours-"):].partition("@")
        op = le.HessianOperator(model, loss_fn, (tokens, targets), mode=mode or "auto")

        def ours():
            os.environ["LANDSCAPE_EXT_ATTENTION"] = route
            return op @ V
        return ours
    from curvlinops import HessianLinearOperator
    H = HessianLinearOperator(model, loss_fn, params, [(tokens, targets)],
                              check_deterministic=False)

    def theirs():
        with le.differentiable_attention():   # the peer needs the math backend too
            return H @ V
    return theirs


def _peak_mb_in_child(argv, impl, k):
    """Peak memory of one call, in a fresh process: its peak RSS (CPU) or peak CUDA memory
    above what the set-up left in use; the first call of a process, so no allocator cache
    hides it."""
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", f"{impl}:{k}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _child(args):
    impl, k = args.child.split(":")
    model, loss_fn, tokens, targets = _build(args)
    fn = _call(args, model, loss_fn, tokens, targets, impl, int(k))
    print(peak_call(fn, args.device)[2])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 x 128 x 4 x 64, batch 4")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--ks", default="1,8,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    p.add_argument("--no-peers", action="store_true", help="only ours (math and blockwise)")
    p.add_argument("--routes", default="math,blockwise",
                   help="attention routes of ours (LANDSCAPE_EXT_ATTENTION): math, blockwise")
    p.add_argument("--ours-modes", default="auto",
                   help="operator modes of ours, e.g. auto,double-backward-loop (rows "
                        "ours-<route>@<mode>)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.seq, args.batch = 2, 128, 64, 4
    if args.child:
        return _child(args)
    dev = args.device
    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    model, loss_fn, tokens, targets = _build(args)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model64 = copy.deepcopy(model).double()
    op64 = le.HessianOperator(model64, loss_fn, (tokens, targets), mode="double-backward")
    g_s = _timed(_call(args, model, loss_fn, tokens, targets, "gradient", 0), dev, args.repeats)
    g_mb = _peak_mb_in_child(child_argv, "gradient", 0)
    rows = [{"k": "-", "impl": "gradient (unit)", "seconds": g_s, "grad/dir": 1.0,
             "peak MB": g_mb, "x grad MB": 1.0}]
    impls = [f"ours-{route}" + ("" if mode == "auto" else f"@{mode}")
             for mode in args.ours_modes.split(",") for route in args.routes.split(",")]
    try:
        if args.no_peers:
            raise ImportError
        import curvlinops  # noqa: F401  (installed?)
        impls.append("curvlinops")
    except ImportError:
        pass
    for k in [int(v) for v in args.ks.split(",")]:
        for impl in impls:
            fn = _call(args, model, loss_fn, tokens, targets, impl, k)
            # correctness before timing: the first direction against a float64 product
            V = torch.randn(d, k, generator=torch.Generator().manual_seed(k))[:, :1]
            ref = op64 @ V.double().to(dev)
            out = torch.as_tensor(fn())[:, :1].double()
            err = float((out - ref).norm() / ref.norm())
            if impl.startswith("ours"):
                assert err < 1e-4, f"k={k}: ours is {err:.2e} off the float64 product"
            seconds = _timed(fn, dev, args.repeats)
            mb = _peak_mb_in_child(child_argv, impl, k)
            rows.append({"k": k, "impl": impl, "seconds": seconds, "grad/dir": seconds / (k * g_s),
                         "peak MB": mb, "x grad MB": mb / max(g_mb, 1e-9), "rel err": err})
    shape = f"{args.layers} x {args.width} x {args.heads} x {args.seq}, batch {args.batch}"
    print(f"causal LM {shape}, d = {d:,}")
    print(markdown_table(rows, ["k", "impl", "seconds", "grad/dir", "peak MB", "x grad MB",
                                "rel err"]))
    path = write_results("attention_" + dev + ("_quick" if args.quick else ""),
                         {"machine": machine_info(dev), "shape": shape, "d": d, "rows": rows},
                         args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
