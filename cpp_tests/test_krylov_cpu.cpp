// C++ test of the krylov CPU kernels (csrc/cpu/krylov.cpp), run by ctest (see CMakeLists.txt).
//
// The C++ side of the krylov family is now the three memory-bound passes over the basis
// (csrc/krylov.h); the drivers block_orthonormalize / orthogonalize_batched are Python
// (landscape_ext/_krylov_driver.py) and are tested by pytest. This test calls the passes the way
// the drivers reach them, as the registered ops landscape_ext::_krylov_coeffs,
// ::_krylov_project_coeffs and ::_krylov_project_gram (registered by the static initializers of
// the kernel object files), through torch's stable C ABI (torch_call_dispatcher): it is built
// like the kernels, with csrc/stable_api.h and TORCH_TARGET_VERSION, and includes no ATen.
// Results are checked against naive loops written here: plain nested for-loops over
// std::vector<double>. Only dtype conversions (double <-> storage dtype) use torch.
//
// Checked: each pass against its float64 reference for every basis/accumulation dtype pair,
// batched runs, row-strided and offset basis views (rows [n:] and the padding are NaN and must not
// be read), a transposed coeffs argument, inputs left unmodified, the three passes chained as the
// drivers chain them (CGS2: the remainder is orthogonal to the basis), bitwise-equal results with
// 1 and 2 torch threads (the test re-runs itself with OMP_NUM_THREADS=1 and =2), and the error
// paths of the kernels' own argument checks (their text is checked where the running torch's
// shim exposes it: torch_exception_get_what_without_backtrace, torch >= 2.13).
//
// Exit status: 0 when every check passes, 1 otherwise. LANDSCAPE_EXT_TEST_VERBOSE=1 prints every
// measured error next to its tolerance.
#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "krylov.h"
#include "stable_api.h"

namespace {

using landscape_ext::DeviceType;
using landscape_ext::ScalarType;
using landscape_ext::Tensor;
using landscape_ext::kBFloat16;
using landscape_ext::kDouble;
using landscape_ext::kFloat;
using landscape_ext::kHalf;
using landscape_ext::kLong;

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

// ---- dense row-major batches of matrices of doubles: (R, rows, cols) --------------------------
struct Batch {
  int64_t R = 0, rows = 0, cols = 0;
  std::vector<double> v;
  Batch() = default;
  Batch(int64_t r, int64_t m, int64_t c, double fill = 0.0)
      : R(r), rows(m), cols(c), v(static_cast<size_t>(r * m * c), fill) {}
  double& operator()(int64_t r, int64_t i, int64_t j) {
    return v[static_cast<size_t>((r * rows + i) * cols + j)];
  }
  double operator()(int64_t r, int64_t i, int64_t j) const {
    return v[static_cast<size_t>((r * rows + i) * cols + j)];
  }
};

Batch randn(int64_t R, int64_t rows, int64_t cols, std::mt19937_64& gen) {
  std::normal_distribution<double> normal(0.0, 1.0);
  Batch a(R, rows, cols);
  for (double& x : a.v) x = normal(gen);
  return a;
}

// sum_j A[r, i, j] B[r, k, j]
double row_dot(const Batch& A, int64_t r, int64_t i, const Batch& B, int64_t k) {
  double s = 0.0;
  for (int64_t j = 0; j < A.cols; ++j) s += A(r, i, j) * B(r, k, j);
  return s;
}

double row_norm(const Batch& A, int64_t r, int64_t i) { return std::sqrt(row_dot(A, r, i, A, i)); }

// Per run, n orthonormal rows (modified Gram-Schmidt, twice, of a Gaussian matrix).
Batch orthonormal_rows(int64_t R, int64_t n, int64_t d, std::mt19937_64& gen) {
  Batch q = randn(R, n, d, gen);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t k = 0; k < n; ++k) {
      for (int round = 0; round < 2; ++round) {
        for (int64_t i = 0; i < k; ++i) {
          const double c = row_dot(q, r, i, q, k);
          for (int64_t j = 0; j < d; ++j) q(r, k, j) -= c * q(r, i, j);
        }
      }
      const double nrm = row_norm(q, r, k);
      for (int64_t j = 0; j < d; ++j) q(r, k, j) /= nrm;
    }
  }
  return q;
}

