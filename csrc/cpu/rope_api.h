// The interface between the CPU RoPE launcher and its per-ISA kernels (see cpu/kernel_api.h).
#pragma once

#include <cstdint>

#include "common/rope_params.h"
#include "cpu/dtype_table.h"

namespace archext::cpu {

template <typename T>
using RopeFn = void (*)(const RopeParams<T>&, int64_t begin_token, int64_t end_token);

using RopeKernels = ByDtype<RopeFn>;

const RopeKernels* rope_kernels_default();
const RopeKernels* rope_kernels_avx2();
const RopeKernels* rope_kernels_avx512();
const RopeKernels* rope_kernels_avx512_bf16();

}  // namespace archext::cpu
