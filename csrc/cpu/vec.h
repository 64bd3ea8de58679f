// A small portable SIMD layer on GCC/Clang vector extensions: W float lanes, loads and stores
// that convert float32 / float16 / bfloat16 to and from float32 lanes. Compiled once per ISA by
// cpu/isa_begin.h (W = 8 for the baseline and AVX2, 16 for AVX-512); the same source gives
// vcvtph2ps, FMA and so on where the target has them.
#pragma once

namespace archext::cpu::ARCHEXT_ISA {

constexpr int W = ARCHEXT_VEC_BYTES / 4;
typedef float fvec __attribute__((vector_size(ARCHEXT_VEC_BYTES)));
typedef uint32_t uvec __attribute__((vector_size(ARCHEXT_VEC_BYTES)));
typedef uint16_t u16vec __attribute__((vector_size(ARCHEXT_VEC_BYTES / 2)));

inline fvec splat(float v) { return fvec{} + v; }

inline float hsum(fvec v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// Which element types take the vector path. float64 (for gradcheck) runs the scalar tail loop.
template <typename T>
constexpr bool kVectorized = !std::is_same_v<T, double>;

template <typename T>
struct Io;

template <>
struct Io<float> {
  static fvec load(const float* p) {
    fvec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, fvec v) { std::memcpy(p, &v, sizeof v); }
};

template <>
struct Io<c10::BFloat16> {
  // bfloat16 is the top half of a float32: widen and shift (explicit intrinsics, as GCC's
  // lowering of the generic u16 -> u32 conversion shuffles through extract/insert pairs).
  static fvec load(const c10::BFloat16* p) {
#if ARCHEXT_X86 && ARCHEXT_ISA_ID == 1
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return reinterpret_cast<fvec>(_mm256_slli_epi32(w, 16));
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID >= 2
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return reinterpret_cast<fvec>(_mm512_slli_epi32(w, 16));
#else
    u16vec raw;
    std::memcpy(&raw, p, sizeof raw);
    return reinterpret_cast<fvec>(__builtin_convertvector(raw, uvec) << 16);
#endif
  }
  // Round to nearest even, NaN -> 0x7fc0: bit-identical to c10::BFloat16(float). With
  // AVX512_BF16, one vcvtneps2bf16, which rounds the same way but flushes float32 subnormals
  // (below 2^-126, where bfloat16 keeps 1 to 7 significant bits) to zero of the same sign and
  // keeps the sign and top payload bits of a NaN (still a quiet NaN): a quarter of the
  // instructions of the emulation, which dominated the bfloat16 norm kernels.
  static u16vec convert(fvec v) {
#if ARCHEXT_X86 && ARCHEXT_ISA_ID == 3
    const __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(v));
    u16vec out;
    std::memcpy(&out, &h, sizeof out);
    return out;
#else
    const uvec u = reinterpret_cast<uvec>(v);
    const uvec nan = reinterpret_cast<uvec>(v != v);
    const uvec r = (((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) & ~nan) | (nan & 0x7fc0u);
    u16vec out;
#if ARCHEXT_X86 && ARCHEXT_ISA_ID == 1
    const __m256i packed = _mm256_packus_epi32(reinterpret_cast<__m256i>(r), reinterpret_cast<__m256i>(r));
    const __m128i lo = _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
    std::memcpy(&out, &lo, sizeof out);
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID >= 2
    const __m256i narrow = _mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(r));
    std::memcpy(&out, &narrow, sizeof out);
#else
    out = __builtin_convertvector(r, u16vec);
#endif
    return out;
#endif
  }
  static void store(c10::BFloat16* p, fvec v) {
    const u16vec out = convert(v);
    std::memcpy(p, &out, sizeof out);
  }
};

template <>
struct Io<c10::Half> {
  // IEEE binary16 <-> float32, round to nearest even: bit-identical to c10::Half. GCC lowers
  // __builtin_convertvector on _Float16 vectors one element at a time, so use F16C directly.
  static fvec load(const c10::Half* p) {
#if ARCHEXT_X86 && ARCHEXT_ISA_ID == 1
    return reinterpret_cast<fvec>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID >= 2
    return reinterpret_cast<fvec>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#else
    fvec v;
    for (int k = 0; k < W; ++k) v[k] = c10::detail::fp16_ieee_to_fp32_value(p[k].x);
    return v;
#endif
  }
  static u16vec convert(fvec v) {
    u16vec out;
#if ARCHEXT_X86 && ARCHEXT_ISA_ID == 1
    const __m128i h = _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT);
    std::memcpy(&out, &h, sizeof out);
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID >= 2
    const __m256i h = _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT);
    std::memcpy(&out, &h, sizeof out);
#else
    for (int k = 0; k < W; ++k) out[k] = c10::detail::fp16_ieee_from_fp32_value(v[k]);
#endif
    return out;
  }
  static void store(c10::Half* p, fvec v) {
    const u16vec out = convert(v);
    std::memcpy(p, &out, sizeof out);
  }
};

