// krylov op family, CUDA backend: the three fused passes over the basis (see krylov.h),
// registered for the CUDA dispatch key as the internal ops _krylov_coeffs, _krylov_project_coeffs
// and _krylov_project_gram (the drivers over them are Python: landscape_ext/_krylov_driver.py).
// Host code uses torch's stable C ABI only (csrc/stable_api.h, cuda/common.cuh).
//
// The passes are memory-bound: per column of the basis they do b (coeffs) or 2b (fused passes)
// multiply-adds per basis element, so the aim is to read basis[:, :n] from DRAM exactly once per
// pass, at full width (16-byte loads), with half storage halving the bytes.
//
// Kernel design (one kernel per pass, plus a tiny deterministic reduction):
//   grid      one block per (run r, column chunk c); a chunk is a contiguous range of columns, cut
//             so that the grid fills the GPU about 8 times over (kWaves) while the per-chunk partial
//             sums stay small next to the basis bytes of the chunk (min_chunk_cols).
//   tile      the block walks its chunk in tiles of TC columns (TC in 16..256, chosen from the
//             shared-memory budget). Per tile it stages into shared memory:
//               Qs  (NP x TC)  basis rows [:n] of the tile (converted to the staging type),
//               Os  (BP x TC)  the block rows W of the tile, later overwritten with out = W - C^T Q.
//             Out-of-range columns are staged as zeros, so the compute loops have no tails.
//   phase A   (project passes) Os -= C^T Qs: thread item = (k-group of KB rows, V columns); the
//             sum over the n basis rows is split over SA adjacent lanes and combined by a
//             fixed-order shuffle butterfly. C (padded to BP columns) is read through L1.
//             The out tile is then written to global memory once.
//   phase B   coeffs: Acc (NP x BP) += Qs Os^T; item = (RB=4 basis rows, KB block rows), the
//             TC columns split over SB adjacent lanes. Gram: Acc (BP x BP) += Os Os^T.
//             Acc lives in shared memory for the whole chunk; each entry has one owner thread.
//   partial   at the end each block writes its n x b (or b x b) partial sums to a workspace
//             (R, nchunks, E); reduce_partials_kernel adds them in chunk order. No atomics:
//             results are bitwise reproducible for a given device and shape.
//
// DRAM traffic per pass (sQ = basis element bytes, sA = accumulation element bytes):
//   coeffs          n d sQ + b d sA                 (+ partials, <= 1/16 of the basis bytes)
//   project_coeffs  n d sQ + 2 b d sA               (the second use of each basis tile is
//   project_gram    n d sQ + 2 b d sA                from shared memory)
// When n rows of a minimal tile (16 columns) do not fit in shared memory (very large n, or
// n x b accumulators too big, e.g. n = 512, b = 32 in float64 on an 80 GB A100's 163 KB), the
// fused passes fall back to row blocks: out = W - C^T Q is accumulated block by block and the
// coefficients are a separate pass, i.e. the basis is read twice instead of once (documented
// trade-off; still one read per use, never a materialised float copy of the basis). Only when
// even 4 basis rows do not fit (b in the thousands) does it fall back to ATen matmuls
// (bmm through the dispatcher).
//
// Compute: phase A and B are register-tiled (KB x V and RB x KB x V micro-tiles) on CUDA cores
// in the accumulation precision. For b <= ~8 (float) the passes stay memory-bound; for b = 32 the
// 2 n b flops per column exceed what CUDA cores deliver at full bandwidth (e.g. float64 needs
// ~24 TFLOP/s at 3 TB/s), so those cases are compute-bound by design: tensor cores would lose the
// accuracy the accumulation dtype promises.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cuda/common.cuh"
#include "krylov.h"
#include "stable_api.h"

