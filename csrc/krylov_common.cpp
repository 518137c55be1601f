// krylov op family: argument checks and the device-agnostic drivers (see krylov.h).
// The heavy passes over the basis are the backend's; everything here touches only b x b
// matrices or, on the rare rank-deficient path, one block row at a time.
#include <ATen/ATen.h>
#include "krylov.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "checks.h"

namespace landscape_ext {
namespace krylov {
namespace {

double unit_roundoff(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return std::numeric_limits<double>::epsilon();
    case at::kFloat: return std::numeric_limits<float>::epsilon();
    case at::kHalf: return 9.765625e-4;      // 2^-10
    case at::kBFloat16: return 7.8125e-3;    // 2^-7
    default: return std::numeric_limits<float>::epsilon();
  }
}

// The row-stride-only layout the passes accept: innermost stride 1. A basis that is
// transposed or strided in d is copied once (a user-facing convenience, not the hot path).
at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.numel() == 0 || t.stride(-1) == 1) ? t : t.contiguous();
}

struct Projected {
  at::Tensor W2;  // (R, b, d) remainder after two rounds
  at::Tensor C;   // (R, n, b) total coefficients C1 + C2
  at::Tensor G;   // (R, b, b) Gram matrix of W2
};

// First-pass coefficients C1 = basis[:, :n] W^T, checked finite. `basis` may be a view whose
// row 0 is row `first_row` of the caller's basis (named in the error).
at::Tensor first_coeffs(const Passes& passes, const at::Tensor& basis, const at::Tensor& W,
                        int64_t n, const char* op, const char* basis_name,
                        int64_t first_row = 0) {
  const int64_t R = W.size(0);
  at::Tensor C1 = passes.coeffs(basis, W, n);
  // W was checked finite, so a non-finite coefficient can only come from the basis.
  at::Tensor bad = C1.isfinite().logical_not().flatten(1).any(1);
  if (bad.any().item<bool>()) {
    const int64_t first = bad.nonzero().view(-1)[0].item<int64_t>();
    const std::string rows =
        first_row == 0 ? "its first n_basis = " + std::to_string(n) + " rows"
                       : "rows [" + std::to_string(first_row) + ", " +
                             std::to_string(first_row + n) + ") (local_rows)";
    TORCH_CHECK(false, op, ": ", basis_name, " has non-finite values in ", rows,
                (R > 1 ? " (run " + std::to_string(first) + ")" : std::string()));
  }
  return C1;
}

// CGS2 of W (R, b, d) against basis[:, :n] in three passes.
Projected project_twice(const Passes& passes, const at::Tensor& basis, const at::Tensor& W,
                        int64_t n, const char* op, const char* basis_name) {
  const int64_t R = W.size(0), b = W.size(1);
  if (n == 0) {
    return {W, at::zeros({R, 0, b}, W.options()), at::bmm(W, W.transpose(1, 2))};
  }
  at::Tensor C1 = first_coeffs(passes, basis, W, n, op, basis_name);
  at::Tensor W1, C2, W2, G;
  std::tie(W1, C2) = passes.project_coeffs(basis, W, C1, n);
  std::tie(W2, G) = passes.project_gram(basis, W1, C2, n);
  return {W2, C1.add_(C2), G};
}

// One round of CGS (two passes over the basis: coefficients, then subtraction fused with the
// Gram matrix), and a second round only when some row kept less than 1/sqrt(2) of its norm
// (the Daniel-Gragg-Kaufman-Stewart criterion: a round that removes little cannot lose
// orthogonality, "twice is enough" covers the rest). For blocks that are already orthogonal
// to the basis up to small components, e.g. a Lanczos block after its recurrence terms were
// subtracted, this reads the basis twice instead of three times (four when the second round
// runs). A basis stored in a narrower dtype than the block is orthonormal only to its own
// rounding u: one round leaves components of about u |C1_k| along it, so the round is also
// required to have removed little enough for that to stay below the block's rounding
// (u |C1_k| <= eps |W1_k|). R == 1 (W (1, b, d)).
Projected project_adaptive(const Passes& passes, const at::Tensor& basis, const at::Tensor& W,
                           int64_t n, const at::Tensor& norms0, const char* op,
                           const char* basis_name) {
  const int64_t b = W.size(1);
  if (n == 0) {
    return {W, at::zeros({1, 0, b}, W.options()), at::bmm(W, W.transpose(1, 2))};
  }
  at::Tensor C1 = first_coeffs(passes, basis, W, n, op, basis_name);
  at::Tensor W1, G1;
  std::tie(W1, G1) = passes.project_gram(basis, W, C1, n);
  const at::Tensor kept = G1[0].diagonal().to(at::kCPU, at::kDouble);
  auto kacc = kept.accessor<double, 1>();
  auto nacc = norms0.accessor<double, 1>();
  const double u_basis = unit_roundoff(basis.scalar_type());
  const double eps_acc = unit_roundoff(W.scalar_type());
  const bool narrow = u_basis > eps_acc;
  const at::Tensor cnorm =
      narrow ? C1[0].norm(2, {0}).to(at::kCPU, at::kDouble) : at::Tensor();
  bool enough = true;
  for (int64_t k = 0; k < b && enough; ++k) {
    enough = std::isfinite(kacc[k]) && kacc[k] >= 0.5 * nacc[k] * nacc[k];
    if (enough && narrow) {
      enough = u_basis * cnorm.accessor<double, 1>()[k] <= eps_acc * std::sqrt(kacc[k]);
    }
  }
  if (enough) return {W1, C1, G1};
  at::Tensor C2 = passes.coeffs(basis, W1, n);
  at::Tensor W2, G;
  std::tie(W2, G) = passes.project_gram(basis, W1, C2, n);
  return {W2, C1.add_(C2), G};
}

