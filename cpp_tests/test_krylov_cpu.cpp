// C++ test of the krylov CPU kernels (csrc/cpu/krylov.cpp), run by ctest (see CMakeLists.txt).
//
// The ops are called the way every user reaches them, through the dispatcher
// (landscape_ext::block_orthonormalize / ::orthogonalize_batched, registered by the static
// initializers of the kernel object files), and checked against naive loops written here:
// plain nested for-loops over std::vector<double> (no ATen linear algebra in the references).
// Only conversions (double <-> storage dtype) use ATen.
//
// Exit status: 0 when every check passes, 1 otherwise. LANDSCAPE_EXT_TEST_VERBOSE=1 prints every
// measured error next to its tolerance.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

// ---- a tiny check harness -----------------------------------------------------------------------
int g_checks = 0;
int g_failures = 0;
bool g_verbose = false;
std::string g_case;  // the case being run, printed with every failure

#define LX_CHECK(cond, msg)                                                                  \
  do {                                                                                       \
    ++g_checks;                                                                              \
    if (!(cond)) {                                                                           \
      ++g_failures;                                                                          \
      std::ostringstream lx_os_;                                                             \
      lx_os_ << msg;                                                                         \
      std::cerr << "FAIL " << __FILE__ << ":" << __LINE__ << " [" << g_case << "] " #cond   \
                << " : " << lx_os_.str() << "\n";                                            \
    }                                                                                        \
  } while (0)

// A measured error against its tolerance: one check, printed in verbose mode.
void check_le(const char* what, double err, double tol) {
  if (g_verbose) std::cout << "    " << g_case << "  " << what << " = " << err << " (tol " << tol << ")\n";
  LX_CHECK(std::isfinite(err) && err <= tol, what << " = " << err << " exceeds tol " << tol);
}

// ---- dense row-major matrices of doubles ----------------------------------------------------------
struct Mat {
  int64_t rows = 0, cols = 0;
  std::vector<double> v;
  Mat() = default;
  Mat(int64_t r, int64_t c, double fill = 0.0)
      : rows(r), cols(c), v(static_cast<size_t>(r * c), fill) {}
  double& operator()(int64_t i, int64_t j) { return v[static_cast<size_t>(i * cols + j)]; }
  double operator()(int64_t i, int64_t j) const { return v[static_cast<size_t>(i * cols + j)]; }
};

Mat randn(int64_t r, int64_t c, std::mt19937_64& gen) {
  std::normal_distribution<double> normal(0.0, 1.0);
  Mat a(r, c);
  for (double& x : a.v) x = normal(gen);
  return a;
}

double row_dot(const Mat& a, int64_t i, const Mat& b, int64_t k) {
  double s = 0.0;
  for (int64_t j = 0; j < a.cols; ++j) s += a(i, j) * b(k, j);
  return s;
}

double row_norm(const Mat& a, int64_t i) { return std::sqrt(row_dot(a, i, a, i)); }

// First n rows of a Gaussian matrix made orthonormal by modified Gram-Schmidt, twice.
Mat orthonormal_rows(int64_t n, int64_t d, std::mt19937_64& gen) {
  Mat q = randn(n, d, gen);
  for (int64_t k = 0; k < n; ++k) {
    for (int round = 0; round < 2; ++round) {
      for (int64_t i = 0; i < k; ++i) {
        const double c = row_dot(q, i, q, k);
        for (int64_t j = 0; j < d; ++j) q(k, j) -= c * q(i, j);
      }
    }
    const double nrm = row_norm(q, k);
    for (int64_t j = 0; j < d; ++j) q(k, j) /= nrm;
  }
  return q;
}

// ---- conversions (the only ATen used on the reference side) -------------------------------------
at::Tensor to_tensor(const Mat& a, at::ScalarType dtype) {
  at::Tensor t = at::from_blob(const_cast<double*>(a.v.data()), {a.rows, a.cols},
                               at::TensorOptions().dtype(at::kDouble));
  return t.to(dtype, /*non_blocking=*/false, /*copy=*/true);
}

Mat from_tensor(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2, "from_tensor: expected 2-D, got ", t.sizes());
  at::Tensor c = t.to(at::kDouble).contiguous();
  Mat a(c.size(0), c.size(1));
  std::copy(c.data_ptr<double>(), c.data_ptr<double>() + c.numel(), a.v.begin());
  return a;
}

