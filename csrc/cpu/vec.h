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
typedef _Float16 hvec __attribute__((vector_size(ARCHEXT_VEC_BYTES / 2)));

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
  static fvec load(const c10::BFloat16* p) {
    u16vec raw;
    std::memcpy(&raw, p, sizeof raw);
    return reinterpret_cast<fvec>(__builtin_convertvector(raw, uvec) << 16);
  }
  // Round to nearest even, NaN -> 0x7fc0: bit-identical to c10::BFloat16(float).
  static void store(c10::BFloat16* p, fvec v) {
    const uvec u = reinterpret_cast<uvec>(v);
    const uvec rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uvec nan = reinterpret_cast<uvec>(v != v);
    const u16vec out = __builtin_convertvector((rounded & ~nan) | (nan & 0x7fc0u), u16vec);
    std::memcpy(p, &out, sizeof out);
  }
};

template <>
struct Io<c10::Half> {
  static fvec load(const c10::Half* p) {
    hvec raw;
    std::memcpy(&raw, p, sizeof raw);
    return __builtin_convertvector(raw, fvec);
  }
  // IEEE round to nearest even, as c10::Half(float).
  static void store(c10::Half* p, fvec v) {
    const hvec out = __builtin_convertvector(v, hvec);
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
