// sketch op family, CPU backend: the fused direct sketch kernel (see sketch.h) and the
// registration of linear_grad_sketch / linear_grad_project for the CPU dispatch key.
//
// y_row[r, j] = e_r^T V_j a_r for rows r of A (R, n_in), E (R, n_out) and directions V (l, n_out,
// n_in) is a GEMM  C_j = A V_j^T  (R x n_out, inner dimension n_in) whose epilogue reduces each
// row of C_j against the same row of E. The plain-PyTorch composition writes all of C (R x l x
// n_out) to memory and reads it back; here each C tile lives in registers only:
//
//   pack      V_j is transposed once per call into panels Vp[j][ob] of n_in x NR (NR = two
//             64-byte vectors of columns o, zero-padded past n_out), so the micro-kernel reads one
//             contiguous 128-byte line per step of the inner dimension.
//   task      (row block of kRowBlock = 48 rows, direction j): the A block (48 x n_in) stays in
//             L2 while the panels of V_j stream through it once; consecutive tasks of a thread
//             share the row block (directions vary fastest).
//   micro     6 rows x NR columns of C in 12 vector registers, inner loop over n_in with one
//             broadcast of a[m][i] and two vector FMAs per row; epilogue: part[m] += c (*) e, a
//             lane-wise partial sum per row that is reduced once per (row, j) at the end.
//
// Every y entry is produced by exactly one task, in a fixed order: results do not depend on the
// thread count. Inner loops use GCC/Clang vector extensions, compiled once per x86-64 level
// (cpu/simd.h): AVX-512 (64-byte vectors), AVX2+FMA (32-byte) and baseline x86-64 (16-byte), each
// with a 6 x 2-vector micro-tile that fits its register file (12 accumulators). The vector width
// changes with the level, so the variants are separate functions picked at run time by
// simd::cpu_isa_level() (not target_clones); the environment variable LANDSCAPE_EXT_SKETCH_ISA
// (x86-64-v3 or default, read once) caps the level (the tests run every variant this way).
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/simd.h"
#include "sketch.h"
#include "stable_api.h"

namespace landscape_ext {
namespace sketch {
namespace {

template <typename T, int VB>
using Vec = simd::VecN<T, VB>;

constexpr int kMR = 6;          // rows per micro-tile
constexpr int kRowBlock = 48;   // rows per task (a multiple of kMR)

template <typename T, int VB>
LANDSCAPE_ALWAYS_INLINE typename Vec<T, VB>::type loadu(const T* p) {
  return simd::load<typename Vec<T, VB>::type>(p);
}

// One micro-tile: rows [0, M) of A/E (row strides n_in / n_out), columns [o0, o0 + NR) of C_j
// from the packed panel P (n_in x NR). Adds the lane-wise products c (*) e into part[0..M).
template <int M, typename T, int VB>
LANDSCAPE_ALWAYS_INLINE void micro_tile(const T* A, int64_t n_in, const T* P, const T* E,
                                        int64_t n_out, int64_t o0,
                                        typename Vec<T, VB>::type* part) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::L;
  constexpr int NR = 2 * L;
  V c0[M], c1[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    c0[m] = V{};
    c1[m] = V{};
  }
  for (int64_t i = 0; i < n_in; ++i) {
    const V p0 = loadu<T, VB>(P + i * NR);
    const V p1 = loadu<T, VB>(P + i * NR + L);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const T s = A[m * n_in + i];
      c0[m] += s * p0;
      c1[m] += s * p1;
    }
  }
  const int64_t valid = n_out - o0;
  if (valid >= NR) {
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const T* e = E + m * n_out + o0;
      part[m] += c0[m] * loadu<T, VB>(e) + c1[m] * loadu<T, VB>(e + L);
    }
  } else {
    for (int m = 0; m < M; ++m) {
      T buf[NR];
      std::memcpy(buf, &c0[m], sizeof(V));
      std::memcpy(buf + L, &c1[m], sizeof(V));
      const T* e = E + m * n_out + o0;
      T s = 0;
      for (int64_t c = 0; c < valid; ++c) s += buf[c] * e[c];
      part[m][0] += s;
    }
  }
}

