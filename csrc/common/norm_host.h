// Host-side pieces of the norm family shared by the CPU and CUDA launchers: argument checks,
// output allocation, and the op entry points (one per schema in registration.cpp), written
// once over a backend's two implementation functions.
#pragma once

#include <cmath>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common/checks.h"

namespace archext {

using OptTensor = c10::optional<at::Tensor>;

inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-row statistics: shape x.shape[:-1], float32 (float64 for float64 x).
inline at::Tensor empty_stats(const at::Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_dtype(x)));
}

inline bool is_low_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Mixed precision (a float32 residual stream beside bfloat16/float16 activations):
//   add forwards: x bfloat16/float16 and residual float32 -> h float32, y in x's dtype;
//   plain forwards: x float32 and out_dtype bfloat16/float16 -> y in out_dtype;
//   backwards: x (h) float32 and grad_y bfloat16/float16 -> grad_x float32, grad_h float32.
// Weight and bias are then in y's dtype or float32; their gradients come in x's dtype (float32,
// summed in float32 and never rounded to 16 bits; the autograd casts them to the parameters').
// Otherwise every tensor has x's dtype.
inline void check_norm_param(const char* op, const char* name, const OptTensor& p,
                             const at::Tensor& x, at::ScalarType y_dtype, bool mixed) {
  if (!has(p)) return;
  TORCH_CHECK(p->device() == x.device(), op, ": expected ", name, " on ", x.device(),
              " (the device of x), got ", p->device());
  if (mixed) {
    TORCH_CHECK(p->scalar_type() == y_dtype || p->scalar_type() == at::kFloat, op, ": expected ",
                name, " of dtype ", y_dtype, " (the dtype of y) or Float, got ", p->scalar_type());
  } else {
    TORCH_CHECK(p->scalar_type() == x.scalar_type(), op, ": expected ", name, " of dtype ",
                x.scalar_type(), " (the dtype of x), got ", p->scalar_type());
  }
  const int64_t n = x.size(-1);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, op, ": expected ", name, " of shape [", n,
              "] (the last dimension of x), got ", p->sizes());
}

// Checks a forward's arguments; returns the dtype of y.
inline at::ScalarType check_norm_fwd(const char* op, const at::Tensor& x,
                                     const OptTensor& residual, const OptTensor& weight,
                                     const OptTensor& bias, double eps,
                                     c10::optional<at::ScalarType> out_dtype = c10::nullopt) {
  check_float_input(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": expected x with at least 1 dimension, got a scalar");
  TORCH_CHECK(x.size(-1) > 0, op, ": expected a non-empty last dimension of x (the normalised one), got shape ", x.sizes());
  bool mixed = false;
  if (has(residual)) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.device() == x.device(), op, ": expected residual on ", x.device(),
                " (the device of x), got ", r.device());
    mixed = r.scalar_type() == at::kFloat && is_low_float(x.scalar_type());
    TORCH_CHECK(r.scalar_type() == x.scalar_type() || mixed, op, ": expected residual of dtype ",
                x.scalar_type(), " (the dtype of x; or Float beside a BFloat16/Half x: a float32 "
                "residual stream), got ", r.scalar_type());
    TORCH_CHECK(r.sizes() == x.sizes(), op, ": expected residual of shape ", x.sizes(),
                " (the shape of x), got ", r.sizes());
  }
  at::ScalarType y_dtype = x.scalar_type();
  if (out_dtype.has_value() && *out_dtype != x.scalar_type()) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && is_low_float(*out_dtype), op,
                ": expected out_dtype None, the dtype of x (", x.scalar_type(), "), or BFloat16 / "
                "Half for a Float x (a float32 residual stream normalised into a lower activation "
                "dtype), got ", *out_dtype);
    mixed = true;
    y_dtype = *out_dtype;
  }
  check_norm_param(op, "weight", weight, x, y_dtype, mixed);
  check_norm_param(op, "bias", bias, x, y_dtype, mixed);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": expected eps >= 0 and finite, got ", eps);
  return y_dtype;
}

