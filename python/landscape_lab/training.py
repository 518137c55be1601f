r"""Training loop with callbacks that record loss/accuracy and landscape statistics to a
JSON-lines log.

Log format (one JSON object per line, appended and flushed as it is produced):

* ``{"kind": "config", ...}`` — first line of a run: model spec, parameter count, data set,
  optimizer, learning rate, momentum, batch size, seed, and ``eos_threshold`` (``2 (1 + beta) /
  eta`` for SGD with momentum ``beta``: gradient descent on a quadratic is stable only while
  ``lambda_max`` stays below it — the edge-of-stability line; ``null`` for Adam).
* ``{"kind": "metrics", "step", "epoch", "train_loss", "train_acc", "test_loss", "test_acc"}``
  from :class:`MetricsCallback`.
* ``{"kind": "curvature", "step", "epoch", "lambda_max", "top_eigenvalues", "residuals",
  "eos_threshold", "sharpness_ratio", "trace", "trace_stderr", "grad_effective_rank", ...}``
  from :class:`CurvatureCallback`.
* ``{"kind": "end", "step", "epoch", "time_s"}``.

The curvature statistics are measured on a fixed subset of the training data (the same samples
at every step, so the series are comparable) by the public functions of :mod:`landscape_ext`:
``eigsh`` (warm-started from the previous eigenvectors, the estimate
:class:`~landscape_lab.optim.SharpnessTracker` uses), ``trace`` (Hutch++ with a standard error)
and the gradient-covariance spectrum and its ranks (``grad_*`` fields: present when the callback
has ``grad_k > 0``). The edge-of-stability threshold is :func:`landscape_lab.optim.eos_threshold`
(docs/optim.md).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import landscape_ext as le

# the project's one JSON writer/reader (landscape_ext.results), re-exported here
from ._results import JsonlWriter, PathLike, json_clean, read_jsonl
from .data import Dataset
from .models import model_spec, n_params, sequence_cross_entropy
from .optim.curvature import _top_eigenpairs
from .optim.sharpness import eos_threshold, sharpness_fields

__all__ = [
    "TrainConfig",
    "TrainState",
    "TrainResult",
    "Callback",
    "MetricsCallback",
    "CurvatureCallback",
    "CheckpointCallback",
    "JsonlWriter",
    "train",
    "evaluate",
    "loss_functions",
    "curvature_stats",
    "gradient_api",
    "read_jsonl",
    "save_checkpoint",
    "load_checkpoint",
    "eos_threshold",
    "json_clean",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------


def gradient_api() -> Tuple[Callable, Callable]:
    """``(gradient_covariance_svd, gradient_rank)`` of :mod:`landscape_ext.gradients`."""
    return le.gradient_covariance_svd, le.gradient_rank


def gradient_svd(gsvd: Callable, model: nn.Module, per_sample_loss: Callable, batch: Any,
                 k: int, seed: int = 0) -> Any:
    """Centred gradient-covariance SVD: the exact Gram method where it applies (MLPs: one
    ``n x n`` eigenproblem, cheap), else the engine's automatic choice."""
    try:
        return gsvd(model, per_sample_loss, batch, k=k, centered=True, seed=seed,
                    method="gram", return_vectors=False)
    except ValueError as e:
        log.debug("gram method not applicable (%s); using method='auto'", e)
        return gsvd(model, per_sample_loss, batch, k=k, centered=True, seed=seed,
                    return_vectors=False)


def loss_functions(task: str) -> Tuple[Callable, Callable]:
    """``(batch-mean loss, per-sample loss)`` for ``task`` (``"classification"``: cross-entropy;
    ``"language_model"``: token cross-entropy, per-sample = per-sequence mean)."""
    if task == "classification":
        return nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none")
    if task == "language_model":
        return (functools.partial(sequence_cross_entropy, reduction="mean"),
                functools.partial(sequence_cross_entropy, reduction="none"))
    raise ValueError(f"unknown task {task!r}")


