// Opens an ISA-specific kernel translation unit. Before including it, define
//   ARCHEXT_ISA_SUFFIX  default, avx2, avx512 or avx512_bf16: the kernels go to namespace
//                       isa_<suffix>, and ARCHEXT_ISA_GETTER(name) spells the table getter
//                       name_<suffix>
//   ARCHEXT_ISA_ID      0, 1, 2 or 3 (see cpu/isa.h)
// Every library header is included *before* the target pragma, so only the archext kernels
// that follow are compiled for the wider ISA (no inline library function is emitted twice with
// different instruction sets). Close with cpu/isa_end.h. Each family's body is one
// cpu/<family>_isa.inc, included by three one-line <family>_isa_<suffix>.cpp files.
#define ARCHEXT_CAT2(a, b) a##b
#define ARCHEXT_CAT(a, b) ARCHEXT_CAT2(a, b)
#define ARCHEXT_ISA ARCHEXT_CAT(isa_, ARCHEXT_ISA_SUFFIX)
#define ARCHEXT_ISA_GETTER(name) ARCHEXT_CAT(name##_, ARCHEXT_ISA_SUFFIX)

#include <cstdint>
#include <cstring>
#include <limits>
#include <cmath>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/norm_math.h"
#include "cpu/kernel_api.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ARCHEXT_X86 1
#else
#define ARCHEXT_X86 0
#endif

#if ARCHEXT_X86
#include <immintrin.h>
#endif

#if ARCHEXT_X86 && ARCHEXT_ISA_ID == 1
#define ARCHEXT_VEC_BYTES 32
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID == 2
#define ARCHEXT_VEC_BYTES 64
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#endif
#elif ARCHEXT_X86 && ARCHEXT_ISA_ID == 3
// AVX-512 plus AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later): the same kernels,
// with float32 -> bfloat16 rounding in one instruction (see Io<c10::BFloat16> in cpu/vec.h).
#define ARCHEXT_VEC_BYTES 64
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")
#endif
#else
// Baseline: 32-byte GCC vectors lower to pairs of SSE2 registers (or the target's default).
#define ARCHEXT_VEC_BYTES 32
#endif

#define ARCHEXT_ISA_ENABLED (ARCHEXT_ISA_ID == 0 || ARCHEXT_X86)

#include "cpu/vec.h"
