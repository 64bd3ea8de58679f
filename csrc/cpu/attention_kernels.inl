// Tiled attention (FlashAttention-2: Tri Dao, "FlashAttention-2: Faster Attention with Better
// Parallelism and Work Partitioning", 2023), compiled once per ISA (see isa_begin.h). The
// per-element formulas are common/attention_math.h's.
//
// Forward, per (b, h, tile of query rows), over the key tiles inside the causal / window band:
//   S = Q K^T;  s = softcap(scale S) + bias, -inf where masked;  m' = max(m, rowmax s);
//   P = exp(s - m');  l = l e^(m - m') + rowsum P;  O = O e^(m - m') + P V
// and at the end o = O / l, lse = m + log l (a row with no visible key: o = 0, lse = -inf).
// Backward, with P = exp(s - lse) recomputed per tile and delta = rowsum(dO * o):
//   dV = P^T dO;  dP = dO V^T;  dS = P (dP - delta)  (the gradient of s, hence of rel_bias);
//   dX = dS * ds/d(q.k) = dS scale (1 - tanh^2);  dQ = dX K;  dK = dX^T Q.
// Two passes, no atomics: one task per (key tile, b, kv head) writes its rows of dK and dV
// (summed over the group's query heads in a fixed order); one per (query tile, b, h) writes
// its rows of dQ; the relative-bias gradient of (b, h) is summed by the single task that owns
// (b, h) in the dQ pass. Every scratch buffer is one tile; nothing is O(Sq Sk).
// Accumulation in float32 (float64 for float64 inputs).

namespace archext::cpu::ARCHEXT_ISA {

// A 64-byte aligned scratch array.
template <typename acc_t>
struct AttnBuffer {
  acc_t* ptr = nullptr;
  explicit AttnBuffer(int64_t n)
      : ptr(static_cast<acc_t*>(::operator new(sizeof(acc_t) * std::max<int64_t>(n, 1),
                                               std::align_val_t(64)))) {}
  ~AttnBuffer() { ::operator delete(ptr, std::align_val_t(64)); }
  AttnBuffer(const AttnBuffer&) = delete;
  AttnBuffer& operator=(const AttnBuffer&) = delete;
};

template <typename acc_t>
constexpr bool kVecAcc = std::is_same_v<acc_t, float>;
// Lanes of the tile loops: W for float32, 1 for float64 (scalar).
template <typename acc_t>
constexpr int64_t kLanes = kVecAcc<acc_t> ? W : 1;

// max(m, v), NaN if either is (a NaN logit makes its row NaN, not a masked row).
template <typename acc_t>
inline acc_t max_nan(acc_t m, acc_t v) { return (v > m || v != v) ? v : m; }

template <typename acc_t>
struct ScalarTanh {
  acc_t operator()(acc_t x) const { return std::tanh(x); }
};

// ---- tiles ----------------------------------------------------------------------------------
// The products below are small register-blocked loops (ATen's CPU BLAS is not exported to
// extensions). Each sums in a fixed order, so a result never depends on the thread running it.
// Row-major tiles are padded to dp = D rounded up to the lanes (zeros past D); transposed key
// tiles are [D, kAttnKeyTile] with zeros past the tile's keys.

// dst[r * dp + c] = src[r * stride + c] as acc_t, zero for c in [d, dp).
template <typename T, typename acc_t>
inline void load_tile(const T* src, int64_t stride, int64_t rows, int64_t d, int64_t dp, acc_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * stride;
    acc_t* o = dst + r * dp;
    int64_t c = 0;
    if constexpr (kVectorized<T>) {
      for (; c + W <= d; c += W) Io<float>::store(o + c, Io<T>::load(s + c));
    }
    for (; c < d; ++c) o[c] = static_cast<acc_t>(s[c]);
    for (; c < dp; ++c) o[c] = 0;
  }
}

// dst[c * kAttnKeyTile + r] = src[r * stride + c] (c < d) for the rows r < rows, zero for the
// rows in [rows, rows_padded).
template <typename T, typename acc_t>
inline void load_tile_t(const T* src, int64_t stride, int64_t rows, int64_t rows_padded, int64_t d,
                        acc_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * stride;
    for (int64_t c = 0; c < d; ++c) dst[c * kAttnKeyTile + r] = static_cast<acc_t>(s[c]);
  }
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t r = rows; r < rows_padded; ++r) dst[c * kAttnKeyTile + r] = 0;
  }
}