namespace landscape_ext {
namespace krylov {
namespace {

using cuda::to_acc;

constexpr int kThreads = 256;  // threads per block of the pass kernel
constexpr int kRB = 4;         // basis rows per phase-B item (register tile height)
constexpr int kUnroll = 4;     // 16-byte global loads in flight per thread while staging
constexpr int kWaves = 8;      // aim for ~8 resident-block waves so the tail wave costs little

enum class Mode : int { kCoeffs = 0, kProjectCoeffs = 1, kProjectGram = 2 };

// ---- element types -------------------------------------------------------------------------------

// Staging type of the basis in shared memory: half types stay half when accumulating in float
// (the widening is one cheap instruction at use, and it halves shared memory); otherwise the
// basis is widened/narrowed to the accumulation type once while staging, so the inner loops do
// not pay slow float<->double conversions.
template <typename basis_t, typename acc_t>
struct StageOf {
  using type = acc_t;
};
template <>
struct StageOf<c10::Half, float> {
  using type = c10::Half;
};
template <>
struct StageOf<c10::BFloat16, float> {
  using type = c10::BFloat16;
};

// Conversion while staging: identity, or widening/narrowing to the accumulation type.
template <typename stage_t, typename T>
__device__ __forceinline__ stage_t to_stage(T x) {
  if constexpr (std::is_same_v<stage_t, T>) {
    return x;
  } else {
    return to_acc<stage_t>(x);
  }
}

// N elements of T, aligned to their size up to 16 bytes so loads/stores become one vector op
// (or several 16-byte ops above 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Vec {
  T v[N];
};

// One 16-byte global load. kReadOnly uses the non-coherent path (only for data no thread of the
// kernel writes: the basis). W may alias `out` in the row-block fallback, so it uses plain loads.
template <typename T, bool kReadOnly>
__device__ __forceinline__ Vec<T, 16 / sizeof(T)> load16(const T* p) {
  uint4 raw;
  if constexpr (kReadOnly) {
    raw = __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    raw = *reinterpret_cast<const uint4*>(p);
  }
  Vec<T, 16 / sizeof(T)> out;
  memcpy(&out, &raw, 16);
  return out;
}

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> ldg_vec(const T* p) {
  if constexpr (sizeof(T) * N == 16) {
    return load16<T, true>(p);
  } else {
    Vec<T, N> out;
#pragma unroll
    for (int e = 0; e < N; ++e) out.v[e] = __ldg(p + e);
    return out;
  }
}

// ---- kernel parameters ---------------------------------------------------------------------------

// All strides and sizes in elements.
struct PassParams {
  const void* Q;        // basis[:, row0] : (R, n, d) rows with strides (sR, sM, 1)
  int64_t sR, sM;
  const void* W;        // (R, b, d) contiguous, acc
  void* out;            // (R, b, d) contiguous, acc; may equal W (row-block fallback)
  const void* C;        // (R, n, BP) contiguous, acc, columns >= b are zero (project passes)
  void* partial;        // (R, nchunks, E) acc, E = n*b (coeffs) or b*b (gram)
  int64_t d;
  int64_t chunk_cols;   // columns per chunk, a multiple of TC
  int nchunks;
  int n, NP, b, BP;     // NP = n rounded up to kRB, BP = b rounded up to KB
  int TC;               // tile columns, a power of two in [16, 256]
  int SA, SB;           // lanes splitting one phase-A / phase-B item (powers of two <= 32)
  int q_bytes, o_bytes; // byte offsets of Os and Acc in dynamic shared memory
  bool out_vec;         // out rows admit 16-byte stores (base aligned, d % (16 / sA) == 0)
  bool phase_b;         // false: only write out = W - C^T Q (row-block fallback)
};

// Stage rows_total rows x TC columns of a row-major global matrix (row i at src + i * src_ld,
// tile column 0 at src) into shared memory dst (row stride ld_dst, elements of stage_t). Rows >=
// rows_valid and columns >= len are zero.
//
// Every global load is a 16-byte load at a 16-byte-aligned address, whatever the row stride:
// a row whose start is mis elements past a 16-byte boundary is covered by the TC / VG aligned
// vectors starting mis elements early plus one more at the end (VG elements per vector), and the
// elements are shifted into place in shared memory. The bytes outside the tile that such a
// vector touches share its 16-byte block with an element of the tensor, so they lie in the same
// allocation (allocations are at least 16-byte aligned); they are never used.
template <typename src_t, typename stage_t, bool kReadOnly>
__device__ __forceinline__ void stage_tile(stage_t* __restrict__ dst, int ld_dst,
                                           const src_t* src, int64_t src_ld, int rows_valid,
                                           int rows_total, int TC, int len) {
  constexpr int VG = 16 / sizeof(src_t);
  const int per_row = TC / VG;  // power of two
  const int shift = __ffs(per_row) - 1;
  const int main_jobs = rows_total * per_row;  // vector q = 0 .. per_row - 1 of every row
  const int jobs = main_jobs + rows_total;     // + vector q = per_row of every row (if mis > 0)
  for (int v0 = threadIdx.x; v0 < jobs; v0 += kThreads * kUnroll) {
    Vec<src_t, VG> buf[kUnroll];
    int mis[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * kThreads;
      const int i = v < main_jobs ? v >> shift : v - main_jobs;
      const int q = v < main_jobs ? v & (per_row - 1) : per_row;
      const src_t* row = src + static_cast<int64_t>(i) * src_ld;
      mis[u] = i < rows_valid
                   ? static_cast<int>((reinterpret_cast<uintptr_t>(row) & 15) / sizeof(src_t))
                   : 0;
      const int col0 = q * VG - mis[u];  // tile column of the vector's first element
      if (v < jobs && i < rows_valid && col0 < len && (q < per_row || mis[u] != 0)) {
        buf[u] = load16<src_t, kReadOnly>(row + col0);
      } else {
#pragma unroll
        for (int e = 0; e < VG; ++e) buf[u].v[e] = src_t(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * kThreads;
      const int i = v < main_jobs ? v >> shift : v - main_jobs;
      const int q = v < main_jobs ? v & (per_row - 1) : per_row;
      if (v >= jobs || (q == per_row && mis[u] == 0)) continue;
      const int col0 = q * VG - mis[u];
      stage_t* drow = dst + i * ld_dst;
      if (mis[u] == 0) {  // aligned row: one vector store (col0 + VG <= TC)
        Vec<stage_t, VG> o;
#pragma unroll
        for (int e = 0; e < VG; ++e) {
          o.v[e] = col0 + e < len ? to_stage<stage_t>(buf[u].v[e]) : stage_t(0);
        }
        *reinterpret_cast<Vec<stage_t, VG>*>(drow + col0) = o;
      } else {
#pragma unroll
        for (int e = 0; e < VG; ++e) {
          const int col = col0 + e;
          if (col >= 0 && col < TC) {
            drow[col] = col < len ? to_stage<stage_t>(buf[u].v[e]) : stage_t(0);
          }
        }
      }
    }
  }
}

// Ask L2 to fetch rows_valid rows x len columns (row i at src + i * src_ld) from DRAM while the
// block computes on the current tile, so the next staging loads hit L2. One hint per 128-byte
// line; fire and forget (no registers held, nothing waited for).
template <typename src_t>
__device__ __forceinline__ void prefetch_tile_l2(const src_t* src, int64_t src_ld, int rows_valid,
                                                 int len) {
  const int lines = static_cast<int>((static_cast<int64_t>(len) * sizeof(src_t) + 127) / 128) + 1;
  for (int v = threadIdx.x; v < rows_valid * lines; v += kThreads) {
    const int i = v / lines, l = v - (v / lines) * lines;
    const char* row = reinterpret_cast<const char*>(src + static_cast<int64_t>(i) * src_ld);
    const char* end = row + static_cast<int64_t>(len) * sizeof(src_t);
    const char* line = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(row) & ~uintptr_t(127)) +
                       128 * l;
    if (line < end) asm volatile("prefetch.L2 [%0];" ::"l"(line));  // generic address
  }
}

// One pass over basis[:, :n] for one (run, chunk) per block; see the file comment.
template <typename basis_t, typename acc_t, int KB, Mode MODE>
__global__ void __launch_bounds__(kThreads)
    krylov_pass_kernel(const PassParams p) {
  using stage_t = typename StageOf<basis_t, acc_t>::type;
  constexpr int V = 16 / sizeof(acc_t);  // columns per vector op in phases A and B
  constexpr bool kPhaseA = MODE != Mode::kCoeffs;
  constexpr bool kGram = MODE == Mode::kProjectGram;

  extern __shared__ __align__(16) unsigned char smem[];
  const int TC = p.TC;
  const int QLD = TC + 16 / static_cast<int>(sizeof(stage_t));  // +16 bytes: bank skew per row
  const int OLD = TC + V;
  stage_t* Qs = reinterpret_cast<stage_t*>(smem);
  acc_t* Os = reinterpret_cast<acc_t*>(smem + p.q_bytes);
  acc_t* Acc = reinterpret_cast<acc_t*>(smem + p.q_bytes + p.o_bytes);

  const int t = threadIdx.x;
  const int64_t r = blockIdx.x / p.nchunks;
  const int64_t chunk = blockIdx.x % p.nchunks;
  const int64_t c_begin = chunk * p.chunk_cols;
  const int64_t c_end = c_begin + p.chunk_cols < p.d ? c_begin + p.chunk_cols : p.d;
  const int n = p.n, b = p.b, BP = p.BP, NP = p.NP;
  const int nkg = BP / KB;   // k-groups
  const int nrg = NP / kRB;  // row groups
  const int acc_rows = kGram ? BP : NP;
  const bool phase_b = p.phase_b;

  const basis_t* Qr = static_cast<const basis_t*>(p.Q) + r * p.sR;
  const acc_t* Wr = static_cast<const acc_t*>(p.W) + r * b * p.d;
  acc_t* Or = static_cast<acc_t*>(p.out) + (kPhaseA ? r * b * p.d : 0);
  const acc_t* Cr = kPhaseA ? static_cast<const acc_t*>(p.C) + r * n * BP : nullptr;

  if (phase_b) {
    for (int e = t; e < acc_rows * BP; e += kThreads) Acc[e] = acc_t(0);
  }

  for (int64_t j0 = c_begin; j0 < c_end; j0 += TC) {
    const int len = static_cast<int>(c_end - j0 < TC ? c_end - j0 : TC);
    __syncthreads();  // the previous tile is no longer read
    stage_tile<basis_t, stage_t, true>(Qs, QLD, Qr + j0, p.sM, n, NP, TC, len);
    stage_tile<acc_t, acc_t, false>(Os, OLD, Wr + j0, p.d, b, BP, TC, len);
    __syncthreads();
    if (j0 + TC < c_end) {  // the next tile streams into L2 while this one is computed on
      const int next_len = static_cast<int>(c_end - j0 - TC < TC ? c_end - j0 - TC : TC);
      prefetch_tile_l2(Qr + j0 + TC, p.sM, n, next_len);
      prefetch_tile_l2(Wr + j0 + TC, p.d, b, next_len);
    }

    if constexpr (kPhaseA) {
      // ---- phase A: Os[k, j] -= sum_i C[i, k] Qs[i, j]; item = (k-group kg, column group cg),
      // rows i = s, s + SA, ... for lane s of the SA lanes sharing the item.
      const int SA = p.SA;
      const int s = t & (SA - 1);
      const int ncg = TC / V;
      const int itemsA = nkg * ncg;
      for (int base = 0; base < itemsA; base += kThreads / SA) {
        const int item = base + t / SA;
        const bool valid = item < itemsA;
        const int cg = item % ncg, kg = item / ncg;
        acc_t acc[KB][V];
#pragma unroll
        for (int k = 0; k < KB; ++k)
#pragma unroll
          for (int v = 0; v < V; ++v) acc[k][v] = acc_t(0);
        if (valid) {
          const stage_t* qp = Qs + cg * V;
          const acc_t* cp = Cr + kg * KB;
#pragma unroll 4
          for (int i = s; i < n; i += SA) {
            const Vec<stage_t, V> qv = load_vec<stage_t, V>(qp + i * QLD);
            const Vec<acc_t, KB> cv = ldg_vec<acc_t, KB>(cp + static_cast<int64_t>(i) * BP);
            acc_t q[V];
#pragma unroll
            for (int v = 0; v < V; ++v) q[v] = to_acc<acc_t>(qv.v[v]);
#pragma unroll
            for (int k = 0; k < KB; ++k)
#pragma unroll
              for (int v = 0; v < V; ++v) acc[k][v] += cv.v[k] * q[v];
          }
        }
        // Fixed-order butterfly over the SA lanes (adjacent lanes, same warp): deterministic.
        for (int off = SA / 2; off > 0; off >>= 1) {
#pragma unroll
          for (int k = 0; k < KB; ++k)
#pragma unroll
            for (int v = 0; v < V; ++v) acc[k][v] += __shfl_xor_sync(0xffffffffu, acc[k][v], off);
        }
        if (valid && s == 0) {
#pragma unroll
          for (int k = 0; k < KB; ++k) {
            acc_t* o = Os + (kg * KB + k) * OLD + cg * V;
#pragma unroll
            for (int v = 0; v < V; ++v) o[v] -= acc[k][v];
          }
        }
      }
      __syncthreads();

      // ---- write the out tile (rows k < b, columns < len) once
      {
        if (p.out_vec) {  // 16-byte stores
          const int per_row = TC / V;
          const int shift = __ffs(per_row) - 1;
          for (int v = t; v < b * per_row; v += kThreads) {
            const int k = v >> shift;
            const int col = (v & (per_row - 1)) * V;
            if (col >= len) continue;
            const acc_t* src = Os + k * OLD + col;
            acc_t* dst = Or + static_cast<int64_t>(k) * p.d + j0 + col;
            if (col + V <= len) {
              *reinterpret_cast<Vec<acc_t, V>*>(dst) = load_vec<acc_t, V>(src);
            } else {
              for (int e = 0; e < V && col + e < len; ++e) dst[e] = src[e];
            }
          }
        } else {  // rows not 16-byte aligned (d % V != 0): element stores, consecutive per lane
          const int shift = __ffs(TC) - 1;
          for (int v = t; v < b * TC; v += kThreads) {
            const int k = v >> shift;
            const int col = v & (TC - 1);
            if (col < len) Or[static_cast<int64_t>(k) * p.d + j0 + col] = Os[k * OLD + col];
          }
        }
      }
    }

    if (!phase_b) continue;

    if constexpr (!kGram) {
      // ---- phase B (coeffs): Acc[i, k] += sum_j Qs[i, j] Os[k, j]; item = (row group rg,
      // k-group kg) with rows rg + nrg * u and block rows kg + nkg * k (interleaved, so lanes
      // with neighbouring items read neighbouring shared-memory rows: no bank conflicts).
      const int SB = p.SB;
      const int s = t & (SB - 1);
      const int nvec = TC / V;
      const int itemsB = nrg * nkg;
      for (int base = 0; base < itemsB; base += kThreads / SB) {
        const int item = base + t / SB;
        const bool valid = item < itemsB;
        const int rg = item % nrg, kg = item / nrg;
        acc_t acc[kRB][KB];
#pragma unroll
        for (int u = 0; u < kRB; ++u)
#pragma unroll
          for (int k = 0; k < KB; ++k) acc[u][k] = acc_t(0);
        if (valid) {
          for (int jv = s; jv < nvec; jv += SB) {
            acc_t q[kRB][V];
#pragma unroll
            for (int u = 0; u < kRB; ++u) {
              const Vec<stage_t, V> qv = load_vec<stage_t, V>(Qs + (rg + nrg * u) * QLD + jv * V);
#pragma unroll
              for (int v = 0; v < V; ++v) q[u][v] = to_acc<acc_t>(qv.v[v]);
            }
            Vec<acc_t, V> o[KB];
#pragma unroll
            for (int k = 0; k < KB; ++k) o[k] = load_vec<acc_t, V>(Os + (kg + nkg * k) * OLD + jv * V);
#pragma unroll
            for (int u = 0; u < kRB; ++u)
#pragma unroll
              for (int k = 0; k < KB; ++k)
#pragma unroll
                for (int v = 0; v < V; ++v) acc[u][k] += q[u][v] * o[k].v[v];
          }
        }
        for (int off = SB / 2; off > 0; off >>= 1) {
#pragma unroll
          for (int u = 0; u < kRB; ++u)
#pragma unroll
            for (int k = 0; k < KB; ++k) acc[u][k] += __shfl_xor_sync(0xffffffffu, acc[u][k], off);
        }
        if (valid && s == 0) {
#pragma unroll
          for (int u = 0; u < kRB; ++u)
#pragma unroll
            for (int k = 0; k < KB; ++k) Acc[(rg + nrg * u) * BP + kg + nkg * k] += acc[u][k];
        }
      }
    } else {
      // ---- phase B (Gram): Acc[k, l] += sum_j Os[k, j] Os[l, j]; item = (kg, lg). The full
      // BP x BP square is accumulated (b^2 per column, small next to phase A's n b); the
      // reduction reads the upper triangle only, so the result is exactly symmetric.
      const int SB = p.SB;
      const int s = t & (SB - 1);
      const int nvec = TC / V;
      const int itemsB = nkg * nkg;
      for (int base = 0; base < itemsB; base += kThreads / SB) {
        const int item = base + t / SB;
        const bool valid = item < itemsB;
        const int kg = item % nkg, lg = item / nkg;
        acc_t acc[KB][KB];
#pragma unroll
        for (int k = 0; k < KB; ++k)
#pragma unroll
          for (int l = 0; l < KB; ++l) acc[k][l] = acc_t(0);
        if (valid) {
          for (int jv = s; jv < nvec; jv += SB) {
            Vec<acc_t, V> ok[KB], ol[KB];
#pragma unroll
            for (int k = 0; k < KB; ++k) {
              ok[k] = load_vec<acc_t, V>(Os + (kg + nkg * k) * OLD + jv * V);
              ol[k] = load_vec<acc_t, V>(Os + (lg + nkg * k) * OLD + jv * V);
            }
#pragma unroll
            for (int k = 0; k < KB; ++k)
#pragma unroll
              for (int l = 0; l < KB; ++l)
#pragma unroll
                for (int v = 0; v < V; ++v) acc[k][l] += ok[k].v[v] * ol[l].v[v];
          }
        }
        for (int off = SB / 2; off > 0; off >>= 1) {
#pragma unroll
          for (int k = 0; k < KB; ++k)
#pragma unroll
            for (int l = 0; l < KB; ++l) acc[k][l] += __shfl_xor_sync(0xffffffffu, acc[k][l], off);
        }
        if (valid && s == 0) {
#pragma unroll
          for (int k = 0; k < KB; ++k)
#pragma unroll
            for (int l = 0; l < KB; ++l) Acc[(kg + nkg * k) * BP + lg + nkg * l] += acc[k][l];
        }
      }
    }
  }

  if (!phase_b) return;
  __syncthreads();
  // ---- this block's partial sums: (n, b) for coeffs, (b, b) for Gram
  const int rows = kGram ? b : n;
  acc_t* P = static_cast<acc_t*>(p.partial) + static_cast<int64_t>(blockIdx.x) * rows * b;
  for (int e = t; e < rows * b; e += kThreads) {
    const int i = e / b, k = e - (e / b) * b;
    P[e] = Acc[i * BP + k];
  }
}

// sums[r, e] = sum_c partial[r, c, e]. Block (EX, CY) = (entries, chunk lanes) with EX * CY =
// 256 and EX = min(32, E rounded up to a power of two), so a few entries (b = 1) still get 256
// loads in flight. Lane y sums chunks y, y + CY, ... and lane 0 adds the CY sums in order: a fixed
// order for a given shape, hence deterministic. A Gram entry (k, l) and (l, k) both read the
// upper-triangle partials, so the result is exactly symmetric.
template <typename acc_t>
__global__ void reduce_partials_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ sums,
                                       int nchunks, int E, int b, bool gram, int64_t eblocks) {
  __shared__ acc_t buf[kThreads];
  const int EX = blockDim.x, CY = blockDim.y;
  const int64_t r = blockIdx.x / eblocks;
  const int e = static_cast<int>(blockIdx.x % eblocks) * EX + threadIdx.x;
  acc_t s = acc_t(0);
  if (e < E) {
    int src = e;
    if (gram) {
      const int k = e / b, l = e - (e / b) * b;
      src = k <= l ? e : l * b + k;
    }
    const acc_t* P = partial + r * nchunks * E + src;
#pragma unroll 4
    for (int c = threadIdx.y; c < nchunks; c += CY) s += P[static_cast<int64_t>(c) * E];
  }
  buf[threadIdx.y * EX + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && e < E) {
    acc_t total = buf[threadIdx.x];
    for (int y = 1; y < CY; ++y) total += buf[y * EX + threadIdx.x];
    sums[r * E + e] = total;
  }
}

// ---- host side: planning ------------------------------------------------------------------------

struct DeviceLimits {
  int sms;
  int64_t smem_per_sm;    // bytes
  int64_t smem_optin;     // bytes, max dynamic shared memory per block
  int64_t smem_reserved;  // bytes the runtime reserves per block
};

DeviceLimits device_limits(int device) {
  DeviceLimits lim;
  int v = 0;
  LE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  lim.sms = v;
  LE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  lim.smem_per_sm = v;
  LE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  lim.smem_optin = v;
  LE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrReservedSharedMemoryPerBlock, device));
  lim.smem_reserved = v;
  return lim;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int pow2_floor(int64_t x) {
  int p = 1;
  while (static_cast<int64_t>(p) * 2 <= x) p *= 2;
  return p;
}

struct Plan {
  bool ok = false;
  int TC = 0, NP = 0, BP = 0, SA = 1, SB = 1;
  int64_t q_bytes = 0, o_bytes = 0, acc_bytes = 0, smem = 0;
};

// Tile width and shared-memory layout for n basis rows and b block rows. Prefers >= 3 resident
// blocks per SM (so one block's loads overlap another's arithmetic), then 2, then whatever one
// block may use; within a budget, the widest tile (fewer synchronisations per byte).
Plan make_plan(Mode mode, bool phase_b, int64_t n, int64_t b, int64_t d, int KB, int64_t stage_size,
               int64_t acc_size, const DeviceLimits& lim) {
  Plan plan;
  const int64_t V = 16 / acc_size;
  const int64_t NP = round_up(n, kRB), BP = round_up(b, KB);
  if (NP > INT_MAX / 8 || BP > INT_MAX / 8) return plan;
  int64_t acc_elems = 0;
  if (phase_b) acc_elems = mode == Mode::kProjectGram ? BP * BP : NP * BP;
  int64_t tc_cap = 16;
  while (tc_cap < d && tc_cap < 256) tc_cap *= 2;
  struct Tier {
    int64_t budget;
    int64_t min_tc;
  };
  const Tier tiers[3] = {{lim.smem_per_sm / 3 - lim.smem_reserved, 32},
                         {lim.smem_per_sm / 2 - lim.smem_reserved, 16},
                         {lim.smem_optin, 16}};
  for (const Tier& tier : tiers) {
    for (int64_t tc = tc_cap; tc >= tier.min_tc; tc /= 2) {
      const int64_t q_bytes = round_up(NP * (tc * stage_size + 16), 16);
      const int64_t o_bytes = round_up(BP * (tc * acc_size + 16), 16);
      const int64_t acc_bytes = acc_elems * acc_size;
      const int64_t smem = q_bytes + o_bytes + acc_bytes;
      if (smem > tier.budget) continue;
      plan.ok = true;
      plan.TC = static_cast<int>(tc);
      plan.NP = static_cast<int>(NP);
      plan.BP = static_cast<int>(BP);
      plan.q_bytes = q_bytes;
      plan.o_bytes = o_bytes;
      plan.acc_bytes = acc_bytes;
      plan.smem = smem;
      const int64_t nkg = BP / KB;
      const int64_t itemsA = nkg * (tc / V);
      plan.SA = pow2_floor(std::max<int64_t>(1, std::min<int64_t>({32, kThreads / itemsA, n})));
      const int64_t itemsB = mode == Mode::kProjectGram ? nkg * nkg : (NP / kRB) * nkg;
      plan.SB = pow2_floor(std::max<int64_t>(1, std::min<int64_t>({32, kThreads / itemsB, tc / V})));
      return plan;
    }
  }
  return plan;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Runs one pass kernel over rows [row0, row0 + n) of the basis and, when phase_b, reduces the
// partial sums into `sums` ((R, n, b) or (R, b, b), contiguous acc). Requires plan.ok.
template <typename basis_t, typename acc_t, int KB, Mode MODE>
void launch_pass(const Plan& plan, const Tensor& basis, int64_t row0, int64_t n, const Tensor& W,
                 const Tensor& Cpad, const Tensor& out, const Tensor& sums, bool phase_b,
                 const DeviceLimits& lim) {
  const int64_t R = W.size(0), b = W.size(1), d = W.size(2);
  auto kernel = krylov_pass_kernel<basis_t, acc_t, KB, MODE>;
  if (plan.smem > 48 * 1024) {
    LE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(plan.smem)));
  }
  int per_sm = 0;
  LE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                              static_cast<size_t>(plan.smem)));
  const int64_t slots = static_cast<int64_t>(lim.sms) * std::max(per_sm, 1);

  // Chunking: ~kWaves waves of blocks (small d: as many one-tile chunks as there are tiles),
  // each chunk long enough that its partial sums (E acc values, written once and read back
  // once) stay below 1/16 of its basis bytes.
  const int64_t TC = plan.TC;
  const int64_t sQ = static_cast<int64_t>(sizeof(basis_t)), sA = static_cast<int64_t>(sizeof(acc_t));
  int64_t min_chunk = TC;
  const int64_t E = MODE == Mode::kProjectGram ? b * b : n * b;  // partial sums per block
  if (phase_b) min_chunk = std::max(min_chunk, ceil_div(32 * E * sA, n * sQ));
  min_chunk = round_up(min_chunk, TC);
  int64_t nchunks = std::max<int64_t>(1, kWaves * slots / R);
  nchunks = std::min(nchunks, std::max<int64_t>(1, d / min_chunk));
  const int64_t chunk_cols = round_up(ceil_div(d, nchunks), TC);
  nchunks = ceil_div(d, chunk_cols);
  LE_CHECK(R * nchunks <= INT_MAX, "krylov (CUDA): grid of ", R * nchunks, " blocks is too large");

  const basis_t* Q = basis.const_data_ptr<basis_t>() + row0 * basis.stride(1);
  const int64_t sR = basis.stride(0), sM = basis.stride(1);
  const int64_t V = 16 / sA;

  LE_CHECK(E <= INT_MAX, "krylov (CUDA): ", E, " partial sums per block is too many");
  Tensor partial = phase_b ? empty_as(W, {R, nchunks, E}) : Tensor();

  PassParams p;
  p.Q = Q;
  p.sR = sR;
  p.sM = sM;
  p.W = W.const_data_ptr<acc_t>();
  p.out = out.defined() ? out.mutable_data_ptr<acc_t>() : nullptr;
  p.C = Cpad.defined() ? Cpad.const_data_ptr<acc_t>() : nullptr;
  p.partial = phase_b ? partial.mutable_data_ptr<acc_t>() : nullptr;
  p.d = d;
  p.chunk_cols = chunk_cols;
  p.nchunks = static_cast<int>(nchunks);
  p.n = static_cast<int>(n);
  p.NP = plan.NP;
  p.b = static_cast<int>(b);
  p.BP = plan.BP;
  p.TC = plan.TC;
  p.SA = plan.SA;
  p.SB = plan.SB;
  p.q_bytes = static_cast<int>(plan.q_bytes);
  p.o_bytes = static_cast<int>(plan.o_bytes);
  p.out_vec = out.defined() && aligned16(p.out) && d % V == 0;
  p.phase_b = phase_b;

  const cudaStream_t stream = cuda::current_stream(W);
  kernel<<<static_cast<unsigned int>(R * nchunks), kThreads, static_cast<size_t>(plan.smem), stream>>>(p);
  LE_CUDA_KERNEL_LAUNCH_CHECK();

  if (phase_b) {
    int ex = 1;
    while (ex < 32 && ex < E) ex *= 2;
    const int64_t eblocks = ceil_div(E, ex);
    LE_CHECK(R * eblocks <= INT_MAX, "krylov (CUDA): reduction grid of ", R * eblocks,
             " blocks is too large");
    reduce_partials_kernel<acc_t>
        <<<static_cast<unsigned int>(R * eblocks), dim3(ex, kThreads / ex), 0, stream>>>(
        partial.const_data_ptr<acc_t>(), sums.mutable_data_ptr<acc_t>(),
        static_cast<int>(nchunks), static_cast<int>(E), static_cast<int>(b),
        MODE == Mode::kProjectGram, eblocks);
    LE_CUDA_KERNEL_LAUNCH_CHECK();
  }
}


