// Host-side pieces of the fused QK-norm + RoPE (checks, outputs, entry points, registration),
// shared by the CPU and CUDA launchers.
#pragma once

#include <cmath>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/qk_norm_rope_params.h"
#include "common/rope_host.h"

namespace archext {

inline void check_qk_norm_rope(const char* op, const at::Tensor& q, const at::Tensor& k,
                               const c10::optional<at::Tensor>& wq,
                               const c10::optional<at::Tensor>& wk, const at::Tensor& cos,
                               const at::Tensor& sin, const at::Tensor& pos, bool per_head) {
  check_rope(op, "q", q, "k", k, cos, sin, pos);
  const at::Tensor* xs[2] = {&q, &k};
  const c10::optional<at::Tensor>* ws[2] = {&wq, &wk};
  const char* wn[2] = {"q_weight", "k_weight"};
  for (int i = 0; i < 2; ++i) {
    if (!has(*ws[i])) continue;
    const at::Tensor& w = **ws[i];
    check_like(op, wn[i], w, "q", q, /*same_shape=*/false);
    const int64_t n = per_head ? q.size(3) : xs[i]->size(2) * q.size(3);
    TORCH_CHECK(w.dim() == 1 && w.size(0) == n, op, ": expected ", wn[i], " of shape [", n, "] (",
                per_head ? "head_dim" : "heads * head_dim", "), got ", w.sizes());
  }
}

// The saved per-group rstd of x (q or k): [B, S, H] per head, [B, S] per token, float32
// (float64 for float64 x), on x's device. Read by the backward as is: a wrong shape would be
// read out of bounds.
inline void check_qk_rstd(const char* op, const char* name, const at::Tensor& r,
                          const char* xn, const at::Tensor& x, bool per_head) {
  TORCH_CHECK(r.defined(), op, ": ", name, " is undefined");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto want = per_head ? x.sizes().slice(0, 3) : x.sizes().slice(0, 2);
  TORCH_CHECK(r.device() == x.device(), op, ": expected ", name, " on ", x.device(),
              " (the device of ", xn, "), got ", r.device());
  TORCH_CHECK(r.scalar_type() == acc, op, ": expected ", name, " of dtype ", acc, ", got ",
              r.scalar_type());
  TORCH_CHECK(r.sizes() == want, op, ": expected ", name, " of shape ", want, " (",
              per_head ? "batch, seq, heads" : "batch, seq", " of ", xn, "), got ", r.sizes());
}

// Backend B provides fwd(p-inputs...) and bwd(...) over contiguous tensors; see
// common/qk_norm_rope_params.h for the math.
template <class B>
struct QkNormRopeOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
      const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& wq,
      const c10::optional<at::Tensor>& wk, const at::Tensor& cos, const at::Tensor& sin,
      const at::Tensor& pos, double eps, double weight_offset, bool per_head, bool interleaved) {
    const char* op = "archext::qk_norm_rope_fwd";
    check_qk_norm_rope(op, q, k, wq, wk, cos, sin, pos, per_head);
    TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": expected eps >= 0 and finite, got ", eps);
    const at::Tensor qc = q.contiguous(), kc = k.contiguous();
    const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const auto stat = [&](const at::Tensor& x) {
      return per_head ? at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(acc))
                      : at::empty({x.size(0), x.size(1)}, x.options().dtype(acc));
    };
    at::Tensor qo = at::empty_like(qc), ko = at::empty_like(kc), rq = stat(qc), rk = stat(kc);
    if (q.size(0) * q.size(1) > 0) {
      B::fwd(qc, kc, has(wq) ? wq->contiguous() : at::Tensor(), has(wk) ? wk->contiguous() : at::Tensor(),
             cos.contiguous(), sin.contiguous(), pos.contiguous(), eps, weight_offset, per_head,
             interleaved, qo, ko, rq, rk);
    }
    return {qo, ko, rq, rk};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
      const at::Tensor& gq, const at::Tensor& gk, const at::Tensor& q, const at::Tensor& k,
      const c10::optional<at::Tensor>& wq, const c10::optional<at::Tensor>& wk,
      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos, const at::Tensor& rq,
      const at::Tensor& rk, double weight_offset, bool per_head, bool interleaved) {
    const char* op = "archext::qk_norm_rope_bwd";
    check_qk_norm_rope(op, q, k, wq, wk, cos, sin, pos, per_head);
    check_like(op, "grad_q", gq, "q", q, /*same_shape=*/true);
    check_like(op, "grad_k", gk, "k", k, /*same_shape=*/true);
    check_qk_rstd(op, "q_rstd", rq, "q", q, per_head);
    check_qk_rstd(op, "k_rstd", rk, "k", k, per_head);
    const at::Tensor qc = q.contiguous(), kc = k.contiguous();
    at::Tensor dq = at::empty_like(qc), dk = at::empty_like(kc);
    at::Tensor dwq = has(wq) ? at::empty_like(*wq) : q.new_empty({0});
    at::Tensor dwk = has(wk) ? at::empty_like(*wk) : k.new_empty({0});
    if (has(wq)) dwq.zero_();
    if (has(wk)) dwk.zero_();
    if (q.size(0) * q.size(1) > 0) {
      B::bwd(gq.contiguous(), gk.contiguous(), qc, kc, has(wq) ? wq->contiguous() : at::Tensor(),
             has(wk) ? wk->contiguous() : at::Tensor(), cos.contiguous(), sin.contiguous(),
             pos.contiguous(), rq.contiguous(), rk.contiguous(), weight_offset, per_head,
             interleaved, dq, dk, dwq, dwk);
    }
    return {dq, dk, dwq, dwk};
  }
};

template <class B>
void register_qk_norm_rope_ops(torch::Library& m) {
  m.impl("qk_norm_rope_fwd", &QkNormRopeOps<B>::fwd);
  m.impl("qk_norm_rope_bwd", &QkNormRopeOps<B>::bwd);
}

// Fills the parameters common to both backends (T the element type; acc_t float or double).
template <typename T, typename acc_t>
QkNormRopeParams<T, acc_t> qk_norm_rope_params(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& wq, const at::Tensor& wk,
                                               const at::Tensor& cos, const at::Tensor& sin,
                                               const at::Tensor& pos, double eps,
                                               double weight_offset, bool per_head,
                                               bool interleaved) {
  QkNormRopeParams<T, acc_t> p{};
  const at::Tensor* xs[2] = {&q, &k};
  const at::Tensor* ws[2] = {&wq, &wk};
  for (int i = 0; i < 2; ++i) {
    p.x[i] = reinterpret_cast<const T*>(xs[i]->data_ptr());
    p.w[i] = ws[i]->defined() ? reinterpret_cast<const T*>(ws[i]->data_ptr()) : nullptr;
    p.heads[i] = xs[i]->size(2);
  }
  p.tokens = q.size(0) * q.size(1);
  p.seq = q.size(1);
  p.head_dim = q.size(3);
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.half = cos.size(1);
  p.table = cos.size(0);
  p.pos = pos.data_ptr<int64_t>();
  p.pos_bstride = pos.dim() == 2 ? pos.size(1) : 0;
  p.eps = static_cast<acc_t>(eps);
  p.weight_offset = static_cast<acc_t>(weight_offset);
  p.per_head = per_head;
  p.interleaved = interleaved;
  return p;
}

}  // namespace archext
