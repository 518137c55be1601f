// krylov op family: contract shared by the CPU and CUDA backends.
//
//   block_orthonormalize(basis (m, d), block (b, d), n_basis)  -> q (b, d), coeffs (n, b), r (b, b)
//   orthogonalize_batched(bases (r, m, d), vectors (r, d), n) -> q (r, d), coeffs (r, n), norms (r)
//
// Both reduce to memory-bound passes over the basis (three for CGS2; block_orthonormalize's
// rounds=1 mode uses two, four when its second round runs), which is what each backend
// implements (struct Passes below); the small b x b algebra, the rank decisions and the rare
// rank-deficient fallback are device-agnostic and live in krylov_common.cpp.
//
//   pass 1  C1 = Q W^T                                  (reads Q, W)
//   pass 2  W1 = W - C1^T Q,  C2 = Q W1^T   fused      (reads Q once, W; writes W1)
//   pass 3  W2 = W1 - C2^T Q, G = W2 W2^T   fused      (reads Q once, W1; writes W2)
//
// i.e. classical Gram-Schmidt applied twice (CGS2) in three passes over Q instead of four,
// followed by CholeskyQR2 of W2 (its Gram matrix G comes for free from pass 3).
#pragma once

#include <ATen/core/Tensor.h>  // not ATen.h: these headers reach nvcc, where ATen.h costs ~40% of a compile
#include <torch/library.h>

#include <tuple>

namespace landscape_ext {
namespace krylov {

// ---- argument checks (messages name the op, the argument and the sizes) ------------------------
void check_block_orthonormalize_args(const at::Tensor& basis, const at::Tensor& block,
                                     int64_t n_basis, double rank_tol);
void check_orthogonalize_batched_args(const at::Tensor& bases, const at::Tensor& vectors,
                                      int64_t n_basis, double rank_tol);

// Default relative rank tolerance: a direction whose remainder after projection is below
// rank_tol * (its norm before projection) is numerically in the span and is replaced.
// 10 x the unit roundoff of the least precise of the two storage dtypes.
double default_rank_tol(at::ScalarType basis_dtype, at::ScalarType block_dtype);

// ---- backend passes -----------------------------------------------------------------------------
// Shapes: basis (R, m, d) with stride(-1) == 1 (any batch/row stride, any of f64/f32/f16/bf16);
// block (R, b, d) contiguous, dtype f32 or f64 = the accumulation dtype acc; C (R, n, b) acc,
// contiguous. Only basis rows [:n] are read; n >= 1. Outputs are new tensors of dtype acc.
struct Passes {
  // C (R, n, b) = basis[:, :n] @ block^T
  at::Tensor (*coeffs)(const at::Tensor& basis, const at::Tensor& block, int64_t n);
  // out = block - C^T basis[:, :n];  C_next = basis[:, :n] @ out^T   -> (out, C_next)
  std::tuple<at::Tensor, at::Tensor> (*project_coeffs)(const at::Tensor& basis,
                                                       const at::Tensor& block,
                                                       const at::Tensor& C, int64_t n);
  // out = block - C^T basis[:, :n];  G (R, b, b) = out @ out^T      -> (out, G)
  std::tuple<at::Tensor, at::Tensor> (*project_gram)(const at::Tensor& basis,
                                                     const at::Tensor& block,
                                                     const at::Tensor& C, int64_t n);
};

// Device-agnostic drivers (krylov_common.cpp), called by each backend's registered kernel.
// rounds: 2 = CGS2 (three passes); 1 = one round of CGS (two passes) and a second round only
// when some row keeps less than 1/sqrt(2) of its norm (DGKS). local_rows > 0: the last
// local_rows rows of basis[:n_basis] are projected out first (one round over those rows only).
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_orthonormalize_impl(
    const Passes& passes, const at::Tensor& basis, const at::Tensor& block, int64_t n_basis,
    double rank_tol, int64_t rounds, int64_t local_rows);
std::tuple<at::Tensor, at::Tensor, at::Tensor> orthogonalize_batched_impl(
    const Passes& passes, const at::Tensor& bases, const at::Tensor& vectors, int64_t n_basis,
    double rank_tol);

// The registered kernels of a backend whose passes are kPasses (a Passes object with static
// storage): its TORCH_LIBRARY_IMPL block calls register_kernels<kPasses>(m).
template <const Passes& kPasses>
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_orthonormalize_kernel(
    const at::Tensor& basis, const at::Tensor& block, int64_t n_basis, double rank_tol,
    int64_t rounds, int64_t local_rows) {
  return block_orthonormalize_impl(kPasses, basis, block, n_basis, rank_tol, rounds, local_rows);
}

template <const Passes& kPasses>
std::tuple<at::Tensor, at::Tensor, at::Tensor> orthogonalize_batched_kernel(
    const at::Tensor& bases, const at::Tensor& vectors, int64_t n_basis, double rank_tol) {
  return orthogonalize_batched_impl(kPasses, bases, vectors, n_basis, rank_tol);
}

template <const Passes& kPasses>
void register_kernels(torch::Library& m) {
  m.impl("block_orthonormalize", &block_orthonormalize_kernel<kPasses>);
  m.impl("orthogonalize_batched", &orthogonalize_batched_kernel<kPasses>);
}

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
