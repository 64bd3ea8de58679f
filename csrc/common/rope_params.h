// Kernel parameters of RoPE, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

namespace archext {

// One tensor (q or k) of logical shape [B, S, H, D] with any strides but a unit stride on D.
template <typename T>
struct RopeTensor {
  const T* x;
  T* y;  // may equal x (in place)
  int64_t xs_b, xs_s, xs_h;  // element strides of x
  int64_t ys_b, ys_s, ys_h;  // element strides of y
  int64_t heads;
};

template <typename T>
struct RopeParams {
  RopeTensor<T> t[2];    // q and k (same B, S, D; heads may differ, as in grouped-query attention)
  int64_t batch, seq, head_dim;
  const float* cos;      // [P, R/2] float32 cache
  const float* sin;      // [P, R/2]
  int64_t half;          // R/2 (R = rotary_dim <= head_dim)
  const int64_t* pos;    // positions: [S] (pos_bstride 0) or [B, S]
  int64_t pos_bstride;
  bool interleaved;
  float sign;            // +1 forward, -1 backward (inverse rotation)
};

}  // namespace archext
