// CPU launcher of the fused QK-norm + RoPE: position checks, dtype dispatch, threads over tokens,
// deterministic weight gradients (fixed chunks of tokens, each with its own float partial row,
// summed in order), and the CPU registration.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/qk_norm_rope_host.h"
#include "cpu/isa.h"
#include "cpu/prefault.h"
#include "cpu/qk_norm_rope_api.h"

namespace archext::cpu {
namespace {

const QkNormRopeKernels& kernels() {
  return current_table(qk_norm_rope_kernels_default, qk_norm_rope_kernels_avx2,
                       qk_norm_rope_kernels_avx512, qk_norm_rope_kernels_avx512_bf16);
}

constexpr int64_t kChunkTokens = 64;  // tokens per weight-gradient partial (fixed: deterministic)

struct Cpu {
  static void fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& wq,
                  const at::Tensor& wk, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& pos, double eps, double off, bool per_head, bool interleaved,
                  const at::Tensor& qo, const at::Tensor& ko, const at::Tensor& rq,
                  const at::Tensor& rk) {
    check_positions_in_cache("archext::qk_norm_rope", pos, cos.size(0));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "qk_norm_rope_fwd_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      auto p = qk_norm_rope_params<scalar_t, acc_t>(q, k, wq, wk, cos, sin, pos, eps, off, per_head,
                                                    interleaved);
      p.y[0] = qo.data_ptr<scalar_t>();
      p.y[1] = ko.data_ptr<scalar_t>();
      p.rstd[0] = rq.data_ptr<acc_t>();
      p.rstd[1] = rk.data_ptr<acc_t>();
      const auto fn = kernels().fwd.get<scalar_t>();
      const int64_t per_tok = (p.heads[0] + p.heads[1]) * p.head_dim;
      parallel_units(p.tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(per_tok, 1)),
                     {&qo, &ko}, [&](int64_t b, int64_t e) { fn(p, b, e); });
    });
  }

  static void bwd(const at::Tensor& gq, const at::Tensor& gk, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& wq, const at::Tensor& wk,
                  const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
                  const at::Tensor& rq, const at::Tensor& rk, double off, bool per_head,
                  bool interleaved, const at::Tensor& dq, const at::Tensor& dk,
                  const at::Tensor& dwq, const at::Tensor& dwk) {
    check_positions_in_cache("archext::qk_norm_rope", pos, cos.size(0));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "qk_norm_rope_bwd_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      auto p = qk_norm_rope_params<scalar_t, acc_t>(q, k, wq, wk, cos, sin, pos, 0.0, off, per_head,
                                                    interleaved);
      p.dy[0] = gq.data_ptr<scalar_t>();
      p.dy[1] = gk.data_ptr<scalar_t>();
      p.dx[0] = dq.data_ptr<scalar_t>();
      p.dx[1] = dk.data_ptr<scalar_t>();
      p.rstd[0] = const_cast<acc_t*>(rq.data_ptr<acc_t>());
      p.rstd[1] = const_cast<acc_t*>(rk.data_ptr<acc_t>());
      p.chunk_tokens = kChunkTokens;
      const int64_t chunks = (p.tokens + kChunkTokens - 1) / kChunkTokens;
      const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      at::Tensor part[2];
      const at::Tensor* dws[2] = {&dwq, &dwk};
      for (int i = 0; i < 2; ++i) {
        if (p.w[i] == nullptr) continue;
        part[i] = at::zeros({chunks, dws[i]->numel()}, q.options().dtype(acc));
        p.dw[i] = part[i].data_ptr<acc_t>();
      }
      const auto fn = kernels().bwd.get<scalar_t>();
      at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        fn(p, b * kChunkTokens, std::min(e * kChunkTokens, p.tokens));
      });
      for (int i = 0; i < 2; ++i) {
        if (p.w[i] != nullptr) dws[i]->copy_(part[i].sum(0));
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(archext, CPU, m) { register_qk_norm_rope_ops<Cpu>(m); }
#ifdef ARCHEXT_WITH_CUDA_EMU
TORCH_LIBRARY_IMPL(archext_cpu, CPU, m) { register_qk_norm_rope_ops<Cpu>(m); }  // float64 under the emulated CUDA
#endif

}  // namespace archext::cpu
