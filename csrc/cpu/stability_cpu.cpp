// CPU launchers of the stability family: target checks, dtype dispatch, threads over rows, and
// the CPU registrations. Kernels: cpu/stability_kernels.inl; entry points: common/stability_host.h.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/stability_host.h"
#include "cpu/isa.h"
#include "cpu/prefault.h"
#include "cpu/stability_api.h"

namespace archext::cpu {
namespace {

const StabilityKernels& kernels() {
  return current_table(stability_kernels_default, stability_kernels_avx2,
                       stability_kernels_avx512, stability_kernels_avx512_bf16);
}

// Rows per task: at least ~32K elements of work, so small inputs stay on one thread.
int64_t row_grain(int64_t width) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(width, 1));
}

// Every target must be ignore_index or a class index: anything else would read outside the row.
void check_targets(const at::Tensor& target, int64_t vocab, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i) {
    TORCH_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < vocab),
                "archext::cross_entropy: target[", i, "] = ", t[i], " is outside [0, ", vocab,
                ") and is not ignore_index (", ignore_index, ")");
  }
}

struct Cpu {
  static void ce_fwd(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                     double eps, double coef, double cap, const at::Tensor& loss,
                     const at::Tensor& z_loss, const at::Tensor& lse) {
    check_targets(target, logits.size(1), ignore_index);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_fwd_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      auto p = ce_params<scalar_t, acc_t>(logits, target, ignore_index, eps, coef, cap);
      p.loss = loss.data_ptr<acc_t>();
      p.z_loss = z_loss.data_ptr<acc_t>();
      p.lse = lse.data_ptr<acc_t>();
      const auto fn = kernels().ce_fwd.get<scalar_t>();
      at::parallel_for(0, p.rows, row_grain(p.vocab), [&](int64_t b, int64_t e) { fn(p, b, e); });
    });
  }

  static void ce_bwd(const at::Tensor& grad_loss, const at::Tensor& grad_z_loss,
                     const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                     int64_t ignore_index, double eps, double coef, double cap,
                     const at::Tensor& grad) {
    check_targets(target, logits.size(1), ignore_index);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_bwd_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      auto p = ce_params<scalar_t, acc_t>(logits, target, ignore_index, eps, coef, cap);
      p.lse = const_cast<acc_t*>(lse.data_ptr<acc_t>());
      p.grad_loss = grad_loss.data_ptr<acc_t>();
      p.grad_z_loss = grad_z_loss.defined() ? grad_z_loss.data_ptr<acc_t>() : nullptr;
      p.grad_logits = grad.data_ptr<scalar_t>();
      const auto fn = kernels().ce_bwd.get<scalar_t>();
      parallel_units(p.rows, row_grain(p.vocab), {&grad}, [&](int64_t b, int64_t e) { fn(p, b, e); });
    });
  }

  static void softmax_fwd(const at::Tensor& x, const at::Tensor& bias, double scale, double cap,
                          bool causal, int64_t window, const at::Tensor& y) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_fwd_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      const auto p = softmax_fwd_params<scalar_t, acc_t>(x, bias, scale, cap, causal, window, y);
      const auto fn = kernels().softmax_fwd.get<scalar_t>();
      parallel_units(p.rows, row_grain(p.sk), {&y}, [&](int64_t b, int64_t e) { fn(p, b, e); });
    });
  }

  static void softmax_bwd(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& x,
                          double scale, double cap, const at::Tensor& dx, const at::Tensor& ds) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "softmax_bwd_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      const auto p = softmax_bwd_params<scalar_t, acc_t>(dy, y, x, scale, cap, dx, ds);
      const auto fn = kernels().softmax_bwd.get<scalar_t>();
      parallel_units(p.rows, row_grain(p.sk), {&dx, &ds}, [&](int64_t b, int64_t e) { fn(p, b, e); });
    });
  }

  template <bool kBwd>
  static void softcap(const at::Tensor& dy, const at::Tensor& x, double cap, const at::Tensor& y) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softcap_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      SoftcapParams<scalar_t> p{};
      p.x = x.data_ptr<scalar_t>();
      p.dy = kBwd ? dy.data_ptr<scalar_t>() : nullptr;
      p.y = y.data_ptr<scalar_t>();
      p.cap = static_cast<acc_t>(cap);
      p.inv_cap = static_cast<acc_t>(1.0 / cap);
      const auto fn = kBwd ? kernels().softcap_bwd.get<scalar_t>() : kernels().softcap_fwd.get<scalar_t>();
      // Ranges start on 64-element boundaries (whole vectors).
      const int64_t n = x.numel(), blocks = (n + 63) / 64;
      Prefault pf;
      pf.add(y.data_ptr(), y.nbytes(), y.element_size());
      at::parallel_for(0, blocks, 512, [&](int64_t b, int64_t e) {
        pf.run(b * 64, std::min(e * 64, n), [&](int64_t sb, int64_t se) { fn(p, sb, se); }, 64);
      });
    });
  }
  static void softcap_fwd(const at::Tensor& x, double cap, const at::Tensor& y) {
    softcap<false>(at::Tensor(), x, cap, y);
  }
  static void softcap_bwd(const at::Tensor& dy, const at::Tensor& x, double cap, const at::Tensor& dx) {
    softcap<true>(dy, x, cap, dx);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(archext, CPU, m) { register_stability_ops<Cpu>(m); }
#ifdef ARCHEXT_WITH_CUDA_EMU
TORCH_LIBRARY_IMPL(archext_cpu, CPU, m) { register_stability_ops<Cpu>(m); }  // float64 under the emulated CUDA
#endif

}  // namespace archext::cpu
