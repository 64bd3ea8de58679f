// CUDA kernels of the norm family (RMSNorm, LayerNorm, fused residual add), forward and backward.
// The math is in common/norm_math.h (shared with the CPU kernels); the checks and op entry
// points in common/norm_host.h.
//
// Layout: rows of width n, contiguous. A row is handled by a group of threads: one warp for
// n <= 1024 (8 rows per 256-thread block), else a whole block. Loads and stores move 16-byte
// packs when every pointer is 16-byte aligned and n is a multiple of the pack; else scalars.
// All sums are float32. Offsets are 64-bit. __launch_bounds__(1024) keeps the block-mode kernels
// within 64 registers per thread, so the 1024-thread blocks of the widest rows can always launch
// (the warp-mode backward has bounds of its own, below). No kernel spills (setup.py makes ptxas
// fail on a spill).
// Each row is read once from memory; the variance and output passes re-read it from L1/L2.
//
// Mixed precision (common/norm_params.h): TS, the type of the residual stream (h, the normalised
// input, weight and bias as read, dx), is float32 beside a bfloat16/float16 T (x, y, dy); packs
// are then 16 bytes of TS (4 elements) and 8 of T. The host hands 16-bit weights over as float32.
//
// Weight/bias gradients: every row group accumulates float32 partial sums in its own row of a
// [groups, n] buffer (no atomics, so the result is deterministic run to run), and a second
// kernel sums the groups and rounds once to the parameter dtype.
#include <algorithm>

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/norm_host.h"
#include "common/norm_math.h"
#include "common/norm_params.h"
#include "cuda/cuda_utils.cuh"

namespace archext::ARCHEXT_CUDA_NS {
namespace {

constexpr int64_t kWarpRowMaxWidth = 1024;  // widths up to this: one warp per row
constexpr int kWarpModeThreads = 256;       // 8 warps = 8 rows per block in warp mode

// The threads that share one row: a warp (kWarpRow) or the whole block.
template <bool kWarpRow>
struct RowGroup {
  __device__ static int size() { return kWarpRow ? 32 : static_cast<int>(blockDim.x); }
  __device__ static int lane() { return kWarpRow ? threadIdx.x % 32 : threadIdx.x; }
  __device__ static int per_block() { return kWarpRow ? blockDim.x / 32 : 1; }
  __device__ static int index() { return kWarpRow ? threadIdx.x / 32 : 0; }
  __device__ static float2 sum(float2 v, float2* smem) {
    if constexpr (kWarpRow) {
      return warp_sum(v);
    } else {
      return block_sum(v, smem);
    }
  }
};

// The packs per thread of a row the block-mode forward holds in registers: 4 of float32, 2 of
// 16-bit types (4 of bfloat16 spilled under the 64-register cap of 1024-thread blocks; their
// conversions take more registers). norm_fwd plans the block's threads to match.
constexpr int fwd_reg_packs(int vec) { return vec >= 8 ? 2 : 4; }

// The forward's per-pack math, shared by its two row paths below.
// h = x + residual, rounded to TS (the backward reads h), into a.
template <typename TS, int VEC>
__device__ __forceinline__ void add_residual(Pack<TS, VEC>& a, const Pack<TS, VEC>& b) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    a.v[k] = static_cast<TS>(static_cast<float>(a.v[k]) + static_cast<float>(b.v[k]));
  }
}

// Pack i of the row's first input as TS: x (converted from T when TS != T), or, in the mixed
// plain norm (x null), the float32 input held in `residual`.
template <typename T, typename TS, int VEC>
__device__ __forceinline__ Pack<TS, VEC> load_input(const NormFwdParams<T, float, TS>& p,
                                                    int64_t off, int64_t i) {
  if constexpr (std::is_same_v<T, TS>) {
    return load_pack<T, VEC>(p.x + off, i);
  } else {
    if (p.x == nullptr) return load_pack<TS, VEC>(p.residual + off, i);
    const Pack<T, VEC> a = load_pack<T, VEC>(p.x + off, i);
    Pack<TS, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = static_cast<TS>(static_cast<float>(a.v[k]));
    return out;
  }
}

