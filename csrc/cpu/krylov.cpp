// krylov op family, CPU backend: the three fused passes over the basis (see krylov.h), registered
// as _krylov_coeffs / _krylov_project_coeffs / _krylov_project_gram for the CPU dispatch key (the
// public ops block_orthonormalize / orthogonalize_batched are drivers over them, in Python).
//
// Work split: d is cut into chunks whose number depends only on d (krylov::num_chunks); each
// (run, chunk) is one task of torch::stable::parallel_for with its own partial sums, added in chunk order
// afterwards, so results are bitwise independent of the thread count. Inside a chunk, columns
// go in tiles sized so that the basis tile stays in L2 between the two sweeps of a fused pass:
// the basis is read from memory once per pass. The inner loops are written with GCC/Clang
// vector extensions (64-byte vectors) and compiled once per x86-64 ISA level (multiversioning:
// LANDSCAPE_MULTIVERSION in cpu/simd.h), with the per-block-row accumulators in registers (block
// rows go in groups of <= 8).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"
#include "krylov.h"
#include "stable_api.h"

namespace landscape_ext {
namespace krylov {
namespace {

// ---- SIMD building blocks (cpu/simd.h: Vec, load_vec; lowered per multiversioned clone) ----
using simd::load_vec;
using simd::Vec;

// L accumulation-type lanes in and out (output and block rows).
template <typename acc_t>
LANDSCAPE_ALWAYS_INLINE typename Vec<acc_t>::type load_acc(const acc_t* p) {
  typename Vec<acc_t>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
LANDSCAPE_ALWAYS_INLINE void store_acc(acc_t* p, typename Vec<acc_t>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// ---- tile kernels: B (<= 8) block rows at a time, B known at compile time so the per-row
// ---- accumulators live in registers.

// out[k][j] = W[k][j] - sum_i C[i][k] Q[i][j]  for k < B, j < len.
// out/W rows have stride ld; C[i][k] is at C[i * cs + k]; Q rows have stride sQ (elements).
// Two basis rows per sweep: each out strip is loaded and stored once per two rows.
template <int B, typename basis_t, typename acc_t>
LANDSCAPE_ALWAYS_INLINE void subtract_projection(acc_t* out, const acc_t* W, int64_t ld,
                                                 const acc_t* C, int64_t cs, const basis_t* Q,
                                                 int64_t sQ, int64_t n, int64_t len) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::L;
  const int64_t main = len - len % L;
  for (int k = 0; k < B; ++k) std::memcpy(out + k * ld, W + k * ld, len * sizeof(acc_t));
  for (int64_t i = 0; i < n; i += 2) {
    // an odd last row pairs with itself at coefficient 0
    const bool pair = i + 1 < n;
    const basis_t* q0 = Q + i * sQ;
    const basis_t* q1 = pair ? q0 + sQ : q0;
    acc_t c0[B], c1[B];
    for (int k = 0; k < B; ++k) {
      c0[k] = C[i * cs + k];
      c1[k] = pair ? C[(i + 1) * cs + k] : acc_t(0);
    }
    for (int64_t j = 0; j < main; j += L) {
      const V a0 = load_vec<acc_t>(q0 + j), a1 = load_vec<acc_t>(q1 + j);
      for (int k = 0; k < B; ++k) {
        V o = load_acc(out + k * ld + j);
        o -= c0[k] * a0 + c1[k] * a1;
        store_acc(out + k * ld + j, o);
      }
    }
    for (int64_t j = main; j < len; ++j) {
      const acc_t s0 = static_cast<acc_t>(q0[j]), s1 = static_cast<acc_t>(q1[j]);
      for (int k = 0; k < B; ++k) out[k * ld + j] -= c0[k] * s0 + c1[k] * s1;
    }
  }
}

// lanes[i * ls + k] += Q[i][:len] * X[k][:len] (lane-wise partial sums) for i < n, k < B.
// Each basis strip is loaded once for the B block rows. Lane sums are reduced once per chunk.
template <int B, typename basis_t, typename acc_t>
LANDSCAPE_ALWAYS_INLINE void accumulate_dots(typename Vec<acc_t>::type* lanes, int64_t ls,
                                             const acc_t* X, int64_t ld, const basis_t* Q,
                                             int64_t sQ, int64_t n, int64_t len) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::L;
  const int64_t main = len - len % L;
  for (int64_t i = 0; i < n; ++i) {
    const basis_t* q0 = Q + i * sQ;
    V s0[B];
    for (int k = 0; k < B; ++k) s0[k] = V{};
    for (int64_t j = 0; j < main; j += L) {
      const V a0 = load_vec<acc_t>(q0 + j);
      for (int k = 0; k < B; ++k) s0[k] += a0 * load_acc(X + k * ld + j);
    }
    for (int64_t j = main; j < len; ++j) {
      const acc_t t0 = static_cast<acc_t>(q0[j]);
      for (int k = 0; k < B; ++k) s0[k][0] += t0 * X[k * ld + j];
    }
    for (int k = 0; k < B; ++k) lanes[i * ls + k] += s0[k];
  }
}

enum class Pass : int { kCoeffs = 0, kProjectCoeffs = 1, kProjectGram = 2 };

// Everything one task (one run, one chunk of columns) does, for one pass.
struct TaskArgs {
  Pass kind;
  const void* Q;       // basis rows of this run, shifted to the chunk's first column
  int64_t sQ;          // basis row stride (elements)
  int64_t n, b, d;     // basis rows used, block rows, row length of W / out
  const void* W;       // block rows of this run, shifted to the chunk
  void* out;           // output rows of this run, shifted to the chunk (passes 2 and 3)
  const void* C;       // (n, b) coefficients of this run (passes 2 and 3)
  int64_t len;         // columns in this chunk
  int64_t tile;        // columns per tile
  void* lanes;         // (rows, b) vectors of lane partial sums, zeroed by the caller
};

// The work of one tile for block rows [k0, k0 + B): see Pass. Stage 0 is the first sweep
// (dots for pass 1, the subtraction for passes 2/3); stage 1 the second sweep of passes 2/3.
template <int B, typename basis_t, typename acc_t>
LANDSCAPE_ALWAYS_INLINE void tile_rows(const TaskArgs& a, int stage, int64_t k0, int64_t j0,
                                       int64_t len) {
  using V = typename Vec<acc_t>::type;
  const basis_t* Q = static_cast<const basis_t*>(a.Q) + j0;
  const acc_t* W = static_cast<const acc_t*>(a.W);
  acc_t* out = static_cast<acc_t*>(a.out);
  V* lanes = static_cast<V*>(a.lanes);
  const int64_t b = a.b, d = a.d;
  if (a.kind == Pass::kCoeffs) {
    accumulate_dots<B>(lanes + k0, b, W + k0 * d + j0, d, Q, a.sQ, a.n, len);
  } else if (stage == 0) {
    subtract_projection<B>(out + k0 * d + j0, W + k0 * d + j0, d,
                           static_cast<const acc_t*>(a.C) + k0, b, Q, a.sQ, a.n, len);
  } else if (a.kind == Pass::kProjectCoeffs) {
    // the basis tile was just streamed from memory: this second sweep hits L2
    accumulate_dots<B>(lanes + k0, b, out + k0 * d + j0, d, Q, a.sQ, a.n, len);
  } else {
    // Gram matrix of the projected tile: "basis" rows are the output rows themselves
    accumulate_dots<B>(lanes + k0, b, out + k0 * d + j0, d, out + j0, d, b, len);
  }
}

// Block rows go in groups of 8, then 4, 2, 1, each group with a compile-time row count so its
// accumulators stay in registers (four instantiations keep the compile time reasonable).
// Explicit calls, no lambdas: a lambda body would be compiled outside the multiversioned
// clone, for the baseline instruction set.
template <typename basis_t, typename acc_t>
LANDSCAPE_ALWAYS_INLINE void tile_all_rows(const TaskArgs& a, int stage, int64_t j0,
                                           int64_t len) {
  int64_t k0 = 0;
  for (; k0 + 8 <= a.b; k0 += 8) tile_rows<8, basis_t, acc_t>(a, stage, k0, j0, len);
  if (k0 + 4 <= a.b) {
    tile_rows<4, basis_t, acc_t>(a, stage, k0, j0, len);
    k0 += 4;
  }
  if (k0 + 2 <= a.b) {
    tile_rows<2, basis_t, acc_t>(a, stage, k0, j0, len);
    k0 += 2;
  }
  if (k0 < a.b) tile_rows<1, basis_t, acc_t>(a, stage, k0, j0, len);
}

template <typename basis_t, typename acc_t>
LANDSCAPE_ALWAYS_INLINE void run_task_impl(const TaskArgs& a) {
  for (int64_t j0 = 0; j0 < a.len; j0 += a.tile) {
    // (no std::min: a non-inlined baseline-ISA helper call inside the clone)
    const int64_t len = a.len - j0 < a.tile ? a.len - j0 : a.tile;
    tile_all_rows<basis_t, acc_t>(a, 0, j0, len);
    if (a.kind != Pass::kCoeffs) tile_all_rows<basis_t, acc_t>(a, 1, j0, len);
  }
}

#define LANDSCAPE_DEFINE_TASK(NAME, BASIS, ACC) \
  LANDSCAPE_MULTIVERSION void NAME(const TaskArgs& a) { run_task_impl<BASIS, ACC>(a); }
LANDSCAPE_DEFINE_TASK(task_d_d, double, double)
LANDSCAPE_DEFINE_TASK(task_f_d, float, double)
LANDSCAPE_DEFINE_TASK(task_h_d, c10::Half, double)
LANDSCAPE_DEFINE_TASK(task_bf_d, c10::BFloat16, double)
LANDSCAPE_DEFINE_TASK(task_f_f, float, float)
LANDSCAPE_DEFINE_TASK(task_h_f, c10::Half, float)
LANDSCAPE_DEFINE_TASK(task_bf_f, c10::BFloat16, float)
#undef LANDSCAPE_DEFINE_TASK

using TaskFn = void (*)(const TaskArgs&);

TaskFn pick_task(ScalarType basis, ScalarType acc) {
  LE_CHECK(acc == kDouble || acc == kFloat, "krylov: block must be float32 or float64, got ", acc);
  const bool dbl = acc == kDouble;
  switch (basis) {
    case kDouble:
      LE_CHECK(dbl, "krylov: a float64 basis needs a float64 block");
      return &task_d_d;
    case kFloat: return dbl ? &task_f_d : &task_f_f;
    case kHalf: return dbl ? &task_h_d : &task_h_f;
    case kBFloat16: return dbl ? &task_bf_d : &task_bf_f;
    default: LE_FAIL("krylov: unsupported basis dtype ", basis);
  }
}

// Columns per tile: the basis tile (n x tile) stays within ~384 KiB of L2 so that a second
// sweep (fused passes) or a second group of block rows reads it from cache, not memory.
inline int64_t tile_len(int64_t n, int64_t basis_elem) {
  int64_t t = (384 * 1024) / std::max<int64_t>(1, n * basis_elem);
  t = std::max<int64_t>(64, std::min<int64_t>(t, 4096));
  return t - t % 64;
}

// dst[e] = src[e * L] + ... + src[e * L + L - 1] for e < count, summed in lane order.
template <typename acc_t>
void sum_lanes(const acc_t* src, int64_t count, int64_t L, acc_t* dst) {
  for (int64_t e = 0; e < count; ++e) {
    acc_t s = 0;
    for (int64_t l = 0; l < L; ++l) s += src[e * L + l];
    dst[e] = s;
  }
}

// sums[r] = sum over chunks c in order of partial[r, c] (deterministic: fixed chunk order).
template <typename acc_t>
void reduce_partials(const acc_t* P, acc_t* S, int64_t R, int64_t chunks, int64_t e_per) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t e = 0; e < e_per; ++e) S[r * e_per + e] += P[(r * chunks + c) * e_per + e];
}

// One pass over basis[:, :n] (see krylov.h). basis (R, m, d) rows stride-1; W (R, b, d) and
// C (R, n, b) contiguous in the accumulation dtype (unused by kCoeffs). Returns the sums and, for
// the project passes, writes `out` (R, b, d). Every allocation through the stable ABI is a boxed
// dispatcher call (a few microseconds): the per-task partial sums are host scratch, not tensors.
Tensor run_pass(Pass kind, const Tensor& basis, const Tensor& W, const Tensor* C, int64_t n,
                const Tensor* out) {
  const int64_t R = W.size(0), b = W.size(1), d = W.size(2);
  const ScalarType acc = W.scalar_type();
  const int64_t acc_elem = acc == kDouble ? 8 : 4;
  const int64_t basis_elem = static_cast<int64_t>(basis.element_size());
  const int64_t L = 64 / acc_elem;
  const int64_t part_rows = kind == Pass::kProjectGram ? b : n;

  // Chunks are a multiple of 64 columns (whole vectors) except the last one.
  const int64_t nchunks = num_chunks(d);
  int64_t chunk = (d + nchunks - 1) / nchunks;
  chunk = (chunk + 63) / 64 * 64;
  const int64_t used_chunks = (d + chunk - 1) / chunk;
  const int64_t tile = tile_len(n, basis_elem);
  const TaskFn task = pick_task(basis.scalar_type(), acc);

  const char* Qp = static_cast<const char*>(basis.data_ptr());
  const char* Wp = static_cast<const char*>(W.data_ptr());
  char* Op = kind == Pass::kCoeffs ? nullptr : static_cast<char*>(out->data_ptr());
  const void* Cp = kind == Pass::kCoeffs ? nullptr : C->data_ptr();
  const int64_t sR = basis.stride(0), sM = basis.stride(1);
  // per-task reduced partial sums, added in task order afterwards (deterministic)
  std::vector<char> partial(static_cast<size_t>(R * used_chunks * part_rows * b * acc_elem));
  char* Pp = partial.data();

  torch::stable::parallel_for(0, R * used_chunks, 1, [&](int64_t begin, int64_t end) {
    // lane partial sums: (part_rows, b) vectors of 64 bytes
    std::vector<char> lanes_buf(static_cast<size_t>(part_rows * b * 64 + 64));
    void* lanes = reinterpret_cast<void*>(
        (reinterpret_cast<uintptr_t>(lanes_buf.data()) + 63) & ~uintptr_t(63));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / used_chunks, c = t % used_chunks;
      const int64_t j0 = c * chunk, len = std::min(chunk, d - j0);
      std::memset(lanes, 0, static_cast<size_t>(part_rows * b * 64));
      TaskArgs a;
      a.kind = kind;
      a.Q = Qp + (r * sR + j0) * basis_elem;
      a.sQ = sM;
      a.n = n;
      a.b = b;
      a.d = d;
      a.W = Wp + (r * b * d + j0) * acc_elem;
      a.out = Op == nullptr ? nullptr : Op + (r * b * d + j0) * acc_elem;
      a.C = Cp == nullptr ? nullptr
                          : static_cast<const char*>(Cp) + r * n * b * acc_elem;
      a.len = len;
      a.tile = tile;
      a.lanes = lanes;
      task(a);
      // horizontal sums of the lanes, into this task's partial
      char* dst = Pp + t * part_rows * b * acc_elem;
      if (acc == kDouble) {
        sum_lanes(static_cast<const double*>(lanes), part_rows * b, L,
                  reinterpret_cast<double*>(dst));
      } else {
        sum_lanes(static_cast<const float*>(lanes), part_rows * b, L,
                  reinterpret_cast<float*>(dst));
      }
    }
  });
  // deterministic reduction in chunk order
  const Tensor sums = empty_as(W, {R, part_rows, b});
  std::memset(sums.data_ptr(), 0, static_cast<size_t>(R * part_rows * b * acc_elem));
  if (acc == kDouble) {
    reduce_partials(reinterpret_cast<const double*>(Pp), static_cast<double*>(sums.data_ptr()), R,
                    used_chunks, part_rows * b);
  } else {
    reduce_partials(reinterpret_cast<const float*>(Pp), static_cast<float*>(sums.data_ptr()), R,
                    used_chunks, part_rows * b);
  }
  return sums;
}