// ---- conversions (the only torch used on the reference side) -----------------------------------
landscape_ext::Device cpu() { return landscape_ext::Device(DeviceType::CPU); }

Tensor to_tensor(const Batch& a, ScalarType dtype) {
  Tensor t = landscape_ext::empty({a.R, a.rows, a.cols}, kDouble, cpu());
  if (!a.v.empty()) std::memcpy(t.data_ptr(), a.v.data(), a.v.size() * sizeof(double));
  return dtype == kDouble ? t : landscape_ext::to_dtype(t, dtype);
}

Batch from_tensor(const Tensor& t) {
  if (t.dim() != 3) throw std::runtime_error("from_tensor: expected a 3-D tensor");
  const Tensor c = contiguous(landscape_ext::to_dtype(t, kDouble));
  Batch a(c.size(0), c.size(1), c.size(2));
  if (!a.v.empty()) std::memcpy(a.v.data(), c.data_ptr(), a.v.size() * sizeof(double));
  return a;
}

// The first n rows of each run (as stored).
Batch first_rows(const Batch& a, int64_t n) {
  Batch out(a.R, n, a.cols);
  for (int64_t r = 0; r < a.R; ++r)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < a.cols; ++j) out(r, i, j) = a(r, i, j);
  return out;
}

bool same_bits(const Batch& a, const Batch& b) {
  return a.R == b.R && a.rows == b.rows && a.cols == b.cols &&
         std::memcmp(a.v.data(), b.v.data(), a.v.size() * sizeof(double)) == 0;
}

std::string shape_of(const Tensor& t) { return landscape_ext::shape_str(t); }

bool has_shape(const Tensor& t, std::initializer_list<int64_t> s) {
  if (t.dim() != static_cast<int64_t>(s.size())) return false;
  int64_t i = 0;
  for (int64_t e : s)
    if (t.size(i++) != e) return false;
  return true;
}

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Double: return "f64";
    case ScalarType::Float: return "f32";
    case ScalarType::Half: return "f16";
    case ScalarType::BFloat16: return "bf16";
    default: return "?";
  }
}

// ---- naive references ---------------------------------------------------------------------------
// C (R, n, b) = Q[:, :n] W^T
Batch naive_coeffs(const Batch& Q, int64_t n, const Batch& W) {
  Batch C(W.R, n, W.rows);
  for (int64_t r = 0; r < W.R; ++r)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < W.rows; ++k) C(r, i, k) = row_dot(Q, r, i, W, k);
  return C;
}

// out (R, b, d) = W - C^T Q[:, :n]
Batch naive_subtract(const Batch& Q, int64_t n, const Batch& W, const Batch& C) {
  Batch out = W;
  for (int64_t r = 0; r < W.R; ++r)
    for (int64_t k = 0; k < W.rows; ++k)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < W.cols; ++j) out(r, k, j) -= C(r, i, k) * Q(r, i, j);
  return out;
}

// ---- error measures (relative to the magnitudes the sums are made of) --------------------------
// max |got - ref| / (||A_i|| ||B_k||): a dot product's error is bounded by a multiple of
// sum_j |a_j b_j| <= ||a|| ||b|| (Cauchy-Schwarz).
double dot_error(const Batch& got, const Batch& ref, const Batch& A, const Batch& B) {
  double worst = 0.0;
  for (int64_t r = 0; r < ref.R; ++r)
    for (int64_t i = 0; i < ref.rows; ++i)
      for (int64_t k = 0; k < ref.cols; ++k) {
        const double scale = row_norm(A, r, i) * row_norm(B, r, k);
        const double diff = std::abs(got(r, i, k) - ref(r, i, k));
        worst = std::max(worst, scale > 0.0 ? diff / scale : (diff == 0.0 ? 0.0 : diff));
      }
  return worst;
}

