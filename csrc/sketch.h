// sketch op family: contract shared by the CPU and CUDA backends.
//
// Per-sample gradients of a Linear layer (or a Conv layer after im2col) factor as
//   g_n = sum_t e_{n,t} a_{n,t}^T          (n_out x n_in; T = 1 for a plain Linear)
// with a the layer input (activations) and e the gradient of the sample's loss with respect to
// the layer output. The range finder of the randomized gradient-covariance SVD needs the two
// products of the per-sample gradient matrix G (N x n_out*n_in) with a block of l directions,
// without ever forming G:
//
//   linear_grad_sketch(acts (N,[T,] n_in), out_grads (N,[T,] n_out), directions (l, n_out, n_in))
//       -> y (N, l),        y[n, j]   = <g_n, V_j> = sum_t e_{n,t}^T V_j a_{n,t}      (G V^T)
//   linear_grad_project(acts, out_grads, weights (N, l))
//       -> P (l, n_out, n_in), P[j] = sum_n w[n, j] g_n = E^T diag(w_j) A           (G^T W)
//
// Strategies (chosen from the sizes, the same on every backend):
//   direct   T * l <= T + l + 8 (always when T == 1): rows r = (n, t) are independent; the
//            backend's fused kernel computes y_row[r, j] = e_r^T V_j a_r as a tiled GEMM
//            (A V_j^T) whose epilogue takes the dot with e_r, so the (N T, l, n_out) product of
//            the plain-PyTorch composition never exists. Rows of one sample are summed after.
//   formed   T * l > T + l + 8: forming g_n (chunks of samples, one bmm) costs T n_out n_in per
//            sample and the sketch another l n_out n_in, against T l n_out n_in for the direct
//            route. Composite of ATen ops, shared by the backends.
// linear_grad_project is a GEMM in either layout; it is a composite of ATen ops on every
// backend (no custom kernel beats the vendor GEMM), registered per backend for one op name.
#pragma once

#include <ATen/core/Tensor.h>  // not ATen.h: these headers reach nvcc, where ATen.h costs ~40% of a compile
#include <torch/library.h>

namespace landscape_ext {
namespace sketch {

// ---- argument checks (messages name the op, the argument and the sizes) ------------------------
void check_linear_grad_sketch_args(const at::Tensor& acts, const at::Tensor& out_grads,
                                   const at::Tensor& directions);
void check_linear_grad_project_args(const at::Tensor& acts, const at::Tensor& out_grads,
                                    const at::Tensor& weights);

// True when the sketch should form per-sample gradients (see "Strategies" above).
inline bool sketch_forms_gradients(int64_t T, int64_t l) { return T > 1 && T * l > T + l + 8; }

// ---- backend kernel -----------------------------------------------------------------------------
// y_row (R, l) = rows_e^T V_j rows_a for every row r and direction j:
//   A (R, n_in) and E (R, n_out) contiguous; V (l, n_out, n_in) with stride(2) == 1 and
//   stride(1) == n_in (any stride(0)); all one dtype (float32 or float64), R, l, n_in, n_out > 0.
// Returns a new contiguous (R, l) tensor of that dtype.
using DirectSketchFn = at::Tensor (*)(const at::Tensor& A, const at::Tensor& E,
                                      const at::Tensor& V);

// Device-agnostic drivers (sketch_common.cpp), called by each backend's registered kernel; they
// make the inputs' device current.
at::Tensor linear_grad_sketch_impl(DirectSketchFn direct, const at::Tensor& acts,
                                   const at::Tensor& out_grads, const at::Tensor& directions);
at::Tensor linear_grad_project_impl(const at::Tensor& acts, const at::Tensor& out_grads,
                                    const at::Tensor& weights);

// The registered kernels of a backend whose direct sketch kernel is kDirect: its
// TORCH_LIBRARY_IMPL block calls register_kernels<&its_direct_sketch>(m).
template <DirectSketchFn kDirect>
at::Tensor linear_grad_sketch_kernel(const at::Tensor& acts, const at::Tensor& out_grads,
                                     const at::Tensor& directions) {
  return linear_grad_sketch_impl(kDirect, acts, out_grads, directions);
}

template <DirectSketchFn kDirect>
void register_kernels(torch::Library& m) {
  m.impl("linear_grad_sketch", &linear_grad_sketch_kernel<kDirect>);
  m.impl("linear_grad_project", &linear_grad_project_impl);
}

// CPU backend (cpu/sketch.cpp): the x86-64 level whose variant of the direct sketch kernel runs
// ("x86-64-v4", "x86-64-v3" or "default"): this CPU's level, or a lower one named by the
// environment variable LANDSCAPE_EXT_SKETCH_ISA, read once at the first call.
const char* cpu_sketch_isa_level();

// Elements of temporaries the composite routes may allocate at once (per chunk).
constexpr int64_t kChunkElements = int64_t(1) << 23;  // 8 Mi elements = 32 MiB in float32

}  // namespace sketch
}  // namespace landscape_ext
