// Host-side pieces of the stability family shared by the CPU and CUDA launchers: argument
// checks, outputs, the op entry points over a backend, and their registration.
#pragma once

#include <cmath>
#include <tuple>

#include <ATen/ExpandUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/stability_params.h"

namespace archext {

inline c10::ScalarType acc_type(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

inline void check_softcap(const char* op, double cap) {
  TORCH_CHECK(std::isfinite(cap) && cap >= 0, op,
              ": expected softcap >= 0 (0 = off) and finite, got ", cap);
}

// logits [N, V] float, target [N] int64 on the same device.
inline void check_cross_entropy(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                double label_smoothing, double z_loss_coef, double softcap) {
  check_float_input(op, "logits", logits);
  TORCH_CHECK(logits.dim() == 2, op, ": expected logits of shape [tokens, vocab], got ",
              logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1 || logits.size(0) == 0, op,
              ": expected a vocab of at least 1 entry, got logits of shape ", logits.sizes());
  TORCH_CHECK(target.defined() && target.scalar_type() == at::kLong, op,
              ": expected target of dtype Long, got ",
              target.defined() ? c10::toString(target.scalar_type()) : "undefined");
  TORCH_CHECK(target.device() == logits.device(), op, ": expected target on ", logits.device(),
              " (the device of logits), got ", target.device());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op,
              ": expected target of shape [", logits.size(0), "] (one per row of logits), got ",
              target.sizes());
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, op,
              ": expected label_smoothing in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(z_loss_coef) && z_loss_coef >= 0, op,
              ": expected z_loss_coef >= 0, got ", z_loss_coef);
  check_softcap(op, softcap);
}

inline void check_row_grad(const char* op, const char* name, const at::Tensor& g,
                           const at::Tensor& logits) {
  const auto acc = acc_type(logits.scalar_type());
  TORCH_CHECK(g.scalar_type() == acc && g.device() == logits.device() && g.dim() == 1 &&
                  g.size(0) == logits.size(0),
              op, ": expected ", name, " of dtype ", acc, " and shape [", logits.size(0), "] on ",
              logits.device(), ", got ", g.scalar_type(), " of shape ", g.sizes(), " on ",
              g.device());
}

// Scores x [..., Sq, Sk] of rank 2 to 4; bias (optional) broadcastable to x.
inline void check_softmax(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                          double scale, double softcap, int64_t window) {
  check_float_input(op, "x", x);
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 4, op,
              ": expected scores x of rank 2 to 4 ([batch, heads, q_len, k_len] or fewer), got ",
              x.sizes());
  TORCH_CHECK(std::isfinite(scale), op, ": expected a finite scale, got ", scale);
  check_softcap(op, softcap);
  TORCH_CHECK(window == -1 || window >= 1, op, ": expected window >= 1 (or -1 for none), got ",
              window);
  if (has(bias)) {
    check_like(op, "bias", *bias, "x", x, /*same_shape=*/false);
    TORCH_CHECK(at::is_expandable_to(bias->sizes(), x.sizes()), op, ": expected bias broadcastable to ",
                x.sizes(), " (the shape of x), got ", bias->sizes());
  }
}

// x viewed as [B, H, Sq, Sk].
inline at::Tensor as_4d(const at::Tensor& x) {
  at::Tensor t = x;
  while (t.dim() < 4) t = t.unsqueeze(0);
  return t;
}

