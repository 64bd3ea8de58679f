// CPU launchers of the tiled attention (flash_attn_fwd / flash_attn_bwd): dtype dispatch, the
// backward's per-row delta and the deterministic sum of the relative-bias partials, workers
// over tasks, and the CPU registration. Kernels and their math: cpu/attention_kernels.inl;
// checks and entry points: common/attention_host.h.
#include <algorithm>
#include <atomic>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/attention_host.h"
#include "cpu/attention_api.h"
#include "cpu/isa.h"

namespace archext::cpu {
namespace {

const AttentionKernels& kernels() {
  return current_table(attention_kernels_default, attention_kernels_avx2,
                       attention_kernels_avx512, attention_kernels_avx512_bf16);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs fn(counter, tasks) on up to one worker per thread; each worker takes tasks from the
// shared counter (dynamic balancing: causal tiles differ in cost). The outputs of a task do not
// depend on which worker ran it, so the results are the same for any number of threads.
template <typename F>
void run_tasks(int64_t tasks, F&& fn) {
  if (tasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(tasks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) fn(&next, tasks);
  });
}

struct Cpu {
  static void fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& rel_bias, const at::Tensor& segment_ids, const AttnShape& s,
                  double scale, double softcap, bool causal, int64_t window, const at::Tensor& o,
                  const at::Tensor& lse) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flash_attn_fwd_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      auto p = flash_attn_params<scalar_t, acc_t>(q, k, v, rel_bias, segment_ids, s, scale,
                                                  softcap, causal, window);
      p.o = o.data_ptr<scalar_t>();
      p.lse = lse.data_ptr<acc_t>();
      const auto fn = kernels().fwd.get<scalar_t>();
      const int64_t tasks = ceil_div(s.sq, kAttnQueryTile) * s.batch * s.hq;
      run_tasks(tasks, [&](std::atomic<int64_t>* next, int64_t n) { fn(p, next, n); });
    });
  }

  static void bwd(const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                  const at::Tensor& rel_bias, const at::Tensor& segment_ids, const AttnShape& s,
                  double scale, double softcap, bool causal, int64_t window,
                  const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
                  const at::Tensor& grad_bias) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flash_attn_bwd_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      auto p = flash_attn_params<scalar_t, acc_t>(q, k, v, rel_bias, segment_ids, s, scale,
                                                  softcap, causal, window);
      flash_attn_bwd_params<scalar_t, acc_t>(p, grad_o, o, lse, grad_q, grad_k, grad_v, grad_bias);
      const auto acc_opts = q.options().dtype(lse.scalar_type());

      // delta [B, Hq, Sq] = rowsum(grad_o * o), each row summed in order by one thread.
      at::Tensor delta = at::empty({s.batch, s.hq, s.sq}, acc_opts);
      acc_t* dl = delta.data_ptr<acc_t>();
      at::parallel_for(0, s.batch * s.sq * s.hq, 256, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t h = row % s.hq, i = (row / s.hq) % s.sq, b = row / (s.hq * s.sq);
          const scalar_t* go = p.grad_o + b * p.grad_o_stride[0] + i * p.grad_o_stride[1] +
                               h * p.grad_o_stride[2];
          const scalar_t* oo = p.o_in + b * p.o_stride[0] + i * p.o_stride[1] + h * p.o_stride[2];
          acc_t sum = 0;
          for (int64_t d = 0; d < s.d; ++d) {
            sum += static_cast<acc_t>(go[d]) * static_cast<acc_t>(oo[d]);
          }
          dl[(b * s.hq + h) * s.sq + i] = sum;
        }
      });

      // The relative-bias gradient: one partial row per (b, h), summed over b in order.
      at::Tensor partial;
      if (grad_bias.defined()) partial = at::zeros({s.batch, s.hq, s.bias_len}, acc_opts);
      AttnBwdScratch<acc_t> x{dl, partial.defined() ? partial.data_ptr<acc_t>() : nullptr};

      // One pass when every worker gets at least two (b, kv head) tasks and their grad_q
      // scratch is small; else a pass over key tiles then one over query tiles, which spread
      // over more tasks. Both give the same bits, so the choice (which depends on the thread
      // count) never changes a result.
      const auto& table = kernels();
      const int64_t dp = (s.d + 15) / 16 * 16;
      const bool fused = !partial.defined() && s.batch * s.hk >= 2 * at::get_num_threads() &&
                         s.group * s.sq * dp * int64_t(sizeof(acc_t)) <= kAttnFusedBwdMaxScratch;
      if (fused) {
        const auto fused_fn = table.bwd_fused.get<scalar_t>();
        run_tasks(s.batch * s.hk,
                  [&](std::atomic<int64_t>* next, int64_t n) { fused_fn(p, x, next, n); });
      } else {
        const auto kv_fn = table.bwd_kv.get<scalar_t>();
        const auto q_fn = table.bwd_q.get<scalar_t>();
        run_tasks(ceil_div(s.sk, kAttnKeyTile) * s.batch * s.hk,
                  [&](std::atomic<int64_t>* next, int64_t n) { kv_fn(p, x, next, n); });
        const int64_t q_tasks = partial.defined() ? s.batch * s.hq
                                                  : ceil_div(s.sq, kAttnQueryTile) * s.batch * s.hq;
        run_tasks(q_tasks, [&](std::atomic<int64_t>* next, int64_t n) { q_fn(p, x, next, n); });
      }

      if (partial.defined()) {
        const acc_t* part = partial.data_ptr<acc_t>();
        acc_t* gb = grad_bias.data_ptr<acc_t>();
        const int64_t cols = s.hq * s.bias_len;
        at::parallel_for(0, cols, 4096, [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c) {
            acc_t sum = 0;
            for (int64_t b = 0; b < s.batch; ++b) sum += part[b * cols + c];
            gb[c] = sum;
          }
        });
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(archext, CPU, m) { register_attention_ops<Cpu>(m); }
#ifdef ARCHEXT_WITH_CUDA_EMU
TORCH_LIBRARY_IMPL(archext_cpu, CPU, m) { register_attention_ops<Cpu>(m); }  // float64 under the emulated CUDA
#endif

}  // namespace archext::cpu
