r"""Data sets of the proposal's studies, as in-memory tensors (no downloads at run time).

* :func:`gaussian_mixture` — synthetic classes on a random ``intrinsic_dim``-dimensional
  subspace of ``R^ambient_dim`` (plus optional isotropic noise): the controllable "data
  dimension" of the Phi metric.
* :func:`load_digits` — scikit-learn's 8x8 digits (1797 images, ships with scikit-learn),
  standardized.
* :func:`load_cifar` — CIFAR-10 / CIFAR-100 from their standard python-pickle files
  (``cifar-10-batches-py/data_batch_1..5, test_batch``; ``cifar-100-python/train, test``).
* :func:`load_wikitext2` — WikiText-2 from ``wiki.train.tokens``, ``wiki.valid.tokens``,
  ``wiki.test.tokens`` (word level, vocabulary from the training split).
* :func:`markov_text` — generated text: token sequences from a seeded second-order Markov
  chain whose best achievable loss is known exactly (``synthetic-text`` in :func:`get_dataset`).
* :func:`template_images` — generated images: a Gaussian class mixture whose class means are
  smooth random templates, ``channels x height x width`` (``gaussian-images``).

All return a :class:`Dataset`; a missing file raises :class:`DataFileNotFoundError` (a
``FileNotFoundError``) naming the file, the directory searched and where the data come from.
"""
from __future__ import annotations

import dataclasses
import logging
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._results import PathLike

__all__ = [
    "Dataset",
    "DataFileNotFoundError",
    "gaussian_mixture",
    "load_digits",
    "load_cifar",
    "load_wikitext2",
    "markov_text",
    "template_images",
    "get_dataset",
    "DATASETS",
    "GENERATED_DEFAULTS",
]

log = logging.getLogger(__name__)


class DataFileNotFoundError(FileNotFoundError):
    """A data file is missing; the message names the file, the directory and the source."""


