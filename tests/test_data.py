"""Data sets of landscape_lab: synthetic mixtures, digits, CIFAR and WikiText-2 file readers
(tiny files written in the real formats), and the missing-file errors."""
import pickle

import numpy as np
import pytest
import torch

from landscape_lab import data
from landscape_lab.data import (DataFileNotFoundError, gaussian_mixture, get_dataset,
                                load_cifar, load_digits, load_wikitext2)


def test_gaussian_mixture_intrinsic_dimension():
    ds = gaussian_mixture(n=200, ambient_dim=12, intrinsic_dim=3, n_classes=4, seed=1)
    X = torch.cat([ds.x_train, ds.x_test]).double()
    assert torch.linalg.matrix_rank(X, rtol=1e-5).item() == 3
    assert ds.data_dim == 3 and ds.input_shape == (12,)
    assert ds.n_train + ds.n_test == 200 and ds.n_test == 50
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=4)
    assert counts.tolist() == [50, 50, 50, 50]
    noisy = gaussian_mixture(n=200, ambient_dim=12, intrinsic_dim=3, n_classes=4, seed=1,
                             noise=0.5)
    assert torch.linalg.matrix_rank(noisy.x_train.double()).item() == 12
    again = gaussian_mixture(n=200, ambient_dim=12, intrinsic_dim=3, n_classes=4, seed=1)
    assert torch.equal(again.x_train, ds.x_train)
    with pytest.raises(ValueError, match="intrinsic_dim"):
        gaussian_mixture(ambient_dim=3, intrinsic_dim=4)


def test_digits_split_and_standardization():
    ds = load_digits(seed=0)
    assert ds.n_train + ds.n_test == 1797 and ds.input_shape == (64,) and ds.n_classes == 10
    mu = ds.x_train.mean(0)
    assert mu.abs().max() < 1e-5
    ds2 = load_digits(seed=0)
    assert torch.equal(ds.y_test, ds2.y_test)
    assert not torch.equal(load_digits(seed=1).y_test, ds.y_test)
    img = load_digits(images=True)
    assert img.x_train.shape[1:] == (1, 8, 8) and img.input_shape == (1, 8, 8)
    x, y = ds.subset(100, seed=3)
    assert x.shape == (100, 64) and y.shape == (100,)
    sizes = [xb.shape[0] for xb, _ in ds.batches(500)]
    assert sum(sizes) == ds.n_train and sizes[0] == 500


def _write_cifar10(d, n_per=3):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(),
                 b"data": rng.integers(0, 256, (n_per, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n_per).tolist(),
                 b"filenames": [b"x.png"] * n_per}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_reader(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):   # parent or the folder itself
        ds = load_cifar(root, "cifar10")
        assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
        assert ds.y_train.dtype == torch.int64 and ds.n_classes == 10
    raw = load_cifar(tmp_path, "cifar10", normalize=False)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        b = pickle.load(f, encoding="bytes")
    first = torch.from_numpy(b[b"data"][0].reshape(3, 32, 32).astype(np.float32)) / 255
    torch.testing.assert_close(raw.x_train[0], first)
    assert raw.y_train[:3].tolist() == b[b"labels"]
    sub = load_cifar(tmp_path, "cifar10", n_train=4, n_test=2)
    assert sub.n_train == 4 and sub.n_test == 2


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 5), ("test", 2)):
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": [99, 0, 50, 7, 3][:n],
                         b"coarse_labels": [1] * n}, f)
    ds = load_cifar(tmp_path, "cifar100")
    assert ds.n_classes == 100 and ds.y_train.tolist() == [99, 0, 50, 7, 3]


