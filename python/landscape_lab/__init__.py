"""landscape-lab: the science layer of landscape-ext (fits, barriers, optimizers, experiments).

It calls only the public functions of :mod:`landscape_ext`.
"""
from .barriers import BarrierPath, barrier_height, barrier_location, interpolate
from .optim import (CurvatureAdaptiveLR, HybridHessianAdam, HybridHessianSGD, SharpnessTracker,
                    hessian_closure, hvp_operator)
from .rmt import (MarchenkoPasturFit, SemicircleFit, SpikeReport, bbp_threshold, detect_spikes,
                  fit_marchenko_pastur, fit_semicircle, spike_location, spike_strength)
from .scaling import (ArchitectureSearchResult, ScalingFit, architecture_search, fit_scaling_law,
                      phi)

__version__ = "0.1.0"

__all__ = [
    "fit_semicircle", "fit_marchenko_pastur", "detect_spikes", "bbp_threshold", "spike_location",
    "spike_strength", "SemicircleFit", "MarchenkoPasturFit", "SpikeReport",
    "fit_scaling_law", "phi", "architecture_search", "ScalingFit", "ArchitectureSearchResult",
    "interpolate", "barrier_height", "barrier_location", "BarrierPath",
    "CurvatureAdaptiveLR", "HybridHessianSGD", "HybridHessianAdam", "SharpnessTracker",
    "hessian_closure", "hvp_operator",
]
