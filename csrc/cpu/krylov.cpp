// krylov op family, CPU backend: the three fused passes over the basis (see krylov.h) and the
// registration of block_orthonormalize / orthogonalize_batched for the CPU dispatch key.
//
// Work split: d is cut into a fixed number of chunks that depends only on d (krylov::num_chunks),
// each (run, chunk) is one task of at::parallel_for, partial coefficient / Gram sums are kept per
// task and added in chunk order afterwards, so results are bitwise independent of the thread
// count. Inside a chunk, columns are processed in tiles sized so that the basis tile stays in L2
// between the two sweeps of a fused pass: the basis is read from memory once per pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "krylov.h"

// Hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time,
// so one wheel is fast on every x86 CPU without -march=native.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LANDSCAPE_MULTIVERSION \
  __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define LANDSCAPE_MULTIVERSION
#endif

namespace landscape_ext {
namespace krylov {
namespace {

constexpr int64_t kLanes = 16;  // independent partial sums per dot product (one AVX-512 register)

// out[k] += sum_j q[j] * w[k * ldw + j] for k < b.
template <typename T>
inline void dot_rows_impl(const T* __restrict q, const T* __restrict w, int64_t ldw, int64_t b,
                          int64_t len, T* __restrict out) {
  const int64_t main = len - len % kLanes;
  for (int64_t k = 0; k < b; ++k) {
    const T* wk = w + k * ldw;
    T lanes[kLanes] = {};
    for (int64_t j = 0; j < main; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += q[j + l] * wk[j + l];
    }
    T s = 0;
    for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
    for (int64_t j = main; j < len; ++j) s += q[j] * wk[j];
    out[k] += s;
  }
}

// w[k * ldw + j] -= c[k] * q[j] for k < b.
template <typename T>
inline void sub_outer_impl(T* __restrict w, int64_t ldw, const T* __restrict c, int64_t b,
                           const T* __restrict q, int64_t len) {
  for (int64_t k = 0; k < b; ++k) {
    T* wk = w + k * ldw;
    const T ck = c[k];
    if (ck == T(0)) continue;
    for (int64_t j = 0; j < len; ++j) wk[j] -= ck * q[j];
  }
}

// g[k * b + l] += sum_j w[k][j] * w[l][j] for l >= k (upper triangle).
template <typename T>
inline void gram_upper_impl(const T* __restrict w, int64_t ldw, int64_t b, int64_t len,
                            T* __restrict g) {
  for (int64_t k = 0; k < b; ++k) dot_rows_impl(w + k * ldw, w + k * ldw, ldw, b - k, len, g + k * b + k);
}

LANDSCAPE_MULTIVERSION void dot_rows(const float* q, const float* w, int64_t ldw, int64_t b,
                                     int64_t len, float* out) {
  dot_rows_impl(q, w, ldw, b, len, out);
}
LANDSCAPE_MULTIVERSION void dot_rows(const double* q, const double* w, int64_t ldw, int64_t b,
                                     int64_t len, double* out) {
  dot_rows_impl(q, w, ldw, b, len, out);
}
LANDSCAPE_MULTIVERSION void sub_outer(float* w, int64_t ldw, const float* c, int64_t b,
                                      const float* q, int64_t len) {
  sub_outer_impl(w, ldw, c, b, q, len);
}
LANDSCAPE_MULTIVERSION void sub_outer(double* w, int64_t ldw, const double* c, int64_t b,
                                      const double* q, int64_t len) {
  sub_outer_impl(w, ldw, c, b, q, len);
}
LANDSCAPE_MULTIVERSION void gram_upper(const float* w, int64_t ldw, int64_t b, int64_t len,
                                       float* g) {
  gram_upper_impl(w, ldw, b, len, g);
}
LANDSCAPE_MULTIVERSION void gram_upper(const double* w, int64_t ldw, int64_t b, int64_t len,
                                       double* g) {
  gram_upper_impl(w, ldw, b, len, g);
}

// A basis row segment in the accumulation type: the row itself when the types agree,
// otherwise converted into `scratch` (half storage is widened once per row and tile).
template <typename basis_t, typename acc_t>
inline const acc_t* row_as_acc(const basis_t* src, int64_t len, acc_t* scratch) {
  if constexpr (std::is_same_v<basis_t, acc_t>) {
    return src;
  } else {
    for (int64_t j = 0; j < len; ++j) scratch[j] = static_cast<acc_t>(src[j]);
    return scratch;
  }
}

// Column tile length: keep n rows of the basis tile within ~256 KiB of L2.
inline int64_t tile_len(int64_t n, int64_t elem_size) {
  int64_t t = (256 * 1024) / std::max<int64_t>(1, n * elem_size);
  t = std::max<int64_t>(64, std::min<int64_t>(t, 2048));
  return t - t % 64;
}

enum class Pass { kCoeffs, kProjectCoeffs, kProjectGram };

// One pass over basis[:, :n]; see krylov.h for the three kinds.
//   basis (R, m, d) rows stride-1; W (R, b, d) contiguous acc; C (R, n, b) contiguous acc.
// Returns (out or undefined, reduced partial sums (R, n, b) or (R, b, b)).
template <typename basis_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> run_pass(Pass kind, const at::Tensor& basis,
                                            const at::Tensor& W, const at::Tensor& C,
                                            int64_t n) {
  const int64_t R = W.size(0), b = W.size(1), d = W.size(2);
  const int64_t sR = basis.stride(0), sM = basis.stride(1);
  const basis_t* Q = basis.data_ptr<basis_t>();
  const acc_t* Wp = W.data_ptr<acc_t>();
  const acc_t* Cp = kind == Pass::kCoeffs ? nullptr : C.data_ptr<acc_t>();
  const bool writes_out = kind != Pass::kCoeffs;
  const int64_t part_rows = kind == Pass::kProjectGram ? b : n;  // partial sum is (rows, b)
  at::Tensor out = writes_out ? at::empty({R, b, d}, W.options()) : at::Tensor();
  acc_t* Op = writes_out ? out.data_ptr<acc_t>() : nullptr;

  const int64_t nchunks = num_chunks(d);
  const int64_t chunk = (d + nchunks - 1) / nchunks;
  const int64_t T = tile_len(n, static_cast<int64_t>(sizeof(basis_t)));
  std::vector<acc_t> partial(static_cast<size_t>(R * nchunks * part_rows * b), acc_t(0));

  at::parallel_for(0, R * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(std::is_same_v<basis_t, acc_t> ? 0 : T);
    std::vector<acc_t> ct(static_cast<size_t>(n * b));  // C^T rows per basis row: C[r, i, :]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / nchunks, c = task % nchunks;
      const int64_t j_begin = c * chunk, j_end = std::min(d, j_begin + chunk);
      acc_t* part = partial.data() + task * part_rows * b;
      const basis_t* Qr = Q + r * sR;
      const acc_t* Wr = Wp + r * b * d;
      for (int64_t j0 = j_begin; j0 < j_end; j0 += T) {
        const int64_t len = std::min(T, j_end - j0);
        if (kind == Pass::kCoeffs) {
          // part[i, :] += Q[i, tile] . W[:, tile]
          for (int64_t i = 0; i < n; ++i) {
            const acc_t* qi = row_as_acc<basis_t, acc_t>(Qr + i * sM + j0, len, scratch.data());
            dot_rows(qi, Wr + j0, d, b, len, part + i * b);
          }
          continue;
        }
        // out[:, tile] = W[:, tile] - sum_i C[i, :]^T Q[i, tile]
        acc_t* Or = Op + r * b * d;
        for (int64_t k = 0; k < b; ++k) {
          std::memcpy(Or + k * d + j0, Wr + k * d + j0, static_cast<size_t>(len) * sizeof(acc_t));
        }
        const acc_t* Cr = Cp + r * n * b;
        for (int64_t i = 0; i < n; ++i) {
          const acc_t* qi = row_as_acc<basis_t, acc_t>(Qr + i * sM + j0, len, scratch.data());
          sub_outer(Or + j0, d, Cr + i * b, b, qi, len);
        }
        if (kind == Pass::kProjectCoeffs) {
          // Second sweep over the same basis tile (now in L2): C_next[i, :] += Q[i] . out
          for (int64_t i = 0; i < n; ++i) {
            const acc_t* qi = row_as_acc<basis_t, acc_t>(Qr + i * sM + j0, len, scratch.data());
            dot_rows(qi, Or + j0, d, b, len, part + i * b);
          }
        } else {
          gram_upper(Or + j0, d, b, len, part);
        }
      }
    }
  });