inline void check_norm_bwd(const char* op, const at::Tensor& dy, const at::Tensor& x,
                           const OptTensor& weight, const OptTensor& mean, const at::Tensor& rstd,
                           const OptTensor& dh) {
  check_float_input(op, "x", x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": expected x with a non-empty last dimension, got shape ", x.sizes());
  TORCH_CHECK(dy.defined(), op, ": grad_y is undefined");
  TORCH_CHECK(dy.device() == x.device(), op, ": expected grad_y on ", x.device(),
              " (the device of x), got ", dy.device());
  const bool mixed = x.scalar_type() == at::kFloat && is_low_float(dy.scalar_type());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() || mixed, op, ": expected grad_y of dtype ",
              x.scalar_type(), " (the dtype of x; or BFloat16 / Half for a Float x: the gradient "
              "of a lower-precision y), got ", dy.scalar_type());
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": expected grad_y of shape ", x.sizes(),
              " (the shape of x), got ", dy.sizes());
  check_norm_param(op, "weight", weight, x, dy.scalar_type(), mixed);
  if (has(mean)) check_stats(op, "mean", *mean, x);
  check_stats(op, "rstd", rstd, x);
  if (has(dh)) check_like(op, "grad_h", *dh, "x", x, /*same_shape=*/true);
}

// Everything a backend's forward produces. `h`, `mean` are undefined when not requested. The
// backends read the mixed-precision case off the dtypes: residual float32 beside a 16-bit x, or
// (no residual) y of another dtype than x.
struct NormFwdOut {
  at::Tensor y, h, mean, rstd;
};
struct NormBwdOut {
  at::Tensor dx, dweight, dbias;
};

// A backend provides these two functions; inputs are already checked and contiguous, and the
// outputs allocated (contiguous) by the caller: the ops allocate them, the C++ `_out` API takes
// the caller's buffers. Undefined outputs are not written.
using NormFwdImpl = void (*)(const NormFwdOut& out, const at::Tensor& x, const OptTensor& residual,
                                   const OptTensor& weight, const OptTensor& bias, double eps,
                                   double weight_offset, bool layer_norm);
using NormBwdImpl = void (*)(const NormBwdOut& out, const at::Tensor& dy, const at::Tensor& x,
                                   const OptTensor& weight, const OptTensor& mean,
                                   const at::Tensor& rstd, const OptTensor& dh,
                                   double weight_offset);

inline OptTensor contiguous(const OptTensor& t) {
  return has(t) ? OptTensor(t->contiguous()) : OptTensor();
}

// Allocates the forward outputs (the backend fills them): y of y_dtype, h of the residual's
// dtype (`residual` null: no h).
inline NormFwdOut alloc_norm_fwd(const at::Tensor& x, at::ScalarType y_dtype,
                                 const at::Tensor* residual, bool layer_norm) {
  NormFwdOut out;
  out.y = at::empty_like(x, x.options().dtype(y_dtype), at::MemoryFormat::Contiguous);
  if (residual != nullptr) {
    out.h = at::empty_like(x, x.options().dtype(residual->scalar_type()),
                           at::MemoryFormat::Contiguous);
  }
  if (layer_norm) out.mean = empty_stats(x);
  out.rstd = empty_stats(x);
  return out;
}

// Gradients not requested come back as empty [0] tensors (a schema return cannot be None).
inline at::Tensor empty_grad(const at::Tensor& x) { return at::empty({0}, x.options()); }

inline NormBwdOut alloc_norm_bwd(const at::Tensor& x, bool compute_dweight, bool compute_dbias) {
  NormBwdOut out;
  out.dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (compute_dweight) out.dweight = at::empty({x.size(-1)}, x.options());
  if (compute_dbias) out.dbias = at::empty({x.size(-1)}, x.options());
  return out;
}

// The backends' implementations (cpu/norm_cpu.cpp, cuda/norm_cuda.cu).
namespace cpu {
void norm_fwd(const NormFwdOut& out, const at::Tensor& x, const OptTensor& residual,
              const OptTensor& weight, const OptTensor& bias, double eps, double weight_offset,
              bool layer_norm);
void norm_bwd(const NormBwdOut& out, const at::Tensor& dy, const at::Tensor& x,
              const OptTensor& weight, const OptTensor& mean, const at::Tensor& rstd,
              const OptTensor& dh, double weight_offset);
}  // namespace cpu
namespace cuda {
void norm_fwd(const NormFwdOut& out, const at::Tensor& x, const OptTensor& residual,
              const OptTensor& weight, const OptTensor& bias, double eps, double weight_offset,
              bool layer_norm);
void norm_bwd(const NormBwdOut& out, const at::Tensor& dy, const at::Tensor& x,
              const OptTensor& weight, const OptTensor& mean, const at::Tensor& rstd,
              const OptTensor& dh, double weight_offset);
}  // namespace cuda

