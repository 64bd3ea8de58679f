// Host-side pieces of RoPE shared by the CPU and CUDA launchers: argument checks, outputs, the
// op entry points over a backend's implementation, and their registration.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/rope_params.h"

namespace archext {

// q and k: [B, S, Hq|Hk, D] of one float dtype and device, any strides; cos/sin: float32
// [P, R/2] with R <= D; positions: int64 [S] or [B, S], every value in [0, P).
inline void check_rope(const char* op, const char* qn, const at::Tensor& q, const char* kn,
                       const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& pos) {
  check_float_input(op, qn, q);
  check_like(op, kn, k, qn, q, /*same_shape=*/false);
  TORCH_CHECK(q.dim() == 4, op, ": expected ", qn, " of shape [batch, seq, heads, head_dim], got ",
              q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(3),
              op, ": expected ", kn, " of shape [", q.size(0), ", ", q.size(1), ", heads, ",
              q.size(3), "] (batch, seq and head_dim of ", qn, "), got ", k.sizes());
  TORCH_CHECK(cos.defined() && cos.scalar_type() == at::kFloat && cos.dim() == 2, op,
              ": expected cos to be a float32 [positions, rotary_dim / 2] table, got ",
              cos.scalar_type(), " of shape ", cos.sizes());
  TORCH_CHECK(sin.defined() && sin.sizes() == cos.sizes() && sin.scalar_type() == at::kFloat, op,
              ": expected sin of dtype Float and shape ", cos.sizes(), " (that of cos), got ",
              sin.scalar_type(), " of shape ", sin.sizes());
  TORCH_CHECK(cos.device() == q.device() && sin.device() == q.device(), op,
              ": expected cos and sin on ", q.device(), " (the device of ", qn, "), got ",
              cos.device(), " and ", sin.device());
  TORCH_CHECK(cos.size(1) >= 1 && 2 * cos.size(1) <= q.size(3), op,
              ": expected rotary_dim = 2 * cos.size(1) between 2 and head_dim = ", q.size(3),
              ", got ", 2 * cos.size(1));
  TORCH_CHECK(pos.defined() && pos.scalar_type() == at::kLong, op,
              ": expected positions of dtype Long, got ", pos.scalar_type());
  TORCH_CHECK(pos.device() == q.device(), op, ": expected positions on ", q.device(), ", got ",
              pos.device());
  TORCH_CHECK((pos.dim() == 1 && pos.size(0) == q.size(1)) ||
                  (pos.dim() == 2 && pos.size(0) == q.size(0) && pos.size(1) == q.size(1)),
              op, ": expected positions of shape [", q.size(1), "] or [", q.size(0), ", ",
              q.size(1), "], got ", pos.sizes());
}

// Every position must index the cos/sin cache: an out-of-range one would read past it. For the
// CPU launchers, which read positions on the host (the CUDA kernels assert on the device).
inline void check_positions_in_cache(const char* op, const at::Tensor& pos, int64_t table) {
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < pos.numel(); ++i) {
    TORCH_CHECK(pp[i] >= 0 && pp[i] < table, op, ": position ", pp[i], " at index ", i,
                " is outside the cos/sin cache of ", table, " positions");
  }
}

// The output of x: x's own strides when x is dense (so a [B, H, S, D] view stays one), else
// contiguous. The head_dim stride is 1 either way.
inline at::Tensor rope_like(const at::Tensor& x) {
  return x.stride(3) == 1 ? at::empty_like(x) : at::empty_like(x, at::MemoryFormat::Contiguous);
}

// A backend's implementation: rotates q -> q_out and k -> k_out (which may be q and k).
// Inputs are checked; q, k, q_out, k_out have unit stride on head_dim; cos, sin, pos contiguous.
using RopeImpl = void (*)(const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& pos, bool interleaved, float sign);

