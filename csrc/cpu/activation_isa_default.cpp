// Activation kernels compiled for the 'default' ISA (see cpu/isa_begin.h).
#define ARCHEXT_ISA isa_default
#define ARCHEXT_ISA_ID 0
#include "cpu/isa_begin.h"

#if ARCHEXT_ISA_ENABLED
#include "cpu/activation_kernels.inl"

namespace archext::cpu::ARCHEXT_ISA {
// Constant-initialised (no start-up code runs for the wider ISA).
constexpr ActivationKernels kActivationKernels{
    act_fwd_elems<float>,         act_fwd_elems<c10::Half>,
    act_fwd_elems<c10::BFloat16>, act_fwd_elems<double>,
    act_bwd_elems<float>,         act_bwd_elems<c10::Half>,
    act_bwd_elems<c10::BFloat16>, act_bwd_elems<double>,
    vec_math,
};
}  // namespace archext::cpu::ARCHEXT_ISA
#define ARCHEXT_TABLE (&::archext::cpu::ARCHEXT_ISA::kActivationKernels)
#else
#define ARCHEXT_TABLE nullptr
#endif

#include "cpu/isa_end.h"

// Outside the target region: safe to call on any CPU.
const archext::cpu::ActivationKernels* archext::cpu::activation_kernels_default() { return ARCHEXT_TABLE; }
