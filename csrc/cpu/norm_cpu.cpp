// CPU launchers of the norm family: threading over rows, dtype dispatch, the per-thread weight
// gradient buffers, and the CPU registrations. The row kernels are in cpu/norm_kernels.inl.
#include <cstdlib>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/norm_host.h"
#include "cpu/isa.h"
#include "cpu/kernel_api.h"
#include "cpu/prefault.h"

namespace archext::cpu {
namespace {

const NormKernels& kernels() {
  return current_table(norm_kernels_default, norm_kernels_avx2,
                       norm_kernels_avx512, norm_kernels_avx512_bf16);
}

// About 32K elements per task, so that small batches are not split across threads.
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, (int64_t{1} << 15) / n); }

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return has(t) ? t->data_ptr<T>() : nullptr;
}

// (param + offset) in acc_t, converted once per call so that the row loops read it as is: the
// parameter itself when it already is (float32, no offset), else a copy in `buf`. The parameter
// may be of any float dtype (a mixed-precision call takes it in y's dtype or float32).
template <typename acc_t>
const acc_t* params_acc(const OptTensor& t, acc_t offset, std::vector<acc_t>& buf) {
  if (!has(t)) return nullptr;
  const acc_t* out = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "norm_params_cpu", [&] {
    const scalar_t* src = t->data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (offset == 0) {
        out = src;
        return;
      }
    }
    buf.resize(t->numel());
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<acc_t>(src[i]) + offset;
    out = buf.data();
  });
  return out;
}

// The forward of one (T, TS) pair: TS == T, or TS float32 beside a 16-bit T (x_t: x, or null
// for the plain norm of the float32 input `residual`).
template <typename T, typename TS>
void norm_fwd_typed(const NormFwdOut& out, const T* x_t, const OptTensor& residual,
                    const OptTensor& weight, const OptTensor& bias, int64_t rows, int64_t n,
                    double eps, double weight_offset, bool layer_norm,
                    void (*fn)(const NormFwdParams<T, acc_of<T>, TS>&, int64_t, int64_t)) {
  using acc_t = acc_of<T>;
  NormFwdParams<T, acc_t, TS> p{};
  p.x = x_t;
  p.residual = ptr_or_null<TS>(residual);
  p.y = out.y.data_ptr<T>();
  p.h = out.h.defined() ? out.h.data_ptr<TS>() : nullptr;
  p.mean = out.mean.defined() ? out.mean.data_ptr<acc_t>() : nullptr;
  p.rstd = out.rstd.data_ptr<acc_t>();
  p.n = n;
  p.eps = static_cast<acc_t>(eps);
  p.weight_offset = static_cast<acc_t>(weight_offset);
  p.layer_norm = layer_norm;
  std::vector<acc_t> w_buf, b_buf;
  p.weight_acc = params_acc<acc_t>(weight, p.weight_offset, w_buf);
  p.bias_acc = params_acc<acc_t>(bias, acc_t(0), b_buf);
  const int64_t rb = n * static_cast<int64_t>(sizeof(T));
  p.stream_y = !std::is_same_v<T, double> && stream_output(p.y, rows * rb, rb);
  parallel_units(rows, grain_rows(n), {&out.y, &out.h}, [&](int64_t b, int64_t e) { fn(p, b, e); });
}

}  // namespace

void norm_fwd(const NormFwdOut& out, const at::Tensor& x, const OptTensor& residual,
              const OptTensor& weight, const OptTensor& bias, double eps, double weight_offset,
              bool layer_norm) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  if (rows == 0) return;
  const bool mixed = has(residual) ? residual->scalar_type() != x.scalar_type()
                                   : out.y.scalar_type() != x.scalar_type();
  if (mixed) {
    // A float32 stream beside 16-bit activations: x (16-bit) + residual (float32), or the plain
    // norm of a float32 x, passed to the kernel as its `residual`.
    AT_DISPATCH_REDUCED_FLOATING_TYPES(out.y.scalar_type(), "norm_fwd_mixed_cpu", [&] {
      const scalar_t* xt = has(residual) ? x.data_ptr<scalar_t>() : nullptr;
      norm_fwd_typed<scalar_t, float>(out, xt, has(residual) ? residual : OptTensor(x), weight,
                                      bias, rows, n, eps, weight_offset, layer_norm,
                                      kernels().fwd_mixed.get<scalar_t>());
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_fwd_cpu", [&] {
    norm_fwd_typed<scalar_t, scalar_t>(out, x.data_ptr<scalar_t>(), residual, weight, bias, rows,
                                       n, eps, weight_offset, layer_norm,
                                       kernels().fwd.get<scalar_t>());
  });
}

