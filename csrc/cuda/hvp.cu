// hvp op family, CUDA backend: xent_hvp and act_derivs (see hvp.h) and their registration for the
// CUDA dispatch key.
//
// xent_hvp: a group of G threads per row (G = 32, a warp, for C <= 512: 8 rows per 256-thread
// block; else G = 256, one row per block). Two stages per row: (1) max and sum of exp(z - max)
// (with the finiteness check) reduced over the group; (2) per direction the dot p . r reduced over
// the group, then the write p * (r - p . r) / M. p is cached in shared memory when the block's
// rows fit (C <= 1536 per warp row, C <= 12288 per block row, float accumulation), otherwise it
// is recomputed from the logits (expf; the SFUs have headroom against the memory traffic). Nothing
// of size k x C is materialized besides the output. Accumulation in float for half types, double
// for float64.
//
// M (the count of non-ignored rows) and the target range check come from a one-block prologue
// kernel that writes to a 3-entry device workspace [M, first bad target row, first non-finite
// logits row]; the main kernel reads M from it (no host round trip in between). One device-to-host
// copy of the workspace after the main kernel turns the flags into errors.
//
// act_derivs: a grid-stride elementwise kernel over act_eval (hvp.h) in the accumulation type.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "cuda/common.cuh"
#include "hvp.h"

