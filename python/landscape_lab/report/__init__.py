"""Landscape reports: Markdown (and optionally HTML) with PNG figures and a ``results.json``.

* :func:`model_report` — one model: top-k Hessian eigenvalues, trace, spectral density with its
  semicircle fit and spikes, blockwise spectra (per parameter block), gradient-covariance
  spectrum and ranks, ``lambda_max`` over training, loss barrier (module :mod:`.model`, its
  text :mod:`.model_doc`);
* :func:`sweep_report` — width x depth sweeps, side by side: where the cells reached the training
  criterion, the scaling law per architecture and data set with alpha and beta compared, the
  verdicts on the proposal's conjectures, the statistics with their batch-to-batch spread, Phi
  over the grid, gap against gradient rank (modules :mod:`.sweep`, :mod:`.sweep_figures`);
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
