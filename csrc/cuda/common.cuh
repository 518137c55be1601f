// Device helpers shared by the CUDA kernels of every op family (cuda/<family>.cu).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace landscape_ext {
namespace cuda {

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
