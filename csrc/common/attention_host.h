// Host-side pieces of the tiled attention shared by the CPU and CUDA launchers: argument checks
// (every one names the argument), the outputs, and the kernel parameters from checked tensors.
// The math is in common/attention_math.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "common/attention_math.h"
#include "common/checks.h"

namespace archext {

// The largest head_dim the kernels take (their per-row tile buffers are sized by it).
constexpr int64_t kFlashAttnMaxHeadDim = 256;

// The dtype of lse, rel_bias and grad_bias: float32, or float64 for float64 inputs.
inline c10::ScalarType attn_acc_type(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

struct AttnShape {
  int64_t batch, sq, sk, hq, hk, d;
  int64_t group;     // hq / hk
  int64_t bias_len;  // Sq + Sk - 1 (0 when both are 0)
};

inline AttnShape attn_shape(const at::Tensor& q, const at::Tensor& k) {
  AttnShape s{};
  s.batch = q.size(0);
  s.sq = q.size(1);
  s.hq = q.size(2);
  s.d = q.size(3);
  s.sk = k.size(1);
  s.hk = k.size(2);
  s.group = s.hk > 0 ? s.hq / s.hk : 0;
  s.bias_len = std::max<int64_t>(s.sq + s.sk - 1, 0);
  return s;
}

// Unit stride on D (size-1 dims have any stride).
inline bool attn_unit_d(const at::Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1; }

// q [B, Sq, Hq, D], k and v [B, Sk, Hk, D] of one float dtype and device, unit stride on D;
// rel_bias [Hq, Sq + Sk - 1] float32 (float64 for float64 q) contiguous; segment_ids [B, Sk]
// int32; scalars finite, softcap >= 0.
inline AttnShape check_flash_attn(const char* op, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const c10::optional<at::Tensor>& rel_bias,
                                  const c10::optional<at::Tensor>& segment_ids, double scale,
                                  double softcap) {
  check_float_input(op, "q", q);
  check_like(op, "k", k, "q", q, /*same_shape=*/false);
  check_like(op, "v", v, "q", q, /*same_shape=*/false);
  TORCH_CHECK(q.dim() == 4, op, ": expected q of shape [batch, q_len, q_heads, head_dim], got ",
              q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": expected k of shape [batch, k_len, kv_heads, head_dim], got ",
              k.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), op, ": expected k with batch ", q.size(0),
              " (the batch of q), got k of shape ", k.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), op, ": expected k with head_dim ", q.size(3),
              " (the head_dim of q), got k of shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": expected v of shape ", k.sizes(),
              " (the shape of k), got ", v.sizes());
  const AttnShape s = attn_shape(q, k);
  TORCH_CHECK(s.hk >= 1 && s.hq % s.hk == 0, op, ": expected the q heads (", s.hq,
              ") to be a multiple of the k/v heads (", s.hk, ")");
  TORCH_CHECK(s.d >= 1 && s.d <= kFlashAttnMaxHeadDim, op, ": expected head_dim between 1 and ",
              kFlashAttnMaxHeadDim, ", got ", s.d);
  TORCH_CHECK(attn_unit_d(q), op, ": expected q with unit stride on head_dim, got strides ",
              q.strides());
  TORCH_CHECK(attn_unit_d(k), op, ": expected k with unit stride on head_dim, got strides ",
              k.strides());
  TORCH_CHECK(attn_unit_d(v), op, ": expected v with unit stride on head_dim, got strides ",
              v.strides());
  TORCH_CHECK(std::isfinite(scale), op, ": expected a finite scale, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op,
              ": expected softcap >= 0 (0 = off) and finite, got ", softcap);
  if (has(rel_bias)) {
    const at::Tensor& rb = *rel_bias;
    const auto acc = attn_acc_type(q.scalar_type());
    TORCH_CHECK(rb.device() == q.device(), op, ": expected rel_bias on ", q.device(),
                " (the device of q), got ", rb.device());
    TORCH_CHECK(rb.scalar_type() == acc, op, ": expected rel_bias of dtype ", acc, " (for q of ",
                q.scalar_type(), "), got ", rb.scalar_type());
    TORCH_CHECK(rb.dim() == 2 && rb.size(0) == s.hq && rb.size(1) == s.bias_len, op,
                ": expected rel_bias of shape [", s.hq, ", ", s.bias_len,
                "] ([q_heads, q_len + k_len - 1]), got ", rb.sizes());
    TORCH_CHECK(rb.is_contiguous(), op, ": expected a contiguous rel_bias, got strides ",
                rb.strides());
  }
  if (has(segment_ids)) {
    const at::Tensor& seg = *segment_ids;
    TORCH_CHECK(seg.scalar_type() == at::kInt, op, ": expected segment_ids of dtype Int (int32), got ",
                seg.scalar_type());
    TORCH_CHECK(seg.device() == q.device(), op, ": expected segment_ids on ", q.device(),
                " (the device of q), got ", seg.device());
    TORCH_CHECK(seg.dim() == 2 && seg.size(0) == s.batch && seg.size(1) == s.sk, op,
                ": expected segment_ids of shape [", s.batch, ", ", s.sk,
                "] ([batch, k_len]), got ", seg.sizes());
    // A query's segment is that of its key position p = i + Sk - Sq, which must exist.
    TORCH_CHECK(s.sq <= s.sk, op, ": segment_ids need q_len <= k_len (each query takes the "
                "segment of its key position), got q_len ", s.sq, " and k_len ", s.sk);
  }
  return s;
}

