// RoPE kernels compiled for the 'avx512' ISA (see cpu/isa_begin.h).
#include <utility>

#include "common/rope_math.h"
#include "cpu/rope_api.h"

#define ARCHEXT_ISA isa_avx512
#define ARCHEXT_ISA_ID 2
#include "cpu/isa_begin.h"

#if ARCHEXT_ISA_ENABLED
#include "cpu/norm_kernels.inl"  // for_row
#include "cpu/rope_kernels.inl"

namespace archext::cpu::ARCHEXT_ISA {
constexpr RopeKernels kRopeKernels{
    rope_tokens<float, float>, rope_tokens<c10::Half, float>,
    rope_tokens<c10::BFloat16, float>, rope_tokens<double, double>,
};
}  // namespace archext::cpu::ARCHEXT_ISA
#define ARCHEXT_TABLE (&::archext::cpu::ARCHEXT_ISA::kRopeKernels)
#else
#define ARCHEXT_TABLE nullptr
#endif

#include "cpu/isa_end.h"

const archext::cpu::RopeKernels* archext::cpu::rope_kernels_avx512() { return ARCHEXT_TABLE; }
