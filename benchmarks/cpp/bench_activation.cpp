// C++ benchmark of the archext activation kernels on the CPU, against PyTorch's own add / copy
// kernels moving the same number of bytes: the `_out` API into preallocated outputs (no
// allocation, so no page faults, in the timed region), timed with std::chrono, warm-up then the
// median of the repeats. Not a test: no thresholds.
//
//   archext_bench_activation [--quick] [--shape ROWSxCOLS] [--repeats N] [--warmup N]
//
// Rows: the gated forwards (swiglu, geglu, geglu_tanh, reglu: read gate and up, write y), their
// backward (glu_bwd_out: read grad_y, gate, up, write grad_gate, grad_up), the plain forwards
// (gelu, relu: read x, write y); per dtype (float32, bfloat16) and thread count (1, 2). The
// floor of each is PyTorch moving the same tensors: at::add_out(y, gate, up) for a gated
// forward, add_out(dg, dy, gate) plus du.copy_(up) for the backward, y.copy_(x) for a plain
// forward. x floor = floor time / op time (1.00: as fast as PyTorch's own memory-bound kernel).
#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "archext/activation.h"
#include "bench_common.h"
#include "cpu/isa.h"

using namespace archext_bench;

int main(int argc, char** argv) {
  Settings s{2, 11};
  s.rows = 8192;
  s.cols = 14336;
  if (const int rc = parse_args(argc, argv, s, /*takes_shape=*/true); rc >= 0) return rc;
  if (s.quick && !s.shape_given) s.rows = 1024;

  const int max_threads = at::get_num_threads();
  std::printf("archext C++ activation benchmark: CPU ISA %s, torch threads by default %d, "
              "warm-up %d, median of %d, shape %lldx%lld, preallocated outputs\n",
              archext::cpu::isa_name(archext::cpu::current_isa()), max_threads, s.warmup,
              s.repeats, static_cast<long long>(s.rows), static_cast<long long>(s.cols));
  std::printf("GB/s: tensors read and written / time; floor: PyTorch's add_out / copy_ moving "
              "the same tensors; x floor = floor ms / op ms\n\n");
  std::printf("%-16s %-9s %-12s %7s %10s %8s %10s %8s\n", "op", "dtype", "shape", "threads",
              "time ms", "GB/s", "floor ms", "x floor");
  std::printf("%s\n", std::string(16 + 9 + 12 + 7 + 10 + 8 + 10 + 8 + 7, '-').c_str());

  at::manual_seed(0);
  const std::string shape = std::to_string(s.rows) + "x" + std::to_string(s.cols);
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    const auto opts = at::TensorOptions().dtype(dt);
    const at::Tensor gate = at::randn({s.rows, s.cols}, opts), up = at::randn({s.rows, s.cols}, opts);
    const at::Tensor dy = at::randn({s.rows, s.cols}, opts);
    at::Tensor y = at::empty({s.rows, s.cols}, opts), dg = at::empty({s.rows, s.cols}, opts);
    at::Tensor du = at::empty({s.rows, s.cols}, opts);
    const double tensor_bytes = static_cast<double>(gate.numel()) * gate.element_size();

    struct Op {
      const char* name;
      int tensors;  // read + written
      std::function<void()> fn, floor;
    };
    const auto add_floor = [&] { at::add_out(y, gate, up); };
    const std::vector<Op> ops = {
        {"swiglu", 3, [&] { archext::glu_fwd_out(y, gate, up, "silu"); }, add_floor},
        {"geglu", 3, [&] { archext::glu_fwd_out(y, gate, up, "gelu"); }, add_floor},
        {"geglu_tanh", 3, [&] { archext::glu_fwd_out(y, gate, up, "gelu_tanh"); }, add_floor},
        {"reglu", 3, [&] { archext::glu_fwd_out(y, gate, up, "relu"); }, add_floor},
        {"swiglu_bwd", 5, [&] { archext::glu_bwd_out(dg, du, dy, gate, up, "silu"); },
         [&] {
           at::add_out(dg, dy, gate);
           du.copy_(up);
         }},
        {"geglu_bwd", 5, [&] { archext::glu_bwd_out(dg, du, dy, gate, up, "gelu"); },
         [&] {
           at::add_out(dg, dy, gate);
           du.copy_(up);
         }},
        {"gelu", 2, [&] { archext::act_fwd_out(y, gate, "gelu"); }, [&] { y.copy_(gate); }},
        {"relu", 2, [&] { archext::act_fwd_out(y, gate, "relu"); }, [&] { y.copy_(gate); }},
    };
    for (int threads : {1, 2}) {
      at::set_num_threads(threads);
      for (const Op& op : ops) {
        const double op_ms = time_ms(s, op.fn);
        const double floor_ms = time_ms(s, op.floor);
        const double gbs = op.tensors * tensor_bytes / (op_ms * 1e-3) / 1e9;
        std::printf("%-16s %-9s %-12s %7d %10.3f %8.2f %10.3f %8.2f\n", op.name, dtype_name(dt),
                    shape.c_str(), threads, op_ms, gbs, floor_ms, floor_ms / op_ms);
        std::fflush(stdout);
      }
    }
    at::set_num_threads(max_threads);
  }
  return 0;
}
