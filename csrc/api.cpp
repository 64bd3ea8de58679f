// The C++ API (include/archext/*.h): thin typed calls into the dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>

#include "archext/activation.h"
#include "archext/norm.h"
#include "common/activation_host.h"
#include "common/norm_host.h"

namespace archext {
namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The public API takes std::string_view; the schemas' c10::string_view is std::string_view
// itself in current torch (2.11, 2.14) but a class of its own in older releases (2.4).
c10::string_view sv(std::string_view s) { return c10::string_view(s.data(), s.size()); }

using OptT = c10::optional<at::Tensor>;
using T2 = std::tuple<at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using T4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_out(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
               at::ScalarType dtype, const at::Tensor& x) {
  TORCH_CHECK(t.defined() && t.sizes() == shape && t.scalar_type() == dtype &&
                  t.device() == x.device() && t.is_contiguous(),
              op, ": expected ", name, " to be a contiguous ", dtype, " tensor of shape ", shape,
              " on ", x.device());
}

void fwd_out(const char* op, const NormFwdOut& out, const at::Tensor& x,
             const OptT& residual, const OptT& weight, const OptT& bias, double eps,
             double weight_offset, bool layer_norm) {
  check_norm_fwd(op, x, residual, weight, bias, eps);
  TORCH_CHECK(x.is_contiguous() && (!has(residual) || residual->is_contiguous()), op,
              ": expected contiguous x and residual");
  const auto stats = x.sizes().slice(0, x.dim() - 1);
  check_out(op, "y", out.y, x.sizes(), x.scalar_type(), x);
  // h in the residual's dtype (float32 beside a 16-bit x: a float32 residual stream).
  if (out.h.defined()) check_out(op, "h", out.h, x.sizes(), residual->scalar_type(), x);
  if (out.mean.defined()) check_out(op, "mean", out.mean, stats, acc_dtype(x), x);
  check_out(op, "rstd", out.rstd, stats, acc_dtype(x), x);
  // No output may share memory with an input or with another output (a row's second pass
  // re-reads x after the first pass, and h is read back after it is written).
  const std::pair<const char*, const at::Tensor*> outs[] = {
      {"y", &out.y}, {"h", &out.h}, {"mean", &out.mean}, {"rstd", &out.rstd}};
  const std::pair<const char*, const at::Tensor*> ins[] = {
      {"x", &x}, {"residual", has(residual) ? &*residual : nullptr},
      {"weight", has(weight) ? &*weight : nullptr}, {"bias", has(bias) ? &*bias : nullptr}};
  for (size_t i = 0; i < std::size(outs); ++i) {
    if (!outs[i].second->defined()) continue;
    for (const auto& [name, t] : ins) {
      if (t != nullptr) check_no_overlap(op, outs[i].first, *outs[i].second, name, *t);
    }
    for (size_t j = i + 1; j < std::size(outs); ++j) {
      if (outs[j].second->defined()) {
        check_no_overlap(op, outs[i].first, *outs[i].second, outs[j].first, *outs[j].second);
      }
    }
  }
  if (x.is_cpu()) {
    cpu::norm_fwd(out, x, residual, contiguous(weight), contiguous(bias), eps, weight_offset,
                  layer_norm);
    return;
  }
#ifdef ARCHEXT_WITH_CUDA
  if (x.is_cuda()) {
    cuda::norm_fwd(out, x, residual, contiguous(weight), contiguous(bias), eps, weight_offset,
                   layer_norm);
    return;
  }
#endif
  TORCH_CHECK(false, op, ": no kernel for x on ", x.device(), " in this build");
}

}  // namespace

void rms_norm_fwd_out(at::Tensor& y, at::Tensor& rstd, const at::Tensor& x, const OptT& weight,
                      double eps, double weight_offset) {
  fwd_out("archext::rms_norm_fwd_out", {y, {}, {}, rstd}, x, {}, weight, {}, eps, weight_offset,
          false);
}

