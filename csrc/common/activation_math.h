// Per-element math of the activation family, shared by the CPU and CUDA kernels so that the CPU
// tests check the formulas the GPU runs. Each formula is written once, over a math provider M:
//   M::V   the value type: float or double (scalar), or a SIMD vector of float lanes (CPU)
//   M::S   its scalar type (float or double), for the constants
//   M::exp, M::erf                 the elementary functions on V
//   M::select_le0(x, a, b)         x <= 0 ? a : b, lane by lane (a NaN x gives b)
//   M::select_lt0(x, a, b)         x < 0 ? a : b, likewise
// The CPU kernels pass their own vectorised exp/erf (cpu/vec.h; a faster erf for float16 and
// bfloat16 results, see VecMathFast in cpu/activation_kernels.inl) and std:: for float64; the
// CUDA kernels pass the CUDA math library's expf/erff. All arithmetic is in the accumulation type
// (float for float32/float16/bfloat16, double for float64).
//
// The formulas are PyTorch's, so that the results match F.gelu / F.silu / F.relu
// (aten/src/ATen/native/cpu/Activation.cpp and cuda/ActivationGeluKernel.cu, SiLU, threshold):
//   gelu (approximate='none'):
//     y  = x * 0.5 * (1 + erf(x * M_SQRT1_2))
//     y' = cdf + x * pdf,  cdf = 0.5 * (1 + erf(x * M_SQRT1_2)),
//                          pdf = exp(-0.5 * x^2) * M_2_SQRTPI * M_SQRT1_2 * 0.5
//   gelu (approximate='tanh'), kBeta = sqrt(2 / pi), kKappa = 0.044715:
//     inner = kBeta * (x + kKappa * x^3)
//     y  = 0.5 * x * (1 + tanh(inner))
//     y' = 0.5 * (1 + tanh(inner)) + 0.5 * x * (1 - tanh(inner)^2) * kBeta * (1 + 3 kKappa x^2)
//     evaluated through the identity 0.5 * (1 + tanh(u)) = s = 1 / (1 + exp(-2u)), so that
//     1 - tanh(u)^2 = 4 s (1 - s):   y = x * s,   y' = s + 2 x s (1 - s) kBeta (1 + 3 kKappa x^2),
//     with the constants of -2u = x (-2 kBeta - 2 kBeta kKappa x^2) folded.
//     The same function, one exp and one division as SiLU, and without PyTorch's cancellation in
//     1 + tanh(u) for x << 0 (the result is accurate relative to itself there).
//   silu:
//     y  = x / (1 + exp(-x)),  y' = s * (1 + x * (1 - s)),  s = 1 / (1 + exp(-x))
//   relu:
//     y  = x < 0 ? 0 : x   (NaN and -0 pass, as clamp_min(x, 0)),
//     dx = x <= 0 ? 0 : dy (threshold_backward: a select, not dy * 0)
// The gated forms (GLU variants, Shazeer 2020, "GLU Variants Improve Transformer"):
//   y = act(gate) * up,   d_gate = dy * up * act'(gate),   d_up = dy * act(gate).
//
// These are templates over M only: the CPU kernels include this header inside their per-ISA
// target region (cpu/isa_begin.h) and instantiate it with ISA-specific providers, so no inline
// function here is ever emitted twice under one name with two instruction sets. Keep it so (no
// non-template functions; <cmath>, macros.h and activation_params.h, which declares no function,
// are already included before that region, through cpu/kernel_api.h).
#pragma once

#include <cmath>

#include "common/activation_params.h"
#include "common/macros.h"

namespace archext {

namespace act_const {
constexpr double kSqrt1_2 = 0.70710678118654752440;  // M_SQRT1_2
constexpr double kGeluPdf = 0.39894228040143267794;  // M_2_SQRTPI * M_SQRT1_2 * 0.5 = 1/sqrt(2 pi)
constexpr double kBeta = 0.79788456080286535588;     // M_SQRT2 * M_2_SQRTPI * 0.5 = sqrt(2/pi)
constexpr double kKappa = 0.044715;
}  // namespace act_const

// y = act(x).
template <Activation A, typename M>
ARCHEXT_HD typename M::V act_forward(typename M::V x) {
  using V = typename M::V;
  using S = typename M::S;
  if constexpr (A == Activation::kRelu) {
    return M::select_lt0(x, V{}, x);
  } else if constexpr (A == Activation::kGelu) {
    return x * S(0.5) * (S(1) + M::erf(x * S(act_const::kSqrt1_2)));
  } else if constexpr (A == Activation::kGeluTanh) {
    // -2 * inner = x * (-2 kBeta - 2 kBeta kKappa x^2), the constants folded.
    const V minus_2_inner = x * (S(-2 * act_const::kBeta) +
                                 S(-2 * act_const::kBeta * act_const::kKappa) * (x * x));
    return x / (S(1) + M::exp(minus_2_inner));
  } else {
    return x / (S(1) + M::exp(-x));
  }
}

// Returns g * act'(x) (g: the gradient arriving on act(x)) and sets y = act(x), from one
// evaluation of the elementary functions. Callers that only need the gradient ignore y (the
// dead computation is removed once inlined).
template <Activation A, typename M>
ARCHEXT_HD typename M::V act_backward(typename M::V x, typename M::V g, typename M::V& y) {
  using V = typename M::V;
  using S = typename M::S;
  if constexpr (A == Activation::kRelu) {
    y = M::select_lt0(x, V{}, x);
    return M::select_le0(x, V{}, g);
  } else if constexpr (A == Activation::kGelu) {
    const V cdf = S(0.5) * (S(1) + M::erf(x * S(act_const::kSqrt1_2)));
    const V pdf = M::exp(x * x * S(-0.5)) * S(act_const::kGeluPdf);
    y = x * cdf;
    return g * (cdf + x * pdf);
  } else if constexpr (A == Activation::kGeluTanh) {
    const V x_sq = x * x;
    const V minus_2_inner =
        x * (S(-2 * act_const::kBeta) + S(-2 * act_const::kBeta * act_const::kKappa) * x_sq);
    const V s = S(1) / (S(1) + M::exp(minus_2_inner));  // 0.5 * (1 + tanh(inner))
    y = x * s;
    // 2 * inner' = 2 kBeta (1 + 3 kKappa x^2)
    const V two_inner_derivative =
        S(2 * act_const::kBeta) + S(6 * act_const::kBeta * act_const::kKappa) * x_sq;
    return g * (s + x * (s * (S(1) - s)) * two_inner_derivative);
  } else {
    const V s = S(1) / (S(1) + M::exp(-x));
    y = x * s;
    return g * (s * (S(1) + x * (S(1) - s)));
  }
}

}  // namespace archext
