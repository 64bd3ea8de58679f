// CUDA kernels of the tiled (flash) attention, forward and backward (FlashAttention,
// Dao et al. 2022 / 2023: online softmax over key tiles, P recomputed from the saved lse in the
// backward). The per-element math (capped logit, its slope, the mask, the rel_bias column, the
// tile ranges) is that of common/attention_math.h, shared with the CPU kernels; the checks and
// outputs are common/attention_host.h's. Float32 arithmetic over the CUDA math library's expf /
// tanhf / logf (no fast-math intrinsics); 64-bit offsets; no O(Sq * Sk) buffer.
//
// Tiles: R query rows by R keys, staged in shared memory as float32; R = 16 for head_dim <= 128
// and 8 for head_dim <= 256 (the kD bucket, a template parameter, sizes the static shared memory:
// at most 34 KiB per block). A block has 8 * R threads: 8 lanes (of one warp) per row, a lane
// owning head-dim columns g, g + 8, ... of its row's accumulators (kD / 8 registers each) and
// keys (or rows) g, g + 8, ... of each score tile. The kernels' launch bounds ask for 1 block per
// SM: without it ptxas aimed at 72-80 registers a thread and spilled (head_dim 64 and 128); with
// it they take 51-172 (sm_80) and 90-192 (sm_90), no spill. A plain design, checked under the
// emulator and not tuned on a GPU: scalar float32 FMAs from shared memory, no tensor cores.
//
//   attn_fwd_kernel       one block per (b, q head, query tile): online (max, sum) per row over
//                         the key tiles of the causal / window band, o = acc / sum, lse.
//   attn_delta_kernel     delta[b, h, i] = sum_d grad_o * o (one warp per row).
//   attn_dkdv_kernel      one block per (b, kv head, key tile): grad_k, grad_v summed over the
//                         group's q heads and their query tiles in the band.
//   attn_dq_kernel        one block per (b, q head, query tile): grad_q; with grad_bias, one
//                         block per (b, q head) walks all the query tiles and adds the
//                         diagonal sums of dS to its own row of partials[b, h, :] in a fixed
//                         order (no atomics: deterministic run to run; B * Hq blocks, less
//                         parallel, for partials of O(B * Hq * (Sq + Sk)) floats).
//   attn_bias_sum_kernel  grad_bias[h, t] = sum_b partials[b, h, t], in order of b.
//
// Backward formulas, with s the capped logit before the bias, P = exp(s + bias - lse):
//   dP = grad_o . v,  dS = P (dP - delta)  (= d loss / d logit = d loss / d rel_bias),
//   d loss / d (q . k) = dS * attn_logit_slope(s),
//   grad_q = sum_j dS' k_j,  grad_k = sum_i dS' q_i,  grad_v = sum_i P grad_o_i.
#include <algorithm>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/attention_host.h"
#include "common/attention_math.h"
#include "cuda/cuda_utils.cuh"

