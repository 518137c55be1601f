"""Save, or compare bit for bit, the outputs of every landscape_ext op on a fixed set of inputs.

For changes that must not move a single bit (a port of the kernels to another API, a build
change): run ``--save`` with the old build installed, ``--compare`` with the new one, on the same
machine (the CPU kernels pick an instruction set at run time, so outputs are bitwise equal for one
CPU level, not across machines).

    python scripts/kernel_outputs.py --save /tmp/outputs_before.pt     # old build
    python scripts/kernel_outputs.py --compare /tmp/outputs_before.pt  # new build

Cases: every op over its storage dtypes and odd/prime shapes, the krylov ops' rounds, local rows
and rank-deficient paths, xent_hvp's ignore_index, act_derivs' activations, the sketch's direct
and formed routes. ``--device cuda`` runs the same cases on a GPU.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from typing import Callable, Dict, Iterator, Tuple

import torch

from landscape_ext import ops

Case = Tuple[str, Callable[[], object]]
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float64, seed=0, device="cpu"):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype=dtype,
                                                                            device=device)


def _orthonormal_rows(m: int, d: int, seed: int, device: str) -> torch.Tensor:
    q, _ = torch.linalg.qr(_randn(d, m, seed=seed))
    return q.t().contiguous().to(device)


def krylov_cases(device: str) -> Iterator[Case]:
    for (m, d, b), basis_dtype, block_dtype, rounds in itertools.product(
            [(5, 97, 3), (12, 1031, 4), (3, 4099, 1), (8, 8200, 9)], DTYPES,
            (torch.float64, torch.float32), (1, 2)):
        if basis_dtype == torch.float64 and block_dtype == torch.float32 and rounds == 1:
            continue
        basis = _orthonormal_rows(m, d, seed=m + d, device=device).to(basis_dtype)
        block = _randn(b, d, dtype=block_dtype, seed=b + d, device=device)
        n = m - 1
        name = f"block_orthonormalize m{m} d{d} b{b} {basis_dtype} {block_dtype} rounds{rounds}"
        yield name, (lambda basis=basis, block=block, n=n, rounds=rounds:
                     ops.block_orthonormalize(basis, block, n, rounds=rounds,
                                              local_rows=min(2, n)))
    # rank-deficient block: the last row repeats the first, one row lies in the basis span
    basis = _orthonormal_rows(6, 300, seed=1, device=device)
    block = _randn(4, 300, seed=2, device=device)
    block[3] = block[0]
    block[2] = basis[1] * 2.0 - basis[4]
    yield "block_orthonormalize rank-deficient", lambda: ops.block_orthonormalize(basis, block, 6)
    for (r, m, d), basis_dtype, vec_dtype in itertools.product(
            [(3, 5, 97), (7, 9, 1031), (2, 4, 5000)], DTYPES, (torch.float64, torch.float32)):
        bases = torch.stack([_orthonormal_rows(m, d, seed=i + d, device=device)
                             for i in range(r)]).to(basis_dtype)
        vectors = _randn(r, d, dtype=vec_dtype, seed=r + d, device=device)
        name = f"orthogonalize_batched r{r} m{m} d{d} {basis_dtype} {vec_dtype}"
        yield name, (lambda bases=bases, vectors=vectors, m=m:
                     ops.orthogonalize_batched(bases, vectors, m - 1))
    bases = torch.stack([_orthonormal_rows(4, 200, seed=i, device=device) for i in range(3)])
    vectors = _randn(3, 200, seed=9, device=device)
    vectors[1] = bases[1, 0] - 3.0 * bases[1, 2]
    yield "orthogonalize_batched in-span", lambda: ops.orthogonalize_batched(bases, vectors, 4)


def hvp_cases(device: str) -> Iterator[Case]:
    for (N, C, k), logit_dtype, dir_dtype in itertools.product(
            [(13, 10, 3), (5, 1031, 2), (7, 50304, 1)], DTYPES, (torch.float64, torch.float32,
                                                                torch.bfloat16)):
        logits = _randn(N, C, dtype=logit_dtype, seed=C, device=device) * 3
        target = torch.randint(0, C, (N,), generator=_gen(N)).to(device)
        target[1] = -100
        dirs = _randn(k, N, C, dtype=dir_dtype, seed=k, device=device)
        name = f"xent_hvp N{N} C{C} k{k} {logit_dtype} {dir_dtype}"
        yield name, (lambda logits=logits, target=target, dirs=dirs:
                     ops.xent_hvp(logits, target, dirs, impl="fused"))
    for act, dtype in itertools.product(sorted(ops.ACTIVATIONS), DTYPES):
        z = _randn(37, 131, dtype=dtype, seed=5, device=device) * 3
        yield f"act_derivs {act} {dtype}", (lambda z=z, act=act:
                                            ops.act_derivs(z, act, impl="fused"))


def sketch_cases(device: str) -> Iterator[Case]:
    for (N, T, n_in, n_out, l), dtype in itertools.product(
            [(17, 1, 31, 13, 5), (8, 1, 300, 257, 12), (6, 7, 23, 11, 9), (4, 3, 40, 20, 2)],
            (torch.float64, torch.float32)):
        shape_a = (N, n_in) if T == 1 else (N, T, n_in)
        shape_e = (N, n_out) if T == 1 else (N, T, n_out)
        A = _randn(*shape_a, dtype=dtype, seed=1, device=device)
        E = _randn(*shape_e, dtype=dtype, seed=2, device=device)
        V = _randn(l, n_out, n_in, dtype=dtype, seed=3, device=device)
        W = _randn(N, l, dtype=dtype, seed=4, device=device)
        tag = f"N{N} T{T} n_in{n_in} n_out{n_out} l{l} {dtype}"
        yield f"linear_grad_sketch {tag}", (lambda A=A, E=E, V=V:
                                            ops.linear_grad_sketch(A, E, V, impl="fused"))
        yield f"linear_grad_project {tag}", (lambda A=A, E=E, W=W:
                                             ops.linear_grad_project(A, E, W, impl="fused"))


def all_cases(device: str) -> Iterator[Case]:
    yield from krylov_cases(device)
    yield from hvp_cases(device)
    yield from sketch_cases(device)


def run(device: str) -> Dict[str, Tuple[torch.Tensor, ...]]:
    out = {}
    for name, fn in all_cases(device):
        res = fn()
        res = res if isinstance(res, tuple) else (res,)
        out[name] = tuple(t.detach().cpu() for t in res)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.view(torch.uint8) if a.numel() else a,
                            b.view(torch.uint8) if b.numel() else b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", metavar="FILE")
    mode.add_argument("--compare", metavar="FILE")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    outputs = run(args.device)
    n_tensors = sum(len(v) for v in outputs.values())
    if args.save:
        torch.save(outputs, args.save)
        print(f"saved {len(outputs)} cases ({n_tensors} tensors) to {args.save}")
        return 0
    before = torch.load(args.compare)
    missing = sorted(set(before) ^ set(outputs))
    differ = [name for name in sorted(set(before) & set(outputs))
              if len(before[name]) != len(outputs[name])
              or not all(_same(a, b) for a, b in zip(before[name], outputs[name]))]
    for name in differ:
        worst = max(((a.double() - b.double()).abs().max().item() if a.shape == b.shape
                     else float("inf")) for a, b in zip(before[name], outputs[name]))
        print(f"DIFFERS  {name}  (max abs difference {worst:.3g})")
    for name in missing:
        print(f"MISSING  {name}")
    same = len(set(before) & set(outputs)) - len(differ)
    print(f"{same} of {len(before)} cases ({n_tensors} tensors) bit-identical; {len(differ)} "
          f"differ; {len(missing)} missing on one side")
    return 0 if not differ and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