void add_rms_norm_fwd_out(at::Tensor& y, at::Tensor& h, at::Tensor& rstd, const at::Tensor& x,
                          const at::Tensor& residual, const OptT& weight, double eps,
                          double weight_offset) {
  TORCH_CHECK(h.defined(), "archext::add_rms_norm_fwd_out: h is undefined");
  fwd_out("archext::add_rms_norm_fwd_out", {y, h, {}, rstd}, x, residual, weight, {}, eps,
          weight_offset, false);
}

void layer_norm_fwd_out(at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, const at::Tensor& x,
                        const OptT& weight, const OptT& bias, double eps) {
  TORCH_CHECK(mean.defined(), "archext::layer_norm_fwd_out: mean is undefined");
  fwd_out("archext::layer_norm_fwd_out", {y, {}, mean, rstd}, x, {}, weight, bias, eps, 0.0, true);
}

T2 rms_norm_fwd(const at::Tensor& x, const OptT& weight, double eps, double weight_offset) {
  static auto h = op<T2(const at::Tensor&, const OptT&, double, double,
                        c10::optional<at::ScalarType>)>("archext::rms_norm_fwd");
  return h.call(x, weight, eps, weight_offset, c10::nullopt);
}

T3 add_rms_norm_fwd(const at::Tensor& x, const at::Tensor& residual, const OptT& weight,
                    double eps, double weight_offset) {
  static auto h = op<T3(const at::Tensor&, const at::Tensor&, const OptT&, double, double)>(
      "archext::add_rms_norm_fwd");
  return h.call(x, residual, weight, eps, weight_offset);
}

T2 rms_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x, const OptT& weight,
                const at::Tensor& rstd, double weight_offset, const OptT& grad_h,
                bool compute_dweight) {
  static auto h = op<T2(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&,
                        double, const OptT&, bool)>("archext::rms_norm_bwd");
  return h.call(grad_y, x, weight, rstd, weight_offset, grad_h, compute_dweight);
}

T3 layer_norm_fwd(const at::Tensor& x, const OptT& weight, const OptT& bias, double eps) {
  static auto h = op<T3(const at::Tensor&, const OptT&, const OptT&, double,
                        c10::optional<at::ScalarType>)>("archext::layer_norm_fwd");
  return h.call(x, weight, bias, eps, c10::nullopt);
}

T4 add_layer_norm_fwd(const at::Tensor& x, const at::Tensor& residual, const OptT& weight,
                      const OptT& bias, double eps) {
  static auto h = op<T4(const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, double)>(
      "archext::add_layer_norm_fwd");
  return h.call(x, residual, weight, bias, eps);
}

T3 layer_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x, const OptT& weight,
                  const at::Tensor& mean, const at::Tensor& rstd, const OptT& grad_h,
                  bool compute_dweight, bool compute_dbias) {
  static auto h = op<T3(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&,
                        const at::Tensor&, const OptT&, bool, bool)>("archext::layer_norm_bwd");
  return h.call(grad_y, x, weight, mean, rstd, grad_h, compute_dweight, compute_dbias);
}

// ---- activation family ----------------------------------------------------------------------
namespace {

// The backend of a tensor's device (the _out calls bypass the dispatcher, as the norm ones do).
std::pair<ActFwdImpl, ActBwdImpl> act_backend(const char* op, const at::Tensor& t) {
  if (t.is_cpu()) return {cpu::act_fwd, cpu::act_bwd};
#ifdef ARCHEXT_WITH_CUDA
  if (t.is_cuda()) return {cuda::act_fwd, cuda::act_bwd};
#endif
  TORCH_CHECK(false, op, ": no kernel for tensors on ", t.device(), " in this build");
}

}  // namespace

at::Tensor glu_fwd(const at::Tensor& gate, const at::Tensor& up, std::string_view activation) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view)>(
      "archext::glu_fwd");
  return h.call(gate, up, sv(activation));
}

T2 glu_bwd(const at::Tensor& grad_y, const at::Tensor& gate, const at::Tensor& up,
           std::string_view activation) {
  static auto h = op<T2(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        c10::string_view)>("archext::glu_bwd");
  return h.call(grad_y, gate, up, sv(activation));
}

