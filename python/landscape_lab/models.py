r"""Models of the proposal's studies, small by default (CPU), seeded, with parameter counts.

* :class:`MLP` — ``depth`` hidden layers of ``width`` units (an ``nn.Sequential`` of
  ``Flatten, Linear, act, ..., Linear``, the layout the engine's fused MLP products recognise).
* :class:`ResNet` — CIFAR-style ResNet (He et al. 2016, Sec. 4.2): a 3x3 stem, three stages of
  basic blocks at ``16 w, 32 w, 64 w`` channels (``w`` the width multiplier), global pooling
  and a linear head; ``depth`` counts basic blocks per stage (the classic ResNet-``6n+2`` has
  ``depth = n``).
* :class:`ViT` — a small vision Transformer (patch embedding, class token, pre-norm blocks).
* :class:`CausalTransformerLM` — a small decoder-only language model, tokens ``(B, T)`` ->
  logits ``(B, T, V)``.

Attention: ``attention="plain"`` (default) is ``softmax(q k^T / sqrt(h) + mask) v`` written out,
which supports forward-mode AD (the fast forward-over-reverse Hessian products);
``attention="sdpa"`` uses :func:`torch.nn.functional.scaled_dot_product_attention` (faster for
training, but it has no forward-mode AD: the curvature engine then falls back to double
backward in ``mode="auto"``).

Every constructor takes ``seed``: the parameters are initialised from that seed without touching
the global random state (:func:`torch.random.fork_rng`). :func:`build_model` builds any of them
from a ``(name, kwargs)`` spec, which is how checkpoints record their model
(:func:`model_spec`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "ResNet",
    "BasicBlock",
    "ViT",
    "CausalTransformerLM",
    "n_params",
    "build_model",
    "model_spec",
    "sequence_cross_entropy",
    "MODELS",
    "ACTIVATIONS",
]

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}


def n_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters (those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None


def _seeded_init(module: nn.Module, seed: Optional[int], init: Callable[[], None]) -> None:
    """Run ``init`` (which creates/initialises ``module``'s parameters) under ``seed`` without
    changing the global RNG state."""
    if seed is None:
        init()
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        init()


def _spec(module: nn.Module, name: str, kwargs: Dict[str, Any]) -> None:
    module._lab_spec = {"name": name, "kwargs": dict(kwargs)}  # type: ignore[attr-defined]


def model_spec(model: nn.Module) -> Dict[str, Any]:
    """``{"name", "kwargs"}`` that :func:`build_model` turns back into this architecture (models
    of this module only)."""
    spec = getattr(model, "_lab_spec", None)
    if spec is None:
        raise ValueError(f"model_spec: {type(model).__name__} was not built by landscape_lab.models")
    return {"name": spec["name"], "kwargs": dict(spec["kwargs"])}


# ------------------------------------------------------------------------------------------------
# MLP
# ------------------------------------------------------------------------------------------------


class MLP(nn.Sequential):
    """Fully connected network: ``Flatten, [Linear(., width), act] * depth, Linear(., n_classes)``.

    Parameters
    ----------
    in_dim : int
        Input features (inputs of any shape are flattened to ``in_dim``).
    width : int
        Hidden units per layer (``n`` of the scaling law).
    depth : int
        Hidden layers, ``>= 0`` (``L`` of the scaling law; ``depth + 1`` Linear layers).
    n_classes : int
        Outputs.
    activation : {"relu", "tanh", "gelu", "silu", "identity"}
    bias : bool
    seed : int, optional
        Initialisation seed (PyTorch's default Kaiming-uniform init).
    """

    def __init__(self, in_dim: int, width: int = 32, depth: int = 2, n_classes: int = 10,
                 activation: str = "tanh", bias: bool = True, seed: Optional[int] = 0):
        if in_dim < 1 or width < 1 or depth < 0 or n_classes < 1:
            raise ValueError(f"MLP: need in_dim >= 1, width >= 1, depth >= 0, n_classes >= 1, got "
                             f"in_dim={in_dim}, width={width}, depth={depth}, n_classes={n_classes}")
        super().__init__()
        self.in_dim, self.width, self.depth, self.n_classes = in_dim, width, depth, n_classes

        def init():
            self.append(nn.Flatten())
            d = in_dim
            for _ in range(depth):
                self.append(nn.Linear(d, width, bias=bias))
                self.append(_activation(activation))
                d = width
            self.append(nn.Linear(d, n_classes, bias=bias))

        _seeded_init(self, seed, init)
        _spec(self, "mlp", dict(in_dim=in_dim, width=width, depth=depth, n_classes=n_classes,
                                activation=activation, bias=bias, seed=seed))


# ------------------------------------------------------------------------------------------------
# CIFAR-style ResNet
# ------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm (or none) and an identity / 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: bool = True):
        super().__init__()
        Norm = nn.BatchNorm2d if norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not norm)
        self.bn1 = Norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=not norm)
        self.bn2 = Norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=not norm),
                                          Norm(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet with a width multiplier.

    Parameters
    ----------
    depth : int
        Basic blocks per stage (``n``; the network has ``6 n + 2`` weight layers, e.g. ``n = 3``
        is ResNet-20).
    width : int
        Channels of the first stage (stages have ``width, 2 width, 4 width``; 16 is the classic).
    n_classes, in_channels : int
    norm : bool
        BatchNorm after every convolution (the engine evaluates curvature with the running
        statistics by default).
    seed : int, optional
    """

    def __init__(self, depth: int = 1, width: int = 8, n_classes: int = 10, in_channels: int = 3,
                 norm: bool = True, seed: Optional[int] = 0):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"ResNet: depth and width must be >= 1, got depth={depth}, "
                             f"width={width}")
        self.width, self.depth, self.n_classes = width, depth, n_classes

        def init():
            self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=not norm)
            self.bn = nn.BatchNorm2d(width) if norm else nn.Identity()
            blocks = []
            c = width
            for stage, c_out in enumerate((width, 2 * width, 4 * width)):
                for i in range(depth):
                    stride = 2 if (stage > 0 and i == 0) else 1
                    blocks.append(BasicBlock(c, c_out, stride, norm))
                    c = c_out
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Linear(c, n_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        _seeded_init(self, seed, init)
        _spec(self, "resnet", dict(depth=depth, width=width, n_classes=n_classes,
                                   in_channels=in_channels, norm=norm, seed=seed))

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------------------------------------
# attention and Transformer blocks
# ------------------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with a plain (forward-AD friendly) or SDPA implementation."""

    def __init__(self, dim: int, heads: int, causal: bool = False, attention: str = "plain"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"MultiHeadAttention: dim = {dim} is not divisible by heads = {heads}")
        if attention not in ("plain", "sdpa"):
            raise ValueError(f"attention must be 'plain' or 'sdpa', got {attention!r}")
        self.heads, self.causal, self.attention = heads, causal, attention
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            s = (q @ k.transpose(-2, -1)) / math.sqrt(D // h)
            if self.causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
                s = s.masked_fill(mask, float("-inf"))
            y = torch.softmax(s, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (GELU)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, causal: bool = False,
                 attention: str = "plain"):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, causal, attention)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Small vision Transformer: non-overlapping patches, class token, learned positions.

    Parameters
    ----------
    image_size, patch_size, in_channels : int
    width : int
        Embedding dimension.
    depth : int
        Transformer blocks.
    heads, mlp_ratio, n_classes : int
    attention : {"plain", "sdpa"}
    seed : int, optional
    """

    def __init__(self, image_size: int = 32, patch_size: int = 8, in_channels: int = 3,
                 width: int = 32, depth: int = 2, heads: int = 4, mlp_ratio: int = 2,
                 n_classes: int = 10, attention: str = "plain", seed: Optional[int] = 0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"ViT: image_size = {image_size} is not a multiple of patch_size = "
                             f"{patch_size}")
        self.width, self.depth, self.n_classes = width, depth, n_classes
        n_patches = (image_size // patch_size) ** 2

        def init():
            self.patch = nn.Conv2d(in_channels, width, patch_size, patch_size)
            self.cls = nn.Parameter(torch.zeros(1, 1, width))
            self.pos = nn.Parameter(torch.randn(1, n_patches + 1, width) * 0.02)
            self.blocks = nn.Sequential(*[TransformerBlock(width, heads, mlp_ratio, False,
                                                           attention) for _ in range(depth)])
            self.ln = nn.LayerNorm(width)
            self.head = nn.Linear(width, n_classes)

        _seeded_init(self, seed, init)
        _spec(self, "vit", dict(image_size=image_size, patch_size=patch_size,
                                in_channels=in_channels, width=width, depth=depth, heads=heads,
                                mlp_ratio=mlp_ratio, n_classes=n_classes, attention=attention,
                                seed=seed))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)                       # (B, P, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.blocks(x)
        return self.head(self.ln(x[:, 0]))


class CausalTransformerLM(nn.Module):
    """Small decoder-only language model: tokens ``(B, T)`` -> logits ``(B, T, vocab_size)``.

    Parameters
    ----------
    vocab_size : int
    width : int
        Embedding dimension.
    depth : int
        Transformer blocks.
    heads, mlp_ratio : int
    max_len : int
        Longest sequence (learned positions).
    attention : {"plain", "sdpa"}
    tie_weights : bool
        Output projection shares the token embedding.
    seed : int, optional
    """

    def __init__(self, vocab_size: int, width: int = 32, depth: int = 2, heads: int = 4,
                 mlp_ratio: int = 2, max_len: int = 64, attention: str = "plain",
                 tie_weights: bool = False, seed: Optional[int] = 0):
        super().__init__()
        self.vocab_size, self.width, self.depth, self.max_len = vocab_size, width, depth, max_len

        def init():
            self.tok = nn.Embedding(vocab_size, width)
            self.pos = nn.Parameter(torch.randn(1, max_len, width) * 0.02)
            self.blocks = nn.Sequential(*[TransformerBlock(width, heads, mlp_ratio, True,
                                                           attention) for _ in range(depth)])
            self.ln = nn.LayerNorm(width)
            self.head = nn.Linear(width, vocab_size, bias=False)
            if tie_weights:
                self.head.weight = self.tok.weight

        _seeded_init(self, seed, init)
        _spec(self, "lm", dict(vocab_size=vocab_size, width=width, depth=depth, heads=heads,
                               mlp_ratio=mlp_ratio, max_len=max_len, attention=attention,
                               tie_weights=tie_weights, seed=seed))

    def forward(self, tokens: Tensor) -> Tensor:
        T = tokens.shape[1]
        if T > self.max_len:
            raise ValueError(f"CausalTransformerLM: sequence length {T} exceeds max_len = "
                             f"{self.max_len}")
        x = self.tok(tokens) + self.pos[:, :T]
        return self.head(self.ln(self.blocks(x)))


def sequence_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``(B, T, V)`` logits against ``(B, T)`` token targets.

    ``reduction="mean"`` averages over all tokens (the batch-mean loss the curvature operators
    expect); ``"none"`` returns the per-sequence mean ``(B,)`` (per-sample losses for the
    gradient-covariance functions).
    """
    B, T, V = logits.shape
    tok = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T), reduction="none")
    if reduction == "mean":
        return tok.mean()
    if reduction == "none":
        return tok.reshape(B, T).mean(1)
    if reduction == "sum":
        return tok.sum()
    raise ValueError(f"sequence_cross_entropy: unknown reduction {reduction!r}")


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "resnet": ResNet,
    "vit": ViT,
    "lm": CausalTransformerLM,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name (``mlp``, ``resnet``, ``vit``, ``lm``) with constructor kwargs."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"build_model: unknown model {name!r}; choose from {sorted(MODELS)}") \
            from None
    return cls(**kwargs)