// A deterministic pseudo-random direction for replacing lost direction `index`
// (attempt-th try), generated in float64 on the CPU and moved to `like`'s device/dtype.
at::Tensor fresh_direction(int64_t d, int64_t index, int64_t attempt, const at::Tensor& like) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(
      static_cast<uint64_t>(0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(index + 1) +
                            static_cast<uint64_t>(attempt) * 0xBF58476D1CE4E5B9ULL));
  at::Tensor z = at::randn({d}, gen, at::TensorOptions().dtype(at::kDouble));
  return z.to(like.options());
}

// Remove from v (d,) its components along rows of Qrows (k, d), twice; add them into coef (k,)
// (float64 CPU). Returns the projected v.
at::Tensor project_rows(at::Tensor v, const at::Tensor& Qrows, at::Tensor* coef) {
  if (Qrows.size(0) == 0) return v;
  for (int round = 0; round < 2; ++round) {
    at::Tensor c = at::mv(Qrows, v);
    v = v - at::mv(Qrows.t(), c);
    if (coef != nullptr) coef->add_(c.to(at::kCPU, at::kDouble));
  }
  return v;
}

// A unit direction orthogonal to basis[:, :n] (a one-run basis) and to the rows of Qk (none when
// undefined) for replacing lost direction `index`: the first of 8 pseudo-random tries that keeps
// more than half its norm after the projections; undefined if none does. Device and dtype of
// `like`, whose last dimension is d.
at::Tensor fresh_orthogonal_direction(const Passes& passes, const at::Tensor& basis, int64_t n,
                                      const at::Tensor& Qk, int64_t index, const at::Tensor& like,
                                      const char* op, const char* basis_name) {
  const int64_t d = like.size(-1);
  for (int64_t attempt = 0; attempt < 8; ++attempt) {
    at::Tensor z = fresh_direction(d, index, attempt, like);
    z = z / z.norm();
    if (n > 0) z = project_twice(passes, basis, z.view({1, 1, d}), n, op, basis_name).W2.view({d});
    if (Qk.defined()) z = project_rows(z, Qk, nullptr);
    const double zn = z.norm().item<double>();
    if (zn > 0.5) return z / zn;
  }
  return at::Tensor();
}

void check_finite_rows(const at::Tensor& norms_cpu, const char* op, const char* name) {
  auto acc = norms_cpu.accessor<double, 1>();
  for (int64_t i = 0; i < norms_cpu.size(0); ++i) {
    TORCH_CHECK(std::isfinite(acc[i]), op, ": ", name, " has non-finite values (row ", i, " of ",
                norms_cpu.size(0), ")");
  }
}

}  // namespace

double default_rank_tol(at::ScalarType basis_dtype, at::ScalarType block_dtype) {
  return 10.0 * std::max(unit_roundoff(basis_dtype), unit_roundoff(block_dtype));
}