struct TaskArgs {
  const void* A;   // first row of the row block
  const void* E;   // first row of the row block
  const void* P;   // packed panels of direction j: (nob, n_in, NR)
  void* y;         // y_row + first row * l + j
  int64_t rows;    // rows in this block (<= kRowBlock)
  int64_t n_in, n_out, nob, l;
};

template <typename T, int VB>
LANDSCAPE_ALWAYS_INLINE void sketch_task_impl(const TaskArgs& a) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::L;
  constexpr int NR = 2 * L;
  const T* A = static_cast<const T*>(a.A);
  const T* E = static_cast<const T*>(a.E);
  const T* P = static_cast<const T*>(a.P);
  T* y = static_cast<T*>(a.y);
  const int64_t rows = a.rows, n_in = a.n_in, n_out = a.n_out;
  V part[kRowBlock];
  for (int64_t r = 0; r < rows; ++r) part[r] = V{};
  for (int64_t ob = 0; ob < a.nob; ++ob) {
    const T* panel = P + ob * n_in * NR;
    const int64_t o0 = ob * NR;
    int64_t r = 0;
    for (; r + kMR <= rows; r += kMR)
      micro_tile<kMR, T, VB>(A + r * n_in, n_in, panel, E + r * n_out, n_out, o0, part + r);
    const T* Ar = A + r * n_in;
    const T* Er = E + r * n_out;
    switch (rows - r) {
      case 5: micro_tile<5, T, VB>(Ar, n_in, panel, Er, n_out, o0, part + r); break;
      case 4: micro_tile<4, T, VB>(Ar, n_in, panel, Er, n_out, o0, part + r); break;
      case 3: micro_tile<3, T, VB>(Ar, n_in, panel, Er, n_out, o0, part + r); break;
      case 2: micro_tile<2, T, VB>(Ar, n_in, panel, Er, n_out, o0, part + r); break;
      case 1: micro_tile<1, T, VB>(Ar, n_in, panel, Er, n_out, o0, part + r); break;
      default: break;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    T s = 0;
    for (int c = 0; c < L; ++c) s += part[r][c];
    y[r * a.l] = s;
  }
}

using TaskFn = void (*)(const TaskArgs&);

#if LANDSCAPE_X86_64
LANDSCAPE_TARGET_V4 void task_f_v4(const TaskArgs& a) { sketch_task_impl<float, 64>(a); }
LANDSCAPE_TARGET_V4 void task_d_v4(const TaskArgs& a) { sketch_task_impl<double, 64>(a); }
LANDSCAPE_TARGET_V3 void task_f_v3(const TaskArgs& a) { sketch_task_impl<float, 32>(a); }
LANDSCAPE_TARGET_V3 void task_d_v3(const TaskArgs& a) { sketch_task_impl<double, 32>(a); }
#endif
void task_f_base(const TaskArgs& a) { sketch_task_impl<float, 16>(a); }
void task_d_base(const TaskArgs& a) { sketch_task_impl<double, 16>(a); }

// The level whose variant runs: this CPU's, capped by LANDSCAPE_EXT_SKETCH_ISA (read once).
simd::IsaLevel sketch_level() {
  static const simd::IsaLevel level =
      simd::capped_isa_level(std::getenv("LANDSCAPE_EXT_SKETCH_ISA"));
  return level;
}

// Vp[j][ob][i][c] = V[j][ob * NR + c][i], zero where ob * NR + c >= n_out.
template <typename T, int NR>
void pack_directions(const T* V, int64_t s0, int64_t l, int64_t n_out, int64_t n_in, T* Vp) {
  const int64_t nob = (n_out + NR - 1) / NR;
  torch::stable::parallel_for(0, l * nob, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t / nob, ob = t % nob;
      T* dst = Vp + t * n_in * NR;
      const int64_t o0 = ob * NR, valid = std::min<int64_t>(NR, n_out - o0);
      const T* src = V + j * s0 + o0 * n_in;
      // in strips of 64 i so the destination strip (64 x NR) stays in L1 while columns fill it
      for (int64_t i0 = 0; i0 < n_in; i0 += 64) {
        const int64_t i1 = std::min<int64_t>(n_in, i0 + 64);
        for (int64_t c = 0; c < valid; ++c) {
          const T* row = src + c * n_in;
          for (int64_t i = i0; i < i1; ++i) dst[i * NR + c] = row[i];
        }
        for (int64_t c = valid; c < NR; ++c)
          for (int64_t i = i0; i < i1; ++i) dst[i * NR + c] = T(0);
      }
    }
  });
}

