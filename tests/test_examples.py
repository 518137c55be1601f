"""The transformer examples run end to end (small settings) and their spectra are sane."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.usefixtures("single_thread")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transformer_spectrum_example(tmp_path, capsys):
    out = _load("transformer_spectrum").main(["--width", "16", "--steps", "20", "--k", "2",
                                              "--out", str(tmp_path)])
    assert len(out["top"]) == 2 and out["top"][0] >= out["top"][1]
    assert set(out["blocks"]) == {"embeddings", "attention", "mlp", "norms", "head"}
    # a block's largest eigenvalue cannot exceed the whole Hessian's
    assert max(out["blocks"].values()) <= out["top"][0] * (1 + 1e-3)
    assert (tmp_path / "results.json").exists()
    assert "attention backend math" in capsys.readouterr().out


def test_hf_style_example(capsys):
    out = _load("hf_style_spectrum").main(["--k", "2"])
    assert len(out["top"]) == 2 and out["d"] > 0
    assert "21 sequences in 3 batches" in capsys.readouterr().out