namespace archext::ARCHEXT_CUDA_NS {
namespace {

// The tile shape of the head-dim bucket kD (64, 128, 256).
template <int kD>
struct AttnTile {
  static constexpr int kRows = kD > 128 ? 8 : 16;  // query rows of a query tile, keys of a key tile
  static constexpr int kThreads = 8 * kRows;        // 8 lanes per row (or key)
  static constexpr int kCols = kD / 8;              // head-dim columns per lane
  static constexpr int kPerLane = kRows / 8;        // score-tile entries per lane and row (or key)
};

__device__ __forceinline__ float tanh_fn(float x) { return tanhf(x); }

// Rows [row0, row0 + n) of a [rows, D] slice (row stride `stride`, unit stride on D) into
// dst[r][d] as float32, d < D. Block-wide; the caller holds the barriers.
template <typename T, int kD>
__device__ __forceinline__ void load_rows(float (*dst)[kD], const T* src, int64_t stride,
                                          int64_t row0, int n, int d_len) {
  for (int idx = threadIdx.x; idx < n * d_len; idx += blockDim.x) {
    const int r = idx / d_len, d = idx % d_len;
    dst[r][d] = static_cast<float>(src[(row0 + r) * stride + d]);
  }
}

// sum_d a[d] * b[d] over d < D, in order of d.
__device__ __forceinline__ float dot_row(const float* a, const float* b, int d_len) {
  float s = 0.f;
  for (int d = 0; d < d_len; ++d) s += a[d] * b[d];
  return s;
}

// Max and sum over the 8 lanes of a row (aligned groups of 8 lanes; the whole warp calls).
__device__ __forceinline__ float row_max(float v) {
#pragma unroll
  for (int off = 4; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int off = 4; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The capped logit s (before the bias) of query position pos and key j, and whether j is visible
// to pos (seg_pos the segment of pos, 0 without segment_ids).
template <typename T>
__device__ __forceinline__ bool visible(const FlashAttnParams<T, float>& p, int64_t b, int64_t pos,
                                        int32_t seg_pos, int64_t j) {
  const int32_t seg_j = p.segment_ids != nullptr ? p.segment_ids[b * p.sk + j] : 0;
  return attn_visible(pos, j, p.causal, p.window, seg_pos, seg_j);
}

template <typename T>
__device__ __forceinline__ int32_t segment_of(const FlashAttnParams<T, float>& p, int64_t b,
                                              int64_t pos) {
  return p.segment_ids != nullptr ? p.segment_ids[b * p.sk + pos] : 0;
}

template <typename T>
__device__ __forceinline__ float bias_at(const FlashAttnParams<T, float>& p, int64_t h,
                                         int64_t pos, int64_t j) {
  return p.rel_bias != nullptr ? p.rel_bias[h * p.bias_len + attn_bias_index(pos, j, p.sk)] : 0.f;
}

// ---- forward ---------------------------------------------------------------------------------

template <typename T, int kD>
__global__ void __launch_bounds__(AttnTile<kD>::kThreads, 1)
    attn_fwd_kernel(const FlashAttnParams<T, float> p) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(AttnTile<kD>::kThreads, 1);
  using Tile = AttnTile<kD>;
  constexpr int R = Tile::kRows;
  ARCHEXT_SHARED(float, q_s, [R][kD]);
  ARCHEXT_SHARED(float, k_s, [R][kD]);
  ARCHEXT_SHARED(float, v_s, [R][kD]);
  ARCHEXT_SHARED(float, p_s, [R][R]);  // P of the current key tile, row-major

  const int64_t n_tiles = (p.sq + R - 1) / R;
  const int64_t blk = blockIdx.x;
  const int64_t tile = blk % n_tiles, h = (blk / n_tiles) % p.hq, b = blk / (n_tiles * p.hq);
  const int64_t hk = h / p.group;
  const int64_t i0 = tile * R;
  const int rows = static_cast<int>(std::min<int64_t>(R, p.sq - i0));
  const int d_len = static_cast<int>(p.d);
  const int r = threadIdx.x / 8, g = threadIdx.x % 8;
  const int64_t i = i0 + r;
  const bool row_ok = r < rows;
  const int64_t pos = attn_query_pos(i, p.sq, p.sk);
  const int32_t seg_pos = row_ok ? segment_of(p, b, pos) : 0;

  load_rows<T, kD>(q_s, p.q + b * p.q_stride[0] + h * p.q_stride[2], p.q_stride[1], i0, rows, d_len);
  const T* k_base = p.k + b * p.k_stride[0] + hk * p.k_stride[2];
  const T* v_base = p.v + b * p.v_stride[0] + hk * p.v_stride[2];

  int64_t lo, hi;
  attn_key_range(i0, i0 + rows, p.sq, p.sk, p.causal, p.window, lo, hi);
  float m = -INFINITY, l = 0.f;  // the row's running max and sum of exp(logit - m)
  float acc[Tile::kCols];
#pragma unroll
  for (int c = 0; c < Tile::kCols; ++c) acc[c] = 0.f;

  for (int64_t j0 = lo; j0 < hi; j0 += R) {
    const int keys = static_cast<int>(std::min<int64_t>(R, hi - j0));
    __syncthreads();  // the previous tile's readers are done with k_s, v_s, p_s (and q_s is in)
    load_rows<T, kD>(k_s, k_base, p.k_stride[1], j0, keys, d_len);
    load_rows<T, kD>(v_s, v_base, p.v_stride[1], j0, keys, d_len);
    __syncthreads();
    float s[Tile::kPerLane];
    float tile_max = -INFINITY;
#pragma unroll
    for (int e = 0; e < Tile::kPerLane; ++e) {
      const int c = g + 8 * e;
      const int64_t j = j0 + c;
      s[e] = -INFINITY;
      if (row_ok && c < keys && visible(p, b, pos, seg_pos, j)) {
        const float x = attn_logit(dot_row(q_s[r], k_s[c], d_len), p.scale, p.cap, p.inv_cap,
                                   tanh_fn);
        s[e] = x + bias_at(p, h, pos, j);
      }
      tile_max = fmaxf(tile_max, s[e]);
    }
    const float m_new = fmaxf(m, row_max(tile_max));
    // m_new = -inf: nothing visible yet (every p below is 0; exp(-inf - -inf) would be NaN).
    const float alpha = m_new == -INFINITY ? 1.f : expf(m - m_new);
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < Tile::kPerLane; ++e) {
      const float pe = s[e] == -INFINITY ? 0.f : expf(s[e] - m_new);
      p_s[r][g + 8 * e] = pe;
      sum += pe;
    }
    l = l * alpha + row_sum(sum);
    m = m_new;
    __syncwarp();  // the row's P, written by its 8 lanes (one warp), is read by all of them
#pragma unroll
    for (int cc = 0; cc < Tile::kCols; ++cc) acc[cc] *= alpha;
    for (int c = 0; c < keys; ++c) {
      const float pc = p_s[r][c];
#pragma unroll
      for (int cc = 0; cc < Tile::kCols; ++cc) {
        const int d = g + 8 * cc;
        if (d < d_len) acc[cc] += pc * v_s[c][d];
      }
    }
  }

  if (row_ok) {
    const float inv = l > 0.f ? 1.f / l : 0.f;  // a row with no visible key: o = 0
    T* o = p.o + ((b * p.sq + i) * p.hq + h) * p.d;
#pragma unroll
    for (int cc = 0; cc < Tile::kCols; ++cc) {
      const int d = g + 8 * cc;
      if (d < d_len) o[d] = static_cast<T>(acc[cc] * inv);
    }
    if (g == 0) p.lse[(b * p.hq + h) * p.sq + i] = m == -INFINITY ? m : m + logf(l);
  }
}

// ---- backward --------------------------------------------------------------------------------

constexpr int kDeltaThreads = 128;  // 4 rows (warps) per block

// delta[b, h, i] = sum_d grad_o[b, i, h, d] * o[b, i, h, d] (float32), rows in (b, i, h) order.
template <typename T>
__global__ void __launch_bounds__(kDeltaThreads)
    attn_delta_kernel(const FlashAttnParams<T, float> p, float* delta) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(kDeltaThreads);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kDeltaThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.batch * p.sq * p.hq;
  const int64_t h = row % p.hq, i = (row / p.hq) % p.sq, b = row / (p.hq * p.sq);
  float s = 0.f;
  if (row < rows) {
    const T* go = p.grad_o + b * p.grad_o_stride[0] + i * p.grad_o_stride[1] + h * p.grad_o_stride[2];
    const T* o = p.o_in + b * p.o_stride[0] + i * p.o_stride[1] + h * p.o_stride[2];
    for (int64_t d = lane; d < p.d; d += 32) s += static_cast<float>(go[d]) * static_cast<float>(o[d]);
  }
  s = warp_sum(s);
  if (row < rows && lane == 0) delta[(b * p.hq + h) * p.sq + i] = s;
}

// One block per (b, kv head, key tile of R keys): lane (c, g) owns key c's columns g, g + 8, ...
// of grad_k and grad_v, and the query rows g, g + 8, ... of each score tile.
template <typename T, int kD>
__global__ void __launch_bounds__(AttnTile<kD>::kThreads, 1)
    attn_dkdv_kernel(const FlashAttnParams<T, float> p, const float* delta) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(AttnTile<kD>::kThreads, 1);
  using Tile = AttnTile<kD>;
  constexpr int R = Tile::kRows;
  ARCHEXT_SHARED(float, k_s, [R][kD]);
  ARCHEXT_SHARED(float, v_s, [R][kD]);
  ARCHEXT_SHARED(float, q_s, [R][kD]);
  ARCHEXT_SHARED(float, do_s, [R][kD]);
  ARCHEXT_SHARED(float, p_s, [R][R]);   // P[r][c]
  ARCHEXT_SHARED(float, ds_s, [R][R]);  // dS[r][c] * slope: d loss / d (q_r . k_c)
  ARCHEXT_SHARED(float, lse_s, [R]);
  ARCHEXT_SHARED(float, delta_s, [R]);