// max over elements of |got - ref| / (|W| + sum_i |C_ik Q_ij|): the subtraction's own bound.
double subtract_error(const Batch& got, const Batch& ref, const Batch& Q, int64_t n,
                      const Batch& W, const Batch& C) {
  double worst = 0.0;
  for (int64_t r = 0; r < W.R; ++r)
    for (int64_t k = 0; k < W.rows; ++k)
      for (int64_t j = 0; j < W.cols; ++j) {
        double scale = std::abs(W(r, k, j));
        for (int64_t i = 0; i < n; ++i) scale += std::abs(C(r, i, k) * Q(r, i, j));
        const double diff = std::abs(got(r, k, j) - ref(r, k, j));
        worst = std::max(worst, scale > 0.0 ? diff / scale : (diff == 0.0 ? 0.0 : diff));
      }
  return worst;
}

// ||I - Q Q^T||_F of Q[:n] as stored, worst run (half storage leaves it ~ eps(half)); after two
// projection rounds the component left along the basis is of order defect^2.
double stored_defect(const Batch& Q, int64_t n) {
  double worst = 0.0;
  for (int64_t r = 0; r < Q.R; ++r) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < n; ++k) {
        const double e = row_dot(Q, r, i, Q, k) - (i == k ? 1.0 : 0.0);
        s += e * e;
      }
    worst = std::max(worst, std::sqrt(s));
  }
  return worst;
}

// Agreement with the float64 loops, per accumulation dtype (observed errors are ~100x smaller;
// a wrong index, chunk or tile gives errors of order 1).
double match_tol(ScalarType acc) { return acc == kDouble ? 1e-13 : 2e-5; }
// Orthogonality of the CGS2 remainder to the stored basis, relative to the block row's norm.
double ortho_tol(ScalarType acc) { return acc == kDouble ? 1e-12 : 2e-5; }

// ---- the ops, through the dispatcher of torch's stable C ABI ------------------------------------
// torch >= 2.13 keeps the text of the last exception a shim call caught; older shims do not
// export these functions (looked up at run time, so the test runs on every torch >= 2.10).
using ExceptionTextFn = const char* (*)();
ExceptionTextFn exception_text_fn() {
  static const ExceptionTextFn fn = reinterpret_cast<ExceptionTextFn>(
      dlsym(RTLD_DEFAULT, "torch_exception_get_what_without_backtrace"));
  return fn;
}

// Calls landscape_ext::<name>; on failure throws std::runtime_error with the op's error text
// when the shim exposes it.
template <size_t N>
void call(const char* name, std::array<StableIValue, N>& stack) {
  const std::string op = std::string("landscape_ext::") + name;
  if (torch_call_dispatcher(op.c_str(), "", stack.data(), TORCH_ABI_VERSION) != TORCH_SUCCESS) {
    const ExceptionTextFn text = exception_text_fn();
    const char* what = text != nullptr ? text() : nullptr;
    throw std::runtime_error(what != nullptr ? std::string(what)
                                             : op + " failed (no error text in this torch)");
  }
}

using landscape_ext::from_ivalue;
using landscape_ext::to_ivalue;

Tensor op_coeffs(const Tensor& basis, const Tensor& W, int64_t n) {
  std::array<StableIValue, 3> stack{to_ivalue(basis), to_ivalue(W), to_ivalue(n)};
  call("_krylov_coeffs", stack);
  return from_ivalue<Tensor>(stack[0]);
}

// _krylov_project_coeffs or _krylov_project_gram: (out, coeffs_next or gram)
std::pair<Tensor, Tensor> op_project(const char* name, const Tensor& basis, const Tensor& W,
                                     const Tensor& C, int64_t n) {
  std::array<StableIValue, 4> stack{to_ivalue(basis), to_ivalue(W), to_ivalue(C), to_ivalue(n)};
  call(name, stack);
  Tensor out = from_ivalue<Tensor>(stack[0]);
  Tensor second = from_ivalue<Tensor>(stack[1]);
  return {out, second};
}

