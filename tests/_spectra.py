"""Symmetric test matrices with a known spectrum, shared by the eigsh and SLQ tests."""
from __future__ import annotations

import torch


def known_spectrum(eigs: torch.Tensor, seed: int = 0):
    """``(A, Q)``: ``A = Q diag(eigs) Q^T`` (float64, symmetrized) and its eigenvectors ``Q``
    (columns, from the QR of a seeded Gaussian matrix)."""
    d = eigs.numel()
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    A = (Q * eigs) @ Q.T
    return 0.5 * (A + A.T), Q