def _accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Number of correct predictions (class dim 1 for (B, C); last dim for (B, T, V))."""
    pred = outputs.argmax(-1) if outputs.dim() == 3 else outputs.argmax(1)
    return (pred == targets).sum()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable, *,
             batch_size: int = 1024, device: Union[str, torch.device, None] = None
             ) -> Tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)`` in eval mode (restored after).

    Accuracy is per sample for classification and per token for a language model."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        tot_loss, correct, n, n_tok = 0.0, 0, 0, 0
        for s in range(0, x.shape[0], batch_size):
            xb, yb = x[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
            out = model(xb)
            b = xb.shape[0]
            tot_loss += float(loss_fn(out, yb)) * b
            correct += int(_accuracy(out, yb))
            n += b
            n_tok += yb.numel()
        return tot_loss / max(n, 1), correct / max(n_tok, 1)
    finally:
        model.train(was)


# ------------------------------------------------------------------------------------------------
# curvature statistics
# ------------------------------------------------------------------------------------------------


def _samples_in(batch: Any) -> int:
    """Samples of one batch: the targets' leading size, or a dict batch's first tensor's."""
    if isinstance(batch, dict):
        first = next((v for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0), None)
        return int(first.shape[0]) if first is not None else 1
    return int(batch[1].shape[0])