// ---- the basis tensors the drivers pass ----------------------------------------------------------
struct PassCase {
  int64_t R, m, n, d, b;
  ScalarType basis_dtype, acc;
  int64_t row_pad = 0;  // basis is a view with row stride d + row_pad (padding is NaN)
  int64_t row_off = 0;  // basis starts at row row_off of a taller buffer (rows before are NaN)
  bool c_transposed = false;  // coeffs passed as a transposed (non-contiguous) view
  uint64_t seed = 1;
};

std::string describe(const PassCase& c) {
  std::ostringstream s;
  s << "R=" << c.R << " m=" << c.m << " n=" << c.n << " d=" << c.d << " b=" << c.b
    << " basis=" << dtype_name(c.basis_dtype) << " acc=" << dtype_name(c.acc)
    << (c.row_pad ? " row-strided" : "") << (c.row_off ? " row-offset" : "")
    << (c.c_transposed ? " coeffs-transposed" : "");
  return s.str();
}

// (R, m, d): per run n orthonormal rows, then m - n rows of NaN (only rows [:n] may be read),
// optionally a view into a wider buffer (NaN columns) starting some rows down (NaN rows).
Tensor make_basis(const PassCase& c, std::mt19937_64& gen) {
  const Batch q = orthonormal_rows(c.R, c.n, c.d, gen);
  Batch full(c.R, c.row_off + c.m, c.d + c.row_pad, std::numeric_limits<double>::quiet_NaN());
  for (int64_t r = 0; r < c.R; ++r)
    for (int64_t i = 0; i < c.n; ++i)
      for (int64_t j = 0; j < c.d; ++j) full(r, c.row_off + i, j) = q(r, i, j);
  Tensor t = to_tensor(full, c.basis_dtype);
  t = landscape_ext::narrow(t, 2, 0, c.d);
  return landscape_ext::narrow(t, 1, c.row_off, c.m);
}

// coeffs (R, n, b) in the accumulation dtype; a transposed view of an (R, b, n) buffer if asked
Tensor make_coeffs(const Batch& C, ScalarType acc, bool transposed) {
  if (!transposed) return to_tensor(C, acc);
  Batch Ct(C.R, C.cols, C.rows);
  for (int64_t r = 0; r < C.R; ++r)
    for (int64_t i = 0; i < C.rows; ++i)
      for (int64_t k = 0; k < C.cols; ++k) Ct(r, k, i) = C(r, i, k);
  return transpose(to_tensor(Ct, acc), 1, 2);
}

void check_output(const Tensor& t, std::initializer_list<int64_t> shape, ScalarType acc,
                  const char* what) {
  LX_CHECK(has_shape(t, shape), what << " has shape " << shape_of(t));
  LX_CHECK(t.scalar_type() == acc, what << " must have the accumulation dtype " << dtype_name(acc)
                                        << ", got " << dtype_name(t.scalar_type()));
  LX_CHECK(t.is_cpu(), what << " must be on the CPU");
}

