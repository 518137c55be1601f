// hvp op family, CPU backend: xent_hvp and act_derivs (see hvp.h) and their registration for the
// CPU dispatch key.
//
// xent_hvp: rows are split over threads (torch::stable::parallel_for: torch's at::parallel_for
// behind the C shim). Per row: one pass for the max (and the finiteness check), one pass writing
// e = exp(z - max) into a per-thread row buffer of C accumulation elements (L1/L2-resident;
// 200 KB at C = 50304 in float) and summing it, then per direction one dot product p . r and one
// write of p * (r - p . r) / M. Nothing of size k x C is materialized besides the output; the
// logits row is read twice and each direction row twice (the second read from cache).
//
// act_derivs: one pass over z writing sigma, sigma', sigma''. Float, half and bfloat16 run on
// float vectors with polynomial exp / erf / tanh (errors measured against float64: exp 1 ulp,
// erf and tanh 2 ulp; see tests/test_hvp.py); float64 runs a scalar loop over the libm
// functions (exact to libm's accuracy; float64 is the precision of tests, not of speed).
//
// Inner loops use GCC/Clang vector extensions (64-byte vectors) and are compiled once per
// instruction-set level (target_clones, see LANDSCAPE_MULTIVERSION in cpu/simd.h).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"
#include "hvp.h"
#include "stable_api.h"

