"""Recognising an MLP: :func:`mlp_structure` and the :class:`MLPStructure` it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from torch import nn

__all__ = ["NotAnMLP", "MLPLayer", "MLPStructure", "mlp_structure"]

_ACT_TYPES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.SiLU: "silu"}
_SKIP_TYPES = (nn.Identity, nn.Dropout)


class NotAnMLP(ValueError):
    """The model, loss or targets are outside what the MLP path handles (the message says why):
    use the generic (autograd) path instead."""


@dataclass(frozen=True)
class MLPLayer:
    """One ``nn.Linear`` and the activation after it.

    Attributes
    ----------
    weight : str
        Name of the weight in ``model.named_parameters()``.
    bias : str or None
        Name of the bias (None when the layer has none).
    act : str
        ``identity``, ``relu``, ``gelu``, ``tanh`` or ``silu``.
    in_features, out_features : int
    """

    weight: str
    bias: Optional[str]
    act: str
    in_features: int
    out_features: int


@dataclass
class MLPStructure:
    """A model recognised as an MLP (see :func:`mlp_structure`).

    Attributes
    ----------
    layers : tuple of MLPLayer
    flatten_input : bool
        The model starts with ``nn.Flatten()``: inputs ``(B, ...)`` are flattened to ``(B, n0)``.
    model : nn.Module
        The model (parameters not given to :func:`mlp_matmat` are read from it).
    verified : bool
        The layer list reproduces the model's forward: true by construction for (nested)
        ``nn.Sequential``; for another container it is checked against ``model(inputs)`` on the
        first product and a mismatch raises :class:`NotAnMLP`.
    """

    layers: Tuple[MLPLayer, ...]
    flatten_input: bool
    model: nn.Module = field(repr=False)
    verified: bool = True

    @property
    def param_names(self) -> List[str]:
        """Parameter names in layer order (weight, bias)."""
        out: List[str] = []
        for layer in self.layers:
            out.append(layer.weight)
            if layer.bias is not None:
                out.append(layer.bias)
        return out

    def describe(self) -> str:
        """E.g. ``"MLP 64-256(relu)-10"``."""
        dims = [str(self.layers[0].in_features)]
        for layer in self.layers:
            dims.append(f"{layer.out_features}" + ("" if layer.act == "identity"
                                                   else f"({layer.act})"))
        return "MLP " + "-".join(dims)


# ---- recognising an MLP --------------------------------------------------------------------------


def _leaves(module: nn.Module, prefix: str, out: List[Tuple[str, nn.Module]]) -> bool:
    """Collect the leaf modules in order; returns False when a non-Sequential container was
    traversed (its forward must then be checked)."""
    plain = True
    # hooks change the forward (or the gradients) in ways the layer stack does not see
    if any(getattr(module, attr, None) for attr in ("_forward_hooks", "_forward_pre_hooks",
                                                     "_backward_hooks", "_backward_pre_hooks")):
        raise NotAnMLP(f"module {prefix or type(module).__name__!r} ({type(module).__name__}) "
                       f"has forward or backward hooks")
    children = list(module.named_children())
    if not children:
        out.append((prefix, module))
        return True
    # a Sequential subclass that overrides forward is checked like any other container
    if not isinstance(module, nn.Sequential) or \
            type(module).forward is not nn.Sequential.forward:
        plain = False
    if any(True for _ in module.named_parameters(recurse=False)) or \
            any(True for _ in module.named_buffers(recurse=False)):
        raise NotAnMLP(f"module {prefix or type(module).__name__!r} ({type(module).__name__}) "
                       f"holds its own parameters or buffers")
    for name, child in children:
        plain &= _leaves(child, f"{prefix}.{name}" if prefix else name, out)
    return plain


def _act_name(m: nn.Module) -> Optional[str]:
    for t, name in _ACT_TYPES.items():
        if type(m) is t:
            return name
    if type(m) is nn.GELU:
        if m.approximate != "none":
            raise NotAnMLP("nn.GELU(approximate='tanh') is not supported (only the exact GELU)")
        return "gelu"
    return None


def _parse(model: nn.Module) -> MLPStructure:
    leaves: List[Tuple[str, nn.Module]] = []
    plain = _leaves(model, "", leaves)
    layers: List[MLPLayer] = []
    flatten = False
    pending: Optional[Tuple[str, nn.Linear]] = None  # a Linear waiting for its activation
    act_seen = False
    for name, m in leaves:
        if type(m) in _SKIP_TYPES:  # exact types: a subclass may override forward
            continue
        if type(m) is nn.Flatten:
            if layers or pending is not None or flatten:
                raise NotAnMLP(f"nn.Flatten at {name!r} is not at the front of the model")
            if m.start_dim != 1 or m.end_dim != -1:
                raise NotAnMLP(f"nn.Flatten at {name!r} must flatten dims 1..-1, got "
                               f"start_dim={m.start_dim}, end_dim={m.end_dim}")
            flatten = True
            continue
        if type(m) is nn.Linear:
            if pending is not None:
                layers.append(_layer(*pending, "identity"))
            pending = (name, m)
            act_seen = False
            continue
        act = _act_name(m)
        if act is None:
            raise NotAnMLP(f"module {name!r} ({type(m).__name__}) is not nn.Linear, a supported "
                           f"activation (ReLU, GELU, Tanh, SiLU), Identity, Dropout or a leading "
                           f"Flatten")
        if pending is None:
            raise NotAnMLP(f"activation {name!r} ({type(m).__name__}) "
                           + ("follows another activation" if act_seen else
                              "comes before the first nn.Linear"))
        layers.append(_layer(*pending, act))
        pending = None
        act_seen = True
    if pending is not None:
        layers.append(_layer(*pending, "identity"))
    if not layers:
        raise NotAnMLP("the model has no nn.Linear layer")
    for prev, nxt in zip(layers, layers[1:]):
        if prev.out_features != nxt.in_features:
            raise NotAnMLP(f"layer {nxt.weight!r} takes {nxt.in_features} features but the "
                           f"previous layer gives {prev.out_features}")
    names = {n for n, _ in model.named_parameters()}
    used = {n for layer in layers for n in (layer.weight, layer.bias) if n is not None}
    if names != used:
        raise NotAnMLP(f"parameters outside the Linear layers: {sorted(names - used)}")
    return MLPStructure(tuple(layers), flatten, model, verified=plain)


def _layer(name: str, m: nn.Linear, act: str) -> MLPLayer:
    return MLPLayer(weight=f"{name}.weight" if name else "weight",
                    bias=None if m.bias is None else (f"{name}.bias" if name else "bias"),
                    act=act, in_features=m.in_features, out_features=m.out_features)


def mlp_structure(model: nn.Module, strict: bool = False) -> Optional[MLPStructure]:
    """Recognise an MLP: ``nn.Sequential`` (nested allowed) of ``nn.Linear`` layers, each
    optionally followed by one activation (``nn.ReLU``, ``nn.GELU()`` exact, ``nn.Tanh``,
    ``nn.SiLU``), with ``nn.Identity`` / ``nn.Dropout`` (the engine runs in eval mode: dropout is
    the identity) anywhere and one ``nn.Flatten()`` allowed at the front. A module that is not a
    Sequential but whose children in order form such a stack (e.g. ``self.net = Sequential(...)``)
    is accepted too; its forward is checked against the stack on the first product.

    Parameters
    ----------
    model : nn.Module
    strict : bool
        Raise :class:`NotAnMLP` (with the reason) instead of returning None.

    Returns
    -------
    MLPStructure or None
    """
    try:
        if not isinstance(model, nn.Module):
            raise NotAnMLP(f"expected an nn.Module, got {type(model).__name__}")
        return _parse(model)
    except NotAnMLP:
        if strict:
            raise
        return None