// ---- one case: each pass alone, then the three chained as CGS2 ------------------------------------
void run_pass_case(const PassCase& c) {
  g_case = describe(c);
  if (g_verbose) std::cout << "  " << g_case << "\n";
  std::mt19937_64 gen(c.seed);
  const Tensor basis = make_basis(c, gen);
  const Batch Q = first_rows(from_tensor(basis), c.n);  // rows [:n] as stored
  const Tensor block = to_tensor(randn(c.R, c.b, c.d, gen), c.acc);
  const Batch W = from_tensor(block);                   // the block as stored
  const double mtol = match_tol(c.acc);

  // pass 1: C = Q W^T
  const Tensor C1_t = op_coeffs(basis, block, c.n);
  check_output(C1_t, {c.R, c.n, c.b}, c.acc, "_krylov_coeffs C");
  if (has_shape(C1_t, {c.R, c.n, c.b})) {
    check_le("_krylov_coeffs: max |C - Q W^T| / (|q| |w|)",
             dot_error(from_tensor(C1_t), naive_coeffs(Q, c.n, W), Q, W), mtol);
  }

  // passes 2 and 3 from a given C (the float64 C1 rounded to acc), each against its reference
  const Tensor C_in = make_coeffs(naive_coeffs(Q, c.n, W), c.acc, c.c_transposed);
  const Batch C = from_tensor(C_in);
  const Batch out_ref = naive_subtract(Q, c.n, W, C);
  for (const char* name : {"_krylov_project_coeffs", "_krylov_project_gram"}) {
    const bool gram = std::strcmp(name, "_krylov_project_gram") == 0;
    const auto res = op_project(name, basis, block, C_in, c.n);
    check_output(res.first, {c.R, c.b, c.d}, c.acc, "out");
    check_output(res.second, {c.R, gram ? c.b : c.n, c.b}, c.acc, gram ? "gram" : "coeffs_next");
    if (!has_shape(res.first, {c.R, c.b, c.d}) ||
        !has_shape(res.second, {c.R, gram ? c.b : c.n, c.b}))
      continue;
    const Batch out = from_tensor(res.first);
    const std::string what = std::string(name) + ": ";
    check_le((what + "max |out - (W - C^T Q)| / (|W| + |C||Q|)").c_str(),
             subtract_error(out, out_ref, Q, c.n, W, C), mtol);
    // the second output from the kernel's own out, as stored
    const Batch second = from_tensor(res.second);
    if (gram) {
      check_le((what + "max |G - out out^T| / (|out_k| |out_l|)").c_str(),
               dot_error(second, naive_coeffs(out, c.b, out), out, out), mtol);
    } else {
      check_le((what + "max |C_next - Q out^T| / (|q| |out|)").c_str(),
               dot_error(second, naive_coeffs(Q, c.n, out), Q, out), mtol);
    }
  }
  // the ops mutate nothing
  LX_CHECK(same_bits(from_tensor(block), W), "block was modified");
  LX_CHECK(same_bits(from_tensor(C_in), C), "coeffs were modified");
  LX_CHECK(same_bits(first_rows(from_tensor(basis), c.n), Q), "basis was modified");

  // chained as the drivers chain them: C1, (W1, C2), (W2, G); W2 orthogonal to the basis
  const auto p2 = op_project("_krylov_project_coeffs", basis, block, C1_t, c.n);
  const auto p3 = op_project("_krylov_project_gram", basis, p2.first, p2.second, c.n);
  const Batch W2 = from_tensor(p3.first);
  double orth = 0.0;
  for (int64_t r = 0; r < c.R; ++r)
    for (int64_t i = 0; i < c.n; ++i)
      for (int64_t k = 0; k < c.b; ++k)
        orth = std::max(orth, std::abs(row_dot(Q, r, i, W2, k)) / row_norm(W, r, k));
  const double defect = stored_defect(Q, c.n);
  check_le("CGS2 chain: max |Q W2^T| / |w|", orth, ortho_tol(c.acc) + 4 * defect * defect);
}

// ---- thread-count independence (the kernels promise bitwise-equal results) ---------------------
// FNV-1a over the bytes of every output of the three passes on cases with several chunks and runs.
uint64_t fnv1a(uint64_t h, const Tensor& t) {
  const Tensor c = contiguous(t);
  const unsigned char* p = static_cast<const unsigned char*>(c.data_ptr());
  const size_t bytes = static_cast<size_t>(c.numel()) * c.element_size();
  for (size_t e = 0; e < bytes; ++e) h = (h ^ p[e]) * 1099511628211ull;
  return h;
}

uint64_t pass_digest() {
  uint64_t h = 14695981039346656037ull;
  const PassCase cases[] = {{3, 33, 31, 10007, 8, kHalf, kFloat, 0, 0, false, 77},
                            {2, 12, 9, 10007, 3, kDouble, kDouble, 0, 0, false, 78},
                            {1, 200, 200, 4099, 5, kFloat, kFloat, 0, 0, false, 79}};
  for (const PassCase& c : cases) {
    std::mt19937_64 gen(c.seed);
    const Tensor basis = make_basis(c, gen);
    const Tensor block = to_tensor(randn(c.R, c.b, c.d, gen), c.acc);
    const Tensor C1 = op_coeffs(basis, block, c.n);
    const auto p2 = op_project("_krylov_project_coeffs", basis, block, C1, c.n);
    const auto p3 = op_project("_krylov_project_gram", basis, p2.first, p2.second, c.n);
    for (const Tensor& t : {C1, p2.first, p2.second, p3.first, p3.second}) h = fnv1a(h, t);
  }
  return h;
}

