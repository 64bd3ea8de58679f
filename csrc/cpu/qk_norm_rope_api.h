// The interface between the CPU launcher of the fused QK-norm + RoPE and its per-ISA kernels.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/qk_norm_rope_params.h"
#include "cpu/stability_api.h"  // acc_of, ByDtype

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
