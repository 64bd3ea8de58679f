// The interface between the CPU launcher of the fused QK-norm + RoPE and its per-ISA kernels.
#pragma once

#include <cstdint>

#include "common/qk_norm_rope_params.h"
#include "cpu/dtype_table.h"

namespace archext::cpu {

template <typename T>
using QkNormRopeFn = void (*)(const QkNormRopeParams<T, acc_of<T>>&, int64_t begin_token,
                              int64_t end_token);

struct QkNormRopeKernels {
  ByDtype<QkNormRopeFn> fwd, bwd;
};

const QkNormRopeKernels* qk_norm_rope_kernels_default();
const QkNormRopeKernels* qk_norm_rope_kernels_avx2();
const QkNormRopeKernels* qk_norm_rope_kernels_avx512();
const QkNormRopeKernels* qk_norm_rope_kernels_avx512_bf16();

}  // namespace archext::cpu