// "threads <n> digest <hex>" of a child run of this executable under OMP_NUM_THREADS=threads.
bool child_digest(int threads, uint32_t* got_threads, uint64_t* digest) {
  char self[4096];
  const ssize_t len = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (len <= 0) return false;
  self[len] = '\0';
  const std::string cmd = "OMP_NUM_THREADS=" + std::to_string(threads) + " MKL_NUM_THREADS=" +
                          std::to_string(threads) + " '" + self + "' --thread-digest";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return false;
  unsigned int t = 0;
  unsigned long long d = 0;
  const int read = std::fscanf(pipe, "threads %u digest %llx", &t, &d);
  const int rc = pclose(pipe);
  *got_threads = t;
  *digest = d;
  return read == 2 && rc == 0;
}

void run_thread_independence() {
  g_case = "passes d=10007 (3 chunks) / d=4099 (several tiles), threads 1 vs 2: bitwise equal";
  const uint64_t here = pass_digest();
  LX_CHECK(here == pass_digest(), "two runs in one process differ");
  uint32_t t1 = 0, t2 = 0;
  uint64_t d1 = 0, d2 = 0;
  const bool ok1 = child_digest(1, &t1, &d1), ok2 = child_digest(2, &t2, &d2);
  LX_CHECK(ok1 && ok2, "a child run with OMP_NUM_THREADS=1/2 failed");
  if (!(ok1 && ok2)) return;
  LX_CHECK(t1 == 1 && t2 == 2, "the children ran with " << t1 << " and " << t2
                                   << " torch threads, not 1 and 2 (OMP_NUM_THREADS ignored?)");
  LX_CHECK(d1 == d2, "results differ between 1 and 2 threads");
  LX_CHECK(d1 == here, "results differ between 1 thread and this process's "
                           << torch::stable::get_num_threads() << " threads");
  if (g_verbose)
    std::cout << "    digests: 1 thread " << std::hex << d1 << ", 2 threads " << d2 << ", "
              << std::dec << torch::stable::get_num_threads() << " threads " << std::hex << here
              << std::dec << "\n";
}

// ---- error paths: the kernels' own argument checks (the drivers check before them) -------------
void expect_error(const std::string& what, const std::function<void()>& fn,
                  const std::vector<std::string>& needles) {
  g_case = "error path: " + what;
  try {
    fn();
    LX_CHECK(false, "no exception was thrown");
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    if (g_verbose) std::cout << "    " << g_case << "  ->  " << msg << "\n";
    if (exception_text_fn() == nullptr) return;  // this torch's shim keeps no error text
    for (const std::string& needle : needles)
      LX_CHECK(msg.find(needle) != std::string::npos, "message lacks '" << needle << "': " << msg);
  }
}

Tensor zeros3(int64_t a, int64_t b, int64_t c, ScalarType dtype) {
  return to_tensor(Batch(a, b, c), dtype);
}