// The drivers pass what krylov.h promises; these checks only keep a direct call of an internal
// op from reading out of bounds.
void check_pass_args(const char* op, const Tensor& basis, const Tensor& W, const Tensor* C,
                     int64_t n) {
  LE_CHECK(basis.dim() == 3 && W.dim() == 3, op, ": basis and block must be 3-D (R, m, d) and "
           "(R, b, d), got shapes ", shape_str(basis), " and ", shape_str(W));
  LE_CHECK(basis.size(0) == W.size(0) && basis.size(2) == W.size(2), op, ": basis ",
           shape_str(basis), " and block ", shape_str(W), " differ in R or d");
  LE_CHECK(n >= 1 && n <= basis.size(1), op, ": n = ", n, " must be in [1, m = ", basis.size(1),
           "]");
  LE_CHECK(W.is_contiguous(), op, ": block must be contiguous");
  LE_CHECK(basis.stride(2) == 1, op, ": basis must have unit stride along d");
  LE_CHECK(basis.is_cpu() && W.is_cpu(), op, ": CPU kernel called with ", device_str(basis),
           " / ", device_str(W), " tensors");
  if (C != nullptr) {
    LE_CHECK(C->dim() == 3 && C->size(0) == W.size(0) && C->size(1) == n &&
                 C->size(2) == W.size(1) && C->scalar_type() == W.scalar_type(),
             op, ": coeffs must be (R, n, b) = (", W.size(0), ", ", n, ", ", W.size(1),
             ") in the block's dtype, got ", shape_str(*C), " ", C->scalar_type());
  }
}

