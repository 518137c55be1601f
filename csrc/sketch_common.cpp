// sketch op family: argument checks and the device-agnostic drivers (see sketch.h).
// The only backend-specific pieces are the fused direct sketch kernel and the in-place addmm;
// the "formed" route of the sketch and all of linear_grad_project are compositions of ATen ops
// (bmm/mm/addmm, called through torch's stable ABI: the same ATen kernels), chunked so their
// temporaries stay below kChunkElements elements.
#include "sketch.h"

#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "stable_api.h"

namespace landscape_ext {
namespace sketch {
namespace {

// The size of t's last dimension (size(-1) of the ATen code).
int64_t last_size(const Tensor& t) { return t.size(t.dim() - 1); }

// `other` (named `name`) on the device and of the dtype of acts.
void check_like_acts(const char* op, const Tensor& acts, const Tensor& other, const char* name) {
  LE_CHECK(same_device(other, acts), op, ": acts is on ", device_str(acts), " but ", name,
           " is on ", device_str(other));
  LE_CHECK(other.scalar_type() == acts.scalar_type(), op, ": acts is ", acts.scalar_type(),
           " but ", name, " is ", other.scalar_type(), ": all inputs must share one dtype");
}

// acts / out_grads pair shared by both ops: (N, n_in) & (N, n_out), or (N, T, n_in) &
// (N, T, n_out).
void check_factor_pair(const char* op, const Tensor& acts, const Tensor& out_grads) {
  LE_CHECK(acts.dim() == 2 || acts.dim() == 3, op,
           ": acts must be 2-D (N, n_in) or 3-D (N, T, n_in), got shape ", shape_str(acts));
  LE_CHECK(out_grads.dim() == acts.dim(), op, ": out_grads must be ", acts.dim(),
           "-D like acts (", acts.dim() == 2 ? "(N, n_out)" : "(N, T, n_out)", "), got shape ",
           shape_str(out_grads));
  LE_CHECK(out_grads.size(0) == acts.size(0), op, ": acts has N = ", acts.size(0),
           " samples but out_grads has N = ", out_grads.size(0));
  if (acts.dim() == 3) {
    LE_CHECK(out_grads.size(1) == acts.size(1), op, ": acts has T = ", acts.size(1),
             " positions per sample but out_grads has T = ", out_grads.size(1));
  }
  LE_CHECK(is_float32_or_64(acts.scalar_type()), op, ": acts must be float32 or float64, got ",
           acts.scalar_type());
  check_like_acts(op, acts, out_grads, "out_grads");
}

// Directions in the layout the kernels address as V + j * stride(0) + o * n_in + i.
bool rows_packed(const Tensor& V, int64_t n_out, int64_t n_in) {
  return (n_in <= 1 || V.stride(2) == 1) && (n_out <= 1 || V.stride(1) == n_in);
}

// Makes acts' device current while a driver runs (at::OptionalDeviceGuard(device_of(acts))):
// a CUDA tensor's device only; a CPU tensor needs no guard, and a CPU-only build has none to
// create.
std::optional<torch::stable::accelerator::DeviceGuard> guard_device_of(const Tensor& acts) {
  std::optional<torch::stable::accelerator::DeviceGuard> guard;
  if (acts.is_cuda()) guard.emplace(acts.get_device_index());
  return guard;
}

// ---- the ATen ops of the composites without a stable wrapper, by name (same kernels) ---------
// t.t() of a 2-D tensor: aten::t is transpose(0, 1) there, the same view.
Tensor t2(const Tensor& t) { return transpose(t, 0, 1); }

// t.expand(sizes) (aten::expand, implicit = false): a view.
Tensor expand(const Tensor& t, const std::vector<int64_t>& sizes) {
  std::array<StableIValue, 3> stack{to_ivalue(t), to_ivalue(sizes), to_ivalue(false)};
  call_op("aten::expand", "", stack);
  return from_ivalue<Tensor>(stack[0]);
}

// a * b (aten::mul.Tensor, broadcasting): a new tensor.
Tensor mul(const Tensor& a, const Tensor& b) {
  std::array<StableIValue, 2> stack{to_ivalue(a), to_ivalue(b)};
  call_op("aten::mul", "Tensor", stack);
  return from_ivalue<Tensor>(stack[0]);
}

// t.sum(dim) (aten::sum.dim_IntList, keepdim = false, the input's dtype).
Tensor sum_dim(const Tensor& t, int64_t dim) {
  const std::vector<int64_t> dims{dim};
  return torch::stable::sum(t, torch::headeronly::IntHeaderOnlyArrayRef(dims.data(), dims.size()));
}

}  // namespace

void check_linear_grad_sketch_args(const Tensor& acts, const Tensor& out_grads,
                                   const Tensor& directions) {
  const char* op = "linear_grad_sketch";
  check_factor_pair(op, acts, out_grads);
  LE_CHECK(directions.dim() == 3, op, ": directions must be 3-D (l, n_out, n_in), got shape ",
           shape_str(directions));
  LE_CHECK(directions.size(1) == last_size(out_grads), op, ": directions has n_out = ",
           directions.size(1), " but out_grads has n_out = ", last_size(out_grads));
  LE_CHECK(directions.size(2) == last_size(acts), op, ": directions has n_in = ",
           directions.size(2), " but acts has n_in = ", last_size(acts));
  check_like_acts(op, acts, directions, "directions");
}

void check_linear_grad_project_args(const Tensor& acts, const Tensor& out_grads,
                                    const Tensor& weights) {
  const char* op = "linear_grad_project";
  check_factor_pair(op, acts, out_grads);
  LE_CHECK(weights.dim() == 2, op, ": weights must be 2-D (N, l), got shape ",
           shape_str(weights));
  LE_CHECK(weights.size(0) == acts.size(0), op, ": acts has N = ", acts.size(0),
           " samples but weights has ", weights.size(0), " rows");
  check_like_acts(op, acts, weights, "weights");
}

Tensor linear_grad_sketch_impl(DirectSketchFn direct, const Tensor& acts,
                               const Tensor& out_grads, const Tensor& directions) {
  check_linear_grad_sketch_args(acts, out_grads, directions);
  const auto guard = guard_device_of(acts);
  const int64_t N = acts.size(0), T = acts.dim() == 3 ? acts.size(1) : 1;
  const int64_t n_in = last_size(acts), n_out = last_size(out_grads), l = directions.size(0);
  if (N == 0 || l == 0 || T == 0 || n_in == 0 || n_out == 0) return zeros_as(acts, {N, l});
  const Tensor V = rows_packed(directions, n_out, n_in) ? directions : contiguous(directions);

  if (!sketch_forms_gradients(T, l)) {
    const Tensor A = contiguous(reshape(acts, {N * T, n_in}));
    const Tensor E = contiguous(reshape(out_grads, {N * T, n_out}));
    Tensor y = direct(A, E, V);  // (N T, l)
    return T == 1 ? y : sum_dim(view(y, {N, T, l}), 1);
  }

  // formed: g_n = E_n^T A_n for a chunk of samples, then one GEMM with the directions.
  const int64_t per = n_out * n_in;
  const Tensor Vf = reshape(V, {l, per});
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, kChunkElements / per));
  Tensor y = empty_as(acts, {N, l});
  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t c = std::min(chunk, N - s);
    Tensor G = bmm(transpose(narrow(out_grads, 0, s, c), 1, 2), narrow(acts, 0, s, c));
    mm_out(narrow(y, 0, s, c), view(G, {c, per}), t2(Vf));
  }
  return y;
}

