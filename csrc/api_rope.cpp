// The C++ API of RoPE (include/archext/rope.h): typed calls into the dispatcher.
#include <cmath>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>

#include "archext/rope.h"

namespace archext {
namespace {

using T2 = std::tuple<at::Tensor, at::Tensor>;
using RopeSig = T2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, bool);

c10::TypedOperatorHandle<RopeSig> rope_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<RopeSig>();
}

}  // namespace

T2 rope_cache(int64_t rotary_dim, int64_t max_positions, double theta) {
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0, "archext::rope_cache: expected a positive "
              "even rotary_dim, got ", rotary_dim);
  TORCH_CHECK(max_positions >= 0, "archext::rope_cache: expected max_positions >= 0, got ",
              max_positions);
  const int64_t half = rotary_dim / 2;
  at::Tensor cos = at::empty({max_positions, half}, at::kFloat);
  at::Tensor sin = at::empty({max_positions, half}, at::kFloat);
  float* c = cos.data_ptr<float>();
  float* s = sin.data_ptr<float>();
  for (int64_t p = 0; p < max_positions; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(p) *
                           std::pow(theta, -2.0 * static_cast<double>(i) / rotary_dim);
      c[p * half + i] = static_cast<float>(std::cos(angle));
      s[p * half + i] = static_cast<float>(std::sin(angle));
    }
  }
  return {cos, sin};
}

T2 rope_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
            const at::Tensor& sin, const at::Tensor& positions, bool interleaved) {
  static auto h = rope_op("archext::rope_fwd");
  return h.call(q, k, cos, sin, positions, interleaved);
}

T2 rope_bwd(const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
            const at::Tensor& sin, const at::Tensor& positions, bool interleaved) {
  static auto h = rope_op("archext::rope_bwd");
  return h.call(grad_q, grad_k, cos, sin, positions, interleaved);
}

void rope_fwd_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
               const at::Tensor& positions, bool interleaved) {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("archext::rope_fwd_", "")
                      .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, bool)>();
  h.call(q, k, cos, sin, positions, interleaved);
}

}  // namespace archext
