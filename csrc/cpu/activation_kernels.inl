// Activation kernels (plain and gated, forward and backward), compiled once per ISA (see
// isa_begin.h). The formulas are those of common/activation_math.h, instantiated here with the
// vectorised exp / erf of cpu/vec.h on float32 lanes (float32, float16 and bfloat16 inputs,
// converted on load and rounded once on store; float16 and bfloat16 with the fast erf, see
// VecMathFast) and with std:: on float64 (scalar).
//
// Every float lane takes the same vector code, the last partial vector of a row included (it
// goes through a zero-padded buffer): an element's result does not depend on where it falls in
// a row, so a tensor, its packed form and any view of it give bitwise the same values.

// Inside the ISA target region on purpose: see the note in common/activation_math.h.
#include "common/activation_math.h"

namespace archext::cpu::ARCHEXT_ISA {

// The math providers of common/activation_math.h.
struct VecMath {
  using V = fvec;
  using S = float;
  static fvec exp(fvec x) { return vexp(x); }
  static fvec erf(fvec x) { return verf(x); }
  static fvec select_le0(fvec x, fvec a, fvec b) { return x <= splat(0.f) ? a : b; }
  static fvec select_lt0(fvec x, fvec a, fvec b) { return x < splat(0.f) ? a : b; }
};

// float16 and bfloat16 results are rounded to 11 or 8 significant bits: their kernels take the
// fast erf of vec.h, whose error (under 4e-7) vanishes in that rounding. The arithmetic is
// float32 either way.
struct VecMathFast : VecMath {
  static fvec erf(fvec x) { return verf_fast(x); }
};

template <typename T>
using VecMathFor = std::conditional_t<std::is_same_v<T, float>, VecMath, VecMathFast>;

struct DoubleMath {
  using V = double;
  using S = double;
  static double exp(double x) { return std::exp(x); }
  static double erf(double x) { return std::erf(x); }
  static double select_le0(double x, double a, double b) { return x <= 0 ? a : b; }
  static double select_lt0(double x, double a, double b) { return x < 0 ? a : b; }
};

// Calls f(row, col, len) on each run [col, col + len) of one row of the elements [begin, end) of
// a [rows, n] grid.
template <typename F>
inline void for_row_runs(int64_t n, int64_t begin, int64_t end, F&& f) {
  int64_t row = begin / n, col = begin - row * n;
  while (begin < end) {
    const int64_t len = std::min(n - col, end - begin);
    f(row, col, len);
    begin += len;
    ++row;
    col = 0;
  }
}

// Runs vf(i) on each full vector [i, i + W) of [0, len), and on the last partial one through
// zero-padded copies: tail(i, k) is given the offset and count of the k < W remaining elements.
template <typename VF, typename TF>
inline void for_vectors(int64_t len, VF&& vf, TF&& tail) {
  int64_t i = 0;
  for (; i + W <= len; i += W) vf(i);
  if (i < len) tail(i, len - i);
}

// A W-element staging buffer for the last partial vector of a run.
template <typename T>
struct Staged {
  T v[W];
  Staged() { std::memset(v, 0, sizeof v); }
  void load(const T* src, int64_t k) { std::memcpy(v, src, k * sizeof(T)); }
  void store(T* dst, int64_t k) const { std::memcpy(dst, v, k * sizeof(T)); }
};

// ---- forward --------------------------------------------------------------------------------
// y = act(x) [* up] on one vector of W elements.
template <Activation A, bool kGated, typename T>
inline void fwd_vec(const T* x, const T* up, T* y) {
  fvec out = act_forward<A, VecMathFor<T>>(Io<T>::load(x));
  if constexpr (kGated) out = out * Io<T>::load(up);
  Io<T>::store(y, out);
}

template <Activation A, bool kGated, typename T>
void fwd_run(const T* x, const T* up, T* y, int64_t len) {
  if constexpr (kVectorized<T>) {
    for_vectors(
        len,
        [&](int64_t i) {
          prefetch_ahead(x + i);
          if constexpr (kGated) prefetch_ahead(up + i);
          fwd_vec<A, kGated>(x + i, kGated ? up + i : nullptr, y + i);
        },
        [&](int64_t i, int64_t k) {
          Staged<T> xs, us, ys;
          xs.load(x + i, k);
          if constexpr (kGated) us.load(up + i, k);
          fwd_vec<A, kGated>(xs.v, us.v, ys.v);
          ys.store(y + i, k);
        });
  } else {
    for (int64_t i = 0; i < len; ++i) {
      double out = act_forward<A, DoubleMath>(static_cast<double>(x[i]));
      if constexpr (kGated) out *= static_cast<double>(up[i]);
      y[i] = static_cast<T>(out);
    }
  }
}

template <Activation A, bool kGated, typename T>
void act_fwd_impl(const ActFwdParams<T>& p, int64_t begin, int64_t end) {
  for_row_runs(p.n, begin, end, [&](int64_t row, int64_t col, int64_t len) {
    fwd_run<A, kGated>(p.x + row * p.x_stride + col,
                       kGated ? p.up + row * p.up_stride + col : nullptr,
                       p.y + row * p.y_stride + col, len);
  });
}

// ---- backward -------------------------------------------------------------------------------
// Plain: dx = dy * act'(x). Gated: dx = dy * up * act'(x), dup = dy * act(x).
template <Activation A, bool kGated, typename T>
inline void bwd_vec(const T* dy, const T* x, const T* up, T* dx, T* dup) {
  const fvec d = Io<T>::load(dy);
  fvec y;
  if constexpr (kGated) {
    Io<T>::store(dx, act_backward<A, VecMathFor<T>>(Io<T>::load(x), d * Io<T>::load(up), y));
    Io<T>::store(dup, d * y);
  } else {
    Io<T>::store(dx, act_backward<A, VecMathFor<T>>(Io<T>::load(x), d, y));
  }
}

template <Activation A, bool kGated, typename T>
void bwd_run(const T* dy, const T* x, const T* up, T* dx, T* dup, int64_t len) {
  if constexpr (kVectorized<T>) {
    for_vectors(
        len,
        [&](int64_t i) {
          prefetch_ahead(dy + i);
          prefetch_ahead(x + i);
          if constexpr (kGated) prefetch_ahead(up + i);
          bwd_vec<A, kGated>(dy + i, x + i, kGated ? up + i : nullptr, dx + i,
                             kGated ? dup + i : nullptr);
        },
        [&](int64_t i, int64_t k) {
          Staged<T> dys, xs, us, dxs, dus;
          dys.load(dy + i, k);
          xs.load(x + i, k);
          if constexpr (kGated) us.load(up + i, k);
          bwd_vec<A, kGated>(dys.v, xs.v, us.v, dxs.v, dus.v);
          dxs.store(dx + i, k);
          if constexpr (kGated) dus.store(dup + i, k);
        });
  } else {
    for (int64_t i = 0; i < len; ++i) {
      const double d = static_cast<double>(dy[i]);
      double y;
      if constexpr (kGated) {
        dx[i] = static_cast<T>(act_backward<A, DoubleMath>(static_cast<double>(x[i]),
                                                           d * static_cast<double>(up[i]), y));
        dup[i] = static_cast<T>(d * y);
      } else {
        dx[i] = static_cast<T>(act_backward<A, DoubleMath>(static_cast<double>(x[i]), d, y));
      }
    }
  }
}

template <Activation A, bool kGated, typename T>
void act_bwd_impl(const ActBwdParams<T>& p, int64_t begin, int64_t end) {
  for_row_runs(p.n, begin, end, [&](int64_t row, int64_t col, int64_t len) {
    bwd_run<A, kGated>(p.dy + row * p.dy_stride + col, p.x + row * p.x_stride + col,
                       kGated ? p.up + row * p.up_stride + col : nullptr,
                       p.dx + row * p.dx_stride + col,
                       kGated ? p.dup + row * p.dup_stride + col : nullptr, len);
  });
}

// ---- entry points of the kernel table ---------------------------------------------------------
// Calls f.template operator()<A, kGated>() for the runtime activation and gating.
template <typename F>
inline void dispatch_act(Activation act, bool gated, F&& f) {
  auto with = [&]<Activation A>() {
    if (gated) {
      f.template operator()<A, true>();
    } else {
      f.template operator()<A, false>();
    }
  };
  switch (act) {
    case Activation::kRelu: with.template operator()<Activation::kRelu>(); break;
    case Activation::kGelu: with.template operator()<Activation::kGelu>(); break;
    case Activation::kGeluTanh: with.template operator()<Activation::kGeluTanh>(); break;
    case Activation::kSilu: with.template operator()<Activation::kSilu>(); break;
  }
}

template <typename T>
void act_fwd_elems(const ActFwdParams<T>& p, int64_t begin, int64_t end) {
  dispatch_act(p.act, p.up != nullptr, [&]<Activation A, bool kGated>() {
    act_fwd_impl<A, kGated>(p, begin, end);
  });
}

template <typename T>
void act_bwd_elems(const ActBwdParams<T>& p, int64_t begin, int64_t end) {
  dispatch_act(p.act, p.up != nullptr, [&]<Activation A, bool kGated>() {
    act_bwd_impl<A, kGated>(p, begin, end);
  });
}

// y[i] = f(x[i]) with the vector exp / erf / tanh and the fast erf (for the tests of cpu/vec.h).
inline void vec_math(const float* x, float* y, int64_t n, VecMathFn fn) {
  auto run = [&](auto f) {
    for_vectors(
        n, [&](int64_t i) { Io<float>::store(y + i, f(Io<float>::load(x + i))); },
        [&](int64_t i, int64_t k) {
          Staged<float> xs, ys;
          xs.load(x + i, k);
          Io<float>::store(ys.v, f(Io<float>::load(xs.v)));
          ys.store(y + i, k);
        });
  };
  switch (fn) {
    case VecMathFn::kExp: run([](fvec v) { return vexp(v); }); break;
    case VecMathFn::kErf: run([](fvec v) { return verf(v); }); break;
    case VecMathFn::kTanh: run([](fvec v) { return vtanh(v); }); break;
    case VecMathFn::kErfFast: run([](fvec v) { return verf_fast(v); }); break;
  }
}

}  // namespace archext::cpu::ARCHEXT_ISA
