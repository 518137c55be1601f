"""Benchmark the hvp family against autograd, side by side in one run.

    python bench/bench_hvp.py                  # CPU grid (a subset of the issue's grid, see below)
    python bench/bench_hvp.py --quick          # a few small cases (a few minutes on a free CPU)
    python bench/bench_hvp.py --device cuda    # the issue's full grid
    python bench/bench_hvp.py --sections mlp,models --mlp-cases 1024x8x16   # issue 18's targets

Sections (``--sections``, comma list, default all four): ``act``, ``xent``, ``mlp``, ``models``.

* ``xent_hvp`` (op) against (a) ``torch.func``: ``vmap`` over the k directions of
  ``jvp(grad(cross_entropy))`` w.r.t. the logits, (b) double backward (``autograd.grad`` with
  ``is_grads_batched``), and the closed form in torch ops (``reference.xent_hvp``).
* ``mlp_hvp`` (Hessian and GGN; ``fused`` = act_derivs + xent_hvp ops, ``composite`` = the same
  algorithm on plain torch ops) against (a) ``vmap(jvp(grad))`` / ``vmap(jvp)`` + ``vmap(vjp)``
  and (b) double backward / the double-vjp trick; and one gradient (forward + backward), the
  unit of the floor: an exact HVP costs 6 matrix products per layer and direction against 3 for
  the gradient (2 gradients per direction), the GGN 4 (1.4 with the issue's allowance).
  ``--mlp-cases WxLxK,...`` replaces the grid (e.g. ``1024x8x16``: width 1024, depth 8, k = 16;
  batch 512).
* ``act_derivs`` (op) against the torch composition, on (batch, width) pre-activations.
* ``models`` (``bench_models.py``): whole models through ``HessianOperator`` per product mode
  against one gradient, interleaved; ``--models small_resnet,tiny_lm``, ``--model-ks`` (default
  1,8,32), ``--model-modes`` (default auto and the three autograd modes), ``--model-batch``.
  Its columns are described in ``bench_models.py``; it adds the row ``previous auto`` (the rule
  before issue 18: double backward for k < 4, else forward-over-reverse) and, on the ``auto``
  row, the mode auto picked and the per-round ratio of auto's time to the previous rule's.

Timing: ``act`` and ``xent`` rows time each implementation on its own (``--repeats`` calls within
``--budget`` seconds); ``mlp`` and ``models`` rows run in ``--rounds`` interleaved rounds
(``common.paired_rounds``): each round calls the gradient and every implementation once, in an
order rotated each round, and every ratio is taken within a round, so that a slow spell of a
shared machine slows numerator and denominator alike. Ratios are reported as the median and the
range (min-max) of the per-round ratios.

Columns (act, xent, mlp): ``ms`` median wall time of one call (all k directions); ``cost ms``
(act, xent): on the CPU the smallest CPU time of the process per call (all threads), on a GPU
the smallest wall time; ``ms/dir`` (ms over k); ``x grad/dir`` (mlp: median over the rounds of
``call / (k x the same round's gradient)``); ``range`` (its min-max); ``x floor`` (that over
the floor: 2 for H, 1.4 for G); ``peak MB`` (peak memory of the first call above what was
allocated before it: CPU from the process's peak RSS, reset before each call through
/proc/self/clear_refs, with glibc's mmap threshold fixed so freed buffers leave the RSS; GPU
from torch.cuda.max_memory_allocated; ``--no-memory`` skips it in the mlp and models sections),
``speedup`` (act, xent: cost of baseline (a) over this row's, act_derivs: of the torch
composition; mlp: median of the per-round ratio (a) / this row) and ``mem ratio`` ((a)'s peak
over this row's); ``timed calls`` (mlp: the rounds).

CPU grid: the issue's grid (width {256, 1024, 2048} x depth {4, 8} x k {1, 16, 64}, batch 512)
needs hours on a 2-core CPU (one call at width 2048, depth 8, k = 64 is ~13 TFLOP) and its
directions alone would not fit in memory (8.6 GB); the CPU run measures the subset in
``CPU_CASES`` (which includes the target case width 1024, depth 8, k = 16), the CUDA run the full
grid. ``--quick``: two small MLP cases, small_resnet (batch 16) and tiny_lm at k = 1, 8;
``--tiny`` (CI's dry run, seconds): one tiny case per op, tiny_lm with 4 sequences at k = 1, 2.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# Freed buffers must leave the RSS for the peak-memory measurement: fix glibc's mmap threshold
# (its dynamic threshold would keep large freed blocks on the heap). Needs a fresh process.
# Idle OpenMP threads sleep instead of spinning, so that the CPU time of a call is work, not
# waiting. Both slow the calls down, unevenly (every large buffer is a fresh mmap and its page
# faults; each parallel region wakes its threads): the small_resnet gradient took 313 ms under
# them against 145 ms without, and its k = 1 product 2.57 gradients against 2.27. So the
# CPU timing runs take --no-memory, which keeps the process as it is, and peak memory comes from
# a run of its own.
if (os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and __name__ == "__main__"
        and "--no-memory" not in sys.argv):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.execv(sys.executable, [sys.executable] + sys.argv)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (fmt_range, machine_info, markdown_table, paired_rounds, peak_call,  # noqa: E402
                    ratio_summary, time_fn, write_results)

import landscape_ext  # noqa: E402
from bench_models import (COMPILED_MODES, MODEL_COLUMNS, MODEL_MODES, MODEL_NAMES,  # noqa: E402
                          models_section)
from landscape_ext import mlp, ops, reference  # noqa: E402

SECTIONS = ("act", "xent", "mlp", "models")

# (width, depth, k)
CPU_CASES = [(256, 4, 1), (256, 4, 16), (256, 4, 64), (256, 8, 16), (1024, 4, 1), (1024, 8, 1),
             (1024, 8, 16), (2048, 4, 1)]
QUICK_CASES = [(256, 4, 1), (256, 4, 16)]
GPU_CASES = [(w, L, k) for w in (256, 1024, 2048) for L in (4, 8) for k in (1, 16, 64)]
XENT_CPU = [(2048, 10, 16), (2048, 1000, 16), (128, 50304, 8)]   # (N, C, k)
XENT_QUICK = [(2048, 10, 16), (64, 50304, 4)]
XENT_GPU = [(8192, 10, 16), (8192, 1000, 16), (2048, 50304, 16), (16384, 50304, 1)]
# batch 64 x 256 tokens at GPT-2's padded vocabulary: the shape of the published fused Triton
# cross-entropy HVP figure (14.5 ms, 9.9 GB peak on an A100), which issue 16 compares against
XENT_GPU_QUICK = [(16384, 50304, 1), (8192, 1000, 16)]
GPU_QUICK_CASES = [(1024, 4, 1), (1024, 4, 16), (2048, 8, 16)]
XENT_TINY = [(64, 10, 2)]
TINY_CASES = [(32, 2, 2)]
BATCH = 512
N_CLASSES = 10


# ---- memory and timing --------------------------------------------------------------------

def measure(fn, device, repeats, budget_s):
    """Peak memory of the first call, then up to `repeats` timed calls within about budget_s
    seconds (the first call is the warm-up; when it alone exceeds the budget it is also the
    timing). Returns (median wall s, cost s, peak MB, timed calls): the cost is the min wall
    time on a GPU and the min CPU time of the process (all threads) per call on the CPU."""
    t0 = time.process_time()
    out, first, peak = peak_call(fn, device)
    first_cpu = time.process_time() - t0
    del out
    gc.collect()
    n = min(repeats, int(budget_s / max(first, 1e-6)))
    if n < 1:
        return first, (first if device.startswith("cuda") else first_cpu), peak, 1
    if device.startswith("cuda"):
        t = time_fn(fn, device, warmup=0, repeats=n)
        return t["median_s"], t["min_s"], peak, t["repeats"]
    walls, cpus = [], []
    for _ in range(n):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), min(cpus), peak, n


# ---- cross-entropy ------------------------------------------------------------------------------

def xent_impls(logits, target, dirs):
    def ce(z):
        return F.cross_entropy(z, target)

    def vmap_fwd_rev():
        g = torch.func.grad(ce)
        return torch.func.vmap(lambda v: torch.func.jvp(g, (logits,), (v,))[1])(dirs)

    def double_backward():
        z = logits.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(ce(z), z, create_graph=True)
            return torch.autograd.grad(g, z, dirs, is_grads_batched=True)[0]

    return [("torch.func vmap(jvp(grad)) (a)", vmap_fwd_rev),
            ("double backward (b)", double_backward),
            ("torch closed form (reference)", lambda: reference.xent_hvp(logits, target, dirs)),
            ("xent_hvp (op)", lambda: ops.xent_hvp(logits, target, dirs))]


def bench_xent(N, C, k, device, repeats, budget):
    g = torch.Generator().manual_seed(C)
    logits = (3 * torch.randn(N, C, generator=g)).to(device)
    target = torch.randint(0, C, (N,), generator=g).to(device)
    dirs = torch.randn(k, N, C, generator=g).to(device)
    impls = xent_impls(logits, target, dirs)
    want = impls[1][1]()
    got = ops.xent_hvp(logits, target, dirs)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-4, f"xent_hvp disagrees with double backward: relative error {err:.2e}"
    del want, got
    rows = []
    for name, fn in impls:
        t, tmin, peak, n = measure(fn, device, repeats, budget)
        rows.append({"case": f"xent N={N} C={C} k={k}", "impl": name, "ms": t * 1e3,
                     "cost ms": tmin * 1e3, "ms/dir": tmin * 1e3 / k, "peak MB": peak,
                     "timed calls": n})
    base = rows[0]
    for r in rows:
        r["speedup"] = base["cost ms"] / r["cost ms"]
        r["mem ratio"] = base["peak MB"] / max(r["peak MB"], 1e-3)
    return rows


# ---- MLP ----------------------------------------------------------------------------------------

def make_mlp(width, depth, act, device):
    torch.manual_seed(width + depth)
    act_cls = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}[act]
    layers = []
    for i in range(depth):
        n_out = N_CLASSES if i == depth - 1 else width
        layers.append(nn.Linear(width, n_out))
        if i < depth - 1:
            layers.append(act_cls())
    return nn.Sequential(*layers).to(device)


def mlp_impls(model, x, y, X, curvature):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    k = X.shape[0]
    Vd = {n: v.reshape(k, *s) for n, v, s in zip(names, torch.split(X, sizes, dim=1), shapes)}
    Vl = [Vd[n] for n in names]
    structure = mlp.mlp_structure(model, strict=True)

    def f(p):
        return torch.func.functional_call(model, p, (x,))

    def loss_of(p):
        return F.cross_entropy(f(p), y)

    def out_hvp(out, R):  # closed-form CE output Hessian on (k, B, C)
        p = torch.softmax(out.detach(), dim=1)
        pr = p * R
        return (pr - p * pr.sum(-1, keepdim=True)) / out.shape[0]

    if curvature == "hessian":
        def vmap_path():
            g = torch.func.grad(loss_of)
            return torch.func.vmap(lambda v: torch.func.jvp(g, (params,), (v,))[1])(Vd)

        def double_backward():
            leaves = [params[n].clone().requires_grad_(True) for n in names]
            with torch.enable_grad():
                loss = loss_of(dict(zip(names, leaves)))
                grads = torch.autograd.grad(loss, leaves, create_graph=True)
                return torch.autograd.grad(grads, leaves, Vl, is_grads_batched=True)
    else:
        def vmap_path():
            out, vjp_fn = torch.func.vjp(f, params)
            jv = torch.func.vmap(lambda v: torch.func.jvp(f, (params,), (v,))[1])(Vd)
            return torch.func.vmap(vjp_fn)(out_hvp(out, jv))[0]

        def double_backward():
            leaves = [params[n].clone().requires_grad_(True) for n in names]
            with torch.enable_grad():
                out = f(dict(zip(names, leaves)))
                u = torch.zeros_like(out, requires_grad=True)
                g = torch.autograd.grad(out, leaves, u, create_graph=True)
                jv = torch.autograd.grad(g, u, Vl, is_grads_batched=True)[0]
                return torch.autograd.grad(out, leaves, out_hvp(out, jv), is_grads_batched=True)

    def ours(fused):
        return lambda: mlp.mlp_apply_rows(structure, params, x, y, X, "cross_entropy", curvature,
                                          fused=fused)

    tag = "H" if curvature == "hessian" else "G"
    return [(f"{tag} torch.func vmap (a)", vmap_path), (f"{tag} double backward (b)",
                                                         double_backward),
            (f"{tag} mlp_hvp composite", ours(False)), (f"{tag} mlp_hvp fused", ours(True))]


def bench_mlp(width, depth, k, act, device, rounds, memory=True):
    model = make_mlp(width, depth, act, device)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(BATCH, width, generator=g).to(device)
    y = torch.randint(0, N_CLASSES, (BATCH,), generator=g).to(device)
    d = sum(p.numel() for p in model.parameters())
    X = torch.randn(k, d, generator=g).to(device)
    params = {n: p.detach() for n, p in model.named_parameters()}

    # correctness first, on a slice of the batch and two directions
    kk = min(2, k)
    for curvature in ("hessian", "ggn"):
        impls = mlp_impls(model, x[:32], y[:32], X[:kk], curvature)
        ref = torch.cat([t.reshape(kk, -1) for t in impls[0][1]().values()], dim=1)
        for fused in (True, False):
            got = mlp.mlp_apply_rows(mlp.mlp_structure(model), params, x[:32], y[:32], X[:kk],
                                     "cross_entropy", curvature, fused=fused)
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < 1e-3, f"mlp_hvp ({curvature}, fused={fused}) disagrees: {err:.2e}"

    leaves = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]

    def gradient():
        with torch.enable_grad():
            out = torch.func.functional_call(model, dict(zip(names, leaves)), (x,))
            return torch.autograd.grad(F.cross_entropy(out, y), leaves)

    # each impl's first call measures its peak memory (and warms it up); then interleaved
    # rounds: every round calls the gradient and every impl once (order rotated), and the
    # ratios are taken within a round, so a slow spell of a shared machine cancels out
    case = f"mlp {act} w={width} L={depth} k={k}"
    fns = {"gradient": gradient}
    floors = {}
    for curvature, floor in (("hessian", 2.0), ("ggn", 1.4)):
        for name, fn in mlp_impls(model, x, y, X, curvature):
            fns[name] = fn
            floors[name] = floor
    peaks = {}
    for name, fn in fns.items():
        peaks[name] = peak_call(fn, device)[2] if memory else None
    times = paired_rounds(fns, rounds, device, warmup=False)
    unit = [k * t for t in times["gradient"]]
    rows = [{"case": case, "impl": "gradient (unit)", "ms": statistics.median(times["gradient"])
             * 1e3, "x grad/dir": 1.0, "peak MB": peaks["gradient"], "timed calls": rounds}]
    bases = {}
    for name in floors:
        s = ratio_summary(times[name], unit)
        base = bases.setdefault(floors[name], name)   # (a), the first impl of each curvature
        t = statistics.median(times[name])
        rows.append({"case": case, "impl": name, "ms": t * 1e3, "ms/dir": t * 1e3 / k,
                     "x grad/dir": s["median"], "range": f"{s['min']:.3g}-{s['max']:.3g}",
                     "x floor": s["median"] / floors[name], "peak MB": peaks[name],
                     "speedup": ratio_summary(times[base], times[name])["median"],
                     "mem ratio": (peaks[base] / max(peaks[name], 1e-3) if memory else None),
                     "timed calls": rounds})
        print(f"  {case:32s} {name:28s} {t * 1e3:10.1f} ms  {fmt_range(s)} gradients/direction",
              flush=True)
    return rows


def bench_act(width, act, device, repeats):
    z = torch.randn(BATCH, width, device=device)
    t_ref = measure(lambda: reference.act_derivs(z, act), device, repeats * 4, 1.0)
    t_op = measure(lambda: ops.act_derivs(z, act), device, repeats * 4, 1.0)
    return [{"case": f"act_derivs {act} ({BATCH}, {width})", "impl": impl, "ms": t[0] * 1e3,
             "cost ms": t[1] * 1e3, "speedup": t_ref[1] / t[1], "peak MB": t[2]}
            for impl, t in (("torch composition", t_ref), ("act_derivs (op)", t_op))]


def parse_mlp_cases(text):
    """``"1024x8x16,256x4x1"`` -> ``[(1024, 8, 16), (256, 4, 1)]`` (width x depth x k)."""
    cases = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--mlp-cases: {item!r} is not WIDTHxDEPTHxK with positive integers "
                             f"(e.g. 1024x8x16)")
        cases.append(tuple(int(p) for p in parts))
    return cases


def _csv(text, choices, flag):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in choices]
    if bad or not items:
        raise SystemExit(f"{flag}: {bad or text!r} not in {list(choices)}")
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a few small cases")
    p.add_argument("--tiny", action="store_true",
                   help="one tiny case per op (the CPU dry run of scripts/gpu_check.sh)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma list of act,xent,mlp,models (default: all)")
    p.add_argument("--act", default="gelu", choices=["relu", "gelu", "tanh", "silu"])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per act/xent row")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds of the mlp and models sections (default 5; tiny 2)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per act/xent row (default 3, 1.5 with --quick)")
    p.add_argument("--mlp-cases", default=None,
                   help="WIDTHxDEPTHxK comma list replacing the MLP grid, e.g. 1024x8x16,256x4x1")
    p.add_argument("--models", default=None,
                   help="comma list of small_resnet,tiny_lm (default both; --tiny: tiny_lm)")
    p.add_argument("--model-ks", default=None,
                   help="directions per product (default 1,8,32; --quick 1,8; --tiny 1,2)")
    p.add_argument("--model-modes", default=",".join(MODEL_MODES),
                   help="comma list of the operator modes timed (default: all four; also "
                        "forward-over-reverse+compile, auto+compile: compile=True)")
    p.add_argument("--model-batch", type=int, default=None,
                   help="batch of every model (default: small_resnet 64 (16 with --quick), "
                        "tiny_lm 32 sequences (4 with --tiny))")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory measurement (mlp and models sections)")
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    p.add_argument("--name", default=None, help="JSON file name (default hvp_<device>)")
    args = p.parse_args(argv)
    args.sections = _csv(args.sections, SECTIONS, "--sections")
    args.rounds = args.rounds or (2 if args.tiny else 5)
    if args.rounds < 1:
        raise SystemExit(f"--rounds: must be >= 1, got {args.rounds}")
    args.models = _csv(args.models or ("tiny_lm" if args.tiny else ",".join(MODEL_NAMES)),
                       MODEL_NAMES, "--models")
    args.model_modes = _csv(args.model_modes, MODEL_MODES + COMPILED_MODES, "--model-modes")
    ks = args.model_ks or ("1,2" if args.tiny else "1,8" if args.quick else "1,8,32")
    try:
        args.model_ks = [int(k) for k in ks.split(",")]
    except ValueError:
        raise SystemExit(f"--model-ks: {ks!r} is not a comma list of integers") from None
    if min(args.model_ks) < 1:
        raise SystemExit(f"--model-ks: every k must be >= 1, got {args.model_ks}")
    return args


def run_models(args, device):
    """The models section: rows and JSON detail (see bench_models.py)."""
    batch = {}
    if args.model_batch:
        batch = {name: args.model_batch for name in args.models}
    elif args.tiny:
        batch = {"tiny_lm": 4, "small_resnet": 8}
    elif args.quick:
        batch = {"small_resnet": 16}
    return models_section(args.models, args.model_ks, args.model_modes, args.rounds, device,
                          memory=not args.no_memory, batch=batch,
                          train_steps=2 if args.tiny else None)


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    cuda = device.startswith("cuda")
    budget = args.budget or (0.2 if args.tiny else 1.5 if args.quick else 3.0)
    info = machine_info(device)
    info["build"] = landscape_ext.build_info()
    info["sections"] = args.sections
    info["rounds"] = args.rounds
    if not cuda:
        info["load_average_at_start"] = os.getloadavg()
    print(f"# hvp family on {info['device_name']} ({device}), torch {info['torch']}, "
          f"{info['cpu_threads']} threads" + ("" if cuda else
                                             f", load average {os.getloadavg()[0]:.1f}"))

    rows = []
    if "act" in args.sections:
        acts = [args.act] if (args.quick or args.tiny) else ["relu", "gelu", "tanh", "silu"]
        for width in ((64,) if args.tiny else (1024,) if args.quick else (256, 1024)):
            for act in acts:
                rows += bench_act(width, act, device, args.repeats)
    if args.tiny:
        xcases, mcases = XENT_TINY, TINY_CASES
    elif cuda:
        xcases, mcases = (XENT_GPU_QUICK, GPU_QUICK_CASES) if args.quick else (XENT_GPU, GPU_CASES)
    else:
        xcases, mcases = (XENT_QUICK, QUICK_CASES) if args.quick else (XENT_CPU, CPU_CASES)
    if args.mlp_cases:
        mcases = parse_mlp_cases(args.mlp_cases)
    if "xent" in args.sections:
        for N, C, k in xcases:
            rows += bench_xent(N, C, k, device, args.repeats, budget)
            print(f"  xent N={N} C={C} k={k} done", flush=True)
    if "mlp" in args.sections:
        for width, depth, k in mcases:
            rows += bench_mlp(width, depth, k, args.act, device, args.rounds,
                              memory=not args.no_memory)
    model_rows, models = [], {}
    if "models" in args.sections:
        model_rows, models = run_models(args, device)
    if not cuda:
        info["load_average_at_end"] = os.getloadavg()

    columns = ["case", "impl", "ms", "cost ms", "ms/dir", "x grad/dir", "range", "x floor",
               "peak MB", "speedup", "mem ratio", "timed calls"]
    if rows:
        print()
        print(markdown_table(rows, columns))
    if model_rows:
        print()
        print(markdown_table(model_rows, MODEL_COLUMNS))
    name = args.name or f"hvp_{device.split(':')[0]}" + (
        "_tiny" if args.tiny else "_quick" if args.quick else "")
    payload = {"machine": info, "columns": columns, "rows": rows,
               "model_columns": MODEL_COLUMNS, "model_rows": model_rows, "models": models}
    path = write_results(name, payload, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