@dataclass
class Dataset:
    """An in-memory train/test split.

    Attributes
    ----------
    name : str
    x_train, y_train, x_test, y_test : Tensor
        Inputs (float32 features/images, or int64 token sequences) and targets (int64 class
        labels, or next-token sequences).
    n_classes : int
        Classes (vocabulary size for a language model).
    input_shape : tuple of int
        Shape of one input.
    data_dim : int
        The data dimension ``D`` of the Phi metric: the intrinsic dimension where it is known
        (Gaussian mixture), else the number of input features (the sequence length for text).
    task : str
        ``"classification"`` or ``"language_model"``.
    info : dict
        Provenance (files, seeds, sizes) for reports.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int
    input_shape: Tuple[int, ...]
    data_dim: int
    task: str = "classification"
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def subset(self, n: int, split: str = "train", seed: int = 0) -> Tuple[Tensor, Tensor]:
        """A fixed random subset of ``n`` samples ``(x, y)`` of ``split`` (all if ``n`` is larger);
        used as the measurement batch of the curvature statistics."""
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        if n >= x.shape[0]:
            return x, y
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(x.shape[0], generator=g)[:n].sort().values
        return x[idx], y[idx]

    def batches(self, batch_size: int, split: str = "train", shuffle: bool = False,
                seed: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
        """Iterate over ``(x, y)`` mini-batches (the last one may be smaller)."""
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        n = x.shape[0]
        if shuffle:
            g = torch.Generator().manual_seed(int(seed))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            yield x[idx], y[idx]

    def describe(self) -> str:
        return (f"{self.name}: {self.n_train} train / {self.n_test} test, input {self.input_shape}, "
                f"{self.n_classes} {'tokens' if self.task == 'language_model' else 'classes'}, "
                f"D = {self.data_dim}")


def _split(n: int, test_fraction: float, seed: int) -> Tuple[Tensor, Tensor]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    n_test = max(1, int(round(test_fraction * n)))
    return perm[n_test:], perm[:n_test]


def _standardize(x_train: Tensor, x_test: Tensor) -> Tuple[Tensor, Tensor]:
    mu = x_train.mean(0, keepdim=True)
    sd = x_train.std(0, keepdim=True)
    sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))
    return (x_train - mu) / sd, (x_test - mu) / sd


# ------------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------------


def gaussian_mixture(n: int = 2000, ambient_dim: int = 32, intrinsic_dim: int = 8,
                     n_classes: int = 4, seed: int = 0, *, noise: float = 0.0,
                     separation: float = 3.0, test_fraction: float = 0.25) -> Dataset:
    r"""Gaussian mixture on a random ``intrinsic_dim``-dimensional subspace of
    ``R^ambient_dim``.

    Class ``c`` has mean ``mu_c`` (``|mu_c| = separation``, random direction in the subspace)
    and unit covariance within the subspace: ``x = U (mu_c + z) + noise * e`` with ``U``
    ``(ambient_dim, intrinsic_dim)`` orthonormal, ``z ~ N(0, I_intrinsic)``,
    ``e ~ N(0, I_ambient)``. Labels are balanced (``i mod n_classes``, then shuffled).

    Parameters
    ----------
    n : int
        Samples in total (train + test).
    ambient_dim, intrinsic_dim : int
        ``1 <= intrinsic_dim <= ambient_dim``.
    n_classes : int
    seed : int
        Seeds the subspace, the means, the samples and the split.
    noise : float
        Standard deviation of the isotropic ambient noise (0: data exactly on the subspace).
    separation : float
        Norm of each class mean.
    test_fraction : float

    Returns
    -------
    Dataset
        ``data_dim = intrinsic_dim``.
    """
    if not 1 <= intrinsic_dim <= ambient_dim:
        raise ValueError(f"gaussian_mixture: need 1 <= intrinsic_dim <= ambient_dim, got "
                         f"intrinsic_dim={intrinsic_dim}, ambient_dim={ambient_dim}")
    if n_classes < 1 or n < 2 * n_classes:
        raise ValueError(f"gaussian_mixture: need n_classes >= 1 and n >= 2 n_classes, got "
                         f"n={n}, n_classes={n_classes}")
    if noise < 0:
        raise ValueError(f"gaussian_mixture: noise must be >= 0, got {noise}")
    g = torch.Generator().manual_seed(int(seed))
    U, _ = torch.linalg.qr(torch.randn(ambient_dim, intrinsic_dim, generator=g,
                                       dtype=torch.float64))
    mu = torch.randn(n_classes, intrinsic_dim, generator=g, dtype=torch.float64)
    mu = separation * mu / mu.norm(dim=1, keepdim=True).clamp_min(1e-12)
    y = torch.arange(n) % n_classes
    y = y[torch.randperm(n, generator=g)]
    z = mu[y] + torch.randn(n, intrinsic_dim, generator=g, dtype=torch.float64)
    x = z @ U.T
    if noise > 0:
        x = x + noise * torch.randn(n, ambient_dim, generator=g, dtype=torch.float64)
    tr, te = _split(n, test_fraction, seed)
    return Dataset(name="gaussian", x_train=x[tr].float(), y_train=y[tr], x_test=x[te].float(),
                   y_test=y[te], n_classes=n_classes, input_shape=(ambient_dim,),
                   data_dim=intrinsic_dim,
                   info=dict(ambient_dim=ambient_dim, intrinsic_dim=intrinsic_dim, noise=noise,
                             separation=separation, seed=seed, n=n))


# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------


def load_digits(test_fraction: float = 0.25, seed: int = 0, standardize: bool = True,
                images: bool = False) -> Dataset:
    """scikit-learn's handwritten digits: 1797 8x8 grey images, 10 classes (no download).

    Parameters
    ----------
    test_fraction : float
    seed : int
        Seed of the train/test split.
    standardize : bool
        Per-feature zero mean, unit variance (statistics of the training split).
    images : bool
        Inputs of shape ``(1, 8, 8)`` (for convolutional models) instead of ``(64,)``.
    """
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:  # pragma: no cover - sklearn is a [lab] dependency
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn "
                          "(or the [lab] extra)") from e
    X, y = _sk_digits(return_X_y=True)
    X = torch.as_tensor(X, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    tr, te = _split(X.shape[0], test_fraction, seed)
    xtr, xte = X[tr], X[te]
    if standardize:
        xtr, xte = _standardize(xtr, xte)
    shape: Tuple[int, ...] = (64,)
    if images:
        xtr, xte = xtr.reshape(-1, 1, 8, 8), xte.reshape(-1, 1, 8, 8)
        shape = (1, 8, 8)
    return Dataset(name="digits", x_train=xtr, y_train=y[tr], x_test=xte, y_test=y[te],
                   n_classes=10, input_shape=shape, data_dim=64,
                   info=dict(source="sklearn.datasets.load_digits", seed=seed,
                             standardize=standardize))


# ------------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label_key=b"labels", n_classes=10,
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"],
                     label_key=b"fine_labels", n_classes=100,
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}
_CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
_CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


def _find_dir(root: PathLike, folder: str, files: Sequence[str]) -> Path:
    """``root`` itself if it holds the first file, else ``root/folder``."""
    root = Path(root).expanduser()
    if (root / files[0]).exists():
        return root
    if (root / folder / files[0]).exists():
        return root / folder
    return root / folder if (root / folder).is_dir() else root


def _missing(path: Path, what: str, url: str, extra: str = "") -> DataFileNotFoundError:
    return DataFileNotFoundError(
        f"{what}: file {path.name!r} not found in directory {str(path.parent)!r}. "
        f"Download and unpack {url} there (this library never downloads at run time){extra}.")


def _read_cifar_pickle(path: Path) -> Dict[bytes, Any]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    if not isinstance(d, dict) or b"data" not in d:
        raise ValueError(f"{path}: not a CIFAR python-pickle batch (no b'data' key)")
    return d


def load_cifar(root: PathLike, which: str = "cifar10", *, normalize: bool = True,
               n_train: Optional[int] = None, n_test: Optional[int] = None,
               seed: int = 0) -> Dataset:
    """CIFAR-10 or CIFAR-100 from the standard python-pickle files.

    Parameters
    ----------
    root : path
        Directory that holds the files, or its parent holding ``cifar-10-batches-py/`` /
        ``cifar-100-python/`` (the folders the official tarballs unpack to).
    which : {"cifar10", "cifar100"}
        CIFAR-100 uses the 100 fine labels.
    normalize : bool
        Scale to [0, 1] and standardize per channel with the usual data-set statistics.
    n_train, n_test : int, optional
        Keep a random subset of this size (seeded) — for CPU-sized studies.
    seed : int

    Raises
    ------
    DataFileNotFoundError
        A file is missing (the message names it and the directory).
    """
    if which not in _CIFAR:
        raise ValueError(f"load_cifar: which must be 'cifar10' or 'cifar100', got {which!r}")
    spec = _CIFAR[which]
    d = _find_dir(root, spec["folder"], spec["train"])

    def read(names: Sequence[str]) -> Tuple[Tensor, Tensor]:
        xs, ys = [], []
        for name in names:
            p = d / name
            if not p.exists():
                raise _missing(p, f"load_cifar({which})", spec["url"],
                               f" (expected {', '.join(spec['train'] + spec['test'])})")
            b = _read_cifar_pickle(p)
            if spec["label_key"] not in b:
                raise ValueError(f"{p}: no {spec['label_key']!r} key (is this {which}?)")
            xs.append(np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(b[spec["label_key"]], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    xtr, ytr = read(spec["train"])
    xte, yte = read(spec["test"])
    g = torch.Generator().manual_seed(int(seed))
    if n_train is not None and n_train < xtr.shape[0]:
        idx = torch.randperm(xtr.shape[0], generator=g)[:n_train]
        xtr, ytr = xtr[idx], ytr[idx]
    if n_test is not None and n_test < xte.shape[0]:
        idx = torch.randperm(xte.shape[0], generator=g)[:n_test]
        xte, yte = xte[idx], yte[idx]
    xtr, xte = xtr.float() / 255.0, xte.float() / 255.0
    if normalize:
        m = torch.tensor(_CIFAR_MEAN[which]).view(1, 3, 1, 1)
        s = torch.tensor(_CIFAR_STD[which]).view(1, 3, 1, 1)
        xtr, xte = (xtr - m) / s, (xte - m) / s
    return Dataset(name=which, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte,
                   n_classes=spec["n_classes"], input_shape=(3, 32, 32), data_dim=3 * 32 * 32,
                   info=dict(directory=str(d), normalize=normalize, seed=seed))


# ------------------------------------------------------------------------------------------------
# WikiText-2
# ------------------------------------------------------------------------------------------------

_WT2_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens",
              "test": "wiki.test.tokens"}
_WT2_URL = ("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip "
            "(or the Hugging Face 'wikitext-2-v1' files)")


def _tokenize(path: Path) -> List[str]:
    words: List[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            toks = line.split()
            if toks:
                words.extend(toks)
                words.append("<eos>")
    return words


def load_wikitext2(root: PathLike, seq_len: int = 32, *, eval_split: str = "valid",
                   max_vocab: Optional[int] = None, n_train: Optional[int] = None,
                   n_test: Optional[int] = None) -> Dataset:
    """WikiText-2 (word level) from its token files, cut into next-token sequences.

    The vocabulary is built from ``wiki.train.tokens`` (whitespace tokens, ``<eos>`` at the end
    of each non-empty line, ``<unk>`` always present; with ``max_vocab`` the most frequent words
    are kept and the rest map to ``<unk>``). Each split's token stream is cut into
    non-overlapping windows of ``seq_len + 1`` tokens: inputs ``w[:-1]``, targets ``w[1:]``.

    Parameters
    ----------
    root : path
        Directory holding ``wiki.train.tokens``, ``wiki.valid.tokens``, ``wiki.test.tokens``, or
        its parent holding ``wikitext-2/``.
    seq_len : int
    eval_split : {"valid", "test"}
        Which file becomes the test split.
    max_vocab : int, optional
    n_train, n_test : int, optional
        Keep the first sequences only (CPU-sized studies).

    Raises
    ------
    DataFileNotFoundError
        A token file is missing.
    """
    if eval_split not in ("valid", "test"):
        raise ValueError(f"load_wikitext2: eval_split must be 'valid' or 'test', got "
                         f"{eval_split!r}")
    if seq_len < 1:
        raise ValueError(f"load_wikitext2: seq_len must be >= 1, got {seq_len}")
    d = _find_dir(root, "wikitext-2", [_WT2_FILES["train"]])
    paths = {k: d / v for k, v in _WT2_FILES.items()}
    for k in ("train", eval_split):
        if not paths[k].exists():
            raise _missing(paths[k], "load_wikitext2", _WT2_URL,
                           f" (expected {', '.join(_WT2_FILES.values())})")
    train_words = _tokenize(paths["train"])
    counts = Counter(train_words)
    ordered = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
               if w != "<unk>"]
    if max_vocab is not None:
        ordered = ordered[: max(max_vocab - 1, 0)]
    itos = ["<unk>"] + ordered
    stoi = {w: i for i, w in enumerate(itos)}

    def encode(words: List[str], limit: Optional[int]) -> Tuple[Tensor, Tensor]:
        ids = torch.tensor([stoi.get(w, 0) for w in words], dtype=torch.int64)
        n_seq = (ids.numel() - 1) // seq_len
        if limit is not None:
            n_seq = min(n_seq, limit)
        if n_seq < 1:
            raise ValueError(f"load_wikitext2: fewer than seq_len + 1 = {seq_len + 1} tokens")
        x = ids[: n_seq * seq_len].reshape(n_seq, seq_len)
        y = ids[1: n_seq * seq_len + 1].reshape(n_seq, seq_len)
        return x, y

    xtr, ytr = encode(train_words, n_train)
    xte, yte = encode(_tokenize(paths[eval_split]), n_test)
    return Dataset(name="wikitext2", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte,
                   n_classes=len(itos), input_shape=(seq_len,), data_dim=seq_len,
                   task="language_model",
                   info=dict(directory=str(d), vocab_size=len(itos), seq_len=seq_len,
                             eval_split=eval_split, itos_head=itos[:10]))


# ------------------------------------------------------------------------------------------------
# generated text
# ------------------------------------------------------------------------------------------------


def _second_order_chain(vocab_size: int, branching: int, floor: float,
                        g: torch.Generator) -> Tensor:
    """Transition probabilities ``P[a, b, c] = p(next = c | previous two = a, b)``: each context
    has ``branching`` likely successors with random weights, every token keeps mass ``floor``."""
    P = torch.full((vocab_size, vocab_size, vocab_size), floor / vocab_size,
                   dtype=torch.float64)
    likely = torch.rand(vocab_size, vocab_size, vocab_size, generator=g).argsort(-1)
    likely = likely[..., :branching]
    weights = torch.rand(vocab_size, vocab_size, branching, generator=g, dtype=torch.float64)
    weights = 0.5 + weights                           # no successor is nearly absent
    weights = (1.0 - floor) * weights / weights.sum(-1, keepdim=True)
    return P.scatter_add_(-1, likely, weights)


def _stationary_pairs(P: Tensor) -> Tensor:
    """The stationary distribution ``pi[a, b]`` of the chain on pairs ``(a, b) -> (b, c)`` (power
    iteration; the chain is irreducible and aperiodic as every transition has mass)."""
    V = P.shape[0]
    pi = torch.full((V, V), 1.0 / V ** 2, dtype=torch.float64)
    for _ in range(2000):
        nxt = torch.einsum("ab,abc->bc", pi, P)
        if float((nxt - pi).abs().sum()) < 1e-13:
            return nxt
        pi = nxt
    return pi


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def markov_text(n_train: int = 2048, n_test: int = 256, seq_len: int = 32,
                vocab_size: int = 16, branching: int = 3, floor: float = 0.02,
                seed: int = 0) -> Dataset:
    """Token sequences from a seeded second-order Markov chain (a generated text source with a
    known answer).

    Each pair of previous tokens ``(a, b)`` has ``branching`` likely successors (random weights)
    and every other token keeps a little mass (``floor`` in all). Sequences start from the
    chain's stationary distribution, so every position is stationary and the best achievable
    mean cross-entropy per token is exact: ``(H(x_1 | x_0) + (T - 1) h) / T`` with ``h`` the
    entropy rate (``info["optimal_loss"]``, nats); a model that sees only the last token reaches
    ``H(x_{t+1} | x_t)`` at best (``info["bigram_loss"]``).

    Parameters
    ----------
    n_train, n_test : int
        Sequences of ``seq_len`` inputs and next-token targets.
    seq_len, vocab_size, branching : int
    floor : float
        Probability mass spread over all tokens, in (0, 1): every transition is possible, so
        the chain has one stationary distribution and the optimal loss is exact.
    seed : int
        Seeds the chain and the samples.

    Returns
    -------
    Dataset
        ``task = "language_model"``, ``n_classes = vocab_size``.
    """
    if not (1 <= branching <= vocab_size and 0.0 < floor < 1.0 and seq_len >= 1
            and n_train >= 1 and n_test >= 1):
        raise ValueError(f"markov_text: need 1 <= branching <= vocab_size, 0 < floor < 1 and "
                         f"positive sizes, got branching={branching}, vocab_size={vocab_size}, "
                         f"floor={floor}, seq_len={seq_len}, n_train={n_train}, n_test={n_test}")
    g = torch.Generator().manual_seed(int(seed))
    P = _second_order_chain(vocab_size, branching, floor, g)
    pi = _stationary_pairs(P)
    n = n_train + n_test
    seq = torch.empty(n, seq_len + 1, dtype=torch.int64)
    start = torch.multinomial(pi.reshape(-1), n, replacement=True, generator=g)
    seq[:, 0], seq[:, 1] = start // vocab_size, start % vocab_size
    for t in range(2, seq_len + 1):
        seq[:, t] = torch.multinomial(P[seq[:, t - 2], seq[:, t - 1]], 1, generator=g)[:, 0]
    rate = float((pi * _entropy(P)).sum())
    first = pi.sum(1)                                   # marginal of one token
    bigram = float(-(pi * torch.log(pi.clamp_min(1e-300) / first[:, None].clamp_min(1e-300))
                     ).sum())                           # H(x_1 | x_0)
    optimal = (bigram + (seq_len - 1) * rate) / seq_len
    x, y = seq[:, :-1], seq[:, 1:]
    return Dataset(name="markov-text", x_train=x[:n_train], y_train=y[:n_train],
                   x_test=x[n_train:], y_test=y[n_train:], n_classes=vocab_size,
                   input_shape=(seq_len,), data_dim=seq_len, task="language_model",
                   info=dict(source="second-order Markov chain", vocab_size=vocab_size,
                             branching=branching, floor=floor, seed=seed, entropy_rate=rate,
                             optimal_loss=optimal, bigram_loss=bigram))


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------


def template_images(n_train: int = 2000, n_test: int = 500, n_classes: int = 10,
                    image_size: Union[int, Tuple[int, int]] = 32, signal: float = 0.05,
                    smoothness: int = 4, seed: int = 0, *, channels: int = 3) -> Dataset:
    """Images ``x = signal * T_y + e``: one smooth random template ``T_c`` per class (a
    ``channels x smoothness x smoothness`` random grid upsampled bilinearly to the image size,
    unit RMS), white noise ``e ~ N(0, 1)`` per pixel, balanced labels: a Gaussian class mixture
    in image shape whose class means have spatial structure.

    With equal priors and isotropic Gaussian noise the nearest-template rule is the Bayes
    classifier; its accuracy on the test split is the ceiling of any model
    (``info["bayes_accuracy"]``).

    Parameters
    ----------
    n_train, n_test, n_classes, smoothness : int
    image_size : int or (int, int)
        Height and width (one number: square images).
    signal : float
        Template amplitude against unit noise (larger: easier).
    seed : int
        Seeds the templates, the labels and the noise.
    channels : int
        Image channels (``input_shape = (channels, height, width)``).

    Returns
    -------
    Dataset
        ``data_dim = channels * smoothness ** 2`` (the dimension of the template space).
    """
    height, width = ((image_size, image_size) if isinstance(image_size, int)
                     else (int(image_size[0]), int(image_size[1])))
    if min(n_train, n_test, n_classes, height, width, smoothness, channels) < 1 or signal <= 0:
        raise ValueError(f"template_images: sizes must be positive and signal > 0, got "
                         f"n_train={n_train}, n_test={n_test}, n_classes={n_classes}, "
                         f"image_size={image_size}, channels={channels}, "
                         f"smoothness={smoothness}, signal={signal}")
    g = torch.Generator().manual_seed(int(seed))
    coarse = torch.randn(n_classes, channels, smoothness, smoothness, generator=g)
    templates = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)
    templates = templates / templates.pow(2).mean((1, 2, 3), keepdim=True).sqrt()
    n = n_train + n_test
    y = (torch.arange(n) % n_classes)[torch.randperm(n, generator=g)]
    x = signal * templates[y] + torch.randn(n, channels, height, width, generator=g)
    xte, yte = x[n_train:], y[n_train:]
    dist = torch.cdist(xte.flatten(1), signal * templates.flatten(1))
    bayes = float((dist.argmin(1) == yte).double().mean())
    return Dataset(name="template-images", x_train=x[:n_train], y_train=y[:n_train],
                   x_test=xte, y_test=yte, n_classes=n_classes,
                   input_shape=(channels, height, width), data_dim=channels * smoothness ** 2,
                   info=dict(source="class templates + white noise", signal=signal,
                             smoothness=smoothness, seed=seed, bayes_accuracy=bayes))


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------

DATASETS = ("digits", "gaussian", "gaussian-images", "synthetic-text", "cifar10", "cifar100",
            "wikitext2")

#: Sizes of the generated data sets when :func:`get_dataset` builds them (sweep-sized: a grid
#: of small models trains on them in seconds per cell on a CPU); keyword arguments override.
GENERATED_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "gaussian-images": dict(n_train=1024, n_test=256, n_classes=10, image_size=(16, 16),
                            channels=3, signal=0.3, smoothness=4),
    "synthetic-text": dict(n_train=1024, n_test=256, seq_len=16, vocab_size=8, branching=2,
                           floor=0.02),
}


def get_dataset(name: str, data_dir: Optional[PathLike] = None, seed: int = 0,
                **kwargs: Any) -> Dataset:
    """Load a data set by name (:data:`DATASETS`); ``data_dir`` is required for CIFAR and
    WikiText-2. ``kwargs`` go to the loader.

    ``gaussian-images`` is :func:`template_images` and ``synthetic-text`` is
    :func:`markov_text`, generated here with the sizes of :data:`GENERATED_DEFAULTS` (``kwargs``
    override them); the returned data set is named after the registry name.
    """
    if name == "digits":
        return load_digits(seed=seed, **kwargs)
    if name == "gaussian":
        return gaussian_mixture(seed=seed, **kwargs)
    if name in GENERATED_DEFAULTS:
        make = template_images if name == "gaussian-images" else markov_text
        ds = make(seed=seed, **{**GENERATED_DEFAULTS[name], **kwargs})
        return dataclasses.replace(ds, name=name)
    if name in ("cifar10", "cifar100", "wikitext2"):
        if data_dir is None:
            raise ValueError(f"data set {name!r} is read from files: pass data_dir (--data-dir) "
                             f"with the {'CIFAR pickle' if name != 'wikitext2' else 'wiki.*.tokens'}"
                             f" files")
        if name == "wikitext2":
            return load_wikitext2(data_dir, **kwargs)
        return load_cifar(data_dir, name, seed=seed, **kwargs)
    raise ValueError(f"unknown data set {name!r}; choose from {DATASETS}")
