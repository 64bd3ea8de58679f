// Stability-family kernels compiled for the 'avx512' ISA (see cpu/isa_begin.h).
#include <algorithm>
#include <utility>
#include <vector>

#include "common/stability_math.h"
#include "cpu/stability_api.h"

#define ARCHEXT_ISA isa_avx512
#define ARCHEXT_ISA_ID 2
#include "cpu/isa_begin.h"

#if ARCHEXT_ISA_ENABLED
#include "cpu/stability_kernels.inl"

namespace archext::cpu::ARCHEXT_ISA {
#define ARCHEXT_BY_DTYPE(fn) {fn<float>, fn<c10::Half>, fn<c10::BFloat16>, fn<double>}
constexpr StabilityKernels kStabilityKernels{
    ARCHEXT_BY_DTYPE(ce_fwd_rows), ARCHEXT_BY_DTYPE(ce_bwd_rows),
    ARCHEXT_BY_DTYPE(softmax_fwd_rows), ARCHEXT_BY_DTYPE(softmax_bwd_rows),
    ARCHEXT_BY_DTYPE(softcap_fwd_elems), ARCHEXT_BY_DTYPE(softcap_bwd_elems),
};
#undef ARCHEXT_BY_DTYPE
}  // namespace archext::cpu::ARCHEXT_ISA
#define ARCHEXT_TABLE (&::archext::cpu::ARCHEXT_ISA::kStabilityKernels)
#else
#define ARCHEXT_TABLE nullptr
#endif

#include "cpu/isa_end.h"

const archext::cpu::StabilityKernels* archext::cpu::stability_kernels_avx512() { return ARCHEXT_TABLE; }
