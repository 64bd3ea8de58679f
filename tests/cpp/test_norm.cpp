// C++ tests of the archext norm API (csrc/include/archext/norm.h) on the CPU, against a plain
// scalar double-precision reference written here, on each CPU kernel ISA this machine supports.
// The harness and the tolerance rule are in harness.h. Built as archext_cpp_tests, run by CTest.
#include <ATen/Parallel.h>

#include <cctype>

#include "archext/norm.h"
#include "harness.h"

namespace {

using namespace archext_test;
using OptT = c10::optional<at::Tensor>;

Tensor randn(at::IntArrayRef shape, at::ScalarType dtype, double mean = 0.0, double std = 1.0) {
  return normal(shape, dtype, mean, std);
}

Tensor from_values(const Vec& v, at::IntArrayRef shape, at::ScalarType dtype) {
  return at::from_blob(const_cast<double*>(v.data()), shape, at::kDouble).clone().to(dtype);
}

// Rounds a double to dtype the way a float32 computation stored as dtype does.
double round_to(double v, at::ScalarType dtype) {
  const float f = static_cast<float>(v);
  switch (dtype) {
    case at::kFloat: return f;
    case at::kBFloat16: return static_cast<float>(c10::BFloat16(f));
    case at::kHalf: return static_cast<float>(c10::Half(f));
    default: return v;
  }
}

// Elementwise results: float32 arithmetic, stored in dtype.
Tol elem_tol(at::ScalarType dtype) {
  return {unit_round(dtype) * 1.01, 2e-5, unit_abs(dtype) * 1.01};
}
// Per-row statistics (float32 whatever the input dtype).
Tol stat_tol() { return {0.0, 2e-5, 1e-30}; }

// ---- reference ------------------------------------------------------------------------------

struct Problem {
  int64_t rows, n;
  Vec x, residual, weight, bias;  // residual, weight, bias empty when absent
  double eps, weight_offset;
  bool layer_norm;
  at::ScalarType dtype;
};

struct FwdRef {
  Vec y, y_scale, h, mean, mean_scale, rstd, rstd_scale;
};

// The normalised input: x, or h = x + residual rounded to the dtype (as the ops return it).
Vec normalised_input(const Problem& p) {
  if (p.residual.empty()) return p.x;
  Vec h(p.x.size());
  for (size_t i = 0; i < h.size(); ++i) h[i] = round_to(p.x[i] + p.residual[i], p.dtype);
  return h;
}

FwdRef ref_fwd(const Problem& p) {
  FwdRef r;
  const Vec v = normalised_input(p);
  if (!p.residual.empty()) r.h = v;
  r.y.resize(v.size());
  r.y_scale.resize(v.size());
  for (int64_t row = 0; row < p.rows; ++row) {
    const double* xr = v.data() + row * p.n;
    double mu = 0.0, abs_sum = 0.0;
    if (p.layer_norm) {
      for (int64_t i = 0; i < p.n; ++i) mu += xr[i];
      mu /= p.n;
    }
    double ss = 0.0;
    for (int64_t i = 0; i < p.n; ++i) {
      ss += (xr[i] - mu) * (xr[i] - mu);
      abs_sum += std::abs(xr[i]);
    }
    const double rstd = 1.0 / std::sqrt(ss / p.n + p.eps);
    if (p.layer_norm) {
      r.mean.push_back(mu);
      r.mean_scale.push_back(abs_sum / p.n);
    }
    r.rstd.push_back(rstd);
    r.rstd_scale.push_back(rstd);
    for (int64_t i = 0; i < p.n; ++i) {
      const double w = p.weight.empty() ? 1.0 : p.weight[i] + p.weight_offset;
      const double b = p.bias.empty() ? 0.0 : p.bias[i];
      const size_t k = static_cast<size_t>(row * p.n + i);
      r.y[k] = (xr[i] - mu) * rstd * w + b;
      r.y_scale[k] = (std::abs(xr[i]) + std::abs(mu)) * rstd * std::abs(w) + std::abs(b);
    }
  }
  return r;
}

struct BwdRef {
  Vec dx, dx_scale, dw, dw_scale, db, db_scale;
};

// x: the normalised input; mean (empty for RMSNorm) and rstd: the statistics the kernel is given.
BwdRef ref_bwd(const Problem& p, const Vec& x, const Vec& dy, const Vec& mean, const Vec& rstd,
               const Vec& dh) {
  BwdRef r;
  r.dx.resize(x.size());
  r.dx_scale.resize(x.size());
  r.dw.assign(static_cast<size_t>(p.n), 0.0);
  r.dw_scale.assign(static_cast<size_t>(p.n), 0.0);
  r.db.assign(static_cast<size_t>(p.n), 0.0);
  r.db_scale.assign(static_cast<size_t>(p.n), 0.0);
  Vec g(static_cast<size_t>(p.n)), xhat(static_cast<size_t>(p.n)), xmag(static_cast<size_t>(p.n));
  for (int64_t row = 0; row < p.rows; ++row) {
    const size_t off = static_cast<size_t>(row * p.n);
    const double mu = mean.empty() ? 0.0 : mean[row];
    const double rs = rstd[row];
    double sg = 0, sgx = 0, sg_abs = 0, sgx_abs = 0;
    for (int64_t i = 0; i < p.n; ++i) {
      const double w = p.weight.empty() ? 1.0 : p.weight[i] + p.weight_offset;
      g[i] = dy[off + i] * w;
      xhat[i] = (x[off + i] - mu) * rs;
      xmag[i] = (std::abs(x[off + i]) + std::abs(mu)) * rs;
      sg += g[i];
      sgx += g[i] * xhat[i];
      sg_abs += std::abs(g[i]);
      sgx_abs += std::abs(g[i]) * xmag[i];
      r.dw[i] += dy[off + i] * xhat[i];
      r.dw_scale[i] += std::abs(dy[off + i]) * xmag[i];
      r.db[i] += dy[off + i];
      r.db_scale[i] += std::abs(dy[off + i]);
    }
    const double mean_g = mean.empty() ? 0.0 : sg / p.n;
    const double mean_gx = sgx / p.n;
    for (int64_t i = 0; i < p.n; ++i) {
      const double extra = dh.empty() ? 0.0 : dh[off + i];
      r.dx[off + i] = rs * (g[i] - mean_g - xhat[i] * mean_gx) + extra;
      r.dx_scale[off + i] =
          rs * (std::abs(g[i]) + sg_abs / p.n + xmag[i] * (sgx_abs / p.n + std::abs(mean_gx))) +
          std::abs(extra);
    }
  }
  return r;
}

// ---- forward + backward of one configuration ------------------------------------------------

struct Config {
  at::ScalarType dtype;
  std::vector<int64_t> lead;  // leading shape; rows = its product
  int64_t n;
  bool layer_norm, with_residual, with_weight, with_bias;
  double weight_offset;
  double x_mean = 0.0;       // offset of the inputs (LayerNorm: tests the two-pass variance)
  bool noncontiguous = false;  // x handed to the allocating ops as a transposed view
};

void run_config(const Config& c) {
  std::vector<int64_t> shape = c.lead;
  shape.push_back(c.n);
  const int64_t rows = numel_of(c.lead);
  const auto stats_dtype = at::kFloat;
  const double eps = c.layer_norm ? 1e-5 : 1e-6;

  Tensor x;
  if (c.noncontiguous) {
    // A [n, rows] tensor, transposed: x is [rows, n] with strides (1, rows).
    TORCH_CHECK(c.lead.size() == 1);
    x = randn({c.n, rows}, c.dtype, c.x_mean).t();
  } else {
    x = randn(shape, c.dtype, c.x_mean);
  }
  const Tensor residual = c.with_residual ? randn(shape, c.dtype, 0.0, 0.5) : Tensor();
  const Tensor weight = c.with_weight ? randn({c.n}, c.dtype, c.weight_offset ? 0.0 : 1.0, 0.3)
                                      : Tensor();
  const Tensor bias = c.with_bias ? randn({c.n}, c.dtype, 0.0, 0.5) : Tensor();
  const OptT w = c.with_weight ? OptT(weight) : OptT();
  const OptT b = c.with_bias ? OptT(bias) : OptT();

  Problem p{rows,
            c.n,
            values(x),
            c.with_residual ? values(residual) : Vec(),
            c.with_weight ? values(weight) : Vec(),
            c.with_bias ? values(bias) : Vec(),
            eps,
            c.weight_offset,
            c.layer_norm,
            c.dtype};
  const FwdRef ref = ref_fwd(p);
  const Tol et = elem_tol(c.dtype);
  const auto stats_shape = at::IntArrayRef(c.lead);

  // Forward, allocating API.
  Tensor y, h, mean, rstd;
  if (!c.layer_norm && !c.with_residual) {
    std::tie(y, rstd) = archext::rms_norm_fwd(x, w, eps, c.weight_offset);
  } else if (!c.layer_norm) {
    std::tie(y, h, rstd) = archext::add_rms_norm_fwd(x, residual, w, eps, c.weight_offset);
  } else if (!c.with_residual) {
    std::tie(y, mean, rstd) = archext::layer_norm_fwd(x, w, b, eps);
  } else {
    std::tie(y, h, mean, rstd) = archext::add_layer_norm_fwd(x, residual, w, b, eps);
  }
  expect_shape("fwd y", y, shape, c.dtype);
  expect_shape("fwd rstd", rstd, stats_shape, stats_dtype);
  expect_close("fwd y", y, ref.y, ref.y_scale, et);
  expect_close("fwd rstd", rstd, ref.rstd, ref.rstd_scale, stat_tol());
  if (c.with_residual) {
    expect_shape("fwd h", h, shape, c.dtype);
    // h = x + residual rounded once to the dtype: within one rounding of the reference.
    expect_close("fwd h", h, ref.h, ref.h, {unit_round(c.dtype) * 1.01, 0.0, unit_abs(c.dtype)});
  }
  if (c.layer_norm) {
    expect_shape("fwd mean", mean, stats_shape, stats_dtype);
    expect_close("fwd mean", mean, ref.mean, ref.mean_scale, stat_tol());
  }

  // Forward, _out API (no residual+LayerNorm variant there): into preallocated buffers,
  // bitwise equal to the allocating op (the same kernel).
  if (!(c.layer_norm && c.with_residual)) {
    const Tensor xc = x.contiguous();
    Tensor yo = at::full(shape, 7.0, x.options());
    Tensor ro = at::full(stats_shape, 7.0, x.options().dtype(stats_dtype));
    Tensor ho, mo;
    const void* yp = yo.data_ptr();
    if (!c.layer_norm && !c.with_residual) {
      archext::rms_norm_fwd_out(yo, ro, xc, w, eps, c.weight_offset);
    } else if (!c.layer_norm) {
      ho = at::full(shape, 7.0, yo.options());
      archext::add_rms_norm_fwd_out(yo, ho, ro, xc, residual, w, eps, c.weight_offset);
      expect_equal("fwd_out h", ho, h);
    } else {
      mo = at::full(stats_shape, 7.0, ro.options());
      archext::layer_norm_fwd_out(yo, mo, ro, xc, w, b, eps);
      expect_equal("fwd_out mean", mo, mean);
    }
    record(yo.data_ptr() == yp, "fwd_out writes into the caller's y");
    expect_equal("fwd_out y", yo, y);
    expect_equal("fwd_out rstd", ro, rstd);
  }

  // Backward, given the reference statistics rounded to float32 (as a forward would save them).
  const Tensor dy = randn(shape, c.dtype);
  const Tensor dh = c.with_residual ? randn(shape, c.dtype, 0.0, 0.5) : Tensor();
  const OptT dh_opt = c.with_residual ? OptT(dh) : OptT();
  const Tensor xin = c.with_residual ? from_values(ref.h, shape, c.dtype) : x;
  const Tensor rstd_in = from_values(ref.rstd, stats_shape, stats_dtype);
  const Tensor mean_in = c.layer_norm ? from_values(ref.mean, stats_shape, stats_dtype) : Tensor();
  const BwdRef br = ref_bwd(p, values(xin), values(dy), c.layer_norm ? values(mean_in) : Vec(),
                            values(rstd_in), c.with_residual ? values(dh) : Vec());
  const Tol bt = {unit_round(c.dtype) * 1.01, 5e-5, unit_abs(c.dtype) * 1.01};
  Tensor dx, dw, db;
  for (int want : {0, 1}) {  // gradients of the parameters requested or not
    const bool want_dw = want && c.with_weight;
    if (!c.layer_norm) {
      std::tie(dx, dw) = archext::rms_norm_bwd(dy, xin, w, rstd_in, c.weight_offset, dh_opt, want);
    } else {
      std::tie(dx, dw, db) =
          archext::layer_norm_bwd(dy, xin, w, mean_in, rstd_in, dh_opt, want, want);
    }
    const std::string tag = want ? " (with param grads)" : "";
    expect_shape("bwd dx" + tag, dx, shape, c.dtype);
    expect_close("bwd dx" + tag, dx, br.dx, br.dx_scale, bt);
    if (want_dw) {
      expect_shape("bwd dweight", dw, {c.n}, c.dtype);
      expect_close("bwd dweight", dw, br.dw, br.dw_scale, bt);
    } else {
      expect_shape("bwd dweight (not requested)", dw, {0}, c.dtype);
    }
    if (c.layer_norm) {
      if (want) {
        expect_shape("bwd dbias", db, {c.n}, c.dtype);
        expect_close("bwd dbias", db, br.db, br.db_scale, bt);
      } else {
        expect_shape("bwd dbias (not requested)", db, {0}, c.dtype);
      }
    }
  }
}

// Zero rows: every op returns empty outputs of the right shapes; parameter gradients are zeros.
void run_zero_rows(at::ScalarType dtype, std::vector<int64_t> lead, int64_t n) {
  std::vector<int64_t> shape = lead;
  shape.push_back(n);
  const Tensor x = at::empty(shape, at::TensorOptions().dtype(dtype));
  const Tensor w = randn({n}, dtype), b = randn({n}, dtype);
  const Tensor stats = at::empty(lead, at::TensorOptions().dtype(at::kFloat));
  const Vec zeros(static_cast<size_t>(n), 0.0), ones(static_cast<size_t>(n), 1.0);
  {
    auto [y, r] = archext::rms_norm_fwd(x, w, 1e-6, 0.0);
    expect_shape("rms y", y, shape, dtype);
    expect_shape("rms rstd", r, lead, at::kFloat);
  }
  {
    auto [y, h, r] = archext::add_rms_norm_fwd(x, x, w, 1e-6, 1.0);
    expect_shape("add_rms y", y, shape, dtype);
    expect_shape("add_rms h", h, shape, dtype);
    expect_shape("add_rms rstd", r, lead, at::kFloat);
  }
  {
    auto [y, m, r] = archext::layer_norm_fwd(x, w, b, 1e-5);
    expect_shape("ln y", y, shape, dtype);
    expect_shape("ln mean", m, lead, at::kFloat);
    expect_shape("ln rstd", r, lead, at::kFloat);
  }
  {
    auto [y, h, m, r] = archext::add_layer_norm_fwd(x, x, w, b, 1e-5);
    expect_shape("add_ln y", y, shape, dtype);
    expect_shape("add_ln h", h, shape, dtype);
    expect_shape("add_ln mean", m, lead, at::kFloat);
    expect_shape("add_ln rstd", r, lead, at::kFloat);
  }
  {
    Tensor y = at::empty(shape, x.options()), r = at::empty(lead, stats.options());
    archext::rms_norm_fwd_out(y, r, x, w, 1e-6, 0.0);
    Tensor h = at::empty(shape, x.options());
    archext::add_rms_norm_fwd_out(y, h, r, x, x, w, 1e-6, 0.0);
    Tensor m = at::empty(lead, stats.options());
    archext::layer_norm_fwd_out(y, m, r, x, w, b, 1e-5);
    record(true, "_out ops accept zero rows");
  }
  {
    auto [dx, dw] = archext::rms_norm_bwd(x, x, w, stats, 0.0, x, true);
    expect_shape("rms_bwd dx", dx, shape, dtype);
    expect_shape("rms_bwd dweight", dw, {n}, dtype);
    expect_close("rms_bwd dweight is zero", dw, zeros, ones, {0, 0, 0});
  }
  {
    auto [dx, dw, db] = archext::layer_norm_bwd(x, x, w, stats, stats, {}, true, true);
    expect_shape("ln_bwd dx", dx, shape, dtype);
    expect_shape("ln_bwd dweight", dw, {n}, dtype);
    expect_shape("ln_bwd dbias", db, {n}, dtype);
    expect_close("ln_bwd dweight is zero", dw, zeros, ones, {0, 0, 0});
    expect_close("ln_bwd dbias is zero", db, zeros, ones, {0, 0, 0});
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
void expect_error(const std::string& what, const std::string& arg, const std::function<void()>& fn) {
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
  const int64_t n = 16;
  const Tensor x = randn({4, n}, at::kFloat), w = randn({n}, at::kFloat);
  const Tensor b = randn({n}, at::kFloat), st = at::ones({4}, f32);
  const Tensor y = at::empty({4, n}, f32), r = at::empty({4}, f32), m = at::empty({4}, f32);

  expect_error("rms_norm_fwd, weight of shape [n+1]", "weight",
               [&] { archext::rms_norm_fwd(x, randn({n + 1}, at::kFloat)); });
  expect_error("rms_norm_fwd, weight of shape [1, n]", "weight",
               [&] { archext::rms_norm_fwd(x, randn({1, n}, at::kFloat)); });
  expect_error("rms_norm_fwd, float64 weight for float32 x", "weight",
               [&] { archext::rms_norm_fwd(x, randn({n}, at::kDouble)); });
  expect_error("layer_norm_fwd, bias of shape [n-1]", "bias",
               [&] { archext::layer_norm_fwd(x, w, randn({n - 1}, at::kFloat)); });
  expect_error("layer_norm_fwd, weight of shape [n-1]", "weight",
               [&] { archext::layer_norm_fwd(x, randn({n - 1}, at::kFloat), b); });
  expect_error("add_rms_norm_fwd, residual of another shape", "residual",
               [&] { archext::add_rms_norm_fwd(x, randn({4, n + 1}, at::kFloat), w); });
  expect_error("add_layer_norm_fwd, residual of another dtype", "residual",
               [&] { archext::add_layer_norm_fwd(x, randn({4, n}, at::kBFloat16), w, b); });
  expect_error("rms_norm_fwd, int32 x", "x",
               [&] { archext::rms_norm_fwd(at::ones({4, n}, at::kInt), {}); });
  expect_error("rms_norm_fwd, 0-dim x", "x",
               [&] { archext::rms_norm_fwd(at::ones({}, f32), {}); });
  expect_error("rms_norm_fwd, empty last dimension", "x",
               [&] { archext::rms_norm_fwd(at::ones({4, 0}, f32), {}); });
  expect_error("rms_norm_fwd, eps < 0", "eps", [&] { archext::rms_norm_fwd(x, w, -1e-6); });
  expect_error("layer_norm_fwd, eps NaN", "eps",
               [&] { archext::layer_norm_fwd(x, w, b, std::nan("")); });

  expect_error("rms_norm_bwd, rstd of shape [5]", "rstd", [&] {
    archext::rms_norm_bwd(x, x, w, at::ones({5}, f32), 0.0, {}, true);
  });
  expect_error("rms_norm_bwd, bfloat16 rstd", "rstd", [&] {
    archext::rms_norm_bwd(x, x, w, at::ones({4}, at::kBFloat16), 0.0, {}, true);
  });
  expect_error("rms_norm_bwd, grad_y of another shape", "grad_y", [&] {
    archext::rms_norm_bwd(randn({4, n + 1}, at::kFloat), x, w, st, 0.0, {}, true);
  });
  expect_error("rms_norm_bwd, grad_h of another dtype", "grad_h", [&] {
    archext::rms_norm_bwd(x, x, w, st, 0.0, randn({4, n}, at::kDouble), true);
  });
  expect_error("rms_norm_bwd, weight of shape [n+1]", "weight", [&] {
    archext::rms_norm_bwd(x, x, randn({n + 1}, at::kFloat), st, 0.0, {}, true);
  });
  expect_error("layer_norm_bwd, mean of shape [4, 1]", "mean", [&] {
    archext::layer_norm_bwd(x, x, w, at::ones({4, 1}, f32), st, {}, true, true);
  });
  expect_error("layer_norm_bwd, float64 mean", "mean", [&] {
    archext::layer_norm_bwd(x, x, w, at::ones({4}, at::kDouble), st, {}, true, true);
  });
  expect_error("layer_norm_bwd, rstd of shape [3]", "rstd", [&] {
    archext::layer_norm_bwd(x, x, w, st, at::ones({3}, f32), {}, true, true);
  });

  expect_error("rms_norm_fwd_out, y of shape [4, n+1]", "y", [&] {
    Tensor yy = at::empty({4, n + 1}, f32), rr = r;
    archext::rms_norm_fwd_out(yy, rr, x, w);
  });
  expect_error("rms_norm_fwd_out, bfloat16 y for float32 x", "y", [&] {
    Tensor yy = at::empty({4, n}, at::kBFloat16), rr = r;
    archext::rms_norm_fwd_out(yy, rr, x, w);
  });
  expect_error("rms_norm_fwd_out, non-contiguous y", "y", [&] {
    Tensor yy = at::empty({n, 4}, f32).t(), rr = r;
    archext::rms_norm_fwd_out(yy, rr, x, w);
  });
  expect_error("rms_norm_fwd_out, bfloat16 rstd for bfloat16 x", "rstd", [&] {
    const Tensor xb = x.to(at::kBFloat16);
    Tensor yy = at::empty({4, n}, at::kBFloat16), rr = at::empty({4}, at::kBFloat16);
    archext::rms_norm_fwd_out(yy, rr, xb, {});
  });
  expect_error("rms_norm_fwd_out, rstd of shape [4, 1]", "rstd", [&] {
    Tensor yy = y, rr = at::empty({4, 1}, f32);
    archext::rms_norm_fwd_out(yy, rr, x, w);
  });
  expect_error("rms_norm_fwd_out, non-contiguous x", "x", [&] {
    Tensor yy = y, rr = r;
    archext::rms_norm_fwd_out(yy, rr, randn({n, 4}, at::kFloat).t(), w);
  });
  expect_error("rms_norm_fwd_out, weight of shape [n+1]", "weight", [&] {
    Tensor yy = y, rr = r;
    archext::rms_norm_fwd_out(yy, rr, x, randn({n + 1}, at::kFloat));
  });
  expect_error("add_rms_norm_fwd_out, undefined h", "h", [&] {
    Tensor yy = y, hh, rr = r;
    archext::add_rms_norm_fwd_out(yy, hh, rr, x, x, w);
  });
  expect_error("add_rms_norm_fwd_out, h of shape [n, 4]", "h", [&] {
    Tensor yy = y, hh = at::empty({n, 4}, f32), rr = r;
    archext::add_rms_norm_fwd_out(yy, hh, rr, x, x, w);
  });
  expect_error("add_rms_norm_fwd_out, residual of another shape", "residual", [&] {
    Tensor yy = y, hh = at::empty({4, n}, f32), rr = r;
    archext::add_rms_norm_fwd_out(yy, hh, rr, x, randn({2, n}, at::kFloat), w);
  });
  expect_error("layer_norm_fwd_out, undefined mean", "mean", [&] {
    Tensor yy = y, mm, rr = r;
    archext::layer_norm_fwd_out(yy, mm, rr, x, w, b);
  });
  expect_error("layer_norm_fwd_out, mean of shape [5]", "mean", [&] {
    Tensor yy = y, mm = at::empty({5}, f32), rr = r;
    archext::layer_norm_fwd_out(yy, mm, rr, x, w, b);
  });
  expect_error("layer_norm_fwd_out, bias of shape [n+1]", "bias", [&] {
    Tensor yy = y, mm = m, rr = r;
    archext::layer_norm_fwd_out(yy, mm, rr, x, w, randn({n + 1}, at::kFloat));
  });
  // Outputs that share memory with an input or with each other (PyTorch's out= ops refuse
  // partial overlap; a norm re-reads its row, so it refuses the same memory as well).
  expect_error("rms_norm_fwd_out, y is x", "y and x share memory", [&] {
    Tensor xx = x.clone(), yy = xx, rr = r;
    archext::rms_norm_fwd_out(yy, rr, xx, w);
  });
  expect_error("rms_norm_fwd_out, y overlaps x by a row", "y and x share memory in part", [&] {
    const Tensor buf = randn({5, n}, at::kFloat);
    Tensor yy = buf.narrow(0, 1, 4), rr = r;
    archext::rms_norm_fwd_out(yy, rr, buf.narrow(0, 0, 4), w);
  });
  expect_error("add_rms_norm_fwd_out, h is residual", "h and residual share memory", [&] {
    Tensor res = x.clone(), yy = y.clone(), hh = res, rr = r;
    archext::add_rms_norm_fwd_out(yy, hh, rr, x, res, w);
  });
  expect_error("add_rms_norm_fwd_out, y is h", "y and h share memory", [&] {
    Tensor yy = at::empty({4, n}, f32), hh = yy, rr = r;
    archext::add_rms_norm_fwd_out(yy, hh, rr, x, x, w);
  });
  expect_error("layer_norm_fwd_out, mean is rstd", "mean and rstd share memory", [&] {
    Tensor yy = y.clone(), mm = at::empty({4}, f32), rr = mm;
    archext::layer_norm_fwd_out(yy, mm, rr, x, w, b);
  });
  expect_error("layer_norm_fwd_out, y overlaps weight", "y and weight share memory", [&] {
    const Tensor buf = randn({4 * n}, at::kFloat);
    Tensor yy = buf.view({4, n}), mm = m, rr = r;
    archext::layer_norm_fwd_out(yy, mm, rr, x, buf.narrow(0, n, n), b);
  });
}

}  // namespace

int main() {
  namespace cpu = archext::cpu;
  std::printf("archext C++ tests: torch threads %d, best CPU ISA %s\n", at::get_num_threads(),
              cpu::isa_name(cpu::best_supported_isa()));

  const std::vector<int64_t> widths = {1, 7, 769, 4096};
  const std::vector<at::ScalarType> dtypes = {at::kFloat, at::kBFloat16, at::kHalf};
  for_each_isa([&](const char* isa) {
    for (at::ScalarType dt : dtypes) {
      for (int64_t n : widths) {
        for (bool ln : {false, true}) {
          for (bool res : {false, true}) {
            for (bool wt : {false, true}) {
              // RMSNorm: weight_offset 0 and 1 (Gemma); LayerNorm: bias or not.
              for (int k : {0, 1}) {
                // 116 rows, or 18 of width 4096: more than one parallel task at both.
                const std::vector<int64_t> lead =
                    n >= 4096 ? std::vector<int64_t>{2, 9} : std::vector<int64_t>{4, 29};
                Config c{dt, lead, n, ln, res, wt, ln && k == 1, !ln && k == 1 ? 1.0 : 0.0};
                if (ln) c.x_mean = 3.0;
                run_case(cat("isa=", isa, " ", dtype_name(dt), " n=", n,
                             ln ? " layer_norm" : " rms_norm", res ? "+residual" : "",
                             wt ? " weight" : " no-weight", c.with_bias ? " bias" : "",
                             " offset=", c.weight_offset),
                         [&] { run_config(c); });
              }
            }
          }
        }
        // A non-contiguous x (the allocating ops take any strides); LayerNorm of inputs whose
        // mean is large against their spread (the two-pass variance).
        for (bool ln : {false, true}) {
          Config c{dt, {37}, n, ln, false, true, ln, 0.0};
          c.noncontiguous = true;
          run_case(cat("isa=", isa, " ", dtype_name(dt), " n=", n,
                       " non-contiguous x", ln ? " layer_norm" : " rms_norm"),
                   [&] { run_config(c); });
        }
        if (dt == at::kFloat) {
          Config c{dt, {3, 5}, n, true, true, true, true, 0.0};
          c.x_mean = 200.0;
          run_case(cat("isa=", isa, " float32 n=", n, " layer_norm mean 200"),
                   [&] { run_config(c); });
        }
        run_case(cat("isa=", isa, " ", dtype_name(dt), " n=", n, " zero rows"),
                 [&] {
                   run_zero_rows(dt, {0}, n);
                   run_zero_rows(dt, {2, 0}, n);
                 });
      }
    }
  });

  const int before_p = g_passed, before_f = g_failed;
  run_case("bad input", run_bad_input);
  std::printf("-- bad input: %d passed, %d failed\n", g_passed - before_p, g_failed - before_f);

  return finish();
}
