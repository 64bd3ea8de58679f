// Kernel parameters of the fused QK-norm + RoPE, shared by the CPU and CUDA kernels.
//
// Math, for q and k alike (x one token's heads [H, D], contiguous; w' = w + weight_offset):
//   per group g (one head's D dims, or all H * D of the token when !per_head):
//     rstd = rsqrt(mean_g(x^2) + eps);  n = x * rstd * w'       (w indexed by d, or by h * D + d)
//   y = R(pos) n per head, R the RoPE rotation of common/rope_math.h (dims >= R pass through).
// Backward: dn = R(pos)^T dy; dx = rstd * (dn w' - x rstd^2 mean_g(dn w' x));
//   dw = sum over tokens (and heads when shared) of dn * x * rstd.
#pragma once

#include <cstdint>

namespace archext {

template <typename T, typename acc_t>
struct QkNormRopeParams {
  const T* x[2];        // q, k: [tokens, H_i, D] contiguous
  T* y[2];              // forward outputs
  const T* w[2];        // weights [D] (per head) or [H_i * D], or null
  const T* dy[2];       // backward: incoming gradients, [tokens, H_i, D] contiguous
  T* dx[2];             // backward outputs
  acc_t* rstd[2];       // [tokens, H_i] (per head) or [tokens]
  acc_t* dw[2];         // backward: per-chunk weight-gradient partials [chunks, wlen_i], or null
  int64_t heads[2];
  int64_t tokens, seq, head_dim;
  const float* cos;     // [P, R/2]
  const float* sin;
  int64_t half;         // R/2
  int64_t table;        // P: every position must be in [0, P)
  const int64_t* pos;   // [S] (pos_bstride 0) or [B, S]
  int64_t pos_bstride;
  acc_t eps, weight_offset;
  bool per_head, interleaved;
  int64_t chunk_tokens; // tokens per weight-gradient partial
};

}  // namespace archext
