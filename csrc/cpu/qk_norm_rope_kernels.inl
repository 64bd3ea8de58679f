// Fused QK-norm + RoPE over tokens, compiled once per ISA (see isa_begin.h): plain loops over a
// float scratch row that the compiler vectorises for the target. Math: common/qk_norm_rope_params.h.

namespace archext::cpu::ARCHEXT_ISA {

// The index pairs (a, b) of rotation i of a head of the given convention.
inline void rope_pair(bool interleaved, int64_t half, int64_t i, int64_t& a, int64_t& b) {
  if (interleaved) {
    a = 2 * i;
    b = 2 * i + 1;
  } else {
    a = i;
    b = i + half;
  }
}

template <typename T>
void qk_norm_rope_fwd_tokens(const QkNormRopeParams<T, acc_of<T>>& p, int64_t begin, int64_t end) {
  using acc_t = acc_of<T>;
  const int64_t D = p.head_dim;
  std::vector<acc_t> n(static_cast<size_t>(std::max(p.heads[0], p.heads[1]) * D));
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t pos = p.pos[(tok / p.seq) * p.pos_bstride + tok % p.seq];
    const float* c = p.cos + pos * p.half;
    const float* s = p.sin + pos * p.half;
    for (int i = 0; i < 2; ++i) {
      const int64_t H = p.heads[i], row = H * D;
      const T* x = p.x[i] + tok * row;
      T* y = p.y[i] + tok * row;
      const int64_t G = p.per_head ? D : row, groups = p.per_head ? H : 1;
      for (int64_t g = 0; g < groups; ++g) {
        const T* xg = x + g * G;
        acc_t ss = 0;
        for (int64_t j = 0; j < G; ++j) ss += static_cast<acc_t>(xg[j]) * static_cast<acc_t>(xg[j]);
        const acc_t rstd = acc_t(1) / std::sqrt(ss / static_cast<acc_t>(G) + p.eps);
        p.rstd[i][tok * groups + g] = rstd;
        acc_t* ng = n.data() + g * G;
        const T* w = p.w[i];
        for (int64_t j = 0; j < G; ++j) {
          const acc_t wv = w != nullptr ? static_cast<acc_t>(w[j]) + p.weight_offset : acc_t(1);
          ng[j] = static_cast<acc_t>(xg[j]) * rstd * wv;
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        const acc_t* nh = n.data() + h * D;
        T* yh = y + h * D;
        for (int64_t r = 0; r < p.half; ++r) {
          int64_t a, b;
          rope_pair(p.interleaved, p.half, r, a, b);
          acc_t ao, bo;
          rope_rotate<acc_t>(nh[a], nh[b], c[r], s[r], ao, bo);
          yh[a] = static_cast<T>(ao);
          yh[b] = static_cast<T>(bo);
        }
        for (int64_t d = 2 * p.half; d < D; ++d) yh[d] = static_cast<T>(nh[d]);
      }
    }
  }
}

// Tokens [begin, end) lie within one weight-gradient chunk (the launcher splits on chunks).
template <typename T>
void qk_norm_rope_bwd_tokens(const QkNormRopeParams<T, acc_of<T>>& p, int64_t begin, int64_t end) {
  using acc_t = acc_of<T>;
  const int64_t D = p.head_dim;
  std::vector<acc_t> dn(static_cast<size_t>(std::max(p.heads[0], p.heads[1]) * D));
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t pos = p.pos[(tok / p.seq) * p.pos_bstride + tok % p.seq];
    const float* c = p.cos + pos * p.half;
    const float* s = p.sin + pos * p.half;
    const int64_t chunk = tok / p.chunk_tokens;
    for (int i = 0; i < 2; ++i) {
      const int64_t H = p.heads[i], row = H * D;
      const T* x = p.x[i] + tok * row;
      const T* dy = p.dy[i] + tok * row;
      T* dx = p.dx[i] + tok * row;
      const T* w = p.w[i];
      const int64_t G = p.per_head ? D : row, groups = p.per_head ? H : 1;
      acc_t* dw = p.dw[i] != nullptr ? p.dw[i] + chunk * G : nullptr;
      // dn = R^T dy, per head.
      for (int64_t h = 0; h < H; ++h) {
        const T* dyh = dy + h * D;
        acc_t* dnh = dn.data() + h * D;
        for (int64_t r = 0; r < p.half; ++r) {
          int64_t a, b;
          rope_pair(p.interleaved, p.half, r, a, b);
          acc_t ao, bo;
          rope_rotate<acc_t>(static_cast<acc_t>(dyh[a]), static_cast<acc_t>(dyh[b]), c[r], -s[r], ao, bo);
          dnh[a] = ao;
          dnh[b] = bo;
        }
        for (int64_t d = 2 * p.half; d < D; ++d) dnh[d] = static_cast<acc_t>(dyh[d]);
      }
      for (int64_t g = 0; g < groups; ++g) {
        const T* xg = x + g * G;
        const acc_t* dng = dn.data() + g * G;
        T* dxg = dx + g * G;
        const acc_t rstd = p.rstd[i][tok * groups + g];
        acc_t dot = 0;
        for (int64_t j = 0; j < G; ++j) {
          const acc_t wv = w != nullptr ? static_cast<acc_t>(w[j]) + p.weight_offset : acc_t(1);
          dot += dng[j] * wv * static_cast<acc_t>(xg[j]);
        }
        const acc_t k = rstd * rstd * dot / static_cast<acc_t>(G);
        for (int64_t j = 0; j < G; ++j) {
          const acc_t xv = static_cast<acc_t>(xg[j]);
          const acc_t wv = w != nullptr ? static_cast<acc_t>(w[j]) + p.weight_offset : acc_t(1);
          dxg[j] = static_cast<T>(rstd * (dng[j] * wv - xv * k));
          if (dw != nullptr) dw[j] += dng[j] * xv * rstd;
        }
      }
    }
  }
}

}  // namespace archext::cpu::ARCHEXT_ISA