std::vector<double> vec_from_tensor(const at::Tensor& t) {
  at::Tensor c = t.to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// ---- naive references -------------------------------------------------------------------------------
// C (n, b) = Q[:n] W^T
Mat naive_coeffs(const Mat& Q, int64_t n, const Mat& W) {
  Mat C(n, W.rows);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < W.rows; ++k) C(i, k) = row_dot(Q, i, W, k);
  return C;
}

// W - C^T Q[:n]
Mat naive_subtract(const Mat& Q, int64_t n, const Mat& W, const Mat& C) {
  Mat out = W;
  for (int64_t k = 0; k < W.rows; ++k)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < W.cols; ++j) out(k, j) -= C(i, k) * Q(i, j);
  return out;
}

// Classical Gram-Schmidt twice (CGS2) of the rows of W against Q[:n]:
// C = C1 + C2 with C1 = Q W^T, W1 = W - C1^T Q, C2 = Q W1^T, W2 = W1 - C2^T Q.
struct Cgs2 {
  Mat C;   // (n, b)
  Mat W2;  // (b, d)
};
Cgs2 naive_cgs2(const Mat& Q, int64_t n, const Mat& W) {
  Mat C1 = naive_coeffs(Q, n, W);
  Mat W1 = naive_subtract(Q, n, W, C1);
  Mat C2 = naive_coeffs(Q, n, W1);
  Cgs2 out{C1, naive_subtract(Q, n, W1, C2)};
  for (size_t e = 0; e < out.C.v.size(); ++e) out.C.v[e] += C2.v[e];
  return out;
}

// QR of the rows of a full-rank W (b, d): W = r^T q, q orthonormal rows, r upper triangular with
// a positive diagonal (unique), by modified Gram-Schmidt with reorthogonalization.
void naive_qr_rows(const Mat& W, Mat* q, Mat* r) {
  const int64_t b = W.rows, d = W.cols;
  *q = W;
  *r = Mat(b, b);
  for (int64_t k = 0; k < b; ++k) {
    for (int round = 0; round < 2; ++round) {
      for (int64_t i = 0; i < k; ++i) {
        const double c = row_dot(*q, i, *q, k);
        (*r)(i, k) += c;
        for (int64_t j = 0; j < d; ++j) (*q)(k, j) -= c * (*q)(i, j);
      }
    }
    const double nrm = row_norm(*q, k);
    (*r)(k, k) = nrm;
    for (int64_t j = 0; j < d; ++j) (*q)(k, j) /= nrm;
  }
}

// max_{i < na, k < nb} |A[i] . B[k] - (identity && i == k)|
double max_gram_defect(const Mat& A, int64_t na, const Mat& B, int64_t nb, bool identity) {
  double worst = 0.0;
  for (int64_t i = 0; i < na; ++i)
    for (int64_t k = 0; k < nb; ++k)
      worst = std::max(worst, std::abs(row_dot(A, i, B, k) - ((identity && i == k) ? 1.0 : 0.0)));
  return worst;
}

// ||I - Q Q^T||_F of Q[:n] as stored (half storage leaves it ~ eps(half)); after two projection
// rounds the component left along the basis is of order defect^2.
double stored_defect(const Mat& Q, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < n; ++k) {
      const double e = row_dot(Q, i, Q, k) - (i == k ? 1.0 : 0.0);
      s += e * e;
    }
  return std::sqrt(s);
}

// ---- the ops, through the dispatcher ----------------------------------------------------------------
using KrylovFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                   const at::Tensor&, int64_t,
                                                                   double);
using BlockFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                  const at::Tensor&, int64_t,
                                                                  double, int64_t, int64_t);

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_op(const char* name, const at::Tensor& a,
                                                       const at::Tensor& b, int64_t n,
                                                       double rank_tol = -1.0, int64_t rounds = 2,
                                                       int64_t local_rows = 0) {
  static auto block_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("landscape_ext::block_orthonormalize", "")
                             .typed<BlockFn>();
  static auto batched_op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("landscape_ext::orthogonalize_batched", "")
                               .typed<KrylovFn>();
  const std::string op(name);
  if (op == "block_orthonormalize") return block_op.call(a, b, n, rank_tol, rounds, local_rows);
  return batched_op.call(a, b, n, rank_tol);
}