def default_model_kwargs(name: str, input_shape: Tuple[int, ...], n_classes: int,
                         width: Optional[int] = None, depth: Optional[int] = None,
                         **extra: Any) -> Dict[str, Any]:
    """Constructor kwargs of model ``name`` fitted to a data set's ``input_shape`` and
    ``n_classes`` (for language models ``n_classes`` is the vocabulary size)."""
    kw: Dict[str, Any] = {}
    if name == "mlp":
        kw = dict(in_dim=int(math.prod(input_shape)), n_classes=n_classes)
    elif name == "resnet":
        if len(input_shape) != 3:
            raise ValueError(f"resnet needs image inputs (C, H, W), got input shape {input_shape}")
        kw = dict(in_channels=input_shape[0], n_classes=n_classes)
    elif name == "vit":
        if len(input_shape) != 3:
            raise ValueError(f"vit needs image inputs (C, H, W), got input shape {input_shape}")
        size = input_shape[1]
        patch = next(p for p in (8, 4, 2, 1) if size % p == 0 and (size // p >= 2 or p == 1))
        kw = dict(in_channels=input_shape[0], image_size=size, patch_size=patch,
                  n_classes=n_classes)
    elif name == "lm":
        kw = dict(vocab_size=n_classes, max_len=max(int(input_shape[0]), 1))
    else:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    if width is not None:
        kw["width"] = int(width)
    if depth is not None:
        kw["depth"] = int(depth)
    kw.update(extra)
    return kw
