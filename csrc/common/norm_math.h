// Per-element and per-row math of the norm family, shared by the CPU and CUDA kernels so that
// the CPU tests check the formulas the GPU runs. All arithmetic is in the accumulation type
// `acc_t` (float for float32/float16/bfloat16, double for float64).
//
// RMSNorm (Zhang & Sennrich 2019):   y = x * r * (w + o),        r = 1 / sqrt(mean(x^2) + eps)
// LayerNorm (Ba et al. 2016):        y = (x - mu) * r * w + b,   r = 1 / sqrt(var(x) + eps)
//   `o` is the weight offset: 0 for Llama-style weights, 1 for Gemma's stored `w` meaning (1 + w).
//   var is the biased (population) variance, as torch.nn.functional.layer_norm uses.
//
// Backward, with g = dy * (w + o) and xhat = (x - mu) * r (mu = 0 for RMSNorm), n the width:
//   RMSNorm:   dx = r * (g - xhat * mean(g * xhat))
//   LayerNorm: dx = r * (g - mean(g) - xhat * mean(g * xhat))
//   dw = sum_rows(dy * xhat), db = sum_rows(dy)
#pragma once

#include <cmath>

#include "common/macros.h"

namespace archext {

template <typename acc_t>
ARCHEXT_HD acc_t norm_rstd(acc_t sum_sq, acc_t n, acc_t eps) {
  // sum_sq is sum(x^2) (RMSNorm) or sum((x - mu)^2) (LayerNorm); both divide by n.
#if defined(__CUDA_ARCH__)
  return rsqrt(sum_sq / n + eps);
#else
  return acc_t(1) / std::sqrt(sum_sq / n + eps);
#endif
}

// Output of one element: (x - mu) * r * (w + o) + b. Callers pass w = 1, o = 0, b = 0 when
// the norm has no affine parameters.
template <typename acc_t>
ARCHEXT_HD acc_t norm_apply(acc_t x, acc_t mu, acc_t r, acc_t w_eff, acc_t b) {
  return (x - mu) * r * w_eff + b;
}

// Input gradient of one element given the two row reductions
//   mean_g = mean(g)          (0 for RMSNorm)
//   mean_gx = mean(g * xhat)
template <typename acc_t>
ARCHEXT_HD acc_t norm_grad_input(acc_t g, acc_t xhat, acc_t r, acc_t mean_g, acc_t mean_gx) {
  return r * (g - mean_g - xhat * mean_gx);
}

}  // namespace archext
