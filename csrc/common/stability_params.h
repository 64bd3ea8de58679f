// Kernel parameters of the stability family (cross-entropy, attention softmax, soft-cap),
// shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace archext {

// Cross-entropy over logits [rows, vocab] (unit stride on vocab, row stride `stride`).
template <typename T, typename acc_t>
struct CrossEntropyParams {
  const T* logits;           // [rows, vocab]
  int64_t stride;            // elements between rows of logits
  const int64_t* target;     // [rows]
  int64_t rows, vocab;
  int64_t ignore_index;
  acc_t eps;                 // label smoothing
  acc_t coef;                // z-loss coefficient
  acc_t cap, inv_cap;        // soft-cap (cap = 0: off)
  // forward
  acc_t* loss;               // [rows] per-row loss (z-loss included; 0 for ignored rows)
  acc_t* z_loss;             // [rows]
  acc_t* lse;                // [rows] log-sum-exp of the (capped) logits, for the backward
  // backward
  const acc_t* grad_loss;    // [rows]
  const acc_t* grad_z_loss;  // [rows] or null
  T* grad_logits;            // [rows, vocab], contiguous
};

// Attention softmax over rows of x viewed as [B, H, Sq, Sk] (contiguous), with an optional
// bias of any strides broadcast to that shape.
template <typename T, typename acc_t>
struct SoftmaxParams {
  const T* x;                // [B, H, Sq, Sk] (forward) / recomputation of the cap (backward)
  T* y;                      // [B, H, Sq, Sk]
  const T* bias;             // null or strides below
  int64_t bias_stride[4];
  int64_t heads, sq, sk, rows;  // rows = B * H * Sq
  acc_t scale, cap, inv_cap;    // cap = 0: off
  bool causal;
  int64_t window;            // <= 0: none
  // backward
  const T* dy;
  const T* y_in;
  T* dx;
  T* ds;                     // null, or the gradient of the capped + biased scores
};

// The keys [lo, hi) that query row i of Sq sees among Sk (bottom-right aligned: query i sits at
// key position i + Sk - Sq).
ARCHEXT_HD void softmax_key_range(int64_t i, int64_t sq, int64_t sk, bool causal, int64_t window,
                              int64_t& lo, int64_t& hi) {
  const int64_t qpos = i + sk - sq;
  hi = causal ? (qpos + 1 < sk ? qpos + 1 : sk) : sk;
  if (hi < 0) hi = 0;
  lo = window > 0 ? qpos - window + 1 : 0;
  if (lo < 0) lo = 0;
  if (lo > hi) lo = hi;
}

}  // namespace archext
