// CPU launchers of the activation family: threading over elements, dtype dispatch, and the CPU
// registrations. The kernels are in cpu/activation_kernels.inl, the op entry points in
// common/activation_host.h.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common/activation_host.h"
#include "cpu/isa.h"
#include "cpu/kernel_api.h"
#include "cpu/prefault.h"

namespace archext::cpu {
namespace {

const ActivationKernels& kernels() {
  return current_table(activation_kernels_default, activation_kernels_avx2,
                       activation_kernels_avx512, activation_kernels_avx512_bf16);
}

// Threads split the [rows, n] grid, in row-major order, into ranges of whole blocks of kBlock
// elements (so that a range starts on a vector boundary of a contiguous row), at least kGrain
// elements per task so that small tensors are not split across threads.
constexpr int64_t kBlock = 64;
constexpr int64_t kGrain = int64_t{1} << 15;

template <typename F>
void parallel_elems(int64_t total, const Prefault& pf, F&& f) {
  const int64_t blocks = (total + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrain / kBlock, [&](int64_t b, int64_t e) {
    pf.run(b * kBlock, std::min(e * kBlock, total), f, kBlock);
  });
}

// The outputs' pages, in the order of the element index that the kernels walk: a contiguous
// [rows, n] output, or the two halves of a packed [rows, 2n] one (2 elements' bytes per index).
void add_outputs(Prefault& pf, void* a, int64_t a_stride, void* b, int64_t b_stride,
                 int64_t rows, int64_t n, int64_t elem) {
  if (b != nullptr && static_cast<char*>(b) == static_cast<char*>(a) + n * elem &&
      a_stride == 2 * n && b_stride == 2 * n) {
    pf.add(a, rows * 2 * n * elem, 2 * elem);
    return;
  }
  if (a_stride == n) pf.add(a, rows * n * elem, elem);
  if (b != nullptr && b_stride == n) pf.add(b, rows * n * elem, elem);
}

}  // namespace

void act_fwd(const ActFwdArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "act_fwd_cpu", [&] {
    const auto p = typed_params<scalar_t>(a);
    const auto fn = kernels().fwd.get<scalar_t>();
    Prefault pf;
    add_outputs(pf, a.y, a.y_stride, nullptr, 0, a.rows, a.n, sizeof(scalar_t));
    parallel_elems(a.rows * a.n, pf, [&](int64_t b, int64_t e) { fn(p, b, e); });
  });
}

void act_bwd(const ActBwdArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "act_bwd_cpu", [&] {
    const auto p = typed_params<scalar_t>(a);
    const auto fn = kernels().bwd.get<scalar_t>();
    Prefault pf;
    add_outputs(pf, a.dx, a.dx_stride, a.dup, a.dup_stride, a.rows, a.n, sizeof(scalar_t));
    parallel_elems(a.rows * a.n, pf, [&](int64_t b, int64_t e) { fn(p, b, e); });
  });
}

namespace {

// archext_testing::vec_math: the vectorised exp / erf / tanh (and the fast erf of the 16-bit
// kernels) of the current ISA on a float32 tensor, so that the tests can measure them
// against float64.
at::Tensor vec_math(const at::Tensor& x, c10::string_view fn) {
  const char* op = "archext_testing::vec_math";
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), op,
              ": expected a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  VecMathFn f;
  if (fn == "exp") {
    f = VecMathFn::kExp;
  } else if (fn == "erf") {
    f = VecMathFn::kErf;
  } else if (fn == "tanh") {
    f = VecMathFn::kTanh;
  } else if (fn == "erf_fast") {
    f = VecMathFn::kErfFast;
  } else {
    TORCH_CHECK(false, op, ": unknown function '", fn,
                "', expected one of exp, erf, tanh, erf_fast");
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  kernels().vec_math(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel(), f);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(archext, CPU, m) { register_activation_ops<act_fwd, act_bwd>(m); }
#ifdef ARCHEXT_WITH_CUDA_EMU
TORCH_LIBRARY_IMPL(archext_cpu, CPU, m) { register_activation_ops<act_fwd, act_bwd>(m); }  // float64 under the emulated CUDA
#endif

TORCH_LIBRARY_IMPL(archext_testing, CPU, m) { m.impl("vec_math", &vec_math); }

}  // namespace archext::cpu