// C (R, rows, b) -> contiguous (R, rows, BP) with zero columns b.. BP (phase A loads KB at once).
Tensor pad_coeffs(const Tensor& C, int64_t BP) {
  const int64_t b = C.size(2);
  if (BP == b) return contiguous(C);
  Tensor Cp = zeros_as(C, {C.size(0), C.size(1), BP});
  Tensor head = narrow(Cp, 2, 0, b);
  torch::stable::copy_(head, C);
  return Cp;
}

// (G + G^T) / 2, exactly symmetric: G.add(G.transpose(1, 2)).mul_(0.5) in ATen terms. Scalar
// arguments (add's alpha, mul's 0.5) do not cross the stable C ABI, so the same ATen kernels are
// reached without them: the sum as subtract(G, G^T, alpha = -1) (the shim takes alpha as a double;
// ATen runs sub as its add kernel with alpha negated, i.e. G + 1 * G^T, bitwise G + G^T, and
// a + b == b + a), the halving as mul_.Tensor by a 0-dim CPU tensor holding 0.5 in G's dtype
// (a CPU scalar operand, as the wrapped Scalar of mul_(0.5) was; the product is exact).
Tensor symmetric_part(const Tensor& G) {
  Tensor S = torch::stable::subtract(G, transpose(G, 1, 2), -1.0);
  Tensor half = empty(std::vector<int64_t>{}, G.scalar_type(), Device(DeviceType::CPU));
  torch::stable::fill_(half, 0.5);
  std::array<StableIValue, 2> stack{to_ivalue(S), to_ivalue(half)};
  call_op("aten::mul_", "Tensor", stack);
  return from_ivalue<Tensor>(stack[0]);
}

