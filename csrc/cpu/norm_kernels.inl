// RMSNorm / LayerNorm row kernels (forward, backward), compiled once per ISA (see isa_begin.h).
// The math is in common/norm_math.h; this file only walks rows in W-wide vectors with a scalar
// tail. Accumulation is in acc_t (float, or double for float64 inputs). TS is the type of the
// residual stream (h, the normalised input, dx): T itself, or float32 beside a bfloat16/float16
// T (common/norm_params.h).

namespace archext::cpu::ARCHEXT_ISA {

// Independent vector accumulators per reduction: one would make every pass wait on the
// latency of its add chain (4 cycles per W elements) rather than on loads.
constexpr int kU = 4;

// Runs vf(i, u) on each full vector [i, i + W), u = which of the kU accumulators to use, and
// sf(i) on each remaining element.
template <typename T, typename VF, typename SF>
inline void for_row(int64_t n, VF&& vf, SF&& sf) {
  int64_t i = 0;
  if constexpr (kVectorized<T>) {
    for (; i + kU * W <= n; i += kU * W) {
#pragma GCC unroll 4
      for (int u = 0; u < kU; ++u) vf(i + u * W, u);
    }
    for (; i + W <= n; i += W) vf(i, 0);
  }
  for (; i < n; ++i) sf(i);
}

inline float hsum(const fvec (&acc)[kU]) {
  fvec t = acc[0];
  for (int u = 1; u < kU; ++u) t += acc[u];
  return hsum(t);
}

#define ARCHEXT_ZERO_ACC {splat(0.f), splat(0.f), splat(0.f), splat(0.f)}

// The norm's input when there is no add: x, or (TS != T) the float32 input in `residual`.
template <typename T, typename acc_t, typename TS>
inline const TS* norm_input(const NormFwdParams<T, acc_t, TS>& p) {
  if constexpr (std::is_same_v<T, TS>) {
    return p.x;
  } else {
    return p.residual;
  }
}

template <typename T, typename acc_t, bool kLN, typename TS>
void norm_fwd_rows_impl(const NormFwdParams<T, acc_t, TS>& p, int64_t begin, int64_t end) {
  const int64_t n = p.n;
  const acc_t inv_n = acc_t(1) / acc_t(n);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t off = row * n;  // 64-bit: rows * n may exceed 2^31
    const TS* src = nullptr;

    // Pass 1: the fused residual add (h is rounded to TS before it is normalised, so that the
    // backward, which reads h, sees exactly what the forward normalised) and the row sum
    // (LayerNorm) or sum of squares (RMSNorm).
    fvec vsum[kU] = ARCHEXT_ZERO_ACC, vsq[kU] = ARCHEXT_ZERO_ACC;
    acc_t sum = 0, sq = 0;
    if (p.h != nullptr) {
      const T* xr = p.x + off;
      const TS* res = p.residual + off;
      TS* h = p.h + off;
      for_row<T>(
          n,
          [&](auto i, int u) {
            prefetch_ahead(xr + i);
            prefetch_ahead(res + i);
            Io<TS>::store(h + i, Io<T>::load(xr + i) + Io<TS>::load(res + i));
            const fvec v = Io<TS>::load(h + i);
            if constexpr (kLN) vsum[u] += v;
            vsq[u] += v * v;
          },
          [&](int64_t i) {
            h[i] = static_cast<TS>(static_cast<acc_t>(xr[i]) + static_cast<acc_t>(res[i]));
            const acc_t v = static_cast<acc_t>(h[i]);
            if constexpr (kLN) sum += v;
            sq += v * v;
          });
      src = h;
    } else {
      src = norm_input(p) + off;
      for_row<T>(
          n,
          [&](auto i, int u) {
            prefetch_ahead(src + i);
            const fvec v = Io<TS>::load(src + i);
            if constexpr (kLN) vsum[u] += v;
            vsq[u] += v * v;
          },
          [&](int64_t i) {
            const acc_t v = static_cast<acc_t>(src[i]);
            if constexpr (kLN) sum += v;
            sq += v * v;
          });
    }
    sum += hsum(vsum);
    sq += hsum(vsq);

    acc_t mu = 0;
    if constexpr (kLN) {
      mu = sum * inv_n;
      p.mean[row] = mu;
      if (mu * mu <= acc_t(0.5) * sq * inv_n && sq < std::numeric_limits<acc_t>::infinity()) {
        // sum((x - mu)^2) = sum(x^2) - n mu^2 from pass 1 is exact to a few roundings of
        // sum(x^2) while mu^2 <= E[x^2] / 2 (the difference is then >= sum(x^2) / 2: the
        // subtraction loses at most one bit), the usual case for activations.
        sq -= sum * mu;
      } else {
        // |mu| >~ std (or an inf / NaN): a second pass over the row, in L1 by now, whose
        // sum((x - mu)^2) does not cancel the way E[x^2] - mu^2 does.
        fvec vvar[kU] = ARCHEXT_ZERO_ACC;
        const fvec vmu = splat(static_cast<float>(mu));
        acc_t var = 0;
        for_row<T>(
            n,
            [&](auto i, int u) {
              const fvec d = Io<TS>::load(src + i) - vmu;
              vvar[u] += d * d;
            },
            [&](int64_t i) {
              const acc_t d = static_cast<acc_t>(src[i]) - mu;
              var += d * d;
            });
        sq = var + hsum(vvar);
      }
    }
    const acc_t r = norm_rstd<acc_t>(sq, acc_t(n), p.eps);
    p.rstd[row] = r;

    // Pass 2: y = (x - mu) * r * (w + o) + b, with (w + o) and b already in acc_t.
    T* y = p.y + off;
    const fvec vr = splat(static_cast<float>(r)), vm = splat(static_cast<float>(mu));
    const acc_t* w = p.weight_acc;
    const acc_t* b = p.bias_acc;
    for_row<T>(
        n,
        [&](auto i, int) {
          fvec v = Io<TS>::load(src + i);
          if constexpr (kLN) v -= vm;
          v *= vr;
          if (w) v *= Io<float>::load(w + i);
          if (b) v += Io<float>::load(b + i);
          if (p.stream_y) {
            store_stream(y + i, v);
          } else {
            Io<T>::store(y + i, v);
          }
        },
        [&](int64_t i) {
          const acc_t we = w ? w[i] : acc_t(1);
          const acc_t be = b ? b[i] : acc_t(0);
          y[i] = static_cast<T>(norm_apply<acc_t>(static_cast<acc_t>(src[i]), mu, r, we, be));
        });
  }
  if (p.stream_y) stream_fence();
}

