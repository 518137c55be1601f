"""Benchmark the krylov ops against their plain-PyTorch reference, side by side in one run.

    python bench/bench_krylov.py                 # CPU grid: d in {1e5, 1e6}
    python bench/bench_krylov.py --device cuda   # adds d = 1e7
    python bench/bench_krylov.py --quick         # a few cases

block_orthonormalize: basis (m, d) with n_basis = m rows in use, block (b, d) float32.
The op reads the basis 3 times (fused CGS2); the reference (two rounds of matmuls, then
torch.linalg.qr of the remainder) reads it 4 times, in float32 (a half basis is widened first,
which the reference must pay for). The Lanczos mode (``rounds=1, local_rows=2b``: the newest 2b
rows first, then one round over the basis, a second only where a row lost more than
1 - 1/sqrt(2) of its norm) reads it twice; the block here is random, so its components along the
basis are small, as in Lanczos. It is timed for a float32 basis only: with a half basis the op
needs the second round (four passes), and eigsh uses CGS2 there. GB/s counts the bytes the op
must move at minimum: 3 (Lanczos mode: 2) reads of the basis plus the block traffic (the 2b
local rows' passes not counted); "% copy" is that rate over the measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth_gbs, machine_info, markdown_table, time_fn, write_results  # noqa: E402

import landscape_ext  # noqa: E402
from landscape_ext import ops, reference  # noqa: E402


def orthonormal_rows(m: int, d: int, device: str, seed: int = 0) -> torch.Tensor:
    # QR of a tall random matrix is too slow at d = 1e7; a random basis orthonormalized by our
    # own op (checked against the reference on small sizes in the tests) is fine for timing.
    g = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.empty(m, d, device=device)
    chunk = 32
    for i in range(0, m, chunk):
        block = torch.randn(min(chunk, m - i), d, generator=g).to(device)
        q, _, _ = ops.block_orthonormalize(basis, block, i)
        basis[i:i + q.shape[0]] = q
    return basis


def block_bytes(m: int, b: int, d: int, basis_elem: int, passes: int = 3) -> int:
    # `passes` passes over the basis; the block is read and written by each pass (about), and
    # the CholeskyQR2 steps read+write it twice more.
    return passes * m * d * basis_elem + (passes + passes - 1 + 4) * b * d * 4


def bench_block(d, m, b, basis_dtype, device, repeats, bw):
    basis32 = orthonormal_rows(m, d, device, seed=m)
    basis = basis32.to(basis_dtype)
    block = torch.randn(b, d, device=device, generator=None)
    # correctness first: orthonormal, orthogonal to the stored basis, agrees with the reference
    q, coeffs, r = ops.block_orthonormalize(basis, block, m)
    q_ref, c_ref, r_ref = reference.block_orthonormalize(basis, block, m)
    ortho = (q @ q.T - torch.eye(b, device=device)).abs().max().item()
    err = (q - q_ref).abs().max().item()
    assert ortho < 1e-4 and err < 1e-3, f"op disagrees with reference: ortho {ortho}, diff {err}"
    local = min(2 * b, m)
    q1, _, _ = ops.block_orthonormalize(basis, block, m, rounds=1, local_rows=local)
    q1_ref, _, _ = reference.block_orthonormalize(basis, block, m, rounds=1, local_rows=local)
    err1 = (q1 - q1_ref).abs().max().item()
    assert err1 < 1e-3, f"rounds=1 disagrees with the reference: diff {err1}"
    del q_ref, c_ref, r_ref, q, coeffs, r, q1, q1_ref

    elem = torch.finfo(basis_dtype).bits // 8
    t_op = time_fn(lambda: ops.block_orthonormalize(basis, block, m), device, repeats=repeats)
    lanczos_mode = basis_dtype == torch.float32
    t_one = time_fn(lambda: ops.block_orthonormalize(basis, block, m, rounds=1, local_rows=local),
                    device, repeats=repeats) if lanczos_mode else None
    # the baseline runs on the float32 basis (widening a half basis each call would be unfair
    # to it; it is what PyTorch users store)
    t_ref = time_fn(lambda: reference.block_orthonormalize(basis32, block, m), device,
                    repeats=repeats)
    rows = []
    for impl, t, passes in (("landscape_ext", t_op, 3),
                            ("landscape_ext rounds=1, local_rows=2b", t_one, 2),
                            ("torch reference (f32)", t_ref, 4)):
        if t is None:
            continue
        nbytes = block_bytes(m, b, d, elem, passes if passes < 4 else 3)
        gbs = nbytes / t["median_s"] / 1e9
        rows.append({
            "op": "block_orthonormalize", "d": d, "m": m, "b": b,
            "basis": str(basis_dtype).replace("torch.", ""), "impl": impl,
            "median_ms": t["median_s"] * 1e3, "basis_passes": passes,
            "GB/s": gbs if impl.startswith("landscape_ext") else None,
            "% copy": 100 * gbs / bw if impl.startswith("landscape_ext") else None,
            "speedup": t_ref["median_s"] / t["median_s"],
        })
    return rows


def bench_batched(d, m, r, basis_dtype, device, repeats, bw):
    bases32 = torch.stack([orthonormal_rows(m, d, device, seed=i) for i in range(r)])
    bases = bases32.to(basis_dtype)
    # a generator of its own: torch.manual_seed(0) would draw the rows of the seed-0 basis again,
    # and a vector inside its basis's span gets an arbitrary fresh direction
    vectors = torch.randn(r, d, generator=torch.Generator().manual_seed(10**6 + r)).to(device)
    q, _, _ = ops.orthogonalize_batched(bases, vectors, m)
    q_ref, _, _ = reference.orthogonalize_batched(bases, vectors, m)
    assert (q - q_ref).abs().max().item() < 1e-3
    elem = torch.finfo(basis_dtype).bits // 8
    t_op = time_fn(lambda: ops.orthogonalize_batched(bases, vectors, m), device, repeats=repeats)
    t_ref = time_fn(lambda: reference.orthogonalize_batched(bases32, vectors, m), device,
                    repeats=repeats)
    nbytes = 3 * r * m * d * elem + 9 * r * d * 4
    rows = []
    for impl, t in (("landscape_ext", t_op), ("torch reference (f32)", t_ref)):
        gbs = nbytes / t["median_s"] / 1e9
        rows.append({
            "op": "orthogonalize_batched", "d": d, "m": m, "b": f"r={r}",
            "basis": str(basis_dtype).replace("torch.", ""), "impl": impl,
            "median_ms": t["median_s"] * 1e3, "basis_passes": 3 if impl == "landscape_ext" else 4,
            "GB/s": gbs if impl == "landscape_ext" else None,
            "% copy": 100 * gbs / bw if impl == "landscape_ext" else None,
            "speedup": t_ref["median_s"] / t["median_s"],
        })
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true",
                   help="a few representative cases (on a GPU: d = 1e6 and 1e7)")
    p.add_argument("--tiny", action="store_true",
                   help="one small case per op (the CPU dry run of scripts/gpu_check.sh)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    p.add_argument("--name", default=None, help="JSON file name (default krylov_<device>)")
    args = p.parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs(device)
    info = machine_info(device)
    info["copy_bandwidth_GBps"] = bw
    info["build"] = landscape_ext.build_info()
    print(f"# krylov ops on {info['device_name']} ({device}), torch {info['torch']}, "
          f"copy bandwidth {bw:.1f} GB/s, {info['cpu_threads']} threads")

    ds = [10**5, 10**6] + ([10**7] if device.startswith("cuda") else [])
    ms, bs = [64, 256], [1, 8, 32]
    dtypes = [torch.float32, torch.bfloat16]
    if args.quick:
        ds, ms, bs = ([10**6, 10**7] if device.startswith("cuda") else [10**5, 10**6]), [256], [8]
    if args.tiny:
        ds, ms, bs, dtypes = [10**4], [16], [4], [torch.float32]
    rows = []
    for d, m, b in itertools.product(ds, ms, bs):
        for dt in dtypes:
            if m * d * 4 > 4e9 and not device.startswith("cuda"):
                continue
            rows += bench_block(d, m, b, dt, device, args.repeats, bw)
            n_new = 3 if dt == torch.float32 else 2
            print(markdown_table(rows[-n_new:], list(rows[0].keys())).split("\n", 2)[2],
                  flush=True)
    batched = [(10**5, 64, 16)] if args.quick else [(10**5, 64, 16), (10**5, 32, 64)]
    for d, m, r in ([(10**4, 8, 4)] if args.tiny else batched):
        for dt in dtypes:
            rows += bench_batched(d, m, r, dt, device, args.repeats, bw)
    columns = list(rows[0].keys())
    print()
    print(markdown_table(rows, columns))
    name = args.name or f"krylov_{device.split(':')[0]}" + ("_tiny" if args.tiny else "_quick" if args.quick else "")
    path = write_results(name, {"machine": info, "rows": rows}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