// A tensor of the backward of shape [B, Sq, Hq, D] like q (grad_o, o), and lse [B, Hq, Sq].
inline void check_flash_attn_bwd(const char* op, const at::Tensor& grad_o, const at::Tensor& o,
                                 const at::Tensor& lse, const at::Tensor& q, const AttnShape& s) {
  check_like(op, "grad_o", grad_o, "q", q, /*same_shape=*/true);
  check_like(op, "o", o, "q", q, /*same_shape=*/true);
  TORCH_CHECK(lse.defined(), op, ": lse is undefined");
  const auto acc = attn_acc_type(q.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), op, ": expected lse on ", q.device(),
              " (the device of q), got ", lse.device());
  TORCH_CHECK(lse.scalar_type() == acc, op, ": expected lse of dtype ", acc, ", got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.batch && lse.size(1) == s.hq &&
                  lse.size(2) == s.sq,
              op, ": expected lse of shape [", s.batch, ", ", s.hq, ", ", s.sq,
              "] ([batch, q_heads, q_len]), got ", lse.sizes());
}

// A tensor with unit stride on D: itself, or a contiguous copy (grad_o arrives expanded).
inline at::Tensor attn_unit_d_or_copy(const at::Tensor& t) {
  return attn_unit_d(t) ? t : t.contiguous();
}

// Forward outputs: o [B, Sq, Hq, D] contiguous in q's dtype, lse [B, Hq, Sq] float32 (float64).
inline std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_outputs(const at::Tensor& q,
                                                                 const AttnShape& s) {
  at::Tensor o = at::empty({s.batch, s.sq, s.hq, s.d}, q.options());
  at::Tensor lse = at::empty({s.batch, s.hq, s.sq}, q.options().dtype(attn_acc_type(q.scalar_type())));
  return {o, lse};
}

// Backward outputs: grad_q like q, grad_k / grad_v like k (contiguous), grad_bias [Hq, L] in
// rel_bias's dtype when wanted, else an empty [0] of that dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_outputs(
    const at::Tensor& q, const AttnShape& s, bool want_grad_bias) {
  const auto acc = q.options().dtype(attn_acc_type(q.scalar_type()));
  return {at::empty({s.batch, s.sq, s.hq, s.d}, q.options()),
          at::empty({s.batch, s.sk, s.hk, s.d}, q.options()),
          at::empty({s.batch, s.sk, s.hk, s.d}, q.options()),
          want_grad_bias ? at::empty({s.hq, s.bias_len}, acc) : at::empty({0}, acc)};
}

// Kernel parameters of the forward (T the element type, acc_t float or double) from checked
// tensors; rel_bias / segment_ids undefined when absent (segment_ids contiguous).
template <typename T, typename acc_t>
FlashAttnParams<T, acc_t> flash_attn_params(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& rel_bias,
                                            const at::Tensor& segment_ids, const AttnShape& s,
                                            double scale, double softcap, bool causal,
                                            int64_t window) {
  FlashAttnParams<T, acc_t> p{};
  p.q = reinterpret_cast<const T*>(q.data_ptr());
  p.k = reinterpret_cast<const T*>(k.data_ptr());
  p.v = reinterpret_cast<const T*>(v.data_ptr());
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.rel_bias = rel_bias.defined() ? reinterpret_cast<const acc_t*>(rel_bias.data_ptr()) : nullptr;
  p.segment_ids = segment_ids.defined() ? segment_ids.data_ptr<int32_t>() : nullptr;
  p.batch = s.batch;
  p.sq = s.sq;
  p.sk = s.sk;
  p.hq = s.hq;
  p.hk = s.hk;
  p.d = s.d;
  p.group = s.group;
  p.bias_len = s.bias_len;
  p.scale = static_cast<acc_t>(scale);
  p.cap = static_cast<acc_t>(softcap);
  p.inv_cap = softcap != 0 ? static_cast<acc_t>(1.0 / softcap) : acc_t(0);
  p.causal = causal;
  // A window of Sq + Sk or more hides nothing (p - j < Sk always): none, so that no range
  // arithmetic near INT64_MAX can overflow.
  p.window = (window < 1 || window >= s.sq + s.sk) ? 0 : window;
  return p;
}

