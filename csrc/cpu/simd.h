// SIMD building blocks shared by the CPU kernels of the krylov and hvp op families (cpu/krylov.cpp,
// cpu/hvp.cpp): the multiversioning macro, the GCC/Clang vector-extension types (64-byte vectors)
// and the widening load. Internal to those kernels; not part of any interface.
//
// Everything here is force-inlined into the multiversioned entry points of the including file, so
// each clone compiles it for its own instruction set (a plain inline helper may stay a call into a
// baseline-ISA copy). cpu/sketch.cpp has its own variants (per-ISA vector widths, picked by
// __builtin_cpu_supports) and does not use this header.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

namespace landscape_ext {
namespace simd {

// Vector types per accumulation type: type (the accumulator vector, L lanes) and, with the same
// lane count, the storage types that load_vec widens from. Spelled out per accumulation type: GCC
// does not apply vector_size to a typedef whose size depends on a template parameter.
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  static constexpr int L = 16;  // lanes per vector
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t itype __attribute__((vector_size(64)));
  typedef double f64 __attribute__((vector_size(128)));
  typedef float f32 __attribute__((vector_size(64)));
  typedef uint16_t u16 __attribute__((vector_size(32)));
  typedef uint32_t u32 __attribute__((vector_size(64)));
  typedef _Float16 f16 __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
  static constexpr int L = 8;
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t itype __attribute__((vector_size(64)));
  typedef double f64 __attribute__((vector_size(64)));
  typedef float f32 __attribute__((vector_size(32)));
  typedef uint16_t u16 __attribute__((vector_size(16)));
  typedef uint32_t u32 __attribute__((vector_size(32)));
  typedef _Float16 f16 __attribute__((vector_size(16)));
};

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