def test_cifar_missing_file_error_names_file_and_directory(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar10(d)
    (d / "data_batch_3").unlink()
    with pytest.raises(DataFileNotFoundError) as ei:
        load_cifar(tmp_path, "cifar10")
    msg = str(ei.value)
    assert "data_batch_3" in msg and str(d) in msg and "cifar-10-python.tar.gz" in msg
    assert isinstance(ei.value, FileNotFoundError)
    with pytest.raises(DataFileNotFoundError, match="data_batch_1"):
        load_cifar(tmp_path / "empty", "cifar10")


_WIKI = {
    "wiki.train.tokens": " = Title = \n\n the cat sat on the mat . \n the dog sat . \n",
    "wiki.valid.tokens": " the cat ran . \n",
    "wiki.test.tokens": " a bird sat . \n",
}


def _write_wiki(d):
    d.mkdir(parents=True, exist_ok=True)
    for k, v in _WIKI.items():
        (d / k).write_text(v, encoding="utf-8")


def test_wikitext2_reader(tmp_path):
    _write_wiki(tmp_path / "wikitext-2")
    ds = load_wikitext2(tmp_path, seq_len=4)
    itos = ds.info["itos_head"]
    assert itos[0] == "<unk>" and "<eos>" in itos and "the" in itos
    # train stream: = Title = <eos> the cat sat on the mat . <eos> the dog sat . <eos> (17 tokens)
    assert ds.x_train.shape == (4, 4) and ds.task == "language_model"
    torch.testing.assert_close(ds.x_train.reshape(-1)[1:], ds.y_train.reshape(-1)[:-1])
    vocab = ds.n_classes
    assert ds.x_test.max() < vocab
    # 'ran' is not in the training vocabulary -> <unk> (id 0)
    assert 0 in ds.x_test.reshape(-1).tolist() + ds.y_test.reshape(-1).tolist()
    test = load_wikitext2(tmp_path / "wikitext-2", seq_len=2, eval_split="test")
    assert test.x_test.shape[1] == 2
    small = load_wikitext2(tmp_path, seq_len=2, max_vocab=3)
    assert small.n_classes == 3


def test_wikitext2_missing_file(tmp_path):
    d = tmp_path / "wt2"
    _write_wiki(d)
    (d / "wiki.valid.tokens").unlink()
    with pytest.raises(DataFileNotFoundError) as ei:
        load_wikitext2(d)
    assert "wiki.valid.tokens" in str(ei.value) and str(d) in str(ei.value)


def test_get_dataset_registry(tmp_path):
    assert get_dataset("digits").name == "digits"
    assert get_dataset("gaussian", n=100, ambient_dim=5, intrinsic_dim=2).data_dim == 2
    with pytest.raises(ValueError, match="data_dir"):
        get_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown data set"):
        get_dataset("mnist")
    _write_wiki(tmp_path)
    assert get_dataset("wikitext2", tmp_path, seq_len=3).task == "language_model"


def test_generated_image_and_text_sets():
    from landscape_lab.data import DATASETS, GENERATED_DEFAULTS, markov_text, template_images

    assert {"gaussian-images", "synthetic-text"} <= set(DATASETS)
    img = get_dataset("gaussian-images", channels=2, image_size=(6, 10), n_train=40, n_test=20,
                      n_classes=4, seed=1)
    assert img.name == "gaussian-images" and img.x_train.shape == (40, 2, 6, 10)
    assert img.input_shape == (2, 6, 10) and img.n_classes == 4 and img.data_dim == 2 * 4 ** 2
    # the same generator as template_images, under the registry name
    same = template_images(n_train=40, n_test=20, n_classes=4, image_size=(6, 10), channels=2,
                           seed=1, signal=GENERATED_DEFAULTS["gaussian-images"]["signal"])
    assert torch.equal(same.x_train, img.x_train) and same.name == "template-images"
    # class means are smooth templates: neighbouring pixels of a class mean are correlated
    big = template_images(n_train=2000, n_test=10, n_classes=2, image_size=12, signal=1.0,
                          channels=1, seed=0)
    m = big.x_train[big.y_train == 0].mean(0)[0]
    assert torch.corrcoef(torch.stack([m[:, :-1].reshape(-1), m[:, 1:].reshape(-1)]))[0, 1] > 0.8
    d = get_dataset("gaussian-images")
    assert d.input_shape == (3, 16, 16) and d.n_train == 1024 and d.info["bayes_accuracy"] > 0.9
    txt = get_dataset("synthetic-text", n_train=8, n_test=4, seq_len=5, vocab_size=6, seed=2)
    assert txt.name == "synthetic-text" and txt.task == "language_model"
    assert txt.x_train.shape == (8, 5) and txt.n_classes == 6
    same_text = markov_text(n_train=8, n_test=4, seq_len=5, vocab_size=6, branching=2, seed=2)
    assert torch.equal(txt.x_train, same_text.x_train) and same_text.name == "markov-text"
    assert 0 < txt.info["entropy_rate"] < txt.info["optimal_loss"] < np.log(6)
    with pytest.raises(ValueError, match="channels=0"):
        template_images(channels=0)
