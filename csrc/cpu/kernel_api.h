// The interface between the CPU launchers (compiled for the baseline ISA) and the kernels,
// which are compiled once per ISA (csrc/cpu/isa_*.cpp) and chosen at run time (cpu/isa.h).
// A kernel processes a range of rows [begin, end); the launcher owns threading and allocation.
#pragma once

#include <cstdint>

#include "common/activation_params.h"
#include "common/norm_params.h"
#include "cpu/dtype_table.h"

namespace archext::cpu {

using archext::NormBwdParams;
using archext::NormFwdParams;

template <typename T>
using NormFwdFn = void (*)(const NormFwdParams<T, acc_of<T>>&, int64_t begin, int64_t end);
template <typename T>
using NormBwdFn = void (*)(const NormBwdParams<T, acc_of<T>>&, int64_t begin, int64_t end);

// Mixed precision: a float32 residual stream beside bfloat16/float16 activations
// (common/norm_params.h), one kernel per activation dtype.
template <typename T>
using NormFwdMixedFn = void (*)(const NormFwdParams<T, float, float>&, int64_t begin, int64_t end);
template <typename T>
using NormBwdMixedFn = void (*)(const NormBwdParams<T, float, float>&, int64_t begin, int64_t end);

struct NormKernels {
  ByDtype<NormFwdFn> fwd;
  ByDtype<NormBwdFn> bwd;
  ByLowDtype<NormFwdMixedFn> fwd_mixed;
  ByLowDtype<NormBwdMixedFn> bwd_mixed;
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
  ByDtype<ActFwdFn> fwd;
  ByDtype<ActBwdFn> bwd;
  VecMathFnPtr vec_math;
};

// One table per ISA, as for the norms; the ones not compiled for this target return null.
const ActivationKernels* activation_kernels_default();
const ActivationKernels* activation_kernels_avx2();
const ActivationKernels* activation_kernels_avx512();
const ActivationKernels* activation_kernels_avx512_bf16();

}  // namespace archext::cpu