// Backend B provides, over checked inputs (logits with unit stride on vocab; x, y, dy and the
// outputs contiguous; bias expanded to [B, H, Sq, Sk]):
//   ce_fwd(logits, target, ignore_index, eps, coef, cap, loss, z_loss, lse)
//   ce_bwd(grad_loss, grad_z_loss (maybe undefined), logits, target, lse, ignore_index, eps, coef,
//          cap, grad_logits)
//   softmax_fwd(x4, bias4 (maybe undefined), scale, cap, causal, window, y4)
//   softmax_bwd(dy, y, x (undefined without a cap), scale, cap, dx, ds (maybe undefined))
//   softcap_fwd(x, cap, y) and softcap_bwd(dy, x, cap, dx), elementwise on contiguous tensors.
template <class B>
struct StabilityOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(
      const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
      double label_smoothing, double z_loss_coef, double softcap) {
    const char* op = "archext::cross_entropy_fwd";
    check_cross_entropy(op, logits, target, label_smoothing, z_loss_coef, softcap);
    const at::Tensor l = logits.stride(1) == 1 ? logits : logits.contiguous();
    const auto opts = logits.options().dtype(acc_type(logits.scalar_type()));
    at::Tensor loss = at::empty({logits.size(0)}, opts), z = at::empty_like(loss),
               lse = at::empty_like(loss);
    if (logits.size(0) > 0) {
      B::ce_fwd(l, target.contiguous(), ignore_index, label_smoothing, z_loss_coef, softcap, loss, z,
                lse);
    }
    return {loss, z, lse};
  }

  static at::Tensor cross_entropy_bwd(const at::Tensor& grad_loss,
                                      const c10::optional<at::Tensor>& grad_z_loss,
                                      const at::Tensor& logits, const at::Tensor& target,
                                      const at::Tensor& lse, int64_t ignore_index,
                                      double label_smoothing, double z_loss_coef, double softcap) {
    const char* op = "archext::cross_entropy_bwd";
    check_cross_entropy(op, logits, target, label_smoothing, z_loss_coef, softcap);
    check_row_grad(op, "grad_loss", grad_loss, logits);
    check_row_grad(op, "lse", lse, logits);
    if (has(grad_z_loss)) check_row_grad(op, "grad_z_loss", *grad_z_loss, logits);
    const at::Tensor l = logits.stride(1) == 1 ? logits : logits.contiguous();
    at::Tensor grad = at::empty(logits.sizes(), logits.options());
    if (logits.numel() > 0) {
      B::ce_bwd(grad_loss.contiguous(), has(grad_z_loss) ? grad_z_loss->contiguous() : at::Tensor(),
                l, target.contiguous(), lse.contiguous(), ignore_index, label_smoothing,
                z_loss_coef, softcap, grad);
    }
    return grad;
  }

  static at::Tensor softmax_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                                double scale, double softcap, bool causal, int64_t window) {
    const char* op = "archext::softmax_fwd";
    check_softmax(op, x, bias, scale, softcap, window);
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty_like(xc);
    if (x.numel() > 0) {
      const at::Tensor b4 = has(bias) ? as_4d(bias->expand(x.sizes())) : at::Tensor();
      B::softmax_fwd(as_4d(xc), b4, scale, softcap, causal, window, as_4d(y));
    }
    return y;
  }

  static std::tuple<at::Tensor, at::Tensor> softmax_bwd(const at::Tensor& grad_y,
                                                        const at::Tensor& y,
                                                        const c10::optional<at::Tensor>& x,
                                                        double scale, double softcap,
                                                        bool want_grad_scores) {
    const char* op = "archext::softmax_bwd";
    check_softmax(op, y, c10::nullopt, scale, softcap, -1);
    check_like(op, "grad_y", grad_y, "y", y, /*same_shape=*/true);
    TORCH_CHECK(softcap == 0 || has(x), op, ": x (the scores) is needed with a softcap");
    if (has(x)) check_like(op, "x", *x, "y", y, /*same_shape=*/true);
    const at::Tensor yc = y.contiguous();
    at::Tensor dx = at::empty_like(yc);
    at::Tensor ds = want_grad_scores ? at::empty_like(yc) : yc.new_empty({0});
    if (y.numel() > 0) {
      B::softmax_bwd(grad_y.contiguous(), yc, softcap != 0 ? x->contiguous() : at::Tensor(), scale,
                     softcap, dx, want_grad_scores ? ds : at::Tensor());
    }
    return {dx, ds};
  }

  static at::Tensor softcap_fwd(const at::Tensor& x, double cap) {
    const char* op = "archext::softcap_fwd";
    check_float_input(op, "x", x);
    TORCH_CHECK(std::isfinite(cap) && cap > 0, op, ": expected cap > 0 and finite, got ", cap);
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty_like(xc);
    if (x.numel() > 0) B::softcap_fwd(xc, cap, y);
    return y;
  }

  static at::Tensor softcap_bwd(const at::Tensor& grad_y, const at::Tensor& x, double cap) {
    const char* op = "archext::softcap_bwd";
    check_float_input(op, "x", x);
    check_like(op, "grad_y", grad_y, "x", x, /*same_shape=*/true);
    TORCH_CHECK(std::isfinite(cap) && cap > 0, op, ": expected cap > 0 and finite, got ", cap);
    const at::Tensor xc = x.contiguous();
    at::Tensor dx = at::empty_like(xc);
    if (x.numel() > 0) B::softcap_bwd(grad_y.contiguous(), xc, cap, dx);
    return dx;
  }
};

