// SIMD building blocks shared by the CPU kernels of every op family (cpu/krylov.cpp, cpu/hvp.cpp,
// cpu/sketch.cpp): the multiversioning macro, the ISA levels of kernels dispatched at run time,
// the GCC/Clang vector-extension types and the widening load. Internal to those kernels; not part
// of any interface.
//
// Everything here is force-inlined into the multiversioned (or per-level) entry points of the
// including file, so each clone compiles it for its own instruction set (a plain inline helper may
// stay a call into a baseline-ISA copy).
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// Hot loops are compiled once per x86-64 ISA level (v4: AVX-512 F/BW/CD/DQ/VL; v3: AVX2 + FMA +
// F16C; default: baseline SSE2) and GCC's resolver picks one at load time by CPU *features*, so
// one wheel is fast on every x86 CPU without -march=native. (Clones named by CPU,
// "arch=skylake-avx512" / "arch=haswell", are picked by CPU *model*: every AMD CPU and newer Intel
// ones would get the SSE2 default.) module.cpp's build_info() reports the level this CPU selects.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LANDSCAPE_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LANDSCAPE_MULTIVERSION
#endif
#define LANDSCAPE_ALWAYS_INLINE inline __attribute__((always_inline))

// Kernels whose variants differ in more than the instruction set (cpu/sketch.cpp: the vector
// width and micro-tile change with the level) cannot be target_clones: they are compiled once per
// level with these attributes (the features those kernels use) and picked at run time by
// cpu_isa_level(), the level the target_clones resolver selects for LANDSCAPE_MULTIVERSION.
#if defined(__GNUC__) && defined(__x86_64__)
#define LANDSCAPE_X86_64 1
#define LANDSCAPE_TARGET_V4 \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#define LANDSCAPE_TARGET_V3 __attribute__((target("avx2,fma")))
#else
#define LANDSCAPE_X86_64 0
#endif

namespace landscape_ext {
namespace simd {

// ---- ISA levels ---------------------------------------------------------------------------------
enum class IsaLevel : int { kDefault = 0, kV3 = 1, kV4 = 2 };

inline IsaLevel detect_isa_level() {
#if LANDSCAPE_X86_64
  __builtin_cpu_init();
#if !defined(__clang__)
  if (__builtin_cpu_supports("x86-64-v4")) return IsaLevel::kV4;
  if (__builtin_cpu_supports("x86-64-v3")) return IsaLevel::kV3;
#else
  // (Clang: the features the per-level kernels use; its builtin may not know the level names.)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
    return IsaLevel::kV4;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return IsaLevel::kV3;
#endif
#endif
  return IsaLevel::kDefault;
}

// The x86-64 level of this CPU ("default" off x86-64), detected once.
inline IsaLevel cpu_isa_level() {
  static const IsaLevel level = detect_isa_level();
  return level;
}

inline const char* isa_level_name(IsaLevel level) {
  switch (level) {
    case IsaLevel::kV4: return "x86-64-v4";
    case IsaLevel::kV3: return "x86-64-v3";
    default: return "default";
  }
}

// The lower of this CPU's level and the one named by `cap` ("x86-64-v4", "x86-64-v3" or
// "default"; null or any other text: no cap).
inline IsaLevel capped_isa_level(const char* cap) {
  const IsaLevel cpu = cpu_isa_level();
  for (IsaLevel level : {IsaLevel::kDefault, IsaLevel::kV3}) {
    if (cap != nullptr && std::strcmp(cap, isa_level_name(level)) == 0 && level < cpu) {
      return level;
    }
  }
  return cpu;
}

// ---- vector types -------------------------------------------------------------------------------
// VecN<T, VB>: a vector of VB bytes of T (L lanes). Spelled out per (T, VB): GCC does not apply
// vector_size to a typedef whose size depends on a template parameter.
template <typename T, int VB>
struct VecN;
#define LANDSCAPE_SIMD_VEC(T, VB)                              \
  template <>                                                  \
  struct VecN<T, VB> {                                         \
    static constexpr int L = VB / static_cast<int>(sizeof(T)); \
    typedef T type __attribute__((vector_size(VB)));           \
  };
LANDSCAPE_SIMD_VEC(float, 16)
LANDSCAPE_SIMD_VEC(float, 32)
LANDSCAPE_SIMD_VEC(float, 64)
LANDSCAPE_SIMD_VEC(double, 16)
LANDSCAPE_SIMD_VEC(double, 32)
LANDSCAPE_SIMD_VEC(double, 64)
LANDSCAPE_SIMD_VEC(double, 128)
LANDSCAPE_SIMD_VEC(int32_t, 64)
LANDSCAPE_SIMD_VEC(int64_t, 64)
LANDSCAPE_SIMD_VEC(uint16_t, 16)
LANDSCAPE_SIMD_VEC(uint16_t, 32)
LANDSCAPE_SIMD_VEC(uint32_t, 32)
LANDSCAPE_SIMD_VEC(uint32_t, 64)
LANDSCAPE_SIMD_VEC(_Float16, 16)
LANDSCAPE_SIMD_VEC(_Float16, 32)
#undef LANDSCAPE_SIMD_VEC

// The 64-byte accumulator vector of acc_t (float or double, L lanes) and, with the same lane
// count, the storage types that load_vec widens from.
template <typename acc_t>
struct Vec {
  static constexpr int L = 64 / static_cast<int>(sizeof(acc_t));
  using type = typename VecN<acc_t, 64>::type;
  using itype = typename VecN<std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>, 64>::type;
  using f64 = typename VecN<double, 8 * L>::type;
  using f32 = typename VecN<float, 4 * L>::type;
  using u16 = typename VecN<uint16_t, 2 * L>::type;
  using u32 = typename VecN<uint32_t, 4 * L>::type;
  using f16 = typename VecN<_Float16, 2 * L>::type;
};

// A vector V from unaligned memory.
template <typename V, typename T>
LANDSCAPE_ALWAYS_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// L consecutive elements of src_t widened (or narrowed, double -> float) to the accumulation type.
// Half types are converted in registers (bf16: a 16-bit shift; fp16: vcvtph2ps where available),
// so half storage really reads half the bytes.
template <typename acc_t, typename src_t>
LANDSCAPE_ALWAYS_INLINE typename Vec<acc_t>::type load_vec(const src_t* p) {
  using Tr = Vec<acc_t>;
  using V = typename Tr::type;
  if constexpr (std::is_same_v<src_t, acc_t>) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  } else if constexpr (std::is_same_v<src_t, double>) {
    typename Tr::f64 s;
    std::memcpy(&s, p, sizeof(s));
    return __builtin_convertvector(s, V);
  } else if constexpr (std::is_same_v<src_t, float>) {
    typename Tr::f32 s;
    std::memcpy(&s, p, sizeof(s));
    return __builtin_convertvector(s, V);
  } else if constexpr (std::is_same_v<src_t, c10::BFloat16>) {
    typename Tr::u16 s;
    std::memcpy(&s, p, sizeof(s));
    typename Tr::u32 u = __builtin_convertvector(s, typename Tr::u32) << 16;
    typename Tr::f32 f;
    std::memcpy(&f, &u, sizeof(f));
    return __builtin_convertvector(f, V);
  } else {
    static_assert(std::is_same_v<src_t, c10::Half>, "load_vec: unsupported source type");
    typename Tr::f16 s;
    std::memcpy(&s, p, sizeof(s));
    return __builtin_convertvector(__builtin_convertvector(s, typename Tr::f32), V);
  }
}

}  // namespace simd
}  // namespace landscape_ext
