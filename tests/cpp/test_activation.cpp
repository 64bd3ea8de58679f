// C++ tests of the archext activation API (csrc/include/archext/activation.h) on the CPU, against
// a plain scalar double-precision reference written here (std::erf, std::tanh, std::exp). The
// same small self-contained harness as test_norm.cpp: every check counts as passed or failed,
// the last line is "N passed, M failed", and the exit status is non-zero on any failure. Built
// as archext_cpp_tests_activation and run by CTest.
//
// Each CPU kernel ISA this machine supports (default, avx2, avx512) is run in turn.
//
// Tolerances: a result r of an element whose reference is ref passes when
//   |r - ref| <= round * |ref| + acc * scale + abs
// where `round` is the output dtype's rounding (half an ulp, relative), `acc` a few float32 ulps
// (the kernels compute in float32) and `scale` the size of the terms the formula adds up for
// that element: (1 + |x|) times the factors it multiplies by (1 + erf(.) cancels for x << 0 in
// PyTorch's GeLU formula, which the kernels follow).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "archext/activation.h"
#include "cpu/isa.h"

namespace {

using at::Tensor;
using Vec = std::vector<double>;

// ---- harness ------------------------------------------------------------------------------

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kDouble: return "float64";
    default: return "?";
  }
}

int g_passed = 0, g_failed = 0;
std::string g_context;                  // the case being run, printed with each failure
std::map<std::string, double> g_worst;  // per kind of comparison: largest error / tolerance

void record(bool ok, const std::string& what, const std::string& detail = "") {
  if (ok) {
    ++g_passed;
    return;
  }
  ++g_failed;
  std::printf("FAIL [%s] %s%s%s\n", g_context.c_str(), what.c_str(), detail.empty() ? "" : ": ",
              detail.c_str());
  std::fflush(stdout);
}

// Runs a case; an unexpected exception is one failure.
void run_case(const std::string& name, const std::function<void()>& body) {
  const std::string saved = g_context;
  g_context = saved.empty() ? name : saved + " " + name;
  try {
    body();
  } catch (const c10::Error& e) {
    record(false, "unexpected c10::Error", e.what_without_backtrace());
  } catch (const std::exception& e) {
    record(false, "unexpected exception", e.what());
  }
  g_context = saved;
}

template <typename... A>
std::string cat(const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}

std::mt19937_64 g_rng(20240612);

int64_t numel_of(at::IntArrayRef shape) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

// Normal(0, std) values, rounded to dtype.
Tensor randn(at::IntArrayRef shape, at::ScalarType dtype, double std = 2.0) {
  std::normal_distribution<double> dist(0.0, std);
  Vec v(static_cast<size_t>(numel_of(shape)));
  for (auto& e : v) e = dist(g_rng);
  return at::from_blob(v.data(), shape, at::kDouble).clone().to(dtype);
}

Vec values(const Tensor& t) {
  const Tensor d = t.to(at::kDouble).contiguous();
  const double* p = d.data_ptr<double>();
  return Vec(p, p + d.numel());
}

double unit_round(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return std::ldexp(1.0, -8);
    case at::kHalf: return std::ldexp(1.0, -11);
    case at::kFloat: return std::ldexp(1.0, -24);
    default: return 0.0;
  }
}

// Half the spacing of the dtype's subnormals: the rounding error of a result that small.
double unit_abs(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return std::ldexp(1.0, -134);
    case at::kHalf: return std::ldexp(1.0, -25);
    case at::kFloat: return std::ldexp(1.0, -150);
    default: return 1e-300;
  }
}

struct Tol {
  double round, acc, abs;
};

// Elementwise results in float32 arithmetic (double for float64), stored in dtype.
Tol elem_tol(at::ScalarType dtype) {
  const double acc = dtype == at::kDouble ? 1e-14 : 8 * std::ldexp(1.0, -24);
  return {unit_round(dtype) * 1.01, acc, unit_abs(dtype) * 1.01};
}