template <typename T, typename acc_t, typename TS = T>
void norm_fwd_rows(const NormFwdParams<T, acc_t, TS>& p, int64_t begin, int64_t end) {
  if (p.layer_norm) {
    norm_fwd_rows_impl<T, acc_t, true, TS>(p, begin, end);
  } else {
    norm_fwd_rows_impl<T, acc_t, false, TS>(p, begin, end);
  }
}

template <typename T, typename acc_t, typename TS = T>
void norm_bwd_rows(const NormBwdParams<T, acc_t, TS>& p, int64_t begin, int64_t end) {
  const int64_t n = p.n;
  const acc_t inv_n = acc_t(1) / acc_t(n);
  const acc_t* w = p.weight_acc;  // weight + offset, in acc_t
  for (int64_t row = begin; row < end; ++row) {
    const int64_t off = row * n;
    const TS* x = p.x + off;
    const T* dy = p.dy + off;
    const acc_t mu = p.mean ? p.mean[row] : acc_t(0);
    const acc_t r = p.rstd[row];
    const fvec vmu = splat(static_cast<float>(mu)), vr = splat(static_cast<float>(r));

    // Pass 1: the row reductions sum(g) and sum(g * xhat), and the weight/bias partial sums.
    fvec vg[kU] = ARCHEXT_ZERO_ACC, vgx[kU] = ARCHEXT_ZERO_ACC;
    acc_t sg = 0, sgx = 0;
    for_row<T>(
        n,
        [&](auto i, int u) {
          prefetch_ahead(dy + i);
          prefetch_ahead(x + i);
          const fvec d = Io<T>::load(dy + i);
          const fvec xh = (Io<TS>::load(x + i) - vmu) * vr;
          const fvec g = w ? d * Io<float>::load(w + i) : d;
          vg[u] += g;
          vgx[u] += g * xh;
          if (p.dweight) Io<float>::store(p.dweight + i, Io<float>::load(p.dweight + i) + d * xh);
          if (p.dbias) Io<float>::store(p.dbias + i, Io<float>::load(p.dbias + i) + d);
        },
        [&](int64_t i) {
          const acc_t d = static_cast<acc_t>(dy[i]);
          const acc_t xh = (static_cast<acc_t>(x[i]) - mu) * r;
          const acc_t g = w ? d * w[i] : d;
          sg += g;
          sgx += g * xh;
          if (p.dweight) p.dweight[i] += d * xh;
          if (p.dbias) p.dbias[i] += d;
        });
    const acc_t mean_g = p.mean ? (sg + hsum(vg)) * inv_n : acc_t(0);
    const acc_t mean_gx = (sgx + hsum(vgx)) * inv_n;

    // Pass 2: dx = r * (g - mean(g) - xhat * mean(g * xhat)) (+ dh).
    TS* dx = p.dx + off;
    const TS* dh = p.dh ? p.dh + off : nullptr;
    const fvec vmg = splat(static_cast<float>(mean_g)), vmgx = splat(static_cast<float>(mean_gx));
    for_row<T>(
        n,
        [&](auto i, int u) {
          const fvec d = Io<T>::load(dy + i);
          const fvec xh = (Io<TS>::load(x + i) - vmu) * vr;
          const fvec g = w ? d * Io<float>::load(w + i) : d;
          fvec out = vr * (g - vmg - xh * vmgx);
          if (dh) {
            prefetch_ahead(dh + i);
            out += Io<TS>::load(dh + i);
          }
          Io<TS>::store(dx + i, out);
        },
        [&](int64_t i) {
          const acc_t d = static_cast<acc_t>(dy[i]);
          const acc_t xh = (static_cast<acc_t>(x[i]) - mu) * r;
          const acc_t g = w ? d * w[i] : d;
          acc_t out = norm_grad_input<acc_t>(g, xh, r, mean_g, mean_gx);
          if (dh) out += static_cast<acc_t>(dh[i]);
          dx[i] = static_cast<TS>(out);
        });
  }
}

}  // namespace archext::cpu::ARCHEXT_ISA