namespace {

// The checks both ops share: a basis of any float or half dtype and a block (or vectors) of
// float32 or float64 on one device; n_basis within the m basis rows; rank_tol.
void check_basis_and_block(const char* op, const char* basis_name, const at::Tensor& basis,
                           const char* block_name, const at::Tensor& block) {
  TORCH_CHECK(basis.device() == block.device(), op, ": ", basis_name, " is on ", basis.device(),
              " but ", block_name, " is on ", block.device());
  TORCH_CHECK(is_float_or_half(basis.scalar_type()), op, ": ", basis_name,
              " must be float64, float32, float16 or bfloat16, got ", basis.scalar_type());
  TORCH_CHECK(is_float32_or_64(block.scalar_type()), op, ": ", block_name,
              " must be float32 or float64, got ", block.scalar_type());
}

void check_n_basis_and_rank_tol(const char* op, int64_t n_basis, int64_t m, double rank_tol) {
  TORCH_CHECK(n_basis >= 0 && n_basis <= m, op, ": n_basis = ", n_basis,
              " must be in [0, m] with m = ", m, " basis rows");
  TORCH_CHECK(std::isfinite(rank_tol) && rank_tol < 1.0, op,
              ": rank_tol must be finite and < 1 (negative selects the default), got ", rank_tol);
}

}  // namespace

void check_block_orthonormalize_args(const at::Tensor& basis, const at::Tensor& block,
                                     int64_t n_basis, double rank_tol) {
  const char* op = "block_orthonormalize";
  TORCH_CHECK(basis.dim() == 2, op, ": basis must be 2-D (m, d), got shape ", shape_str(basis));
  TORCH_CHECK(block.dim() == 2, op, ": block must be 2-D (b, d), got shape ", shape_str(block));
  check_basis_and_block(op, "basis", basis, "block", block);
  const int64_t m = basis.size(0), d = basis.size(1), b = block.size(0);
  TORCH_CHECK(block.size(1) == d, op, ": basis has d = ", d, " columns but block has d = ",
              block.size(1));
  check_n_basis_and_rank_tol(op, n_basis, m, rank_tol);
  TORCH_CHECK(n_basis + b <= d, op, ": n_basis (", n_basis, ") + block rows (", b,
              ") exceeds the dimension d = ", d, ": no room for orthonormal directions");
}

