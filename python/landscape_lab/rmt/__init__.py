"""Random-matrix fits of Hessian and covariance spectra: semicircle, Marchenko-Pastur, spikes.

The bulk of a Hessian spectrum is often close to Wigner's semicircle and the spectrum of a
gradient covariance close to the Marchenko-Pastur law; a few eigenvalues (spikes) leave the bulk.
This package fits the bulk, reports its edges and goodness of fit, and separates the spikes by the
finite-size (Tracy-Widom) fluctuation of the edge. The laws, the method and its caveats are in
``docs/rmt.md``.

Layout: ``laws`` (the two laws on their edges, Tracy-Widom scale), ``sample`` (eigenvalues or a
weighted density, weighted statistics), ``edge_fit`` (edge maximum likelihood, the bulk window,
the bootstrap; shared by both fits), ``semicircle``, ``marchenko_pastur``, ``spikes`` (BBP
formulas, :func:`detect_spikes`). Every public name is imported from here.
"""
from .marchenko_pastur import MarchenkoPasturFit, fit_marchenko_pastur
from .semicircle import SemicircleFit, fit_semicircle
from .spikes import SpikeReport, bbp_threshold, detect_spikes, spike_location, spike_strength

__all__ = [
    "SemicircleFit",
    "MarchenkoPasturFit",
    "SpikeReport",
    "fit_semicircle",
    "fit_marchenko_pastur",
    "detect_spikes",
    "bbp_threshold",
    "spike_location",
    "spike_strength",
]