namespace landscape_ext {
namespace hvp {
namespace {

// ---- SIMD building blocks (cpu/simd.h: Vec, load_vec) -------------------------------------------
using simd::load_vec;
using simd::Vec;

// Store L lanes as dst_t (round to nearest even for the narrowing conversions).
template <typename dst_t, typename acc_t>
LANDSCAPE_ALWAYS_INLINE void store_vec(dst_t* p, typename Vec<acc_t>::type v) {
  using Tr = Vec<acc_t>;
  if constexpr (std::is_same_v<dst_t, acc_t>) {
    std::memcpy(p, &v, sizeof(v));
  } else if constexpr (std::is_same_v<dst_t, double>) {
    typename Tr::f64 s = __builtin_convertvector(v, typename Tr::f64);
    std::memcpy(p, &s, sizeof(s));
  } else if constexpr (std::is_same_v<dst_t, float>) {
    typename Tr::f32 s = __builtin_convertvector(v, typename Tr::f32);
    std::memcpy(p, &s, sizeof(s));
  } else if constexpr (std::is_same_v<dst_t, c10::BFloat16>) {
    typename Tr::f32 f = __builtin_convertvector(v, typename Tr::f32);
    typename Tr::u32 u;
    std::memcpy(&u, &f, sizeof(u));
    u = u + 0x7FFFu + ((u >> 16) & 1u);
    typename Tr::u16 h = __builtin_convertvector(u >> 16, typename Tr::u16);
    std::memcpy(p, &h, sizeof(h));
  } else {
    static_assert(std::is_same_v<dst_t, c10::Half>, "unsupported type");
    typename Tr::f16 h = __builtin_convertvector(__builtin_convertvector(v, typename Tr::f32),
                                                 typename Tr::f16);
    std::memcpy(p, &h, sizeof(h));
  }
}

// Up to L elements (a row tail) through a padded lane buffer, so tails take the vector path too.
template <typename acc_t, typename src_t>
LANDSCAPE_ALWAYS_INLINE typename Vec<acc_t>::type load_tail(const src_t* p, int64_t n,
                                                            acc_t pad) {
  constexpr int L = Vec<acc_t>::L;
  acc_t tmp[L];
  for (int i = 0; i < L; ++i) tmp[i] = i < n ? static_cast<acc_t>(p[i]) : pad;
  typename Vec<acc_t>::type v;
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}

template <typename dst_t, typename acc_t>
LANDSCAPE_ALWAYS_INLINE void store_tail(dst_t* p, typename Vec<acc_t>::type v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<dst_t>(v[i]);
}

template <typename V>
LANDSCAPE_ALWAYS_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}
template <typename V>
LANDSCAPE_ALWAYS_INLINE V vmin(V a, V b) {
  return a < b ? a : b;
}

// ---- vector math (float lanes: polynomials; double lanes: libm per lane) ----------------------
using VF = Vec<float>::type;
using VI = Vec<float>::itype;
using VD = Vec<double>::type;

// Horner's rule: c0 x^n + c1 x^(n-1) + ... + cn, highest coefficient first, as the chain
// p = p * x + c (that order of operations fixes the rounding).
template <typename... Cs>
LANDSCAPE_ALWAYS_INLINE VF horner(VF x, float c0, Cs... cs) {
  VF p = VF{} + c0;
  ((p = p * x + cs), ...);
  return p;
}

// exp(x): Cephes expf (x = n ln2 + g, |g| <= ln2 / 2, degree-6 polynomial), 2^n by exponent
// bits. exp(x) = 0 below -87.34 (no denormals); clamped to exp(88.376) = 2.4e38 above.
LANDSCAPE_ALWAYS_INLINE VF exp_v(VF x_in) {
  const VF x = vmin(vmax(x_in, VF{} - 87.3365447504f), VF{} + 88.3762626647949f);
  const VF magic = VF{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to integer
  const VF r = (x * 1.44269504088896341f + magic) - magic;
  const VF g = (x - r * 0.693359375f) - r * -2.12194440e-4f;
  VF y = horner(g, 1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                1.6666665459e-1f, 5.0000001201e-1f);
  y = y * (g * g) + g + 1.0f;
  const VI n = __builtin_convertvector(r, VI);
  const VI bits = (n + 127) << 23;
  y = y * (VF)bits;  // vector cast = bit reinterpretation
  return x_in < -87.3365447504f ? VF{} : y;
}

// erf(x): |x| <= 1: x P(x^2) (degree 6, relative error 1.4e-9 in exact arithmetic);
// 1 < |x|: 1 - exp(-x^2 + Q(|x| - 2.5)) (Q degree 8 fit of log(erfc t) + t^2 on [1, 4], error
// 1.3e-8); |x| >= 4 rounds to +-1. Coefficients: least squares on Chebyshev nodes in float64.
LANDSCAPE_ALWAYS_INLINE VF erf_v(VF x) {
  const VF a = vmin(x < 0.0f ? -x : x, VF{} + 4.0f);
  const VF s = x * x;
  const VF p = horner(s, 7.8824971112e-05f, -8.0188549936e-04f, 5.1893119428e-03f,
                      -2.6854328796e-02f, 1.1283597463e-01f, -3.7612626904e-01f,
                      1.1283791659e+00f);
  const VF small = x * p;
  const VF t = a - 2.5f;
  const VF q = horner(t, 1.6140616098e-06f, -1.3309390388e-05f, 7.7394425534e-05f,
                      -4.2014456753e-04f, 2.1651603097e-03f, -1.0858517013e-02f,
                      5.6106359727e-02f, -3.5268068107e-01f, -1.5568152771e+00f);
  const VF big_abs = 1.0f - exp_v(q - a * a);
  const VF big = x < 0.0f ? -big_abs : big_abs;
  return a <= 1.0f ? small : big;
}

// tanh(x): Cephes tanhf: odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above.
LANDSCAPE_ALWAYS_INLINE VF tanh_v(VF x) {
  const VF a = x < 0.0f ? -x : x;
  const VF z = x * x;
  const VF p = horner(z, -5.70498872745e-3f, 2.06390887954e-2f, -5.37397155531e-2f,
                      1.33314422036e-1f, -3.33332819422e-1f);
  const VF small = p * z * x + x;
  const VF big_abs = 1.0f - 2.0f / (exp_v(a + a) + 1.0f);
  const VF big = x < 0.0f ? -big_abs : big_abs;
  return a < 0.625f ? small : big;
}

LANDSCAPE_ALWAYS_INLINE VD exp_v(VD x) {
  VD y;
  for (int i = 0; i < Vec<double>::L; ++i) y[i] = std::exp(x[i]);
  return y;
}

// sigma, sigma', sigma'' on float lanes (the formulas of act_eval in hvp.h).
template <int64_t ACT>
LANDSCAPE_ALWAYS_INLINE void act_v(VF z, VF& a, VF& d1, VF& d2) {
  if constexpr (ACT == kReLU) {
    const VF one = VF{} + 1.0f;
    a = z > 0.0f ? z : VF{};
    d1 = z > 0.0f ? one : VF{};
    d2 = VF{};
  } else if constexpr (ACT == kGELU) {
    const VF Phi = 0.5f * (1.0f + erf_v(z * 0.70710678118654752440f));
    const VF phi = exp_v(-0.5f * z * z) * 0.39894228040143267794f;
    a = z * Phi;
    d1 = Phi + z * phi;
    d2 = phi * (2.0f - z * z);
  } else if constexpr (ACT == kTanh) {
    const VF t = tanh_v(z);
    const VF u = 1.0f - t * t;
    a = t;
    d1 = u;
    d2 = -2.0f * t * u;
  } else if constexpr (ACT == kSiLU) {
    const VF s = 1.0f / (1.0f + exp_v(-z));
    const VF u = s * (1.0f - s);
    a = z * s;
    d1 = s + z * u;
    d2 = u * (2.0f + z * (1.0f - 2.0f * s));
  } else {
    a = z;
    d1 = VF{} + 1.0f;
    d2 = VF{};
  }
}

// ---- act_derivs ---------------------------------------------------------------------------------
struct ActArgs {
  int64_t act;
  const void* z;
  void* a;
  void* d1;
  void* d2;
  int64_t n;
};

template <int64_t ACT, typename scalar_t>
LANDSCAPE_ALWAYS_INLINE void act_loop_float(const scalar_t* z, scalar_t* a, scalar_t* d1,
                                            scalar_t* d2, int64_t n) {
  constexpr int L = Vec<float>::L;
  const int64_t main = n - n % L;
  VF va, v1, v2;
  for (int64_t i = 0; i < main; i += L) {
    act_v<ACT>(load_vec<float>(z + i), va, v1, v2);
    store_vec<scalar_t, float>(a + i, va);
    store_vec<scalar_t, float>(d1 + i, v1);
    store_vec<scalar_t, float>(d2 + i, v2);
  }
  if (main < n) {
    act_v<ACT>(load_tail<float>(z + main, n - main, 0.0f), va, v1, v2);
    store_tail<scalar_t, float>(a + main, va, n - main);
    store_tail<scalar_t, float>(d1 + main, v1, n - main);
    store_tail<scalar_t, float>(d2 + main, v2, n - main);
  }
}

template <typename scalar_t>
LANDSCAPE_ALWAYS_INLINE void act_range_impl(const ActArgs& g) {
  const scalar_t* z = static_cast<const scalar_t*>(g.z);
  scalar_t* a = static_cast<scalar_t*>(g.a);
  scalar_t* d1 = static_cast<scalar_t*>(g.d1);
  scalar_t* d2 = static_cast<scalar_t*>(g.d2);
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t i = 0; i < g.n; ++i) act_eval<double>(g.act, z[i], a[i], d1[i], d2[i]);
  } else {
    switch (g.act) {
      case kReLU: act_loop_float<kReLU>(z, a, d1, d2, g.n); break;
      case kGELU: act_loop_float<kGELU>(z, a, d1, d2, g.n); break;
      case kTanh: act_loop_float<kTanh>(z, a, d1, d2, g.n); break;
      case kSiLU: act_loop_float<kSiLU>(z, a, d1, d2, g.n); break;
      default: act_loop_float<kIdentity>(z, a, d1, d2, g.n); break;
    }
  }
}

LANDSCAPE_MULTIVERSION void act_range_f(const ActArgs& g) { act_range_impl<float>(g); }
LANDSCAPE_MULTIVERSION void act_range_h(const ActArgs& g) { act_range_impl<c10::Half>(g); }
LANDSCAPE_MULTIVERSION void act_range_bf(const ActArgs& g) { act_range_impl<c10::BFloat16>(g); }
void act_range_d(const ActArgs& g) { act_range_impl<double>(g); }

std::tuple<Tensor, Tensor, Tensor> act_derivs_cpu(const Tensor& z_in, int64_t act) {
  const ActCall call = prepare_act_derivs(z_in, act);
  const Tensor& z = call.z;
  const int64_t n = z.numel();
  if (n == 0) return {call.a, call.d1, call.d2};
  void (*fn)(const ActArgs&) = nullptr;
  switch (z.scalar_type()) {
    case kDouble: fn = &act_range_d; break;
    case kFloat: fn = &act_range_f; break;
    case kHalf: fn = &act_range_h; break;
    default: fn = &act_range_bf; break;
  }
  const int64_t elem = z.element_size();
  const char* zp = static_cast<const char*>(z.data_ptr());
  char* ap = static_cast<char*>(call.a.data_ptr());
  char* d1p = static_cast<char*>(call.d1.data_ptr());
  char* d2p = static_cast<char*>(call.d2.data_ptr());
  // grain: 16K elements (whole vectors) per task
  torch::stable::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    ActArgs g{act, zp + begin * elem, ap + begin * elem, d1p + begin * elem, d2p + begin * elem,
              end - begin};
    fn(g);
  });
  return {call.a, call.d1, call.d2};
}

