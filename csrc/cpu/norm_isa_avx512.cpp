// Norm kernels compiled for the 'avx512' ISA (see cpu/isa_begin.h).
#define ARCHEXT_ISA isa_avx512
#define ARCHEXT_ISA_ID 2
#include "cpu/isa_begin.h"

#if ARCHEXT_ISA_ENABLED
#include "cpu/norm_kernels.inl"

namespace archext::cpu::ARCHEXT_ISA {
// Constant-initialised (no start-up code runs for the wider ISA).
constexpr NormKernels kNormKernels{
    norm_fwd_rows<float, float>,         norm_fwd_rows<c10::Half, float>,
    norm_fwd_rows<c10::BFloat16, float>, norm_fwd_rows<double, double>,
    norm_bwd_rows<float, float>,         norm_bwd_rows<c10::Half, float>,
    norm_bwd_rows<c10::BFloat16, float>, norm_bwd_rows<double, double>,
};
}  // namespace archext::cpu::ARCHEXT_ISA
#define ARCHEXT_TABLE (&::archext::cpu::ARCHEXT_ISA::kNormKernels)
#else
#define ARCHEXT_TABLE nullptr
#endif

#include "cpu/isa_end.h"

// Outside the target region: safe to call on any CPU.
const archext::cpu::NormKernels* archext::cpu::norm_kernels_avx512() { return ARCHEXT_TABLE; }
