"""landscape-ext: loss-landscape geometry for PyTorch.

The engine package: torch ops (``landscape_ext.ops``), their plain-PyTorch references
(``landscape_ext.reference``) and the curvature algorithms built on them. ARCHITECTURE.md says
where each concern lives.
"""
from ._extension import build_info, load_extension
from ._model import ParameterLayout, differentiable_attention

_C = load_extension()

# ops need the compiled library loaded first
from . import distributed, ops, reference  # noqa: E402
from .blocks import (BlockDensities, BlockSpectra, block_eigsh,  # noqa: E402
                     block_spectral_density, parameter_blocks)
from .density import DensityCurve, SpectralDensityResult, spectral_density  # noqa: E402
from .distributed import RankFailure, is_main_process  # noqa: E402
from .estimators import DiagonalResult, TraceResult, diagonal, trace  # noqa: E402
from .gradients import (  # noqa: E402
    compare_covariance_to_hessian_diagonal, gradient_covariance_svd,
    gradient_in_top_hessian_subspace, gradient_rank, per_sample_gradients, subspace_overlap,
)
from .lanczos import EigshResult, SpectralNormResult, eigsh, spectral_norm  # noqa: E402
from .mlp import (MLPStructure, NotAnMLP, mlp_apply_rows, mlp_hvp, mlp_matmat,  # noqa: E402
                  mlp_structure)
from .operators import (  # noqa: E402
    CallableOperator, CurvatureOperator, DenseOperator, GGNOperator, HessianOperator,
    as_operator, model_state_guard,
)
from .ops import (act_derivs, block_orthonormalize, linear_grad_project,  # noqa: E402
                  linear_grad_sketch, numerical_rank, orthogonalize_batched, xent_hvp)
from .results import Result  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "build_info", "ops", "reference", "distributed",
    # ops
    "block_orthonormalize", "orthogonalize_batched", "numerical_rank", "xent_hvp", "act_derivs",
    "linear_grad_sketch", "linear_grad_project",
    # operators and solvers
    "Result", "CurvatureOperator", "DenseOperator", "CallableOperator", "HessianOperator",
    "GGNOperator", "as_operator", "model_state_guard", "ParameterLayout",
    "differentiable_attention", "EigshResult", "SpectralNormResult",
    "eigsh", "spectral_norm", "TraceResult", "DiagonalResult", "trace", "diagonal",
    "SpectralDensityResult", "DensityCurve", "spectral_density", "block_eigsh",
    "block_spectral_density", "parameter_blocks", "BlockSpectra", "BlockDensities",
    # fused MLP products
    "mlp_hvp", "mlp_structure", "mlp_matmat", "mlp_apply_rows", "NotAnMLP", "MLPStructure",
    # gradient geometry
    "per_sample_gradients", "gradient_covariance_svd", "gradient_rank", "subspace_overlap",
    "gradient_in_top_hessian_subspace", "compare_covariance_to_hessian_diagonal",
    # distributed
    "RankFailure", "is_main_process",
]