// The passes for one (basis dtype, accumulation dtype, KB).
template <typename basis_t, typename acc_t, int KB>
struct Runner {
  using stage_t = typename StageOf<basis_t, acc_t>::type;
  const DeviceLimits& lim;

  Plan plan(Mode mode, bool phase_b, int64_t n, int64_t b, int64_t d) const {
    return make_plan(mode, phase_b, n, b, d, KB, static_cast<int64_t>(sizeof(stage_t)),
                     static_cast<int64_t>(sizeof(acc_t)), lim);
  }

  // Largest row block (<= n) for which `mode` fits in shared memory; 0 if not even kRB rows.
  int64_t row_block(Mode mode, bool phase_b, int64_t n, int64_t b, int64_t d) const {
    int64_t rows = n;
    while (rows >= 1) {
      if (plan(mode, phase_b, rows, b, d).ok) return rows;
      if (rows <= kRB) break;
      rows = round_up(rows / 2, kRB);
    }
    return 0;
  }

  // C (R, n, b) = basis[:, :n] W^T, row block by row block when n rows do not fit at once.
  Tensor coeffs(const Tensor& basis, const Tensor& W, int64_t n) const {
    const int64_t R = W.size(0), b = W.size(1), d = W.size(2);
    const int64_t rows = row_block(Mode::kCoeffs, true, n, b, d);
    if (rows == 0) {  // b in the thousands: not what these kernels are for
      return bmm(to_dtype(narrow(basis, 1, 0, n), W.scalar_type()), transpose(W, 1, 2));
    }
    Tensor C = empty_as(W, {R, n, b});
    for (int64_t row0 = 0; row0 < n; row0 += rows) {
      const int64_t nr = std::min(rows, n - row0);
      const Plan pl = plan(Mode::kCoeffs, true, nr, b, d);
      Tensor sums = nr == n ? C : empty_as(W, {R, nr, b});
      launch_pass<basis_t, acc_t, KB, Mode::kCoeffs>(pl, basis, row0, nr, W, Tensor(), Tensor(),
                                                     sums, true, lim);
      if (nr != n) {
        Tensor dst = narrow(C, 1, row0, nr);
        torch::stable::copy_(dst, sums);
      }
    }
    return C;
  }