def curvature_stats(model: nn.Module, loss_fn: Optional[Callable], batch: Any, *,
                    k: int = 1, tol: float = 1e-3, trace_matvecs: int = 0,
                    spectral_norm: bool = False, per_sample_loss: Optional[Callable] = None,
                    grad_k: int = 0, seed: int = 0, v0: Optional[Tensor] = None,
                    max_matvecs: Optional[int] = None
                    ) -> Tuple[Dict[str, Any], Optional[Tensor]]:
    """Landscape statistics of ``model`` on one batch.

    Parameters
    ----------
    model, loss_fn : the model and its batch-mean loss (``None``: the loss the model computes
        itself, HuggingFace style; see :class:`landscape_ext.HessianOperator`).
    batch : (inputs, targets), or a dict for ``model(**batch)``
    k : int
        Top eigenvalues by :func:`landscape_ext.eigsh` (``which="largest"``); 0 skips them.
    tol : float
        Relative residual tolerance of the eigensolver.
    trace_matvecs : int
        Hutch++ products for ``tr(H)`` (0 skips the trace).
    spectral_norm : bool
        Also ``||H||_2`` by :func:`landscape_ext.spectral_norm` (``max |lambda|``).
    per_sample_loss : callable, optional
        Per-sample loss for the gradient covariance (required when ``grad_k > 0``, unless
        ``loss_fn`` is ``None``: then each sample's own loss, the model on that sample alone).
    grad_k : int
        Singular values of the gradient covariance (0 skips).
    seed : int
    v0 : Tensor, optional
        Warm start ``(d, j)`` for the eigensolver (previous eigenvectors).
    max_matvecs : int, optional
        Product budget of the eigensolver (default: :func:`landscape_ext.eigsh`'s).

    Returns
    -------
    (dict, Tensor or None)
        The statistics (JSON-ready) and the eigenvectors ``(d, k)`` for the next warm start.
    """
    t0 = time.perf_counter()
    op = le.HessianOperator(model, loss_fn, batch)
    n_samples = _samples_in(batch)
    out: Dict[str, Any] = {"n_params": op.d, "n_samples": n_samples}
    vecs = None
    if k > 0:
        # the warm-started estimate of SharpnessTracker and the optimizers; a measurement, so a
        # budget that runs out before convergence is logged as a warning
        est, vecs = _top_eigenpairs(op, min(int(k), op.d), which="largest", tol=tol,
                                    max_matvecs=max_matvecs, seed=seed, v0=v0,
                                    owner="curvature_stats", warn=True)
        ev = est["eigenvalues"]
        out.update(lambda_max=ev[0], top_eigenvalues=ev, residuals=est["residuals"],
                   converged=est["converged"], n_matvecs_eigsh=est["n_matvecs"])
    if spectral_norm:
        s = le.spectral_norm(op, tol=tol, seed=seed,
                             v0=vecs[:, 0] if vecs is not None else None)
        out.update(spectral_norm=s.value, spectral_norm_eigenvalue=s.eigenvalue,
                   spectral_norm_converged=s.converged)
        if k <= 0:
            out["lambda_max"] = s.eigenvalue
    if trace_matvecs > 0:
        t = le.trace(op, max(int(trace_matvecs), 3), method="hutch++", seed=seed)
        out.update(trace=t.estimate, trace_stderr=t.stderr)
    out["hvp_mode"] = op.mode_used
    if grad_k > 0:
        if per_sample_loss is not None or loss_fn is None:
            gsvd, grank = gradient_api()
            kk = max(1, min(int(grad_k), n_samples, op.d))
            g = gradient_svd(gsvd, model, per_sample_loss, batch, kk, seed=seed)
            rk = grank(g)
            out.update(grad_effective_rank=rk.effective_rank, grad_stable_rank=rk.stable_rank,
                       grad_numerical_rank=rk.numerical_rank, grad_k=kk,
                       grad_rank_truncated=rk.truncated)
    out["n_matvecs"] = op.n_matvecs
    out["curvature_time_s"] = time.perf_counter() - t0
    return out, vecs


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    Attributes
    ----------
    epochs : int
    batch_size : int
    optimizer : {"sgd", "adam"}
    lr, momentum, weight_decay : float
    seed : int
        Seeds the batch order (the model's initialisation has its own seed).
    max_steps : int, optional
        Stop after this many optimizer steps.
    device : str
    """

    epochs: int = 5
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: Optional[int] = None
    device: str = "cpu"

    def make_optimizer(self, params: Iterable[Tensor]) -> torch.optim.Optimizer:
        name = self.optimizer.lower()
        if name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        if name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.optimizer!r}; choose 'sgd' or 'adam'")


@dataclass
class TrainState:
    """What callbacks see: the model, optimizer, data, counters and the record sink.

    A callback ends training early by setting ``stop = True``: :func:`train` stops after the
    current step (from :meth:`Callback.on_step_end`) or epoch (from
    :meth:`Callback.on_epoch_end`), then runs the ``on_train_end`` hooks as usual.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    dataset: Dataset
    config: TrainConfig
    loss_fn: Callable
    per_sample_loss: Callable
    writer: JsonlWriter
    step: int = 0
    epoch: int = 0
    last_loss: float = float("nan")
    stop: bool = False
    history: List[Dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def record(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """Append ``{"kind", "step", "epoch", "time_s", **fields}`` to the history and the log."""
        rec = {"kind": kind, "step": self.step, "epoch": self.epoch,
               "time_s": round(time.perf_counter() - self.t0, 4)}
        rec.update(fields)
        rec = json_clean(rec)
        self.history.append(rec)
        self.writer.write(rec)
        return rec


class Callback:
    """Hooks of :func:`train`; override what you need. ``every_steps`` / ``every_epochs``
    decide when :meth:`measure` runs (``at_start``: also before the first step)."""

    def __init__(self, every_steps: Optional[int] = None, every_epochs: Optional[int] = None,
                 at_start: bool = True, at_end: bool = True):
        self.every_steps = every_steps
        self.every_epochs = every_epochs
        self.at_start = at_start
        self.at_end = at_end
        self._last_step: Optional[int] = None

    def _maybe(self, state: TrainState) -> None:
        if self._last_step == state.step:
            return
        self._last_step = state.step
        self.measure(state)

    def on_train_begin(self, state: TrainState) -> None:
        if self.at_start:
            self._maybe(state)

    def on_step_end(self, state: TrainState) -> None:
        if self.every_steps and state.step % self.every_steps == 0:
            self._maybe(state)

    def on_epoch_end(self, state: TrainState) -> None:
        if self.every_epochs and state.epoch % self.every_epochs == 0:
            self._maybe(state)

    def on_train_end(self, state: TrainState) -> None:
        if self.at_end:
            self._maybe(state)

    def measure(self, state: TrainState) -> None:  # pragma: no cover - to override
        pass


class MetricsCallback(Callback):
    """Train/test loss and accuracy (``max_samples`` caps each split for speed)."""

    def __init__(self, every_steps: Optional[int] = None, every_epochs: Optional[int] = 1,
                 max_samples: Optional[int] = None, **kw: Any):
        super().__init__(every_steps, every_epochs, **kw)
        self.max_samples = max_samples

    def measure(self, state: TrainState) -> None:
        ds = state.dataset
        n = self.max_samples or max(ds.n_train, ds.n_test)
        xtr, ytr = ds.subset(n, "train", seed=12345)
        xte, yte = ds.subset(n, "test", seed=12345)
        tl, ta = evaluate(state.model, xtr, ytr, state.loss_fn, device=state.config.device)
        vl, va = evaluate(state.model, xte, yte, state.loss_fn, device=state.config.device)
        state.record("metrics", train_loss=tl, train_acc=ta, test_loss=vl, test_acc=va,
                     gen_gap=ta - va, loss_gap=vl - tl)


class CurvatureCallback(Callback):
    """Landscape statistics every ``every_steps`` steps (see :func:`curvature_stats`), with
    ``lambda_max`` next to the edge-of-stability threshold of the run's optimizer
    (``eos_threshold``, ``sharpness_ratio``: the fields and definition of
    :class:`~landscape_lab.optim.SharpnessTracker`, see docs/optim.md).

    Parameters
    ----------
    every_steps, every_epochs : int, optional
    n_samples : int
        Size of the fixed measurement subset of the training data.
    k : int
        Top Hessian eigenvalues (``lambda_max`` is the first).
    trace_matvecs : int
        Hutch++ products for the trace (0: off).
    grad_k : int
        Gradient-covariance singular values for the gradient ranks (0: off).
    tol : float
        Eigensolver relative tolerance.
    seed : int
    """

    def __init__(self, every_steps: Optional[int] = 20, every_epochs: Optional[int] = None,
                 n_samples: int = 256, k: int = 1, trace_matvecs: int = 0, grad_k: int = 0,
                 tol: float = 1e-3, seed: int = 0, **kw: Any):
        super().__init__(every_steps, every_epochs, **kw)
        self.n_samples, self.k, self.trace_matvecs = n_samples, k, trace_matvecs
        self.grad_k, self.tol, self.seed = grad_k, tol, seed
        self._v0: Optional[Tensor] = None
        self._batch = None

    def measure(self, state: TrainState) -> None:
        if self._batch is None:
            x, y = state.dataset.subset(self.n_samples, "train", seed=self.seed)
            dev = state.config.device
            self._batch = (x.to(dev), y.to(dev))
        stats, vecs = curvature_stats(
            state.model, state.loss_fn, self._batch, k=self.k, tol=self.tol,
            trace_matvecs=self.trace_matvecs, per_sample_loss=state.per_sample_loss,
            grad_k=self.grad_k, seed=self.seed, v0=self._v0)
        self._v0 = vecs
        if "lambda_max" in stats:
            cfg = state.config
            stats.update(sharpness_fields(stats["lambda_max"], cfg.optimizer,
                                          state.optimizer.param_groups[0]["lr"], cfg.momentum))
        state.record("curvature", **stats)


class CheckpointCallback(Callback):
    """Save the model (:func:`save_checkpoint`) to ``directory/step{step}.pt``."""

    def __init__(self, directory: PathLike, every_steps: Optional[int] = None,
                 every_epochs: Optional[int] = 1, **kw: Any):
        super().__init__(every_steps, every_epochs, **kw)
        self.directory = Path(directory)

    def measure(self, state: TrainState) -> None:
        p = self.directory / f"step{state.step}.pt"
        save_checkpoint(p, state.model, dataset=state.dataset.name,
                        train_config=asdict(state.config), step=state.step)
        state.record("checkpoint", path=str(p))


@dataclass
class TrainResult:
    """Result of :func:`train`: the last metrics, step counts and the full record history."""

    steps: int
    epochs: int
    final_loss: float
    time_s: float
    history: List[Dict[str, Any]]
    log_path: Optional[str] = None

    def records(self, kind: str) -> List[Dict[str, Any]]:
        return [r for r in self.history if r.get("kind") == kind]


def train(model: nn.Module, dataset: Dataset, config: Optional[TrainConfig] = None, *,
          callbacks: Sequence[Callback] = (), log_path: Optional[PathLike] = None,
          progress: bool = True, extra_config: Optional[Dict[str, Any]] = None) -> TrainResult:
    """Train ``model`` on ``dataset`` with mini-batch SGD/Adam; callbacks record statistics.

    Parameters
    ----------
    model : nn.Module
        Trained in place (moved to ``config.device``).
    dataset : Dataset
    config : TrainConfig, optional
    callbacks : sequence of Callback
        Run at the start, every N steps/epochs and at the end (see :class:`Callback`).
    log_path : path, optional
        JSON-lines log (appended to).
    progress : bool
        tqdm progress bar over the optimizer steps.
    extra_config : dict, optional
        Extra fields for the ``config`` record.

    Returns
    -------
    TrainResult
    """
    cfg = config or TrainConfig()
    dev = torch.device(cfg.device)
    model.to(dev)
    loss_fn, per_sample = loss_functions(dataset.task)
    opt = cfg.make_optimizer(model.parameters())
    writer = JsonlWriter(log_path)
    state = TrainState(model=model, optimizer=opt, dataset=dataset, config=cfg, loss_fn=loss_fn,
                       per_sample_loss=per_sample, writer=writer)
    try:
        spec = model_spec(model)
    except ValueError:
        spec = {"name": type(model).__name__, "kwargs": {}}
    steps_per_epoch = math.ceil(dataset.n_train / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    state.record("config", model=spec, n_params=n_params(model), dataset=dataset.name,
                 data_dim=dataset.data_dim, n_train=dataset.n_train, n_test=dataset.n_test,
                 eos_threshold=eos_threshold(cfg.optimizer, cfg.lr, cfg.momentum),
                 total_steps=total, **asdict(cfg), **(extra_config or {}))
    pbar = None
    if progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=total, desc="train", unit="step", leave=False)
    try:
        model.train()
        for cb in callbacks:
            cb.on_train_begin(state)
        done = False
        for epoch in range(1, cfg.epochs + 1):
            state.epoch = epoch - 1
            for xb, yb in dataset.batches(cfg.batch_size, shuffle=True,
                                          seed=cfg.seed * 100003 + epoch):
                xb, yb = xb.to(dev), yb.to(dev)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"train: the loss is {float(loss.detach())} at step "
                                             f"{state.step + 1} (epoch {epoch}); lower the "
                                             f"learning rate (lr = {cfg.lr})")
                loss.backward()
                opt.step()
                state.step += 1
                state.last_loss = float(loss.detach())
                if pbar is not None:
                    pbar.update(1)
                    if state.step % 10 == 0:
                        pbar.set_postfix(loss=f"{state.last_loss:.4f}", refresh=False)
                for cb in callbacks:
                    cb.on_step_end(state)
                if state.stop or (cfg.max_steps is not None and state.step >= cfg.max_steps):
                    done = True
                    break
            state.epoch = epoch
            for cb in callbacks:
                cb.on_epoch_end(state)
            if done or state.stop:
                break
        for cb in callbacks:
            cb.on_train_end(state)
        elapsed = time.perf_counter() - state.t0
        state.record("end", final_loss=state.last_loss, total_time_s=elapsed)
    finally:
        if pbar is not None:
            pbar.close()
        writer.close()
    return TrainResult(steps=state.step, epochs=state.epoch, final_loss=state.last_loss,
                       time_s=time.perf_counter() - state.t0, history=state.history,
                       log_path=str(log_path) if log_path is not None else None)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def save_checkpoint(path: PathLike, model: nn.Module, **meta: Any) -> Path:
    """Save ``model``'s state dict with its architecture spec (:func:`model_spec`) and JSON-able
    ``meta`` (data set, training config, ...). Load with :func:`load_checkpoint`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "landscape_lab.checkpoint/1", "model": model_spec(model),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "meta": json.loads(json.dumps(json_clean(meta)))}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu"
                    ) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model saved by :func:`save_checkpoint`; returns ``(model, meta)``."""
    from .models import build_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    payload = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != "landscape_lab.checkpoint/1":
        raise ValueError(f"{path}: not a landscape_lab checkpoint (save it with "
                         f"landscape_lab.training.save_checkpoint)")
    spec = payload["model"]
    model = build_model(spec["name"], **spec["kwargs"])
    model.load_state_dict(payload["state_dict"])
    model.to(device)
    return model, dict(payload.get("meta", {}))
