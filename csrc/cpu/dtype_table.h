// One kernel per element type, the shape of every CPU kernel table (cpu/kernel_api.h and the
// other <family>_api.h headers): a launcher picks its entry with get<scalar_t>().
#pragma once

#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace archext::cpu {

// The accumulation type of an element type: float, or double for float64 (gradcheck).
template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <template <typename> class Fn>
struct ByDtype {
  Fn<float> f32;
  Fn<c10::Half> f16;
  Fn<c10::BFloat16> bf16;
  Fn<double> f64;

  template <typename T> Fn<T> get() const {
    if constexpr (std::is_same_v<T, float>) return f32;
    else if constexpr (std::is_same_v<T, c10::Half>) return f16;
    else if constexpr (std::is_same_v<T, c10::BFloat16>) return bf16;
    else return f64;
  }
};

// One kernel per 16-bit element type (the mixed-precision kernels, beside float32).
template <template <typename> class Fn>
struct ByLowDtype {
  Fn<c10::Half> f16;
  Fn<c10::BFloat16> bf16;

  template <typename T> Fn<T> get() const {
    static_assert(std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>);
    if constexpr (std::is_same_v<T, c10::Half>) return f16;
    else return bf16;
  }
};

}  // namespace archext::cpu