// S[r, c] = sum_{e < d} A[r, e] Bt[e, c] for r < nr and c < ncv (a multiple of the lanes);
// A row-major with row stride lda, Bt and S with row stride kAttnKeyTile.
template <typename acc_t>
inline void mm_abt(int64_t nr, int64_t ncv, int64_t d, const acc_t* A, int64_t lda,
                   const acc_t* Bt, acc_t* S) {
  constexpr int64_t ld = kAttnKeyTile;
  if constexpr (kVecAcc<acc_t>) {
    int64_t r = 0;
    for (; r + 4 <= nr; r += 4) {
      const float *a0 = A + r * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
      int64_t c = 0;
      for (; c + 2 * W <= ncv; c += 2 * W) {
        fvec s00{}, s01{}, s10{}, s11{}, s20{}, s21{}, s30{}, s31{};
        for (int64_t e = 0; e < d; ++e) {
          const fvec b0 = Io<float>::load(Bt + e * ld + c), b1 = Io<float>::load(Bt + e * ld + c + W);
          const fvec x0 = splat(a0[e]), x1 = splat(a1[e]), x2 = splat(a2[e]), x3 = splat(a3[e]);
          s00 = vfma(x0, b0, s00); s01 = vfma(x0, b1, s01);
          s10 = vfma(x1, b0, s10); s11 = vfma(x1, b1, s11);
          s20 = vfma(x2, b0, s20); s21 = vfma(x2, b1, s21);
          s30 = vfma(x3, b0, s30); s31 = vfma(x3, b1, s31);
        }
        float* o = S + r * ld + c;
        Io<float>::store(o, s00); Io<float>::store(o + W, s01);
        Io<float>::store(o + ld, s10); Io<float>::store(o + ld + W, s11);
        Io<float>::store(o + 2 * ld, s20); Io<float>::store(o + 2 * ld + W, s21);
        Io<float>::store(o + 3 * ld, s30); Io<float>::store(o + 3 * ld + W, s31);
      }
      for (; c < ncv; c += W) {
        fvec s0{}, s1{}, s2{}, s3{};
        for (int64_t e = 0; e < d; ++e) {
          const fvec b0 = Io<float>::load(Bt + e * ld + c);
          s0 = vfma(splat(a0[e]), b0, s0);
          s1 = vfma(splat(a1[e]), b0, s1);
          s2 = vfma(splat(a2[e]), b0, s2);
          s3 = vfma(splat(a3[e]), b0, s3);
        }
        float* o = S + r * ld + c;
        Io<float>::store(o, s0); Io<float>::store(o + ld, s1);
        Io<float>::store(o + 2 * ld, s2); Io<float>::store(o + 3 * ld, s3);
      }
    }
    for (; r < nr; ++r) {
      const float* a0 = A + r * lda;
      for (int64_t c = 0; c < ncv; c += W) {
        fvec s0{};
        for (int64_t e = 0; e < d; ++e) s0 = vfma(splat(a0[e]), Io<float>::load(Bt + e * ld + c), s0);
        Io<float>::store(S + r * ld + c, s0);
      }
    }
  } else {
    for (int64_t r = 0; r < nr; ++r) {
      for (int64_t c = 0; c < ncv; ++c) {
        acc_t sum = 0;
        for (int64_t e = 0; e < d; ++e) sum += A[r * lda + e] * Bt[e * ld + c];
        S[r * ld + c] = sum;
      }
    }
  }
}

