// sketch op family: argument checks and the device-agnostic drivers (see sketch.h).
// The only backend-specific piece is the fused direct sketch kernel; the "formed" route of the
// sketch and all of linear_grad_project are compositions of ATen ops (bmm/mm), chunked so their
// temporaries stay below kChunkElements elements.
#include <ATen/ATen.h>
#include "sketch.h"

#include <ATen/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "checks.h"

namespace landscape_ext {
namespace sketch {
namespace {

// `other` (named `name`) on the device and of the dtype of acts.
void check_like_acts(const char* op, const at::Tensor& acts, const at::Tensor& other,
                     const char* name) {
  TORCH_CHECK(other.device() == acts.device(), op, ": acts is on ", acts.device(), " but ", name,
              " is on ", other.device());
  TORCH_CHECK(other.scalar_type() == acts.scalar_type(), op, ": acts is ", acts.scalar_type(),
              " but ", name, " is ", other.scalar_type(), ": all inputs must share one dtype");
}

// acts / out_grads pair shared by both ops: (N, n_in) & (N, n_out), or (N, T, n_in) &
// (N, T, n_out).
void check_factor_pair(const char* op, const at::Tensor& acts, const at::Tensor& out_grads) {
  TORCH_CHECK(acts.dim() == 2 || acts.dim() == 3, op,
              ": acts must be 2-D (N, n_in) or 3-D (N, T, n_in), got shape ", shape_str(acts));
  TORCH_CHECK(out_grads.dim() == acts.dim(), op, ": out_grads must be ", acts.dim(),
              "-D like acts (", acts.dim() == 2 ? "(N, n_out)" : "(N, T, n_out)",
              "), got shape ", shape_str(out_grads));
  TORCH_CHECK(out_grads.size(0) == acts.size(0), op, ": acts has N = ", acts.size(0),
              " samples but out_grads has N = ", out_grads.size(0));
  if (acts.dim() == 3) {
    TORCH_CHECK(out_grads.size(1) == acts.size(1), op, ": acts has T = ", acts.size(1),
                " positions per sample but out_grads has T = ", out_grads.size(1));
  }
  TORCH_CHECK(is_float32_or_64(acts.scalar_type()), op, ": acts must be float32 or float64, got ",
              acts.scalar_type());
  check_like_acts(op, acts, out_grads, "out_grads");
}

// Directions in the layout the kernels address as V + j * stride(0) + o * n_in + i.
bool rows_packed(const at::Tensor& V, int64_t n_out, int64_t n_in) {
  return (n_in <= 1 || V.stride(2) == 1) && (n_out <= 1 || V.stride(1) == n_in);
}

}  // namespace

void check_linear_grad_sketch_args(const at::Tensor& acts, const at::Tensor& out_grads,
                                   const at::Tensor& directions) {
  const char* op = "linear_grad_sketch";
  check_factor_pair(op, acts, out_grads);
  TORCH_CHECK(directions.dim() == 3, op, ": directions must be 3-D (l, n_out, n_in), got shape ",
              shape_str(directions));
  TORCH_CHECK(directions.size(1) == out_grads.size(-1), op, ": directions has n_out = ",
              directions.size(1), " but out_grads has n_out = ", out_grads.size(-1));
  TORCH_CHECK(directions.size(2) == acts.size(-1), op, ": directions has n_in = ",
              directions.size(2), " but acts has n_in = ", acts.size(-1));
  check_like_acts(op, acts, directions, "directions");
}

void check_linear_grad_project_args(const at::Tensor& acts, const at::Tensor& out_grads,
                                    const at::Tensor& weights) {
  const char* op = "linear_grad_project";
  check_factor_pair(op, acts, out_grads);
  TORCH_CHECK(weights.dim() == 2, op, ": weights must be 2-D (N, l), got shape ",
              shape_str(weights));
  TORCH_CHECK(weights.size(0) == acts.size(0), op, ": acts has N = ", acts.size(0),
              " samples but weights has ", weights.size(0), " rows");
  check_like_acts(op, acts, weights, "weights");
}

at::Tensor linear_grad_sketch_impl(DirectSketchFn direct, const at::Tensor& acts,
                                   const at::Tensor& out_grads, const at::Tensor& directions) {
  check_linear_grad_sketch_args(acts, out_grads, directions);
  const at::OptionalDeviceGuard guard(at::device_of(acts));
  const int64_t N = acts.size(0), T = acts.dim() == 3 ? acts.size(1) : 1;
  const int64_t n_in = acts.size(-1), n_out = out_grads.size(-1), l = directions.size(0);
  const auto opts = acts.options();
  if (N == 0 || l == 0 || T == 0 || n_in == 0 || n_out == 0) return at::zeros({N, l}, opts);
  const at::Tensor V = rows_packed(directions, n_out, n_in) ? directions : directions.contiguous();

  if (!sketch_forms_gradients(T, l)) {
    const at::Tensor A = acts.reshape({N * T, n_in}).contiguous();
    const at::Tensor E = out_grads.reshape({N * T, n_out}).contiguous();
    at::Tensor y = direct(A, E, V);  // (N T, l)
    return T == 1 ? y : y.view({N, T, l}).sum(1);
  }

  // formed: g_n = E_n^T A_n for a chunk of samples, then one GEMM with the directions.
  const int64_t per = n_out * n_in;
  const at::Tensor Vf = V.reshape({l, per});
  const at::Tensor A3 = acts, E3 = out_grads;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, kChunkElements / per));
  at::Tensor y = at::empty({N, l}, opts);
  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t c = std::min(chunk, N - s);
    at::Tensor G = at::bmm(E3.narrow(0, s, c).transpose(1, 2), A3.narrow(0, s, c));
    at::Tensor ys = y.narrow(0, s, c);
    at::mm_out(ys, G.view({c, per}), Vf.t());
  }
  return y;
}