Tensor coeffs_cpu(const Tensor& basis, const Tensor& W, int64_t n) {
  check_pass_args("_krylov_coeffs", basis, W, nullptr, n);
  return run_pass(Pass::kCoeffs, basis, W, nullptr, n, nullptr);
}
// (out, sums) of a projecting pass: out = W - C^T basis[:, :n] and its sums (see krylov.h).
std::tuple<Tensor, Tensor> project_pass(Pass kind, const char* op, const Tensor& basis,
                                        const Tensor& W, const Tensor& C, int64_t n) {
  check_pass_args(op, basis, W, &C, n);
  const Tensor Cc = C.is_contiguous() ? C : contiguous(C);
  const Tensor out = empty_as(W, {W.size(0), W.size(1), W.size(2)});
  return {out, run_pass(kind, basis, W, &Cc, n, &out)};
}
std::tuple<Tensor, Tensor> project_coeffs_cpu(const Tensor& basis, const Tensor& W,
                                              const Tensor& C, int64_t n) {
  return project_pass(Pass::kProjectCoeffs, "_krylov_project_coeffs", basis, W, C, n);
}
std::tuple<Tensor, Tensor> project_gram_cpu(const Tensor& basis, const Tensor& W,
                                            const Tensor& C, int64_t n) {
  return project_pass(Pass::kProjectGram, "_krylov_project_gram", basis, W, C, n);
}

