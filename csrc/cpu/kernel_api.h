// The interface between the CPU launchers (compiled for the baseline ISA) and the kernels,
// which are compiled once per ISA (csrc/cpu/isa_*.cpp) and chosen at run time (cpu/isa.h).
// A kernel processes a range of rows [begin, end); the launcher owns threading and allocation.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/activation_params.h"
#include "common/norm_params.h"

namespace archext::cpu {

using archext::NormBwdParams;
using archext::NormFwdParams;

template <typename T, typename acc_t>
using NormFwdFn = void (*)(const NormFwdParams<T, acc_t>&, int64_t begin, int64_t end);
template <typename T, typename acc_t>
using NormBwdFn = void (*)(const NormBwdParams<T, acc_t>&, int64_t begin, int64_t end);

struct NormKernels {
  NormFwdFn<float, float> fwd_f32;
  NormFwdFn<c10::Half, float> fwd_f16;
  NormFwdFn<c10::BFloat16, float> fwd_bf16;
  NormFwdFn<double, double> fwd_f64;
  NormBwdFn<float, float> bwd_f32;
  NormBwdFn<c10::Half, float> bwd_f16;
  NormBwdFn<c10::BFloat16, float> bwd_bf16;
  NormBwdFn<double, double> bwd_f64;

  template <typename T> auto fwd() const {
    if constexpr (std::is_same_v<T, float>) return fwd_f32;
    else if constexpr (std::is_same_v<T, c10::Half>) return fwd_f16;
    else if constexpr (std::is_same_v<T, c10::BFloat16>) return fwd_bf16;
    else return fwd_f64;
  }
  template <typename T> auto bwd() const {
    if constexpr (std::is_same_v<T, float>) return bwd_f32;
    else if constexpr (std::is_same_v<T, c10::Half>) return bwd_f16;
    else if constexpr (std::is_same_v<T, c10::BFloat16>) return bwd_bf16;
    else return bwd_f64;
  }
};

// One table per ISA; the ones not compiled for this target return null.
const NormKernels* norm_kernels_default();
const NormKernels* norm_kernels_avx2();
const NormKernels* norm_kernels_avx512();
const NormKernels* norm_kernels_avx512_bf16();

// ---- activation family ----------------------------------------------------------------------
// A kernel processes the elements [begin, end) of its [rows, n] grid, in row-major order.
using archext::ActBwdParams;
using archext::ActFwdParams;

template <typename T>
using ActFwdFn = void (*)(const ActFwdParams<T>&, int64_t begin, int64_t end);
template <typename T>
using ActBwdFn = void (*)(const ActBwdParams<T>&, int64_t begin, int64_t end);

// The vectorised elementary functions of cpu/vec.h, exposed for the tests: y[i] = f(x[i]).
enum class VecMathFn : int { kExp = 0, kErf = 1, kTanh = 2, kErfFast = 3 };
using VecMathFnPtr = void (*)(const float* x, float* y, int64_t n, VecMathFn fn);

struct ActivationKernels {
  ActFwdFn<float> fwd_f32;
  ActFwdFn<c10::Half> fwd_f16;
  ActFwdFn<c10::BFloat16> fwd_bf16;
  ActFwdFn<double> fwd_f64;
  ActBwdFn<float> bwd_f32;
  ActBwdFn<c10::Half> bwd_f16;
  ActBwdFn<c10::BFloat16> bwd_bf16;
  ActBwdFn<double> bwd_f64;
  VecMathFnPtr vec_math;

  template <typename T> auto fwd() const {
    if constexpr (std::is_same_v<T, float>) return fwd_f32;
    else if constexpr (std::is_same_v<T, c10::Half>) return fwd_f16;
    else if constexpr (std::is_same_v<T, c10::BFloat16>) return fwd_bf16;
    else return fwd_f64;
  }
  template <typename T> auto bwd() const {
    if constexpr (std::is_same_v<T, float>) return bwd_f32;
    else if constexpr (std::is_same_v<T, c10::Half>) return bwd_f16;
    else if constexpr (std::is_same_v<T, c10::BFloat16>) return bwd_bf16;
    else return bwd_f64;
  }
};

// One table per ISA, as for the norms; the ones not compiled for this target return null.
const ActivationKernels* activation_kernels_default();
const ActivationKernels* activation_kernels_avx2();
const ActivationKernels* activation_kernels_avx512();
const ActivationKernels* activation_kernels_avx512_bf16();

}  // namespace archext::cpu
