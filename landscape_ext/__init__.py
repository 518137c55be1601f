"""landscape-ext: loss-landscape geometry for PyTorch.

The engine package: torch ops (``landscape_ext.ops``), their plain-PyTorch references
(``landscape_ext.reference``) and the curvature algorithms built on them.
"""
from ._extension import build_info, load_extension

_C = load_extension()

from . import ops, reference  # noqa: E402  (ops need the compiled library loaded first)
from .ops import block_orthonormalize, numerical_rank, orthogonalize_batched  # noqa: E402

# ---- curvature engine (operators, eigensolvers, estimators) -- exports added below ----------

# ---- end of engine exports -------------------------------------------------------------------

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "ops",
    "reference",
    "block_orthonormalize",
    "orthogonalize_batched",
    "numerical_rank",
]