at::Tensor linear_grad_project_impl(const at::Tensor& acts, const at::Tensor& out_grads,
                                    const at::Tensor& weights) {
  check_linear_grad_project_args(acts, out_grads, weights);
  const at::OptionalDeviceGuard guard(at::device_of(acts));
  const int64_t N = acts.size(0), T = acts.dim() == 3 ? acts.size(1) : 1;
  const int64_t n_in = acts.size(-1), n_out = out_grads.size(-1), l = weights.size(1);
  const auto opts = acts.options();
  at::Tensor out = at::zeros({l, n_out, n_in}, opts);
  if (N == 0 || l == 0 || T == 0 || n_in == 0 || n_out == 0) return out;
  const int64_t per = n_out * n_in;

  if (!sketch_forms_gradients(T, l)) {
    // out[j] = E^T diag(w_j) A over rows r = (n, t): one GEMM ((w * E)^T A) per chunk of j.
    const int64_t R = N * T;
    const at::Tensor A2 = acts.reshape({R, n_in});
    const at::Tensor E2 = out_grads.reshape({R, n_out});
    const at::Tensor Wr = T == 1 ? weights : weights.unsqueeze(1).expand({N, T, l}).reshape({R, l});
    const int64_t lc = std::max<int64_t>(1, std::min<int64_t>(l, kChunkElements / (R * n_out)));
    for (int64_t j0 = 0; j0 < l; j0 += lc) {
      const int64_t c = std::min(lc, l - j0);
      at::Tensor Ew = (Wr.narrow(1, j0, c).unsqueeze(2) * E2.unsqueeze(1)).reshape({R, c * n_out});
      at::Tensor dst = out.narrow(0, j0, c).view({c * n_out, n_in});
      at::mm_out(dst, Ew.t(), A2);
    }
    return out;
  }

  // formed: out += w_chunk^T G_chunk with G_chunk = per-sample gradients of a chunk of samples.
  at::Tensor flat = out.view({l, per});
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, kChunkElements / per));
  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t c = std::min(chunk, N - s);
    at::Tensor G = at::bmm(out_grads.narrow(0, s, c).transpose(1, 2), acts.narrow(0, s, c));
    flat.addmm_(weights.narrow(0, s, c).t(), G.view({c, per}));
  }
  return out;
}

}  // namespace sketch
}  // namespace landscape_ext
