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
#include <cstdint>
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
std::tuple<Tensor, Tensor> project_coeffs_cpu(const Tensor& basis, const Tensor& W,
                                              const Tensor& C, int64_t n) {
  check_pass_args("_krylov_project_coeffs", basis, W, &C, n);
  const Tensor Cc = C.is_contiguous() ? C : contiguous(C);
  const Tensor out = empty_as(W, {W.size(0), W.size(1), W.size(2)});
  return {out, run_pass(Pass::kProjectCoeffs, basis, W, &Cc, n, &out)};
}
std::tuple<Tensor, Tensor> project_gram_cpu(const Tensor& basis, const Tensor& W,
                                            const Tensor& C, int64_t n) {
  check_pass_args("_krylov_project_gram", basis, W, &C, n);
  const Tensor Cc = C.is_contiguous() ? C : contiguous(C);
  const Tensor out = empty_as(W, {W.size(0), W.size(1), W.size(2)});
  return {out, run_pass(Pass::kProjectGram, basis, W, &Cc, n, &out)};
}

}  // namespace
}  // namespace krylov
}  // namespace landscape_ext

STABLE_TORCH_LIBRARY_IMPL(landscape_ext, CPU, m) {
  m.impl("_krylov_coeffs", TORCH_BOX(&landscape_ext::krylov::coeffs_cpu));
  m.impl("_krylov_project_coeffs", TORCH_BOX(&landscape_ext::krylov::project_coeffs_cpu));
  m.impl("_krylov_project_gram", TORCH_BOX(&landscape_ext::krylov::project_gram_cpu));
}
