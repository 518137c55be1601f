"""Benchmark the gradient-covariance SVD against materialized per-sample gradients.

    python bench/bench_gradients.py                 # full run (~10 min on 2 CPU cores)
    python bench/bench_gradients.py --quick         # < 2 min: smaller n, no large model
    python bench/bench_gradients.py --device cuda   # on a GPU (JSON named after the card)

(The sketch ops it builds on: bench/bench_sketch.py.)

The top-k singular values of the n x d per-sample gradient matrix (k = 32,
centred, singular values of G / sqrt(n)) of an MLP briefly trained on a 10-class Gaussian
mixture, by
  * ours: landscape_ext.gradient_covariance_svd with method "kronecker" (randomized, layer
    factors + sketch ops), "jvp" (randomized, forward/reverse AD) and "gram" (exact, G G^T from
    layer factors);
  * baselines on the materialized matrix: torch.func.vmap(grad) into an (n, d) float32 matrix,
    then torch.svd_lowrank, or scikit-learn's randomized_svd.
All randomized methods use the same oversampling p and power iterations q. Every case runs in a
fresh subprocess; "peak MB" is its high-water RSS (VmHWM; see peak_rss_mb) and "extra MB" the growth over the same process
after imports, model and data (the memory the computation itself needs). "err" is the max
relative error of the top-k singular values against the exact values (gram in float64 on a
float64 copy of the model, itself checked against torch.linalg.svdvals on a subsample first).
The large model does not fit in memory when materialized (n d 4 bytes > RAM): baselines are
skipped there with the bytes they would need.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, markdown_table, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------------
# models and data (identical in parent and children: seeded)
# ------------------------------------------------------------------------------------------------

MODELS = {
    "mlp300k": [784, 320, 128, 10],      # d = 293,578
    "mlp2M": [784, 1536, 512, 10],       # d = 1,997,834
    "mlp-quick": [784, 320, 128, 10],
}


def make_model(name: str) -> nn.Module:
    widths = MODELS[name]
    torch.manual_seed(0)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def make_data(n: int, seed: int = 1):
    """10-class Gaussian mixture in 784 dimensions whose covariance has a power-law spectrum
    (variance of coordinate i ~ 1 / i^2, like natural images): gradients then have a decaying
    spectrum, as on real data, rather than the flat bulk of isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, 785, dtype=torch.float32).reciprocal() * 3.0
    means = torch.randn(10, 784, generator=g) * scale * 4.0
    y = torch.randint(0, 10, (n,), generator=g)
    x = means[y] + torch.randn(n, 784, generator=g) * scale
    return x, y


def batches(x, y, size=512):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_briefly(model: nn.Module, n: int, steps: int) -> None:
    x, y = make_data(n, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        idx = torch.randint(0, n, (128,), generator=g)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()


# ------------------------------------------------------------------------------------------------
# child: one case in a fresh process
# ------------------------------------------------------------------------------------------------


def materialize(model, x, y, chunk=256):
    """vmap(grad) into one preallocated (n, d) float32 matrix (the baselines' input)."""
    from torch.func import functional_call, grad, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}
    ce = nn.CrossEntropyLoss()

    def single(p, xi, yi):
        return ce(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(single), in_dims=(None, 0, 0))
    n, d = x.shape[0], n_params(model)
    G = torch.empty(n, d)
    for s in range(0, n, chunk):
        out = g(params, x[s:s + chunk], y[s:s + chunk])
        G[s:s + chunk] = torch.cat([out[k].reshape(out[k].shape[0], -1) for k in params], 1)
    return G


