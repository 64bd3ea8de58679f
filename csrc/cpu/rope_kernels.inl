// RoPE kernels over tokens, compiled once per ISA (see isa_begin.h). The math is in
// common/rope_math.h. cos/sin come from a float32 cache row per token, shared by every head of
// q and k; each head vector is rotated in W-wide vectors with a scalar tail.

namespace archext::cpu::ARCHEXT_ISA {

typedef float hfvec __attribute__((vector_size(ARCHEXT_VEC_BYTES / 2)));  // W/2 floats

template <size_t... I>
inline fvec swap_pairs(fvec v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (I ^ 1)...);
}

template <size_t... I>
inline fvec dup_pairs(hfvec v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (I / 2)...);
}

template <size_t... I>
inline fvec alternate_sign(std::index_sequence<I...>) {
  return fvec{((I % 2) ? 1.f : -1.f)...};
}

// Rotates one head vector x (D elements) into y (may be x).
template <typename T, typename acc_t>
inline void rope_head(const RopeParams<T>& p, const T* x, T* y, const float* c, const float* s) {
  const int64_t half = p.half;
  const acc_t sign = p.sign;
  if (!p.interleaved) {
    // Pairs (i, i + R/2): contiguous halves, one vector of each per step.
    const fvec vsign = splat(p.sign);
    for_row<T>(
        half,
        [&](auto i, int) {
          prefetch_ahead(x + i);
          prefetch_ahead(x + half + i);
          const fvec a = Io<T>::load(x + i), b = Io<T>::load(x + half + i);
          const fvec vc = Io<float>::load(c + i), vs = Io<float>::load(s + i) * vsign;
          Io<T>::store(y + i, a * vc - b * vs);
          Io<T>::store(y + half + i, b * vc + a * vs);
        },
        [&](int64_t i) {
          acc_t ao, bo;
          rope_rotate<acc_t>(static_cast<acc_t>(x[i]), static_cast<acc_t>(x[half + i]), c[i],
                             sign * s[i], ao, bo);
          y[i] = static_cast<T>(ao);
          y[half + i] = static_cast<T>(bo);
        });
  } else {
    // Pairs (2i, 2i + 1): y = x * cos' + swap_pairs(x) * sin', with cos' = (c0, c0, c1, c1, ..)
    // and sin' = (-s0, s0, -s1, s1, ..).
    constexpr auto lanes = std::make_index_sequence<W>{};
    const fvec alt = alternate_sign(lanes) * splat(p.sign);
    int64_t j = 0;  // element index, even
    if constexpr (kVectorized<T>) {
      for (; j + W <= 2 * half; j += W) {
        hfvec hc, hs;
        std::memcpy(&hc, c + j / 2, sizeof hc);
        std::memcpy(&hs, s + j / 2, sizeof hs);
        prefetch_ahead(x + j);
        const fvec v = Io<T>::load(x + j);
        Io<T>::store(y + j, v * dup_pairs(hc, lanes) + swap_pairs(v, lanes) * dup_pairs(hs, lanes) * alt);
      }
    }
    for (; j < 2 * half; j += 2) {
      acc_t ao, bo;
      rope_rotate<acc_t>(static_cast<acc_t>(x[j]), static_cast<acc_t>(x[j + 1]), c[j / 2],
                         sign * s[j / 2], ao, bo);
      y[j] = static_cast<T>(ao);
      y[j + 1] = static_cast<T>(bo);
    }
  }
  if (y != x) {
    for (int64_t d = 2 * half; d < p.head_dim; ++d) y[d] = x[d];  // partial rotary: pass through
  }
}

template <typename T, typename acc_t>
void rope_tokens(const RopeParams<T>& p, int64_t begin, int64_t end) {
  // q's tokens, then k's (the cos/sin rows are re-read from L2): writing one fresh output at a
  // time page-faults faster than alternating q and k per token (float32 q and k of
  // [8, 2048, 32 / 8, 128], one thread: 155-158 against 162-171 ms over three runs).
  for (const RopeTensor<T>& rt : p.t) {
    for (int64_t tok = begin; tok < end; ++tok) {
      const int64_t b = tok / p.seq, t = tok % p.seq;
      const int64_t pos = p.pos[b * p.pos_bstride + t];
      const float* c = p.cos + pos * p.half;
      const float* s = p.sin + pos * p.half;
      for (int64_t h = 0; h < rt.heads; ++h) {
        rope_head<T, acc_t>(p, rt.x + b * rt.xs_b + t * rt.xs_s + h * rt.xs_h,
                            rt.y + b * rt.ys_b + t * rt.ys_s + h * rt.ys_h, c, s);
      }
    }
  }
}

}  // namespace archext::cpu::ARCHEXT_ISA
