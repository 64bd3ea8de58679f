// C++ tests of the archext RoPE API (csrc/include/archext/rope.h) on the CPU, against a scalar
// double-precision rotation written here, on each CPU kernel ISA this machine supports (the
// harness is harness.h). Built as archext_cpp_tests_rope, run by CTest.
#include "archext/rope.h"
#include "harness.h"

namespace {

using namespace archext_test;

// The rotation of one head vector in double, from the same float32 cache.
at::Tensor reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& pos, bool interleaved) {
  at::Tensor xd = x.to(at::kDouble).contiguous();
  at::Tensor y = xd.clone();
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3), half = cos.size(1);
  auto X = xd.accessor<double, 4>();
  auto Y = y.accessor<double, 4>();
  auto C = cos.accessor<float, 2>();
  auto Sn = sin.accessor<float, 2>();
  auto P = pos.accessor<int64_t, 1>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const int64_t ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
          const double c = C[P[s]][i], sn = Sn[P[s]][i];
          const double a = X[b][s][h][ia], bb = X[b][s][h][ib];
          Y[b][s][h][ia] = a * c - bb * sn;
          Y[b][s][h][ib] = bb * c + a * sn;
        }
  (void)D;
  return y;
}

void run_all(const char* isa) {
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const double tol = dt == at::kFloat ? 1e-5 : (dt == at::kHalf ? 4e-3 : 3e-2);
    for (int64_t d : {8, 64, 80, 128}) {
      for (int64_t rot : {d, d / 2}) {
        for (bool il : {false, true}) {
          auto [cos, sin] = archext::rope_cache(rot, 64);
          at::Tensor q = at::randn({2, 5, 4, d}).to(dt), k = at::randn({2, 5, 2, d}).to(dt);
          at::Tensor pos = at::arange(5, at::kLong) + 7;
          auto [qo, ko] = archext::rope_fwd(q, k, cos, sin, pos, il);
          const std::string tag = std::string(isa) + " " + c10::toString(dt) + " d=" +
                                  std::to_string(d) + " rot=" + std::to_string(rot) +
                                  (il ? " interleaved" : " half");
          record(max_err(qo, reference(q, cos, sin, pos, il)) <= tol * 4, tag + " q");
          record(max_err(ko, reference(k, cos, sin, pos, il)) <= tol * 4, tag + " k");
          // The backward is the inverse rotation: it undoes the forward (float32 only, exact
          // enough to compare).
          if (dt == at::kFloat) {
            auto [qb, kb] = archext::rope_bwd(qo, ko, cos, sin, pos, il);
            record(max_err(qb, q) <= 1e-5 && max_err(kb, k) <= 1e-5, tag + " bwd(fwd(x)) == x");
          }
          at::Tensor qi = q.clone(), ki = k.clone();
          archext::rope_fwd_(qi, ki, cos, sin, pos, il);
          record(at::equal(qi, qo) && at::equal(ki, ko), tag + " in place == out of place");
        }
      }
    }
  }
}

}  // namespace

int main() {
  for_each_isa(run_all);
  expect_error("int32 positions", "positions of dtype Long", [] {
    auto [cos, sin] = archext::rope_cache(16, 8);
    at::Tensor q = at::randn({1, 3, 2, 16});
    archext::rope_fwd(q, q, cos, sin, at::arange(3, at::kInt), false);
  });
  return finish();
}
