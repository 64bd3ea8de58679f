// Per-element math of the stability family, shared by the CPU and CUDA kernels (and checked on
// the CPU against float64 references). Every formula is in float32 (float64 for float64 input).
#pragma once

#include "common/macros.h"

namespace archext {

// Gemma 2's soft-cap, z = cap * tanh(x / cap), written with the reciprocal inv_cap = 1 / cap
// (one multiply, as every kernel evaluates it); dz/dx = 1 - tanh^2 = 1 - (z * inv_cap)^2.
template <typename acc_t, typename Tanh>
ARCHEXT_HD acc_t softcap_value(acc_t x, acc_t cap, acc_t inv_cap, Tanh tanh_fn) {
  return cap * tanh_fn(x * inv_cap);
}

template <typename acc_t>
ARCHEXT_HD acc_t softcap_slope(acc_t t) {  // t = tanh(x / cap)
  return acc_t(1) - t * t;
}

// Cross-entropy per row (z the soft-capped logits, lse = log sum exp z, eps = label smoothing):
//   loss = (1 - eps) (lse - z_t) + eps (lse - mean z) + coef lse^2      (PyTorch's smoothing,
//   PaLM's z-loss); d loss / d z_j = p_j (1 + 2 coef lse) - (1 - eps) [j = t] - eps / V.
// With g the incoming gradient of the loss and gz that of the logged z-loss, the row's
// gradient is  p_j * a - g ((1 - eps) [j = t] + eps / V),  a = g + 2 coef lse (g + gz).
template <typename acc_t>
ARCHEXT_HD acc_t ce_row_loss(acc_t lse, acc_t z_target, acc_t z_sum, acc_t vocab, acc_t eps,
                             acc_t coef) {
  // A row whose lse is not finite (a +inf or NaN logit without a cap; every logit -inf): its
  // log-softmax is NaN (inf - inf), so F.cross_entropy gives NaN, whatever the smoothing and
  // z-loss (coef lse^2 alone would turn the +inf case into +inf). lse - lse is that NaN.
  const acc_t nonfinite = lse - lse;  // 0 for a finite lse, NaN otherwise
  if (nonfinite != nonfinite) return nonfinite;
  acc_t loss = (acc_t(1) - eps) * (lse - z_target) + coef * lse * lse;
  if (eps != acc_t(0)) loss += eps * (lse - z_sum / vocab);
  return loss;
}

}  // namespace archext
