// The interface between the CPU RoPE launcher and its per-ISA kernels (see cpu/kernel_api.h).
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/rope_params.h"

namespace archext::cpu {

template <typename T>
using RopeFn = void (*)(const RopeParams<T>&, int64_t begin_token, int64_t end_token);

struct RopeKernels {
  RopeFn<float> f32;
  RopeFn<c10::Half> f16;
  RopeFn<c10::BFloat16> bf16;
  RopeFn<double> f64;

  template <typename T> auto get() const {
    if constexpr (std::is_same_v<T, float>) return f32;
    else if constexpr (std::is_same_v<T, c10::Half>) return f16;
    else if constexpr (std::is_same_v<T, c10::BFloat16>) return bf16;
    else return f64;
  }
};

const RopeKernels* rope_kernels_default();
const RopeKernels* rope_kernels_avx2();
const RopeKernels* rope_kernels_avx512();
const RopeKernels* rope_kernels_avx512_bf16();

}  // namespace archext::cpu