// ---- the common case of block_orthonormalize in one call (CPU) -----------------------------------
// The Python driver (landscape_ext/_krylov_driver.py) made about 40 small torch calls per
// orthonormalization, 0.2-0.3 ms of fixed cost that showed at d ~ 1e4 (a small model's Lanczos
// step). This op runs the driver's common path here: the rounds of Gram-Schmidt and CholeskyQR2,
// the same operations in the same order (the b x b LAPACK calls through the dispatcher, the
// elementwise b x b algebra in plain loops, which round identically), so its outputs are the
// driver's bit for bit. Whatever it does not cover it declines (ok = false) before any output is
// final, and the driver then runs as before: a non-finite coefficient (the driver's error names
// it), a second adaptive round needed against a basis narrower than the block, an ill-conditioned
// or rank-deficient remainder (the row-by-row fallback).

// A (b, b) float64 CPU tensor with entries 0.5 * (G[i, j] + G[j, i]): 0.5 * (G + G^T).
Tensor symmetrized_cpu64(const Tensor& G_any) {
  const Tensor G = to_dtype(to_cpu(G_any), kDouble);
  const Tensor Gc = G.is_contiguous() ? G : contiguous(G);
  const int64_t b = Gc.size(0);
  Tensor out = empty({b, b}, kDouble, Device(DeviceType::CPU));
  const double* g = static_cast<const double*>(Gc.data_ptr());
  double* o = static_cast<double*>(out.data_ptr());
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < b; ++j) o[i * b + j] = 0.5 * (g[i * b + j] + g[j * b + i]);
  return out;
}

