// archext C++ API: the norm family. Plain C++ functions over at::Tensor for callers with no
// Python in the loop; each goes through the PyTorch dispatcher, so it runs the CPU or CUDA kernel
// by the inputs' device. Semantics are those of the schemas in csrc/registration.cpp.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace archext {

// Returns (y, rstd).
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x,
                                                const c10::optional<at::Tensor>& weight,
                                                double eps = 1e-6, double weight_offset = 0.0);
// Returns (y, h, rstd) with h = x + residual.
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const c10::optional<at::Tensor>& weight,
    double eps = 1e-6, double weight_offset = 0.0);
// Returns (grad_x, grad_weight); grad_weight is empty unless compute_dweight.
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                const c10::optional<at::Tensor>& weight,
                                                const at::Tensor& rstd, double weight_offset,
                                                const c10::optional<at::Tensor>& grad_h,
                                                bool compute_dweight);
// Returns (y, mean, rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps = 1e-5);
// Returns (y, h, mean, rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps = 1e-5);
// Returns (grad_x, grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const c10::optional<at::Tensor>& grad_h,
    bool compute_dweight, bool compute_dbias);

// Into the caller's preallocated contiguous outputs (no allocation on the call): for C++ callers
// that manage their own buffers, and the C++ benchmark. x (and residual) must be contiguous;
// outputs have the shapes and dtypes of the allocating versions above.
void rms_norm_fwd_out(at::Tensor& y, at::Tensor& rstd, const at::Tensor& x,
                      const c10::optional<at::Tensor>& weight, double eps = 1e-6,
                      double weight_offset = 0.0);
void add_rms_norm_fwd_out(at::Tensor& y, at::Tensor& h, at::Tensor& rstd, const at::Tensor& x,
                          const at::Tensor& residual, const c10::optional<at::Tensor>& weight,
                          double eps = 1e-6, double weight_offset = 0.0);
void layer_norm_fwd_out(at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, const at::Tensor& x,
                        const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, double eps = 1e-5);

}  // namespace archext