// A non-temporal (streaming) store of one vector, around the cache; p must be aligned to the
// stored vector's size (64 bytes for float32 with AVX-512). For an output larger than the cache
// that nothing reads soon, into a buffer that is already resident: a plain store first reads
// each line in (the write-allocate), a streaming one does not. The baseline ISA stores plainly.
// A kernel that streams ends with stream_fence().
template <typename T>
inline void store_stream(T* p, fvec v) {
#if ARCHEXT_X86 && ARCHEXT_ISA_ID >= 1
  if constexpr (std::is_same_v<T, float>) {
#if ARCHEXT_ISA_ID == 1
    _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
#else
    _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#endif
  } else {
    const u16vec out = Io<T>::convert(v);
#if ARCHEXT_ISA_ID == 1
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<__m128i>(out));
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(out));
#endif
  }
#else
  Io<T>::store(p, v);
#endif
}

// Orders this thread's streaming stores before whatever it does next (they are weakly ordered).
inline void stream_fence() {
#if ARCHEXT_X86
  _mm_sfence();
#endif
}

// float64 takes the scalar path; these are declared so that the (never instantiated) vector
// branches of a float64 kernel still name a complete type.
template <>
struct Io<double> {
  template <typename P> static fvec load(P);
  template <typename P> static void store(P, fvec);
};

// A software prefetch kPrefetchBytes ahead of a streamed input, issued once per vector: the
// hardware prefetchers stop at each 4 KiB page and must re-learn the stream on the next, which
// a kernel that also takes a page fault on every fresh output page keeps paying. Never faults.
constexpr int kPrefetchBytes = 2048;
template <typename T>
inline void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, 0, 3);
}

// ---- vector math ----------------------------------------------------------------------------
// exp, erf and tanh of float32 lanes, without libm (which would go lane by lane), written once in
// generic vector code: exp and erf for the activation kernels, tanh for the tanh soft-capping of
// logits to come (the tanh GeLU goes through exp, see common/activation_math.h). Accurate to a
// few float32 ulps over the whole float range: NaN propagates, exp(-inf) = 0, exp(+inf) = +inf,
// erf and tanh saturate to +-1 and keep the sign of zero. Both branches of a piecewise formula
// are computed and selected lane by lane. The max errors quoted below were measured against
// float64 over 6M points spanning the float range, on every ISA (tests/test_activation.py
// checks them). The erf and tanh coefficients are minimax fits that scripts/fit_vec_math.py
// reproduces (its polynomial fits agree with Cephes' erff and tanhf to 7 digits).

typedef int32_t ivec __attribute__((vector_size(ARCHEXT_VEC_BYTES)));

inline fvec vabs(fvec x) {
  return reinterpret_cast<fvec>(reinterpret_cast<uvec>(x) & 0x7fffffffu);
}

// m (>= 0, or NaN) with the sign of s.
inline fvec with_sign_of(fvec m, fvec s) {
  return reinterpret_cast<fvec>(reinterpret_cast<uvec>(m) |
                                (reinterpret_cast<uvec>(s) & 0x80000000u));
}

// min(c, x) and max(c, x) that return x when x is NaN (x86 minps/maxps return their second
// operand when either is NaN), for clamping.
inline fvec vmin_keep_nan(fvec c, fvec x) {
#if ARCHEXT_X86 && ARCHEXT_ISA_ID == 1
  return reinterpret_cast<fvec>(
      _mm256_min_ps(reinterpret_cast<__m256>(c), reinterpret_cast<__m256>(x)));
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID >= 2
  return reinterpret_cast<fvec>(
      _mm512_min_ps(reinterpret_cast<__m512>(c), reinterpret_cast<__m512>(x)));
#else
  return c < x ? c : x;
#endif
}
inline fvec vmax_keep_nan(fvec c, fvec x) {
#if ARCHEXT_X86 && ARCHEXT_ISA_ID == 1
  return reinterpret_cast<fvec>(
      _mm256_max_ps(reinterpret_cast<__m256>(c), reinterpret_cast<__m256>(x)));
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID >= 2
  return reinterpret_cast<fvec>(
      _mm512_max_ps(reinterpret_cast<__m512>(c), reinterpret_cast<__m512>(x)));
#else
  return c > x ? c : x;
#endif
}