// (upper Cholesky factor, info == 0) of a float64 CPU matrix: aten::linalg_cholesky_ex.
std::pair<Tensor, bool> cholesky_upper(const Tensor& G) {
  std::array<StableIValue, 3> stack{to_ivalue(G), to_ivalue(true), to_ivalue(false)};
  call_op("aten::linalg_cholesky_ex", "", stack);
  Tensor R = from_ivalue<Tensor>(stack[0]);
  const Tensor info = from_ivalue<Tensor>(stack[1]);
  const bool ok = *static_cast<const int32_t*>(info.data_ptr()) == 0;
  return {R, ok};
}

Tensor inverse(const Tensor& A) {
  std::array<StableIValue, 1> stack{to_ivalue(A)};
  call_op("aten::linalg_inv", "", stack);
  return from_ivalue<Tensor>(stack[0]);
}

// dst += src elementwise (contiguous CPU tensors of one float dtype, same number of elements).
void add_into(const Tensor& dst, const Tensor& src) {
  const int64_t n = src.numel();
  if (dst.scalar_type() == kDouble) {
    double* d = static_cast<double*>(dst.data_ptr());
    const double* s = static_cast<const double*>(src.data_ptr());
    for (int64_t i = 0; i < n; ++i) d[i] += s[i];
  } else {
    float* d = static_cast<float*>(dst.data_ptr());
    const float* s = static_cast<const float*>(src.data_ptr());
    for (int64_t i = 0; i < n; ++i) d[i] += s[i];
  }
}

