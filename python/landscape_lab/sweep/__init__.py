"""Width x depth sweeps: train a grid of models, measure the landscape at chosen epochs, resume
after interruption, shard over processes or job-array tasks, fit the scaling law.

The results file, resume, shards and the fit are described in docs/sweep.md. Layout:
``config`` (the grid: :class:`Cell`, :class:`SweepConfig`, :class:`SweepSummary`), ``sharding``
(which cells a process runs), ``store`` (the files of the output directory and their locks),
``running`` (:func:`run_sweep`), ``fitting`` (:func:`fit_sweep`).
"""
from __future__ import annotations

# the training module the cells run with (``sweep.training`` as before the split)
from .. import training  # noqa: F401
from .config import Cell, SweepConfig, SweepSummary
from .fitting import fit_sweep, measurements  # noqa: F401 - public, outside __all__ as before
from .running import run_sweep
from .sharding import ShardBusyError, parse_shard
from .store import load_results, results_path

__all__ = ["SweepConfig", "SweepSummary", "Cell", "run_sweep", "load_results",
           "parse_shard", "results_path", "fit_sweep", "ShardBusyError"]
