"""Hessian spectrum of your own transformer, written with torch.nn's layers.

A small causal language model (nn.Embedding + nn.TransformerEncoder with a causal mask + a linear
head) is trained briefly on tokens from a random Markov chain (generated here, no download),
then: the top-k Hessian eigenvalues, the trace, and the spectra of the blocks of parameters
(embeddings, attention, MLP, norms, head). Nothing in the model is written for the library:
attention runs through torch's own SDPA, which the engine handles (README, "The curvature
engine").

    python examples/transformer_spectrum.py                   # ~20 s on a 2-core CPU
    python examples/transformer_spectrum.py --width 64 --layers 2 --out out/lm-spectrum
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import landscape_ext as lx


class CausalLM(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.1, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).triu(1))

    def forward(self, tokens):
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        h = self.blocks(h, mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def markov_tokens(n: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    """Sequences from a random sparse Markov chain (each token has 3 likely successors)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=g)
    top = logits.topk(3, dim=1).indices
    P = torch.full((vocab, vocab), 0.02 / vocab).scatter_(1, top, 0.98 / 3)
    x = torch.empty(n, seq, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, seq):
        x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=g)[:, 0]
    return x


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--steps", type=int, default=150, help="training steps before measuring")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for results.json")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    data = markov_tokens(512, args.seq + 1, args.vocab, args.seed)
    inputs, targets = data[:, :-1], data[:, 1:]
    model = CausalLM(args.vocab, args.width, args.layers, 4, args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        rows = torch.randint(0, 448, (32,))
        loss = lm_loss(model(inputs[rows]), targets[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    batch = (inputs[448:], targets[448:])          # 64 held-out sequences
    H = lx.HessianOperator(model, lm_loss, batch)
    top = lx.eigsh(H, k=args.k, tol=1e-4)
    trace = lx.trace(H, 60)
    blocks = lx.block_eigsh(H, "kinds", k=1, tol=1e-4)
    densities = lx.block_spectral_density(H, "kinds", n_steps=24, n_probes=4)
    summary = densities.summary()
    print(f"d = {H.d}, train loss {loss.item():.3f}, attention backend {H.attention_backend}, "
          f"products in mode {H.mode_used}")
    print(f"top-{args.k}: {[round(v, 4) for v in top.eigenvalues.tolist()]} "
          f"({top.n_matvecs} products, converged {bool(top.converged.all())})")
    print(f"trace: {trace.estimate:.4g} +- {trace.stderr:.2g}")
    for name, res in blocks.items():
        print(f"  {name:10s} d_b = {blocks.sizes[name]:6d}  lambda_1 = {float(res.eigenvalues[0]):.4g}"
              f"  tr/d_b = {summary['trace_per_dim'][name]:.3g}")
    print(f"block_eigsh: {blocks.n_products} batched products for {len(blocks)} blocks")
    result = {"d": H.d, "top": top.eigenvalues.tolist(), "trace": trace.estimate,
              "blocks": {n: float(r.eigenvalues[0]) for n, r in blocks.items()},
              "block_summary": summary}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(lx.results.to_builtin(result),
                                                                indent=1))
    return result


if __name__ == "__main__":
    main()