// (sum, sum of squares) += the pack's.
template <typename T, int VEC>
__device__ __forceinline__ void add_sums(const Pack<T, VEC>& a, float2& s) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float v = static_cast<float>(a.v[k]);
    s.x += v;
    s.y += v * v;
  }
}

// Sum of (x - mu)^2 += the pack's (LayerNorm's second pass: no cancellation when |mean| >> std).
template <typename T, int VEC>
__device__ __forceinline__ void add_centered_squares(const Pack<T, VEC>& a, float mu, float& d2) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float d = static_cast<float>(a.v[k]) - mu;
    d2 += d * d;
  }
}

// y of pack i: (x - mu) * r * (w + offset) + b.
template <typename T, typename TS, int VEC>
__device__ __forceinline__ Pack<T, VEC> normalized(const NormFwdParams<T, float, TS>& p,
                                                   const Pack<TS, VEC>& a, int64_t i, float mu,
                                                   float r) {
  Pack<TS, VEC> w, b;
  Pack<T, VEC> out;
  if (p.weight) w = load_pack<TS, VEC>(p.weight, i);
  if (p.bias) b = load_pack<TS, VEC>(p.bias, i);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float we = p.weight ? static_cast<float>(w.v[k]) + p.weight_offset : 1.f;
    const float be = p.bias ? static_cast<float>(b.v[k]) : 0.f;
    out.v[k] = static_cast<T>(norm_apply<float>(static_cast<float>(a.v[k]), mu, r, we, be));
  }
  return out;
}

// One row of the block-mode forward with the row in registers: every load of the row issued
// first (x, then the residual), then the sums, the LayerNorm variance and the output from the
// registers. The same float ops in the same order as the streaming path below: the same bits.
template <typename T, typename TS, int VEC>
__device__ __forceinline__ void norm_fwd_row_in_registers(const NormFwdParams<T, float, TS>& p,
                                                          const int64_t row, float2* smem) {
  using G = RowGroup<false>;
  const int64_t n = p.n, packs = n / VEC, off = row * n;
  const float inv_n = 1.f / static_cast<float>(n);
  const int lane = threadIdx.x, size = blockDim.x;
  Pack<TS, VEC> v[fwd_reg_packs(VEC)];
#pragma unroll
  for (int m = 0; m < fwd_reg_packs(VEC); ++m) {
    const int64_t i = lane + static_cast<int64_t>(m) * size;
    if (i < packs) v[m] = load_input<T, TS, VEC>(p, off, i);
  }
  if (p.h != nullptr) {  // (a second array of packs for the residual would spill)
#pragma unroll
    for (int m = 0; m < fwd_reg_packs(VEC); ++m) {
      const int64_t i = lane + static_cast<int64_t>(m) * size;
      if (i >= packs) continue;
      add_residual(v[m], load_pack<TS, VEC>(p.residual + off, i));
      store_pack<TS, VEC>(p.h + off, i, v[m]);
    }
  }
  float2 s = make_float2(0.f, 0.f);
#pragma unroll
  for (int m = 0; m < fwd_reg_packs(VEC); ++m) {
    if (lane + static_cast<int64_t>(m) * size < packs) add_sums(v[m], s);
  }
  s = G::sum(s, smem);
  float mu = 0.f, ss = s.y;
  if (p.layer_norm) {
    mu = s.x * inv_n;
    float2 d2 = make_float2(0.f, 0.f);
#pragma unroll
    for (int m = 0; m < fwd_reg_packs(VEC); ++m) {
      if (lane + static_cast<int64_t>(m) * size < packs) add_centered_squares(v[m], mu, d2.x);
    }
    ss = G::sum(d2, smem).x;
  }
  const float r = norm_rstd<float>(ss, static_cast<float>(n), p.eps);
  if (lane == 0) {
    p.rstd[row] = r;
    if (p.layer_norm) p.mean[row] = mu;
  }
#pragma unroll
  for (int m = 0; m < fwd_reg_packs(VEC); ++m) {
    const int64_t i = lane + static_cast<int64_t>(m) * size;
    if (i < packs) store_pack<T, VEC>(p.y + off, i, normalized(p, v[m], i, mu, r));
  }
}

