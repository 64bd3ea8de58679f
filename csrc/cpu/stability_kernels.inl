// Stability-family row kernels (cross-entropy, attention softmax, soft-cap), compiled once per
// ISA (see isa_begin.h). The formulas are in common/stability_math.h; here rows are walked in
// W-wide vectors with a scalar tail, in float32 (float64 for float64 inputs, scalar only).

namespace archext::cpu::ARCHEXT_ISA {

// max(m, v), NaN if either is NaN.
template <typename acc_t>
inline acc_t max_nan(acc_t m, acc_t v) { return (v > m || v != v) ? v : m; }

// The largest lane, NaN if any lane is.
inline float hmax(fvec v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = max_nan(m, v[i]);
  return m;
}

// NaN-propagating lane max (a NaN in x stays NaN in the result).
inline fvec vmax_nan(fvec m, fvec x) { return vmax_keep_nan(m, x); }

template <typename acc_t>
inline acc_t scalar_tanh(acc_t x) { return std::tanh(x); }

// ---- cross-entropy -----------------------------------------------------------------------
// Forward, one pass over the logits per row: blocks of kBlock logits are soft-capped into a
// float buffer (the block max and the sum of z taken on the way), the running max and the
// running sum of exp(z - max) are rescaled when the block max exceeds the running one (one
// scalar exp per block), then the block's exp(z - max) are summed from the buffer (L1).
constexpr int64_t kBlock = 2048;

template <typename T>
void ce_fwd_rows(const CrossEntropyParams<T, acc_of<T>>& p, int64_t begin, int64_t end) {
  using acc_t = acc_of<T>;
  const int64_t V = p.vocab;
  const bool cap = p.cap != acc_t(0);
  alignas(64) float buf[kBlock];
  for (int64_t r = begin; r < end; ++r) {
    const int64_t t = p.target[r];
    if (t == p.ignore_index) {
      p.loss[r] = p.z_loss[r] = p.lse[r] = acc_t(0);
      continue;
    }
    const T* x = p.logits + r * p.stride;
    acc_t m = -INFINITY, s = 0, zsum = 0;
    if constexpr (kVectorized<T>) {
      const fvec vcap = splat(p.cap), vinv = splat(p.inv_cap);
      for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
        const int64_t n = std::min(kBlock, V - b0);
        fvec vm = splat(-INFINITY), vz = splat(0.f);
        float bm = -INFINITY, bz = 0.f;
        int64_t i = 0;
        for (; i + W <= n; i += W) {
          prefetch_ahead(x + b0 + i);
          fvec z = Io<T>::load(x + b0 + i);
          if (cap) z = vcap * vtanh(z * vinv);
          std::memcpy(buf + i, &z, sizeof z);
          vm = vmax_nan(vm, z);
          vz += z;
        }
        for (; i < n; ++i) {
          float z = static_cast<float>(x[b0 + i]);
          if (cap) z = p.cap * std::tanh(z * p.inv_cap);
          buf[i] = z;
          bm = max_nan(bm, z);
          bz += z;
        }
        bm = max_nan(bm, hmax(vm));
        zsum += bz + hsum(vz);
        if (bm > m) {
          s *= std::exp(m - bm);
          m = bm;
        } else if (bm != bm) {
          m = bm;
        }
        // m = -inf: every logit so far is -inf, and adds exp(-inf) = 0 (exp(z - m) would be
        // exp(NaN), poisoning the sum of a row whose first block is masked out).
        if (m == -INFINITY) continue;
        const fvec vmm = splat(m);
        fvec vs = splat(0.f);
        float bs = 0.f;
        i = 0;
        for (; i + W <= n; i += W) {
          fvec z;
          std::memcpy(&z, buf + i, sizeof z);
          vs += vexp(z - vmm);
        }
        for (; i < n; ++i) bs += std::exp(buf[i] - m);
        s += bs + hsum(vs);
      }
    } else {
      // float64 (gradcheck): two scalar passes.
      for (int64_t i = 0; i < V; ++i) {
        acc_t z = static_cast<acc_t>(x[i]);
        if (cap) z = p.cap * std::tanh(z * p.inv_cap);
        m = max_nan(m, z);
        zsum += z;
      }
      for (int64_t i = 0; i < V; ++i) {
        acc_t z = static_cast<acc_t>(x[i]);
        if (cap) z = p.cap * std::tanh(z * p.inv_cap);
        s += std::exp(z - m);
      }
    }
    // A row of -inf logits (m = -inf) has no finite lse; keep the NaN/inf that PyTorch gives.
    const acc_t lse = std::isinf(m) ? m : m + std::log(s);
    acc_t zt = static_cast<acc_t>(x[t]);
    if (cap) zt = p.cap * scalar_tanh(zt * p.inv_cap);
    p.lse[r] = lse;
    p.z_loss[r] = p.coef * lse * lse;
    p.loss[r] = ce_row_loss<acc_t>(lse, zt, zsum, static_cast<acc_t>(V), p.eps, p.coef);
  }
}

