// Every schema of the landscape_ext namespace, in one place, compiled in every build.
// Backend kernels register themselves in cpu/<family>.cpp and cuda/<family>.cu;
// fake (meta) kernels and Python wrappers live in landscape_ext/ops.py. Built on torch's stable
// ABI (csrc/stable_api.h): STABLE_TORCH_LIBRARY, not TORCH_LIBRARY.
#include "stable_api.h"

STABLE_TORCH_LIBRARY(landscape_ext, m) {
  // ---- krylov family (csrc/krylov.h; the drivers are landscape_ext/_krylov_driver.py) --------
  // Block CGS2 + CholeskyQR2: basis (m, d) with orthonormal rows [:n_basis], block (b, d) ->
  // q (b, d) orthonormal rows orthogonal to basis[:n_basis], coeffs (n_basis, b), r (b, b) upper
  // triangular with block = coeffs^T basis[:n_basis] + r^T q. A direction lost to rank deficiency
  // gets r[k, k] = 0 and a fresh q[k]. Basis f64/f32/f16/bf16; block f32/f64 (outputs: block's
  // dtype). rank_tol < 0 picks the default for the dtypes. rounds=1: one round of CGS and a
  // second only for blocks where a row kept < 1/sqrt(2) of its norm (for blocks already nearly
  // orthogonal to the basis). local_rows > 0: the last local_rows rows of basis[:n_basis] are
  // projected out first (a Lanczos block's recurrence terms). Mutates nothing; not
  // differentiable. Kernel: the Python driver over the three passes below (per backend).
  m.def("block_orthonormalize(Tensor basis, Tensor block, int n_basis, float rank_tol=-1.0, "
        "int rounds=2, int local_rows=0) -> (Tensor q, Tensor coeffs, Tensor r)");
  // r independent CGS2 projections (SLQ with r probes): bases (r, m, d), vectors (r, d) ->
  // q (r, d) unit rows, coeffs (r, n_basis), norms (r,) with
  // vectors[i] = coeffs[i] @ bases[i, :n_basis] + norms[i] * q[i]. norms[i] = 0 marks a vector in
  // the span of its basis; q[i] is then a fresh unit vector orthogonal to it. Mutates nothing;
  // not differentiable. Kernel: the Python driver over the three passes below.
  m.def("orthogonalize_batched(Tensor bases, Tensor vectors, int n_basis, float rank_tol=-1.0) "
        "-> (Tensor q, Tensor coeffs, Tensor norms)");
  // The memory-bound passes over a basis that both drivers are made of (csrc/krylov.h):
  // basis (R, m, d) with unit stride along d, any f64/f32/f16/bf16; block (R, b, d) f32/f64 (the
  // accumulation dtype); coeffs (R, n, b) in that dtype; only basis rows [:n] are read, n >= 1.
  //   _krylov_coeffs:          C = basis[:, :n] @ block^T                        -> C (R, n, b)
  //   _krylov_project_coeffs:  out = block - C^T basis[:, :n]; C2 = basis[:, :n] @ out^T
  //   _krylov_project_gram:    out = block - C^T basis[:, :n]; G = out @ out^T   -> G (R, b, b)
  // Sums over d in a fixed chunk order (bitwise independent of the thread count). Internal: no
  // argument checks beyond the kernels' own (the drivers check). Mutate nothing; not
  // differentiable.
  m.def("_krylov_coeffs(Tensor basis, Tensor block, int n) -> Tensor");
  m.def("_krylov_project_coeffs(Tensor basis, Tensor block, Tensor coeffs, int n) "
        "-> (Tensor out, Tensor coeffs_next)");
  m.def("_krylov_project_gram(Tensor basis, Tensor block, Tensor coeffs, int n) "
        "-> (Tensor out, Tensor gram)");
  // The drivers' common path in one call (CPU only): basis (1, m, d), block (1, b, d) in the
  // accumulation dtype, norms0 (b,) float64 CPU, tol the rank tolerance -> (q (b, d),
  // coeffs (n, b), r (b, b), ok). ok = false: it declined (non-finite coefficients, a second
  // adaptive round against a narrower basis, an ill-conditioned or rank-deficient remainder);
  // the Python driver then runs. Bitwise the driver's outputs when ok. Mutates nothing.
  m.def("_krylov_fast_orthonormalize(Tensor basis, Tensor block, Tensor norms0, int n, "
        "float tol, int rounds, int local_rows) -> (Tensor q, Tensor coeffs, Tensor r, bool ok)");

  // ---- hvp family (csrc/hvp.h) --------------------------------------------------------------
  // Softmax cross-entropy Hessian w.r.t. the logits applied to k directions: logits (N, C),
  // target (N,) int64, directions (k, N, C) -> (k, N, C) contiguous, dtype of directions;
  // out[j, n] = (p * r - p * (p . r)) / M, p = softmax(logits[n]), r = directions[j, n], for the M
  // rows with target != ignore_index, 0 on ignored rows (M = 0: zeros). Label smoothing
  // does not change this Hessian (accepted for signature parity with cross_entropy). Errors on a
  // target outside [0, C) or non-finite logits. Mutates nothing; not differentiable.
  m.def("xent_hvp(Tensor logits, Tensor target, Tensor directions, float label_smoothing=0.0, "
        "int ignore_index=-100) -> Tensor");
  // Pointwise activation and its first two derivatives in one pass: z (any shape, f64/f32/f16/
  // bf16) -> (sigma(z), sigma'(z), sigma''(z)), contiguous, dtype of z; act: an activation code
  // (hvp::kActNames in csrc/hvp.h). Mutates nothing; not differentiable.
  m.def("act_derivs(Tensor z, int act) -> (Tensor a, Tensor d1, Tensor d2)");
  // ---- end hvp family ------------------------------------------------------------------------

  // ---- sketch family (csrc/sketch.h) -------------------------------------------------------
  // Sketch of per-sample Linear-layer gradients g_n = sum_t out_grads[n,t] acts[n,t]^T against
  // l directions without forming them: acts (N, n_in) or (N, T, n_in), out_grads (N, n_out) or
  // (N, T, n_out), directions (l, n_out, n_in) -> y (N, l), y[n, j] = <g_n, directions[j]>.
  // float32/float64 (one dtype). Mutates nothing; differentiable (autograd in ops.py).
  m.def("linear_grad_sketch(Tensor acts, Tensor out_grads, Tensor directions) -> Tensor");
  // Transpose of linear_grad_sketch: weights (N, l) -> out (l, n_out, n_in),
  // out[j] = sum_n weights[n, j] g_n. A composite of ATen GEMMs on every backend. Mutates
  // nothing; differentiable (autograd in ops.py).
  m.def("linear_grad_project(Tensor acts, Tensor out_grads, Tensor weights) -> Tensor");
  // The argument checks of the two ops alone (raise their kernels' errors; return nothing), so
  // that the composite (torch) paths in ops.py reject bad input with the same messages on every
  // device. Registered for CompositeExplicitAutograd (csrc/sketch_common.cpp).
  m.def("_check_linear_grad_sketch_args(Tensor acts, Tensor out_grads, Tensor directions) -> ()");
  m.def("_check_linear_grad_project_args(Tensor acts, Tensor out_grads, Tensor weights) -> ()");
  // ---- end sketch family ---------------------------------------------------------------------
}