// C[r, :] += sum_{k < kn} A(r, k) B[k, :] over rows r < m of C (row stride dp, dp a multiple of
// the lanes), B row-major with row stride dp; A(r, k) = A[r * kAttnKeyTile + k] (kTransA false)
// or A[k * kAttnKeyTile + r] (kTransA true).
template <bool kTransA, typename acc_t>
inline void mm_acc(int64_t m, int64_t kn, int64_t dp, const acc_t* A, const acc_t* B, acc_t* C) {
  constexpr int64_t ld = kAttnKeyTile;
  auto a_at = [&](int64_t r, int64_t k) { return kTransA ? A[k * ld + r] : A[r * ld + k]; };
  if constexpr (kVecAcc<acc_t>) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) {
      int64_t c = 0;
      for (; c + 2 * W <= dp; c += 2 * W) {
        float* o = C + r * dp + c;
        fvec s00 = Io<float>::load(o), s01 = Io<float>::load(o + W);
        fvec s10 = Io<float>::load(o + dp), s11 = Io<float>::load(o + dp + W);
        fvec s20 = Io<float>::load(o + 2 * dp), s21 = Io<float>::load(o + 2 * dp + W);
        fvec s30 = Io<float>::load(o + 3 * dp), s31 = Io<float>::load(o + 3 * dp + W);
        for (int64_t k = 0; k < kn; ++k) {
          const fvec b0 = Io<float>::load(B + k * dp + c), b1 = Io<float>::load(B + k * dp + c + W);
          const fvec x0 = splat(a_at(r, k)), x1 = splat(a_at(r + 1, k));
          const fvec x2 = splat(a_at(r + 2, k)), x3 = splat(a_at(r + 3, k));
          s00 = vfma(x0, b0, s00); s01 = vfma(x0, b1, s01);
          s10 = vfma(x1, b0, s10); s11 = vfma(x1, b1, s11);
          s20 = vfma(x2, b0, s20); s21 = vfma(x2, b1, s21);
          s30 = vfma(x3, b0, s30); s31 = vfma(x3, b1, s31);
        }
        Io<float>::store(o, s00); Io<float>::store(o + W, s01);
        Io<float>::store(o + dp, s10); Io<float>::store(o + dp + W, s11);
        Io<float>::store(o + 2 * dp, s20); Io<float>::store(o + 2 * dp + W, s21);
        Io<float>::store(o + 3 * dp, s30); Io<float>::store(o + 3 * dp + W, s31);
      }
      for (; c < dp; c += W) {
        float* o = C + r * dp + c;
        fvec s0 = Io<float>::load(o), s1 = Io<float>::load(o + dp);
        fvec s2 = Io<float>::load(o + 2 * dp), s3 = Io<float>::load(o + 3 * dp);
        for (int64_t k = 0; k < kn; ++k) {
          const fvec b0 = Io<float>::load(B + k * dp + c);
          s0 = vfma(splat(a_at(r, k)), b0, s0);
          s1 = vfma(splat(a_at(r + 1, k)), b0, s1);
          s2 = vfma(splat(a_at(r + 2, k)), b0, s2);
          s3 = vfma(splat(a_at(r + 3, k)), b0, s3);
        }
        Io<float>::store(o, s0); Io<float>::store(o + dp, s1);
        Io<float>::store(o + 2 * dp, s2); Io<float>::store(o + 3 * dp, s3);
      }
    }
    for (; r < m; ++r) {
      for (int64_t c = 0; c < dp; c += W) {
        float* o = C + r * dp + c;
        fvec s0 = Io<float>::load(o);
        for (int64_t k = 0; k < kn; ++k) s0 = vfma(splat(a_at(r, k)), Io<float>::load(B + k * dp + c), s0);
        Io<float>::store(o, s0);
      }
    }
  } else {
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t c = 0; c < dp; ++c) {
        acc_t sum = C[r * dp + c];
        for (int64_t k = 0; k < kn; ++k) sum += a_at(r, k) * B[k * dp + c];
        C[r * dp + c] = sum;
      }
    }
  }
}

// dst[0, n) = src (acc_t) rounded to T.
template <typename T, typename acc_t>
inline void store_row(T* dst, const acc_t* src, int64_t n, acc_t mul) {
  int64_t c = 0;
  if constexpr (kVectorized<T>) {
    const fvec vm = splat(mul);
    for (; c + W <= n; c += W) Io<T>::store(dst + c, Io<float>::load(src + c) * vm);
  }
  for (; c < n; ++c) dst[c] = static_cast<T>(src[c] * mul);
}

// The part of key tile [j0, j0 + nc) that position p sees through the band: [cl, ch).
inline void band_cols(int64_t p, int64_t j0, int64_t nc, bool causal, int64_t window,
                      int64_t& cl, int64_t& ch) {
  int64_t lo = window >= 1 ? p - window + 1 : j0;
  int64_t hi = causal ? p + 1 : j0 + nc;
  lo = std::max(lo, j0) - j0;
  hi = std::min(hi, j0 + nc) - j0;
  cl = std::min(std::max<int64_t>(lo, 0), nc);
  ch = std::max(std::min(hi, nc), cl);
}

// The common state of one row in a key tile.
template <typename acc_t>
struct AttnRow {
  int64_t cl, ch;          // visible band columns
  const acc_t* bias;       // rel_bias[h, j0 - p + Sk - 1 ...] or null
  const int32_t* seg;      // segment_ids[b, j0 ...] or null
  int32_t seg_p;
};

template <typename T, typename acc_t>
inline AttnRow<acc_t> attn_row(const FlashAttnParams<T, acc_t>& p, int64_t b, int64_t h,
                               int64_t pos, int64_t j0, int64_t nc) {
  AttnRow<acc_t> r{};
  band_cols(pos, j0, nc, p.causal, p.window, r.cl, r.ch);
  r.bias = p.rel_bias ? p.rel_bias + h * p.bias_len + attn_bias_index(pos, j0, p.sk) : nullptr;
  r.seg = p.segment_ids ? p.segment_ids + b * p.sk + j0 : nullptr;
  r.seg_p = p.segment_ids ? p.segment_ids[b * p.sk + pos] : 0;
  return r;
}

