r"""Curvature-aware optimization: a curvature-adaptive learning rate, the hybrid
Hessian-eigenvector optimizers and a sharpness tracker.

* :class:`CurvatureAdaptiveLR` — :math:`\eta_t = \eta_0 / (1 + \gamma \|H_t\|_2)` for any
  :class:`torch.optim.Optimizer` (``adaptive_lr.py``);
* :class:`HybridHessianSGD` / :class:`HybridHessianAdam` — a gradient (or Adam) step plus a
  step along the top Hessian eigenvector (``hybrid.py``);
* :class:`SharpnessTracker` and :func:`eos_threshold` — :math:`\lambda_{\max}` over training next
  to the edge-of-stability threshold (``sharpness.py``);
* :func:`hessian_closure` / :func:`hvp_operator` — the curvature sources they all take
  (``curvature.py``).

Curvature closures, the warm-started estimate, the edge-of-stability threshold and a typical
loop: docs/optim.md.
"""
from .adaptive_lr import CurvatureAdaptiveLR
# the type aliases stay importable from here, as before the split
from .curvature import CurvatureClosure, CurvatureSource  # noqa: F401
from .curvature import hessian_closure, hvp_operator
from .hybrid import HybridHessianAdam, HybridHessianSGD
from .sharpness import SharpnessTracker, eos_threshold

__all__ = [
    "CurvatureAdaptiveLR",
    "HybridHessianSGD",
    "HybridHessianAdam",
    "SharpnessTracker",
    "hessian_closure",
    "hvp_operator",
    "eos_threshold",
]