// Checks got (any dtype, any shape) against ref and scale (flattened, row-major).
void expect_close(const std::string& what, const Tensor& got, const Vec& ref, const Vec& scale,
                  Tol tol) {
  if (!got.defined()) return record(false, what, "undefined tensor");
  if (got.numel() != static_cast<int64_t>(ref.size())) {
    return record(false, what, cat("numel ", got.numel(), ", expected ", ref.size()));
  }
  const Vec g = values(got);
  double worst = 0.0;
  int64_t worst_i = -1;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double allowed = tol.round * std::abs(ref[i]) + tol.acc * scale[i] + tol.abs;
    const double err = std::abs(g[i] - ref[i]);
    const double ratio = std::isnan(err) ? INFINITY
                         : err == 0.0     ? 0.0
                         : allowed > 0.0  ? err / allowed
                                          : INFINITY;
    if (ratio > worst || worst_i < 0) {
      worst = ratio;
      worst_i = static_cast<int64_t>(i);
    }
  }
  double& w = g_worst[what + " " + dtype_name(got.scalar_type())];
  w = std::max(w, worst);
  if (worst <= 1.0) return record(true, what);
  const size_t i = static_cast<size_t>(worst_i);
  record(false, what,
         cat("element ", i, " is ", g[i], ", expected ", ref[i], " (error ",
             std::abs(g[i] - ref[i]), ", ", worst, "x the tolerance)"));
}

void expect_shape(const std::string& what, const Tensor& t, at::IntArrayRef shape,
                  at::ScalarType dtype) {
  const bool ok = t.defined() && t.sizes() == shape && t.scalar_type() == dtype;
  record(ok, what + " shape/dtype",
         ok ? "" : cat(t.defined() ? cat(t.sizes(), " ", t.scalar_type()) : "undefined",
                       ", expected ", shape, " ", dtype));
}

void expect_equal(const std::string& what, const Tensor& a, const Tensor& b) {
  const bool ok = a.defined() && b.defined() && a.sizes() == b.sizes() &&
                  a.scalar_type() == b.scalar_type() && at::equal(a, b);
  record(ok, what, ok ? "" : "differs");
}

// ---- reference ------------------------------------------------------------------------------

const std::vector<std::string> kActs = {"relu", "gelu", "gelu_tanh", "silu"};

// act(x) and act'(x) in double, as the formulas read (PyTorch's).
void ref_act(const std::string& act, double x, double& y, double& dy) {
  if (act == "relu") {
    y = x < 0 ? 0.0 : x;
    dy = x <= 0 ? 0.0 : 1.0;
  } else if (act == "gelu") {
    const double cdf = 0.5 * (1 + std::erf(x * M_SQRT1_2));
    y = x * cdf;
    dy = cdf + x * std::exp(-0.5 * x * x) * M_2_SQRTPI * M_SQRT1_2 * 0.5;
  } else if (act == "gelu_tanh") {
    const double b = M_SQRT2 * M_2_SQRTPI * 0.5, k = 0.044715;
    const double t = std::tanh(b * (x + k * x * x * x));
    y = 0.5 * x * (1 + t);
    dy = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * b * (1 + 3 * k * x * x);
  } else {
    const double s = 1 / (1 + std::exp(-x));
    y = x * s;
    dy = s * (1 + x * (1 - s));
  }
}

// ---- one configuration ----------------------------------------------------------------------

enum class Kind { kGlu, kPackedGateFirst, kPackedGateSecond, kAct };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kGlu: return "glu";
    case Kind::kPackedGateFirst: return "packed(gate first)";
    case Kind::kPackedGateSecond: return "packed(gate second)";
    case Kind::kAct: return "act";
  }
  return "?";
}