// Backward, one pass: p_j = exp(z_j - lse) recomputed, grad_j = (p_j a - c0) * slope_j, then
// the target's own element once more with its one-hot term.
template <typename T>
void ce_bwd_rows(const CrossEntropyParams<T, acc_of<T>>& p, int64_t begin, int64_t end) {
  using acc_t = acc_of<T>;
  const int64_t V = p.vocab;
  const bool cap = p.cap != acc_t(0);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t t = p.target[r];
    T* g = p.grad_logits + r * V;
    if (t == p.ignore_index) {
      std::memset(static_cast<void*>(g), 0, sizeof(T) * V);
      continue;
    }
    const T* x = p.logits + r * p.stride;
    const acc_t gl = p.grad_loss[r];
    const acc_t gz = p.grad_z_loss != nullptr ? p.grad_z_loss[r] : acc_t(0);
    const acc_t lse = p.lse[r];
    const acc_t a = gl + acc_t(2) * p.coef * lse * (gl + gz);
    const acc_t c0 = gl * p.eps / static_cast<acc_t>(V);
    auto scalar_grad = [&](int64_t j, acc_t onehot) {
      const acc_t xv = static_cast<acc_t>(x[j]);
      acc_t z = xv, slope = 1;
      if (cap) {
        const acc_t th = scalar_tanh(xv * p.inv_cap);
        z = p.cap * th;
        slope = softcap_slope(th);
      }
      return (std::exp(z - lse) * a - c0 - onehot) * slope;
    };
    int64_t j = 0;
    if constexpr (kVectorized<T>) {
      const fvec vcap = splat(p.cap), vinv = splat(p.inv_cap), vlse = splat(lse), va = splat(a),
                 vc0 = splat(c0), one = splat(1.f);
      for (; j + W <= V; j += W) {
        prefetch_ahead(x + j);
        const fvec xv = Io<T>::load(x + j);
        fvec d;
        if (cap) {
          const fvec th = vtanh(xv * vinv);
          d = (vexp(vcap * th - vlse) * va - vc0) * (one - th * th);
        } else {
          d = vexp(xv - vlse) * va - vc0;
        }
        Io<T>::store(g + j, d);
      }
    }
    for (; j < V; ++j) g[j] = static_cast<T>(scalar_grad(j, 0));
    g[t] = static_cast<T>(scalar_grad(t, gl * (acc_t(1) - p.eps)));
  }
}

// ---- attention softmax ---------------------------------------------------------------------
// Row r of [B, H, Sq, Sk]: s_j = softcap(scale x_j) + bias_j over the visible keys [lo, hi),
// a stable softmax of them (three passes over a float buffer of the row), zeros elsewhere.
// The visible range is walked in whole vectors: the last, partial one is loaded lane by lane
// and its missing lanes set to -inf (exp gives 0), so no element takes a scalar exp or tanh.
//
// With a soft-cap of at most kBoundedCap and no bias, the max pass is skipped: every s lies in
// [-cap, cap], so exp(s) itself is a normal float (exp(-60) = 8.8e-27, exp(60) = 1.1e26) and
// a row of up to 3e12 of them cannot overflow its sum. exp(s) / sum exp(s) then has the same
// relative precision as the max-subtracted form (float32 keeps 24 bits across the normal range;
// s - max is not even rounded), in two passes instead of three. Gemma 2's caps (50 on attention
// logits, 30 on final logits) are in range.
constexpr float kBoundedCap = 60.f;

// The first n lanes of x[0..n) as floats, the others 0 (n < W).
template <typename T>
inline fvec load_partial(const T* x, int64_t n, int64_t stride = 1) {
  fvec v = splat(0.f);
  for (int64_t k = 0; k < n; ++k) v[k] = static_cast<float>(x[k * stride]);
  return v;
}

template <size_t... I>
inline fvec lane_index(std::index_sequence<I...>) { return fvec{static_cast<float>(I)...}; }

