// Per-element math of the tiled attention (flash_attn_fwd / flash_attn_bwd), shared by the CPU
// and CUDA kernels so that the CPU tests check the formulas the GPU runs. No ATen here: this
// header compiles as host C++ and as CUDA device code.
//
// Shapes: q [B, Sq, Hq, D], k and v [B, Sk, Hk, D], rel_bias [Hq, Sq + Sk - 1],
// segment_ids [B, Sk]. Query row i sits at key position p = i + Sk - Sq (bottom-right aligned,
// as softmax_fwd and reference.attention_mask). For key j:
//   x = scale * q_i . k_j
//   s = cap * tanh(x / cap) (cap 0: s = x)  + rel_bias[h, j - p + Sk - 1]
//   visible: (!causal or j <= p) and (window < 1 or p - j < window) and
//            (no segment_ids or segment_ids[b, p] == segment_ids[b, j])
//   ds / d(q_i . k_j) = scale * (1 - tanh^2(x / cap))   (cap 0: scale)
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "common/stability_math.h"

namespace archext {

// Kernel parameters (T the element type, acc_t float, or double for float64 on the CPU).
// Strides are in elements; every tensor has unit stride on D.
template <typename T, typename acc_t>
struct FlashAttnParams {
  const T* q;                  // [B, Sq, Hq, D]
  const T* k;                  // [B, Sk, Hk, D]
  const T* v;                  // [B, Sk, Hk, D]
  int64_t q_stride[3];         // batch, seq, head
  int64_t k_stride[3];
  int64_t v_stride[3];
  const acc_t* rel_bias;       // [Hq, L] contiguous (L = Sq + Sk - 1), or null
  const int32_t* segment_ids;  // [B, Sk] contiguous, or null
  int64_t batch, sq, sk, hq, hk, d;
  int64_t group;               // hq / hk: query head h reads kv head h / group
  int64_t bias_len;            // L
  acc_t scale, cap, inv_cap;   // cap = 0: no soft-cap
  bool causal;
  int64_t window;              // < 1: none
  // forward outputs
  T* o;                        // [B, Sq, Hq, D] contiguous
  acc_t* lse;                  // [B, Hq, Sq] contiguous
  // backward inputs (grad_o and o with unit stride on D, any other strides)
  const T* grad_o;             // [B, Sq, Hq, D]
  int64_t grad_o_stride[3];
  const T* o_in;               // [B, Sq, Hq, D]
  int64_t o_stride[3];
  const acc_t* lse_in;         // [B, Hq, Sq] contiguous
  // backward outputs (contiguous)
  T* grad_q;                   // [B, Sq, Hq, D]
  T* grad_k;                   // [B, Sk, Hk, D]
  T* grad_v;                   // [B, Sk, Hk, D]
  acc_t* grad_bias;            // [Hq, L] (or a backend's partials), null when not wanted
};

// Key position of query row i.
ARCHEXT_HD int64_t attn_query_pos(int64_t i, int64_t sq, int64_t sk) { return i + sk - sq; }

// Column of rel_bias for query position p and key j: j - p + Sk - 1, in [0, Sq + Sk - 1).
ARCHEXT_HD int64_t attn_bias_index(int64_t p, int64_t j, int64_t sk) { return j - p + sk - 1; }

// The causal / window part of the mask (segments apart): may query position p see key j?
ARCHEXT_HD bool attn_band_visible(int64_t p, int64_t j, bool causal, int64_t window) {
  return (!causal || j <= p) && (window < 1 || p - j < window);
}

// The whole mask; seg_p and seg_j are the segment ids of position p and key j (pass equal
// values, e.g. 0 and 0, without segment_ids).
ARCHEXT_HD bool attn_visible(int64_t p, int64_t j, bool causal, int64_t window, int32_t seg_p,
                             int32_t seg_j) {
  return attn_band_visible(p, j, causal, window) && seg_p == seg_j;
}

// The keys [lo, hi) that any query row in [i0, i1) (i0 < i1) may see through the causal /
// window band; empty (lo == hi) when none. Tiles outside it are skipped.
ARCHEXT_HD void attn_key_range(int64_t i0, int64_t i1, int64_t sq, int64_t sk, bool causal,
                               int64_t window, int64_t& lo, int64_t& hi) {
  const int64_t p0 = attn_query_pos(i0, sq, sk), p1 = attn_query_pos(i1 - 1, sq, sk);
  hi = causal ? (p1 + 1 < sk ? p1 + 1 : sk) : sk;
  lo = window >= 1 ? p0 - window + 1 : 0;
  if (lo < 0) lo = 0;
  if (hi < 0) hi = 0;
  if (lo > hi) lo = hi;
}

// The query rows [lo, hi) that may see any key in [j0, j1) (j0 < j1) through the band.
ARCHEXT_HD void attn_query_range(int64_t j0, int64_t j1, int64_t sq, int64_t sk, bool causal,
                                 int64_t window, int64_t& lo, int64_t& hi) {
  const int64_t off = sk - sq;  // p = i + off
  lo = causal ? j0 - off : 0;                    // p >= j0
  hi = window >= 1 ? (j1 - 1) + window - off : sq;  // p < (j1 - 1) + window
  if (lo < 0) lo = 0;
  if (hi > sq) hi = sq;
  if (lo > sq) lo = sq;
  if (hi < lo) hi = lo;
}

// The soft-capped logit of a dot product q . k (without the bias): s = cap * tanh(scale dot /
// cap), or scale dot when cap = 0. Same formula (softcap_value) as the softmax and the loss.
template <typename acc_t, typename Tanh>
ARCHEXT_HD acc_t attn_logit(acc_t dot, acc_t scale, acc_t cap, acc_t inv_cap, Tanh tanh_fn) {
  const acc_t x = scale * dot;
  return cap != acc_t(0) ? softcap_value(x, cap, inv_cap, tanh_fn) : x;
}

// d s / d dot from the capped logit s (as attn_logit returned it, before the bias):
// scale * (1 - (s / cap)^2), or scale when cap = 0.
template <typename acc_t>
ARCHEXT_HD acc_t attn_logit_slope(acc_t capped, acc_t scale, acc_t cap, acc_t inv_cap) {
  return cap != acc_t(0) ? scale * softcap_slope(capped * inv_cap) : scale;
}

}  // namespace archext