  const int64_t n_tiles = (p.sk + R - 1) / R;
  const int64_t blk = blockIdx.x;
  const int64_t tile = blk % n_tiles, hk = (blk / n_tiles) % p.hk, b = blk / (n_tiles * p.hk);
  const int64_t j0 = tile * R;
  const int keys = static_cast<int>(std::min<int64_t>(R, p.sk - j0));
  const int d_len = static_cast<int>(p.d);
  const int c = threadIdx.x / 8, g = threadIdx.x % 8;
  const int64_t j = j0 + c;
  const bool key_ok = c < keys;

  load_rows<T, kD>(k_s, p.k + b * p.k_stride[0] + hk * p.k_stride[2], p.k_stride[1], j0, keys, d_len);
  load_rows<T, kD>(v_s, p.v + b * p.v_stride[0] + hk * p.v_stride[2], p.v_stride[1], j0, keys, d_len);

  float dk[Tile::kCols], dv[Tile::kCols];
#pragma unroll
  for (int cc = 0; cc < Tile::kCols; ++cc) dk[cc] = dv[cc] = 0.f;

  int64_t qlo, qhi;
  attn_query_range(j0, j0 + keys, p.sq, p.sk, p.causal, p.window, qlo, qhi);
  for (int64_t hh = 0; hh < p.group; ++hh) {
    const int64_t h = hk * p.group + hh;
    const T* q_base = p.q + b * p.q_stride[0] + h * p.q_stride[2];
    const T* go_base = p.grad_o + b * p.grad_o_stride[0] + h * p.grad_o_stride[2];
    const float* lse_row = p.lse_in + (b * p.hq + h) * p.sq;
    const float* delta_row = delta + (b * p.hq + h) * p.sq;
    for (int64_t i0 = qlo; i0 < qhi; i0 += R) {
      const int rows = static_cast<int>(std::min<int64_t>(R, qhi - i0));
      __syncthreads();  // the previous tile's readers are done (and k_s, v_s are in)
      load_rows<T, kD>(q_s, q_base, p.q_stride[1], i0, rows, d_len);
      load_rows<T, kD>(do_s, go_base, p.grad_o_stride[1], i0, rows, d_len);
      if (static_cast<int>(threadIdx.x) < rows) {
        lse_s[threadIdx.x] = lse_row[i0 + threadIdx.x];
        delta_s[threadIdx.x] = delta_row[i0 + threadIdx.x];
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < Tile::kPerLane; ++e) {
        const int r = g + 8 * e;
        const int64_t i = i0 + r;
        const int64_t pos = attn_query_pos(i, p.sq, p.sk);
        float pe = 0.f, dse = 0.f;
        // lse = -inf: a row with no visible key, P = 0 (exp(x - -inf) would be inf).
        if (key_ok && r < rows && lse_s[r] != -INFINITY &&
            visible(p, b, pos, segment_of(p, b, pos), j)) {
          const float x = attn_logit(dot_row(q_s[r], k_s[c], d_len), p.scale, p.cap, p.inv_cap,
                                     tanh_fn);
          pe = expf(x + bias_at(p, h, pos, j) - lse_s[r]);
          const float dp = dot_row(do_s[r], v_s[c], d_len);
          dse = pe * (dp - delta_s[r]) * attn_logit_slope(x, p.scale, p.cap, p.inv_cap);
        }
        p_s[r][c] = pe;
        ds_s[r][c] = dse;
      }
      __syncwarp();  // key c's column of P and dS, written by its 8 lanes (one warp)
      for (int r = 0; r < rows; ++r) {
        const float pr = p_s[r][c], dsr = ds_s[r][c];
#pragma unroll
        for (int cc = 0; cc < Tile::kCols; ++cc) {
          const int d = g + 8 * cc;
          if (d < d_len) {
            dv[cc] += pr * do_s[r][d];
            dk[cc] += dsr * q_s[r][d];
          }
        }
      }
    }
  }