// Forward row step: s (holding q.k on entry) becomes the logits on the visible columns and
// -inf elsewhere; returns their max.
template <typename T, typename acc_t>
inline acc_t logits_row(const FlashAttnParams<T, acc_t>& p, const AttnRow<acc_t>& r, acc_t* s,
                        int64_t nc) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < r.cl; ++c) s[c] = ninf;
  for (int64_t c = r.ch; c < nc; ++c) s[c] = ninf;
  acc_t mx = ninf;
  int64_t c = r.cl;
  if constexpr (kVecAcc<acc_t>) {
    fvec vmx = splat(ninf);
    const fvec scale = splat(p.scale), cap = splat(p.cap), inv_cap = splat(p.inv_cap);
    const fvec vninf = splat(ninf);
    ivec nan{};  // lanes that met a NaN (the max instruction drops a NaN in its accumulator)
    for (; c + W <= r.ch; c += W) {
      fvec x = Io<float>::load(s + c) * scale;
      if (p.cap != 0) x = cap * vtanh(x * inv_cap);
      if (r.bias) x = x + Io<float>::load(r.bias + c);
      if (r.seg) {
        ivec sv;
        std::memcpy(&sv, r.seg + c, sizeof sv);
        x = sv == r.seg_p ? x : vninf;
      }
      Io<float>::store(s + c, x);
      vmx = vmax_keep_nan(vmx, x);
      nan |= reinterpret_cast<ivec>(x != x);
    }
    for (int k = 0; k < W; ++k) {
      mx = nan[k] ? std::numeric_limits<acc_t>::quiet_NaN() : max_nan(mx, vmx[k]);
    }
  }
  for (; c < r.ch; ++c) {
    acc_t x = attn_logit(s[c], p.scale, p.cap, p.inv_cap, ScalarTanh<acc_t>{});
    if (r.bias) x += r.bias[c];
    if (r.seg && r.seg[c] != r.seg_p) x = ninf;
    s[c] = x;
    mx = max_nan(mx, x);
  }
  return mx;
}

// s = exp(s - m) over [cl, ch) (0 elsewhere, and for masked entries); returns the sum.
template <typename acc_t>
inline acc_t exp_row(acc_t* s, int64_t nc, int64_t cl, int64_t ch, acc_t m) {
  for (int64_t c = 0; c < cl; ++c) s[c] = 0;
  for (int64_t c = ch; c < nc; ++c) s[c] = 0;
  acc_t sum = 0;
  int64_t c = cl;
  if constexpr (kVecAcc<acc_t>) {
    fvec vs = splat(0.f);
    const fvec vm = splat(m);
    for (; c + W <= ch; c += W) {
      const fvec e = vexp(Io<float>::load(s + c) - vm);
      Io<float>::store(s + c, e);
      vs = vs + e;
    }
    sum = hsum(vs);
  }
  for (; c < ch; ++c) {
    const acc_t e = std::exp(s[c] - m);
    s[c] = e;
    sum += e;
  }
  return sum;
}

