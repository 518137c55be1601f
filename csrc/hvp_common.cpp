// hvp op family: argument checks, the call setup and the messages both backends raise (see
// hvp.h).
#include <ATen/ATen.h>
#include "hvp.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>
#include <string>

#include "checks.h"

namespace landscape_ext {
namespace hvp {

void check_xent_hvp_args(const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& directions, double label_smoothing) {
  const char* op = "xent_hvp";
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (N, C), got shape ",
              shape_str(logits));
  const int64_t N = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C >= 1, op, ": logits has C = ", C, " classes; at least 1 is needed");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, op,
              ": target must be 1-D (N,) with N = ", N, " rows of logits, got shape ",
              shape_str(target));
  TORCH_CHECK(directions.dim() == 3 && directions.size(1) == N && directions.size(2) == C, op,
              ": directions must be (k, N, C) with N = ", N, ", C = ", C, ", got shape ",
              shape_str(directions));
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
              target.scalar_type());
  TORCH_CHECK(is_float_or_half(logits.scalar_type()), op,
              ": logits must be float64, float32, float16 or bfloat16, got ",
              logits.scalar_type());
  TORCH_CHECK(is_float_or_half(directions.scalar_type()), op,
              ": directions must be float64, float32, float16 or bfloat16, got ",
              directions.scalar_type());
  TORCH_CHECK(logits.device() == directions.device(), op, ": logits is on ", logits.device(),
              " but directions is on ", directions.device());
  TORCH_CHECK(logits.device() == target.device(), op, ": logits is on ", logits.device(),
              " but target is on ", target.device());
  TORCH_CHECK(std::isfinite(label_smoothing) && label_smoothing >= 0.0 && label_smoothing <= 1.0,
              op, ": label_smoothing must be in [0, 1], got ", label_smoothing);
}

void check_act_derivs_args(const at::Tensor& z, int64_t act) {
  const char* op = "act_derivs";
  if (act < 0 || act >= kNumActs) {
    std::ostringstream codes;
    for (int64_t c = 0; c < kNumActs; ++c) codes << (c ? ", " : "") << c << " " << kActNames[c];
    TORCH_CHECK(false, op, ": act = ", act, " is not an activation code (", codes.str(), ")");
  }
  TORCH_CHECK(is_float_or_half(z.scalar_type()), op,
              ": z must be float64, float32, float16 or bfloat16, got ", z.scalar_type());
}

XentCall prepare_xent_hvp(const at::Tensor& logits, const at::Tensor& target,
                          const at::Tensor& directions, double label_smoothing,
                          int64_t ignore_index) {
  check_xent_hvp_args(logits, target, directions, label_smoothing);
  const int64_t N = logits.size(0), C = logits.size(1), k = directions.size(0);
  XentCall call;
  call.out = at::empty({k, N, C}, directions.options());
  call.target = target.contiguous();
  // rows with unit stride in C are read in place (any row / direction strides)
  call.logits = logits.stride(1) == 1 ? logits : logits.contiguous();
  call.dirs = (k == 0 || directions.stride(2) == 1) ? directions : directions.contiguous();
  XentLayout& io = call.layout;
  io.logits = call.logits.data_ptr();
  io.ls = call.logits.stride(0);
  io.target = call.target.data_ptr<int64_t>();
  io.dirs = k == 0 ? nullptr : call.dirs.data_ptr();
  io.dsk = k == 0 ? 0 : call.dirs.stride(0);
  io.dsn = k == 0 ? 0 : call.dirs.stride(1);
  io.out = call.out.data_ptr();
  io.N = N;
  io.C = C;
  io.k = k;
  io.ignore_index = ignore_index;
  return call;
}

ActCall prepare_act_derivs(const at::Tensor& z, int64_t act) {
  check_act_derivs_args(z, act);
  ActCall call;
  call.z = z.contiguous();
  call.a = at::empty(call.z.sizes(), call.z.options());
  call.d1 = at::empty(call.z.sizes(), call.z.options());
  call.d2 = at::empty(call.z.sizes(), call.z.options());
  return call;
}

void xent_bad_target(int64_t row, int64_t value, int64_t C, int64_t ignore_index) {
  TORCH_CHECK(false, "xent_hvp: target[", row, "] = ", value, " is outside [0, ", C,
              ") for C = ", C, " classes and is not ignore_index = ", ignore_index);
}

void xent_non_finite_logits(int64_t row, int64_t N) {
  TORCH_CHECK(false, "xent_hvp: logits has non-finite values in row ", row, " (of N = ", N,
              " rows)");
}

int64_t xent_count_rows_cpu(const at::Tensor& target_in, int64_t C, int64_t ignore_index) {
  const at::Tensor target = target_in.contiguous();
  const int64_t* t = target.data_ptr<int64_t>();
  const int64_t N = target.numel();
  int64_t M = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t v = t[n];
    if (v == ignore_index) continue;
    if (v < 0 || v >= C) xent_bad_target(n, v, C, ignore_index);
    ++M;
  }
  return M;
}

}  // namespace hvp
}  // namespace landscape_ext