def peak_rss_mb() -> float:
    """High-water RSS of this process image in MB: VmHWM from /proc (ru_maxrss where /proc is
    missing). On Linux ru_maxrss of a fork+exec'd child starts at the parent's RSS at fork time,
    so it would report the parent's memory; VmHWM belongs to the exec'd image alone."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args) -> None:
    from landscape_ext.gradients import gradient_covariance_svd
    model = make_model(args.model)
    model.load_state_dict(torch.load(args.state))
    x, y = make_data(args.n)
    device = args.device
    model = model.to(device)
    x, y = x.to(device), y.to(device)
    data = batches(x, y, args.batch)
    CE = nn.CrossEntropyLoss(reduction="none")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    k, p, q = args.k, args.p, args.q
    extra = {}
    if args.impl.startswith("ours-"):
        method = args.impl[len("ours-"):]
        res = gradient_covariance_svd(model, CE, data, k, centered=True,
                                                    n_power_iter=q, oversample=p, method=method,
                                                    seed=0, return_vectors=True)
        S = res.singular_values
        extra = {"n_passes": res.n_passes, "products": res.n_forward_products
                 + res.n_reverse_products, "sketch_impl": res.sketch_impl}
    else:
        G = materialize(model, x, y)
        n = G.shape[0]
        G -= G.mean(0, keepdim=True)
        if args.impl == "vmap+svd_lowrank":
            torch.manual_seed(0)
            _, S, _ = torch.svd_lowrank(G, q=k + p, niter=q)
            S = S[:k].double().cpu() / math.sqrt(n)
        else:
            from sklearn.utils.extmath import randomized_svd
            _, S, _ = randomized_svd(G.cpu().numpy(), n_components=k, n_oversamples=p, n_iter=q,
                                     random_state=0)
            S = torch.from_numpy(S).double() / math.sqrt(n)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter() - t0
    rss1 = peak_rss_mb()
    out = {"time_s": t, "peak_MB": rss1, "setup_MB": rss0, "extra_MB": rss1 - rss0,
           "singular_values": [float(v) for v in S], **extra}
    if device.startswith("cuda"):
        out["gpu_peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
    with open(args.json_out, "w") as f:
        json.dump(out, f)


def child_case(impl, model_name, n, k, p, q, state, device, batch, timeout):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--model", model_name,
           "--n", str(n), "--k", str(k), "--p", str(p), "--q", str(q), "--state", state,
           "--device", device, "--batch", str(batch), "--json-out", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
        with open(path) as f:
            return json.load(f)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    finally:
        os.unlink(path)


# ------------------------------------------------------------------------------------------------
# parent: reference values, the svd table
# ------------------------------------------------------------------------------------------------


def reference_values(model, n, k, device):
    """Exact top-k via gram on a float64 copy, after checking gram == svdvals on a subsample."""
    import copy

    from landscape_ext.gradients import gradient_covariance_svd, per_sample_gradients
    m64 = copy.deepcopy(model).double().to(device)
    CE = nn.CrossEntropyLoss(reduction="none")
    x, y = make_data(n)
    x, y = x.double().to(device), y.to(device)
    xs, ys = x[:192], y[:192]
    G = per_sample_gradients(m64, CE, (xs, ys)).double()
    exact = torch.linalg.svdvals((G - G.mean(0)) / math.sqrt(192))[:k].cpu()
    small = gradient_covariance_svd(m64, CE, (xs, ys), k, method="gram",
                                                  return_vectors=False).singular_values
    err = ((small - exact).abs() / exact).max().item()
    assert err < 1e-9, f"gram disagrees with svdvals on the subsample: {err}"
    del G
    res = gradient_covariance_svd(m64, CE, batches(x, y, 1024), k, method="gram",
                                                return_vectors=False)
    return res.singular_values


def bench_svd(args, rows, info):
    k, p, q = 32, args.p, args.q
    cases = ([("mlp-quick", 512, True)] if args.quick else
             [("mlp300k", 4096, True), ("mlp2M", 4096, False)])
    mem_total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info["ram_GB"] = mem_total_gb
    for model_name, n, baselines in cases:
        model = make_model(model_name)
        train_briefly(model, 4096, steps=300 if model_name != "mlp2M" else 150)
        d = n_params(model)
        with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
            state = f.name
        torch.save(model.state_dict(), state)
        t0 = time.perf_counter()
        ref = reference_values(model, n, k, args.device)
        t_ref = time.perf_counter() - t0
        need_gb = n * d * 4 / 2**30
        fits = need_gb < 0.6 * mem_total_gb
        impls = ["ours-kronecker", "ours-jvp", "ours-gram"]
        if model_name == "mlp2M":
            impls = ["ours-kronecker", "ours-gram"]
        if baselines and fits:
            impls += ["vmap+svd_lowrank", "vmap+sklearn"]
        case_rows = []
        for impl in impls:
            r = child_case(impl, model_name, n, k, p, q, state, args.device, args.batch,
                           timeout=args.timeout)
            row = {"model": model_name, "d": d, "n": n, "k": k, "impl": impl,
                   "time_s": r.get("time_s"), "peak_MB": r.get("peak_MB"),
                   "extra_MB": r.get("extra_MB"), "err_top32": None,
                   "passes": r.get("n_passes"), "note": r.get("error")}
            if "singular_values" in r:
                S = torch.tensor(r["singular_values"], dtype=torch.float64)
                row["err_top32"] = ((S - ref).abs() / ref).max().item()
            if "gpu_peak_MB" in r:
                row["gpu_peak_MB"] = r["gpu_peak_MB"]
            case_rows.append(row)
            print(markdown_table([row], list(row.keys())).split("\n", 2)[2], flush=True)
        if not (baselines and fits):
            case_rows.append({"model": model_name, "d": d, "n": n, "k": k,
                              "impl": "vmap+svd_lowrank / vmap+sklearn",
                              "note": f"not run: the materialized matrix needs {need_gb:.1f} GB "
                                      f"(RAM {mem_total_gb:.0f} GB)"})
        base = [r_ for r_ in case_rows if r_["impl"] == "vmap+svd_lowrank" and r_.get("time_s")]
        for r_ in case_rows:
            if base and r_.get("time_s"):
                r_["speedup_vs_svd_lowrank"] = base[0]["time_s"] / r_["time_s"]
                r_["extra_mem_ratio"] = base[0]["extra_MB"] / max(r_["extra_MB"], 1.0)
        rows += case_rows
        os.unlink(state)
        info.setdefault("reference_time_s", {})[model_name] = t_ref


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--p", type=int, default=10, help="oversampling of every randomized method")
    p.add_argument("--q", type=int, default=3, help="power iterations of every randomized method")
    p.add_argument("--batch", type=int, default=512, help="batch size of the data loader")
    p.add_argument("--timeout", type=int, default=900, help="seconds per case")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default=None)
    # child mode
    p.add_argument("--child", default=None)
    p.add_argument("--model", default="mlp300k")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--state", default=None)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.child:
        args.impl = args.child
        run_child(args)
        return
    import landscape_ext
    info = machine_info(args.device)
    info["build"] = landscape_ext.build_info()
    info["settings"] = {"k": 32, "oversample": args.p, "n_power_iter": args.q,
                        "batch": args.batch, "quick": args.quick}
    print(f"# gradient covariance SVD on {info['device_name']} ({args.device}), torch "
          f"{info['torch']}, {info['cpu_threads']} threads")
    svd_rows = []
    bench_svd(args, svd_rows, info)
    if svd_rows:
        cols = ["model", "d", "n", "k", "impl", "time_s", "peak_MB", "extra_MB", "err_top32",
                "speedup_vs_svd_lowrank", "extra_mem_ratio", "passes", "note"]
        print("\n## gradient covariance SVD (top 32, centred)\n")
        print(markdown_table(svd_rows, cols))
    dev = args.device.split(":")[0]
    if args.name:
        name = args.name
    elif dev == "cuda":
        name = "gradients_cuda_" + torch.cuda.get_device_name().replace(" ", "_")
    else:
        name = "gradients_cpu" + ("_quick" if args.quick else "")
    path = write_results(name, {"machine": info, "svd": svd_rows}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
