"""Landscape reports: Markdown (and optionally HTML) with PNG figures and a ``results.json``.

* :func:`model_report` — one model: top-k Hessian eigenvalues, trace, spectral density with its
  semicircle fit and spikes, blockwise spectra (per parameter block), gradient-covariance
  spectrum and ranks, ``lambda_max`` over training, loss barrier (module :mod:`.model`, its
  text :mod:`.model_doc`);
* :func:`sweep_report` — a width x depth sweep: scaling-law fit, Phi over the grid, gap against
  gradient rank (module :mod:`.sweep`);
* :func:`example_report` — trains a built-in example (MLPs; a causal transformer LM and a
  ViT, models and data in :mod:`.transformer_examples`) and writes its model report (module
  :mod:`.examples`).

The document renderer is :mod:`.document`, the figures :mod:`.figures`. What each section
measures and says: docs/report.md.
"""
from __future__ import annotations

from .examples import EXAMPLES, example_config, example_report
from .model import SECTIONS, ReportConfig, ReportResult, model_report
from .sweep import sweep_report

# tests call the private verdict helper through the package
from .sweep import _rank_verdict  # noqa: F401

__all__ = ["ReportConfig", "ReportResult", "model_report", "sweep_report", "example_report",
           "example_config", "EXAMPLES", "SECTIONS"]