void run_config(Kind kind, const std::string& act, at::ScalarType dtype,
                std::vector<int64_t> lead, int64_t n, bool noncontiguous) {
  std::vector<int64_t> shape = lead;
  shape.push_back(n);
  const bool packed = kind == Kind::kPackedGateFirst || kind == Kind::kPackedGateSecond;
  const bool gate_first = kind == Kind::kPackedGateFirst;
  const bool gated = kind != Kind::kAct;

  // Inputs: gate (or x) and up; the packed x = [..., 2n] holds both.
  Tensor gate, up, xpacked;
  if (packed) {
    std::vector<int64_t> pshape = lead;
    pshape.push_back(2 * n);
    xpacked = randn(pshape, dtype);
    gate = xpacked.narrow(-1, gate_first ? 0 : n, n);
    up = xpacked.narrow(-1, gate_first ? n : 0, n);
  } else if (noncontiguous) {
    // [n, rows] tensors, transposed: strides (1, rows).
    TORCH_CHECK(lead.size() == 1);
    gate = randn({n, lead[0]}, dtype).t();
    up = gated ? randn({n, lead[0]}, dtype).t() : Tensor();
  } else {
    gate = randn(shape, dtype);
    up = gated ? randn(shape, dtype) : Tensor();
  }
  const Tensor dy = randn(shape, dtype, 1.0);
  const Vec xv = values(gate), uv = gated ? values(up) : Vec(), dv = values(dy);

  // Reference: y, dgate (dx), dup and their scales.
  const size_t count = xv.size();
  Vec y(count), y_s(count), dx(count), dx_s(count), du(count), du_s(count);
  for (size_t i = 0; i < count; ++i) {
    double a, da;
    ref_act(act, xv[i], a, da);
    const double u = gated ? uv[i] : 1.0;
    const double mag = 1 + std::abs(xv[i]);
    y[i] = a * u;
    y_s[i] = mag * std::abs(u);
    dx[i] = dv[i] * u * da;
    dx_s[i] = mag * std::abs(dv[i] * u);
    du[i] = dv[i] * a;
    du_s[i] = mag * std::abs(dv[i]);
  }
  const Tol tol = elem_tol(dtype);

  // Forward, allocating API.
  Tensor out;
  if (packed) {
    out = archext::glu_packed_fwd(xpacked, act, gate_first);
  } else if (gated) {
    out = archext::glu_fwd(gate, up, act);
  } else {
    out = archext::act_fwd(gate, act);
  }
  expect_shape("fwd y", out, shape, dtype);
  record(out.is_contiguous(), "fwd y is contiguous");
  expect_close("fwd y", out, y, y_s, tol);

  // Forward, _out API: bitwise equal to the allocating op (the same kernel).
  {
    Tensor yo = at::full(shape, 7.0, gate.options());
    const void* yp = yo.data_ptr();
    if (packed) {
      archext::glu_packed_fwd_out(yo, xpacked, act, gate_first);
    } else if (gated) {
      archext::glu_fwd_out(yo, gate, up, act);
    } else {
      archext::act_fwd_out(yo, gate, act);
    }
    record(yo.data_ptr() == yp, "fwd_out writes into the caller's y");
    expect_equal("fwd_out y", yo, out);
  }
  // The packed halves as two tensors (views, and contiguous copies): bitwise the same.
  if (packed) {
    expect_equal("packed == glu of the views", archext::glu_fwd(gate, up, act), out);
    expect_equal("packed == glu of contiguous halves",
                 archext::glu_fwd(gate.contiguous(), up.contiguous(), act), out);
  }

  // Backward.
  if (packed) {
    const Tensor gx = archext::glu_packed_bwd(dy, xpacked, act, gate_first);
    expect_shape("bwd grad_x", gx, xpacked.sizes(), dtype);
    const Tensor dg = gx.narrow(-1, gate_first ? 0 : n, n), dupt = gx.narrow(-1, gate_first ? n : 0, n);
    expect_close("bwd grad_gate", dg, dx, dx_s, tol);
    expect_close("bwd grad_up", dupt, du, du_s, tol);
    auto [g2, u2] = archext::glu_bwd(dy, gate, up, act);
    expect_equal("packed bwd == glu bwd (gate)", g2, dg.contiguous());
    expect_equal("packed bwd == glu bwd (up)", u2, dupt.contiguous());
  } else if (gated) {
    auto [dg, dupt] = archext::glu_bwd(dy, gate, up, act);
    expect_shape("bwd grad_gate", dg, shape, dtype);
    expect_shape("bwd grad_up", dupt, shape, dtype);
    expect_close("bwd grad_gate", dg, dx, dx_s, tol);
    expect_close("bwd grad_up", dupt, du, du_s, tol);
    Tensor go = at::empty(shape, gate.options()), uo = at::empty(shape, gate.options());
    archext::glu_bwd_out(go, uo, dy, gate, up, act);
    expect_equal("bwd_out grad_gate", go, dg);
    expect_equal("bwd_out grad_up", uo, dupt);
  } else {
    const Tensor g = archext::act_bwd(dy, gate, act);
    expect_shape("bwd grad_x", g, shape, dtype);
    expect_close("bwd grad_x", g, dx, dx_s, tol);
  }
}