void norm_bwd(const NormBwdOut& out, const at::Tensor& dy, const at::Tensor& x,
              const OptTensor& weight, const OptTensor& mean, const at::Tensor& rstd,
              const OptTensor& dh, double weight_offset) {
  const bool compute_dweight = out.dweight.defined(), compute_dbias = out.dbias.defined();
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  // Weight and bias gradients: float32 (float64) partial sums, one row of the buffer per chunk
  // of rows (so no two tasks ever share one, whatever at::parallel_for's backend), summed at the
  // end in that precision and rounded to the parameter dtype once. The chunks depend on the
  // shape only, never on the thread count, so the gradients are bitwise the same at any number
  // of threads (at most kMaxPartials chunks: 64 x n floats of buffer, and up to 64 threads busy).
  constexpr int64_t kMaxPartials = 64;
  const int64_t grain = grain_rows(n);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(kMaxPartials, (rows + grain - 1) / grain));
  const auto acc_opts = x.options().dtype(acc_dtype(x));
  at::Tensor dw_part = compute_dweight ? at::zeros({tasks, n}, acc_opts) : at::Tensor();
  at::Tensor db_part = compute_dbias ? at::zeros({tasks, n}, acc_opts) : at::Tensor();
  if (rows > 0) {
    // The backward of one (T, TS) pair (see norm_fwd_typed).
    auto run = [&]<typename T, typename TS>(void (*fn)(const NormBwdParams<T, acc_of<T>, TS>&,
                                                       int64_t, int64_t)) {
      using acc_t = acc_of<T>;
      NormBwdParams<T, acc_t, TS> p{};
      p.dy = dy.data_ptr<T>();
      p.x = x.data_ptr<TS>();
      p.mean = has(mean) ? mean->data_ptr<acc_t>() : nullptr;
      p.rstd = rstd.data_ptr<acc_t>();
      p.dh = ptr_or_null<TS>(dh);
      p.dx = out.dx.data_ptr<TS>();
      p.n = n;
      p.weight_offset = static_cast<acc_t>(weight_offset);
      std::vector<acc_t> w_buf;
      p.weight_acc = params_acc<acc_t>(weight, p.weight_offset, w_buf);
      acc_t* dw = compute_dweight ? dw_part.data_ptr<acc_t>() : nullptr;
      acc_t* db = compute_dbias ? db_part.data_ptr<acc_t>() : nullptr;
      const int64_t chunk = (rows + tasks - 1) / tasks;
      const int64_t rb = n * static_cast<int64_t>(sizeof(TS));
      Prefault pf;
      pf.add(p.dx, rows * rb, rb);
      at::parallel_for(0, tasks, 1, [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
          NormBwdParams<T, acc_t, TS> q = p;
          q.dweight = dw ? dw + c * n : nullptr;
          q.dbias = db ? db + c * n : nullptr;
          // Sub-ranges of a chunk accumulate into its partial sums row after row, in the same
          // order as one call: the same bits.
          pf.run(c * chunk, std::min(rows, (c + 1) * chunk),
                 [&](int64_t sb, int64_t se) { fn(q, sb, se); });
        }
      });
    };
    if (dy.scalar_type() != x.scalar_type()) {  // 16-bit grad_y of a float32 stream's norm
      AT_DISPATCH_REDUCED_FLOATING_TYPES(dy.scalar_type(), "norm_bwd_mixed_cpu", [&] {
        run.template operator()<scalar_t, float>(kernels().bwd_mixed.get<scalar_t>());
      });
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_bwd_cpu", [&] {
        run.template operator()<scalar_t, scalar_t>(kernels().bwd.get<scalar_t>());
      });
    }
  }
  if (compute_dweight) out.dweight.copy_(dw_part.sum(0));
  if (compute_dbias) out.dbias.copy_(db_part.sum(0));
}

TORCH_LIBRARY_IMPL(archext, CPU, m) { register_norm_ops<norm_fwd, norm_bwd>(m); }
#ifdef ARCHEXT_WITH_CUDA_EMU
TORCH_LIBRARY_IMPL(archext_cpu, CPU, m) { register_norm_ops<norm_fwd, norm_bwd>(m); }  // float64 under the emulated CUDA
#endif

}  // namespace archext::cpu