template <typename T, typename TS, int VEC, bool kWarpRow>
__global__ void __launch_bounds__(1024) norm_fwd_kernel(const NormFwdParams<T, float, TS> p, const int64_t rows) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(1024);
  using G = RowGroup<kWarpRow>;
  ARCHEXT_SHARED(float2, smem, [32]);
  const int64_t n = p.n;
  const int64_t packs = n / VEC;
  const float inv_n = 1.f / static_cast<float>(n);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * G::per_block();
  // Block mode, rows of at most fwd_reg_packs(VEC) packs per thread: the row in registers.
  const bool in_regs = !kWarpRow && p.reg_row && packs <= int64_t{fwd_reg_packs(VEC)} * G::size();
  // In block mode `row` is uniform over the block, so the __syncthreads in G::sum are safe.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * G::per_block() + G::index(); row < rows;
       row += stride) {
    if constexpr (!kWarpRow) {
      if (in_regs) {
        norm_fwd_row_in_registers<T, TS, VEC>(p, row, smem);
        continue;
      }
    }
    const int64_t off = row * n;
    const TS* src = nullptr;
    float2 s = make_float2(0.f, 0.f);  // (sum, sum of squares)
    if (p.h != nullptr) {
      // h = x + residual, rounded to TS before it is normalised (the backward reads h).
      const TS* res = p.residual + off;
      TS* h = p.h + off;
      for (int64_t i = G::lane(); i < packs; i += G::size()) {
        Pack<TS, VEC> hv = load_input<T, TS, VEC>(p, off, i);
        add_residual(hv, load_pack<TS, VEC>(res, i));
        add_sums(hv, s);
        store_pack<TS, VEC>(h, i, hv);
      }
      src = h;  // each thread re-reads only the packs it wrote
    } else {
      if constexpr (std::is_same_v<T, TS>) {
        src = p.x + off;
      } else {
        src = p.residual + off;  // the mixed plain norm's float32 input
      }
      for (int64_t i = G::lane(); i < packs; i += G::size()) add_sums(load_pack<TS, VEC>(src, i), s);
    }
    s = G::sum(s, smem);
    float mu = 0.f, ss = s.y;
    if (p.layer_norm) {
      // Two-pass variance: no cancellation when |mean| >> std.
      mu = s.x * inv_n;
      float2 d2 = make_float2(0.f, 0.f);
      for (int64_t i = G::lane(); i < packs; i += G::size()) {
        add_centered_squares(load_pack<TS, VEC>(src, i), mu, d2.x);
      }
      ss = G::sum(d2, smem).x;
    }
    const float r = norm_rstd<float>(ss, static_cast<float>(n), p.eps);
    if (G::lane() == 0) {
      p.rstd[row] = r;
      if (p.layer_norm) p.mean[row] = mu;
    }
    T* y = p.y + off;
    for (int64_t i = G::lane(); i < packs; i += G::size()) {
      store_pack<T, VEC>(y, i, normalized(p, load_pack<TS, VEC>(src, i), i, mu, r));
    }
  }
}

// The packs per thread whose weight / bias gradient partial sums the backward keeps in registers
// across its rows (8 floats each): a thread always owns the same packs of every row of its group.
constexpr int bwd_reg_packs(int vec) { return vec >= 8 ? 1 : 8 / vec; }

// Warp mode: 256-thread blocks, at least kWarpBwdBlocksPerSm of them resident per SM, which
// leaves 80 registers a thread: the 2 x VEC float32 partial sums per thread spilled under the
// 64 of 1024-thread blocks (56 bytes, float32 at sm_80). Block mode keeps 1024 threads.
constexpr int kWarpBwdBlocksPerSm = 3;

