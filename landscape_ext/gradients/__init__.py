r"""Gradient geometry: per-sample gradients, the gradient-covariance spectrum by randomized SVD
(never forming the per-sample gradient matrix), gradient rank, subspace overlaps and the
proposal's claim ``C ~ diag(H)`` as a measured statement.

Conventions (in full, with the methods, the algorithm and data parallelism: docs/gradients.md):
``loss_fn(outputs, targets)`` returns per-sample losses ``(batch,)`` (``loss_fn=None``: sample
``i``'s loss is the loss the model computes itself on the one-sample batch ``i``); ``G`` is the
``n x d`` matrix of per-sample gradients, parameters flattened in ``named_parameters()`` order
(the layout of :class:`~landscape_ext.HessianOperator`); the covariance ``C = G_c^T G_c / n``
divides by ``n`` (centred or, with ``centered=False``, the second moment); ``singular_values``
are those of ``G_c / sqrt(n)``; models run in eval mode and are left unchanged; ``data`` must
yield the same samples in the same order on every pass.
"""
from ._method import SVD_METHODS
from .hessian_studies import (
    CovarianceHessianDiagonalResult, TopHessianSubspaceResult,
    compare_covariance_to_hessian_diagonal, gradient_in_top_hessian_subspace,
)
from .per_sample import iter_per_sample_gradients, per_sample_gradients
from .rank_and_overlap import (
    GradientRankResult, SubspaceOverlapResult, gradient_rank, subspace_overlap,
)
from .svd import GradientCovarianceSVDResult, gradient_covariance_svd

__all__ = [
    "per_sample_gradients",
    "iter_per_sample_gradients",
    "gradient_covariance_svd",
    "GradientCovarianceSVDResult",
    "gradient_rank",
    "GradientRankResult",
    "subspace_overlap",
    "SubspaceOverlapResult",
    "gradient_in_top_hessian_subspace",
    "TopHessianSubspaceResult",
    "compare_covariance_to_hessian_diagonal",
    "CovarianceHessianDiagonalResult",
    "SVD_METHODS",
]