void run_error_paths() {
  const Tensor basis = zeros3(1, 4, 64, kFloat), block = zeros3(1, 2, 64, kFloat);
  const Tensor C = zeros3(1, 4, 2, kFloat);
  expect_error("n = 0", [&] { op_coeffs(basis, block, 0); },
               {"_krylov_coeffs", "n = 0", "m = 4"});
  expect_error("n > m", [&] { op_coeffs(basis, block, 5); },
               {"_krylov_coeffs", "n = 5", "m = 4"});
  expect_error("d mismatch", [&] { op_coeffs(basis, zeros3(1, 2, 63, kFloat), 4); },
               {"_krylov_coeffs", "[1, 4, 64]", "[1, 2, 63]", "differ in R or d"});
  expect_error("R mismatch", [&] { op_coeffs(basis, zeros3(2, 2, 64, kFloat), 4); },
               {"_krylov_coeffs", "differ in R or d"});
  expect_error("2-D basis",
               [&] { op_coeffs(torch::stable::select(basis, 0, 0), block, 4); },
               {"_krylov_coeffs", "must be 3-D", "[4, 64]"});
  expect_error("non-contiguous block",
               [&] { op_coeffs(basis, transpose(zeros3(1, 64, 2, kFloat), 1, 2), 4); },
               {"_krylov_coeffs", "block must be contiguous"});
  expect_error("basis strided along d",
               [&] { op_coeffs(transpose(zeros3(1, 64, 4, kFloat), 1, 2), block, 4); },
               {"_krylov_coeffs", "unit stride along d"});
  expect_error("float16 block", [&] { op_coeffs(basis, zeros3(1, 2, 64, kHalf), 4); },
               {"block must be float32 or float64", "Half"});
  expect_error("float64 basis, float32 block",
               [&] { op_coeffs(zeros3(1, 4, 64, kDouble), block, 4); },
               {"a float64 basis needs a float64 block"});
  expect_error("int64 basis", [&] { op_coeffs(zeros3(1, 4, 64, kLong), block, 4); },
               {"unsupported basis dtype", "Long"});
  expect_error("coeffs shape",
               [&] { op_project("_krylov_project_gram", basis, block, zeros3(1, 2, 4, kFloat), 4); },
               {"_krylov_project_gram", "coeffs must be (R, n, b) = (1, 4, 2)", "[1, 2, 4]"});
  expect_error("coeffs dtype",
               [&] { op_project("_krylov_project_coeffs", basis, block, zeros3(1, 4, 2, kDouble), 4); },
               {"_krylov_project_coeffs", "in the block's dtype", "Double"});
  // and a valid call right after the failures still works
  g_case = "valid call after errors";
  const auto ok = op_project("_krylov_project_gram", basis, block, C, 4);
  LX_CHECK(has_shape(ok.second, {1, 2, 2}), "gram has shape " << shape_of(ok.second));
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
  // the error measures see a wrong result (square: dot_error reads ref.rows rows of A and
  // ref.cols rows of B; a 2 x 3 batch as both read past B's rows, undefined behaviour that
  // passed or failed with the heap's contents)
  Batch a(1, 3, 3, 1.0), b = a;
  b(0, 1, 2) = 1.5;
  check_le("deliberately different", dot_error(a, b, a, a), 1e-3);
  std::cerr.rdbuf(saved);
  g_verbose = verbose;
  const bool caught = g_failures - failures == 3;
  g_checks = checks;
  g_failures = failures;
  LX_CHECK(caught, "check_le let a violated tolerance pass");
}