// a * b + c, fused (one rounding) where the ISA has FMA. Written out because the CPU kernels are
// built with -ffp-contract=off (setup.py): the compiler fuses nothing on its own, so the math
// below says where it wants the single rounding (every polynomial step) and gets the same
// results however the build sets contraction.
inline fvec vfma(fvec a, fvec b, fvec c) {
#if ARCHEXT_X86 && ARCHEXT_ISA_ID == 1
  return reinterpret_cast<fvec>(_mm256_fmadd_ps(
      reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b), reinterpret_cast<__m256>(c)));
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID >= 2
  return reinterpret_cast<fvec>(_mm512_fmadd_ps(
      reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(c)));
#else
  return a * b + c;  // the baseline ISA has no FMA: two roundings
#endif
}

// 2^k for integer lanes k in [-126, 127], built in the exponent field.
inline fvec pow2i(ivec k) { return reinterpret_cast<fvec>((k + 127) << 23); }

// p * 2^k for p in [0.5, 2] and integer-valued k in [-150, 128] (kf the float, ki the int
// lanes of k), rounded once, down to the subnormals, with k = 128 overflowing to +inf.
inline fvec scale_pow2(fvec p, fvec kf, ivec ki) {
#if ARCHEXT_X86 && ARCHEXT_ISA_ID >= 2
  (void)ki;
  return reinterpret_cast<fvec>(_mm512_scalef_ps(reinterpret_cast<__m512>(p),
                                                 reinterpret_cast<__m512>(kf)));
#else
  (void)kf;
  const ivec k1 = ki >> 1;  // two exact steps, each in the normal range
  return p * pow2i(k1) * pow2i(ki - k1);
#endif
}

// exp(x), Cephes' expf (as in sse_mathfun): x = k ln2 + r with k = round(x / ln2), |r| <= ln2/2,
// ln2 split in two so that k * C1 is exact; exp(r) = 1 + r + r^2 P(r); then times 2^k, rounded
// once (scale_pow2), so that subnormal results (x down to -104) come out right and k = 128
// overflows to +inf. Max error 1 ulp.
inline fvec vexp(fvec x) {
  x = vmin_keep_nan(splat(89.f), x);    // exp(89) overflows to +inf
  x = vmax_keep_nan(splat(-104.f), x);  // exp(-104) rounds to 0
  const fvec kRound = splat(12582912.f);      // 1.5 * 2^23: adding it rounds to an integer
  const fvec t = vfma(x, splat(1.44269504088896341f), kRound);
  const fvec k = t - kRound;
  const ivec ki = reinterpret_cast<ivec>(t) - reinterpret_cast<ivec>(kRound);
  fvec r = vfma(k, splat(-0.693359375f), x);  // exact: k * C1 has at most 17 bits
  r = vfma(k, splat(2.12194440e-4f), r);
  fvec p = splat(1.9875691500e-4f);
  p = vfma(p, r, splat(1.3981999507e-3f));
  p = vfma(p, r, splat(8.3334519073e-3f));
  p = vfma(p, r, splat(4.1665795894e-2f));
  p = vfma(p, r, splat(1.6666665459e-1f));
  p = vfma(p, r, splat(5.0000001201e-1f));
  p = vfma(p, r * r, r) + splat(1.f);
  return scale_pow2(p, k, ki);
}

// erf(x). |x| < 1: x P(x^2) (fit: relative error 1.2e-9). |x| >= 1: 1 - exp(-x^2) Q(|x| - 1),
// Q a fit of erfc(x) exp(x^2) on [1, 4] (absolute error of erf 2.4e-9), |x| clamped to 4, where
// erf = 1 - 1.5e-8 rounds to 1. Max error 1.2 ulp with FMA, 2.2 without (baseline ISA).
inline fvec verf(fvec x) {
  const fvec a = vabs(x);
  const fvec z = x * x;
  fvec p = splat(7.85388398e-05f);
  p = vfma(p, z, splat(-8.01020119e-04f));
  p = vfma(p, z, splat(5.18832866e-03f));
  p = vfma(p, z, splat(-2.68538125e-02f));
  p = vfma(p, z, splat(1.12835852e-01f));
  p = vfma(p, z, splat(-3.76126258e-01f));
  // The constant term 1.12837917 in two parts, 1.12837911 + 5.92e-8, the product with the first
  // fused into the last step: 1.2 ulp with FMA, where x * P(x^2) in one piece gave 2.4.
  p = vfma(p, z, splat(5.92059894e-08f));
  const fvec small = vfma(x, splat(1.12837911f), x * p);
  const fvec ac = vmin_keep_nan(splat(4.f), a);
  const fvec u = ac - splat(1.f);
  fvec q = splat(1.06843829e-04f);
  q = vfma(q, u, splat(-1.05705989e-03f));
  q = vfma(q, u, splat(4.91129373e-03f));
  q = vfma(q, u, splat(-1.51101640e-02f));
  q = vfma(q, u, splat(3.68749858e-02f));
  q = vfma(q, u, splat(-7.90533456e-02f));
  q = vfma(q, u, splat(1.54350555e-01f));
  q = vfma(q, u, splat(-2.73211076e-01f));
  q = vfma(q, u, splat(4.27583570e-01f));
  const fvec big = with_sign_of(vfma(-vexp(-(ac * ac)), q, splat(1.f)), x);
  return a < splat(1.f) ? small : big;
}