template <typename T, typename TS, int VEC, bool kWarpRow>
__global__ void __launch_bounds__(kWarpRow ? kWarpModeThreads : 1024, kWarpRow ? kWarpBwdBlocksPerSm : 1)
norm_bwd_kernel(const NormBwdParams<T, float, TS> p, const int64_t rows) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(kWarpRow ? kWarpModeThreads : 1024, kWarpRow ? kWarpBwdBlocksPerSm : 1);
  using G = RowGroup<kWarpRow>;
  constexpr int RP = bwd_reg_packs(VEC);
  ARCHEXT_SHARED(float2, smem, [32]);
  const int64_t n = p.n;
  const int64_t packs = n / VEC;
  const float inv_n = 1.f / static_cast<float>(n);
  const int64_t group = static_cast<int64_t>(blockIdx.x) * G::per_block() + G::index();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * G::per_block();
  float* dw = p.dweight ? p.dweight + group * n : nullptr;  // this group's partial sums
  float* db = p.dbias ? p.dbias + group * n : nullptr;
  // In registers when every thread owns at most RP packs (the same adds in the same order as
  // through memory: the same bits); else a read-modify-write of the group's row per row.
  const bool in_regs = p.reg_partials && packs <= int64_t{RP} * G::size();
  float aw[RP][VEC], ab[RP][VEC];
#pragma unroll
  for (int m = 0; m < RP; ++m) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) aw[m][k] = ab[m][k] = 0.f;
  }
  for (int64_t row = group; row < rows; row += stride) {
    const int64_t off = row * n;
    const TS* x = p.x + off;
    const T* dy = p.dy + off;
    const float mu = p.mean ? p.mean[row] : 0.f;
    const float r = p.rstd[row];

    float2 s = make_float2(0.f, 0.f);  // (sum g, sum g * xhat)
    // One pack's terms: the row sums, and the partial sums into memory or into registers m.
    auto pack_terms = [&](int64_t i, int m) {
      const auto d = load_pack<T, VEC>(dy, i);
      const auto xv = load_pack<TS, VEC>(x, i);
      Pack<TS, VEC> w;
      if (p.weight) w = load_pack<TS, VEC>(p.weight, i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float dk = static_cast<float>(d.v[k]);
        const float xh = (static_cast<float>(xv.v[k]) - mu) * r;
        // __fmul_rn: g rounded here as in the output pass below (an FMA there would leave
        // g - mean(g) = a rounding error instead of 0 at width 1).
        const float g = p.weight ? __fmul_rn(dk, static_cast<float>(w.v[k]) + p.weight_offset) : dk;
        s.x += g;
        s.y += g * xh;
        if (m >= 0) {
          aw[m][k] += dk * xh;
          ab[m][k] += dk;
        } else {
          if (dw) dw[i * VEC + k] += dk * xh;
          if (db) db[i * VEC + k] += dk;
        }
      }
    };
    if (in_regs) {
#pragma unroll
      for (int m = 0; m < RP; ++m) {
        const int64_t i = G::lane() + static_cast<int64_t>(m) * G::size();
        if (i < packs) pack_terms(i, m);
      }
    } else {
      for (int64_t i = G::lane(); i < packs; i += G::size()) pack_terms(i, -1);
    }
    s = G::sum(s, smem);
    const float mean_g = p.mean ? s.x * inv_n : 0.f;
    const float mean_gx = s.y * inv_n;

    TS* dx = p.dx + off;
    const TS* dh = p.dh ? p.dh + off : nullptr;
    for (int64_t i = G::lane(); i < packs; i += G::size()) {
      const auto d = load_pack<T, VEC>(dy, i);
      const auto xv = load_pack<TS, VEC>(x, i);
      Pack<TS, VEC> w, hv, out;
      if (p.weight) w = load_pack<TS, VEC>(p.weight, i);
      if (dh) hv = load_pack<TS, VEC>(dh, i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float dk = static_cast<float>(d.v[k]);
        const float xh = (static_cast<float>(xv.v[k]) - mu) * r;
        const float g = p.weight ? __fmul_rn(dk, static_cast<float>(w.v[k]) + p.weight_offset) : dk;
        float o = norm_grad_input<float>(g, xh, r, mean_g, mean_gx);
        if (dh) o += static_cast<float>(hv.v[k]);
        out.v[k] = static_cast<TS>(o);
      }
      store_pack<TS, VEC>(dx, i, out);
    }
  }
  if (in_regs) {  // every thread of a group, rows or none (the buffer is zeroed anyway)
#pragma unroll
    for (int m = 0; m < RP; ++m) {
      const int64_t i = G::lane() + static_cast<int64_t>(m) * G::size();
      if (i >= packs) continue;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (dw) dw[i * VEC + k] = aw[m][k];
        if (db) db[i * VEC + k] = ab[m][k];
      }
    }
  }
}

