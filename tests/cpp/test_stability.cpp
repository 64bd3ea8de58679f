// C++ tests of the archext stability API (csrc/include/archext/stability.h) on the CPU, against
// double-precision ATen references computed here, on each CPU kernel ISA this machine supports
// (the harness is harness.h). Built as archext_cpp_tests_stability, run by CTest.
#include "archext/norm.h"
#include "archext/rope.h"
#include "archext/stability.h"
#include "harness.h"

namespace {

using namespace archext_test;

double tol_of(at::ScalarType t) {
  return t == at::kFloat ? 2e-5 : t == at::kDouble ? 1e-10 : t == at::kHalf ? 4e-3 : 3e-2;
}

void test_cross_entropy(at::ScalarType dt, const std::string& isa) {
  for (int64_t V : {1, 7, 769, 5125}) {
    for (double cap : {0.0, 30.0}) {
      const int64_t N = 9;
      at::Tensor x = (at::randn({N, V}, at::kDouble) * 3).to(dt);
      at::Tensor t = at::randint(0, V, {N}, at::kLong);
      t[2] = -100;
      const double eps = 0.1, coef = 1e-3;
      auto [loss, z, lse] = archext::cross_entropy_fwd(x, t, -100, eps, coef, cap);
      // Reference in double.
      at::Tensor xd = x.to(at::kDouble);
      at::Tensor zz = cap > 0 ? cap * at::tanh(xd / cap) : xd;
      at::Tensor l = at::logsumexp(zz, -1);
      at::Tensor valid = t.ne(-100);
      at::Tensor tt = at::where(valid, t, at::zeros_like(t));
      at::Tensor zt = zz.gather(1, tt.unsqueeze(1)).squeeze(1);
      at::Tensor ce = (1 - eps) * (l - zt) + eps * (l - zz.mean(-1)) + coef * l * l;
      at::Tensor want = at::where(valid, ce, at::zeros_like(ce));
      const std::string tag = isa + " " + std::string(c10::toString(dt)) + " V=" + std::to_string(V) +
                              " cap=" + std::to_string(cap);
      record(max_err(loss, want) <= 1e-4 * std::max(1.0, want.abs().max().item<double>()), tag + " loss");
      // Gradient of sum(loss): softmax * (1 + 2 coef lse) - (1 - eps) onehot - eps / V, times
      // the cap's slope; zero on ignored rows.
      at::Tensor g = archext::cross_entropy_bwd(at::ones({N}, loss.options()), std::nullopt, x, t, lse,
                                                -100, eps, coef, cap);
      at::Tensor p = at::softmax(zz, -1);
      at::Tensor onehot = at::zeros_like(p).scatter_(1, tt.unsqueeze(1), 1.0);
      at::Tensor dz = p * (1 + 2 * coef * l.unsqueeze(1)) - (1 - eps) * onehot - eps / V;
      if (cap > 0) dz = dz * (1 - at::tanh(xd / cap).pow(2));
      dz = dz * valid.unsqueeze(1).to(at::kDouble);
      record(max_err(g, dz) <= tol_of(dt) * 2, tag + " grad");
    }
  }
}

void test_softmax(at::ScalarType dt, const std::string& isa) {
  for (int64_t sk : {1, 7, 769}) {
    at::Tensor x = (at::randn({2, 3, 5, sk}, at::kDouble) * 4).to(dt);
    at::Tensor bias = at::randn({3, 1, sk}, at::kDouble).to(dt);
    const double scale = 0.5, cap = 20.0;
    at::Tensor y = archext::softmax_fwd(x, bias, scale, cap, /*causal=*/true, /*window=*/-1);
    at::Tensor s = cap * at::tanh(x.to(at::kDouble) * scale / cap) + bias.to(at::kDouble);
    // Causal, bottom-right aligned: query i sees keys j <= i + sk - 5.
    at::Tensor i = at::arange(5, at::kLong).unsqueeze(1) + (sk - 5);
    at::Tensor j = at::arange(sk, at::kLong).unsqueeze(0);
    at::Tensor masked = j.gt(i);
    at::Tensor want = at::softmax(s.masked_fill(masked, -INFINITY), -1);
    want = at::where(at::isnan(want), at::zeros_like(want), want);  // rows with no key: zeros
    record(max_err(y, want) <= tol_of(dt), isa + " softmax sk=" + std::to_string(sk));
    // Backward of sum(y * w) without a cap: y (w - sum(y w)) * scale.
    at::Tensor w = at::randn_like(y);
    auto [dx, ds] = archext::softmax_bwd(w, y, std::nullopt, scale, 0.0, true);
    at::Tensor yd = y.to(at::kDouble), wd = w.to(at::kDouble);
    at::Tensor dsw = yd * (wd - (yd * wd).sum(-1, true));
    record(max_err(ds, dsw) <= tol_of(dt) * 2 && max_err(dx, dsw * scale) <= tol_of(dt) * 2,
          isa + " softmax bwd sk=" + std::to_string(sk));
  }
  at::Tensor x = (at::randn({3, 1037}, at::kDouble) * 40).to(dt);
  record(max_err(archext::softcap_fwd(x, 30.0), 30.0 * at::tanh(x.to(at::kDouble) / 30.0)) <=
            tol_of(dt) * 30,
        isa + " softcap");
}

void test_qk_norm_rope(at::ScalarType dt, const std::string& isa) {
  auto [cos, sin] = archext::rope_cache(8, 16);
  at::Tensor q = at::randn({2, 5, 4, 16}, at::kDouble).to(dt);
  at::Tensor k = at::randn({2, 5, 2, 16}, at::kDouble).to(dt);
  at::Tensor wq = at::randn({16}, at::kDouble).to(dt), wk = at::randn({16}, at::kDouble).to(dt);
  at::Tensor pos = at::arange(5, at::kLong) + 3;
  auto [qo, ko, rq, rk] = archext::qk_norm_rope_fwd(q, k, wq, wk, cos, sin, pos, 1e-6, 0.0, true, false);
  // The unfused composition in double: rms_norm, then rope.
  at::Tensor qn = std::get<0>(archext::rms_norm_fwd(q.to(at::kDouble), wq.to(at::kDouble), 1e-6, 0.0));
  at::Tensor kn = std::get<0>(archext::rms_norm_fwd(k.to(at::kDouble), wk.to(at::kDouble), 1e-6, 0.0));
  auto [qr, kr] = archext::rope_fwd(qn, kn, cos, sin, pos, false);
  record(max_err(qo, qr) <= tol_of(dt) * 8 && max_err(ko, kr) <= tol_of(dt) * 8,
        isa + " qk_norm_rope " + std::string(c10::toString(dt)));
}

}  // namespace

int main() {
  at::manual_seed(0);
  for_each_isa([](const char* isa) {
    for (auto dt : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
      test_cross_entropy(dt, isa);
      test_softmax(dt, isa);
      test_qk_norm_rope(dt, isa);
    }
  });
  expect_error("out-of-range target", "target[1] = 9 is outside [0, 5)", [] {
    archext::cross_entropy_fwd(at::randn({3, 5}), at::tensor({0, 9, 1}, at::kLong));
  });
  return finish();
}
