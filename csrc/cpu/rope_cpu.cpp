// CPU launcher of RoPE: position checks, dtype dispatch, threads over tokens, registration.
// The kernels are in cpu/rope_kernels.inl.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/rope_host.h"
#include "cpu/isa.h"
#include "cpu/prefault.h"
#include "cpu/rope_api.h"

namespace archext::cpu {
namespace {

const RopeKernels& kernels() {
  return current_table(rope_kernels_default, rope_kernels_avx2,
                       rope_kernels_avx512, rope_kernels_avx512_bf16);
}

}  // namespace

void rope(const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& q,
          const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
          bool interleaved, float sign) {
  check_positions_in_cache("archext::rope", pos, cos.size(0));
  const int64_t tokens = q.size(0) * q.size(1);
  if (tokens == 0 || q.size(3) == 0) return;
  const int64_t per_token = (q.size(2) + k.size(2)) * q.size(3);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(per_token, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope_cpu", [&] {
    const auto p = rope_params<scalar_t>(q_out, k_out, q, k, cos, sin, pos, interleaved, sign);
    const auto fn = kernels().get<scalar_t>();
    parallel_units(tokens, grain, {&q_out, &k_out}, [&](int64_t b, int64_t e) { fn(p, b, e); });
  });
}

TORCH_LIBRARY_IMPL(archext, CPU, m) { register_rope_ops<rope>(m); }
#ifdef ARCHEXT_WITH_CUDA_EMU
TORCH_LIBRARY_IMPL(archext_cpu, CPU, m) { register_rope_ops<rope>(m); }  // float64 under the emulated CUDA
#endif

}  // namespace archext::cpu
