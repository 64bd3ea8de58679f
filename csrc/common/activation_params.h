// Kernel parameters of the activation family, shared by the CPU and CUDA kernels (plain structs
// of pointers, passed by value to a CUDA kernel).
//
// Every tensor is addressed as `rows` rows of `n` contiguous elements, row r starting at
// ptr + r * stride (strides in elements, 64-bit). This covers contiguous tensors (stride n, or
// all rows folded into one when every tensor is contiguous), the two halves of a packed
// [..., 2n] gate/up tensor (stride 2n, the up half at ptr + n) and views such as x.chunk(2, -1),
// without copies.
#pragma once

#include <cstdint>

namespace archext {

// The activations, as named in the op schemas: "relu", "gelu" (erf), "gelu_tanh", "silu"
// (common/activation_host.h parses the names; common/activation_math.h has the formulas).
enum class Activation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

// Forward: y = act(x) (up == null) or y = act(x) * up (x is the gate).
template <typename T>
struct ActFwdParams {
  const T* x;   // [rows, n] the activation input (the gate of a GLU)
  const T* up;  // [rows, n] or null
  T* y;         // [rows, n]
  int64_t x_stride, up_stride, y_stride;
  int64_t rows, n;
  Activation act;
};

// Backward: dx = dy * act'(x) (up == null), or the GLU pair
//   dx = dy * up * act'(x)  (the gate's gradient),  dup = dy * act(x).
template <typename T>
struct ActBwdParams {
  const T* dy;  // [rows, n]
  const T* x;   // [rows, n]
  const T* up;  // [rows, n] or null
  T* dx;        // [rows, n]
  T* dup;       // [rows, n], non-null iff up is
  int64_t dy_stride, x_stride, up_stride, dx_stride, dup_stride;
  int64_t rows, n;
  Activation act;
};

}  // namespace archext