bool all_finite(const Tensor& t) {
  const int64_t n = t.numel();
  if (t.scalar_type() == kDouble) {
    const double* p = static_cast<const double*>(t.data_ptr());
    for (int64_t i = 0; i < n; ++i) if (!std::isfinite(p[i])) return false;
  } else {
    const float* p = static_cast<const float*>(t.data_ptr());
    for (int64_t i = 0; i < n; ++i) if (!std::isfinite(p[i])) return false;
  }
  return true;
}

// The diagonal of a (b, b) tensor as float64 values.
std::vector<double> diagonal64(const Tensor& G_any) {
  const Tensor G = contiguous(to_dtype(to_cpu(G_any), kDouble));
  const int64_t b = G.size(0);
  const double* g = static_cast<const double*>(G.data_ptr());
  std::vector<double> d(static_cast<size_t>(b));
  for (int64_t k = 0; k < b; ++k) d[static_cast<size_t>(k)] = g[k * b + k];
  return d;
}

double unit_roundoff_of(ScalarType t) {
  switch (t) {
    case kDouble: return std::numeric_limits<double>::epsilon();
    case kFloat: return std::numeric_limits<float>::epsilon();
    case kHalf: return 9.765625e-4;
    case kBFloat16: return 7.8125e-3;
    default: return std::numeric_limits<float>::epsilon();
  }
}