namespace landscape_ext {
namespace hvp {
namespace {

using cuda::from_acc;
using cuda::to_acc;

constexpr int kThreads = 256;             // threads per block of both xent kernels
constexpr int kSmemBytes = 48 * 1024;     // p cache budget per block (default dynamic limit)

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// Reduce v over a group of G threads (G = 32: one warp; G = kThreads: the whole block, one group).
// Every thread gets the result. scratch: kThreads / 32 elements of shared memory.
template <int G, typename T, typename Op>
__device__ __forceinline__ T group_reduce(T v, Op op, T* scratch) {
  constexpr int W = G < 32 ? G : 32;
#pragma unroll
  for (int off = W / 2; off > 0; off /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, off, W));
  if constexpr (G > 32) {
    const int warp = threadIdx.x / 32;
    if ((threadIdx.x & 31) == 0) scratch[warp] = v;
    __syncthreads();
    T r = scratch[0];
#pragma unroll
    for (int w = 1; w < G / 32; ++w) r = op(r, scratch[w]);
    __syncthreads();  // scratch is reused by the next reduction
    return r;
  } else {
    return v;
  }
}

// ws[0] = M (rows with target != ignore_index), ws[1] = first row with a target outside [0, C)
// that is not ignore_index (N if none), ws[2] = N (the main kernel lowers it to the first row
// with non-finite logits). One block.
__global__ void xent_prologue_kernel(const int64_t* __restrict__ target, int64_t N, int64_t C,
                                     int64_t ignore_index, long long* __restrict__ ws) {
  __shared__ long long s_count[kThreads / 32];
  __shared__ unsigned long long s_bad;
  if (threadIdx.x == 0) s_bad = static_cast<unsigned long long>(N);
  __syncthreads();
  long long count = 0;
  unsigned long long bad = static_cast<unsigned long long>(N);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const int64_t v = target[i];
    if (v == ignore_index) continue;
    if (v < 0 || v >= C) {
      bad = min(bad, static_cast<unsigned long long>(i));
    } else {
      ++count;
    }
  }
  if (bad < static_cast<unsigned long long>(N)) atomicMin(&s_bad, bad);
  count = group_reduce<kThreads>(count, SumOp{}, s_count);
  if (threadIdx.x == 0) {
    ws[0] = count;
    ws[1] = static_cast<long long>(s_bad);
    ws[2] = static_cast<long long>(N);
  }
}

// The call (hvp.h) and the device state of the kernel.
struct XentParams : XentLayout {
  long long* ws;  // [M, bad target row, first non-finite row]
  bool cache;     // p cached in dynamic shared memory (rows_per_block * C acc elements)
};

template <typename logit_t, typename dir_t, typename acc_t, int G>
__global__ void __launch_bounds__(kThreads) xent_hvp_kernel(const XentParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ acc_t scratch[kThreads / 32];
  __shared__ int iscratch[kThreads / 32];
  constexpr int kRows = kThreads / G;
  const int group = threadIdx.x / G, lane = threadIdx.x % G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + group;
  if (row >= p.N) return;  // G == 32 only (G == kThreads launches exactly N blocks)
  const int64_t C = p.C;
  const logit_t* z = static_cast<const logit_t*>(p.logits) + row * p.ls;
  dir_t* out = static_cast<dir_t*>(p.out);
  acc_t* pbuf = reinterpret_cast<acc_t*>(smem_raw) + group * C;

  bool zero = p.target[row] == p.ignore_index;
  acc_t m = -INFINITY;
  if (!zero) {
    int bad = 0;
    for (int64_t c = lane; c < C; c += G) {
      const acc_t x = to_acc<acc_t>(z[c]);
      bad |= !isfinite(x);
      m = x > m ? x : m;
    }
    m = group_reduce<G>(m, MaxOp{}, scratch);
    bad = group_reduce<G>(bad, MaxOp{}, iscratch);
    if (bad) {
      if (lane == 0) atomicMin(&p.ws[2], static_cast<long long>(row));
      zero = true;
    }
  }
  if (zero) {
    for (int64_t j = 0; j < p.k; ++j) {
      dir_t* o = out + (j * p.N + row) * C;
      for (int64_t c = lane; c < C; c += G) o[c] = from_acc<dir_t>(acc_t(0));
    }
    return;
  }
  acc_t s = 0;
  for (int64_t c = lane; c < C; c += G) {
    const acc_t e = le_exp(to_acc<acc_t>(z[c]) - m);
    if (p.cache) pbuf[c] = e;  // each thread reads back only what it wrote: no barrier needed
    s += e;
  }
  s = group_reduce<G>(s, SumOp{}, scratch);
  const acc_t inv = acc_t(1) / s;
  const long long M = p.ws[0];
  const acc_t f = M > 0 ? inv / static_cast<acc_t>(M) : acc_t(0);
  for (int64_t j = 0; j < p.k; ++j) {
    const dir_t* r = static_cast<const dir_t*>(p.dirs) + j * p.dsk + row * p.dsn;
    dir_t* o = out + (j * p.N + row) * C;
    acc_t dot = 0;
    for (int64_t c = lane; c < C; c += G) {
      const acc_t e = p.cache ? pbuf[c] : le_exp(to_acc<acc_t>(z[c]) - m);
      dot += e * to_acc<acc_t>(r[c]);
    }
    const acc_t pr = group_reduce<G>(dot, SumOp{}, scratch) * inv;
    for (int64_t c = lane; c < C; c += G) {
      const acc_t e = p.cache ? pbuf[c] : le_exp(to_acc<acc_t>(z[c]) - m);
      o[c] = from_acc<dir_t>(e * (to_acc<acc_t>(r[c]) - pr) * f);
    }
  }
}

template <typename logit_t, typename dir_t>
void launch_xent(XentParams p, cudaStream_t stream) {
  using acc_t = std::conditional_t<std::is_same_v<logit_t, double> || std::is_same_v<dir_t, double>,
                                   double, float>;
  if (p.C <= 512) {
    constexpr int G = 32;
    const int64_t rows = kThreads / G;
    const size_t smem = static_cast<size_t>(rows * p.C) * sizeof(acc_t);
    p.cache = smem <= static_cast<size_t>(kSmemBytes);
    const int64_t blocks = (p.N + rows - 1) / rows;
    xent_hvp_kernel<logit_t, dir_t, acc_t, G>
        <<<static_cast<unsigned>(blocks), kThreads, p.cache ? smem : 0, stream>>>(p);
  } else {
    constexpr int G = kThreads;
    const size_t smem = static_cast<size_t>(p.C) * sizeof(acc_t);
    p.cache = smem <= static_cast<size_t>(kSmemBytes);
    xent_hvp_kernel<logit_t, dir_t, acc_t, G>
        <<<static_cast<unsigned>(p.N), kThreads, p.cache ? smem : 0, stream>>>(p);
  }
  LE_CUDA_KERNEL_LAUNCH_CHECK();
}

// The message AT_DISPATCH raised for a dtype outside its list (unreachable: the checks of
// hvp_common.cpp admit the four float dtypes only).
[[noreturn]] void unsupported_dtype(const char* op, ScalarType t) {
  LE_FAIL("\"", op, "\" not implemented for '", t, "'");
}

// launch_xent<logit_t, dir_t> for the directions' dtype (the switch AT_DISPATCH was).
template <typename logit_t>
void launch_xent_for_dirs(ScalarType dir_type, const XentParams& p, cudaStream_t stream) {
  switch (dir_type) {
    case kDouble: launch_xent<logit_t, double>(p, stream); break;
    case kFloat: launch_xent<logit_t, float>(p, stream); break;
    case kHalf: launch_xent<logit_t, c10::Half>(p, stream); break;
    case kBFloat16: launch_xent<logit_t, c10::BFloat16>(p, stream); break;
    default: unsupported_dtype("xent_hvp", dir_type);
  }
}

Tensor xent_hvp_cuda(const Tensor& logits_in, const Tensor& target_in,
                     const Tensor& directions_in, double label_smoothing, int64_t ignore_index) {
  const XentCall call =
      prepare_xent_hvp(logits_in, target_in, directions_in, label_smoothing, ignore_index);
  const cuda::DeviceGuard guard(logits_in);
  const int64_t N = call.layout.N, C = call.layout.C;
  if (N == 0) return call.out;
  LE_CHECK(N < (int64_t(1) << 31), "xent_hvp: N = ", N, " rows exceeds the CUDA grid limit");
  Tensor ws = empty_as(call.target, {3});
  cudaStream_t stream = cuda::current_stream(logits_in);
  long long* wsp = reinterpret_cast<long long*>(ws.mutable_data_ptr<int64_t>());
  xent_prologue_kernel<<<1, kThreads, 0, stream>>>(call.target.const_data_ptr<int64_t>(), N, C,
                                                   ignore_index, wsp);
  LE_CUDA_KERNEL_LAUNCH_CHECK();
  XentParams p{call.layout, wsp, false};
  const ScalarType logit_type = call.logits.scalar_type(), dir_type = call.dirs.scalar_type();
  switch (logit_type) {
    case kDouble: launch_xent_for_dirs<double>(dir_type, p, stream); break;
    case kFloat: launch_xent_for_dirs<float>(dir_type, p, stream); break;
    case kHalf: launch_xent_for_dirs<c10::Half>(dir_type, p, stream); break;
    case kBFloat16: launch_xent_for_dirs<c10::BFloat16>(dir_type, p, stream); break;
    default: unsupported_dtype("xent_hvp", logit_type);
  }
  const Tensor flags = to_cpu(ws);  // the one synchronization of the op
  const int64_t* f = flags.const_data_ptr<int64_t>();
  if (f[1] < N) {
    // the offending value: one element of target copied to the CPU (the error path only)
    const Tensor value = to_cpu(narrow(call.target, 0, f[1], 1));
    xent_bad_target(f[1], *value.const_data_ptr<int64_t>(), C, ignore_index);
  }
  if (f[2] < N) xent_non_finite_logits(f[2], N);
  return call.out;
}

// ---- act_derivs ---------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void act_derivs_kernel(const scalar_t* __restrict__ z, scalar_t* __restrict__ a,
                                  scalar_t* __restrict__ d1, scalar_t* __restrict__ d2,
                                  int64_t n, int64_t act) {
  using acc_t = cuda::opmath_t<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    acc_t va, v1, v2;
    act_eval<acc_t>(act, to_acc<acc_t>(z[i]), va, v1, v2);
    a[i] = from_acc<scalar_t>(va);
    d1[i] = from_acc<scalar_t>(v1);
    d2[i] = from_acc<scalar_t>(v2);
  }
}