void check_orthogonalize_batched_args(const at::Tensor& bases, const at::Tensor& vectors,
                                      int64_t n_basis, double rank_tol) {
  const char* op = "orthogonalize_batched";
  TORCH_CHECK(bases.dim() == 3, op, ": bases must be 3-D (r, m, d), got shape ",
              shape_str(bases));
  TORCH_CHECK(vectors.dim() == 2, op, ": vectors must be 2-D (r, d), got shape ",
              shape_str(vectors));
  check_basis_and_block(op, "bases", bases, "vectors", vectors);
  const int64_t r = bases.size(0), m = bases.size(1), d = bases.size(2);
  TORCH_CHECK(vectors.size(0) == r, op, ": bases holds r = ", r, " runs but vectors has ",
              vectors.size(0), " rows");
  TORCH_CHECK(vectors.size(1) == d, op, ": bases has d = ", d, " but vectors has d = ",
              vectors.size(1));
  check_n_basis_and_rank_tol(op, n_basis, m, rank_tol);
  TORCH_CHECK(r == 0 || n_basis + 1 <= d, op, ": n_basis (", n_basis,
              ") + 1 exceeds the dimension d = ", d, ": no room for an orthogonal direction");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_orthonormalize_impl(
    const Passes& passes, const at::Tensor& basis_in, const at::Tensor& block, int64_t n,
    double rank_tol, int64_t rounds, int64_t local_rows) {
  const char* op = "block_orthonormalize";
  check_block_orthonormalize_args(basis_in, block, n, rank_tol);
  TORCH_CHECK(rounds == 1 || rounds == 2, op,
              ": rounds must be 2 (CGS2) or 1 (one round, a second only where needed), got ",
              rounds);
  TORCH_CHECK(local_rows >= 0 && local_rows <= n, op, ": local_rows must be in [0, n_basis = ",
              n, "], got ", local_rows);
  if (basis_in.scalar_type() == at::kDouble && block.scalar_type() == at::kFloat) {
    // A float64 basis with a float32 block: run in float64 (the kernels accumulate in the
    // block's dtype, and a float32 sum would waste the basis's precision), return float32.
    // keep the float32 block's default tolerance: its rows are only known to float32 precision
    const double tol = rank_tol < 0 ? default_rank_tol(at::kDouble, at::kFloat) : rank_tol;
    auto res = block_orthonormalize_impl(passes, basis_in, block.to(at::kDouble), n, tol,
                                         rounds, local_rows);
    return {std::get<0>(res).to(at::kFloat), std::get<1>(res).to(at::kFloat),
            std::get<2>(res).to(at::kFloat)};
  }
  const double tol = rank_tol < 0 ? default_rank_tol(basis_in.scalar_type(), block.scalar_type())
                                  : rank_tol;
  const int64_t b = block.size(0), d = block.size(1);
  const auto opts = block.options();
  if (b == 0) {
    return {at::empty({0, d}, opts), at::zeros({n, 0}, opts), at::empty({0, 0}, opts)};
  }
  const at::Tensor basis = rows_contiguous(basis_in).unsqueeze(0);  // (1, m, d)
  const at::Tensor W = block.contiguous().unsqueeze(0);             // (1, b, d)
  const at::Tensor norms0 = W[0].norm(2, {1}).to(at::kCPU, at::kDouble);
  check_finite_rows(norms0, op, "block");

  // The newest local_rows rows first (one round over just those: a Lanczos block's large
  // components lie along the last two blocks), then the rounds over the whole basis.
  at::Tensor Wg = W, normsg = norms0, CL;
  const int64_t l0 = n - local_rows;
  if (local_rows > 0) {
    const at::Tensor local = basis.narrow(1, l0, local_rows);
    CL = first_coeffs(passes, local, W, local_rows, op, "basis", l0);
    at::Tensor GL;
    std::tie(Wg, GL) = passes.project_gram(local, W, CL, local_rows);
    normsg = GL[0].diagonal().to(at::kCPU, at::kDouble).clamp_min(0).sqrt();
  }
  Projected p = rounds == 2 ? project_twice(passes, basis, Wg, n, op, "basis")
                            : project_adaptive(passes, basis, Wg, n, normsg, op, "basis");
  if (local_rows > 0) p.C.narrow(1, l0, local_rows).add_(CL);
  const at::Tensor coeffs = p.C[0];
  const auto cpu_opts = at::TensorOptions().dtype(at::kDouble);
  const double eps_acc = unit_roundoff(block.scalar_type());

  // Fast path: CholeskyQR2 on W2. Accepted when the Cholesky factor shows every row keeps
  // more than tol of its original norm and the factor is well enough conditioned for
  // CholeskyQR (kappa^2 * eps < 1, checked on the diagonal with a safety factor of 10).
  {
    at::Tensor G = p.G[0].to(at::kCPU, at::kDouble);
    G = 0.5 * (G + G.t());
    at::Tensor R1, info;
    std::tie(R1, info) = at::linalg_cholesky_ex(G, /*upper=*/true);
    bool ok = info.item<int64_t>() == 0;
    if (ok) {
      auto diag = R1.diagonal();
      auto dacc = diag.accessor<double, 1>();
      auto nacc = norms0.accessor<double, 1>();
      double dmin = std::numeric_limits<double>::infinity(), dmax = 0.0;
      for (int64_t k = 0; k < b; ++k) {
        ok = ok && std::isfinite(dacc[k]) && dacc[k] > tol * nacc[k] && dacc[k] > 0.0;
        dmin = std::min(dmin, dacc[k]);
        dmax = std::max(dmax, dacc[k]);
      }
      ok = ok && dmax < 0.1 / std::sqrt(eps_acc) * dmin;
    }
    if (ok) {
      // q1 = R1^{-T} W2 and its Gram matrix, then q = R2^{-T} q1, by the backend's own pass
      // (out = 0 - C^T rows with C = -R^{-1}): deterministic chunked sums like the rest of the
      // op (a BLAS Gram matrix over d could depend on the thread count), one parallel region
      // per step instead of two BLAS calls.
      const at::Tensor zeros = at::zeros_like(p.W2);
      auto transform = [&](const at::Tensor& rows, const at::Tensor& Rinv) {
        const at::Tensor C = Rinv.neg().to(opts).unsqueeze(0).contiguous();  // (1, b, b)
        return passes.project_gram(rows, zeros, C, b);
      };
      at::Tensor q1, G2;
      std::tie(q1, G2) = transform(p.W2, at::linalg_inv(R1));
      G2 = G2[0].to(at::kCPU, at::kDouble);
      G2 = 0.5 * (G2 + G2.t());
      at::Tensor R2, info2;
      std::tie(R2, info2) = at::linalg_cholesky_ex(G2, /*upper=*/true);
      if (info2.item<int64_t>() == 0) {
        at::Tensor q = std::get<0>(transform(q1, at::linalg_inv(R2)))[0];
        at::Tensor r = at::matmul(R2, R1).triu();
        return {q, coeffs, r.to(opts)};
      }
    }
  }

  // Fallback: modified Gram-Schmidt row by row with rank detection. Each row is projected
  // twice against the accepted rows, once more (CGS2) against the basis, and once more against
  // the accepted rows; a row that keeps no more than tol of its norm is numerically dependent:
  // r[k, k] = 0 and q[k] is a fresh direction orthogonal to the basis and to q[:k].
  at::Tensor W2 = p.W2[0];
  at::Tensor q = at::empty({b, d}, opts);
  at::Tensor r = at::zeros({b, b}, cpu_opts);
  at::Tensor C = coeffs.clone();
  auto nacc = norms0.accessor<double, 1>();
  for (int64_t k = 0; k < b; ++k) {
    at::Tensor Qk = q.narrow(0, 0, k);
    at::Tensor rk = at::zeros({k}, cpu_opts);
    at::Tensor v = project_rows(W2[k], Qk, &rk);
    if (n > 0) {
      Projected pv = project_twice(passes, basis, v.view({1, 1, d}), n, op, "basis");
      v = pv.W2.view({d});
      C.select(1, k).add_(pv.C.view({n}));
    }
    v = project_rows(v, Qk, &rk);
    const double nrm = v.norm().item<double>();
    if (k > 0) r.select(1, k).narrow(0, 0, k).copy_(rk);
    if (nrm > tol * nacc[k] && nrm > 0.0) {
      q[k].copy_(v / nrm);
      r.index_put_({k, k}, nrm);
      continue;
    }
    // Lost direction: its (tiny) remainder is dropped, r[k, k] stays 0.
    const at::Tensor z = fresh_orthogonal_direction(passes, basis, n, Qk, k, W2, op, "basis");
    TORCH_CHECK(z.defined(), op, ": could not find a direction orthogonal to the ", n,
                " basis rows and ", k, " block rows in dimension d = ", d);
    q[k].copy_(z);
  }
  return {q, C, r.to(opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> orthogonalize_batched_impl(
    const Passes& passes, const at::Tensor& bases_in, const at::Tensor& vectors, int64_t n,
    double rank_tol) {
  const char* op = "orthogonalize_batched";
  check_orthogonalize_batched_args(bases_in, vectors, n, rank_tol);
  if (bases_in.scalar_type() == at::kDouble && vectors.scalar_type() == at::kFloat) {
    const double tol = rank_tol < 0 ? default_rank_tol(at::kDouble, at::kFloat) : rank_tol;
    auto res = orthogonalize_batched_impl(passes, bases_in, vectors.to(at::kDouble), n, tol);
    return {std::get<0>(res).to(at::kFloat), std::get<1>(res).to(at::kFloat),
            std::get<2>(res).to(at::kFloat)};
  }
  const double tol = rank_tol < 0
                         ? default_rank_tol(bases_in.scalar_type(), vectors.scalar_type())
                         : rank_tol;
  const int64_t r = vectors.size(0), d = vectors.size(1);
  const auto opts = vectors.options();
  if (r == 0) {
    return {at::empty({0, d}, opts), at::zeros({0, n}, opts), at::empty({0}, opts)};
  }
  const at::Tensor bases = rows_contiguous(bases_in);
  const at::Tensor W = vectors.contiguous().unsqueeze(1);  // (r, 1, d)
  const at::Tensor norms0 = vectors.norm(2, {1}).to(at::kCPU, at::kDouble);
  check_finite_rows(norms0, op, "vectors");

  Projected p = project_twice(passes, bases, W, n, op, "bases");
  at::Tensor norms = p.G.view({r}).clamp_min(0).sqrt();
  at::Tensor norms_cpu = norms.to(at::kCPU, at::kDouble);
  auto ncpu = norms_cpu.accessor<double, 1>();
  auto n0 = norms0.accessor<double, 1>();
  at::Tensor safe = norms.clamp_min(std::numeric_limits<double>::min());
  at::Tensor q = p.W2.view({r, d}) / safe.unsqueeze(1);
  for (int64_t i = 0; i < r; ++i) {
    if (ncpu[i] > tol * n0[i] && ncpu[i] > 0.0) continue;
    // vectors[i] lies in the span of bases[i, :n]: report norm 0 and a fresh unit direction.
    const at::Tensor z = fresh_orthogonal_direction(passes, bases.narrow(0, i, 1), n,
                                                    at::Tensor(), i, vectors, op, "bases");
    TORCH_CHECK(z.defined(), op, ": could not find a direction orthogonal to the ", n,
                " basis rows of run ", i, " in dimension d = ", d);
    q[i].copy_(z);
    norms.index_put_({i}, 0.0);
  }
  return {q, p.C.view({r, n}), norms};
}

}  // namespace krylov
}  // namespace landscape_ext