// Backward row step: from s = q.k and dp = dO . v, s becomes P = exp(logit - lse) and dp
// becomes dX = P (dp - delta) * d logit / d(q.k) (both 0 off the visible columns); with
// `bias_grad`, dS = P (dp - delta) is added to it at the columns' relative offsets.
template <typename T, typename acc_t>
inline void bwd_row(const FlashAttnParams<T, acc_t>& p, const AttnRow<acc_t>& r, acc_t* s,
                    acc_t* dp, int64_t nc, acc_t lse, acc_t delta, acc_t* bias_grad) {
  int64_t cl = r.cl, ch = r.ch;
  if (lse == -std::numeric_limits<acc_t>::infinity()) cl = ch = nc;  // no visible key at all
  for (int64_t c = 0; c < cl; ++c) s[c] = dp[c] = 0;
  for (int64_t c = ch; c < nc; ++c) s[c] = dp[c] = 0;
  int64_t c = cl;
  if constexpr (kVecAcc<acc_t>) {
    const fvec scale = splat(p.scale), cap = splat(p.cap), inv_cap = splat(p.inv_cap);
    const fvec vlse = splat(lse), vdelta = splat(delta), one = splat(1.f), zero = splat(0.f);
    for (; c + W <= ch; c += W) {
      fvec x = Io<float>::load(s + c) * scale;
      fvec slope = scale;
      if (p.cap != 0) {
        x = cap * vtanh(x * inv_cap);
        const fvec t = x * inv_cap;
        slope = scale * (one - t * t);
      }
      if (r.bias) x = x + Io<float>::load(r.bias + c);
      fvec pr = vexp(x - vlse);
      if (r.seg) {
        ivec sv;
        std::memcpy(&sv, r.seg + c, sizeof sv);
        pr = sv == r.seg_p ? pr : zero;
      }
      const fvec ds = pr * (Io<float>::load(dp + c) - vdelta);
      if (bias_grad) Io<float>::store(bias_grad + c, Io<float>::load(bias_grad + c) + ds);
      Io<float>::store(s + c, pr);
      Io<float>::store(dp + c, ds * slope);
    }
  }
  for (; c < ch; ++c) {
    const acc_t capped = attn_logit(s[c], p.scale, p.cap, p.inv_cap, ScalarTanh<acc_t>{});
    const acc_t x = capped + (r.bias ? r.bias[c] : acc_t(0));
    const acc_t pr = (r.seg && r.seg[c] != r.seg_p) ? acc_t(0) : std::exp(x - lse);
    const acc_t ds = pr * (dp[c] - delta);
    if (bias_grad) bias_grad[c] += ds;
    s[c] = pr;
    dp[c] = ds * attn_logit_slope(capped, p.scale, p.cap, p.inv_cap);
  }
}

// Round n up to the lanes.
template <typename acc_t>
inline int64_t lanes_up(int64_t n) {
  return (n + kLanes<acc_t> - 1) / kLanes<acc_t> * kLanes<acc_t>;
}

// The range of document ids over n positions. Two tiles whose ranges are disjoint share no
// document (whatever the ids' order): every pair between them is masked, and the tile pair is
// skipped.
struct SegRange {
  int32_t lo, hi;
};
inline SegRange seg_range(const int32_t* seg, int64_t n) {
  SegRange r{std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min()};
  for (int64_t i = 0; i < n; ++i) {
    r.lo = std::min(r.lo, seg[i]);
    r.hi = std::max(r.hi, seg[i]);
  }
  return r;
}
inline bool seg_disjoint(SegRange a, SegRange b) { return a.hi < b.lo || b.hi < a.lo; }

template <typename T, typename acc_t>
inline SegRange query_segs(const FlashAttnParams<T, acc_t>& p, int64_t b, int64_t i0, int64_t nr) {
  return p.segment_ids ? seg_range(p.segment_ids + b * p.sk + attn_query_pos(i0, p.sq, p.sk), nr)
                       : SegRange{};
}
template <typename T, typename acc_t>
inline SegRange key_segs(const FlashAttnParams<T, acc_t>& p, int64_t b, int64_t j0, int64_t nc) {
  return p.segment_ids ? seg_range(p.segment_ids + b * p.sk + j0, nc) : SegRange{};
}