// ---- xent_hvp -----------------------------------------------------------------------------------
// One task of xent_hvp: the call (hvp.h) and this task's rows and buffer.
struct XentArgs : XentLayout {
  double scale;        // 1 / M
  int64_t begin, end;  // rows of this task
  void* buf;           // C accumulation elements (64-byte aligned)
  int64_t bad_row;     // out: first row in [begin, end) with non-finite logits, or -1
};

template <typename V>
LANDSCAPE_ALWAYS_INLINE auto hsum(V v) {
  auto s = v[0];
  for (size_t i = 1; i < sizeof(V) / sizeof(s); ++i) s += v[i];
  return s;
}

template <typename logit_t, typename dir_t, typename acc_t>
LANDSCAPE_ALWAYS_INLINE void xent_rows_impl(XentArgs& g) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::L;
  const int64_t C = g.C, main = C - C % L, tail = C - main;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  acc_t* buf = static_cast<acc_t*>(g.buf);
  dir_t* out0 = static_cast<dir_t*>(g.out);
  for (int64_t n = g.begin; n < g.end; ++n) {
    bool zero = g.target[n] == g.ignore_index;
    const logit_t* z = static_cast<const logit_t*>(g.logits) + n * g.ls;
    acc_t m = -inf;
    if (!zero) {
      // pass 1: max, and x - x (0 for finite x, NaN for +-inf and NaN) summed as the finite check
      V mv = V{} - inf, chk = V{};
      for (int64_t c = 0; c < main; c += L) {
        const V x = load_vec<acc_t>(z + c);
        mv = vmax(mv, x);
        chk += x - x;
      }
      if (tail) {
        const V x = load_tail<acc_t>(z + main, tail, -inf);
        mv = vmax(mv, x);
        const V xf = load_tail<acc_t>(z + main, tail, acc_t(0));
        chk += xf - xf;
      }
      for (int i = 0; i < L; ++i) m = std::max(m, mv[i]);
      const acc_t c_sum = hsum(chk);
      if (!(c_sum == acc_t(0)) || !std::isfinite(m)) {
        if (g.bad_row < 0) g.bad_row = n;
        zero = true;
      }
    }
    if (zero) {
      for (int64_t j = 0; j < g.k; ++j) {
        dir_t* o = out0 + (j * g.N + n) * C;
        std::memset(static_cast<void*>(o), 0, C * sizeof(dir_t));
      }
      continue;
    }
    // pass 2: e = exp(z - m) into the row buffer, and its sum
    V sv = V{};
    for (int64_t c = 0; c < main; c += L) {
      const V e = exp_v(load_vec<acc_t>(z + c) - m);
      std::memcpy(buf + c, &e, sizeof(V));
      sv += e;
    }
    if (tail) {
      const V e = exp_v(load_tail<acc_t>(z + main, tail, -inf) - m);  // padding: exp(-inf) = 0
      for (int64_t i = 0; i < tail; ++i) buf[main + i] = e[i];
      sv += e;
    }
    const acc_t inv = acc_t(1) / hsum(sv);
    const acc_t f = static_cast<acc_t>(g.scale) * inv;
    // per direction: p . r, then out = e (r - p . r) f  with p = e * inv
    for (int64_t j = 0; j < g.k; ++j) {
      const dir_t* r = static_cast<const dir_t*>(g.dirs) + j * g.dsk + n * g.dsn;
      dir_t* o = out0 + (j * g.N + n) * C;
      V d0 = V{}, d1 = V{};
      int64_t c = 0;
      for (; c + 2 * L <= main; c += 2 * L) {
        V e0, e1;
        std::memcpy(&e0, buf + c, sizeof(V));
        std::memcpy(&e1, buf + c + L, sizeof(V));
        d0 += e0 * load_vec<acc_t>(r + c);
        d1 += e1 * load_vec<acc_t>(r + c + L);
      }
      for (; c < main; c += L) {
        V e0;
        std::memcpy(&e0, buf + c, sizeof(V));
        d0 += e0 * load_vec<acc_t>(r + c);
      }
      acc_t dot = hsum(d0 + d1);
      for (int64_t i = main; i < C; ++i) dot += buf[i] * static_cast<acc_t>(r[i]);
      const acc_t pr = dot * inv;
      for (c = 0; c < main; c += L) {
        V e0;
        std::memcpy(&e0, buf + c, sizeof(V));
        store_vec<dir_t, acc_t>(o + c, e0 * (load_vec<acc_t>(r + c) - pr) * f);
      }
      for (int64_t i = main; i < C; ++i)
        o[i] = static_cast<dir_t>(buf[i] * (static_cast<acc_t>(r[i]) - pr) * f);
    }
  }
}

