r"""Exact Hessian and GGN products of MLPs for k directions at once (Pearlmutter, batched).

For a stack of ``nn.Linear`` layers and pointwise activations (ReLU, exact GELU, tanh, SiLU,
identity) ending in cross-entropy or MSE, :func:`mlp_hvp` computes :math:`HV` or :math:`GV` for
``V`` of shape ``(d, k)`` without autograd: one forward pass (storing :math:`z_l`, :math:`a_l`,
:math:`\sigma'`, :math:`\sigma''`), for the Hessian one first-order backward pass (storing
:math:`\delta_l` and :math:`g_{a_l} \odot \sigma''_l`), then Pearlmutter's R-forward and R-backward
with the k directions stacked into every matrix product. With :math:`a_0 = x`,
:math:`z_l = a_{l-1} W_l^\top + b_l`, :math:`a_l = \sigma_l(z_l)` and a direction
:math:`(\dot W_l, \dot b_l)`:

.. math::
    R z_l &= R a_{l-1} W_l^\top + a_{l-1} \dot W_l^\top + \dot b_l, \qquad
    R a_l = \sigma_l' \odot R z_l \\
    R g_{a_L} &= \nabla^2_f \ell \; R f \quad (\text{cross-entropy: } p \odot r - p\,(p^\top r);
    \ \text{MSE: } 2 r / \text{numel}) \\
    R\delta_l &= \sigma_l' \odot R g_{a_l} + [\,g_{a_l} \odot \sigma_l'' \odot R z_l\,] \\
    R g_{W_l} &= R\delta_l^\top a_{l-1} + [\,\delta_l^\top R a_{l-1}\,], \qquad
    R g_{b_l} = \textstyle\sum_{\text{batch}} R\delta_l \\
    R g_{a_{l-1}} &= R\delta_l W_l + [\,\delta_l \dot W_l\,]

The bracketed terms are the Hessian's and are dropped for the GGN
:math:`G = J^\top \nabla^2_f \ell\, J`. Directions are kept in the layout ``(k, batch, width)``:
products with a shared weight are one GEMM over all ``k B`` rows (``(k B, n_in) @ (n_in, n_out)``),
products with the per-direction :math:`\dot W_j` one batched GEMM (``bmm`` with the activations
broadcast over the directions, reading :math:`\dot W_j` in place from the direction rows). Per
layer and direction that is 6 matrix products of the size of the forward one for the Hessian
(R-forward 2, R-backward 4) and 4 for the GGN, against 3 for a gradient.

The activation derivatives come from the op :func:`landscape_ext.ops.act_derivs` and the
cross-entropy Hessian from :func:`landscape_ext.ops.xent_hvp`; whether they run their kernels or
their plain-PyTorch composites is decided in :mod:`landscape_ext.ops` (``fused=None``, the
default) or forced by ``fused=True`` / ``False``. The loss derivatives come from the engine's
loss layer (:mod:`landscape_ext._losses`).

Engine interface: :func:`mlp_structure` recognises the model (``None`` otherwise),
:func:`mlp_matmat` / :func:`mlp_apply_rows` multiply flat directions laid out in
``model.named_parameters()`` order (the parameters given in ``params``, in that mapping's order),
and :class:`MLPBackend` is the fused path of the model operators.
"""

from .backend import MLPBackend
from .products import (FUSED_DEFAULT, MLPCurvature, _loss_config, mlp_apply_rows, mlp_hvp,  # noqa: F401
                       mlp_matmat)
from .structure import MLPLayer, MLPStructure, NotAnMLP, mlp_structure

__all__ = [
    "NotAnMLP",
    "MLPLayer",
    "MLPStructure",
    "mlp_structure",
    "mlp_matmat",
    "mlp_apply_rows",
    "MLPCurvature",
    "mlp_hvp",
    "MLPBackend",
    "FUSED_DEFAULT",
]
