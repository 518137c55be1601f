// The one door from our kernels to torch: torch's stable C++ API (torch/csrc/stable, built on the
// C shim) and its header-only types, plus the few helpers every op family needs on top of it.
//
// Why: a library built against torch's ordinary C++ API (ATen, c10, torch/library.h) links
// mangled C++ symbols of the libtorch it was compiled with, so a wheel works with that torch
// release only. Everything here resolves to extern "C" functions that torch keeps stable from
// TORCH_TARGET_VERSION (2.10, set by setup.py and CMakeLists.txt) on, so one wheel serves every
// torch from 2.10. Nothing in csrc/ may include ATen/, c10/ (except through torch/headeronly) or
// torch/library.h: scripts/check_stable_abi.py fails the build's tests if the binary references
// a C++ symbol of libtorch.
//
// ATen ops the stable headers do not wrap are called by name through the dispatcher
// (call_op below, torch_call_dispatcher in the C shim): they run the same kernels as at::foo.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

// The error-code check of the C shim calls: its name changed across torch releases.
#if defined(STABLE_TORCH_ERROR_CODE_CHECK)
#define LANDSCAPE_SHIM_CHECK(call) STABLE_TORCH_ERROR_CODE_CHECK(call)
#else
#define LANDSCAPE_SHIM_CHECK(call) TORCH_ERROR_CODE_CHECK(call)
#endif

namespace landscape_ext {

using Tensor = torch::stable::Tensor;
using Device = torch::stable::Device;
using ScalarType = c10::ScalarType;  // header-only (torch/headeronly/core/ScalarType.h)
using DeviceType = c10::DeviceType;

constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kBool = ScalarType::Bool;

namespace detail {
// Streams what an error message is made of; ScalarType prints as torch prints it ("Float").
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& s, const T& first, const Rest&... rest) {
  s << first;
  append(s, rest...);
}
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  append(s, args...);
  return s.str();
}
}  // namespace detail

}  // namespace landscape_ext

// Raise a RuntimeError in Python whose text is exactly the message (no file or function prefix:
// messages name the op, the argument and the numbers). Usable in host code only.
#define LE_CHECK(cond, ...)                                                     \
  do {                                                                          \
    if (!(cond)) {                                                              \
      throw std::runtime_error(::landscape_ext::detail::cat(__VA_ARGS__));      \
    }                                                                           \
  } while (0)
#define LE_FAIL(...) throw std::runtime_error(::landscape_ext::detail::cat(__VA_ARGS__))

