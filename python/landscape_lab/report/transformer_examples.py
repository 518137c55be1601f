"""The transformer examples of the report: a causal language model (``tiny-lm``) and a vision
transformer (``vit``), both built from ``torch.nn`` layers (``nn.TransformerEncoder``), with data
the package generates or reads from a directory (never downloaded).

* :func:`markov_text` — token sequences from a seeded second-order Markov chain with a known
  best possible loss (``info["optimal_loss"]``); it lives in :mod:`landscape_lab.data` (the
  sweep's ``synthetic-text`` data set) and is re-exported here.
* :func:`wikitext_chars` — WikiText-2 at character level from ``wiki.train.tokens`` and
  ``wiki.valid.tokens``.
* :func:`template_images` — images made of a smooth random template per class plus white noise,
  with the Bayes accuracy as the ceiling (``info["bayes_accuracy"]``); in
  :mod:`landscape_lab.data` (the sweep's ``gaussian-images``), re-exported here.
* :class:`TinyCausalLM`, :class:`TinyViT` — the models; :func:`transformer_blocks` their
  parameter blocks by kind (embeddings, attention, mlp, norms, head).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

import landscape_ext as le

from .._results import PathLike
from ..data import Dataset, _find_dir, _missing, markov_text, template_images
from ..models import _seeded_init

__all__ = ["TinyCausalLM", "TinyViT", "markov_text", "wikitext_chars", "template_images",
           "transformer_blocks"]


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------


def _encoder(width: int, depth: int, heads: int, mlp_ratio: int) -> nn.TransformerEncoder:
    """Pre-norm encoder blocks (GELU MLP, no dropout: the measured loss is deterministic)."""
    if width % heads:
        raise ValueError(f"transformer example: width = {width} is not divisible by "
                         f"heads = {heads}")
    layer = nn.TransformerEncoderLayer(width, heads, mlp_ratio * width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class TinyCausalLM(nn.Module):
    """Decoder-only language model: token and position embeddings, ``depth`` pre-norm encoder
    blocks under a causal mask, a final LayerNorm and a linear head; tokens ``(B, T)`` ->
    logits ``(B, T, vocab_size)``.

    Parameters
    ----------
    vocab_size, width, depth, heads, mlp_ratio : int
    max_len : int
        Longest sequence (learned positions).
    seed : int, optional
        Initialisation seed (the global random state is left alone).
    """

    def __init__(self, vocab_size: int, width: int = 32, depth: int = 2, heads: int = 4,
                 mlp_ratio: int = 2, max_len: int = 32, seed: Optional[int] = 0):
        super().__init__()
        self.max_len = max_len

        def init():
            self.embed = nn.Embedding(vocab_size, width)
            self.pos = nn.Parameter(0.02 * torch.randn(max_len, width))
            self.encoder = _encoder(width, depth, heads, mlp_ratio)
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, vocab_size)

        _seeded_init(self, seed, init)
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).triu(1),
                             persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"TinyCausalLM: sequence length {t} exceeds max_len = "
                             f"{self.max_len}")
        h = self.embed(tokens) + self.pos[:t]
        h = self.encoder(h, mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(h))


class TinyViT(nn.Module):
    """Vision transformer: a strided convolution cuts the image into ``patch_size`` patches and
    embeds them, a class token and learned positions are added, ``depth`` pre-norm encoder
    blocks, a final LayerNorm of the class token (``pool="cls"``) or of the mean over tokens
    (``pool="mean"``), a linear head.

    Parameters
    ----------
    image_size, patch_size, in_channels, n_classes, width, depth, heads, mlp_ratio : int
    pool : {"cls", "mean"}
    seed : int, optional
    """

    def __init__(self, image_size: int = 32, patch_size: int = 8, in_channels: int = 3,
                 n_classes: int = 10, width: int = 32, depth: int = 2, heads: int = 4,
                 mlp_ratio: int = 2, pool: str = "cls", seed: Optional[int] = 0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"TinyViT: image_size = {image_size} is not a multiple of "
                             f"patch_size = {patch_size}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"TinyViT: pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        n_tokens = (image_size // patch_size) ** 2 + 1

        def init():
            self.patch = nn.Conv2d(in_channels, width, patch_size, patch_size)
            self.cls = nn.Parameter(torch.zeros(1, 1, width))
            self.pos = nn.Parameter(0.02 * torch.randn(1, n_tokens, width))
            self.encoder = _encoder(width, depth, heads, mlp_ratio)
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, n_classes)

        _seeded_init(self, seed, init)

    def forward(self, images: Tensor) -> Tensor:
        h = self.patch(images).flatten(2).transpose(1, 2)                  # (B, P, width)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        h = self.encoder(h)
        return self.head(self.norm(h[:, 0] if self.pool == "cls" else h.mean(1)))


def transformer_blocks(model: nn.Module) -> Dict[str, List[str]]:
    """Parameter names by kind: :func:`landscape_ext.parameter_blocks` with ``"kinds"``, except
    that a ViT's patch-embedding convolution counts with the embeddings (the preset puts every
    convolution with ``mlp``)."""
    blocks = le.parameter_blocks(model, "kinds")
    patch = [n for n in blocks.get("mlp", []) if n.startswith("patch.")]
    if patch:
        blocks["mlp"] = [n for n in blocks["mlp"] if n not in patch]
        blocks["embeddings"] = patch + blocks.get("embeddings", [])
        if not blocks["mlp"]:
            del blocks["mlp"]
    order = ("embeddings", "attention", "mlp", "norms", "head")
    return {k: blocks[k] for k in sorted(blocks, key=lambda k: (
        order.index(k) if k in order else len(order), k))}


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------


#: Token-file names of WikiText-2 (the ``wikitext-2-v1`` archive) and of its raw variant.
_WIKI_NAMES = (("wiki.train.tokens", "wiki.valid.tokens"), ("wiki.train.raw", "wiki.valid.raw"))
_WIKI_URL = ("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip "
             "(or the Hugging Face 'wikitext-2-v1' files)")


def _wiki_files(root: PathLike) -> Tuple[Path, Path]:
    """``(train, valid)`` token files under ``root``, ``root/wikitext-2`` or
    ``root/wikitext-2-raw`` (``.tokens`` first, else ``.raw``); missing ones raise
    :class:`~landscape_lab.data.DataFileNotFoundError`."""
    for names in _WIKI_NAMES:
        for folder in ("wikitext-2", "wikitext-2-raw"):
            d = _find_dir(root, folder, [names[0]])
            if (d / names[0]).exists():
                for name in names:
                    if not (d / name).exists():
                        raise _missing(d / name, "report --example tiny-lm --data-dir", _WIKI_URL,
                                       f" (expected {' and '.join(names)})")
                return d / names[0], d / names[1]
    raise _missing(_find_dir(root, "wikitext-2", [_WIKI_NAMES[0][0]]) / _WIKI_NAMES[0][0],
                   "report --example tiny-lm --data-dir", _WIKI_URL,
                   f" (expected {' and '.join(_WIKI_NAMES[0])}, or the raw variant's "
                   f"{' and '.join(_WIKI_NAMES[1])})")


def wikitext_chars(root: PathLike, seq_len: int = 32, n_train: int = 2048, n_test: int = 256,
                   max_vocab: int = 96) -> Dataset:
    """WikiText-2 at character level: the first ``n_train`` (``n_test``) non-overlapping
    windows of ``seq_len + 1`` characters of ``wiki.train.tokens`` (``wiki.valid.tokens``).

    The vocabulary is the ``max_vocab - 1`` most frequent characters of the training windows
    (ties by character) plus ``<unk>`` (id 0) for every other character. Line breaks count as
    characters.

    Parameters
    ----------
    root : path
        Directory holding the token files, or its parent holding ``wikitext-2/`` (or
        ``wikitext-2-raw/`` with ``wiki.train.raw`` and ``wiki.valid.raw``).
    seq_len, n_train, n_test, max_vocab : int

    Raises
    ------
    DataFileNotFoundError
        A token file is missing (the message names it and the directory).
    ValueError
        A file is too short for one window.
    """
    if seq_len < 1 or n_train < 1 or n_test < 1 or max_vocab < 2:
        raise ValueError(f"wikitext_chars: need seq_len, n_train, n_test >= 1 and max_vocab >= 2, "
                         f"got seq_len={seq_len}, n_train={n_train}, n_test={n_test}, "
                         f"max_vocab={max_vocab}")
    texts, files = {}, _wiki_files(root)
    for split, path, n in zip(("train", "test"), files, (n_train, n_test)):
        with open(path, encoding="utf-8") as f:
            texts[split] = f.read(n * (seq_len + 1))
        if len(texts[split]) < seq_len + 1:
            raise ValueError(f"wikitext_chars: {path} has {len(texts[split])} characters, fewer "
                             f"than one window of seq_len + 1 = {seq_len + 1}")
    counts = Counter(texts["train"])
    ordered = sorted(counts, key=lambda c: (-counts[c], c))[:max_vocab - 1]
    stoi = {c: i + 1 for i, c in enumerate(ordered)}

    def windows(text: str) -> Tuple[Tensor, Tensor]:
        ids = torch.tensor([stoi.get(c, 0) for c in text], dtype=torch.int64)
        n_seq = ids.numel() // (seq_len + 1)
        w = ids[:n_seq * (seq_len + 1)].reshape(n_seq, seq_len + 1)
        return w[:, :-1], w[:, 1:]

    (xtr, ytr), (xte, yte) = windows(texts["train"]), windows(texts["test"])
    return Dataset(name="wikitext2-chars", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte,
                   n_classes=len(stoi) + 1, input_shape=(seq_len,), data_dim=seq_len,
                   task="language_model",
                   info=dict(files=[str(p) for p in files],
                             vocab_size=len(stoi) + 1, seq_len=seq_len,
                             characters_head="".join(ordered[:20])))