Tensor linear_grad_project_impl(AddmmAccFn addmm_acc, const Tensor& acts,
                                const Tensor& out_grads, const Tensor& weights) {
  check_linear_grad_project_args(acts, out_grads, weights);
  const auto guard = guard_device_of(acts);
  const int64_t N = acts.size(0), T = acts.dim() == 3 ? acts.size(1) : 1;
  const int64_t n_in = last_size(acts), n_out = last_size(out_grads), l = weights.size(1);
  Tensor out = zeros_as(acts, {l, n_out, n_in});
  if (N == 0 || l == 0 || T == 0 || n_in == 0 || n_out == 0) return out;
  const int64_t per = n_out * n_in;

  if (!sketch_forms_gradients(T, l)) {
    // out[j] = E^T diag(w_j) A over rows r = (n, t): one GEMM ((w * E)^T A) per chunk of j.
    const int64_t R = N * T;
    const Tensor A2 = reshape(acts, {R, n_in});
    const Tensor E2 = reshape(out_grads, {R, n_out});
    const Tensor Wr =
        T == 1 ? weights
               : reshape(expand(torch::stable::unsqueeze(weights, 1), {N, T, l}), {R, l});
    const int64_t lc = std::max<int64_t>(1, std::min<int64_t>(l, kChunkElements / (R * n_out)));
    for (int64_t j0 = 0; j0 < l; j0 += lc) {
      const int64_t c = std::min(lc, l - j0);
      const Tensor Ew = reshape(mul(torch::stable::unsqueeze(narrow(Wr, 1, j0, c), 2),
                                    torch::stable::unsqueeze(E2, 1)),
                                {R, c * n_out});
      mm_out(view(narrow(out, 0, j0, c), {c * n_out, n_in}), t2(Ew), A2);
    }
    return out;
  }

  // formed: out += w_chunk^T G_chunk with G_chunk = per-sample gradients of a chunk of samples.
  const Tensor flat = view(out, {l, per});
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, kChunkElements / per));
  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t c = std::min(chunk, N - s);
    Tensor G = bmm(transpose(narrow(out_grads, 0, s, c), 1, 2), narrow(acts, 0, s, c));
    addmm_acc(flat, t2(narrow(weights, 0, s, c)), view(G, {c, per}));
  }
  return out;
}

}  // namespace sketch
}  // namespace landscape_ext

// The argument checks alone, as ops (schemas in registration.cpp): the composite (torch) paths
// of ops.py raise the kernels' errors with them on every device.
STABLE_TORCH_LIBRARY_IMPL(landscape_ext, CompositeExplicitAutograd, m) {
  m.impl("_check_linear_grad_sketch_args",
         TORCH_BOX(&landscape_ext::sketch::check_linear_grad_sketch_args));
  m.impl("_check_linear_grad_project_args",
         TORCH_BOX(&landscape_ext::sketch::check_linear_grad_project_args));
}