template <typename T>
void attn_fwd_tasks(const FlashAttnParams<T, acc_of<T>>& p, std::atomic<int64_t>* next,
                    int64_t tasks) {
  using acc_t = acc_of<T>;
  const int64_t D = p.d, Dp = lanes_up<acc_t>(D), BQ = kAttnQueryTile, BK = kAttnKeyTile;
  const int64_t bh_count = p.batch * p.hq, nqt = (p.sq + BQ - 1) / BQ;
  AttnBuffer<acc_t> qbuf(BQ * Dp), ktbuf(D * BK), vbuf(BK * Dp), sbuf(BQ * BK), obuf(BQ * Dp),
      mbuf(BQ), lbuf(BQ);
  acc_t *Q = qbuf.ptr, *Kt = ktbuf.ptr, *V = vbuf.ptr, *S = sbuf.ptr, *O = obuf.ptr;
  acc_t *M = mbuf.ptr, *L = lbuf.ptr;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t t = next->fetch_add(1); t < tasks; t = next->fetch_add(1)) {
    const int64_t qt = nqt - 1 - t / bh_count, bh = t % bh_count;
    const int64_t b = bh / p.hq, h = bh % p.hq, kvh = h / p.group;
    const int64_t i0 = qt * BQ, nr = std::min(BQ, p.sq - i0);
    load_tile(p.q + b * p.q_stride[0] + i0 * p.q_stride[1] + h * p.q_stride[2], p.q_stride[1], nr,
              D, Dp, Q);
    std::fill(O, O + nr * Dp, acc_t(0));
    std::fill(M, M + nr, ninf);
    std::fill(L, L + nr, acc_t(0));
    int64_t klo, khi;
    attn_key_range(i0, i0 + nr, p.sq, p.sk, p.causal, p.window, klo, khi);
    const SegRange qsegs = query_segs(p, b, i0, nr);
    for (int64_t j0 = klo; j0 < khi; j0 += BK) {
      const int64_t nc = std::min(BK, khi - j0), ncv = lanes_up<acc_t>(nc);
      if (p.segment_ids && seg_disjoint(qsegs, key_segs(p, b, j0, nc))) continue;
      load_tile_t(p.k + b * p.k_stride[0] + j0 * p.k_stride[1] + kvh * p.k_stride[2],
                  p.k_stride[1], nc, ncv, D, Kt);
      load_tile(p.v + b * p.v_stride[0] + j0 * p.v_stride[1] + kvh * p.v_stride[2],
                p.v_stride[1], nc, D, Dp, V);
      mm_abt(nr, ncv, D, Q, Dp, Kt, S);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t pos = attn_query_pos(i0 + r, p.sq, p.sk);
        const AttnRow<acc_t> row = attn_row(p, b, h, pos, j0, nc);
        acc_t* s = S + r * BK;
        const acc_t mx = logits_row(p, row, s, nc);
        const acc_t m_new = max_nan(M[r], mx);
        if (m_new == ninf) {  // nothing visible yet
          std::fill(s, s + nc, acc_t(0));
          continue;
        }
        const acc_t sum = exp_row(s, nc, row.cl, row.ch, m_new);
        if (!(M[r] == m_new)) {
          const acc_t alpha = M[r] == ninf ? acc_t(0) : std::exp(M[r] - m_new);
          L[r] *= alpha;
          for (int64_t d = 0; d < Dp; ++d) O[r * Dp + d] *= alpha;
          M[r] = m_new;
        }
        L[r] += sum;
      }
      mm_acc<false>(nr, nc, Dp, S, V, O);  // O += P V
    }
    acc_t* lse = p.lse + (b * p.hq + h) * p.sq + i0;
    for (int64_t r = 0; r < nr; ++r) {
      T* o = p.o + ((b * p.sq + i0 + r) * p.hq + h) * D;
      if (L[r] != 0) {  // 0 only when no key was visible (else the max term adds 1)
        store_row(o, O + r * Dp, D, acc_t(1) / L[r]);
        lse[r] = M[r] + std::log(L[r]);
      } else {
        std::fill(o, o + D, T(0));
        lse[r] = ninf;
      }
    }
  }
}

