// hvp op family: contract shared by the CPU and CUDA backends.
//
//   xent_hvp(logits (N, C), target (N,) int64, directions (k, N, C)) -> (k, N, C)
//       Hessian of the mean softmax cross-entropy over the non-ignored rows, with respect to the
//       logits, applied to k directions. Per row n with target[n] != ignore_index:
//           p = softmax(logits[n]),   out[j, n] = (p * r - p * (p . r)) / M,   r = directions[j, n]
//       and out[j, n] = 0 for ignored rows; M = number of non-ignored rows. Label smoothing
//       changes the gradient target only: the Hessian of -log p_c with respect to the logits is
//       diag(p) - p p^T for every class c, so the smoothed loss has the same Hessian.
//       M == 0 (every row ignored; torch's cross_entropy returns NaN there): zeros. (The Python
//       wrapper ops.xent_hvp warns: TORCH_WARN from a torch.ops call does not reach Python's
//       warnings module in torch 2.13, it would only print to stderr.)
//
//   act_derivs(z, act) -> (a, d1, d2) = (sigma(z), sigma'(z), sigma''(z)), elementwise, for the
//       pointwise activations of the MLP Hessian products (the derivative chains of Pearlmutter's
//       R-forward and R-backward). Codes below (Act).
//
// Element math that both backends share lives here (host + device functions); the backends add
// the memory access, vectorization and reductions.
#pragma once

#include "stable_api.h"  // torch's stable C ABI only (see there for why)

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LANDSCAPE_HD __host__ __device__ __forceinline__
#else
#define LANDSCAPE_HD inline
#endif

// torch::stable::Tensor has hidden visibility (torch's HIDDEN_NAMESPACE); a struct holding one
// must be hidden too, or GCC warns (-Wattributes). These structs never leave the library.
#if defined(__GNUC__) && !defined(_WIN32)
#define LANDSCAPE_HIDDEN __attribute__((visibility("hidden")))
#else
#define LANDSCAPE_HIDDEN
#endif

namespace landscape_ext {
namespace hvp {

// Activation codes of act_derivs.
enum Act : int64_t {
  kIdentity = 0,
  kReLU = 1,
  kGELU = 2,  // exact (erf) GELU, nn.GELU(approximate="none")
  kTanh = 3,
  kSiLU = 4,
};
// Their names, indexed by code: the one table of activations. The error messages print it and
// the Python side reads it (landscape_ext._C.activations() -> landscape_ext.ops.ACTIVATIONS).
constexpr const char* kActNames[] = {"identity", "relu", "gelu", "tanh", "silu"};
constexpr int64_t kNumActs = sizeof(kActNames) / sizeof(kActNames[0]);
static_assert(kNumActs == kSiLU + 1, "kActNames must name every Act code, in code order");

// ---- argument checks (messages name the op, the argument and the sizes) ------------------------
void check_xent_hvp_args(const Tensor& logits, const Tensor& target, const Tensor& directions,
                         double label_smoothing);
void check_act_derivs_args(const Tensor& z, int64_t act);

// ---- call setup shared by the backends ----------------------------------------------------------
// One xent_hvp call as both backends' kernels address it (pointers; strides in elements).
struct XentLayout {
  const void* logits;
  int64_t ls;             // logits row stride; the stride along C is 1
  const int64_t* target;  // contiguous (N,)
  const void* dirs;       // null when k == 0
  int64_t dsk, dsn;       // directions strides of dims 0 and 1; dim 2 has stride 1
  void* out;              // contiguous (k, N, C), dtype of directions
  int64_t N, C, k, ignore_index;
};

// The checked inputs of xent_hvp in the layout the kernels read (logits and directions with unit
// stride along C are read in place, others copied; target contiguous) and its new output.
struct LANDSCAPE_HIDDEN XentCall {
  Tensor logits, target, dirs, out;
  XentLayout layout;
};
XentCall prepare_xent_hvp(const Tensor& logits, const Tensor& target, const Tensor& directions,
                          double label_smoothing, int64_t ignore_index);

// The checked input of act_derivs made contiguous and its three new outputs (shape and dtype of z).
struct LANDSCAPE_HIDDEN ActCall {
  Tensor z, a, d1, d2;
};
ActCall prepare_act_derivs(const Tensor& z, int64_t act);

// Count of rows with target != ignore_index on the CPU; raises for a target outside [0, C)
// that is not ignore_index (naming the first such row and its value). target: CPU int64 (N,).
int64_t xent_count_rows_cpu(const Tensor& target, int64_t C, int64_t ignore_index);

// The error texts shared by both backends (CUDA finds the rows on the device).
[[noreturn]] void xent_bad_target(int64_t row, int64_t value, int64_t C, int64_t ignore_index);
[[noreturn]] void xent_non_finite_logits(int64_t row, int64_t N);

// ---- element math (host + device) --------------------------------------------------------------
LANDSCAPE_HD float le_exp(float x) { return expf(x); }
LANDSCAPE_HD double le_exp(double x) { return exp(x); }
LANDSCAPE_HD float le_erf(float x) { return erff(x); }
LANDSCAPE_HD double le_erf(double x) { return erf(x); }
LANDSCAPE_HD float le_tanh(float x) { return tanhf(x); }
LANDSCAPE_HD double le_tanh(double x) { return tanh(x); }

// sigma(z), sigma'(z), sigma''(z) in the accumulation type T (float or double).
//   ReLU:     a = max(z, 0), d1 = [z > 0] (0 at z = 0, as torch's relu backward), d2 = 0
//   GELU:     a = z Phi(z), d1 = Phi(z) + z phi(z), d2 = phi(z) (2 - z^2),
//             Phi(z) = (1 + erf(z / sqrt 2)) / 2, phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
//   tanh:     a = t = tanh z, d1 = 1 - t^2, d2 = -2 t (1 - t^2)
//   SiLU:     s = 1 / (1 + exp(-z)), a = z s, d1 = s (1 + z (1 - s)), d2 = s (1 - s) (2 + z (1 - 2 s))
template <typename T>
LANDSCAPE_HD void act_eval(int64_t act, T z, T& a, T& d1, T& d2) {
  switch (act) {
    case kReLU:
      a = z > T(0) ? z : T(0);
      d1 = z > T(0) ? T(1) : T(0);
      d2 = T(0);
      break;
    case kGELU: {
      const T Phi = T(0.5) * (T(1) + le_erf(z * T(0.70710678118654752440)));
      const T phi = le_exp(T(-0.5) * z * z) * T(0.39894228040143267794);
      a = z * Phi;
      d1 = Phi + z * phi;
      d2 = phi * (T(2) - z * z);
      break;
    }
    case kTanh: {
      const T t = le_tanh(z);
      const T u = T(1) - t * t;
      a = t;
      d1 = u;
      d2 = T(-2) * t * u;
      break;
    }
    case kSiLU: {
      const T s = T(1) / (T(1) + le_exp(-z));
      const T u = s * (T(1) - s);
      a = z * s;
      d1 = s + z * u;
      d2 = u * (T(2) + z * (T(1) - T(2) * s));
      break;
    }
    default:  // identity
      a = z;
      d1 = T(1);
      d2 = T(0);
      break;
  }
}

}  // namespace hvp
}  // namespace landscape_ext