  if (key_ok) {
    T* gk = p.grad_k + ((b * p.sk + j) * p.hk + hk) * p.d;
    T* gv = p.grad_v + ((b * p.sk + j) * p.hk + hk) * p.d;
#pragma unroll
    for (int cc = 0; cc < Tile::kCols; ++cc) {
      const int d = g + 8 * cc;
      if (d < d_len) {
        gk[d] = static_cast<T>(dk[cc]);
        gv[d] = static_cast<T>(dv[cc]);
      }
    }
  }
}

// grad_q: one block per (b, q head, run of tiles_per_block query tiles; n_runs runs). partials (with
// grad_bias): [B, Hq, L], the block's row zeroed here, then for each (query tile, key tile) the
// sums of dS over each of its diagonals added by one thread each, in order (tiles_per_block is
// then every tile of the head, so that the row has one block).
template <typename T, int kD>
__global__ void __launch_bounds__(AttnTile<kD>::kThreads, 1)
    attn_dq_kernel(const FlashAttnParams<T, float> p, const float* delta, int64_t tiles_per_block,
                   int64_t n_runs, float* partials) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(AttnTile<kD>::kThreads, 1);
  using Tile = AttnTile<kD>;
  constexpr int R = Tile::kRows;
  ARCHEXT_SHARED(float, q_s, [R][kD]);
  ARCHEXT_SHARED(float, do_s, [R][kD]);
  ARCHEXT_SHARED(float, k_s, [R][kD]);
  ARCHEXT_SHARED(float, v_s, [R][kD]);
  ARCHEXT_SHARED(float, ds_s, [R][R]);    // dS[r][c] * slope
  ARCHEXT_SHARED(float, dsb_s, [R][R]);   // dS[r][c] (d loss / d rel_bias), with partials only

  const int64_t n_tiles = (p.sq + R - 1) / R;
  const int64_t blk = blockIdx.x;
  const int64_t run = blk % n_runs, h = (blk / n_runs) % p.hq, b = blk / (n_runs * p.hq);
  const int64_t hk = h / p.group;
  const int d_len = static_cast<int>(p.d);
  const int r = threadIdx.x / 8, g = threadIdx.x % 8;
  const T* q_base = p.q + b * p.q_stride[0] + h * p.q_stride[2];
  const T* go_base = p.grad_o + b * p.grad_o_stride[0] + h * p.grad_o_stride[2];
  const T* k_base = p.k + b * p.k_stride[0] + hk * p.k_stride[2];
  const T* v_base = p.v + b * p.v_stride[0] + hk * p.v_stride[2];
  float* part = partials != nullptr ? partials + (b * p.hq + h) * p.bias_len : nullptr;
  if (part != nullptr) {
    for (int64_t t = threadIdx.x; t < p.bias_len; t += blockDim.x) part[t] = 0.f;
  }

  const int64_t tile_end = std::min(n_tiles, (run + 1) * tiles_per_block);
  for (int64_t tile = run * tiles_per_block; tile < tile_end; ++tile) {
    const int64_t i0 = tile * R;
    const int rows = static_cast<int>(std::min<int64_t>(R, p.sq - i0));
    const int64_t i = i0 + r;
    const bool row_ok = r < rows;
    const int64_t pos = attn_query_pos(i, p.sq, p.sk);
    const int32_t seg_pos = row_ok ? segment_of(p, b, pos) : 0;
    const float lse = row_ok ? p.lse_in[(b * p.hq + h) * p.sq + i] : -INFINITY;
    const float dl = row_ok ? delta[(b * p.hq + h) * p.sq + i] : 0.f;
    __syncthreads();  // the previous tile's readers are done with q_s, do_s
    load_rows<T, kD>(q_s, q_base, p.q_stride[1], i0, rows, d_len);
    load_rows<T, kD>(do_s, go_base, p.grad_o_stride[1], i0, rows, d_len);

    float acc[Tile::kCols];
#pragma unroll
    for (int cc = 0; cc < Tile::kCols; ++cc) acc[cc] = 0.f;
    int64_t lo, hi;
    attn_key_range(i0, i0 + rows, p.sq, p.sk, p.causal, p.window, lo, hi);
    for (int64_t j0 = lo; j0 < hi; j0 += R) {
      const int keys = static_cast<int>(std::min<int64_t>(R, hi - j0));
      __syncthreads();  // the previous key tile's readers are done with k_s, v_s, ds_s, dsb_s
      load_rows<T, kD>(k_s, k_base, p.k_stride[1], j0, keys, d_len);
      load_rows<T, kD>(v_s, v_base, p.v_stride[1], j0, keys, d_len);
      __syncthreads();
#pragma unroll
      for (int e = 0; e < Tile::kPerLane; ++e) {
        const int c = g + 8 * e;
        const int64_t j = j0 + c;
        float ds = 0.f, dse = 0.f;
        // lse = -inf: a row with no visible key, P = 0 (exp(x - -inf) would be inf).
        if (row_ok && c < keys && lse != -INFINITY && visible(p, b, pos, seg_pos, j)) {
          const float x = attn_logit(dot_row(q_s[r], k_s[c], d_len), p.scale, p.cap, p.inv_cap,
                                     tanh_fn);
          const float pe = expf(x + bias_at(p, h, pos, j) - lse);
          ds = pe * (dot_row(do_s[r], v_s[c], d_len) - dl);
          dse = ds * attn_logit_slope(x, p.scale, p.cap, p.inv_cap);
        }
        ds_s[r][c] = dse;
        dsb_s[r][c] = ds;
      }
      __syncwarp();  // row r's dS, written by its 8 lanes (one warp)
      for (int c = 0; c < keys; ++c) {
        const float dsc = ds_s[r][c];
#pragma unroll
        for (int cc = 0; cc < Tile::kCols; ++cc) {
          const int d = g + 8 * cc;
          if (d < d_len) acc[cc] += dsc * k_s[c][d];
        }
      }
      if (part != nullptr) {
        __syncthreads();  // every row's dS is in
        // Thread t < 2R - 1 sums the diagonal c - r = t - (R - 1) of the tile, which is column
        // j - pos + Sk - 1 = j0 - i0 + Sq - 1 + (c - r) of rel_bias.
        const int diag = static_cast<int>(threadIdx.x) - (R - 1);
        if (diag < R) {
          float sum = 0.f;
          bool any = false;
          for (int rr = std::max(0, -diag); rr < rows && rr + diag < keys; ++rr) {
            sum += dsb_s[rr][rr + diag];
            any = true;
          }
          if (any) part[j0 - i0 + p.sq - 1 + diag] += sum;
        }
      }
    }
    if (row_ok) {
      T* gq = p.grad_q + ((b * p.sq + i) * p.hq + h) * p.d;
#pragma unroll
      for (int cc = 0; cc < Tile::kCols; ++cc) {
        const int d = g + 8 * cc;
        if (d < d_len) gq[d] = static_cast<T>(acc[cc]);
      }
    }
  }
}

