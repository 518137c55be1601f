"""landscape-lab: the science layer of landscape-ext (fits, barriers, optimizers, experiments).

It calls only the public functions of :mod:`landscape_ext`.
"""
from .barriers import BarrierPath, barrier_height, barrier_location, interpolate
from .data import (DataFileNotFoundError, Dataset, gaussian_mixture, get_dataset, load_cifar,
                   load_digits, load_wikitext2, markov_text, template_images)
from .models import (MLP, CausalTransformerLM, ResNet, ViT, build_model, model_spec, n_params,
                     sequence_cross_entropy)
from .report import ReportConfig, ReportResult, example_report, model_report, sweep_report
from .sweep import SweepConfig, SweepSummary, fit_sweep, load_results, parse_shard, run_sweep
from .training import (Callback, CheckpointCallback, CurvatureCallback, MetricsCallback,
                       TrainConfig, TrainResult, curvature_stats, evaluate, load_checkpoint,
                       read_jsonl, save_checkpoint, train)
from .optim import (CurvatureAdaptiveLR, HybridHessianAdam, HybridHessianSGD, SharpnessTracker,
                    hessian_closure, hvp_operator)
from .rmt import (MarchenkoPasturFit, SemicircleFit, SpikeReport, bbp_threshold, detect_spikes,
                  fit_marchenko_pastur, fit_semicircle, spike_location, spike_strength)
from .scaling import (ArchitectureSearchResult, ScalingFit, architecture_search, fit_scaling_law,
                      phi)
from .spread import BatchSpread, batch_spread, disjoint_batches

__version__ = "0.1.0"

__all__ = [
    "fit_semicircle", "fit_marchenko_pastur", "detect_spikes", "bbp_threshold", "spike_location",
    "spike_strength", "SemicircleFit", "MarchenkoPasturFit", "SpikeReport",
    "fit_scaling_law", "phi", "architecture_search", "ScalingFit", "ArchitectureSearchResult",
    "batch_spread", "BatchSpread", "disjoint_batches",
    "interpolate", "barrier_height", "barrier_location", "BarrierPath",
    "CurvatureAdaptiveLR", "HybridHessianSGD", "HybridHessianAdam", "SharpnessTracker",
    "hessian_closure", "hvp_operator",
    "MLP", "ResNet", "ViT", "CausalTransformerLM", "build_model", "model_spec", "n_params",
    "sequence_cross_entropy", "Dataset", "DataFileNotFoundError", "gaussian_mixture",
    "load_digits", "load_cifar", "load_wikitext2", "markov_text", "template_images",
    "get_dataset", "TrainConfig", "TrainResult",
    "Callback", "MetricsCallback", "CurvatureCallback", "CheckpointCallback", "train", "evaluate",
    "curvature_stats", "save_checkpoint", "load_checkpoint", "read_jsonl", "SweepConfig",
    "SweepSummary", "run_sweep", "fit_sweep", "load_results", "parse_shard", "ReportConfig",
    "ReportResult", "model_report", "sweep_report", "example_report",
]