  // Deterministic reduction in chunk order.
  at::Tensor sums = at::zeros({R, part_rows, b}, W.options());
  acc_t* S = sums.data_ptr<acc_t>();
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < nchunks; ++c) {
      const acc_t* part = partial.data() + (r * nchunks + c) * part_rows * b;
      for (int64_t e = 0; e < part_rows * b; ++e) S[r * part_rows * b + e] += part[e];
    }
  }
  if (kind == Pass::kProjectGram) {
    // mirror the upper triangle
    for (int64_t r = 0; r < R; ++r) {
      acc_t* g = S + r * b * b;
      for (int64_t k = 0; k < b; ++k)
        for (int64_t l = 0; l < k; ++l) g[k * b + l] = g[l * b + k];
    }
  }
  return {out, sums};
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> dispatch_basis(Pass kind, const at::Tensor& basis,
                                                  const at::Tensor& W, const at::Tensor& C,
                                                  int64_t n) {
  switch (basis.scalar_type()) {
    case at::kDouble: return run_pass<double, acc_t>(kind, basis, W, C, n);
    case at::kFloat: return run_pass<float, acc_t>(kind, basis, W, C, n);
    case at::kHalf: return run_pass<c10::Half, acc_t>(kind, basis, W, C, n);
    case at::kBFloat16: return run_pass<c10::BFloat16, acc_t>(kind, basis, W, C, n);
    default: TORCH_CHECK(false, "krylov: unsupported basis dtype ", basis.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> pass_cpu(Pass kind, const at::Tensor& basis,
                                            const at::Tensor& W, const at::Tensor& C, int64_t n) {
  if (W.scalar_type() == at::kDouble) return dispatch_basis<double>(kind, basis, W, C, n);
  return dispatch_basis<float>(kind, basis, W, C, n);
}

at::Tensor coeffs_cpu(const at::Tensor& basis, const at::Tensor& W, int64_t n) {
  return std::get<1>(pass_cpu(Pass::kCoeffs, basis, W, at::Tensor(), n));
}
std::tuple<at::Tensor, at::Tensor> project_coeffs_cpu(const at::Tensor& basis,
                                                      const at::Tensor& W, const at::Tensor& C,
                                                      int64_t n) {
  return pass_cpu(Pass::kProjectCoeffs, basis, W, C.contiguous(), n);
}
std::tuple<at::Tensor, at::Tensor> project_gram_cpu(const at::Tensor& basis,
                                                    const at::Tensor& W, const at::Tensor& C,
                                                    int64_t n) {
  return pass_cpu(Pass::kProjectGram, basis, W, C.contiguous(), n);
}

const Passes kCpuPasses{&coeffs_cpu, &project_coeffs_cpu, &project_gram_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_orthonormalize_cpu(
    const at::Tensor& basis, const at::Tensor& block, int64_t n_basis, double rank_tol) {
  return block_orthonormalize_impl(kCpuPasses, basis, block, n_basis, rank_tol);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> orthogonalize_batched_cpu(
    const at::Tensor& bases, const at::Tensor& vectors, int64_t n_basis, double rank_tol) {
  return orthogonalize_batched_impl(kCpuPasses, bases, vectors, n_basis, rank_tol);
}

}  // namespace
}  // namespace krylov
}  // namespace landscape_ext

TORCH_LIBRARY_IMPL(landscape_ext, CPU, m) {
  m.impl("block_orthonormalize", &landscape_ext::krylov::block_orthonormalize_cpu);
  m.impl("orthogonalize_batched", &landscape_ext::krylov::orthogonalize_batched_cpu);
}