// The kernel parameters common to both backends (T the element type; acc_t float, or double
// for float64 on the CPU), from checked tensors.
template <typename T, typename acc_t>
CrossEntropyParams<T, acc_t> ce_params(const at::Tensor& logits, const at::Tensor& target,
                                       int64_t ignore_index, double eps, double coef, double cap) {
  CrossEntropyParams<T, acc_t> p{};
  p.logits = reinterpret_cast<const T*>(logits.data_ptr());
  p.stride = logits.stride(0);
  p.target = target.data_ptr<int64_t>();
  p.rows = logits.size(0);
  p.vocab = logits.size(1);
  p.ignore_index = ignore_index;
  p.eps = static_cast<acc_t>(eps);
  p.coef = static_cast<acc_t>(coef);
  p.cap = static_cast<acc_t>(cap);
  p.inv_cap = cap != 0 ? static_cast<acc_t>(1.0 / cap) : acc_t(0);
  return p;
}

// x, y: [B, H, Sq, Sk] contiguous; bias undefined or expanded to that shape.
template <typename T, typename acc_t>
SoftmaxParams<T, acc_t> softmax_fwd_params(const at::Tensor& x, const at::Tensor& bias,
                                           double scale, double cap, bool causal, int64_t window,
                                           const at::Tensor& y) {
  SoftmaxParams<T, acc_t> p{};
  p.x = reinterpret_cast<const T*>(x.data_ptr());
  p.y = reinterpret_cast<T*>(y.data_ptr());
  if (bias.defined()) {
    p.bias = reinterpret_cast<const T*>(bias.data_ptr());
    for (int d = 0; d < 4; ++d) p.bias_stride[d] = bias.stride(d);
  }
  p.heads = x.size(1);
  p.sq = x.size(2);
  p.sk = x.size(3);
  p.rows = x.size(0) * x.size(1) * x.size(2);
  p.scale = static_cast<acc_t>(scale);
  p.cap = static_cast<acc_t>(cap);
  p.inv_cap = cap != 0 ? static_cast<acc_t>(1.0 / cap) : acc_t(0);
  p.causal = causal;
  p.window = window;
  return p;
}

// dy, y, dx (and x, ds when defined): contiguous, of one shape.
template <typename T, typename acc_t>
SoftmaxParams<T, acc_t> softmax_bwd_params(const at::Tensor& dy, const at::Tensor& y,
                                           const at::Tensor& x, double scale, double cap,
                                           const at::Tensor& dx, const at::Tensor& ds) {
  SoftmaxParams<T, acc_t> p{};
  p.dy = reinterpret_cast<const T*>(dy.data_ptr());
  p.y_in = reinterpret_cast<const T*>(y.data_ptr());
  p.x = x.defined() ? reinterpret_cast<const T*>(x.data_ptr()) : nullptr;
  p.dx = reinterpret_cast<T*>(dx.data_ptr());
  p.ds = ds.defined() ? reinterpret_cast<T*>(ds.data_ptr()) : nullptr;
  p.sk = y.size(-1);
  p.rows = y.numel() / p.sk;
  p.scale = static_cast<acc_t>(scale);
  p.cap = static_cast<acc_t>(cap);
  p.inv_cap = cap != 0 ? static_cast<acc_t>(1.0 / cap) : acc_t(0);
  return p;
}

template <class B>
void register_stability_ops(torch::Library& m) {
  using Ops = StabilityOps<B>;
  m.impl("cross_entropy_fwd", &Ops::cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &Ops::cross_entropy_bwd);
  m.impl("softmax_fwd", &Ops::softmax_fwd);
  m.impl("softmax_bwd", &Ops::softmax_bwd);
  m.impl("softcap_fwd", &Ops::softcap_fwd);
  m.impl("softcap_bwd", &Ops::softcap_bwd);
}

}  // namespace archext