template <typename T, int VB>
Tensor direct_sketch_typed(const Tensor& A, const Tensor& E, const Tensor& V, TaskFn task) {
  constexpr int NR = 2 * Vec<T, VB>::L;
  const int64_t R = A.size(0), n_in = A.size(1), n_out = E.size(1), l = V.size(0);
  const int64_t nob = (n_out + NR - 1) / NR;
  Tensor Vp = empty_as(A, {l, nob, n_in, NR});
  pack_directions<T, NR>(V.const_data_ptr<T>(), V.stride(0), l, n_out, n_in,
                         Vp.mutable_data_ptr<T>());
  Tensor y = empty_as(A, {R, l});
  const T* Ap = A.const_data_ptr<T>();
  const T* Ep = E.const_data_ptr<T>();
  const T* Pp = Vp.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const int64_t nrb = (R + kRowBlock - 1) / kRowBlock;
  torch::stable::parallel_for(0, nrb * l, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rb = t / l, j = t % l;
      const int64_t r0 = rb * kRowBlock;
      TaskArgs a;
      a.A = Ap + r0 * n_in;
      a.E = Ep + r0 * n_out;
      a.P = Pp + j * nob * n_in * NR;
      a.y = yp + r0 * l + j;
      a.rows = std::min<int64_t>(kRowBlock, R - r0);
      a.n_in = n_in;
      a.n_out = n_out;
      a.nob = nob;
      a.l = l;
      task(a);
    }
  });
  return y;
}

Tensor direct_sketch_cpu(const Tensor& A, const Tensor& E, const Tensor& V) {
  const bool dbl = A.scalar_type() == kDouble;
  switch (sketch_level()) {
#if LANDSCAPE_X86_64
    case simd::IsaLevel::kV4:
      return dbl ? direct_sketch_typed<double, 64>(A, E, V, &task_d_v4)
                 : direct_sketch_typed<float, 64>(A, E, V, &task_f_v4);
    case simd::IsaLevel::kV3:
      return dbl ? direct_sketch_typed<double, 32>(A, E, V, &task_d_v3)
                 : direct_sketch_typed<float, 32>(A, E, V, &task_f_v3);
#endif
    default:
      return dbl ? direct_sketch_typed<double, 16>(A, E, V, &task_d_base)
                 : direct_sketch_typed<float, 16>(A, E, V, &task_f_base);
  }
}

// out += m1 @ m2 in place (Tensor.addmm_): ATen's CPU addmm kernel through the C shim, out
// aliasing self (the same structured kernel addmm_ runs; see AddmmAccFn in sketch.h).
void addmm_acc_cpu(const Tensor& out, const Tensor& m1, const Tensor& m2) {
  LANDSCAPE_SHIM_CHECK(
      aoti_torch_cpu_addmm_out(out.get(), out.get(), m1.get(), m2.get(), 1.0, 1.0));
}

// The registered kernels (TORCH_BOX needs plain functions).
Tensor linear_grad_sketch_cpu(const Tensor& acts, const Tensor& out_grads,
                              const Tensor& directions) {
  return linear_grad_sketch_impl(&direct_sketch_cpu, acts, out_grads, directions);
}

Tensor linear_grad_project_cpu(const Tensor& acts, const Tensor& out_grads,
                               const Tensor& weights) {
  return linear_grad_project_impl(&addmm_acc_cpu, acts, out_grads, weights);
}

}  // namespace

const char* cpu_sketch_isa_level() { return simd::isa_level_name(sketch_level()); }

}  // namespace sketch
}  // namespace landscape_ext

STABLE_TORCH_LIBRARY_IMPL(landscape_ext, CPU, m) {
  m.impl("linear_grad_sketch", TORCH_BOX(&landscape_ext::sketch::linear_grad_sketch_cpu));
  m.impl("linear_grad_project", TORCH_BOX(&landscape_ext::sketch::linear_grad_project_cpu));
}
