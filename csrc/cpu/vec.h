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
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID == 2
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return reinterpret_cast<fvec>(_mm512_slli_epi32(w, 16));
#else
    u16vec raw;
    std::memcpy(&raw, p, sizeof raw);
    return reinterpret_cast<fvec>(__builtin_convertvector(raw, uvec) << 16);
#endif
  }
  // Round to nearest even, NaN -> 0x7fc0: bit-identical to c10::BFloat16(float).
  static u16vec convert(fvec v) {
    const uvec u = reinterpret_cast<uvec>(v);
    const uvec nan = reinterpret_cast<uvec>(v != v);
    const uvec r = (((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) & ~nan) | (nan & 0x7fc0u);
    u16vec out;
#if ARCHEXT_X86 && ARCHEXT_ISA_ID == 1
    const __m256i packed = _mm256_packus_epi32(reinterpret_cast<__m256i>(r), reinterpret_cast<__m256i>(r));
    const __m128i lo = _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
    std::memcpy(&out, &lo, sizeof out);
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID == 2
    const __m256i narrow = _mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(r));
    std::memcpy(&out, &narrow, sizeof out);
#else
    out = __builtin_convertvector(r, u16vec);
#endif
    return out;
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
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID == 2
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
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID == 2
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

// float64 takes the scalar path; these are declared so that the (never instantiated) vector
// branches of a float64 kernel still name a complete type.
template <>
struct Io<double> {
  template <typename P> static fvec load(P);
  template <typename P> static void store(P, fvec);
};

}  // namespace archext::cpu::ARCHEXT_ISA
