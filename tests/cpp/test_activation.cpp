// C++ tests of the archext activation API (csrc/include/archext/activation.h) on the CPU, against
// a plain scalar double-precision reference written here (std::erf, std::tanh, std::exp), on each
// CPU kernel ISA this machine supports. The harness and the tolerance rule are in harness.h: here
// `acc` is a few float32 ulps (the kernels compute in float32) and `scale` the size of the terms
// the formula adds up for that element, (1 + |x|) times the factors it multiplies by (1 + erf(.)
// cancels for x << 0 in PyTorch's GeLU formula, which the kernels follow). Built as
// archext_cpp_tests_activation, run by CTest.
#include <ATen/Parallel.h>

#include <cctype>

#include "archext/activation.h"
#include "harness.h"

namespace {

using namespace archext_test;

Tensor randn(at::IntArrayRef shape, at::ScalarType dtype, double std = 2.0) {
  return normal(shape, dtype, 0.0, std);
}

// Elementwise results in float32 arithmetic (double for float64), stored in dtype.
Tol elem_tol(at::ScalarType dtype) {
  const double acc = dtype == at::kDouble ? 1e-14 : 8 * std::ldexp(1.0, -24);
  return {unit_round(dtype) * 1.01, acc, unit_abs(dtype) * 1.01};
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
  // Overlapping memory: an elementwise op may write over one of its inputs exactly (in place),
  // never in part, and two outputs never share memory.
  expect_error("act_fwd_out, y overlaps x by a row", "y and x share memory in part", [&] {
    const Tensor buf = randn({5, 16}, at::kFloat);
    Tensor yy = buf.narrow(0, 1, 4);
    archext::act_fwd_out(yy, buf.narrow(0, 0, 4), "gelu");
  });
  expect_error("glu_fwd_out, y overlaps up by half a row", "y and up share memory in part", [&] {
    const Tensor buf = randn({4 * 16 + 8}, at::kFloat);
    Tensor yy = buf.narrow(0, 8, 64).view({4, 16});
    archext::glu_fwd_out(yy, x, buf.narrow(0, 0, 64).view({4, 16}), "silu");
  });
  expect_error("glu_packed_fwd_out, y inside x", "y and x share memory", [&] {
    const Tensor xx = randn({4, 32}, at::kFloat);
    Tensor yy = xx.view({-1}).narrow(0, 0, 64).view({4, 16});
    archext::glu_packed_fwd_out(yy, xx, "silu");
  });
  expect_error("glu_bwd_out, grad_gate is grad_up", "grad_gate and grad_up share memory", [&] {
    Tensor g = at::empty({4, 16}, f32), u = g;
    archext::glu_bwd_out(g, u, x, x, x, "gelu");
  });
  {
    // In place, exactly: the result is that of separate outputs.
    const Tensor gate = randn({4, 16}, at::kFloat), up = randn({4, 16}, at::kFloat);
    Tensor want = archext::glu_fwd(gate, up, "silu"), yy = up.clone();
    archext::glu_fwd_out(yy, gate, yy, "silu");
    record(at::equal(yy, want), "glu_fwd_out in place over up gives the out-of-place result", "");
    Tensor xa = gate.clone();
    archext::act_fwd_out(xa, xa, "gelu");
    record(at::equal(xa, archext::act_fwd(gate, "gelu")), "act_fwd_out in place gives the out-of-place result", "");
  }
}

}  // namespace

int main() {
  namespace cpu = archext::cpu;
  std::printf("archext C++ activation tests: torch threads %d, best CPU ISA %s\n",
              at::get_num_threads(), cpu::isa_name(cpu::best_supported_isa()));

  const std::vector<int64_t> widths = {1, 7, 769, 4096};
  const std::vector<at::ScalarType> dtypes = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};
  const std::vector<Kind> kinds = {Kind::kGlu, Kind::kPackedGateFirst, Kind::kPackedGateSecond,
                                   Kind::kAct};
  for_each_isa([&](const char* isa) {
    for (at::ScalarType dt : dtypes) {
      for (int64_t n : widths) {
        // 116 rows, or 18 of width 4096: more than one parallel task at both.
        const std::vector<int64_t> lead =
            n >= 4096 ? std::vector<int64_t>{2, 9} : std::vector<int64_t>{4, 29};
        for (Kind kind : kinds) {
          for (const std::string& act : kActs) {
            run_case(cat("isa=", isa, " ", dtype_name(dt), " n=", n, " ",
                         kind_name(kind), " ", act),
                     [&] { run_config(kind, act, dt, lead, n, false); });
          }
        }
        // Non-contiguous inputs (the allocating ops take any strides).
        for (Kind kind : {Kind::kGlu, Kind::kAct}) {
          run_case(cat("isa=", isa, " ", dtype_name(dt), " n=", n, " ",
                       kind_name(kind), " non-contiguous"),
                   [&] { run_config(kind, "gelu", dt, {37}, n, true); });
        }
      }
      run_case(cat("isa=", isa, " ", dtype_name(dt), " empty"),
               [&] { run_empty(dt); });
    }
  });

  const int before_p = g_passed, before_f = g_failed;
  run_case("bad input", run_bad_input);
  std::printf("-- bad input: %d passed, %d failed\n", g_passed - before_p, g_failed - before_f);

  return finish();
}