template <typename scalar_t>
void launch_act_derivs(const ActCall& call, int64_t n, int64_t act, int64_t blocks, int threads,
                       cudaStream_t stream) {
  act_derivs_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      call.z.const_data_ptr<scalar_t>(), call.a.mutable_data_ptr<scalar_t>(),
      call.d1.mutable_data_ptr<scalar_t>(), call.d2.mutable_data_ptr<scalar_t>(), n, act);
  LE_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor, Tensor> act_derivs_cuda(const Tensor& z_in, int64_t act) {
  const ActCall call = prepare_act_derivs(z_in, act);
  const cuda::DeviceGuard guard(z_in);
  const Tensor& z = call.z;
  const int64_t n = z.numel();
  if (n == 0) return {call.a, call.d1, call.d2};
  cudaStream_t stream = cuda::current_stream(z);
  const int threads = 256;
  int sms = 0;
  LE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                       static_cast<int>(z.get_device_index())));
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t(sms) * 8);
  switch (z.scalar_type()) {
    case kDouble: launch_act_derivs<double>(call, n, act, blocks, threads, stream); break;
    case kFloat: launch_act_derivs<float>(call, n, act, blocks, threads, stream); break;
    case kHalf: launch_act_derivs<c10::Half>(call, n, act, blocks, threads, stream); break;
    case kBFloat16: launch_act_derivs<c10::BFloat16>(call, n, act, blocks, threads, stream); break;
    default: unsupported_dtype("act_derivs", z.scalar_type());
  }
  return {call.a, call.d1, call.d2};
}

}  // namespace
}  // namespace hvp
}  // namespace landscape_ext

STABLE_TORCH_LIBRARY_IMPL(landscape_ext, CUDA, m) {
  m.impl("xent_hvp", TORCH_BOX(&landscape_ext::hvp::xent_hvp_cuda));
  m.impl("act_derivs", TORCH_BOX(&landscape_ext::hvp::act_derivs_cuda));
}
