"""Benchmark blockwise spectra: block_eigsh (all blocks in lockstep, one batched product per
step) against one eigsh run per block, side by side in one run.

    python bench/bench_blocks.py            # a small causal transformer LM on generated tokens
    python bench/bench_blocks.py --quick

The model: embeddings + positional embeddings, ``--layers`` pre-norm ``nn.TransformerEncoderLayer``
(GELU, causal mask), a final LayerNorm and a linear head, cross-entropy over the tokens; the
Hessian of the mean loss on one batch. Blocks: the ``kinds`` preset (embeddings, attention, norms,
mlp, head). Correctness first: each block's top-k from both methods must agree (relative 1e-6 at
tol 1e-8 in float64). Reported: seconds (median of ``--repeats`` interleaved rounds), batched
products, directions multiplied.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_spectrum import TinyLM  # noqa: E402
from common import machine_info, markdown_table, time_interleaved, write_results  # noqa: E402

import landscape_ext as le  # noqa: E402


def _per_block(op, blocks, k, tol):
    """One eigsh per block on the restricted operator (the baseline)."""
    out, products = {}, 0
    for name, names in blocks.items():
        idx = op.layout.indices(names)

        def restricted(X, idx=idx):
            full = torch.zeros(X.shape[0], op.d, dtype=op.dtype)
            full[:, idx] = X
            return op.apply_rows(full)[:, idx]

        sub = le.CallableOperator(restricted, idx.numel(), op.dtype, rows=True)
        res = le.eigsh(sub, k=min(k, idx.numel()), tol=tol)
        out[name] = res
        products += res.n_matvecs
    return out, products


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 layer, width 32")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-basis", type=int, default=200, help="Lanczos steps per block at most")
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    args = p.parse_args(argv)
    layers, width = (1, 32) if args.quick else (args.layers, args.width)
    torch.manual_seed(0)
    vocab, seq, batch = 50, 32, 16
    model = TinyLM(vocab, width, layers, 4, seq).double()
    tokens = torch.randint(0, vocab, (batch, seq))
    targets = torch.roll(tokens, -1, 1).reshape(-1)
    op = le.HessianOperator(model, nn.CrossEntropyLoss(), (tokens, targets))
    blocks = le.parameter_blocks(model, "kinds")
    tol = 1e-8
    # no restart in block_eigsh: give it a basis long enough to converge at this tight tol
    steps = args.max_basis
    ours = le.block_eigsh(op, blocks, k=args.k, tol=tol, max_basis=steps)
    assert all(bool(r.converged.all()) for r in ours.values()), "raise --max-basis"
    base, base_products = _per_block(op, blocks, args.k, tol)
    for name in blocks:   # correctness before timing
        a, b = ours[name].eigenvalues, base[name].eigenvalues
        err = float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())
        assert err < 1e-6, (name, a, b)
    times = time_interleaved({"block_eigsh": lambda: le.block_eigsh(op, blocks, k=args.k, tol=tol,
                                                                    max_basis=steps),
                              "eigsh per block": lambda: _per_block(op, blocks, args.k, tol)},
                             repeats=args.repeats)
    rows = [{"impl": "block_eigsh (lockstep)", "seconds": times["block_eigsh"],
             "batched products": ours.n_products, "directions": ours.n_matvecs,
             "speedup": times["eigsh per block"] / times["block_eigsh"]},
            {"impl": "eigsh per block (baseline)", "seconds": times["eigsh per block"],
             "batched products": base_products, "directions": base_products, "speedup": 1.0}]
    print(f"LM: {layers} layers, width {width}, d = {op.d}, {len(blocks)} blocks "
          f"({', '.join(f'{n} {s}' for n, s in ours.sizes.items())}), top-{args.k}")
    print(markdown_table(rows, ["impl", "seconds", "batched products", "directions", "speedup"]))
    print("lambda_1 per block:", {n: round(v, 6) for n, v in ours.summary()["lambda_1"].items()})
    path = write_results("blocks_cpu" + ("_quick" if args.quick else ""),
                         {"machine": machine_info("cpu"), "d": op.d, "k": args.k,
                          "sizes": ours.sizes, "rows": rows, "summary": ours.summary()},
                         args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
