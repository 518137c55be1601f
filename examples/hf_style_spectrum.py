"""Hessian spectrum of a model that computes its own loss, HuggingFace style.

Models from `transformers` take a dict batch (``input_ids``, ``attention_mask``, ``labels``) and
return an output with ``.loss`` and ``.logits``; the engine takes such a model as it is:
``HessianOperator(model, None, batches)`` runs ``model(**batch)`` and differentiates
``outputs.loss``. With `transformers` installed, ``--gpt2`` uses a tiny randomly initialized
``GPT2LMHeadModel``; without it, a stand-in module with the same calling convention.

    python examples/hf_style_spectrum.py
    python examples/hf_style_spectrum.py --gpt2        # needs `pip install transformers`
"""
from __future__ import annotations

import argparse
import types

import torch
import torch.nn.functional as F
from torch import nn

import landscape_ext as lx


class StandIn(nn.Module):
    """``model(input_ids, attention_mask=None, labels=None)`` -> ``.loss`` / ``.logits``, with
    next-token labels shifted inside the model as HuggingFace causal LMs do."""

    def __init__(self, vocab: int = 32, width: int = 32, seq: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq, width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        t = input_ids.shape[1]
        h = self.embed(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        padding = None if attention_mask is None else attention_mask == 0
        a, _ = self.attn(h, h, h, attn_mask=causal, key_padding_mask=padding, need_weights=False)
        logits = self.head(self.norm(h + a))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return types.SimpleNamespace(loss=loss, logits=logits)


def tiny_gpt2(vocab: int, seq: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=32, n_layer=1, n_head=4,
                        attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpt2", action="store_true", help="a tiny transformers GPT-2")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    vocab, seq = 32, 16
    model = tiny_gpt2(vocab, seq) if args.gpt2 else StandIn(vocab, seq=seq)
    batches = []
    for size in (8, 8, 5):                 # uneven batches: weighted by their sizes
        ids = torch.randint(0, vocab, (size, seq))
        mask = torch.ones(size, seq, dtype=torch.long)
        mask[0, -3:] = 0                    # a padded sequence
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    H = lx.HessianOperator(model, None, batches)
    top = lx.eigsh(H, k=args.k, tol=1e-4)
    print(f"{type(model).__name__}: d = {H.d}, {H.n_samples} sequences in {len(batches)} batches")
    print(f"top-{args.k}: {[round(v, 5) for v in top.eigenvalues.tolist()]} "
          f"({top.n_matvecs} products, mode {H.mode_used}, attention {H.attention_backend})")
    return {"d": H.d, "top": top.eigenvalues.tolist()}


if __name__ == "__main__":
    main()