// Promised accuracy per accumulation (= block) dtype, the numbers of tests/test_krylov.py:
// orthonormality, orthogonality to the stored basis, relative reconstruction error.
double ortho_tol(at::ScalarType acc) { return acc == at::kDouble ? 1e-12 : 2e-5; }
// Agreement with the naive loops (same algorithm in float64), relative to the row norms.
double match_tol(at::ScalarType acc) { return acc == at::kDouble ? 1e-13 : 5e-6; }

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "f64";
    case at::kFloat: return "f32";
    case at::kHalf: return "f16";
    case at::kBFloat16: return "bf16";
    default: return "?";
  }
}

// ---- block_orthonormalize ---------------------------------------------------------------------------
enum class Block { kRandom, kRankDeficient };

struct BlockCase {
  int64_t d, m, n, b;
  at::ScalarType basis_dtype, block_dtype;
  Block kind = Block::kRandom;
  int64_t row_pad = 0;  // basis is a view with row stride d + row_pad (padding is NaN)
  uint64_t seed = 1;
  int64_t rounds = 2;      // 1: one round over the basis (+ a second where needed)
  int64_t local_rows = 0;  // newest basis rows projected out first
};

std::string describe(const BlockCase& c) {
  std::ostringstream s;
  s << "block_orthonormalize d=" << c.d << " m=" << c.m << " n_basis=" << c.n << " b=" << c.b
    << " basis=" << dtype_name(c.basis_dtype) << " block=" << dtype_name(c.block_dtype)
    << (c.kind == Block::kRankDeficient ? " rank-deficient" : "")
    << (c.row_pad ? " row-strided" : "")
    << (c.rounds != 2 ? " rounds=" + std::to_string(c.rounds) : std::string())
    << (c.local_rows ? " local_rows=" + std::to_string(c.local_rows) : std::string());
  return s.str();
}

// The basis tensor: n orthonormal rows, then m - n rows of NaN (the op reads rows [:n] only),
// optionally a view into a wider buffer whose extra columns are NaN too.
at::Tensor make_basis(int64_t m, int64_t n, int64_t d, int64_t row_pad, at::ScalarType dtype,
                      std::mt19937_64& gen) {
  Mat q = orthonormal_rows(n, d, gen);
  Mat full(m, d + row_pad, std::numeric_limits<double>::quiet_NaN());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) full(i, j) = q(i, j);
  return to_tensor(full, dtype).narrow(1, 0, d);
}

