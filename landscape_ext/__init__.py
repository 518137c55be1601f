"""landscape-ext: loss-landscape geometry for PyTorch.

The engine package: torch ops (``landscape_ext.ops``), their plain-PyTorch references
(``landscape_ext.reference``) and the curvature algorithms built on them.
"""
from ._extension import build_info, load_extension

_C = load_extension()

from . import ops, reference  # noqa: E402  (ops need the compiled library loaded first)
from .ops import block_orthonormalize, numerical_rank, orthogonalize_batched  # noqa: E402

# ---- curvature engine (operators, eigensolvers, estimators) -- exports added below ----------
from .results import Result  # noqa: E402
from .operators import (  # noqa: E402
    CallableOperator, CurvatureOperator, DenseOperator, GGNOperator, HessianOperator,
    as_operator, model_state_guard,
)
from .lanczos import EigshResult, SpectralNormResult, eigsh, spectral_norm  # noqa: E402
from .estimators import DiagonalResult, TraceResult, diagonal, trace  # noqa: E402
from .density import DensityCurve, SpectralDensityResult, spectral_density  # noqa: E402

_ENGINE_EXPORTS = [
    "Result", "CurvatureOperator", "DenseOperator", "CallableOperator", "HessianOperator",
    "GGNOperator", "as_operator", "model_state_guard", "EigshResult", "SpectralNormResult",
    "eigsh", "spectral_norm", "TraceResult", "DiagonalResult", "trace", "diagonal",
    "SpectralDensityResult", "DensityCurve", "spectral_density",
]

from .ops import act_derivs, linear_grad_project, linear_grad_sketch, xent_hvp  # noqa: E402
from .mlp import MLPStructure, NotAnMLP, mlp_apply_rows, mlp_hvp, mlp_matmat, mlp_structure  # noqa: E402,E501
from .gradients import (  # noqa: E402
    compare_covariance_to_hessian_diagonal, gradient_covariance_svd,
    gradient_in_top_hessian_subspace, gradient_rank, per_sample_gradients, subspace_overlap,
)

_ENGINE_EXPORTS += [
    "xent_hvp", "act_derivs", "linear_grad_sketch", "linear_grad_project", "mlp_hvp",
    "mlp_structure", "mlp_matmat", "mlp_apply_rows", "NotAnMLP", "MLPStructure", "per_sample_gradients", "gradient_covariance_svd", "gradient_rank",
    "subspace_overlap", "gradient_in_top_hessian_subspace",
    "compare_covariance_to_hessian_diagonal",
]

from . import distributed  # noqa: E402
from .distributed import RankFailure, is_main_process  # noqa: E402

_ENGINE_EXPORTS += ["distributed", "RankFailure", "is_main_process"]

# ---- end of engine exports -------------------------------------------------------------------

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "ops",
    "reference",
    "block_orthonormalize",
    "orthogonalize_batched",
    "numerical_rank",
] + _ENGINE_EXPORTS