template <typename A, typename B>
using acc_of = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>, double,
                                  float>;

#define LANDSCAPE_DEFINE_XENT(NAME, LT, DT) \
  LANDSCAPE_MULTIVERSION void NAME(XentArgs& g) { xent_rows_impl<LT, DT, acc_of<LT, DT>>(g); }
LANDSCAPE_DEFINE_XENT(xent_d_d, double, double)
LANDSCAPE_DEFINE_XENT(xent_d_f, double, float)
LANDSCAPE_DEFINE_XENT(xent_d_h, double, c10::Half)
LANDSCAPE_DEFINE_XENT(xent_d_bf, double, c10::BFloat16)
LANDSCAPE_DEFINE_XENT(xent_f_d, float, double)
LANDSCAPE_DEFINE_XENT(xent_f_f, float, float)
LANDSCAPE_DEFINE_XENT(xent_f_h, float, c10::Half)
LANDSCAPE_DEFINE_XENT(xent_f_bf, float, c10::BFloat16)
LANDSCAPE_DEFINE_XENT(xent_h_d, c10::Half, double)
LANDSCAPE_DEFINE_XENT(xent_h_f, c10::Half, float)
LANDSCAPE_DEFINE_XENT(xent_h_h, c10::Half, c10::Half)
LANDSCAPE_DEFINE_XENT(xent_h_bf, c10::Half, c10::BFloat16)
LANDSCAPE_DEFINE_XENT(xent_bf_d, c10::BFloat16, double)
LANDSCAPE_DEFINE_XENT(xent_bf_f, c10::BFloat16, float)
LANDSCAPE_DEFINE_XENT(xent_bf_h, c10::BFloat16, c10::Half)
LANDSCAPE_DEFINE_XENT(xent_bf_bf, c10::BFloat16, c10::BFloat16)
#undef LANDSCAPE_DEFINE_XENT