void run_block_case(const BlockCase& c) {
  g_case = describe(c);
  if (g_verbose) std::cout << "  " << g_case << "\n";
  std::mt19937_64 gen(c.seed);
  const at::Tensor basis = make_basis(c.m, c.n, c.d, c.row_pad, c.basis_dtype, gen);
  const Mat Q = c.n > 0 ? from_tensor(basis.narrow(0, 0, c.n)) : Mat(0, c.d);  // as stored

  // The block, and which rows are numerically dependent (expected r[k, k] == 0).
  std::vector<bool> dependent(static_cast<size_t>(c.b), false);
  Mat W = randn(c.b, c.d, gen);
  if (c.kind == Block::kRankDeficient) {
    // rows: independent, independent, 2 row0 - row1, inside span(basis), zero, independent
    TORCH_CHECK(c.b == 6 && c.n >= 8, "rank-deficient case needs b = 6, n_basis >= 8");
    const Mat Ws = from_tensor(to_tensor(W, c.block_dtype));
    for (int64_t j = 0; j < c.d; ++j) {
      W(0, j) = Ws(0, j);
      W(1, j) = Ws(1, j);
      W(2, j) = 2.0 * Ws(0, j) - Ws(1, j);
      W(3, j) = 3.0 * Q(2, j) - Q(7, j);
      W(4, j) = 0.0;
    }
    dependent[2] = dependent[3] = dependent[4] = true;
  }
  const at::Tensor block = to_tensor(W, c.block_dtype);
  const Mat Wst = from_tensor(block);  // the block as stored

  at::Tensor q_t, coeffs_t, r_t;
  std::tie(q_t, coeffs_t, r_t) =
      call_op("block_orthonormalize", basis, block, c.n, -1.0, c.rounds, c.local_rows);

  // shapes and dtypes
  LX_CHECK(q_t.sizes() == at::IntArrayRef({c.b, c.d}), "q has shape " << q_t.sizes());
  LX_CHECK(coeffs_t.sizes() == at::IntArrayRef({c.n, c.b}), "coeffs has shape " << coeffs_t.sizes());
  LX_CHECK(r_t.sizes() == at::IntArrayRef({c.b, c.b}), "r has shape " << r_t.sizes());
  LX_CHECK(q_t.scalar_type() == c.block_dtype && coeffs_t.scalar_type() == c.block_dtype &&
               r_t.scalar_type() == c.block_dtype,
           "outputs must have the block's dtype " << dtype_name(c.block_dtype));
  if (c.b == 0) return;

  const Mat q = from_tensor(q_t), C = from_tensor(coeffs_t), r = from_tensor(r_t);
  const double tol = ortho_tol(c.block_dtype);
  const double mtol = match_tol(c.block_dtype);
  bool finite = true;
  for (const Mat* a : {&q, &C, &r})
    for (double x : a->v) finite = finite && std::isfinite(x);
  LX_CHECK(finite, "non-finite values in the outputs");

  // r upper triangular (exact zeros below the diagonal), nonnegative diagonal, zero exactly on
  // the dependent rows (the rank convention) and positive elsewhere.
  double below = 0.0;
  for (int64_t k = 0; k < c.b; ++k)
    for (int64_t l = 0; l < k; ++l) below = std::max(below, std::abs(r(k, l)));
  LX_CHECK(below == 0.0, "r has nonzero entries below the diagonal, max |r[k, l]| = " << below);
  for (int64_t k = 0; k < c.b; ++k) {
    if (dependent[static_cast<size_t>(k)]) {
      LX_CHECK(r(k, k) == 0.0, "dependent row " << k << " must get r[k, k] = 0, got " << r(k, k));
    } else {
      LX_CHECK(r(k, k) > 0.0, "independent row " << k << " must get r[k, k] > 0, got " << r(k, k));
    }
  }

  // q orthonormal, and orthogonal to the stored basis (up to defect^2 of a half basis)
  check_le("max |q q^T - I|", max_gram_defect(q, c.b, q, c.b, true), tol);
  if (c.n > 0) {
    const double defect = stored_defect(Q, c.n);
    check_le("max |Q q^T|", max_gram_defect(Q, c.n, q, c.b, false), tol + 4 * defect * defect);
  }

  // reconstruction: block = coeffs^T Q + r^T q, row by row relative to max(1, ||block[k]||)
  double recon = 0.0;
  for (int64_t k = 0; k < c.b; ++k) {
    double s2 = 0.0;
    for (int64_t j = 0; j < c.d; ++j) {
      double x = 0.0;
      for (int64_t i = 0; i < c.n; ++i) x += C(i, k) * Q(i, j);
      for (int64_t l = 0; l <= k; ++l) x += r(l, k) * q(l, j);
      s2 += (x - Wst(k, j)) * (x - Wst(k, j));
    }
    recon = std::max(recon, std::sqrt(s2) / std::max(1.0, row_norm(Wst, k)));
  }
  check_le("max_k ||block - coeffs^T Q - r^T q||_k / ||block_k||", recon, tol);

  // coefficients equal the naive CGS2 coefficients (relative to the row norm)
  const Cgs2 ref = naive_cgs2(Q, c.n, Wst);
  double dc = 0.0;
  for (int64_t k = 0; k < c.b; ++k) {
    const double scale = std::max(1.0, row_norm(Wst, k));
    for (int64_t i = 0; i < c.n; ++i) dc = std::max(dc, std::abs(C(i, k) - ref.C(i, k)) / scale);
  }
  check_le("max |coeffs - naive CGS2 coeffs| / ||block_k||", dc, mtol);

  // full rank: q and r equal the naive QR of the CGS2 remainder (unique with r[k, k] > 0)
  if (c.kind == Block::kRandom) {
    Mat qn, rn;
    naive_qr_rows(ref.W2, &qn, &rn);
    double dq = 0.0, dr = 0.0;
    for (int64_t k = 0; k < c.b; ++k) {
      for (int64_t j = 0; j < c.d; ++j) dq = std::max(dq, std::abs(q(k, j) - qn(k, j)));
      const double scale = std::max(1.0, row_norm(Wst, k));
      for (int64_t l = 0; l < c.b; ++l) dr = std::max(dr, std::abs(r(l, k) - rn(l, k)) / scale);
    }
    check_le("max |q - naive q|", dq, mtol);
    check_le("max |r - naive r| / ||block_k||", dr, mtol);
  }
}

