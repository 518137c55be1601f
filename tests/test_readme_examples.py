"""Every Python example of README.md runs unchanged (on small stand-ins for the user's objects).

The README's blocks use names the user supplies (``model``, ``loader``, ``basis`` ...); this
test defines small ones and executes each block as written. The GPU/torchrun block is skipped.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _namespace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    model_b = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    m, d, b = 24, 200, 3
    basis = torch.linalg.qr(torch.randn(d, m, dtype=torch.float64))[0].T.contiguous()
    bases = torch.stack([basis[:16]] * 4)
    import landscape_ext
    return {  # earlier blocks' imports stay in scope for later ones, as a reader runs them
        "torch": torch, "landscape_ext": landscape_ext, "lx": landscape_ext,
        "model": model, "loader": loader, "model_a": model, "model_b": model_b,
        "loss_fn": nn.CrossEntropyLoss(), "per_sample_loss": nn.CrossEntropyLoss(reduction="none"),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "eigenvalues": torch.linalg.eigvalsh(torch.randn(200, 200).triu(1)
                                             + torch.randn(200, 200).triu(1).T).numpy(),
        "widths": [32, 64, 128, 32, 64, 128], "depths": [2, 2, 2, 4, 4, 4],
        "lam": [3.0, 4.1, 5.9, 2.1, 2.8, 4.2],
        "basis": basis, "block": torch.randn(b, d, dtype=torch.float64), "n_basis": 12, "b": b,
        "bases": bases, "vectors": torch.randn(4, d, dtype=torch.float64),
    }


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_block_runs(index, capsys):
    code = _blocks()[index]
    if "torch.cuda.set_device" in code or code.lstrip().startswith(">>>"):
        pytest.skip("needs torchrun and GPUs, or is an interactive transcript")
    namespace = _namespace()
    exec(compile(code, f"README.md block {index}", "exec"), namespace)  # noqa: S102
    # the documented identities of the op examples
    if "rounds=1" in code:
        q, coeffs, r = namespace["q"], namespace["coeffs"], namespace["r"]
        recon = coeffs.T @ namespace["basis"][:12] + r.T @ q
        torch.testing.assert_close(recon, namespace["block"])
    if "orthogonalize_batched" in code:
        q, coeffs, norms = namespace["q"], namespace["coeffs"], namespace["norms"]
        recon = torch.einsum("rm,rmd->rd", coeffs, namespace["bases"][:, :12]) + norms[:, None] * q
        torch.testing.assert_close(recon, namespace["vectors"])
