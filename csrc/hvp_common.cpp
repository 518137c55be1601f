// hvp op family: argument checks, the call setup and the messages both backends raise (see
// hvp.h).
#include "hvp.h"

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "stable_api.h"

namespace landscape_ext {
namespace hvp {

void check_xent_hvp_args(const Tensor& logits, const Tensor& target, const Tensor& directions,
                         double label_smoothing) {
  const char* op = "xent_hvp";
  LE_CHECK(logits.dim() == 2, op, ": logits must be 2-D (N, C), got shape ", shape_str(logits));
  const int64_t N = logits.size(0), C = logits.size(1);
  LE_CHECK(C >= 1, op, ": logits has C = ", C, " classes; at least 1 is needed");
  LE_CHECK(target.dim() == 1 && target.size(0) == N, op,
           ": target must be 1-D (N,) with N = ", N, " rows of logits, got shape ",
           shape_str(target));
  LE_CHECK(directions.dim() == 3 && directions.size(1) == N && directions.size(2) == C, op,
           ": directions must be (k, N, C) with N = ", N, ", C = ", C, ", got shape ",
           shape_str(directions));
  LE_CHECK(target.scalar_type() == kLong, op, ": target must be int64 class indices, got ",
           target.scalar_type());
  LE_CHECK(is_float_or_half(logits.scalar_type()), op,
           ": logits must be float64, float32, float16 or bfloat16, got ",
           logits.scalar_type());
  LE_CHECK(is_float_or_half(directions.scalar_type()), op,
           ": directions must be float64, float32, float16 or bfloat16, got ",
           directions.scalar_type());
  LE_CHECK(same_device(logits, directions), op, ": logits is on ", device_str(logits),
           " but directions is on ", device_str(directions));
  LE_CHECK(same_device(logits, target), op, ": logits is on ", device_str(logits),
           " but target is on ", device_str(target));
  LE_CHECK(std::isfinite(label_smoothing) && label_smoothing >= 0.0 && label_smoothing <= 1.0,
           op, ": label_smoothing must be in [0, 1], got ", label_smoothing);
}

void check_act_derivs_args(const Tensor& z, int64_t act) {
  const char* op = "act_derivs";
  if (act < 0 || act >= kNumActs) {
    std::ostringstream codes;
    for (int64_t c = 0; c < kNumActs; ++c) codes << (c ? ", " : "") << c << " " << kActNames[c];
    LE_FAIL(op, ": act = ", act, " is not an activation code (", codes.str(), ")");
  }
  LE_CHECK(is_float_or_half(z.scalar_type()), op,
           ": z must be float64, float32, float16 or bfloat16, got ", z.scalar_type());
}

XentCall prepare_xent_hvp(const Tensor& logits, const Tensor& target, const Tensor& directions,
                          double label_smoothing, int64_t ignore_index) {
  check_xent_hvp_args(logits, target, directions, label_smoothing);
  const int64_t N = logits.size(0), C = logits.size(1), k = directions.size(0);
  XentCall call;
  call.out = empty_as(directions, {k, N, C});
  call.target = contiguous(target);
  // rows with unit stride in C are read in place (any row / direction strides)
  call.logits = logits.stride(1) == 1 ? logits : contiguous(logits);
  call.dirs = (k == 0 || directions.stride(2) == 1) ? directions : contiguous(directions);
  XentLayout& io = call.layout;
  io.logits = call.logits.data_ptr();
  io.ls = call.logits.stride(0);
  io.target = call.target.const_data_ptr<int64_t>();
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

ActCall prepare_act_derivs(const Tensor& z, int64_t act) {
  check_act_derivs_args(z, act);
  ActCall call;
  call.z = contiguous(z);
  const std::vector<int64_t> sizes(call.z.sizes().begin(), call.z.sizes().end());
  call.a = empty_as(call.z, sizes);
  call.d1 = empty_as(call.z, sizes);
  call.d2 = empty_as(call.z, sizes);
  return call;
}

void xent_bad_target(int64_t row, int64_t value, int64_t C, int64_t ignore_index) {
  LE_FAIL("xent_hvp: target[", row, "] = ", value, " is outside [0, ", C, ") for C = ", C,
          " classes and is not ignore_index = ", ignore_index);
}

void xent_non_finite_logits(int64_t row, int64_t N) {
  LE_FAIL("xent_hvp: logits has non-finite values in row ", row, " (of N = ", N, " rows)");
}

int64_t xent_count_rows_cpu(const Tensor& target_in, int64_t C, int64_t ignore_index) {
  const Tensor target = contiguous(target_in);
  const int64_t* t = target.const_data_ptr<int64_t>();
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