inline at::Tensor unit_last(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

template <RopeImpl Impl>
struct RopeOps {
  static std::tuple<at::Tensor, at::Tensor> apply(const char* op, const char* qn, const char* kn,
                                                  const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& cos, const at::Tensor& sin,
                                                  const at::Tensor& pos, bool interleaved,
                                                  float sign) {
    check_rope(op, qn, q, kn, k, cos, sin, pos);
    const auto qi = unit_last(q), ki = unit_last(k);
    auto qo = rope_like(qi), ko = rope_like(ki);
    Impl(qo, ko, qi, ki, cos.contiguous(), sin.contiguous(), pos.contiguous(), interleaved, sign);
    return {qo, ko};
  }
  static std::tuple<at::Tensor, at::Tensor> rope_fwd(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& cos, const at::Tensor& sin,
                                                     const at::Tensor& pos, bool interleaved) {
    return apply("archext::rope_fwd", "q", "k", q, k, cos, sin, pos, interleaved, 1.f);
  }
  static std::tuple<at::Tensor, at::Tensor> rope_bwd(const at::Tensor& gq, const at::Tensor& gk,
                                                     const at::Tensor& cos, const at::Tensor& sin,
                                                     const at::Tensor& pos, bool interleaved) {
    return apply("archext::rope_bwd", "grad_q", "grad_k", gq, gk, cos, sin, pos, interleaved, -1.f);
  }
  static void rope_fwd_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& pos, bool interleaved) {
    const char* op = "archext::rope_fwd_";
    check_rope(op, "q", q, "k", k, cos, sin, pos);
    TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1, op,
                ": in place needs q and k with unit stride on head_dim, got strides ",
                q.strides(), " and ", k.strides());
    TORCH_CHECK(!q.is_same(k) && !(q.data_ptr() == k.data_ptr() && q.numel() > 0), op,
                ": q and k must not be the same memory");
    check_no_internal_overlap(op, "q", q);
    check_no_internal_overlap(op, "k", k);
    check_no_overlap(op, "q", q, "k", k);
    check_no_overlap(op, "q", q, "cos", cos);
    check_no_overlap(op, "q", q, "sin", sin);
    check_no_overlap(op, "k", k, "cos", cos);
    check_no_overlap(op, "k", k, "sin", sin);
    Impl(q, k, q, k, cos.contiguous(), sin.contiguous(), pos.contiguous(), interleaved, 1.f);
  }
};

template <RopeImpl Impl>
void register_rope_ops(torch::Library& m) {
  using Ops = RopeOps<Impl>;
  m.impl("rope_fwd", &Ops::rope_fwd);
  m.impl("rope_bwd", &Ops::rope_bwd);
  m.impl("rope_fwd_", &Ops::rope_fwd_);
}

// Fills the parameters common to both backends (T is the element type of q and k).
template <typename T>
RopeParams<T> rope_params(const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& pos, bool interleaved, float sign) {
  RopeParams<T> p{};
  const at::Tensor* ins[2] = {&q, &k};
  const at::Tensor* outs[2] = {&q_out, &k_out};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& x = *ins[i];
    const at::Tensor& y = *outs[i];
    p.t[i] = RopeTensor<T>{reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<T*>(y.data_ptr()),
                           x.stride(0), x.stride(1), x.stride(2),
                           y.stride(0), y.stride(1), y.stride(2), x.size(2)};
  }
  p.batch = q.size(0);
  p.seq = q.size(1);
  p.head_dim = q.size(3);
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.half = cos.size(1);
  p.pos = pos.data_ptr<int64_t>();
  p.pos_bstride = pos.dim() == 2 ? pos.size(1) : 0;
  p.interleaved = interleaved;
  p.sign = sign;
  return p;
}

namespace cpu {
void rope(const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& q,
          const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
          bool interleaved, float sign);
}
namespace cuda {
void rope(const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& q,
          const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
          bool interleaved, float sign);
}

}  // namespace archext
