"""krylov op family: block_orthonormalize and orthogonalize_batched against their references,
their algebraic promises, opcheck, torch.compile, rank deficiency and error paths."""
import re

import pytest
import torch

import landscape_ext
from landscape_ext import ops, reference

from _op_common import on_one_and_many_threads

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BASIS_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
BLOCK_DTYPES = [torch.float64, torch.float32]

# Promised accuracy per (block dtype): orthonormality of q, orthogonality to the *stored* basis,
# and relative reconstruction error. Half storage is exact for the stored values, so the same
# bounds hold; op-vs-reference agreement is looser for half bases because the stored basis is
# itself only orthonormal to ~eps(half) and CGS2 amplifies that differently from a matmul + QR.
ORTHO_TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
MATCH_TOL = {torch.float64: 1e-9, torch.float32: 2e-4}

# (d, m, n_basis, b): odd and prime sizes, b = 1, n_basis = 0, n_basis = m, n_basis < m
SHAPES = [(1009, 20, 15, 5), (257, 8, 0, 1), (100, 30, 30, 7), (64, 1, 1, 1), (3, 1, 1, 2),
          (4099, 33, 31, 8)]


def orthonormal_rows(m, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
    return q.T.contiguous().to(device=device, dtype=dtype)


def randn(*shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def stored_defect(basis, n_basis):
    """delta = ||I - Q Q^T||_2 of the basis as stored: half storage rounds an orthonormal basis
    to delta ~ eps(half). Two projection rounds leave components of size delta^2 along it."""
    if n_basis == 0:
        return 0.0
    Q = basis[:n_basis].double()
    return torch.linalg.matrix_norm(torch.eye(n_basis, dtype=torch.float64, device=Q.device)
                                    - Q @ Q.T, ord=2).item()


def check_promises(basis, block, n_basis, q, coeffs, r, tol):
    acc = block.dtype
    Q = basis[:n_basis].to(acc)
    b = block.shape[0]
    eye = torch.eye(b, dtype=acc, device=block.device)
    assert torch.isfinite(q).all() and torch.isfinite(coeffs).all() and torch.isfinite(r).all()
    assert (q @ q.T - eye).abs().max().item() <= tol
    if n_basis:
        ortho = tol + 4 * stored_defect(basis, n_basis) ** 2
        assert (q @ Q.T).abs().max().item() <= ortho
    assert torch.equal(r, r.triu())
    recon = coeffs.T @ Q + r.T @ q
    scale = block.norm(dim=1, keepdim=True).clamp_min(1.0)
    assert ((recon - block).norm(dim=1, keepdim=True) / scale).max().item() <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("basis_dtype", BASIS_DTYPES)
@pytest.mark.parametrize("block_dtype", BLOCK_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_block_orthonormalize_matches_reference(device, basis_dtype, block_dtype, shape):
    d, m, n_basis, b = shape
    basis = orthonormal_rows(m, d, basis_dtype, device, seed=d + m)
    block = randn(b, d, dtype=block_dtype, device=device, seed=b + 1)
    q, coeffs, r = ops.block_orthonormalize(basis, block, n_basis)
    assert q.shape == (b, d) and coeffs.shape == (n_basis, b) and r.shape == (b, b)
    assert q.dtype == coeffs.dtype == r.dtype == block_dtype
    check_promises(basis, block, n_basis, q, coeffs, r, ORTHO_TOL[block_dtype])
    q_ref, c_ref, r_ref = reference.block_orthonormalize(basis, block, n_basis)
    tol = MATCH_TOL[block_dtype]
    torch.testing.assert_close(coeffs, c_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(r, r_ref, rtol=tol, atol=tol * r_ref.abs().max().item())
    torch.testing.assert_close(q, q_ref, rtol=tol, atol=tol)
    assert landscape_ext.numerical_rank(r) == b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("basis_dtype,block_dtype", [
    (torch.float64, torch.float64), (torch.float32, torch.float32),
    (torch.float64, torch.float32), (torch.float32, torch.float64),
    (torch.float16, torch.float32), (torch.float16, torch.float64),
    (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("along_basis", [1e-3, 1.0, 1e3])
def test_one_round_matches_two_rounds(device, basis_dtype, block_dtype, along_basis):
    # rounds=1: one CGS round, a second only where a row kept < 1/sqrt(2) of its norm or, for a
    # basis narrower than the block, where the round's coefficients times the basis's rounding
    # exceed the block's rounding. Blocks with small components along the basis (1e-3), about
    # 0.7 of their norm along it (1.0: the first criterion alone would accept one round, which
    # leaves ~eps(basis) components for a half or float32-with-float64 basis), and blocks almost
    # inside its span (1e3: without the second round float32 orthogonality would be lost to
    # ~1e-4, a mutation this catches). Same promises as rounds=2.
    d, m, n_basis, b = 1009, 20, 18, 5
    basis = orthonormal_rows(m, d, basis_dtype, device, seed=21)
    coef = randn(b, n_basis, dtype=torch.float64, device=device, seed=22) * along_basis
    block = (coef @ basis[:n_basis].double()
             + randn(b, d, dtype=torch.float64, device=device, seed=23) / d ** 0.5)
    block = block.to(block_dtype)
    q, coeffs, r = ops.block_orthonormalize(basis, block, n_basis, rounds=1)
    q2, c2, r2 = ops.block_orthonormalize(basis, block, n_basis, rounds=2)
    # a half basis cannot resolve a remainder of 1e-4 of the norm: rank 0 in both modes
    lost = basis_dtype in (torch.float16, torch.bfloat16) and along_basis == 1e3
    rank = landscape_ext.numerical_rank(r)
    assert rank == landscape_ext.numerical_rank(r2) == (0 if lost else b)
    tol = ORTHO_TOL[block_dtype] * (4 if block_dtype == torch.float32 and along_basis == 1e3
                                    else 1)
    # (lost rows: their dropped remainder, up to rank_tol of the norm, is the reconstruction
    # error)
    check_promises(basis, block, n_basis, q, coeffs, r, 1e-1 if lost else tol)
    half = basis_dtype in (torch.float16, torch.bfloat16)
    mt = 5e-2 if half else MATCH_TOL[block_dtype]
    torch.testing.assert_close(coeffs, c2, rtol=mt, atol=mt * max(1.0, along_basis))
    torch.testing.assert_close(r, r2, rtol=mt, atol=mt * r2.abs().max().item())
    if not lost:
        atol = mt * max(1.0, along_basis)
        torch.testing.assert_close(q, q2, rtol=atol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
def test_one_round_without_basis_rows(device):
    block = randn(3, 60, dtype=torch.float64, device=device, seed=31)
    basis = orthonormal_rows(4, 60, torch.float64, device, seed=32)
    q, coeffs, r = ops.block_orthonormalize(basis, block, 0, rounds=1)
    assert coeffs.shape == (0, 3)
    check_promises(basis, block, 0, q, coeffs, r, ORTHO_TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rounds", [1, 2])
@pytest.mark.parametrize("local_rows", [0, 6, 18])
def test_local_rows_first(device, dtype, rounds, local_rows):
    # a Lanczos-like block: large components along the newest rows, small ones along the rest
    d, m, n_basis, b = 2003, 20, 18, 3
    basis = orthonormal_rows(m, d, dtype, device, seed=28)
    coef = randn(b, n_basis, dtype=torch.float64, device=device, seed=29) * 1e-4
    coef[:, n_basis - 6:] *= 1e5
    block = (coef @ basis[:n_basis].double()
             + randn(b, d, dtype=torch.float64, device=device, seed=30) * 1e-2).to(dtype)
    q, coeffs, r = ops.block_orthonormalize(basis, block, n_basis, rounds=rounds,
                                            local_rows=local_rows)
    check_promises(basis, block, n_basis, q, coeffs, r, ORTHO_TOL[dtype] * 2)
    q2, c2, r2 = ops.block_orthonormalize(basis, block, n_basis)
    mt = MATCH_TOL[dtype]
    torch.testing.assert_close(coeffs, c2, rtol=mt, atol=mt * coeffs.abs().max().item())
    torch.testing.assert_close(r, r2, rtol=mt, atol=mt * r2.abs().max().item())
    torch.testing.assert_close(q, q2, rtol=mt, atol=mt * 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("basis_dtype,block_dtype", [
    (torch.float64, torch.float64), (torch.float32, torch.float32),
    (torch.float64, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("rounds", [1, 2])
@pytest.mark.parametrize("local_rows", [0, 6])
def test_rounds_and_local_rows_match_reference(device, basis_dtype, block_dtype, rounds,
                                               local_rows):
    # the reference takes rounds and local_rows with the op's meaning: same results
    d, m, n_basis, b = 1009, 20, 18, 3
    basis = orthonormal_rows(m, d, basis_dtype, device, seed=44)
    coef = randn(b, n_basis, dtype=torch.float64, device=device, seed=45) * 1e-2
    coef[:, n_basis - 6:] *= 1e2
    block = (coef @ basis[:n_basis].double()
             + randn(b, d, dtype=torch.float64, device=device, seed=46) / d ** 0.5)
    block = block.to(block_dtype)
    kwargs = dict(rounds=rounds, local_rows=local_rows)
    q, coeffs, r = ops.block_orthonormalize(basis, block, n_basis, **kwargs)
    q_ref, c_ref, r_ref = reference.block_orthonormalize(basis, block, n_basis, **kwargs)
    assert q_ref.dtype == c_ref.dtype == r_ref.dtype == block_dtype
    check_promises(basis, block, n_basis, q_ref, c_ref, r_ref, ORTHO_TOL[block_dtype])
    mt = MATCH_TOL[block_dtype]
    torch.testing.assert_close(coeffs, c_ref, rtol=mt, atol=mt * c_ref.abs().max().item())
    torch.testing.assert_close(r, r_ref, rtol=mt, atol=mt * r_ref.abs().max().item())
    torch.testing.assert_close(q, q_ref, rtol=mt, atol=mt * 10)


@pytest.mark.parametrize("device", DEVICES)
def test_rank_tol_matches_reference(device):
    # row 2 keeps ~4e-4 of its norm after the rows before it are removed: numerically dependent
    # for rank_tol = 1e-2 (r[2, 2] = 0, a fresh q[2]), kept for 1e-5, in the op and the
    # reference alike; with the default tolerance, the rows of the rank-deficiency test
    d, n_basis = 301, 10
    basis = orthonormal_rows(n_basis, d, torch.float64, device, seed=47)
    w = randn(3, d, dtype=torch.float64, device=device, seed=48)
    near = torch.stack([w[0], w[1], w[0] - 2 * w[1] + 1e-3 * w[2]])
    in_span = basis[2] * 3.0 - basis[7]
    dependent = torch.stack([w[0], w[1], 2 * w[0] - w[1], in_span, torch.zeros_like(w[0]), w[2]])
    for block, rank_tol, lost in ((near, 1e-5, []), (near, 1e-2, [2]),
                                  (dependent, -1.0, [2, 3, 4])):
        got = ops.block_orthonormalize(basis, block, n_basis, rank_tol=rank_tol)
        want = reference.block_orthonormalize(basis, block, n_basis, rank_tol=rank_tol)
        for q, coeffs, r in (got, want):
            assert torch.diagonal(r).eq(0).nonzero().flatten().tolist() == lost
            eye = torch.eye(block.shape[0], dtype=q.dtype, device=device)
            assert (q @ q.T - eye).abs().max().item() < 1e-12
            assert (q @ basis.T).abs().max().item() < 1e-12
        # rows up to the first lost one, and that row's coefficients, are determined
        k = lost[0] if lost else block.shape[0]
        torch.testing.assert_close(got[0][:k], want[0][:k], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[2][:k, :k + 1], want[2][:k, :k + 1], rtol=1e-9,
                                   atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_one_round_rank_deficiency(device):
    d, n_basis = 301, 10
    basis = orthonormal_rows(n_basis, d, torch.float32, device, seed=24)
    w = randn(2, d, dtype=torch.float32, device=device, seed=25)
    block = torch.stack([w[0], basis[3] - 2 * basis[8], w[1], w[0] + w[1]])
    q, coeffs, r = ops.block_orthonormalize(basis, block, n_basis, rounds=1)
    assert torch.diagonal(r)[[0, 2]].gt(0).all() and torch.diagonal(r)[[1, 3]].eq(0).all()
    check_promises(basis, block, n_basis, q, coeffs, r, ORTHO_TOL[torch.float32])


def test_rounds_and_local_rows_are_checked():
    basis = orthonormal_rows(4, 50, torch.float32, "cpu", seed=26)
    block = randn(2, 50, dtype=torch.float32, device="cpu", seed=27)
    with pytest.raises(RuntimeError, match="rounds must be 2 .* got 3"):
        ops.block_orthonormalize(basis, block, 4, rounds=3)
    with pytest.raises(RuntimeError, match=r"local_rows must be in \[0, n_basis = 4\], got 5"):
        ops.block_orthonormalize(basis, block, 4, rounds=1, local_rows=5)
    bad = basis.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(RuntimeError, match=r"non-finite values in rows \[2, 4\) \(local_rows\)"):
        ops.block_orthonormalize(bad, block, 4, rounds=1, local_rows=2)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    d, m, n_basis, b = 513, 12, 10, 4
    dense = orthonormal_rows(m, d, torch.float32, device, seed=3)
    # row-strided basis: a view into a wider buffer (no copy needed by the kernel)
    wide = torch.zeros(m, d + 7, dtype=torch.float32, device=device)
    wide[:, :d] = dense
    row_strided = wide[:, :d]
    # transposed storage: column stride != 1 (the op copies it)
    transposed = dense.T.contiguous().T
    block = randn(d, b, dtype=torch.float32, device=device, seed=4).T  # non-contiguous block
    expected = ops.block_orthonormalize(dense, block.contiguous(), n_basis)
    for basis in (row_strided, transposed):
        got = ops.block_orthonormalize(basis, block, n_basis)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("basis_dtype,block_dtype", [
    (torch.float64, torch.float64), (torch.float64, torch.float32),
    (torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_rank_deficient_block_gets_fresh_directions(device, basis_dtype, block_dtype):
    d, m, n_basis = 301, 10, 10
    basis = orthonormal_rows(m, d, basis_dtype, device, seed=5)
    w = randn(3, d, dtype=block_dtype, device=device, seed=6)
    in_span = basis[2].to(block_dtype) * 3.0 - basis[7].to(block_dtype)
    zero = torch.zeros(d, dtype=block_dtype, device=device)
    # rows: independent, dependent on row 0 and 1, inside span(basis), zero, independent
    block = torch.stack([w[0], w[1], 2 * w[0] - w[1], in_span, zero, w[2]])
    q, coeffs, r = ops.block_orthonormalize(basis, block, n_basis)
    diag = torch.diagonal(r)
    assert diag[[0, 1, 5]].gt(0).all()
    assert diag[[2, 3, 4]].eq(0).all()
    assert landscape_ext.numerical_rank(r) == 3
    tol = ORTHO_TOL[block_dtype]
    check_promises(basis, block, n_basis, q, coeffs, r,
                   tol if basis_dtype != torch.float16 else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_ill_conditioned_block_stays_orthonormal(device):
    # Two nearly parallel rows (condition ~1e5): CholeskyQR alone would lose orthogonality in
    # float32; the op must detect it and take the stable path.
    d = 2000
    basis = orthonormal_rows(16, d, torch.float32, device, seed=7)
    w = randn(2, d, dtype=torch.float64, device=device, seed=8)
    block = torch.stack([w[0], w[0] + 1e-5 * w[1], w[1]]).to(torch.float32)
    q, coeffs, r = ops.block_orthonormalize(basis, block, 16)
    eye = torch.eye(3, device=device)
    assert (q @ q.T - eye).abs().max().item() < 2e-5
    assert (q @ basis.T).abs().max().item() < 2e-5


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_trivial_sizes(device):
    basis = orthonormal_rows(4, 50, torch.float32, device, seed=9)
    q, c, r = ops.block_orthonormalize(basis, torch.empty(0, 50, device=device), 4)
    assert q.shape == (0, 50) and c.shape == (4, 0) and r.shape == (0, 0)
    one = randn(1, 50, dtype=torch.float32, device=device, seed=10)
    q, c, r = ops.block_orthonormalize(basis, one, 0)
    torch.testing.assert_close(q, one / one.norm())
    assert c.shape == (0, 1)
    q, c, n = ops.orthogonalize_batched(basis.unsqueeze(0).expand(0, 4, 50),
                                        torch.empty(0, 50, device=device), 2)
    assert q.shape == (0, 50) and c.shape == (0, 2) and n.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("basis_dtype", BASIS_DTYPES)
@pytest.mark.parametrize("vec_dtype", BLOCK_DTYPES)
@pytest.mark.parametrize("shape", [(5, 12, 1031, 9), (1, 1, 17, 1), (3, 6, 64, 0), (17, 4, 200, 4)])
def test_orthogonalize_batched_matches_reference(device, basis_dtype, vec_dtype, shape):
    r, m, d, n_basis = shape
    bases = torch.stack([orthonormal_rows(m, d, basis_dtype, device, seed=i) for i in range(r)])
    vectors = randn(r, d, dtype=vec_dtype, device=device, seed=11)
    q, coeffs, norms = ops.orthogonalize_batched(bases, vectors, n_basis)
    assert q.shape == (r, d) and coeffs.shape == (r, n_basis) and norms.shape == (r,)
    tol = ORTHO_TOL[vec_dtype]
    B = bases[:, :n_basis].to(vec_dtype)
    recon = (coeffs.unsqueeze(1) @ B).squeeze(1) + norms.unsqueeze(1) * q
    assert ((recon - vectors).norm(dim=1) / vectors.norm(dim=1)).max().item() <= tol
    assert (q.norm(dim=1) - 1).abs().max().item() <= tol
    if n_basis:
        defect = max(stored_defect(bases[i], n_basis) for i in range(r))
        assert (B @ q.unsqueeze(-1)).abs().max().item() <= tol + 4 * defect**2
    q_ref, c_ref, n_ref = reference.orthogonalize_batched(bases, vectors, n_basis)
    mt = MATCH_TOL[vec_dtype]
    torch.testing.assert_close(q, q_ref, rtol=mt, atol=mt)
    torch.testing.assert_close(coeffs, c_ref, rtol=mt, atol=mt)
    torch.testing.assert_close(norms, n_ref, rtol=mt, atol=mt)


@pytest.mark.parametrize("device", DEVICES)
def test_orthogonalize_batched_vector_in_span(device):
    d = 97
    bases = torch.stack([orthonormal_rows(5, d, torch.float64, device, seed=i) for i in range(3)])
    vectors = randn(3, d, dtype=torch.float64, device=device, seed=12)
    vectors[1] = 2.0 * bases[1, 0] - bases[1, 3]       # inside its own basis
    q, coeffs, norms = ops.orthogonalize_batched(bases, vectors, 5)
    assert norms[1].item() == 0.0 and norms[0] > 0 and norms[2] > 0
    # a float32 vector in the span of a float64 basis is detected at float32 precision
    _, _, norms32 = ops.orthogonalize_batched(bases, vectors.float(), 5)
    assert norms32[1].item() == 0.0 and norms32[0] > 0
    torch.testing.assert_close(coeffs[1], torch.tensor([2.0, 0, 0, -1.0, 0], dtype=torch.float64,
                                                       device=device), atol=1e-12, rtol=0)
    assert abs(q[1].norm().item() - 1) < 1e-12
    assert (bases[1] @ q[1]).abs().max().item() < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_orthogonalize_batched_rank_tol_matches_reference(device):
    d = 97
    bases = torch.stack([orthonormal_rows(5, d, torch.float64, device, seed=i) for i in range(3)])
    vectors = randn(3, d, dtype=torch.float64, device=device, seed=49)
    vectors[1] = 2.0 * bases[1, 0] - bases[1, 3] + 1e-6 * vectors[0]   # keeps ~1e-6 of its norm
    for rank_tol, lost in ((1e-8, []), (1e-4, [1])):
        got = ops.orthogonalize_batched(bases, vectors, 5, rank_tol=rank_tol)
        want = reference.orthogonalize_batched(bases, vectors, 5, rank_tol=rank_tol)
        for q, coeffs, norms in (got, want):
            assert norms.eq(0).nonzero().flatten().tolist() == lost
            assert (q.norm(dim=1) - 1).abs().max().item() < 1e-12
            assert (bases @ q.unsqueeze(-1)).abs().max().item() < 1e-12
        keep = [i for i in range(3) if i not in lost]
        torch.testing.assert_close(got[0][keep], want[0][keep], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-12)


def test_results_do_not_depend_on_thread_count():
    d, m, b = 300_001, 6, 3
    basis = orthonormal_rows(m, d, torch.float32, "cpu", seed=13)
    block = randn(b, d, dtype=torch.float32, device="cpu", seed=14)
    one, many = on_one_and_many_threads(lambda: ops.block_orthonormalize(basis, block, m))
    for a, b_ in zip(one, many):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    basis = orthonormal_rows(9, 131, torch.float32, device, seed=15)
    block = randn(3, 131, dtype=torch.float32, device=device, seed=16)
    torch.library.opcheck(torch.ops.landscape_ext.block_orthonormalize, (basis, block, 7, -1.0))
    torch.library.opcheck(torch.ops.landscape_ext.block_orthonormalize,
                          (basis, block, 7, -1.0, 1, 3))
    bases = torch.stack([basis, basis.flip(0)])
    vectors = randn(2, 131, dtype=torch.float64, device=device, seed=17)
    torch.library.opcheck(torch.ops.landscape_ext.orthogonalize_batched, (bases, vectors, 5, -1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("basis_dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("acc", [torch.float64, torch.float32])
def test_krylov_passes_match_their_formulas(device, basis_dtype, acc):
    # the three internal pass ops the drivers are made of (csrc/krylov.h), against their
    # formulas in float64; a strided (row-padded) basis of which only rows [:n] are read
    if basis_dtype == torch.float64 and acc == torch.float32:
        pytest.skip("a float64 basis runs with a float64 block (the drivers widen it)")
    R, m, b, d, n = 2, 7, 3, 4099, 5
    full = torch.stack([orthonormal_rows(m + 1, d + 3, torch.float64, device, seed=20 + i)
                        for i in range(R)])
    basis = full[:, :m, :d].to(basis_dtype)               # row stride d + 3, unit stride in d
    basis[:, n:] = float("nan")                            # rows past n are never read
    W = randn(R, b, d, dtype=acc, device=device, seed=30)
    C = randn(R, n, b, dtype=acc, device=device, seed=31)
    Q, W64, C64 = basis[:, :n].double(), W.double(), C.double()
    out64 = W64 - C64.transpose(1, 2) @ Q
    tol = 1e-12 if acc == torch.float64 else 2e-4
    lib = torch.ops.landscape_ext
    torch.testing.assert_close(lib._krylov_coeffs(basis, W, n).double(),
                               Q @ W64.transpose(1, 2), rtol=tol, atol=tol * d ** 0.5)
    out, C2 = lib._krylov_project_coeffs(basis, W, C, n)
    torch.testing.assert_close(out.double(), out64, rtol=tol, atol=tol)
    torch.testing.assert_close(C2.double(), Q @ out64.transpose(1, 2), rtol=tol,
                               atol=tol * d ** 0.5)
    out, G = lib._krylov_project_gram(basis, W, C, n)
    torch.testing.assert_close(out.double(), out64, rtol=tol, atol=tol)
    torch.testing.assert_close(G.double(), out64 @ out64.transpose(1, 2), rtol=tol,
                               atol=tol * d)
    assert out.dtype == C2.dtype == G.dtype == acc


@pytest.mark.parametrize("basis_dtype, acc", [(torch.float64, torch.float64),
                                               (torch.float32, torch.float32),
                                               (torch.float32, torch.float64),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("rounds, local_rows", [(2, 0), (1, 0), (1, 3), (2, 2)])
def test_the_compiled_common_path_equals_the_python_driver(basis_dtype, acc, rounds, local_rows):
    # _krylov_fast_orthonormalize (CPU) runs the driver's common path in one call: bit for bit
    # the driver's result, and declining (ok = False) hands over to the driver unchanged
    from landscape_ext import _krylov_driver
    slow = ops._KRYLOV_PASSES._replace(fast=None, fast_devices=())
    assert ops._KRYLOV_PASSES.fast_devices == ("cpu",)
    for m, d, b, n in [(9, 1031, 1, 9), (12, 4099, 5, 10), (6, 300, 3, 0), (20, 8200, 9, 17)]:
        basis = orthonormal_rows(m, d, basis_dtype, "cpu", seed=m + d)
        block = randn(b, d, dtype=acc, device="cpu", seed=b + d)
        if b > 2:  # a near-dependent row: the fast path must decline it, the driver handles it
            block[2] = block[0] + 1e-9 * block[1]
        lr = min(local_rows, n)
        want = _krylov_driver.block_orthonormalize(slow, basis, block, n, -1.0, rounds, lr)
        got = ops.block_orthonormalize(basis, block, n, rounds=rounds, local_rows=lr)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w), (m, d, b, n)


@pytest.mark.parametrize("device", DEVICES)
def test_krylov_passes_opcheck(device):
    basis = orthonormal_rows(9, 131, torch.float32, device, seed=15).unsqueeze(0)
    W = randn(1, 3, 131, dtype=torch.float32, device=device, seed=16)
    C = randn(1, 7, 3, dtype=torch.float32, device=device, seed=17)
    lib = torch.ops.landscape_ext
    torch.library.opcheck(lib._krylov_coeffs, (basis, W, 7))
    torch.library.opcheck(lib._krylov_project_coeffs, (basis, W, C, 7))
    torch.library.opcheck(lib._krylov_project_gram, (basis, W, C, 7))
    if device == "cpu":  # the CPU passes also guard a direct call (the drivers pass valid args)
        with pytest.raises(RuntimeError, match=r"_krylov_coeffs: n = 10 must be in \[1, m = 9\]"):
            lib._krylov_coeffs(basis, W, 10)


def test_torch_compile_fullgraph():
    basis = orthonormal_rows(6, 77, torch.float32, "cpu", seed=18)
    block = randn(2, 77, dtype=torch.float32, device="cpu", seed=19)

    def step(basis, block):
        q, coeffs, r = ops.block_orthonormalize(basis, block * 2.0, 6)
        return q.sum() + coeffs.sum() + r.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(basis, block), step(basis, block))


def test_cuda_kernels_are_registered_when_a_gpu_exists():
    info = landscape_ext.build_info()
    if not torch.cuda.is_available():
        pytest.skip("no GPU: CUDA kernels are compiled by the CI's nvcc check instead")
    assert info["cuda_kernels"], "a GPU is visible but landscape_ext was built without CUDA"
    assert "CUDA" in info["kernels"]["block_orthonormalize"]
    assert "CUDA" in info["kernels"]["orthogonalize_batched"]


# ---- error paths: messages name the op, the argument and the sizes -----------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_block_orthonormalize_errors(device):
    basis = orthonormal_rows(8, 40, torch.float32, device, seed=20)
    block = randn(3, 40, dtype=torch.float32, device=device, seed=21)
    cases = [
        ((basis[0], block, 4), r"block_orthonormalize: basis must be 2-D \(m, d\), got shape \[40\]"),
        ((basis, block[0], 4), r"block must be 2-D \(b, d\), got shape \[40\]"),
        ((basis, block[:, :39], 4), r"basis has d = 40 columns but block has d = 39"),
        ((basis, block, 9), r"n_basis = 9 must be in \[0, m\] with m = 8"),
        ((basis, block, -1), r"n_basis = -1"),
        ((basis.to(torch.int32), block, 4), r"basis must be float64, float32, float16 or bfloat16"),
        ((basis, block.half(), 4), r"block must be float32 or float64, got Half"),
        ((orthonormal_rows(8, 10, torch.float32, device, 1), randn(3, 10, dtype=torch.float32,
          device=device, seed=1), 8), r"n_basis \(8\) \+ block rows \(3\) exceeds the dimension d = 10"),
    ]
    for args, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            ops.block_orthonormalize(*args)
    with pytest.raises(RuntimeError, match=r"rank_tol must be finite and < 1"):
        ops.block_orthonormalize(basis, block, 4, rank_tol=2.0)
    bad = block.clone()
    bad[1, 17] = float("nan")
    with pytest.raises(RuntimeError, match=r"block has non-finite values \(row 1 of 3\)"):
        ops.block_orthonormalize(basis, bad, 4)
    bad_basis = basis.clone()
    bad_basis[2, 5] = float("inf")
    with pytest.raises(RuntimeError, match=r"basis has non-finite values in its first n_basis = 4"):
        ops.block_orthonormalize(bad_basis, block, 4)
    # rows past n_basis are not read, so garbage there is fine
    bad_basis = basis.clone()
    bad_basis[6] = float("nan")
    ops.block_orthonormalize(bad_basis, block, 4)


def test_mixed_devices_error():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    basis = orthonormal_rows(4, 20, torch.float32, "cuda", seed=22)
    with pytest.raises(RuntimeError, match=r"basis is on cuda:0 but block is on cpu"):
        ops.block_orthonormalize(basis, torch.randn(2, 20), 2)


@pytest.mark.parametrize("device", DEVICES)
def test_orthogonalize_batched_errors(device):
    bases = torch.stack([orthonormal_rows(5, 30, torch.float32, device, seed=i) for i in range(2)])
    vectors = randn(2, 30, dtype=torch.float32, device=device, seed=23)
    cases = [
        ((bases[0], vectors, 2), r"orthogonalize_batched: bases must be 3-D \(r, m, d\), got shape \[5, 30\]"),
        ((bases, vectors[0], 2), r"vectors must be 2-D \(r, d\), got shape \[30\]"),
        ((bases, vectors[:1], 2), r"bases holds r = 2 runs but vectors has 1 rows"),
        ((bases, vectors[:, :29], 2), r"bases has d = 30 but vectors has d = 29"),
        ((bases, vectors, 6), r"n_basis = 6 must be in \[0, m\] with m = 5"),
        ((bases, vectors.long(), 2), r"vectors must be float32 or float64, got Long"),
    ]
    for args, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            ops.orthogonalize_batched(*args)
    bad = bases.clone()
    bad[1, 1, 3] = float("nan")
    with pytest.raises(RuntimeError, match=r"bases has non-finite values in its first n_basis = 2 rows \(run 1\)"):
        ops.orthogonalize_batched(bad, vectors, 2)


def test_missing_extension_error_names_both_torches_and_the_fix(monkeypatch):
    import importlib

    from landscape_ext import _build_facts, _extension

    def fail(name):
        raise ImportError("simulated: undefined symbol _ZN3c10")

    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(ImportError) as info:
        _extension.load_extension()
    text = str(info.value)
    assert "undefined symbol _ZN3c10" in text
    assert f"built with torch {_build_facts.BUILT_TORCH_VERSION} for torch >= 2.10" in text
    assert f"torch {torch.__version__} is installed" in text
    assert "pip install --no-build-isolation -e ." in text


def test_a_torch_older_than_the_stable_abi_target_is_refused(monkeypatch):
    import importlib

    from landscape_ext import _build_facts, _extension

    loaded = []
    monkeypatch.setattr(importlib, "import_module", lambda name: loaded.append(name))
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    with pytest.raises(ImportError, match=r"needs torch >= 2\.10 .*built with torch "
                                          + re.escape(_build_facts.BUILT_TORCH_VERSION)
                                          + r"\) but torch 2\.9\.1\+cu128 is installed"):
        _extension.load_extension()
    assert loaded == []  # refused before the library is loaded
    # any newer torch loads the same binary (the stable ABI): no version-equality check
    for newer in ("2.10.0", "2.14.1+cu130", "2.15.0", "3.0.0.dev20270101"):
        monkeypatch.setattr(torch, "__version__", newer)
        _extension.load_extension()
    assert loaded == ["landscape_ext._C"] * 4