using XentFn = void (*)(XentArgs&);

int dtype_index(ScalarType t) {
  switch (t) {
    case kDouble: return 0;
    case kFloat: return 1;
    case kHalf: return 2;
    default: return 3;  // bfloat16 (checked)
  }
}

XentFn pick_xent(ScalarType logits, ScalarType dirs) {
  static const XentFn table[4][4] = {
      {&xent_d_d, &xent_d_f, &xent_d_h, &xent_d_bf},
      {&xent_f_d, &xent_f_f, &xent_f_h, &xent_f_bf},
      {&xent_h_d, &xent_h_f, &xent_h_h, &xent_h_bf},
      {&xent_bf_d, &xent_bf_f, &xent_bf_h, &xent_bf_bf},
  };
  return table[dtype_index(logits)][dtype_index(dirs)];
}

Tensor xent_hvp_cpu(const Tensor& logits_in, const Tensor& target_in,
                    const Tensor& directions_in, double label_smoothing, int64_t ignore_index) {
  const XentCall call =
      prepare_xent_hvp(logits_in, target_in, directions_in, label_smoothing, ignore_index);
  const int64_t N = call.layout.N, C = call.layout.C, k = call.layout.k;
  const int64_t M = xent_count_rows_cpu(call.target, C, ignore_index);
  if (N == 0) return call.out;
  const XentFn fn = pick_xent(call.logits.scalar_type(), call.dirs.scalar_type());
  const bool dbl = call.logits.scalar_type() == kDouble || call.dirs.scalar_type() == kDouble;
  const int64_t acc_elem = dbl ? 8 : 4;
  const double scale = M > 0 ? 1.0 / static_cast<double>(M) : 0.0;
  std::atomic<int64_t> bad{N};
  // grain: about 64K elements of work (logits + directions) per task
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, C * (k + 2)));
  torch::stable::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<char> raw(static_cast<size_t>((C + 16) * acc_elem + 64));
    void* buf = reinterpret_cast<void*>(
        (reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63));
    XentArgs g{call.layout, scale, begin, end, buf, -1};
    fn(g);
    if (g.bad_row >= 0) {
      int64_t cur = bad.load();
      while (g.bad_row < cur && !bad.compare_exchange_weak(cur, g.bad_row)) {
      }
    }
  });
  if (bad.load() < N) xent_non_finite_logits(bad.load(), N);
  return call.out;
}

}  // namespace
}  // namespace hvp
}  // namespace landscape_ext

STABLE_TORCH_LIBRARY_IMPL(landscape_ext, CPU, m) {
  m.impl("xent_hvp", TORCH_BOX(&landscape_ext::hvp::xent_hvp_cpu));
  m.impl("act_derivs", TORCH_BOX(&landscape_ext::hvp::act_derivs_cpu));
}
