// C++ benchmark of the archext norm forwards on the CPU, against a plain copy of the same number
// of bytes: the `_out` API into preallocated outputs (no allocation in the timed region), timed
// with std::chrono, warm-up then the median of the repeats. Not a test: no thresholds.
//
//   archext_bench [--quick] [--repeats N] [--warmup N]
//
// Per row: op, dtype, shape, threads (at::set_num_threads), median time, effective GB/s from the
// minimum bytes the op must move (read x (+ residual) (+ weight, bias), write y (+ h); the per-row
// statistics are ignored), the GB/s of dst.copy_(src) moving the same bytes (read + write: a
// copy of half as many bytes), and op/copy = effective GB/s / copy GB/s (1.00: as fast as a copy).
#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "archext/norm.h"
#include "bench_common.h"
#include "cpu/isa.h"

namespace {

using namespace archext_bench;

struct Row {
  std::string op, dtype, shape;
  int threads;
  double ms, gbps, copy_gbps;
};

}  // namespace

int main(int argc, char** argv) {
  Settings s{3, 21};
  if (const int rc = parse_args(argc, argv, s, /*takes_shape=*/false); rc >= 0) return rc;

  const int max_threads = at::get_num_threads();
  std::printf("archext C++ benchmark: CPU ISA %s, torch threads by default %d, warm-up %d, "
              "median of %d\n",
              archext::cpu::isa_name(archext::cpu::current_isa()), max_threads, s.warmup,
              s.repeats);
  std::printf("GB/s: minimum bytes moved (read x [+residual] + params, write y [+h]) / time; "
              "copy: dst.copy_(src) of the same bytes; op/copy = GB/s ratio\n\n");

  const std::vector<std::pair<int64_t, int64_t>> shapes = {{8192, 4096}, {1024, 4096}};
  std::vector<Row> rows;
  at::manual_seed(0);
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    for (auto [m, n] : shapes) {
      const auto opts = at::TensorOptions().dtype(dt);
      const auto fopts = at::TensorOptions().dtype(at::kFloat);
      const at::Tensor x = at::randn({m, n}, opts), res = at::randn({m, n}, opts);
      const at::Tensor w = at::randn({n}, opts), b = at::randn({n}, opts);
      at::Tensor y = at::empty({m, n}, opts), h = at::empty({m, n}, opts);
      at::Tensor mean = at::empty({m}, fopts), rstd = at::empty({m}, fopts);
      const double es = static_cast<double>(x.element_size());
      const double act = static_cast<double>(m * n) * es, par = static_cast<double>(n) * es;
      // The copy moves as many bytes as the biggest op reads and writes (4 activations +
      // a weight): half of it read from src, half written to dst.
      const int64_t copy_numel_max = (4 * m * n + n) / 2;
      const at::Tensor src = at::randn({copy_numel_max}, opts);
      at::Tensor dst = at::empty({copy_numel_max}, opts);
      const std::string shape = std::to_string(m) + "x" + std::to_string(n);

      struct Op {
        const char* name;
        double bytes;
        std::function<void()> fn;
      };
      const std::vector<Op> ops = {
          {"rms_norm_fwd_out", 2 * act + par,
           [&] { archext::rms_norm_fwd_out(y, rstd, x, w, 1e-6, 0.0); }},
          {"add_rms_norm_fwd_out", 4 * act + par,
           [&] { archext::add_rms_norm_fwd_out(y, h, rstd, x, res, w, 1e-6, 0.0); }},
          {"layer_norm_fwd_out", 2 * act + 2 * par,
           [&] { archext::layer_norm_fwd_out(y, mean, rstd, x, w, b, 1e-5); }},
      };
      for (int threads : {1, 2}) {
        at::set_num_threads(threads);
        for (const Op& op : ops) {
          const int64_t copy_numel = static_cast<int64_t>(op.bytes / (2 * es));
          at::Tensor d = dst.narrow(0, 0, copy_numel);
          const at::Tensor sv = src.narrow(0, 0, copy_numel);
          const double op_ms = time_ms(s, op.fn);
          const double copy_ms = time_ms(s, [&] { d.copy_(sv); });
          rows.push_back({op.name, dtype_name(dt), shape, threads, op_ms, gbps(op.bytes, op_ms),
                          gbps(2.0 * copy_numel * es, copy_ms)});
        }
      }
      at::set_num_threads(max_threads);
    }
  }

  std::printf("%-22s %-9s %-10s %7s %10s %8s %10s %8s\n", "op", "dtype", "shape", "threads",
              "time ms", "GB/s", "copy GB/s", "op/copy");
  std::printf("%s\n", std::string(22 + 9 + 10 + 7 + 10 + 8 + 10 + 8 + 7, '-').c_str());
  for (const Row& r : rows) {
    std::printf("%-22s %-9s %-10s %7d %10.3f %8.2f %10.2f %8.2f\n", r.op.c_str(), r.dtype.c_str(),
                r.shape.c_str(), r.threads, r.ms, r.gbps, r.copy_gbps, r.gbps / r.copy_gbps);
  }
  return 0;
}