// tanh(x). |x| < 0.625: x + x^3 P(x^2) (fit: relative error 4.4e-9, Cephes' tanhf form);
// beyond, 1 - 2 / (exp(2|x|) + 1) with the sign of x (exp overflows to +inf past |x| = 44.4: 1).
// Max error 1.3 ulp.
// True when every lane of the comparison mask m (all-ones / all-zeros lanes) is set.
inline bool all_lanes(uvec m) {
#if ARCHEXT_X86 && ARCHEXT_ISA_ID == 1
  return _mm256_movemask_ps(reinterpret_cast<__m256>(m)) == 0xff;
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID >= 2
  const __m512i v = reinterpret_cast<__m512i>(m);
  return _mm512_test_epi32_mask(v, v) == 0xffff;
#else
  uint32_t all = ~0u;
  for (int i = 0; i < W; ++i) all &= m[i];
  return all != 0;
#endif
}

// When every lane is in the polynomial range (soft-capped logits mostly are: |x / cap| is
// small), the exp branch is skipped; the result is the same either way.
inline fvec vtanh(fvec x) {
  const fvec a = vabs(x);
  const fvec z = x * x;
  fvec p = splat(-5.70498480e-03f);
  p = vfma(p, z, splat(2.06390854e-02f));
  p = vfma(p, z, splat(-5.37397145e-02f));
  p = vfma(p, z, splat(1.33314422e-01f));
  p = vfma(p, z, splat(-3.33332819e-01f));
  const fvec small = vfma(a * z, p, a);  // on |x|, so that tanh(-0) = -0 below
  const auto is_small = a < splat(0.625f);
  if (all_lanes(reinterpret_cast<uvec>(is_small))) return with_sign_of(small, x);
  const fvec big = splat(1.f) - splat(2.f) / (vexp(a + a) + splat(1.f));
  return with_sign_of(is_small ? small : big, x);
}

// ---- fast erf, for results rounded to 16 bits -----------------------------------------------
// The GeLU kernels of float16 and bfloat16 tensors (an 11- or 8-bit significand) use this one:
// half the instructions of verf, no exp, and an error (under 7 ulp of float32, 4e-7 relative)
// that vanishes in the final rounding. Odd, within [-1, 1], and exactly +-1 from the end of the
// fitted range on, as the correctly rounded erf is (so that 1 + erf(x) vanishes in the tail as it
// does with verf). The fit is from scripts/fit_vec_math.py.

// erf(x) = x P(x^2) / Q(x^2) for |x| < 4, a minimax rational fit of degrees 6 / 5 (relative
// error 2e-9); +-1 beyond (erf(4) = 1 - 1.5e-8 rounds to 1). Max error 5.6 ulp with FMA, 6.8
// without (the float32 evaluation).
inline fvec verf_fast(fvec x) {
  const fvec a = vabs(x);
  const fvec s = a * a;  // inf or NaN beyond the range: discarded below
  fvec p = splat(-1.320247650e-08f);
  p = vfma(p, s, splat(4.684829232e-06f));
  p = vfma(p, s, splat(3.796105322e-04f));
  p = vfma(p, s, splat(3.849604886e-03f));
  p = vfma(p, s, splat(5.431691572e-02f));
  p = vfma(p, s, splat(1.852029165e-01f));
  p = vfma(p, s, splat(1.128379169e+00f));
  fvec q = splat(6.311106775e-05f);
  q = vfma(q, s, splat(1.307570754e-03f));
  q = vfma(q, s, splat(1.546208230e-02f));
  q = vfma(q, s, splat(1.139583297e-01f));
  q = vfma(q, s, splat(4.974652252e-01f));
  q = vfma(q, s, splat(1.f));
  const fvec r = vmin_keep_nan(splat(1.f), a * p / q);
  return with_sign_of(a >= splat(4.f) ? splat(1.f) : r, x);
}

}  // namespace archext::cpu::ARCHEXT_ISA