template <typename T>
void softmax_fwd_rows(const SoftmaxParams<T, acc_of<T>>& p, int64_t begin, int64_t end) {
  using acc_t = acc_of<T>;
  const int64_t sk = p.sk;
  const bool cap = p.cap != acc_t(0);
  const bool bounded =
      kVectorized<T> && cap && p.bias == nullptr && std::abs(p.cap) <= acc_t(kBoundedCap);
  std::vector<acc_t> buf(static_cast<size_t>(sk + W));
  for (int64_t r = begin; r < end; ++r) {
    const int64_t i = r % p.sq, bh = r / p.sq;
    const T* x = p.x + r * sk;
    T* y = p.y + r * sk;
    const T* bias = nullptr;
    if (p.bias != nullptr) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      bias = p.bias + b * p.bias_stride[0] + h * p.bias_stride[1] + i * p.bias_stride[2];
    }
    const int64_t bs = p.bias_stride[3];
    int64_t lo, hi;
    softmax_key_range(i, p.sq, sk, p.causal, p.window, lo, hi);
    acc_t m = -INFINITY, sum = 0;
    acc_t* e = buf.data();  // e[j - lo] for visible key j
    if constexpr (kVectorized<T>) {
      const fvec vscale = splat(p.scale), vcap = splat(p.cap), vinv = splat(p.inv_cap);
      const fvec lanes = lane_index(std::make_index_sequence<W>{});
      fvec vm = splat(-INFINITY);
      // s for the keys [j, j + W), the last cnt < W of them loaded lane by lane, the missing
      // lanes -inf; kBias: whether a bias is added (a template flag keeps the branch out of the
      // loop).
      auto score = [&](auto kBias, int64_t j, int64_t cnt) {
        // The next row's scores at the same keys: under a causal or window mask each row's
        // visible run is a short stream that the hardware prefetcher only picks up after its
        // first misses; fetched a row ahead, they are in the cache when that row comes.
        if (r + 1 < end) __builtin_prefetch(x + sk + j, 0, 3);
        fvec s = (cnt == W ? Io<T>::load(x + j) : load_partial(x + j, cnt)) * vscale;
        if (cap) s = vcap * vtanh(s * vinv);
        if constexpr (decltype(kBias)::value) {
          s += (cnt == W && bs == 1) ? Io<T>::load(bias + j) : load_partial(bias + j * bs, cnt, bs);
        }
        if (cnt < W) s = lanes < splat(static_cast<float>(cnt)) ? s : splat(-INFINITY);
        std::memcpy(e + (j - lo), &s, sizeof s);
        vm = vmax_nan(vm, s);
      };
      auto scores = [&](auto kBias) {
        int64_t j = lo;
        for (; j + W <= hi; j += W) score(kBias, j, W);
        if (j < hi) score(kBias, j, hi - j);
      };
      if (bounded) {
        fvec vs = splat(0.f);
        int64_t j = lo;
        auto exp_score = [&](int64_t cnt) {
          if (r + 1 < end) __builtin_prefetch(x + sk + j, 0, 3);  // see score()
          fvec s = cnt == W ? Io<T>::load(x + j) : load_partial(x + j, cnt);
          s = vexp(vcap * vtanh(s * vscale * vinv));
          if (cnt < W) s = lanes < splat(static_cast<float>(cnt)) ? s : splat(0.f);
          std::memcpy(e + (j - lo), &s, sizeof s);
          vs += s;
        };
        for (; j + W <= hi; j += W) exp_score(W);
        if (j < hi) exp_score(hi - j);
        sum = hsum(vs);
        m = 0;  // not -inf: every visible key has a positive exp
      } else {
        if (bias != nullptr) {
          scores(std::true_type{});
        } else {
          scores(std::false_type{});
        }
        m = hmax(vm);
        if (m != -INFINITY) {
          const fvec vmm = splat(m);
          fvec vs = splat(0.f);
          for (int64_t j = 0; j < hi - lo; j += W) {
            fvec v;
            std::memcpy(&v, e + j, sizeof v);
            v = vexp(v - vmm);
            std::memcpy(e + j, &v, sizeof v);
            vs += v;
          }
          sum = hsum(vs);
        }
      }
    } else {
      for (int64_t j = lo; j < hi; ++j) {
        acc_t s = static_cast<acc_t>(x[j]) * p.scale;
        if (cap) s = p.cap * std::tanh(s * p.inv_cap);
        if (bias != nullptr) s += static_cast<acc_t>(bias[j * bs]);
        e[j - lo] = s;
        m = max_nan(m, s);
      }
      if (m != -INFINITY) {
        for (int64_t j = 0; j < hi - lo; ++j) {
          e[j] = std::exp(e[j] - m);
          sum += e[j];
        }
      }
    }
    if (m == -INFINITY) hi = lo;  // every visible key is masked by the bias: the row is zeros
    const acc_t inv = hi > lo ? acc_t(1) / sum : acc_t(0);
    // Masked keys: zeros (all-zero bits in every element type).
    std::memset(static_cast<void*>(y), 0, sizeof(T) * lo);
    int64_t j = lo;
    if constexpr (kVectorized<T>) {
      const fvec vinv = splat(inv);
      for (; j + W <= hi; j += W) {
        fvec v;
        std::memcpy(&v, e + (j - lo), sizeof v);
        Io<T>::store(y + j, v * vinv);
      }
    }
    for (; j < hi; ++j) y[j] = static_cast<T>(e[j - lo] * inv);
    std::memset(static_cast<void*>(y + hi), 0, sizeof(T) * (sk - hi));
  }
}