// (q, G) = CholeskyQR's transform: out = 0 - C^T rows with C = -Rinv (the backend's own pass).
std::pair<Tensor, Tensor> transform_rows(const Tensor& rows, const Tensor& zeros,
                                         const Tensor& Rinv, ScalarType acc) {
  const int64_t b = Rinv.size(0);
  Tensor neg = empty({b, b}, kDouble, Device(DeviceType::CPU));
  const Tensor Ri = contiguous(Rinv);
  const double* src = static_cast<const double*>(Ri.data_ptr());
  double* dst = static_cast<double*>(neg.data_ptr());
  for (int64_t i = 0; i < b * b; ++i) dst[i] = -src[i];
  const Tensor C = contiguous(torch::stable::unsqueeze(to_dtype(neg, acc), 0));  // (1, b, b)
  const Tensor out = empty_as(rows, {1, b, rows.size(2)});
  return {out, run_pass(Pass::kProjectGram, rows, zeros, &C, b, &out)};
}

// One round of CGS then the optional second (the driver's _project_twice / _project_adaptive).
// Returns false where the driver must take over (see above).
bool project_rounds(const Tensor& basis, const Tensor& Wg, int64_t n, int64_t rounds,
                    const std::vector<double>& normsg, Tensor& W2, Tensor& C, Tensor& G) {
  const int64_t b = Wg.size(1);
  if (n == 0) {
    W2 = Wg;
    C = zeros_as(Wg, {1, 0, b});
    G = bmm(Wg, transpose(Wg, 1, 2));
    return true;
  }
  const Tensor C1 = run_pass(Pass::kCoeffs, basis, Wg, nullptr, n, nullptr);
  if (!all_finite(C1)) return false;  // the driver raises, naming the basis rows
  Tensor W1 = empty_as(Wg, {1, b, Wg.size(2)});
  if (rounds == 2) {
    const Tensor C2 = run_pass(Pass::kProjectCoeffs, basis, Wg, &C1, n, &W1);
    W2 = empty_as(Wg, {1, b, Wg.size(2)});
    G = run_pass(Pass::kProjectGram, basis, W1, &C2, n, &W2);
    add_into(C1, C2);
    C = C1;
    return true;
  }
  const Tensor G1 = run_pass(Pass::kProjectGram, basis, Wg, &C1, n, &W1);
  const std::vector<double> kept = diagonal64(select(G1, 0, 0));
  const bool narrow = unit_roundoff_of(basis.scalar_type()) > unit_roundoff_of(Wg.scalar_type());
  bool enough = true;
  for (int64_t k = 0; k < b && enough; ++k) {
    const double kk = kept[static_cast<size_t>(k)], n0 = normsg[static_cast<size_t>(k)];
    enough = std::isfinite(kk) && kk >= 0.5 * n0 * n0;
  }
  if (enough && narrow) return false;  // its test needs the norms of C1's columns: the driver
  if (enough) {
    W2 = W1, C = C1, G = G1;
    return true;
  }
  const Tensor C2 = run_pass(Pass::kCoeffs, basis, W1, nullptr, n, nullptr);
  W2 = empty_as(Wg, {1, b, Wg.size(2)});
  G = run_pass(Pass::kProjectGram, basis, W1, &C2, n, &W2);
  add_into(C1, C2);
  C = C1;
  return true;
}

