// sketch op family, CUDA backend: the fused direct sketch kernel (see sketch.h) and the
// registration of linear_grad_sketch / linear_grad_project for the CUDA dispatch key.
//
// y_row[r, j] = e_r^T V_j a_r is a GEMM C_j = A V_j^T (R x n_out, inner dimension n_in) whose
// epilogue reduces each row of C_j against the same row of E, so C (R x l x n_out in the
// plain-PyTorch composition) never reaches global memory.
//
// Kernel design:
//   grid      (row tile of BM = 64 rows, direction j); a block owns its 64 y entries of column j
//             and loops over all of n_out, so there are no atomics: results are bitwise
//             reproducible for a given device and shape.
//   tile      per (BN = 64 columns of n_out) x (BK = 16 of n_in) step, the block stages A (BM x
//             BK) and V_j (BN x BK) in shared memory, k-major, zero-filled out of range (no tails
//             in the FMA loop). 256 threads, each owning a 4 x 4 micro-tile of C (rows ty + 16 p,
//             columns tx + 16 q: conflict-free shared-memory reads, broadcasts for A).
//   epilogue  after the n_in loop of a column tile: part[p] += sum_q C[p][q] * e[row, col]; at the
//             end the 16 column-threads of a row combine their parts with a fixed-order
//             shuffle butterfly (they are one half-warp) and one writes y_row[r, j].
// Accumulation in the input precision (float or double). CUDA cores, not tensor cores: TF32
// would lose the float32 accuracy the reference promises.
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h>

#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"
#include "sketch.h"
#include "stable_api.h"

