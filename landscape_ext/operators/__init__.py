"""Curvature operators: Hessian and Gauss-Newton products of a model + loss over data.

* :mod:`.base` — the operator protocol (:class:`CurvatureOperator`: ``apply_rows``, ``@``,
  ``matmat``, ``to_scipy``, ``n_matvecs``), dense and callable operators, :func:`as_operator`;
* :mod:`.model` — :class:`ModelOperator`: the data pass, sample weighting, data-parallel
  reduction and the one decision of how a batch's product runs (``mode``);
* :mod:`.hessian` / :mod:`.ggn` — :class:`HessianOperator` and :class:`GGNOperator` (their
  autograd products; the fused MLP path is :class:`landscape_ext.mlp.MLPBackend`);
* :mod:`.sharded` — the operators of FSDP2-sharded models (local rows, finite differences of
  FSDP2's gradients), returned by ``HessianOperator`` / ``GGNOperator`` for such a model.

Conventions of the model operators: ``loss_fn(outputs, targets)`` returns the batch **mean**
(a scalar); products are the mean over all samples (batch ``b`` of ``n_b`` samples weighted
``n_b / N``); parameters are flattened in ``model.named_parameters()`` order (restricted to
``params``); the model is never changed (:func:`model_state_guard`); dropout is off and
BatchNorm uses its running statistics unless ``batch_norm="train"``. See README.md,
"The curvature engine".
"""
from .._model import model_state_guard, select_parameter_names  # noqa: F401 (re-exported)
from .base import CallableOperator, CurvatureOperator, DenseOperator, as_operator
from .ggn import GGNOperator
from .hessian import HessianOperator
from .model import FUSED_MLP_MODE, HVP_MODES, ModelOperator
from .modes import DOUBLE_BACKWARD_LOOP, ModeChooser, bucket_of
from .sharded import ShardedGGNOperator, ShardedHessianOperator, is_fsdp_model

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "CallableOperator",
    "ModelOperator",
    "HessianOperator",
    "GGNOperator",
    "as_operator",
    "model_state_guard",
    "HVP_MODES",
    "FUSED_MLP_MODE",
    "ShardedHessianOperator",
    "ShardedGGNOperator",
    "is_fsdp_model",
]