// Zero elements: every op returns empty outputs of the right shapes.
void run_empty(at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype);
  for (const std::vector<int64_t>& shape : {std::vector<int64_t>{0, 16}, {3, 0}, {2, 0, 8}}) {
    const Tensor x = at::empty(shape, opts);
    expect_shape("glu_fwd", archext::glu_fwd(x, x, "silu"), shape, dtype);
    auto [dg, du] = archext::glu_bwd(x, x, x, "gelu");
    expect_shape("glu_bwd grad_gate", dg, shape, dtype);
    expect_shape("glu_bwd grad_up", du, shape, dtype);
    expect_shape("act_fwd", archext::act_fwd(x, "relu"), shape, dtype);
    expect_shape("act_bwd", archext::act_bwd(x, x, "gelu_tanh"), shape, dtype);
    std::vector<int64_t> half = shape;
    half.back() /= 2;
    if (shape.back() % 2 == 0) {
      expect_shape("glu_packed_fwd", archext::glu_packed_fwd(x, "silu"), half, dtype);
      const Tensor dyh = at::empty(half, opts);
      expect_shape("glu_packed_bwd", archext::glu_packed_bwd(dyh, x, "silu"), shape, dtype);
    }
  }
}

// ---- bad input ----------------------------------------------------------------------------

// True when `word` occurs in `msg` as a whole word (so "x" is not found in "expected").
bool names(const std::string& msg, const std::string& word) {
  auto ident = [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_'; };
  for (size_t pos = msg.find(word); pos != std::string::npos; pos = msg.find(word, pos + 1)) {
    const bool start = pos == 0 || !ident(msg[pos - 1]);
    const bool end = pos + word.size() == msg.size() || !ident(msg[pos + word.size()]);
    if (start && end) return true;
  }
  return false;
}

// fn must throw a c10::Error whose message names `arg`.
void expect_error(const std::string& what, const std::string& arg,
                  const std::function<void()>& fn) {
  const std::string label = what + " -> error naming '" + arg + "'";
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    return record(names(msg, arg), label, cat("message does not name it: ", msg));
  } catch (const std::exception& e) {
    return record(false, label, cat("threw a non-c10::Error: ", e.what()));
  }
  record(false, label, "did not throw");
}

void run_bad_input() {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const Tensor x = randn({4, 16}, at::kFloat), y = at::empty({4, 16}, f32);

  expect_error("glu_fwd, unknown activation", "activation",
               [&] { archext::glu_fwd(x, x, "swiglu"); });
  expect_error("act_bwd, unknown activation", "activation",
               [&] { archext::act_bwd(x, x, "GELU"); });
  expect_error("glu_fwd, up of another shape", "up",
               [&] { archext::glu_fwd(x, randn({4, 15}, at::kFloat), "silu"); });
  expect_error("glu_fwd, up of another dtype", "up",
               [&] { archext::glu_fwd(x, randn({4, 16}, at::kBFloat16), "silu"); });
  expect_error("glu_fwd, int32 gate", "gate",
               [&] { archext::glu_fwd(at::ones({4, 16}, at::kInt), x, "silu"); });
  expect_error("glu_bwd, grad_y of another shape", "grad_y",
               [&] { archext::glu_bwd(randn({4, 8}, at::kFloat), x, x, "gelu"); });
  expect_error("glu_packed_fwd, odd last dimension", "x",
               [&] { archext::glu_packed_fwd(randn({4, 15}, at::kFloat), "silu"); });
  expect_error("glu_packed_fwd, 0-dim x", "x",
               [&] { archext::glu_packed_fwd(at::ones({}, f32), "silu"); });
  expect_error("glu_packed_bwd, grad_y of shape [4, 16] for x [4, 16]", "grad_y",
               [&] { archext::glu_packed_bwd(x, x, "silu"); });
  expect_error("act_fwd, int64 x", "x", [&] { archext::act_fwd(at::ones({3}, at::kLong), "relu"); });
  expect_error("act_bwd, grad_y of another dtype", "grad_y",
               [&] { archext::act_bwd(randn({4, 16}, at::kHalf), x, "relu"); });
  expect_error("glu_fwd_out, y of shape [4, 15]", "y", [&] {
    Tensor yy = at::empty({4, 15}, f32);
    archext::glu_fwd_out(yy, x, x, "silu");
  });
  expect_error("glu_fwd_out, non-contiguous y", "y", [&] {
    Tensor yy = at::empty({16, 4}, f32).t();
    archext::glu_fwd_out(yy, x, x, "silu");
  });
  expect_error("glu_packed_fwd_out, y of shape [4, 16] for x [4, 16]", "y", [&] {
    Tensor yy = y;
    archext::glu_packed_fwd_out(yy, x, "silu");
  });
  expect_error("act_fwd_out, bfloat16 y for float32 x", "y", [&] {
    Tensor yy = at::empty({4, 16}, at::kBFloat16);
    archext::act_fwd_out(yy, x, "gelu");
  });
  expect_error("glu_bwd_out, grad_up of another shape", "grad_up", [&] {
    Tensor g = at::empty({4, 16}, f32), u = at::empty({4, 17}, f32);
    archext::glu_bwd_out(g, u, x, x, x, "gelu");
  });
}

}  // namespace

