// Device helpers shared by the CUDA kernels of every op family (cuda/<family>.cu).
//
// Host side: the current stream, the device guard and the error checks of the stable API (the
// stable counterparts of at::cuda::getCurrentCUDAStream, c10::cuda::CUDAGuard and the C10_CUDA
// checks; see csrc/stable_api.h for why nothing here may include c10/cuda or ATen).
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

#include <type_traits>

#include "stable_api.h"

// cudaError_t checks that raise a RuntimeError with CUDA's message (and device-side assertion
// text where torch has it).
#define LE_CUDA_CHECK(expr) STD_CUDA_CHECK(expr)
#define LE_CUDA_KERNEL_LAUNCH_CHECK() STD_CUDA_KERNEL_LAUNCH_CHECK()

namespace landscape_ext {
namespace cuda {

// The stream torch's current stream for t's device: every launch goes there.
inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  LANDSCAPE_SHIM_CHECK(
      aoti_torch_get_current_cuda_stream(static_cast<int32_t>(t.get_device_index()), &stream));
  return static_cast<cudaStream_t>(stream);
}

// Makes t's device current for the guard's lifetime (c10::cuda::CUDAGuard's job).
class DeviceGuard {
 public:
  explicit DeviceGuard(const Tensor& t) : guard_(t.get_device_index()) {}

 private:
  torch::stable::accelerator::DeviceGuard guard_;
};

// The type arithmetic on T runs in (at::opmath_type's rule): float for the half types.
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<c10::Half> {
  using type = float;
};
template <>
struct OpMath<c10::BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

// A stored element widened to the accumulation type (half types through float).
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T x) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    return static_cast<acc_t>(static_cast<float>(x));
  } else {
    return static_cast<acc_t>(x);
  }
}

// An accumulated value rounded to the storage type (half types through float).
template <typename T, typename acc_t>
__device__ __forceinline__ T from_acc(acc_t x) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    return T(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

}  // namespace cuda
}  // namespace landscape_ext
