// archext C++ API: rotary position embedding. Semantics are those of the schemas in
// csrc/registration.cpp: q [B, S, Hq, D] and k [B, S, Hk, D] (any strides), cos/sin a float32
// [P, R/2] cache, positions int64 [S] or [B, S].
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace archext {

// The float32 cos/sin cache of `rope_fwd`: angle = p * theta^(-2i / rotary_dim), computed in
// float64, for p < max_positions and i < rotary_dim / 2. Returns (cos, sin) on the CPU.
std::tuple<at::Tensor, at::Tensor> rope_cache(int64_t rotary_dim, int64_t max_positions,
                                              double theta = 10000.0);
// Returns (q_out, k_out).
std::tuple<at::Tensor, at::Tensor> rope_fwd(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& cos, const at::Tensor& sin,
                                            const at::Tensor& positions, bool interleaved);
// The inverse rotation: (grad_q, grad_k) -> gradients of q and k.
std::tuple<at::Tensor, at::Tensor> rope_bwd(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                            const at::Tensor& cos, const at::Tensor& sin,
                                            const at::Tensor& positions, bool interleaved);
// In place.
void rope_fwd_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
               const at::Tensor& positions, bool interleaved);

}  // namespace archext
