// Every schema of the landscape_ext namespace, in one place, compiled in every build.
// Backend kernels register themselves in cpu/<family>.cpp and cuda/<family>.cu;
// fake (meta) kernels and Python wrappers live in landscape_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(landscape_ext, m) {
  m.set_python_module("landscape_ext.ops");

  // ---- krylov family (csrc/krylov.h) -------------------------------------------------------
  // Block CGS2 + CholeskyQR2: basis (m, d) with orthonormal rows [:n_basis], block (b, d) ->
  // q (b, d) orthonormal rows orthogonal to basis[:n_basis], coeffs (n_basis, b), r (b, b) upper
  // triangular with block = coeffs^T basis[:n_basis] + r^T q. A direction lost to rank deficiency
  // gets r[k, k] = 0 and a fresh q[k]. Basis f64/f32/f16/bf16; block f32/f64 (outputs: block's
  // dtype). rank_tol < 0 picks the default for the dtypes. Mutates nothing; not differentiable.
  m.def("block_orthonormalize(Tensor basis, Tensor block, int n_basis, float rank_tol=-1.0) "
        "-> (Tensor q, Tensor coeffs, Tensor r)");
  // r independent CGS2 projections (SLQ with r probes): bases (r, m, d), vectors (r, d) ->
  // q (r, d) unit rows, coeffs (r, n_basis), norms (r,) with
  // vectors[i] = coeffs[i] @ bases[i, :n_basis] + norms[i] * q[i]. norms[i] = 0 marks a vector in
  // the span of its basis; q[i] is then a fresh unit vector orthogonal to it. Mutates nothing;
  // not differentiable.
  m.def("orthogonalize_batched(Tensor bases, Tensor vectors, int n_basis, float rank_tol=-1.0) "
        "-> (Tensor q, Tensor coeffs, Tensor norms)");
}