// ---- orthogonalize_batched --------------------------------------------------------------------------
struct BatchedCase {
  int64_t runs, m, d, n;
  at::ScalarType basis_dtype, vec_dtype;
  bool special_rows = false;  // run 1: vector in the span of its basis; run 2: zero vector
  uint64_t seed = 1;
};

void run_batched_case(const BatchedCase& c) {
  std::ostringstream s;
  s << "orthogonalize_batched r=" << c.runs << " m=" << c.m << " d=" << c.d << " n_basis=" << c.n
    << " bases=" << dtype_name(c.basis_dtype) << " vectors=" << dtype_name(c.vec_dtype)
    << (c.special_rows ? " in-span+zero" : "");
  g_case = s.str();
  if (g_verbose) std::cout << "  " << g_case << "\n";
  std::mt19937_64 gen(c.seed);
  std::vector<at::Tensor> parts;
  std::vector<Mat> Qs;  // each run's basis rows [:n] as stored
  for (int64_t i = 0; i < c.runs; ++i) {
    at::Tensor bi = make_basis(c.m, c.n, c.d, 0, c.basis_dtype, gen);
    Qs.push_back(c.n > 0 ? from_tensor(bi.narrow(0, 0, c.n)) : Mat(0, c.d));
    parts.push_back(bi);
  }
  const at::Tensor bases = c.runs > 0
                               ? at::stack(parts)
                               : at::empty({0, c.m, c.d}, at::TensorOptions().dtype(c.basis_dtype));
  Mat V = randn(c.runs, c.d, gen);
  std::vector<bool> in_span(static_cast<size_t>(c.runs), false);
  if (c.special_rows) {
    TORCH_CHECK(c.runs >= 3 && c.n >= 4, "special rows need r >= 3 and n_basis >= 4");
    for (int64_t j = 0; j < c.d; ++j) {
      V(1, j) = 2.0 * Qs[1](0, j) - Qs[1](3, j);
      V(2, j) = 0.0;
    }
    in_span[1] = in_span[2] = true;
  }
  const at::Tensor vectors = to_tensor(V, c.vec_dtype);
  const Mat Vst = from_tensor(vectors);

  at::Tensor q_t, coeffs_t, norms_t;
  std::tie(q_t, coeffs_t, norms_t) = call_op("orthogonalize_batched", bases, vectors, c.n);
  LX_CHECK(q_t.sizes() == at::IntArrayRef({c.runs, c.d}), "q has shape " << q_t.sizes());
  LX_CHECK(coeffs_t.sizes() == at::IntArrayRef({c.runs, c.n}), "coeffs has shape " << coeffs_t.sizes());
  LX_CHECK(norms_t.sizes() == at::IntArrayRef({c.runs}), "norms has shape " << norms_t.sizes());
  LX_CHECK(q_t.scalar_type() == c.vec_dtype && coeffs_t.scalar_type() == c.vec_dtype &&
               norms_t.scalar_type() == c.vec_dtype,
           "outputs must have the vectors' dtype " << dtype_name(c.vec_dtype));
  if (c.runs == 0) return;

  const Mat q = from_tensor(q_t), C = from_tensor(coeffs_t);
  const std::vector<double> norms = vec_from_tensor(norms_t);
  const double tol = ortho_tol(c.vec_dtype), mtol = match_tol(c.vec_dtype);
  double dq = 0.0, dc = 0.0, dn = 0.0, unit = 0.0, orth = 0.0, orth_tol = tol, recon = 0.0;
  for (int64_t i = 0; i < c.runs; ++i) {
    // naive CGS2 of the single vector of run i against its own basis
    Mat v(1, c.d);
    for (int64_t j = 0; j < c.d; ++j) v(0, j) = Vst(i, j);
    const Cgs2 ref = naive_cgs2(Qs[static_cast<size_t>(i)], c.n, v);
    const double vnorm = row_norm(v, 0), scale = std::max(1.0, vnorm);
    const double ref_norm = row_norm(ref.W2, 0);
    for (int64_t k = 0; k < c.n; ++k) dc = std::max(dc, std::abs(C(i, k) - ref.C(k, 0)) / scale);
    if (in_span[static_cast<size_t>(i)]) {
      LX_CHECK(norms[static_cast<size_t>(i)] == 0.0,
               "run " << i << " lies in its basis' span: norms[i] must be 0, got " << norms[i]);
    } else {
      LX_CHECK(norms[static_cast<size_t>(i)] > 0.0, "run " << i << ": norms[i] must be > 0");
      dn = std::max(dn, std::abs(norms[static_cast<size_t>(i)] - ref_norm) / scale);
      for (int64_t j = 0; j < c.d; ++j) dq = std::max(dq, std::abs(q(i, j) - ref.W2(0, j) / ref_norm));
    }
    // q[i] unit, orthogonal to basis i; vectors[i] = coeffs[i] Q_i + norms[i] q[i]
    unit = std::max(unit, std::abs(row_norm(q, i) - 1.0));
    const Mat& Qi = Qs[static_cast<size_t>(i)];
    double s2 = 0.0;
    for (int64_t k = 0; k < c.n; ++k) orth = std::max(orth, std::abs(row_dot(Qi, k, q, i)));
    const double defect = stored_defect(Qi, c.n);
    orth_tol = std::max(orth_tol, tol + 4 * defect * defect);
    for (int64_t j = 0; j < c.d; ++j) {
      double x = norms[static_cast<size_t>(i)] * q(i, j);
      for (int64_t k = 0; k < c.n; ++k) x += C(i, k) * Qi(k, j);
      s2 += (x - Vst(i, j)) * (x - Vst(i, j));
    }
    recon = std::max(recon, std::sqrt(s2) / scale);
  }
  check_le("max |coeffs - naive CGS2 coeffs| / ||v||", dc, mtol);
  check_le("max |norms - naive norms| / ||v||", dn, mtol);
  check_le("max |q - naive q|", dq, mtol);
  check_le("max | ||q_i|| - 1 |", unit, tol);
  if (c.n > 0) check_le("max |Q_i q_i|", orth, orth_tol);
  check_le("max_i ||v_i - coeffs_i Q_i - norms_i q_i|| / ||v_i||", recon, tol);
}