  // (out, sums) with out = W - C^T basis[:, :n] and sums = basis[:, :n] out^T (kProjectCoeffs)
  // or out out^T (kProjectGram).
  template <Mode MODE>
  std::tuple<Tensor, Tensor> project(const Tensor& basis, const Tensor& W, const Tensor& C,
                                     int64_t n) const {
    const int64_t R = W.size(0), b = W.size(1), d = W.size(2);
    Tensor out = empty_as(W, {R, b, d});
    const Plan pl = plan(MODE, true, n, b, d);
    if (pl.ok) {  // the fused pass: one read of the basis
      Tensor sums = MODE == Mode::kProjectGram ? empty_as(W, {R, b, b}) : empty_as(W, {R, n, b});
      launch_pass<basis_t, acc_t, KB, MODE>(pl, basis, 0, n, W, pad_coeffs(C, pl.BP), out, sums,
                                            true, lim);
      return {out, sums};
    }
    // Fallback: out accumulated over row blocks (in place after the first), then a second pass.
    const int64_t rows = row_block(Mode::kProjectCoeffs, false, n, b, d);
    if (rows == 0) {
      // W - C^T Qn. Was at::baddbmm(W, C^T, Qn, 1, -1): baddbmm's Scalar beta/alpha have no
      // stable route, so the product is a bmm and the difference a subtract (W - 1 * P).
      Tensor Qn = to_dtype(narrow(basis, 1, 0, n), W.scalar_type());
      out = sub(W, bmm(transpose(C, 1, 2), Qn));
    } else {
      for (int64_t row0 = 0; row0 < n; row0 += rows) {
        const int64_t nr = std::min(rows, n - row0);
        const Plan pr = plan(Mode::kProjectCoeffs, false, nr, b, d);
        launch_pass<basis_t, acc_t, KB, Mode::kProjectCoeffs>(
            pr, basis, row0, nr, row0 == 0 ? W : out, pad_coeffs(narrow(C, 1, row0, nr), pr.BP),
            out, Tensor(), false, lim);
      }
    }
    if (MODE == Mode::kProjectGram) {  // exactly symmetric, like the fused pass
      return {out, symmetric_part(bmm(out, transpose(out, 1, 2)))};
    }
    return {out, coeffs(basis, out, n)};
  }
};