// The key-tile pass. kFused false: a task is (key tile, b, kv head) and writes grad_k and
// grad_v of its tile. kFused true: a task is (b, kv head), every key tile in turn, and also sums
// grad_q of the group's heads in a scratch [group, Sq, Dp]: dQ += dX K per (query tile, key
// tile), the key tiles in increasing order, as attn_bwd_q_tasks sums them, so both give the same
// bits (the two differ only by exact zeros, the tiles a row does not see).
template <typename T, bool kFused>
void attn_bwd_kv_impl(const FlashAttnParams<T, acc_of<T>>& p, const AttnBwdScratch<acc_of<T>>& x,
                      std::atomic<int64_t>* next, int64_t tasks) {
  using acc_t = acc_of<T>;
  const int64_t D = p.d, Dp = lanes_up<acc_t>(D), BQ = kAttnQueryTile, BK = kAttnKeyTile;
  const int64_t bh_count = p.batch * p.hk, nkt = (p.sk + BK - 1) / BK;
  AttnBuffer<acc_t> qbuf(BQ * Dp), dobuf(BQ * Dp), ktbuf(D * BK), vtbuf(D * BK), sbuf(BQ * BK),
      dpbuf(BQ * BK), dkbuf(BK * Dp), dvbuf(BK * Dp), kbuf(kFused ? BK * Dp : 1),
      dqbuf(kFused ? p.group * p.sq * Dp : 1);
  acc_t *Q = qbuf.ptr, *dO = dobuf.ptr, *Kt = ktbuf.ptr, *Vt = vtbuf.ptr;
  acc_t *S = sbuf.ptr, *dP = dpbuf.ptr, *dK = dkbuf.ptr, *dV = dvbuf.ptr, *K = kbuf.ptr;
  acc_t* dQ = dqbuf.ptr;
  for (int64_t t = next->fetch_add(1); t < tasks; t = next->fetch_add(1)) {
    const int64_t bh = kFused ? t : t % bh_count;
    const int64_t kt_first = kFused ? 0 : t / bh_count, kt_end = kFused ? nkt : kt_first + 1;
    const int64_t b = bh / p.hk, kvh = bh % p.hk;
    if constexpr (kFused) std::fill(dQ, dQ + p.group * p.sq * Dp, acc_t(0));
    for (int64_t kt = kt_first; kt < kt_end; ++kt) {
      const int64_t j0 = kt * BK, nc = std::min(BK, p.sk - j0), ncv = lanes_up<acc_t>(nc);
      const T* kp = p.k + b * p.k_stride[0] + j0 * p.k_stride[1] + kvh * p.k_stride[2];
      load_tile_t(kp, p.k_stride[1], nc, ncv, D, Kt);
      if constexpr (kFused) load_tile(kp, p.k_stride[1], nc, D, Dp, K);
      load_tile_t(p.v + b * p.v_stride[0] + j0 * p.v_stride[1] + kvh * p.v_stride[2],
                  p.v_stride[1], nc, ncv, D, Vt);
      std::fill(dK, dK + nc * Dp, acc_t(0));
      std::fill(dV, dV + nc * Dp, acc_t(0));
      int64_t ilo, ihi;
      attn_query_range(j0, j0 + nc, p.sq, p.sk, p.causal, p.window, ilo, ihi);
      const SegRange ksegs = key_segs(p, b, j0, nc);
      for (int64_t g = 0; g < p.group; ++g) {
        const int64_t h = kvh * p.group + g;
        const acc_t* lse = p.lse_in + (b * p.hq + h) * p.sq;
        const acc_t* delta = x.delta + (b * p.hq + h) * p.sq;
        for (int64_t i0 = ilo; i0 < ihi; i0 += BQ) {
          const int64_t nr = std::min(BQ, ihi - i0);
          if (p.segment_ids && seg_disjoint(query_segs(p, b, i0, nr), ksegs)) continue;
          // Causal: the tile's keys past the last row's position are masked for every row.
          const int64_t ncq = p.causal ? std::min(nc, attn_query_pos(i0 + nr - 1, p.sq, p.sk) + 1 - j0)
                                       : nc;
          const int64_t ncqv = lanes_up<acc_t>(ncq);
          load_tile(p.q + b * p.q_stride[0] + i0 * p.q_stride[1] + h * p.q_stride[2],
                    p.q_stride[1], nr, D, Dp, Q);
          load_tile(p.grad_o + b * p.grad_o_stride[0] + i0 * p.grad_o_stride[1] +
                        h * p.grad_o_stride[2],
                    p.grad_o_stride[1], nr, D, Dp, dO);
          mm_abt(nr, ncqv, D, Q, Dp, Kt, S);
          mm_abt(nr, ncqv, D, dO, Dp, Vt, dP);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t i = i0 + r, pos = attn_query_pos(i, p.sq, p.sk);
            bwd_row(p, attn_row(p, b, h, pos, j0, ncq), S + r * BK, dP + r * BK, ncq, lse[i],
                    delta[i], static_cast<acc_t*>(nullptr));
          }
          mm_acc<true>(ncq, nr, Dp, S, dO, dV);   // dV += P^T dO
          mm_acc<true>(ncq, nr, Dp, dP, Q, dK);   // dK += dX^T Q
          if constexpr (kFused) {
            mm_acc<false>(nr, ncq, Dp, dP, K, dQ + (g * p.sq + i0) * Dp);  // dQ += dX K
          }
        }
      }
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t off = ((b * p.sk + j0 + c) * p.hk + kvh) * D;
        store_row(p.grad_k + off, dK + c * Dp, D, acc_t(1));
        store_row(p.grad_v + off, dV + c * Dp, D, acc_t(1));
      }
    }
    if constexpr (kFused) {
      for (int64_t g = 0; g < p.group; ++g) {
        const int64_t h = kvh * p.group + g;
        for (int64_t i = 0; i < p.sq; ++i) {
          store_row(p.grad_q + ((b * p.sq + i) * p.hq + h) * D, dQ + (g * p.sq + i) * Dp, D,
                    acc_t(1));
        }
      }
    }
  }
}

template <typename T>
void attn_bwd_kv_tasks(const FlashAttnParams<T, acc_of<T>>& p, const AttnBwdScratch<acc_of<T>>& x,
                       std::atomic<int64_t>* next, int64_t tasks) {
  attn_bwd_kv_impl<T, false>(p, x, next, tasks);
}

template <typename T>
void attn_bwd_fused_tasks(const FlashAttnParams<T, acc_of<T>>& p,
                          const AttnBwdScratch<acc_of<T>>& x, std::atomic<int64_t>* next,
                          int64_t tasks) {
  attn_bwd_kv_impl<T, true>(p, x, next, tasks);
}