// ---- thread-count independence (the CPU kernel promises bitwise-equal results) -------------------
void run_thread_independence() {
  g_case = "block_orthonormalize d=10007 (3 chunks) threads 1 vs 2: bitwise equal";
  std::mt19937_64 gen(77);
  const int64_t d = 10007, n = 6, b = 3;
  const at::Tensor basis = make_basis(n, n, d, 0, at::kFloat, gen);
  const at::Tensor block = to_tensor(randn(b, d, gen), at::kFloat);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  auto one = call_op("block_orthonormalize", basis, block, n);
  at::set_num_threads(std::max(2, threads));
  auto many = call_op("block_orthonormalize", basis, block, n);
  at::set_num_threads(threads);
  LX_CHECK(at::equal(std::get<0>(one), std::get<0>(many)), "q differs between 1 and 2 threads");
  LX_CHECK(at::equal(std::get<1>(one), std::get<1>(many)), "coeffs differ between 1 and 2 threads");
  LX_CHECK(at::equal(std::get<2>(one), std::get<2>(many)), "r differs between 1 and 2 threads");
  // the one-round mode decides on its second round from computed norms: same decision, same bits
  g_case = "block_orthonormalize rounds=1 local_rows=2 d=10007 threads 1 vs 2: bitwise equal";
  at::set_num_threads(1);
  auto one1 = call_op("block_orthonormalize", basis, block, n, -1.0, 1, 2);
  at::set_num_threads(std::max(2, threads));
  auto many1 = call_op("block_orthonormalize", basis, block, n, -1.0, 1, 2);
  at::set_num_threads(threads);
  LX_CHECK(at::equal(std::get<0>(one1), std::get<0>(many1)) &&
               at::equal(std::get<1>(one1), std::get<1>(many1)) &&
               at::equal(std::get<2>(one1), std::get<2>(many1)),
           "rounds=1 results differ between 1 and 2 threads");
}

