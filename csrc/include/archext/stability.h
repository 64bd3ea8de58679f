// archext C++ API: the stability family (cross-entropy with z-loss and soft-cap, the attention
// softmax, the pointwise soft-cap, and QK-norm fused with RoPE). Semantics are those of the
// schemas in csrc/registration.cpp; every call goes through the dispatcher (CPU or CUDA by the
// inputs' device).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace archext {

// Per-row (loss, z_loss, lse) of logits [N, V] and target [N]; softcap 0 = off.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(
    const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index = -100,
    double label_smoothing = 0.0, double z_loss_coef = 0.0, double softcap = 0.0);
// grad_logits from the per-row gradients of loss (and, optionally, of z_loss).
at::Tensor cross_entropy_bwd(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_z_loss,
                             const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& lse, int64_t ignore_index = -100,
                             double label_smoothing = 0.0, double z_loss_coef = 0.0,
                             double softcap = 0.0);
// Attention softmax over the last dim of x [..., Sq, Sk]; window -1 = none.
at::Tensor softmax_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias, double scale = 1.0,
                       double softcap = 0.0, bool causal = false, int64_t window = -1);
// (grad_x, grad_scores); x is needed when softcap > 0.
std::tuple<at::Tensor, at::Tensor> softmax_bwd(const at::Tensor& grad_y, const at::Tensor& y,
                                               const std::optional<at::Tensor>& x, double scale,
                                               double softcap, bool want_grad_scores);
at::Tensor softcap_fwd(const at::Tensor& x, double cap);
at::Tensor softcap_bwd(const at::Tensor& grad_y, const at::Tensor& x, double cap);
// (q_out, k_out, q_rstd, k_rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_fwd(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& q_weight,
    const std::optional<at::Tensor>& k_weight, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& positions, double eps, double weight_offset, bool per_head, bool interleaved);
// (grad_q, grad_k, grad_q_weight, grad_k_weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_bwd(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const std::optional<at::Tensor>& q_weight, const std::optional<at::Tensor>& k_weight,
    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
    const at::Tensor& q_rstd, const at::Tensor& k_rstd, double weight_offset, bool per_head,
    bool interleaved);

}  // namespace archext