template <typename T>
void attn_bwd_q_tasks(const FlashAttnParams<T, acc_of<T>>& p, const AttnBwdScratch<acc_of<T>>& x,
                      std::atomic<int64_t>* next, int64_t tasks) {
  using acc_t = acc_of<T>;
  const int64_t D = p.d, Dp = lanes_up<acc_t>(D), BQ = kAttnQueryTile, BK = kAttnKeyTile;
  const int64_t bh_count = p.batch * p.hq, nqt = (p.sq + BQ - 1) / BQ;
  AttnBuffer<acc_t> qbuf(BQ * Dp), dobuf(BQ * Dp), ktbuf(D * BK), vtbuf(D * BK), kbuf(BK * Dp),
      sbuf(BQ * BK), dpbuf(BQ * BK), dqbuf(BQ * Dp);
  acc_t *Q = qbuf.ptr, *dO = dobuf.ptr, *Kt = ktbuf.ptr, *Vt = vtbuf.ptr, *K = kbuf.ptr;
  acc_t *S = sbuf.ptr, *dP = dpbuf.ptr, *dQ = dqbuf.ptr;
  for (int64_t t = next->fetch_add(1); t < tasks; t = next->fetch_add(1)) {
    // With the bias gradient, a task is a whole (b, h): its partial row has one writer.
    const bool whole = x.bias_partial != nullptr;
    const int64_t bh = whole ? t : t % bh_count;
    const int64_t qt_first = whole ? 0 : nqt - 1 - t / bh_count;
    const int64_t qt_end = whole ? nqt : qt_first + 1;
    const int64_t b = bh / p.hq, h = bh % p.hq, kvh = h / p.group;
    const acc_t* lse = p.lse_in + (b * p.hq + h) * p.sq;
    const acc_t* delta = x.delta + (b * p.hq + h) * p.sq;
    acc_t* partial = whole ? x.bias_partial + (b * p.hq + h) * p.bias_len : nullptr;
    for (int64_t qt = qt_first; qt < qt_end; ++qt) {
      const int64_t i0 = qt * BQ, nr = std::min(BQ, p.sq - i0);
      load_tile(p.q + b * p.q_stride[0] + i0 * p.q_stride[1] + h * p.q_stride[2], p.q_stride[1],
                nr, D, Dp, Q);
      load_tile(p.grad_o + b * p.grad_o_stride[0] + i0 * p.grad_o_stride[1] +
                    h * p.grad_o_stride[2],
                p.grad_o_stride[1], nr, D, Dp, dO);
      std::fill(dQ, dQ + nr * Dp, acc_t(0));
      int64_t klo, khi;
      attn_key_range(i0, i0 + nr, p.sq, p.sk, p.causal, p.window, klo, khi);
      const SegRange qsegs = query_segs(p, b, i0, nr);
      // Key tiles aligned to multiples of BK, as the key-tile pass cuts them (the same sums).
      for (int64_t j0 = klo / BK * BK; j0 < khi; j0 += BK) {
        const int64_t nc = std::min(BK, khi - j0), ncv = lanes_up<acc_t>(nc);
        if (p.segment_ids && seg_disjoint(qsegs, key_segs(p, b, j0, nc))) continue;
        const T* kp = p.k + b * p.k_stride[0] + j0 * p.k_stride[1] + kvh * p.k_stride[2];
        load_tile_t(kp, p.k_stride[1], nc, ncv, D, Kt);
        load_tile(kp, p.k_stride[1], nc, D, Dp, K);
        load_tile_t(p.v + b * p.v_stride[0] + j0 * p.v_stride[1] + kvh * p.v_stride[2],
                    p.v_stride[1], nc, ncv, D, Vt);
        mm_abt(nr, ncv, D, Q, Dp, Kt, S);
        mm_abt(nr, ncv, D, dO, Dp, Vt, dP);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = i0 + r, pos = attn_query_pos(i, p.sq, p.sk);
          bwd_row(p, attn_row(p, b, h, pos, j0, nc), S + r * BK, dP + r * BK, nc, lse[i],
                  delta[i], partial ? partial + attn_bias_index(pos, j0, p.sk) : nullptr);
        }
        mm_acc<false>(nr, nc, Dp, dP, K, dQ);  // dQ += dX K
      }
      for (int64_t r = 0; r < nr; ++r) {
        store_row(p.grad_q + ((b * p.sq + i0 + r) * p.hq + h) * D, dQ + r * Dp, D, acc_t(1));
      }
    }
  }
}

}  // namespace archext::cpu::ARCHEXT_ISA
