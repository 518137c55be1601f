"""Smoke test of an *installed* landscape-ext (a wheel in a fresh venv), run from outside the
source tree: ``python scripts/wheel_smoke.py`` (scripts/wheel_test.sh and wheel_matrix.sh copy it
to a temporary folder first so that no checkout is on ``sys.path``).

Checks, each printed on one line, exit status 1 on the first failure:
  import       landscape_ext and landscape_lab import from site-packages (not a checkout)
  build_info   the facts the wheel recorded; its CPU kernels are registered for every op
  eigsh        HessianOperator + eigsh on a small tanh MLP: the top 3 eigenvalues against the
               dense float64 Hessian (torch.autograd.functional.hessian + eigvalsh)
  ops          each op family once against its plain-PyTorch reference
  cli          `landscape-lab --help` runs
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'}  {name:<10} {detail}", flush=True)
    if not ok:
        sys.exit(1)


def main() -> None:
    import torch

    import landscape_ext as lx
    import landscape_lab  # noqa: F401
    from landscape_ext import ops, reference

    site = sysconfig.get_paths()["purelib"]
    where = os.path.dirname(lx.__file__)
    check("import", where.startswith(site) or "site-packages" in where,
          f"landscape_ext from {where}, torch {torch.__version__}")

    info = lx.build_info()
    kernels = info["kernels"]
    check("build_info", all("CPU" in keys for keys in kernels.values()) and len(kernels) == 6,
          f"built with torch {info['built_torch_version']} (stable ABI >= "
          f"{info['torch_target_version']}), running torch {info['torch_version']}, "
          f"cuda_kernels={info['cuda_kernels']}, {len(kernels)} ops with CPU kernels")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.double()
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    H = lx.HessianOperator(model, torch.nn.functional.cross_entropy, (x, y))
    top = lx.eigsh(H, k=3, which="largest", tol=1e-10, seed=0)
    params = [p.detach().clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]

    def loss_of(*flat):
        out = torch.func.functional_call(model, dict(zip(names, flat)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    blocks = torch.autograd.functional.hessian(loss_of, tuple(params))
    sizes = [p.numel() for p in params]
    dense = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j])
                                  for j in range(len(params))], 1)
                       for i in range(len(params))], 0)
    exact = torch.linalg.eigvalsh(dense).flip(0)[:3]
    got = torch.as_tensor(top.eigenvalues, dtype=torch.float64).sort(descending=True).values
    err = (got - exact).abs().max().item()
    check("eigsh", err < 1e-8 * exact.abs().max().item(),
          f"top-3 {got.tolist()} vs dense {exact.tolist()} (max error {err:.1e}, "
          f"{top.n_matvecs} products)")

    basis = torch.linalg.qr(torch.randn(97, 5, dtype=torch.float64))[0].t().contiguous()
    block = torch.randn(3, 97, dtype=torch.float64)
    q, c, r = ops.block_orthonormalize(basis, block, 5)
    e1 = (q @ q.t() - torch.eye(3, dtype=torch.float64)).abs().max().item()
    e2 = (c.t() @ basis + r.t() @ q - block).abs().max().item()
    logits, target = torch.randn(9, 11, dtype=torch.float64), torch.randint(0, 11, (9,))
    dirs = torch.randn(2, 9, 11, dtype=torch.float64)
    e3 = (ops.xent_hvp(logits, target, dirs) - reference.xent_hvp(logits, target, dirs)).abs().max()
    A, E, V = (torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64),
               torch.randn(3, 4, 6, dtype=torch.float64))
    e4 = (ops.linear_grad_sketch(A, E, V, impl="fused")
          - reference.linear_grad_sketch(A, E, V)).abs().max()
    worst = max(e1, e2, float(e3), float(e4))
    check("ops", worst < 1e-12,
          f"block_orthonormalize, xent_hvp, linear_grad_sketch vs reference: max error "
          f"{worst:.1e}")

    cli = subprocess.run(["landscape-lab", "--help"], capture_output=True, text=True)
    check("cli", cli.returncode == 0 and "usage" in cli.stdout.lower(),
          f"landscape-lab --help: exit {cli.returncode}, "
          f"{len(cli.stdout.splitlines())} lines")


if __name__ == "__main__":
    main()
