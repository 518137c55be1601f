"""Width x depth sweeps: train a grid of models to a training criterion, measure the landscape
there (and at chosen epochs) with its batch-to-batch spread, resume after interruption, shard
over processes or job-array tasks, fit the scaling law per architecture and data set.

The results file, criterion, spread, resume, shards and the fit are described in docs/sweep.md.
Layout: ``config`` (the grid: :class:`Cell`, :class:`SweepConfig`, :class:`SweepSummary`),
``measuring`` (the criterion and the measurement lines of one cell), ``sharding`` (which cells a
process runs), ``store`` (the files of the output directory and their locks), ``running``
(:func:`run_sweep`), ``fitting`` (:func:`fit_sweep`), ``options`` (the ``landscape-lab sweep``
command-line options).
"""
from __future__ import annotations

# the training module the cells run with (``sweep.training`` as before the split)
from .. import training  # noqa: F401
from .config import DEFAULT_MAX_EPOCHS, DEFAULT_TRAIN_TO_LOSS, Cell, SweepConfig, SweepSummary
from .fitting import fit_points, fit_sweep, final_measurements, measurements  # noqa: F401
from .measuring import SPREAD_STATISTICS
from .running import run_sweep
from .sharding import ShardBusyError, parse_shard
from .store import load_results, results_path

__all__ = ["SweepConfig", "SweepSummary", "Cell", "run_sweep", "load_results",
           "parse_shard", "results_path", "fit_sweep", "ShardBusyError", "SPREAD_STATISTICS",
           "DEFAULT_TRAIN_TO_LOSS", "DEFAULT_MAX_EPOCHS"]