// basis (1, m, d) rows stride-1, W (1, b, d) contiguous in the accumulation dtype, norms0 (b,)
// float64 CPU (the block rows' norms, finite), tol the rank tolerance; b >= 1.
std::tuple<Tensor, Tensor, Tensor, bool> fast_orthonormalize_cpu(
    const Tensor& basis, const Tensor& W, const Tensor& norms0_t, int64_t n, double tol,
    int64_t rounds, int64_t local_rows) {
  const int64_t b = W.size(1), d = W.size(2);
  const ScalarType acc = W.scalar_type();
  const Tensor none = empty_as(W, {0});
  const auto decline = [&]() { return std::make_tuple(none, none, none, false); };
  const double* n0p = static_cast<const double*>(norms0_t.data_ptr());
  const std::vector<double> norms0(n0p, n0p + b);

  Tensor Wg = W, CL;
  std::vector<double> normsg = norms0;
  const int64_t l0 = n - local_rows;
  if (local_rows > 0) {
    const Tensor local = narrow(basis, 1, l0, local_rows);
    CL = run_pass(Pass::kCoeffs, local, W, nullptr, local_rows, nullptr);
    if (!all_finite(CL)) return decline();
    Wg = empty_as(W, {1, b, d});
    const Tensor GL = run_pass(Pass::kProjectGram, local, W, &CL, local_rows, &Wg);
    const std::vector<double> g = diagonal64(select(GL, 0, 0));
    for (int64_t k = 0; k < b; ++k) normsg[k] = std::sqrt(std::max(g[k], 0.0));
  }
  Tensor W2, C, G;
  if (!project_rounds(basis, Wg, n, rounds, normsg, W2, C, G)) return decline();
  if (local_rows > 0) {
    // C[:, l0:l0 + local_rows] += CL; C (1, n, b) is contiguous, so those rows are adjacent
    // and the narrowed view is contiguous too (written in place)
    add_into(narrow(C, 1, l0, local_rows), CL);
  }
  // CholeskyQR2 on W2 (the driver's _cholesky_qr2)
  const double eps_acc = unit_roundoff_of(acc);
  const auto [R1, ok1] = cholesky_upper(symmetrized_cpu64(select(G, 0, 0)));
  if (!ok1) return decline();
  const double* r1 = static_cast<const double*>(R1.data_ptr());
  double dmin = std::numeric_limits<double>::infinity(), dmax = 0.0;
  for (int64_t k = 0; k < b; ++k) {
    const double dk = r1[k * b + k];
    if (!(std::isfinite(dk) && dk > tol * norms0[k] && dk > 0.0)) return decline();
    dmin = std::min(dmin, dk);
    dmax = std::max(dmax, dk);
  }
  if (!(dmax < 0.1 / std::sqrt(eps_acc) * dmin)) return decline();
  Tensor zeros = empty_as(W2, {1, b, d});
  std::memset(zeros.data_ptr(), 0, static_cast<size_t>(b * d) * W2.element_size());
  const auto q1G2 = transform_rows(W2, zeros, inverse(R1), acc);
  const auto [R2, ok2] = cholesky_upper(symmetrized_cpu64(select(q1G2.second, 0, 0)));
  if (!ok2) return decline();
  const Tensor q = select(transform_rows(q1G2.first, zeros, inverse(R2), acc).first, 0, 0);
  std::array<StableIValue, 2> triu{to_ivalue(torch::stable::matmul(R2, R1)),
                                   to_ivalue(int64_t{0})};
  call_op("aten::triu", "", triu);
  const Tensor r = to_dtype(from_ivalue<Tensor>(triu[0]), acc);
  return std::make_tuple(q, select(C, 0, 0), r, true);
}

}  // namespace
}  // namespace krylov
}  // namespace landscape_ext

STABLE_TORCH_LIBRARY_IMPL(landscape_ext, CPU, m) {
  m.impl("_krylov_coeffs", TORCH_BOX(&landscape_ext::krylov::coeffs_cpu));
  m.impl("_krylov_project_coeffs", TORCH_BOX(&landscape_ext::krylov::project_coeffs_cpu));
  m.impl("_krylov_project_gram", TORCH_BOX(&landscape_ext::krylov::project_gram_cpu));
  m.impl("_krylov_fast_orthonormalize",
         TORCH_BOX(&landscape_ext::krylov::fast_orthonormalize_cpu));
}
