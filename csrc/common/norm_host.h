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

inline void check_norm_fwd(const char* op, const at::Tensor& x, const OptTensor& residual,
                           const OptTensor& weight, const OptTensor& bias, double eps) {
  check_float_input(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": expected x with at least 1 dimension, got a scalar");
  TORCH_CHECK(x.size(-1) > 0, op, ": expected a non-empty last dimension of x (the normalised one), got shape ", x.sizes());
  if (has(residual)) check_like(op, "residual", *residual, "x", x, /*same_shape=*/true);
  check_param(op, "weight", weight, x);
  check_param(op, "bias", bias, x);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": expected eps >= 0 and finite, got ", eps);
}

inline void check_norm_bwd(const char* op, const at::Tensor& dy, const at::Tensor& x,
                           const OptTensor& weight, const OptTensor& mean, const at::Tensor& rstd,
                           const OptTensor& dh) {
  check_float_input(op, "x", x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": expected x with a non-empty last dimension, got shape ", x.sizes());
  check_like(op, "grad_y", dy, "x", x, /*same_shape=*/true);
  check_param(op, "weight", weight, x);
  if (has(mean)) check_stats(op, "mean", *mean, x);
  check_stats(op, "rstd", rstd, x);
  if (has(dh)) check_like(op, "grad_h", *dh, "x", x, /*same_shape=*/true);
}

// Everything a backend's forward produces. `h`, `mean` are undefined when not requested.
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

// Allocates the forward outputs (the backend fills them).
inline NormFwdOut alloc_norm_fwd(const at::Tensor& x, bool with_h, bool layer_norm) {
  NormFwdOut out;
  out.y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (with_h) out.h = at::empty_like(x, at::MemoryFormat::Contiguous);
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
  static std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x,
                                                         const OptTensor& weight, double eps,
                                                         double weight_offset) {
    check_norm_fwd("archext::rms_norm_fwd", x, {}, weight, {}, eps);
    const auto xc = x.contiguous();
    const auto o = alloc_norm_fwd(xc, false, false);
    Fwd(o, xc, {}, contiguous(weight), {}, eps, weight_offset, false);
    return {o.y, o.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(
      const at::Tensor& x, const at::Tensor& residual, const OptTensor& weight, double eps,
      double weight_offset) {
    check_norm_fwd("archext::add_rms_norm_fwd", x, residual, weight, {}, eps);
    const auto xc = x.contiguous();
    const auto o = alloc_norm_fwd(xc, true, false);
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
      const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps) {
    check_norm_fwd("archext::layer_norm_fwd", x, {}, weight, bias, eps);
    const auto xc = x.contiguous();
    const auto o = alloc_norm_fwd(xc, false, true);
    Fwd(o, xc, {}, contiguous(weight), contiguous(bias), eps, 0.0, true);
    return {o.y, o.mean, o.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
      const at::Tensor& x, const at::Tensor& residual, const OptTensor& weight,
      const OptTensor& bias, double eps) {
    check_norm_fwd("archext::add_layer_norm_fwd", x, residual, weight, bias, eps);
    const auto xc = x.contiguous();
    const auto o = alloc_norm_fwd(xc, true, true);
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