constexpr int kBiasSumThreads = 256;

// grad_bias[n] = sum_b partials[b * n_per + n] for n < n_per (n_per = Hq * L), in order of b.
__global__ void __launch_bounds__(kBiasSumThreads)
    attn_bias_sum_kernel(const float* partials, int64_t batch, int64_t n_per, float* grad_bias) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(kBiasSumThreads);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < n_per; n += step) {
    float s = 0.f;
    for (int64_t b = 0; b < batch; ++b) s += partials[b * n_per + n];
    grad_bias[n] = s;
  }
}

// ---- launchers -------------------------------------------------------------------------------

// Calls f.template operator()<kD>() with the head-dim bucket of d (1 <= d <= 256, checked).
template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  if (d <= 64) {
    f.template operator()<64>();
  } else if (d <= 128) {
    f.template operator()<128>();
  } else {
    f.template operator()<256>();
  }
}

// The backend of common/attention_host.h's FlashAttnOps (which checks the arguments, allocates
// the outputs and answers the empty cases: here B, Sq, Sk, Hq >= 1).
struct Cuda {
  static void fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& rel_bias, const at::Tensor& segment_ids, const AttnShape& s,
                  double scale, double softcap, bool causal, int64_t window, const at::Tensor& o,
                  const at::Tensor& lse) {
    const char* op = "archext::flash_attn_fwd";
    c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_float(q.scalar_type(), op, [&]<typename T>() {
      auto p = flash_attn_params<T, float>(q, k, v, rel_bias, segment_ids, s, scale, softcap,
                                           causal, window);
      p.o = reinterpret_cast<T*>(o.data_ptr());
      p.lse = lse.data_ptr<float>();
      dispatch_head_dim(s.d, [&]<int kD>() {
        using Tile = AttnTile<kD>;
        const int64_t blocks = s.batch * s.hq * ((s.sq + Tile::kRows - 1) / Tile::kRows);
        launch<attn_fwd_kernel<T, kD>>(grid_x(blocks, op), Tile::kThreads, 0, stream, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void bwd(const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                  const at::Tensor& rel_bias, const at::Tensor& segment_ids, const AttnShape& s,
                  double scale, double softcap, bool causal, int64_t window,
                  const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
                  const at::Tensor& grad_bias) {
    const char* op = "archext::flash_attn_bwd";
    c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t q_rows = s.batch * s.sq * s.hq;
    const at::Tensor delta = at::empty({q_rows}, q.options().dtype(c10::kFloat));
    // grad_bias: per-batch partials [B, Hq, L], summed after (B = 1: grad_bias itself).
    at::Tensor partials;
    if (grad_bias.defined()) {
      partials = s.batch == 1 ? grad_bias
                              : at::empty({s.batch, s.hq, s.bias_len}, grad_bias.options());
    }
    dispatch_float(q.scalar_type(), op, [&]<typename T>() {
      auto p = flash_attn_params<T, float>(q, k, v, rel_bias, segment_ids, s, scale, softcap,
                                           causal, window);
      flash_attn_bwd_params<T, float>(p, grad_o, o, lse, grad_q, grad_k, grad_v, grad_bias);
      float* delta_p = delta.data_ptr<float>();
      constexpr int64_t kRowsPerBlock = kDeltaThreads / 32;
      launch<attn_delta_kernel<T>>(grid_x((q_rows + kRowsPerBlock - 1) / kRowsPerBlock, op),
                                   kDeltaThreads, 0, stream, p, delta_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dispatch_head_dim(s.d, [&]<int kD>() {
        using Tile = AttnTile<kD>;
        constexpr int R = Tile::kRows;
        const int64_t kv_blocks = s.batch * s.hk * ((s.sk + R - 1) / R);
        launch<attn_dkdv_kernel<T, kD>>(grid_x(kv_blocks, op), Tile::kThreads, 0, stream, p,
                                        static_cast<const float*>(delta_p));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // With partials, one block per (b, q head) walks all the head's query tiles.
        const int64_t q_tiles = (s.sq + R - 1) / R;
        const int64_t tiles_per_block = partials.defined() ? q_tiles : 1;
        const int64_t runs = partials.defined() ? 1 : q_tiles;
        launch<attn_dq_kernel<T, kD>>(grid_x(s.batch * s.hq * runs, op), Tile::kThreads, 0,
                                      stream, p, static_cast<const float*>(delta_p), tiles_per_block, runs,
                                      partials.defined() ? partials.data_ptr<float>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    if (partials.defined() && s.batch != 1) {
      const int64_t n = grad_bias.numel();
      const int64_t blocks = std::min<int64_t>((n + kBiasSumThreads - 1) / kBiasSumThreads, 1024);
      launch<attn_bias_sum_kernel>(static_cast<unsigned>(blocks), kBiasSumThreads, 0, stream,
                                   static_cast<const float*>(partials.data_ptr<float>()), s.batch,
                                   n, grad_bias.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

}  // namespace

ARCHEXT_CUDA_LIBRARY_IMPL(m) { register_attention_ops<Cuda>(m); }

}  // namespace archext::ARCHEXT_CUDA_NS