// The op entry points, one per schema, over a backend's implementation.
template <NormFwdImpl Fwd, NormBwdImpl Bwd>
struct NormOps {
  static std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(
      const at::Tensor& x, const OptTensor& weight, double eps, double weight_offset,
      c10::optional<at::ScalarType> out_dtype) {
    const auto y_dtype = check_norm_fwd("archext::rms_norm_fwd", x, {}, weight, {}, eps, out_dtype);
    const auto xc = x.contiguous();
    const auto o = alloc_norm_fwd(xc, y_dtype, nullptr, false);
    Fwd(o, xc, {}, contiguous(weight), {}, eps, weight_offset, false);
    return {o.y, o.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(
      const at::Tensor& x, const at::Tensor& residual, const OptTensor& weight, double eps,
      double weight_offset) {
    const auto y_dtype = check_norm_fwd("archext::add_rms_norm_fwd", x, residual, weight, {}, eps);
    const auto xc = x.contiguous();
    const auto o = alloc_norm_fwd(xc, y_dtype, &residual, false);
    Fwd(o, xc, residual.contiguous(), contiguous(weight), {}, eps, weight_offset, false);
    return {o.y, o.h, o.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_y,
                                                         const at::Tensor& x,
                                                         const OptTensor& weight,
                                                         const at::Tensor& rstd,
                                                         double weight_offset,
                                                         const OptTensor& grad_h,
                                                         bool compute_dweight) {
    check_norm_bwd("archext::rms_norm_bwd", grad_y, x, weight, {}, rstd, grad_h);
    const auto xc = x.contiguous();
    const auto o = alloc_norm_bwd(xc, compute_dweight && has(weight), false);
    Bwd(o, grad_y.contiguous(), xc, contiguous(weight), {}, rstd.contiguous(), contiguous(grad_h),
        weight_offset);
    return {o.dx, o.dweight.defined() ? o.dweight : empty_grad(x)};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
      const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps,
      c10::optional<at::ScalarType> out_dtype) {
    const auto y_dtype = check_norm_fwd("archext::layer_norm_fwd", x, {}, weight, bias, eps, out_dtype);
    const auto xc = x.contiguous();
    const auto o = alloc_norm_fwd(xc, y_dtype, nullptr, true);
    Fwd(o, xc, {}, contiguous(weight), contiguous(bias), eps, 0.0, true);
    return {o.y, o.mean, o.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
      const at::Tensor& x, const at::Tensor& residual, const OptTensor& weight,
      const OptTensor& bias, double eps) {
    const auto y_dtype = check_norm_fwd("archext::add_layer_norm_fwd", x, residual, weight, bias, eps);
    const auto xc = x.contiguous();
    const auto o = alloc_norm_fwd(xc, y_dtype, &residual, true);
    Fwd(o, xc, residual.contiguous(), contiguous(weight), contiguous(bias), eps, 0.0, true);
    return {o.y, o.h, o.mean, o.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
      const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& weight,
      const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& grad_h,
      bool compute_dweight, bool compute_dbias) {
    check_norm_bwd("archext::layer_norm_bwd", grad_y, x, weight, mean, rstd, grad_h);
    const auto xc = x.contiguous();
    const auto o = alloc_norm_bwd(xc, compute_dweight && has(weight), compute_dbias);
    Bwd(o, grad_y.contiguous(), xc, contiguous(weight), mean.contiguous(), rstd.contiguous(),
        contiguous(grad_h), 0.0);
    return {o.dx, o.dweight.defined() ? o.dweight : empty_grad(x),
            o.dbias.defined() ? o.dbias : empty_grad(x)};
  }
};

// Registers one backend's implementation of every norm schema (in its TORCH_LIBRARY_IMPL).
template <NormFwdImpl Fwd, NormBwdImpl Bwd>
void register_norm_ops(torch::Library& m) {
  using Ops = NormOps<Fwd, Bwd>;
  m.impl("rms_norm_fwd", &Ops::rms_norm_fwd);
  m.impl("add_rms_norm_fwd", &Ops::add_rms_norm_fwd);
  m.impl("rms_norm_bwd", &Ops::rms_norm_bwd);
  m.impl("layer_norm_fwd", &Ops::layer_norm_fwd);
  m.impl("add_layer_norm_fwd", &Ops::add_layer_norm_fwd);
  m.impl("layer_norm_bwd", &Ops::layer_norm_bwd);
}

}  // namespace archext