// ds_j = y_j (dy_j - sum_k dy_k y_k); dx_j = ds_j * scale * (1 - tanh^2(scale x_j / cap)).
template <typename T>
void softmax_bwd_rows(const SoftmaxParams<T, acc_of<T>>& p, int64_t begin, int64_t end) {
  using acc_t = acc_of<T>;
  const int64_t sk = p.sk;
  const bool cap = p.cap != acc_t(0);
  for (int64_t r = begin; r < end; ++r) {
    const T* dy = p.dy + r * sk;
    const T* y = p.y_in + r * sk;
    T* dx = p.dx + r * sk;
    T* ds = p.ds != nullptr ? p.ds + r * sk : nullptr;
    acc_t dot = 0;
    int64_t j = 0;
    if constexpr (kVectorized<T>) {
      fvec vd = splat(0.f);
      for (; j + W <= sk; j += W) vd += Io<T>::load(dy + j) * Io<T>::load(y + j);
      dot = hsum(vd);
    }
    for (; j < sk; ++j) dot += static_cast<acc_t>(dy[j]) * static_cast<acc_t>(y[j]);
    const T* x = cap ? p.x + r * sk : nullptr;
    j = 0;
    if constexpr (kVectorized<T>) {
      const fvec vdot = splat(dot), vscale = splat(p.scale), vinv = splat(p.inv_cap),
                 one = splat(1.f);
      for (; j + W <= sk; j += W) {
        const fvec s = Io<T>::load(y + j) * (Io<T>::load(dy + j) - vdot);
        if (ds != nullptr) Io<T>::store(ds + j, s);
        fvec d = s * vscale;
        if (cap) {
          const fvec th = vtanh(Io<T>::load(x + j) * vscale * vinv);
          d = d * (one - th * th);
        }
        Io<T>::store(dx + j, d);
      }
    }
    for (; j < sk; ++j) {
      const acc_t s = static_cast<acc_t>(y[j]) * (static_cast<acc_t>(dy[j]) - dot);
      if (ds != nullptr) ds[j] = static_cast<T>(s);
      acc_t d = s * p.scale;
      if (cap) d *= softcap_slope(std::tanh(static_cast<acc_t>(x[j]) * p.scale * p.inv_cap));
      dx[j] = static_cast<T>(d);
    }
  }
}

// ---- pointwise soft-cap --------------------------------------------------------------------
template <typename T>
void softcap_fwd_elems(const SoftcapParams<T>& p, int64_t begin, int64_t end) {
  int64_t i = begin;
  if constexpr (kVectorized<T>) {
    const fvec vcap = splat(p.cap), vinv = splat(p.inv_cap);
    for (; i + W <= end; i += W) Io<T>::store(p.y + i, vcap * vtanh(Io<T>::load(p.x + i) * vinv));
  }
  for (; i < end; ++i) {
    p.y[i] = static_cast<T>(p.cap * std::tanh(static_cast<acc_of<T>>(p.x[i]) * p.inv_cap));
  }
}

template <typename T>
void softcap_bwd_elems(const SoftcapParams<T>& p, int64_t begin, int64_t end) {
  int64_t i = begin;
  if constexpr (kVectorized<T>) {
    const fvec vinv = splat(p.inv_cap), one = splat(1.f);
    for (; i + W <= end; i += W) {
      const fvec th = vtanh(Io<T>::load(p.x + i) * vinv);
      Io<T>::store(p.y + i, Io<T>::load(p.dy + i) * (one - th * th));
    }
  }
  for (; i < end; ++i) {
    const auto th = std::tanh(static_cast<acc_of<T>>(p.x[i]) * p.inv_cap);
    p.y[i] = static_cast<T>(static_cast<acc_of<T>>(p.dy[i]) * softcap_slope(th));
  }
}

}  // namespace archext::cpu::ARCHEXT_ISA
