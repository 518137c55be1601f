// Helpers of the argument checks of every op family (csrc/<family>_common.cpp): the shape
// printed in messages and the dtype classes the ops accept.
#pragma once

#include <ATen/core/Tensor.h>  // not ATen.h: these headers reach nvcc, where ATen.h costs ~40% of a compile

#include <sstream>
#include <string>

namespace landscape_ext {

// "[4, 5]": the shape as error messages print it.
inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// float64, float32, float16 or bfloat16: storage the kernels widen in registers.
inline bool is_float_or_half(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// float64 or float32: the accumulation dtypes.
inline bool is_float32_or_64(at::ScalarType t) { return t == at::kDouble || t == at::kFloat; }

}  // namespace landscape_ext