namespace landscape_ext {
namespace sketch {
namespace {

constexpr int kBM = 64;       // rows of A per block
constexpr int kBN = 64;       // columns of C (entries of n_out) per tile
constexpr int kBK = 16;       // inner-dimension step
constexpr int kThreads = 256; // 16 x 16 threads, 4 x 4 micro-tile each
constexpr int kMaxGridY = 65535;

// Rows [row0, row0 + kRows) x columns [k0, k0 + kBK) of the row-major (rows x n_in) matrix src
// into dst, k-major (dst[kk][row]); zeros outside the matrix, so the FMA loop has no tails.
template <typename T, int kRows>
__device__ __forceinline__ void stage_rows(T (&dst)[kBK][kRows + 1], const T* __restrict__ src,
                                           int64_t row0, int64_t rows, int64_t n_in, int64_t k0,
                                           int tid) {
#pragma unroll
  for (int u = 0; u < (kRows * kBK) / kThreads; ++u) {
    const int e = tid + u * kThreads;
    const int row = e / kBK, kk = e % kBK;
    const int64_t gr = row0 + row, gk = k0 + kk;
    dst[kk][row] = (gr < rows && gk < n_in) ? src[gr * n_in + gk] : T(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
direct_sketch_kernel(const T* __restrict__ A, const T* __restrict__ E, const T* __restrict__ V,
                     int64_t v_stride, T* __restrict__ y, int64_t R, int64_t n_in, int64_t n_out,
                     int64_t l) {
  __shared__ T As[kBK][kBM + 1];
  __shared__ T Vs[kBK][kBN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16;  // column group
  const int ty = tid / 16;  // row group
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM;

  for (int64_t j = blockIdx.y; j < l; j += gridDim.y) {
    const T* Vj = V + j * v_stride;
    T part[4] = {T(0), T(0), T(0), T(0)};
    for (int64_t o0 = 0; o0 < n_out; o0 += kBN) {
      T acc[4][4];
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[p][q] = T(0);
      for (int64_t k0 = 0; k0 < n_in; k0 += kBK) {
        // stage A (BM x BK) and V_j (BN x BK), k-major; 4 elements of each per thread
        stage_rows<T, kBM>(As, A, r0, R, n_in, k0, tid);
        stage_rows<T, kBN>(Vs, Vj, o0, n_out, n_in, k0, tid);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kBK; ++kk) {
          T a[4], v[4];
#pragma unroll
          for (int p = 0; p < 4; ++p) a[p] = As[kk][ty + 16 * p];
#pragma unroll
          for (int q = 0; q < 4; ++q) v[q] = Vs[kk][tx + 16 * q];
#pragma unroll
          for (int p = 0; p < 4; ++p)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[p][q] += a[p] * v[q];
        }
        __syncthreads();
      }
      // epilogue: reduce the C tile against E
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const int64_t gr = r0 + ty + 16 * p;
        if (gr < R) {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int64_t go = o0 + tx + 16 * q;
            if (go < n_out) part[p] += acc[p][q] * E[gr * n_out + go];
          }
        }
      }
    }
    // the 16 column-threads of a row are lanes tx = 0..15 of one half-warp
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      T s = part[p];
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off, 16);
      const int64_t gr = r0 + ty + 16 * p;
      if (tx == 0 && gr < R) y[gr * l + j] = s;
    }
  }
}

template <typename T>
void launch_direct_sketch(const Tensor& A, const Tensor& E, const Tensor& V, const Tensor& y,
                          dim3 grid, cudaStream_t stream) {
  const int64_t R = A.size(0), n_in = A.size(1), n_out = E.size(1), l = V.size(0);
  direct_sketch_kernel<T><<<grid, kThreads, 0, stream>>>(
      A.const_data_ptr<T>(), E.const_data_ptr<T>(), V.const_data_ptr<T>(), V.stride(0),
      y.mutable_data_ptr<T>(), R, n_in, n_out, l);
  LE_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor direct_sketch_cuda(const Tensor& A, const Tensor& E, const Tensor& V) {
  const cuda::DeviceGuard guard(A);
  const int64_t R = A.size(0), l = V.size(0);
  Tensor y = empty_as(A, {R, l});
  if (R == 0 || l == 0) return y;
  const dim3 grid(static_cast<unsigned>((R + kBM - 1) / kBM),
                  static_cast<unsigned>(std::min<int64_t>(l, kMaxGridY)));
  const cudaStream_t stream = cuda::current_stream(A);
  // AT_DISPATCH_FLOATING_TYPES's dtypes and message (the argument checks admit only these two)
  switch (A.scalar_type()) {
    case kDouble: launch_direct_sketch<double>(A, E, V, y, grid, stream); break;
    case kFloat: launch_direct_sketch<float>(A, E, V, y, grid, stream); break;
    default:
      LE_FAIL("\"linear_grad_sketch_cuda\" not implemented for '", A.scalar_type(), "'");
  }
  return y;
}

// out += m1 @ m2 in place (Tensor.addmm_): ATen's CUDA addmm (cuBLAS) through the C shim, out
// aliasing self (the same kernel addmm_ runs; see AddmmAccFn in sketch.h).
void addmm_acc_cuda(const Tensor& out, const Tensor& m1, const Tensor& m2) {
  LANDSCAPE_SHIM_CHECK(
      aoti_torch_cuda_addmm_out(out.get(), out.get(), m1.get(), m2.get(), 1.0, 1.0));
}

// The registered kernels (TORCH_BOX needs plain functions).
Tensor linear_grad_sketch_cuda(const Tensor& acts, const Tensor& out_grads,
                               const Tensor& directions) {
  return linear_grad_sketch_impl(&direct_sketch_cuda, acts, out_grads, directions);
}

Tensor linear_grad_project_cuda(const Tensor& acts, const Tensor& out_grads,
                                const Tensor& weights) {
  return linear_grad_project_impl(&addmm_acc_cuda, acts, out_grads, weights);
}

}  // namespace
}  // namespace sketch
}  // namespace landscape_ext

STABLE_TORCH_LIBRARY_IMPL(landscape_ext, CUDA, m) {
  m.impl("linear_grad_sketch", TORCH_BOX(&landscape_ext::sketch::linear_grad_sketch_cuda));
  m.impl("linear_grad_project", TORCH_BOX(&landscape_ext::sketch::linear_grad_project_cuda));
}
