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
// The composites reach ATen through torch's stable C ABI (the dispatcher by name, or a C shim)
// and run the same kernels as at::bmm / at::mm_out / Tensor::addmm_ did.
#pragma once

#include "stable_api.h"  // torch's stable C ABI (see there why not ATen / torch/library.h)

#include <cstdint>

namespace landscape_ext {
namespace sketch {

// ---- argument checks (messages name the op, the argument and the sizes) ------------------------
// Also registered as the ops _check_linear_grad_sketch_args / _check_linear_grad_project_args
// (CompositeExplicitAutograd, sketch_common.cpp) for the composite paths of ops.py.
void check_linear_grad_sketch_args(const Tensor& acts, const Tensor& out_grads,
                                   const Tensor& directions);
void check_linear_grad_project_args(const Tensor& acts, const Tensor& out_grads,
                                    const Tensor& weights);

// True when the sketch should form per-sample gradients (see "Strategies" above).
inline bool sketch_forms_gradients(int64_t T, int64_t l) { return T > 1 && T * l > T + l + 8; }

// ---- backend pieces -----------------------------------------------------------------------------
// y_row (R, l) = rows_e^T V_j rows_a for every row r and direction j:
//   A (R, n_in) and E (R, n_out) contiguous; V (l, n_out, n_in) with stride(2) == 1 and
//   stride(1) == n_in (any stride(0)); all one dtype (float32 or float64), R, l, n_in, n_out > 0.
// Returns a new contiguous (R, l) tensor of that dtype.
using DirectSketchFn = Tensor (*)(const Tensor& A, const Tensor& E, const Tensor& V);

// out += m1 @ m2 in place (Tensor.addmm_ with beta = alpha = 1; out, m1, m2 2-D on one device).
// A backend piece only because the stable ABI reaches addmm through the per-device C shims
// (aoti_torch_<device>_addmm_out): the dispatcher route (call_op) cannot pass its Scalar
// arguments, and mm + add would round differently from the GEMM's beta = 1 accumulation.
using AddmmAccFn = void (*)(const Tensor& out, const Tensor& m1, const Tensor& m2);

// Device-agnostic drivers (sketch_common.cpp), called by each backend's registered kernels
// (linear_grad_sketch_<backend> / linear_grad_project_<backend> in cpu/sketch.cpp and
// cuda/sketch.cu, registered with TORCH_BOX, which needs plain non-template functions); they make
// the inputs' device current.
Tensor linear_grad_sketch_impl(DirectSketchFn direct, const Tensor& acts,
                               const Tensor& out_grads, const Tensor& directions);
Tensor linear_grad_project_impl(AddmmAccFn addmm_acc, const Tensor& acts,
                                const Tensor& out_grads, const Tensor& weights);

// CPU backend (cpu/sketch.cpp): the x86-64 level whose variant of the direct sketch kernel runs
// ("x86-64-v4", "x86-64-v3" or "default"): this CPU's level, or a lower one named by the
// environment variable LANDSCAPE_EXT_SKETCH_ISA, read once at the first call.
const char* cpu_sketch_isa_level();

// Elements of temporaries the composite routes may allocate at once (per chunk).
constexpr int64_t kChunkElements = int64_t(1) << 23;  // 8 Mi elements = 32 MiB in float32

}  // namespace sketch
}  // namespace landscape_ext