// out[c] = sum_g partial[g, c], rounded once to T. Block (32, 8): columns x group slices.
template <typename T>
__global__ void sum_partials_kernel(const float* partial, const int64_t groups, const int64_t n,
                                    T* out) {
  ARCHEXT_SHARED(float, tile, [8][33]);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (col < n) {
    for (int64_t g = threadIdx.y; g < groups; g += 8) acc += partial[g * n + col];
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) s += tile[k][threadIdx.x];
    out[col] = static_cast<T>(s);
  }
}

struct Launch {
  bool warp_row;
  int threads;
  int64_t blocks;
  int64_t groups() const { return warp_row ? blocks * (threads / 32) : blocks; }
};

// max_blocks_per_sm bounds the grid (the backward also bounds its partial-sum buffer).
Launch plan(int64_t rows, int64_t n, int vec, int device, int64_t max_blocks_per_sm,
            int64_t max_groups, int64_t packs_per_thread = 4) {
  Launch l;
  l.warp_row = n <= kWarpRowMaxWidth;
  if (l.warp_row) {
    l.threads = kWarpModeThreads;
  } else {
    // About packs_per_thread packs per thread, between 128 and 1024 threads.
    const int64_t packs = n / vec;
    const int64_t want = (packs + packs_per_thread - 1) / packs_per_thread;
    l.threads = static_cast<int>(std::clamp<int64_t>((want + 31) / 32 * 32, 128, 1024));
  }
  const int64_t rows_per_block = l.warp_row ? l.threads / 32 : 1;
  int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  blocks = std::min<int64_t>(blocks, sm_count(device) * max_blocks_per_sm);
  blocks = std::min<int64_t>(blocks, std::max<int64_t>(1, max_groups / rows_per_block));
  l.blocks = std::max<int64_t>(blocks, 1);
  return l;
}

template <typename T>
int pack_width(int64_t n, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  if (n % kVec != 0) return 1;
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned16(p)) return 1;
  }
  return kVec;
}

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return has(t) ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