// ---- error paths: c10::Error whose message names the op and gives the numbers ---------------------
void expect_error(const std::string& what, const std::function<void()>& fn,
                  const std::vector<std::string>& needles) {
  g_case = "error path: " + what;
  try {
    fn();
    LX_CHECK(false, "no exception was thrown");
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (g_verbose) std::cout << "    " << g_case << "  ->  " << msg << "\n";
    for (const std::string& needle : needles)
      LX_CHECK(msg.find(needle) != std::string::npos,
               "message lacks '" << needle << "': " << msg);
  } catch (const std::exception& e) {
    LX_CHECK(false, "threw a non-c10::Error exception: " << e.what());
  }
}

void run_error_paths() {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  expect_error(
      "block_orthonormalize d mismatch",
      [&] { call_op("block_orthonormalize", at::zeros({4, 1009}, f64), at::ones({2, 1000}, f64), 4); },
      {"block_orthonormalize", "1009", "1000"});
  expect_error(
      "block_orthonormalize n_basis > m",
      [&] { call_op("block_orthonormalize", at::zeros({4, 1009}, f64), at::ones({2, 1009}, f64), 5); },
      {"block_orthonormalize", "n_basis = 5", "m = 4"});
  expect_error(
      "block_orthonormalize non-finite basis",
      [&] {
        at::Tensor basis = at::eye(1009, f64).narrow(0, 0, 4).clone();
        basis.index_put_({2, 17}, std::numeric_limits<double>::quiet_NaN());
        call_op("block_orthonormalize", basis, at::ones({2, 1009}, f64), 4);
      },
      {"block_orthonormalize", "non-finite", "n_basis = 4"});
  expect_error(
      "orthogonalize_batched d mismatch",
      [&] { call_op("orthogonalize_batched", at::zeros({3, 4, 1009}, f64), at::ones({3, 1000}, f64), 4); },
      {"orthogonalize_batched", "1009", "1000"});
  expect_error(
      "orthogonalize_batched run-count mismatch",
      [&] { call_op("orthogonalize_batched", at::zeros({3, 4, 1009}, f64), at::ones({2, 1009}, f64), 4); },
      {"orthogonalize_batched", "r = 3", "2 rows"});
}

// ---- the checker itself must be able to fail -----------------------------------------------------
void run_harness_self_test() {
  g_case = "harness self-test";
  const int checks = g_checks, failures = g_failures;
  const bool verbose = g_verbose;
  g_verbose = false;
  std::streambuf* saved = std::cerr.rdbuf(nullptr);  // the deliberate failures stay quiet
  check_le("deliberately too large", 1.0, 0.5);
  check_le("deliberately NaN", std::numeric_limits<double>::quiet_NaN(), 1.0);
  std::cerr.rdbuf(saved);
  g_verbose = verbose;
  const bool caught = g_failures - failures == 2;
  g_checks = checks;
  g_failures = failures;
  LX_CHECK(caught, "check_le let a violated tolerance pass");
}

// Runs one case; an exception thrown by the op is a failed check of that case, not an abort.
template <typename F>
void guarded(F&& run_case) {
  try {
    run_case();
  } catch (const c10::Error& e) {
    LX_CHECK(false, "the op threw: " << e.what_without_backtrace());
  } catch (const std::exception& e) {
    LX_CHECK(false, "the op threw: " << e.what());
  }
}

}  // namespace

