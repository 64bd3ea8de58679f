// The small self-contained harness of the C++ tests (no gtest): every check counts as passed or
// failed, a failure prints the case it belongs to, finish() prints "N passed, M failed" as the
// last line and returns the exit status (non-zero on any failure). Header-only: each test is one
// executable, built by CMakeLists.txt and run by CTest.
//
// Tolerances (expect_close): a result r of an element whose reference is ref passes when
//   |r - ref| <= round * |ref| + acc * scale + abs
// where `round` is the output dtype's rounding (half an ulp, relative), `acc` a multiple of the
// float32 arithmetic's precision, and `scale` the magnitude of the terms the kernel combines to
// produce that element (so cancellation is allowed for, not hidden by a loose global tolerance).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/isa.h"

namespace archext_test {

using at::Tensor;
using Vec = std::vector<double>;

inline int g_passed = 0, g_failed = 0;
inline std::string g_context;                  // the case being run, printed with each failure
inline std::map<std::string, double> g_worst;  // per kind of comparison: largest error / tolerance

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kDouble: return "float64";
    default: return "?";
  }
}

template <typename... A>
std::string cat(const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}

inline void record(bool ok, const std::string& what, const std::string& detail = "") {
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
inline void run_case(const std::string& name, const std::function<void()>& body) {
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

// Checks that body throws a c10::Error whose message contains `expect`.
inline void expect_error(const std::string& what, const std::string& expect,
                         const std::function<void()>& body) {
  try {
    body();
    record(false, what, "no error raised");
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    record(msg.find(expect) != std::string::npos, what,
           cat("message '", msg, "' lacks '", expect, "'"));
  }
}

// Runs body(isa_name) once per CPU kernel ISA this machine supports, narrowest first, printing
// each ISA's count; the best ISA is selected again afterwards.
inline void for_each_isa(const std::function<void(const char*)>& body) {
  namespace cpu = archext::cpu;
  const cpu::Isa best = cpu::best_supported_isa();
  for (cpu::Isa isa : cpu::kAllIsas) {
    if (static_cast<int>(isa) > static_cast<int>(best)) {
      std::printf("-- ISA %s: not supported here, skipped\n", cpu::isa_name(isa));
      continue;
    }
    cpu::set_cpu_isa(cpu::isa_name(isa));
    const int before_p = g_passed, before_f = g_failed;
    body(cpu::isa_name(isa));
    std::printf("-- ISA %s: %d passed, %d failed\n", cpu::isa_name(isa), g_passed - before_p,
                g_failed - before_f);
  }
  cpu::set_cpu_isa("best");
}

// The closing lines; the exit status of main.
inline int finish() {
  if (!g_worst.empty()) {
    std::printf("-- largest error / tolerance of each comparison (1 = at the tolerance):\n");
    for (const auto& [what, worst] : g_worst) std::printf("     %-32s %.3g\n", what.c_str(), worst);
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

// ---- data ---------------------------------------------------------------------------------

inline std::mt19937_64& rng() {
  static std::mt19937_64 r(20240611);
  return r;
}

inline int64_t numel_of(at::IntArrayRef shape) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

// Normal(mean, std) values drawn in double, rounded to dtype.
inline Tensor normal(at::IntArrayRef shape, at::ScalarType dtype, double mean, double std) {
  std::normal_distribution<double> dist(mean, std);
  Vec v(static_cast<size_t>(numel_of(shape)));
  for (auto& e : v) e = dist(rng());
  return at::from_blob(v.data(), shape, at::kDouble).clone().to(dtype);
}

inline Vec values(const Tensor& t) {
  const Tensor d = t.to(at::kDouble).contiguous();
  const double* p = d.data_ptr<double>();
  return Vec(p, p + d.numel());
}

inline double max_err(const Tensor& a, const Tensor& b) {
  return a.numel() ? (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>() : 0.0;
}

// ---- tolerances and comparisons -------------------------------------------------------------

struct Tol {
  double round;  // output rounding, relative to |ref|
  double acc;    // arithmetic / accumulation error, relative to the element's scale
  double abs;
};

inline double unit_round(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return std::ldexp(1.0, -8);
    case at::kHalf: return std::ldexp(1.0, -11);
    case at::kFloat: return std::ldexp(1.0, -24);
    default: return 0.0;
  }
}

// Half the spacing of the dtype's subnormals: the rounding error of a result that small.
inline double unit_abs(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return std::ldexp(1.0, -134);
    case at::kHalf: return std::ldexp(1.0, -25);
    case at::kFloat: return std::ldexp(1.0, -150);
    default: return 1e-300;
  }
}

// Checks got (any dtype, any shape) against ref and scale (flattened, row-major).
inline void expect_close(const std::string& what, const Tensor& got, const Vec& ref,
                         const Vec& scale, Tol tol) {
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

inline void expect_shape(const std::string& what, const Tensor& t, at::IntArrayRef shape,
                         at::ScalarType dtype) {
  const bool ok = t.defined() && t.sizes() == shape && t.scalar_type() == dtype;
  record(ok, what + " shape/dtype",
         ok ? "" : cat(t.defined() ? cat(t.sizes(), " ", t.scalar_type()) : "undefined",
                       ", expected ", shape, " ", dtype));
}

inline void expect_equal(const std::string& what, const Tensor& a, const Tensor& b) {
  const bool ok = a.defined() && b.defined() && a.sizes() == b.sizes() &&
                  a.scalar_type() == b.scalar_type() && at::equal(a, b);
  record(ok, what, ok ? "" : "differs");
}

}  // namespace archext_test
