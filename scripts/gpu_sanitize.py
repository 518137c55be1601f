"""A small run of every landscape_ext kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python scripts/gpu_sanitize.py --device cuda
    python scripts/gpu_sanitize.py --device cpu        # the same calls on the CPU kernels

Each call goes straight to the dispatcher (``torch.ops.landscape_ext.<op>``), so the custom
kernel runs whatever ``ops.IMPL_DEFAULTS`` would pick, and is checked against
``landscape_ext.reference`` in float64. Sizes are small (the sanitizer slows kernels 10-100x)
but odd, so that every tail path of the tiling runs. Before each op the script prints
``== op <name>`` and after it synchronizes, so scripts/gpu_check.py can attribute the
sanitizer's reports to the op that caused them. Exits 1 when a result disagrees with its
reference.
"""
from __future__ import annotations

import argparse
import sys

import torch

import landscape_ext  # noqa: F401  (loads the ops)
from landscape_ext import reference
from landscape_ext._C import activations

OPS = torch.ops.landscape_ext
FAILURES = []


def _rel(got, want):
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-300))


def _check(name, got, want, tol):
    err = _rel(got, want)
    status = "ok" if err <= tol else "MISMATCH"
    if status != "ok":
        FAILURES.append(f"{name}: relative error {err:.2e} > {tol:.0e}")
    print(f"   {name}: rel err {err:.1e} {status}", flush=True)


def _orthonormal_rows(m, d, device, gen):
    q, _ = torch.linalg.qr(torch.randn(d, m, generator=gen, dtype=torch.float64))
    return q.T.contiguous().to(device)


def run_krylov(device, gen):
    for basis_dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for m, d, b in ((5, 1000, 3), (37, 4099, 8), (64, 777, 1)):
            basis = _orthonormal_rows(m, d, device, gen)
            block = torch.randn(b, d, generator=gen, dtype=torch.float64).to(device)
            block32 = block.float() if basis_dtype != torch.float64 else block
            n = m - 1
            q, c, r = OPS.block_orthonormalize(basis.to(basis_dtype), block32, n)
            torch.cuda.synchronize() if device == "cuda" else None
            qr_, cr, rr = reference.block_orthonormalize(basis.to(basis_dtype).double(),
                                                         block32.double(), n)
            _check(f"block_orthonormalize {basis_dtype} m={m} d={d} b={b} coeffs", c, cr, tol)
            _check(f"block_orthonormalize {basis_dtype} m={m} d={d} b={b} q", q, qr_, tol * 10)
        bases = torch.stack([_orthonormal_rows(9, 2053, device, gen) for _ in range(5)])
        vectors = torch.randn(5, 2053, generator=gen, dtype=torch.float64).to(device)
        vec = vectors.float() if basis_dtype != torch.float64 else vectors
        q, c, nrm = OPS.orthogonalize_batched(bases.to(basis_dtype), vec, 7)
        qr_, cr, nr = reference.orthogonalize_batched(bases.to(basis_dtype).double(),
                                                      vec.double(), 7)
        _check(f"orthogonalize_batched {basis_dtype} coeffs", c, cr, tol)
        _check(f"orthogonalize_batched {basis_dtype} q", q, qr_, tol * 10)


def run_hvp(device, gen):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                       (torch.float16, 5e-3)):
        for N, C, k in ((7, 10, 3), (33, 1001, 2), (5, 50304, 1)):
            logits = (3 * torch.randn(N, C, generator=gen)).to(device, dtype)
            target = torch.randint(0, C, (N,), generator=gen).to(device)
            target[0] = -100  # an ignored row
            dirs = torch.randn(k, N, C, generator=gen).to(device, dtype)
            got = OPS.xent_hvp(logits, target, dirs, 0.1, -100)
            want = reference.xent_hvp(logits.double(), target, dirs.double(), 0.1, -100)
            _check(f"xent_hvp {dtype} N={N} C={C} k={k}", got, want, tol)
        z = torch.randn(3, 1027, generator=gen).to(device, dtype)
        for act, code in activations().items():
            got = OPS.act_derivs(z, code)
            want = reference.act_derivs(z.double(), code)
            for name, g, w in zip(("a", "d1", "d2"), got, want):
                _check(f"act_derivs {act} {dtype} {name}", g, w, tol)


def run_sketch(device, gen):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        for N, T, n_in, n_out, l in ((13, None, 37, 19, 5), (6, 4, 65, 33, 3), (70, None, 3, 2, 17)):
            shape_a = (N, n_in) if T is None else (N, T, n_in)
            shape_e = (N, n_out) if T is None else (N, T, n_out)
            A = torch.randn(*shape_a, generator=gen).to(device, dtype)
            E = torch.randn(*shape_e, generator=gen).to(device, dtype)
            V = torch.randn(l, n_out, n_in, generator=gen).to(device, dtype)
            W = torch.randn(N, l, generator=gen).to(device, dtype)
            tag = f"{dtype} N={N} T={T} {n_out}x{n_in} l={l}"
            _check(f"linear_grad_sketch {tag}", OPS.linear_grad_sketch(A, E, V),
                   reference.linear_grad_sketch(A.double(), E.double(), V.double()), tol)
            _check(f"linear_grad_project {tag}", OPS.linear_grad_project(A, E, W),
                   reference.linear_grad_project(A.double(), E.double(), W.double()), tol)


FAMILIES = {"krylov": run_krylov, "hvp": run_hvp, "sketch": run_sketch}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help="comma list of op families (krylov, hvp, sketch)")
    args = p.parse_args(argv)
    for family in args.families.split(","):
        if family not in FAMILIES:
            raise SystemExit(f"--families: unknown family {family!r}; one of {sorted(FAMILIES)}")
        gen = torch.Generator().manual_seed(0)
        print(f"== op {family}", flush=True)
        FAMILIES[family](args.device, gen)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    print(f"gpu_sanitize: {len(FAILURES)} mismatches", flush=True)
    for f in FAILURES:
        print("  " + f)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
