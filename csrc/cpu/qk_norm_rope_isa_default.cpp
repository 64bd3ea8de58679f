// Fused QK-norm + RoPE kernels compiled for the 'default' ISA (see cpu/isa_begin.h).
#include <algorithm>
#include <vector>

#include "common/rope_math.h"
#include "cpu/qk_norm_rope_api.h"

#define ARCHEXT_ISA isa_default
#define ARCHEXT_ISA_ID 0
#include "cpu/isa_begin.h"

#if ARCHEXT_ISA_ENABLED
#include "cpu/qk_norm_rope_kernels.inl"

namespace archext::cpu::ARCHEXT_ISA {
#define ARCHEXT_BY_DTYPE(fn) {fn<float>, fn<c10::Half>, fn<c10::BFloat16>, fn<double>}
constexpr QkNormRopeKernels kQkNormRopeKernels{
    ARCHEXT_BY_DTYPE(qk_norm_rope_fwd_tokens), ARCHEXT_BY_DTYPE(qk_norm_rope_bwd_tokens),
};
#undef ARCHEXT_BY_DTYPE
}  // namespace archext::cpu::ARCHEXT_ISA
#define ARCHEXT_TABLE (&::archext::cpu::ARCHEXT_ISA::kQkNormRopeKernels)
#else
#define ARCHEXT_TABLE nullptr
#endif

#include "cpu/isa_end.h"

const archext::cpu::QkNormRopeKernels* archext::cpu::qk_norm_rope_kernels_default() { return ARCHEXT_TABLE; }