int main() {
  namespace cpu = archext::cpu;
  const cpu::Isa best = cpu::best_supported_isa();
  std::printf("archext C++ activation tests: torch threads %d, best CPU ISA %s\n",
              at::get_num_threads(), cpu::isa_name(best));

  const std::vector<int64_t> widths = {1, 7, 769, 4096};
  const std::vector<at::ScalarType> dtypes = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};
  const std::vector<Kind> kinds = {Kind::kGlu, Kind::kPackedGateFirst, Kind::kPackedGateSecond,
                                   Kind::kAct};
  for (cpu::Isa isa : {cpu::Isa::kDefault, cpu::Isa::kAvx2, cpu::Isa::kAvx512}) {
    if (static_cast<int>(isa) > static_cast<int>(best)) {
      std::printf("-- ISA %s: not supported here, skipped\n", cpu::isa_name(isa));
      continue;
    }
    cpu::set_cpu_isa(cpu::isa_name(isa));
    const int before_p = g_passed, before_f = g_failed;
    for (at::ScalarType dt : dtypes) {
      for (int64_t n : widths) {
        // 116 rows, or 18 of width 4096: more than one parallel task at both.
        const std::vector<int64_t> lead =
            n >= 4096 ? std::vector<int64_t>{2, 9} : std::vector<int64_t>{4, 29};
        for (Kind kind : kinds) {
          for (const std::string& act : kActs) {
            run_case(cat("isa=", cpu::isa_name(isa), " ", dtype_name(dt), " n=", n, " ",
                         kind_name(kind), " ", act),
                     [&] { run_config(kind, act, dt, lead, n, false); });
          }
        }
        // Non-contiguous inputs (the allocating ops take any strides).
        for (Kind kind : {Kind::kGlu, Kind::kAct}) {
          run_case(cat("isa=", cpu::isa_name(isa), " ", dtype_name(dt), " n=", n, " ",
                       kind_name(kind), " non-contiguous"),
                   [&] { run_config(kind, "gelu", dt, {37}, n, true); });
        }
      }
      run_case(cat("isa=", cpu::isa_name(isa), " ", dtype_name(dt), " empty"),
               [&] { run_empty(dt); });
    }
    std::printf("-- ISA %s: %d passed, %d failed\n", cpu::isa_name(isa), g_passed - before_p,
                g_failed - before_f);
  }
  cpu::set_cpu_isa("best");

  const int before_p = g_passed, before_f = g_failed;
  run_case("bad input", run_bad_input);
  std::printf("-- bad input: %d passed, %d failed\n", g_passed - before_p, g_failed - before_f);

  std::printf("-- largest error / tolerance of each comparison (1 = at the tolerance):\n");
  for (const auto& [what, worst] : g_worst) std::printf("     %-32s %.3g\n", what.c_str(), worst);
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