// Runs fn on the Runner for the accumulation dtype of W (f64/f32) and KB (1 for one block row).
template <typename basis_t, typename Fn>
auto with_runner(const Tensor& W, const DeviceLimits& lim, Fn& fn) {
  const bool b1 = W.size(1) == 1;
  if (W.scalar_type() == kDouble) {
    return b1 ? fn(Runner<basis_t, double, 1>{lim}) : fn(Runner<basis_t, double, 4>{lim});
  }
  return b1 ? fn(Runner<basis_t, float, 1>{lim}) : fn(Runner<basis_t, float, 4>{lim});
}

template <typename Fn>
auto dispatch(const Tensor& basis, const Tensor& W, Fn&& fn) {
  LE_CHECK(basis.is_cuda() && W.is_cuda(), "krylov (CUDA): basis and block must be CUDA tensors");
  LE_CHECK(W.scalar_type() == kFloat || W.scalar_type() == kDouble,
           "krylov (CUDA): block must be float32 or float64, got ", W.scalar_type());
  const DeviceLimits lim = device_limits(W.get_device_index());
  // The basis dtypes AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16, ...) covered, with its
  // message for any other (now a RuntimeError rather than NotImplementedError).
  switch (basis.scalar_type()) {
    case kDouble:
      return with_runner<double>(W, lim, fn);
    case kFloat:
      return with_runner<float>(W, lim, fn);
    case kHalf:
      return with_runner<c10::Half>(W, lim, fn);
    case kBFloat16:
      return with_runner<c10::BFloat16>(W, lim, fn);
    default:
      break;
  }
  LE_FAIL("\"krylov_cuda\" not implemented for '", basis.scalar_type(), "'");
}