template <typename T>
T* mut_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// The forward's grid: plan()'s, capped at what is resident at once (one wave: every block does
// the same number of rows, give or take one).
template <typename T, typename TS, int VEC>
void launch_fwd(const Launch& l, const NormFwdParams<T, float, TS>& p, int64_t rows, int device,
                cudaStream_t stream) {
  if (l.warp_row) {
    const int64_t blocks = std::min(l.blocks, resident_blocks<norm_fwd_kernel<T, TS, VEC, true>>(l.threads, device));
    launch<norm_fwd_kernel<T, TS, VEC, true>>(blocks, l.threads, 0, stream, p, rows);
  } else {
    const int64_t blocks = std::min(l.blocks, resident_blocks<norm_fwd_kernel<T, TS, VEC, false>>(l.threads, device));
    launch<norm_fwd_kernel<T, TS, VEC, false>>(blocks, l.threads, 0, stream, p, rows);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename TS, int VEC>
void launch_bwd(const Launch& l, const NormBwdParams<T, float, TS>& p, int64_t rows,
                cudaStream_t stream) {
  if (l.warp_row) {
    launch<norm_bwd_kernel<T, TS, VEC, true>>(l.blocks, l.threads, 0, stream, p, rows);
  } else {
    launch<norm_bwd_kernel<T, TS, VEC, false>>(l.blocks, l.threads, 0, stream, p, rows);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A parameter as the kernels read it: in TS (a 16-bit weight of a mixed-precision call becomes
// a float32 copy, [n]: exact).
template <typename TS>
OptTensor param_as(const OptTensor& t) {
  if (!has(t)) return t;
  const auto want = c10::CppTypeToScalarType<TS>::value;
  return t->scalar_type() == want ? t : OptTensor(t->to(want));
}

// Calls f.template operator()<T>() with T the 16-bit activation type of a mixed-precision call.
template <typename F>
void dispatch_low(c10::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case c10::kHalf: f.template operator()<c10::Half>(); break;
    case c10::kBFloat16: f.template operator()<c10::BFloat16>(); break;
    default: TORCH_CHECK(false, op, ": no mixed-precision CUDA kernel for dtype ", dtype);
  }
}

// The forward of one (T, TS) pair: TS == T, or TS float32 beside a 16-bit T (x_t: x, or null
// for the plain norm of the float32 input `residual`).
template <typename T, typename TS>
void norm_fwd_typed(const NormFwdOut& out, const T* x_t, const OptTensor& residual,
                    const OptTensor& weight, const OptTensor& bias, int64_t rows, int64_t n,
                    double eps, double weight_offset, bool layer_norm, int device,
                    cudaStream_t stream) {
  const OptTensor w = param_as<TS>(weight), b = param_as<TS>(bias);
  NormFwdParams<T, float, TS> p{};
  p.x = x_t;
  p.residual = ptr_or_null<TS>(residual);
  p.weight = ptr_or_null<TS>(w);
  p.bias = ptr_or_null<TS>(b);
  p.y = mut_ptr<T>(out.y);
  p.h = mut_ptr<TS>(out.h);
  p.mean = mut_ptr<float>(out.mean);
  p.rstd = mut_ptr<float>(out.rstd);
  p.n = n;
  p.eps = static_cast<float>(eps);
  p.weight_offset = static_cast<float>(weight_offset);
  p.layer_norm = layer_norm;
  p.reg_row = vector_paths();
  // Packs of 16 bytes of TS (and as many elements of T).
  const int vec = pack_width<TS>(n, {p.x, p.residual, p.weight, p.bias, p.y, p.h});
  const Launch l = plan(rows, n, vec, device, 32, INT64_MAX, p.reg_row ? fwd_reg_packs(vec) : 4);
  if (vec == 1) {
    launch_fwd<T, TS, 1>(l, p, rows, device, stream);
  } else {
    launch_fwd<T, TS, 16 / sizeof(TS)>(l, p, rows, device, stream);
  }
}

template <typename T, typename TS>
void norm_bwd_typed(const NormBwdOut& out, const at::Tensor& dy, const at::Tensor& x,
                    const OptTensor& weight, const OptTensor& mean, const at::Tensor& rstd,
                    const OptTensor& dh, double weight_offset, int64_t rows, int64_t n,
                    cudaStream_t stream) {
  const bool want_dw = out.dweight.defined(), want_db = out.dbias.defined();
  const OptTensor w = param_as<TS>(weight);
  NormBwdParams<T, float, TS> p{};
  p.dy = ptr_or_null<T>(dy);
  p.x = ptr_or_null<TS>(x);
  p.weight = ptr_or_null<TS>(w);
  p.mean = has(mean) ? reinterpret_cast<const float*>(mean->data_ptr()) : nullptr;
  p.rstd = reinterpret_cast<const float*>(rstd.data_ptr());
  p.dh = ptr_or_null<TS>(dh);
  p.dx = mut_ptr<TS>(out.dx);
  p.n = n;
  p.weight_offset = static_cast<float>(weight_offset);
  const int vec = pack_width<TS>(n, {p.dy, p.x, p.weight, p.dh, p.dx});
  // Partial-sum buffers of at most 2^23 floats (32 MB) each. With weight or bias gradients,
  // threads enough for each to hold its partial sums in registers (bwd_reg_packs packs of
  // TS), where 1024 threads suffice.
  p.reg_partials = vector_paths() && (want_dw || want_db);
  const int64_t ppt = p.reg_partials ? std::min(4, bwd_reg_packs(vec)) : 4;
  // As many blocks per SM as are resident at once (warp mode: its launch bounds).
  const Launch l = plan(rows, n, vec, x.get_device(), n <= kWarpRowMaxWidth ? kWarpBwdBlocksPerSm : 4,
                        (want_dw || want_db) ? std::max<int64_t>(1, (int64_t{1} << 23) / n)
                                             : INT64_MAX, ppt);
  at::Tensor dw_part, db_part;
  const auto fopts = x.options().dtype(at::kFloat);
  if (want_dw) dw_part = at::zeros({l.groups(), n}, fopts);
  if (want_db) db_part = at::zeros({l.groups(), n}, fopts);
  p.dweight = mut_ptr<float>(dw_part);
  p.dbias = mut_ptr<float>(db_part);
  if (vec == 1) {
    launch_bwd<T, TS, 1>(l, p, rows, stream);
  } else {
    launch_bwd<T, TS, 16 / sizeof(TS)>(l, p, rows, stream);
  }
  // The gradients in x's dtype, TS (common/norm_host.h).
  const dim3 block(32, 8), grid(static_cast<unsigned>((n + 31) / 32));
  if (want_dw) {
    launch<sum_partials_kernel<TS>>(grid, block, 0, stream, p.dweight, l.groups(), n,
                                    mut_ptr<TS>(out.dweight));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (want_db) {
    launch<sum_partials_kernel<TS>>(grid, block, 0, stream, p.dbias, l.groups(), n,
                                    mut_ptr<TS>(out.dbias));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void norm_fwd(const NormFwdOut& out, const at::Tensor& x, const OptTensor& residual,
              const OptTensor& weight, const OptTensor& bias, double eps, double weight_offset,
              bool layer_norm) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  if (rows == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = x.get_device();
  const bool mixed = has(residual) ? residual->scalar_type() != x.scalar_type()
                                   : out.y.scalar_type() != x.scalar_type();
  if (mixed) {
    // A float32 stream beside 16-bit activations: x (16-bit) + residual (float32), or the plain
    // norm of a float32 x, passed to the kernel as its `residual`.
    dispatch_low(out.y.scalar_type(), "archext norm_fwd", [&]<typename T>() {
      const T* xt = has(residual) ? ptr_or_null<T>(x) : nullptr;
      norm_fwd_typed<T, float>(out, xt, has(residual) ? residual : OptTensor(x), weight, bias,
                               rows, n, eps, weight_offset, layer_norm, device, stream);
    });
    return;
  }
  dispatch_float(x.scalar_type(), "archext norm_fwd", [&]<typename T>() {
    norm_fwd_typed<T, T>(out, ptr_or_null<T>(x), residual, weight, bias, rows, n, eps,
                         weight_offset, layer_norm, device, stream);
  });
}

void norm_bwd(const NormBwdOut& out, const at::Tensor& dy, const at::Tensor& x,
              const OptTensor& weight, const OptTensor& mean, const at::Tensor& rstd,
              const OptTensor& dh, double weight_offset) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (rows == 0) {
    if (out.dweight.defined()) out.dweight.zero_();
    if (out.dbias.defined()) out.dbias.zero_();
    return;
  }
  if (dy.scalar_type() != x.scalar_type()) {  // 16-bit grad_y of a float32 stream's norm
    dispatch_low(dy.scalar_type(), "archext norm_bwd", [&]<typename T>() {
      norm_bwd_typed<T, float>(out, dy, x, weight, mean, rstd, dh, weight_offset, rows, n, stream);
    });
    return;
  }
  dispatch_float(x.scalar_type(), "archext norm_bwd", [&]<typename T>() {
    norm_bwd_typed<T, T>(out, dy, x, weight, mean, rstd, dh, weight_offset, rows, n, stream);
  });
}

ARCHEXT_CUDA_LIBRARY_IMPL(m) { register_norm_ops<norm_fwd, norm_bwd>(m); }

}  // namespace archext::ARCHEXT_CUDA_NS