// Runs one case; an exception thrown by an op is a failed check of that case, not an abort.
template <typename F>
void guarded(F&& run_case) {
  try {
    run_case();
  } catch (const std::exception& e) {
    LX_CHECK(false, "an op threw: " << e.what());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--thread-digest") {
    // the child of run_thread_independence
    try {
      const uint64_t d = pass_digest();
      std::printf("threads %u digest %llx\n", torch::stable::get_num_threads(),
                  static_cast<unsigned long long>(d));
      return 0;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "--thread-digest: %s\n", e.what());
      return 1;
    }
  }
  const char* v = std::getenv("LANDSCAPE_EXT_TEST_VERBOSE");
  g_verbose = v != nullptr && std::string(v) == "1";
  run_harness_self_test();

  // The ops must be registered, with a CPU kernel, by linking the kernel objects (no Python).
  {
    const int failures_before = g_failures;  // (a failed self-test is not a registration failure)
    const Tensor basis = zeros3(1, 2, 8, kFloat), block = zeros3(1, 1, 8, kFloat);
    const Tensor C = zeros3(1, 2, 1, kFloat);
    for (const char* name : {"_krylov_coeffs", "_krylov_project_coeffs", "_krylov_project_gram"}) {
      g_case = std::string("registration of landscape_ext::") + name;
      try {
        if (std::strcmp(name, "_krylov_coeffs") == 0) {
          op_coeffs(basis, block, 2);
        } else {
          op_project(name, basis, block, C, 2);
        }
        LX_CHECK(true, "");
      } catch (const std::exception& e) {
        LX_CHECK(false, "calling it failed: " << e.what());
      }
    }
    if (g_failures > failures_before) {
      std::cerr << "the krylov pass ops are not registered for the CPU: the kernel objects were "
                   "not linked in\n";
      return 1;
    }
  }
  LX_CHECK(landscape_ext::krylov::num_chunks(10007) == 3 &&
               landscape_ext::krylov::num_chunks(4099) == 2,
           "the multi-chunk cases below no longer span several chunks: adjust their d");

  const ScalarType f64 = kDouble, f32 = kFloat, f16 = kHalf, bf16 = kBFloat16;
  const std::vector<PassCase> cases = {
      // d prime, n < m (rows [n:] are NaN and must not be read), every dtype pair
      {1, 20, 15, 1009, 5, f64, f64}, {1, 20, 15, 1009, 5, f32, f32},
      {1, 20, 15, 1009, 5, f16, f32}, {1, 20, 15, 1009, 5, bf16, f32},
      {1, 20, 15, 1009, 5, f32, f64}, {1, 20, 15, 1009, 5, f16, f64},
      {1, 20, 15, 1009, 5, bf16, f64},
      // b = 15: block rows in groups of 8 + 4 + 2 + 1; n even (rows in pairs)
      {1, 16, 16, 1009, 15, f32, f32, 0, 0, false, 2}, {1, 16, 16, 1009, 15, f64, f64, 0, 0, false, 3},
      // n = 1 (an odd row paired with itself), b = 1
      {1, 1, 1, 1009, 3, f64, f64, 0, 0, false, 4}, {1, 4, 1, 1009, 1, f16, f32, 0, 0, false, 5},
      // d < one SIMD vector (tails only)
      {1, 3, 3, 7, 4, f64, f64, 0, 0, false, 6}, {1, 3, 3, 7, 4, f32, f32, 0, 0, false, 7},
      // several chunks (d = 10007: 3), several tiles per chunk (n = 200 float64: 192 columns)
      {1, 33, 31, 10007, 8, f16, f32, 0, 0, false, 8}, {1, 33, 31, 10007, 8, f64, f64, 0, 0, false, 9},
      {1, 200, 200, 4099, 3, f64, f64, 0, 0, false, 10},
      // batched runs (orthogonalize_batched: b = 1)
      {3, 12, 9, 1031, 1, f64, f64, 0, 0, false, 11}, {3, 12, 9, 1031, 1, f16, f32, 0, 0, false, 12},
      {4, 6, 5, 10007, 2, f32, f32, 0, 0, false, 13}, {3, 12, 9, 1031, 1, bf16, f64, 0, 0, false, 14},
      // basis views: row stride d + 13 (NaN padding), rows starting at row 3 / 4 of a buffer
      {2, 12, 12, 1009, 5, f32, f32, 13, 3, false, 15}, {1, 10, 7, 1009, 3, f64, f64, 0, 4, false, 16},
      {2, 12, 10, 1009, 5, f16, f32, 7, 0, false, 17},
      // coeffs given as a transposed view
      {1, 20, 15, 1009, 5, f32, f32, 0, 0, true, 18}, {2, 8, 6, 301, 4, f64, f64, 0, 0, true, 19},
  };
  for (const PassCase& c : cases) guarded([&] { run_pass_case(c); });

  guarded(run_thread_independence);
  guarded(run_error_paths);

  std::cout << "krylov_cpu_test: " << g_checks << " checks, " << g_failures << " failed ("
            << cases.size() << " pass cases, torch threads " << torch::stable::get_num_threads()
            << ", error text " << (exception_text_fn() != nullptr ? "checked" : "not available")
            << ")\n";
  return g_failures == 0 ? 0 : 1;
}