Tensor coeffs_cuda(const Tensor& basis, const Tensor& W_in, int64_t n) {
  const cuda::DeviceGuard guard(W_in);
  const Tensor W = contiguous(W_in);
  const int64_t R = W.size(0), b = W.size(1), d = W.size(2);
  if (R == 0 || b == 0 || n == 0 || d == 0) return zeros_as(W, {R, n, b});
  return dispatch(basis, W, [&](const auto& run) { return run.coeffs(basis, W, n); });
}

std::tuple<Tensor, Tensor> project_coeffs_cuda(const Tensor& basis, const Tensor& W_in,
                                               const Tensor& C, int64_t n) {
  const cuda::DeviceGuard guard(W_in);
  const Tensor W = contiguous(W_in);
  const int64_t R = W.size(0), b = W.size(1), d = W.size(2);
  if (R == 0 || b == 0 || n == 0 || d == 0) {
    return {clone(W), zeros_as(W, {R, n, b})};
  }
  return dispatch(basis, W, [&](const auto& run) {
    return run.template project<Mode::kProjectCoeffs>(basis, W, C, n);
  });
}

std::tuple<Tensor, Tensor> project_gram_cuda(const Tensor& basis, const Tensor& W_in,
                                             const Tensor& C, int64_t n) {
  const cuda::DeviceGuard guard(W_in);
  const Tensor W = contiguous(W_in);
  const int64_t R = W.size(0), b = W.size(1), d = W.size(2);
  if (R == 0 || b == 0 || n == 0 || d == 0) {
    return {clone(W), bmm(W, transpose(W, 1, 2))};
  }
  return dispatch(basis, W, [&](const auto& run) {
    return run.template project<Mode::kProjectGram>(basis, W, C, n);
  });
}

}  // namespace
}  // namespace krylov
}  // namespace landscape_ext

// The three passes as the internal ops of registration.cpp; the drivers over them are Python.
STABLE_TORCH_LIBRARY_IMPL(landscape_ext, CUDA, m) {
  m.impl("_krylov_coeffs", TORCH_BOX(&landscape_ext::krylov::coeffs_cuda));
  m.impl("_krylov_project_coeffs", TORCH_BOX(&landscape_ext::krylov::project_coeffs_cuda));
  m.impl("_krylov_project_gram", TORCH_BOX(&landscape_ext::krylov::project_gram_cuda));
}
