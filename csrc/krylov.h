// krylov op family: contract shared by the CPU and CUDA backends.
//
//   block_orthonormalize(basis (m, d), block (b, d), n_basis)  -> q (b, d), coeffs (n, b), r (b, b)
//   orthogonalize_batched(bases (r, m, d), vectors (r, d), n) -> q (r, d), coeffs (r, n), norms (r)
//
// Both reduce to memory-bound passes over the basis (three for CGS2; block_orthonormalize's
// rounds=1 mode uses two, four when its second round runs), which is what each backend
// implements and registers as the internal ops _krylov_coeffs, _krylov_project_coeffs and
// _krylov_project_gram. The small b x b algebra, the rank decisions and the rare rank-deficient
// fallback are device-agnostic and live in Python (landscape_ext/_krylov_driver.py): they touch
// only b x b matrices or one block row at a time, and there they need LAPACK calls (Cholesky,
// inverse) that torch's stable C ABI does not offer.
//
//   pass 1  C1 = Q W^T                                  (reads Q, W)
//   pass 2  W1 = W - C1^T Q,  C2 = Q W1^T   fused      (reads Q once, W; writes W1)
//   pass 3  W2 = W1 - C2^T Q, G = W2 W2^T   fused      (reads Q once, W1; writes W2)
//
// i.e. classical Gram-Schmidt applied twice (CGS2) in three passes over Q instead of four,
// followed by CholeskyQR2 of W2 (its Gram matrix G comes for free from pass 3).
//
// Pass arguments (the drivers guarantee them): basis (R, m, d) with stride(-1) == 1 (any
// batch/row stride, any of f64/f32/f16/bf16); block (R, b, d) contiguous, dtype f32 or f64 = the
// accumulation dtype acc; C (R, n, b) acc. Only basis rows [:n] are read; n >= 1. Outputs are
// new tensors of dtype acc:
//   _krylov_coeffs          C (R, n, b) = basis[:, :n] @ block^T
//   _krylov_project_coeffs  out = block - C^T basis[:, :n];  C_next = basis[:, :n] @ out^T
//   _krylov_project_gram    out = block - C^T basis[:, :n];  G (R, b, b) = out @ out^T
#pragma once

#include <cstdint>

namespace landscape_ext {
namespace krylov {

// Element math shared by backends: deterministic partition of d into chunks for the
// per-chunk partial sums (the partition depends only on d, so results do not depend on the
// thread count).
inline int64_t num_chunks(int64_t d, int64_t min_chunk = 4096, int64_t max_chunks = 64) {
  int64_t c = (d + min_chunk - 1) / min_chunk;
  if (c < 1) c = 1;
  return c < max_chunks ? c : max_chunks;
}

}  // namespace krylov
}  // namespace landscape_ext