namespace landscape_ext {

// "[4, 5]": the shape as error messages print it.
inline std::string shape_str(const Tensor& t) {
  std::ostringstream s;
  s << "[";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << "]";
  return s.str();
}

// "cpu", "cuda:0": the device as torch prints it.
inline std::string device_str(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return "cuda:" + std::to_string(static_cast<int>(t.get_device_index()));
  return "device type " + std::to_string(static_cast<int>(t.device().type()));
}

inline bool same_device(const Tensor& a, const Tensor& b) { return a.device() == b.device(); }

// float64, float32, float16 or bfloat16: storage the kernels widen in registers.
inline bool is_float_or_half(ScalarType t) {
  return t == kDouble || t == kFloat || t == kHalf || t == kBFloat16;
}

// float64 or float32: the accumulation dtypes.
inline bool is_float32_or_64(ScalarType t) { return t == kDouble || t == kFloat; }

// ---- ATen ops by name (torch_call_dispatcher): the stack holds the arguments in, the outputs out
template <size_t N>
void call_op(const char* name, const char* overload, std::array<StableIValue, N>& stack) {
  LANDSCAPE_SHIM_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
}

template <typename T>
StableIValue to_ivalue(const T& v) {
  return torch::stable::detail::from(v);
}

template <typename T>
T from_ivalue(StableIValue v) {
  return torch::stable::detail::to<T>(v);
}

// ---- tensor creation (device and dtype given explicitly; strided layout) -----------------------
// Through the C shim's aoti_torch_empty_strided (a direct call), not the dispatcher: the kernels
// allocate their outputs on every call, and a boxed dispatcher call costs microseconds.
// (The shim's dtype and device codes are c10::ScalarType's and c10::DeviceType's values.)
inline Tensor empty(const int64_t* sizes, int64_t ndim, ScalarType dtype, Device device) {
  std::vector<int64_t> strides(static_cast<size_t>(ndim));
  int64_t stride = 1;
  for (int64_t i = ndim - 1; i >= 0; --i) {
    strides[static_cast<size_t>(i)] = stride;
    stride *= sizes[i] > 1 ? sizes[i] : 1;
  }
  // a tensor's device always carries its index; -1 (an unindexed CPU device) means 0 here
  const int32_t index = device.index() < 0 ? 0 : static_cast<int32_t>(device.index());
  AtenTensorHandle handle = nullptr;
  LANDSCAPE_SHIM_CHECK(aoti_torch_empty_strided(ndim, sizes, strides.data(),
                                                static_cast<int32_t>(dtype),
                                                static_cast<int32_t>(device.type()), index, &handle));
  return Tensor(handle);
}
inline Tensor empty(std::initializer_list<int64_t> sizes, ScalarType dtype, Device device) {
  return empty(sizes.begin(), static_cast<int64_t>(sizes.size()), dtype, device);
}
inline Tensor empty(const std::vector<int64_t>& s, ScalarType dtype, Device device) {
  return empty(s.data(), static_cast<int64_t>(s.size()), dtype, device);
}
// New tensor with the dtype and device of `like`.
inline Tensor empty_as(const Tensor& like, std::initializer_list<int64_t> sizes) {
  return empty(sizes, like.scalar_type(), like.device());
}
inline Tensor empty_as(const Tensor& like, const std::vector<int64_t>& sizes) {
  return empty(sizes, like.scalar_type(), like.device());
}
inline Tensor zeros_as(const Tensor& like, std::initializer_list<int64_t> sizes) {
  Tensor t = empty_as(like, sizes);
  torch::stable::zero_(t);
  return t;
}
inline Tensor zeros_as(const Tensor& like, const std::vector<int64_t>& sizes) {
  Tensor t = empty_as(like, sizes);
  torch::stable::zero_(t);
  return t;
}

// ---- views and copies ---------------------------------------------------------------------------
// torch::stable already has contiguous(t), clone(t), transpose(t, d0, d1), unsqueeze, select,
// copy_(dst, src), zero_, fill_: call them unqualified (argument-dependent lookup finds them).
inline Tensor narrow(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  Tensor self = t;  // (torch::stable::narrow takes a non-const reference; it returns a view)
  return torch::stable::narrow(self, dim, start, length);
}
inline Tensor view(const Tensor& t, std::initializer_list<int64_t> sizes) {
  std::vector<int64_t> s(sizes);
  return torch::stable::view(t, torch::headeronly::IntHeaderOnlyArrayRef(s.data(), s.size()));
}
inline Tensor reshape(const Tensor& t, std::initializer_list<int64_t> sizes) {
  std::vector<int64_t> s(sizes);
  return torch::stable::reshape(t, torch::headeronly::IntHeaderOnlyArrayRef(s.data(), s.size()));
}
// A copy (or `t` itself) with dtype `dtype` on t's device.
inline Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return torch::stable::to(t, dtype);
}
// A copy (or `t` itself) on the CPU.
inline Tensor to_cpu(const Tensor& t) { return torch::stable::to(t, Device(DeviceType::CPU)); }

// ---- BLAS through the dispatcher ----------------------------------------------------------------
// a (B, n, k) @ b (B, k, m)
inline Tensor bmm(const Tensor& a, const Tensor& b) {
  std::array<StableIValue, 2> stack{to_ivalue(a), to_ivalue(b)};
  call_op("aten::bmm", "", stack);
  return from_ivalue<Tensor>(stack[0]);
}
// out (n, m) = a (n, k) @ b (k, m), written into `out`
inline void mm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  std::array<StableIValue, 3> stack{to_ivalue(a), to_ivalue(b), to_ivalue(out)};
  call_op("aten::mm", "out", stack);
  (void)from_ivalue<Tensor>(stack[0]);  // the returned reference to `out`, released
}
// a - b (same shapes or broadcastable), a new tensor
inline Tensor sub(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b); }

}  // namespace landscape_ext
