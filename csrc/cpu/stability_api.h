// The interface between the CPU launchers of the stability family and their per-ISA kernels
// (see cpu/kernel_api.h for the pattern).
#pragma once

#include <cstdint>

#include "common/stability_params.h"
#include "cpu/dtype_table.h"

namespace archext::cpu {

// Elementwise soft-cap over [begin, end) of contiguous tensors.
template <typename T>
struct SoftcapParams {
  const T* x;
  const T* dy;  // backward only
  T* y;         // y (forward) or dx (backward)
  acc_of<T> cap, inv_cap;
};

template <typename T>
using CeFn = void (*)(const CrossEntropyParams<T, acc_of<T>>&, int64_t begin_row, int64_t end_row);
template <typename T>
using SoftmaxFn = void (*)(const SoftmaxParams<T, acc_of<T>>&, int64_t begin_row, int64_t end_row);
template <typename T>
using SoftcapFn = void (*)(const SoftcapParams<T>&, int64_t begin, int64_t end);

struct StabilityKernels {
  ByDtype<CeFn> ce_fwd, ce_bwd;
  ByDtype<SoftmaxFn> softmax_fwd, softmax_bwd;
  ByDtype<SoftcapFn> softcap_fwd, softcap_bwd;
};

const StabilityKernels* stability_kernels_default();
const StabilityKernels* stability_kernels_avx2();
const StabilityKernels* stability_kernels_avx512();
const StabilityKernels* stability_kernels_avx512_bf16();

}  // namespace archext::cpu