at::Tensor glu_packed_fwd(const at::Tensor& x, std::string_view activation, bool gate_first) {
  static auto h = op<at::Tensor(const at::Tensor&, c10::string_view, bool)>(
      "archext::glu_packed_fwd");
  return h.call(x, sv(activation), gate_first);
}

at::Tensor glu_packed_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                          std::string_view activation, bool gate_first) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, bool)>(
      "archext::glu_packed_bwd");
  return h.call(grad_y, x, sv(activation), gate_first);
}

at::Tensor act_fwd(const at::Tensor& x, std::string_view activation) {
  static auto h = op<at::Tensor(const at::Tensor&, c10::string_view)>("archext::act_fwd");
  return h.call(x, sv(activation));
}

at::Tensor act_bwd(const at::Tensor& grad_y, const at::Tensor& x, std::string_view activation) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view)>(
      "archext::act_bwd");
  return h.call(grad_y, x, sv(activation));
}

void glu_fwd_out(at::Tensor& y, const at::Tensor& gate, const at::Tensor& up,
                 std::string_view activation) {
  const char* name = "archext::glu_fwd_out";
  const Activation act = check_glu(name, gate, up, sv(activation));
  check_out(name, "y", y, gate.sizes(), gate.scalar_type(), gate);
  check_no_overlap(name, "y", y, "gate", gate, /*allow_same=*/true);
  check_no_overlap(name, "y", y, "up", up, /*allow_same=*/true);
  glu_fwd_into(act_backend(name, gate).first, act, y, gate, up);
}

void glu_bwd_out(at::Tensor& grad_gate, at::Tensor& grad_up, const at::Tensor& grad_y,
                 const at::Tensor& gate, const at::Tensor& up, std::string_view activation) {
  const char* name = "archext::glu_bwd_out";
  const Activation act = check_glu(name, gate, up, sv(activation));
  check_like(name, "grad_y", grad_y, "gate", gate, /*same_shape=*/true);
  check_out(name, "grad_gate", grad_gate, gate.sizes(), gate.scalar_type(), gate);
  check_out(name, "grad_up", grad_up, gate.sizes(), gate.scalar_type(), gate);
  check_no_overlap(name, "grad_gate", grad_gate, "grad_up", grad_up);
  for (const auto& [out_name, out] : {std::pair<const char*, const at::Tensor*>{"grad_gate", &grad_gate},
                                      {"grad_up", &grad_up}}) {
    check_no_overlap(name, out_name, *out, "grad_y", grad_y, /*allow_same=*/true);
    check_no_overlap(name, out_name, *out, "gate", gate, /*allow_same=*/true);
    check_no_overlap(name, out_name, *out, "up", up, /*allow_same=*/true);
  }
  if (gate.numel() == 0) return;
  const int64_t n = width_of(gate);
  const Operand d = as_rows(grad_y), g = as_rows(gate), u = as_rows(up);
  run_bwd(act_backend(name, gate).second, act, gate.numel() / n, n, d, g, &u,
          grad_gate.data_ptr(), grad_up.data_ptr(), n, gate);
}

void glu_packed_fwd_out(at::Tensor& y, const at::Tensor& x, std::string_view activation,
                        bool gate_first) {
  const char* name = "archext::glu_packed_fwd_out";
  const Activation act = check_glu_packed(name, x, sv(activation));
  check_out(name, "y", y, packed_out_shape(x), x.scalar_type(), x);
  check_no_overlap(name, "y", y, "x", x);  // y is half of x's width: no in-place form
  glu_packed_fwd_into(act_backend(name, x).first, act, y, x, gate_first);
}

void act_fwd_out(at::Tensor& y, const at::Tensor& x, std::string_view activation) {
  const char* name = "archext::act_fwd_out";
  const Activation act = check_act(name, x, sv(activation));
  check_out(name, "y", y, x.sizes(), x.scalar_type(), x);
  check_no_overlap(name, "y", y, "x", x, /*allow_same=*/true);
  act_fwd_into(act_backend(name, x).first, act, y, x);
}

}  // namespace archext
