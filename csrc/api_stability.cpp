// The C++ API of the stability family (include/archext/stability.h): typed dispatcher calls.
#include <ATen/core/dispatch/Dispatcher.h>

#include "archext/stability.h"

namespace archext {
namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using OptT = std::optional<at::Tensor>;
using T = at::Tensor;

}  // namespace

std::tuple<T, T, T> cross_entropy_fwd(const T& logits, const T& target, int64_t ignore_index,
                                      double label_smoothing, double z_loss_coef, double softcap) {
  static auto h = op<std::tuple<T, T, T>(const T&, const T&, int64_t, double, double, double)>(
      "archext::cross_entropy_fwd");
  return h.call(logits, target, ignore_index, label_smoothing, z_loss_coef, softcap);
}

T cross_entropy_bwd(const T& grad_loss, const OptT& grad_z_loss, const T& logits, const T& target,
                    const T& lse, int64_t ignore_index, double label_smoothing, double z_loss_coef,
                    double softcap) {
  static auto h = op<T(const T&, const OptT&, const T&, const T&, const T&, int64_t, double,
                       double, double)>("archext::cross_entropy_bwd");
  return h.call(grad_loss, grad_z_loss, logits, target, lse, ignore_index, label_smoothing,
                z_loss_coef, softcap);
}

T softmax_fwd(const T& x, const OptT& bias, double scale, double softcap, bool causal,
              int64_t window) {
  static auto h = op<T(const T&, const OptT&, double, double, bool, int64_t)>("archext::softmax_fwd");
  return h.call(x, bias, scale, softcap, causal, window);
}

std::tuple<T, T> softmax_bwd(const T& grad_y, const T& y, const OptT& x, double scale,
                             double softcap, bool want_grad_scores) {
  static auto h = op<std::tuple<T, T>(const T&, const T&, const OptT&, double, double, bool)>(
      "archext::softmax_bwd");
  return h.call(grad_y, y, x, scale, softcap, want_grad_scores);
}

T softcap_fwd(const T& x, double cap) {
  static auto h = op<T(const T&, double)>("archext::softcap_fwd");
  return h.call(x, cap);
}

T softcap_bwd(const T& grad_y, const T& x, double cap) {
  static auto h = op<T(const T&, const T&, double)>("archext::softcap_bwd");
  return h.call(grad_y, x, cap);
}

std::tuple<T, T, T, T> qk_norm_rope_fwd(const T& q, const T& k, const OptT& q_weight,
                                        const OptT& k_weight, const T& cos, const T& sin,
                                        const T& positions, double eps, double weight_offset,
                                        bool per_head, bool interleaved) {
  static auto h = op<std::tuple<T, T, T, T>(const T&, const T&, const OptT&, const OptT&, const T&,
                                            const T&, const T&, double, double, bool, bool)>(
      "archext::qk_norm_rope_fwd");
  return h.call(q, k, q_weight, k_weight, cos, sin, positions, eps, weight_offset, per_head,
                interleaved);
}

std::tuple<T, T, T, T> qk_norm_rope_bwd(const T& grad_q, const T& grad_k, const T& q, const T& k,
                                        const OptT& q_weight, const OptT& k_weight, const T& cos,
                                        const T& sin, const T& positions, const T& q_rstd,
                                        const T& k_rstd, double weight_offset, bool per_head,
                                        bool interleaved) {
  static auto h = op<std::tuple<T, T, T, T>(const T&, const T&, const T&, const T&, const OptT&,
                                            const OptT&, const T&, const T&, const T&, const T&,
                                            const T&, double, bool, bool)>("archext::qk_norm_rope_bwd");
  return h.call(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, positions, q_rstd, k_rstd,
                weight_offset, per_head, interleaved);
}

}  // namespace archext