// Adds the backward's tensors (grad_o and o with unit stride on D, lse contiguous, outputs
// contiguous; grad_bias undefined when not wanted) to forward parameters.
template <typename T, typename acc_t>
void flash_attn_bwd_params(FlashAttnParams<T, acc_t>& p, const at::Tensor& grad_o,
                           const at::Tensor& o, const at::Tensor& lse, const at::Tensor& grad_q,
                           const at::Tensor& grad_k, const at::Tensor& grad_v,
                           const at::Tensor& grad_bias) {
  p.grad_o = reinterpret_cast<const T*>(grad_o.data_ptr());
  p.o_in = reinterpret_cast<const T*>(o.data_ptr());
  for (int i = 0; i < 3; ++i) {
    p.grad_o_stride[i] = grad_o.stride(i);
    p.o_stride[i] = o.stride(i);
  }
  p.lse_in = reinterpret_cast<const acc_t*>(lse.data_ptr());
  p.grad_q = reinterpret_cast<T*>(grad_q.data_ptr());
  p.grad_k = reinterpret_cast<T*>(grad_k.data_ptr());
  p.grad_v = reinterpret_cast<T*>(grad_v.data_ptr());
  p.grad_bias = grad_bias.defined() ? reinterpret_cast<acc_t*>(grad_bias.data_ptr()) : nullptr;
}

// Backend B provides, over checked inputs with B, Sq, Sk, Hq >= 1 (q, k, v, grad_o, o with unit
// stride on D; lse, rel_bias, segment_ids contiguous; rel_bias / segment_ids / grad_bias
// undefined when absent; outputs as flash_attn_*_outputs allocated them):
//   fwd(q, k, v, rel_bias, segment_ids, shape, scale, softcap, causal, window, o, lse)
//   bwd(grad_o, q, k, v, o, lse, rel_bias, segment_ids, shape, scale, softcap, causal, window,
//       grad_q, grad_k, grad_v, grad_bias)
// The entry points here check, allocate, and answer empty inputs themselves (no key: o = 0,
// lse = -inf, zero gradients).
template <class B>
struct FlashAttnOps {
  static std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v,
                                                const c10::optional<at::Tensor>& rel_bias,
                                                const c10::optional<at::Tensor>& segment_ids,
                                                double scale, double softcap, bool causal,
                                                int64_t window) {
    const char* op = "archext::flash_attn_fwd";
    const AttnShape s = check_flash_attn(op, q, k, v, rel_bias, segment_ids, scale, softcap);
    auto [o, lse] = flash_attn_fwd_outputs(q, s);
    if (s.batch == 0 || s.sq == 0 || s.hq == 0) return {o, lse};
    if (s.sk == 0) {
      o.zero_();
      lse.fill_(-INFINITY);
      return {o, lse};
    }
    B::fwd(q, k, v, has(rel_bias) ? *rel_bias : at::Tensor(),
           has(segment_ids) ? segment_ids->contiguous() : at::Tensor(), s, scale, softcap, causal,
           window, o, lse);
    return {o, lse};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
      const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& o, const at::Tensor& lse, const c10::optional<at::Tensor>& rel_bias,
      const c10::optional<at::Tensor>& segment_ids, double scale, double softcap, bool causal,
      int64_t window, bool want_grad_bias) {
    const char* op = "archext::flash_attn_bwd";
    const AttnShape s = check_flash_attn(op, q, k, v, rel_bias, segment_ids, scale, softcap);
    check_flash_attn_bwd(op, grad_o, o, lse, q, s);
    const bool want_bias = want_grad_bias && has(rel_bias);
    auto [dq, dk, dv, dbias] = flash_attn_bwd_outputs(q, s, want_bias);
    if (s.batch == 0 || s.sq == 0 || s.sk == 0 || s.hq == 0) {
      dq.zero_();
      dk.zero_();
      dv.zero_();
      dbias.zero_();
      return {dq, dk, dv, dbias};
    }
    B::bwd(attn_unit_d_or_copy(grad_o), q, k, v, attn_unit_d_or_copy(o), lse.contiguous(),
           has(rel_bias) ? *rel_bias : at::Tensor(),
           has(segment_ids) ? segment_ids->contiguous() : at::Tensor(), s, scale, softcap, causal,
           window, dq, dk, dv, want_bias ? dbias : at::Tensor());
    return {dq, dk, dv, dbias};
  }
};

template <class B>
void register_attention_ops(torch::Library& m) {
  m.impl("flash_attn_fwd", &FlashAttnOps<B>::fwd);
  m.impl("flash_attn_bwd", &FlashAttnOps<B>::bwd);
}

}  // namespace archext