int main() {
  const char* v = std::getenv("LANDSCAPE_EXT_TEST_VERBOSE");
  g_verbose = v != nullptr && std::string(v) == "1";
  run_harness_self_test();

  // The ops must be registered by linking the kernel objects (no Python involved).
  for (const char* name : {"landscape_ext::block_orthonormalize", "landscape_ext::orthogonalize_batched"}) {
    g_case = std::string("registration of ") + name;
    auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
    LX_CHECK(handle.has_value(), "schema not registered");
    if (handle) LX_CHECK(handle->hasKernelForDispatchKey(c10::DispatchKey::CPU), "no CPU kernel");
  }
  if (g_failures) {
    std::cerr << "ops are not registered: the kernel objects were not linked in\n";
    return 1;
  }

  const auto f64 = at::kDouble, f32 = at::kFloat, f16 = at::kHalf, bf16 = at::kBFloat16;
  std::vector<BlockCase> block_cases = {
      // d prime, n_basis < m (rows [n:] are NaN and must not be read), every dtype pair
      {1009, 20, 15, 5, f64, f64}, {1009, 20, 15, 5, f32, f32}, {1009, 20, 15, 5, f16, f32},
      {1009, 20, 15, 5, f64, f32}, {1009, 20, 15, 5, f32, f64}, {1009, 20, 15, 5, f16, f64},
      {1009, 20, 15, 5, bf16, f32},
      {1009, 20, 15, 1, f64, f64, Block::kRandom, 0, 2},   // b = 1
      {1009, 20, 15, 1, f16, f32, Block::kRandom, 0, 3},
      {1009, 8, 0, 5, f64, f64, Block::kRandom, 0, 4},     // n_basis = 0
      {1009, 8, 0, 5, f32, f32, Block::kRandom, 0, 5},
      {1009, 1, 1, 5, f64, f64, Block::kRandom, 0, 6},     // n_basis = 1
      {1009, 1, 1, 5, f16, f32, Block::kRandom, 0, 7},
      {1009, 12, 12, 5, f32, f32, Block::kRandom, 13, 8},  // row stride 1022 (a view)
      {7, 3, 3, 4, f64, f64, Block::kRandom, 0, 9},        // n_basis + b = d, d < one SIMD lane group
      {7, 3, 3, 4, f32, f32, Block::kRandom, 0, 10},
      {10007, 33, 31, 8, f16, f32, Block::kRandom, 0, 11}, // 3 chunks, several column tiles
      {10007, 33, 31, 8, f64, f64, Block::kRandom, 0, 12},
      {1009, 20, 0, 0, f32, f32, Block::kRandom, 0, 13},   // empty block
      // rank-deficient blocks: rows 2 (= 2 row0 - row1), 3 (in the basis' span), 4 (zero)
      {301, 10, 10, 6, f64, f64, Block::kRankDeficient, 0, 21},
      {1009, 12, 10, 6, f64, f64, Block::kRankDeficient, 0, 22},
      {1009, 12, 10, 6, f32, f32, Block::kRankDeficient, 0, 23},
      {1009, 12, 10, 6, f16, f32, Block::kRankDeficient, 0, 24},
      {1009, 12, 10, 6, f64, f32, Block::kRankDeficient, 0, 25},
      // one round over the basis (a second only where a row lost > 1 - 1/sqrt(2) of its
      // norm), with and without the newest rows projected out first
      {1009, 20, 15, 5, f64, f64, Block::kRandom, 0, 31, 1, 0},
      {1009, 20, 15, 5, f32, f32, Block::kRandom, 0, 32, 1, 4},
      {1009, 20, 15, 5, f16, f32, Block::kRandom, 0, 33, 1, 15},
      {10007, 33, 31, 8, f64, f64, Block::kRandom, 0, 34, 1, 16},
      {1009, 12, 10, 6, f32, f32, Block::kRankDeficient, 0, 35, 1, 2},
      {1009, 12, 10, 6, f64, f64, Block::kRankDeficient, 0, 36, 2, 3},
  };
  for (const BlockCase& c : block_cases) guarded([&] { run_block_case(c); });

  std::vector<BatchedCase> batched_cases = {
      {5, 12, 1031, 9, f64, f64}, {5, 12, 1031, 9, f32, f32}, {5, 12, 1031, 9, f16, f32},
      {5, 12, 1031, 9, f16, f64}, {5, 12, 1031, 9, f64, f32}, {5, 12, 1031, 9, bf16, f32},
      {1, 1, 17, 1, f64, f64, false, 2}, {3, 6, 64, 0, f32, f32, false, 3},
      {4, 6, 1009, 5, f64, f64, true, 4}, {4, 6, 1009, 5, f32, f32, true, 5},
      {4, 6, 1009, 5, f64, f32, true, 9}, {4, 6, 1009, 5, f16, f32, true, 10},
      {3, 6, 1009, 0, f64, f64, false, 6}, {0, 4, 50, 2, f32, f32, false, 7},
      {2, 8, 10007, 8, f16, f32, false, 8},
  };
  for (const BatchedCase& c : batched_cases) guarded([&] { run_batched_case(c); });

  guarded(run_thread_independence);
  run_error_paths();

  std::cout << "krylov_cpu_test: " << g_checks << " checks, " << g_failures << " failed ("
            << block_cases.size() << " block_orthonormalize cases, " << batched_cases.size()
            << " orthogonalize_batched cases, torch threads " << at::get_num_threads() << ")\n";
  return g_failures == 0 ? 0 : 1;
}
