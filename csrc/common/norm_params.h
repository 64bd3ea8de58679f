// Kernel parameters of the norm family, shared by the CPU and CUDA kernels (plain structs of
// pointers, passed by value to a CUDA kernel).
#pragma once

#include <cstdint>

namespace archext {

// Norm forward over rows of width n (all pointers row-contiguous).
template <typename T, typename acc_t>
struct NormFwdParams {
  const T* x;         // [rows, n]
  const T* residual;  // [rows, n] or null: h = x + residual is normalised and stored in h
  const T* weight;    // [n] or null
  const T* bias;      // [n] or null
  T* y;               // [rows, n]
  T* h;               // [rows, n], non-null iff residual is
  acc_t* mean;        // [rows], written iff layer_norm
  acc_t* rstd;        // [rows]
  int64_t n;
  acc_t eps;
  acc_t weight_offset;  // 1 for Gemma's (1 + w), else 0
  bool layer_norm;      // false: RMSNorm (no mean subtraction)
  // The CPU kernels read the parameters as acc_t, converted once per call: (weight + offset)
  // and bias, [n] or null. The CUDA kernels read weight, bias and weight_offset.
  const acc_t* weight_acc;
  const acc_t* bias_acc;
  // CPU: write y with streaming stores (a large, already resident output, 64-byte aligned
  // rows; see cpu/prefault.h).
  bool stream_y;
  // CUDA: a row of at most 4 packs per thread is held in registers (see cuda/norm_cuda.cu).
  bool reg_row;
};

template <typename T, typename acc_t>
struct NormBwdParams {
  const T* dy;        // [rows, n]
  const T* x;         // [rows, n]: the normalised input (h for the fused add variants)
  const T* weight;    // [n] or null
  const acc_t* mean;  // [rows] or null (RMSNorm)
  const acc_t* rstd;  // [rows]
  const T* dh;        // [rows, n] or null: gradient arriving on h, summed into dx
  T* dx;              // [rows, n]
  acc_t* dweight;     // [n] per-thread partial sum (accumulated into), or null
  acc_t* dbias;       // [n] per-thread partial sum (accumulated into), or null
  int64_t n;
  acc_t weight_offset;
  const acc_t* weight_acc;  // CPU: (weight + offset) as acc_t, [n] or null
  // CUDA: each thread keeps its weight / bias partial sums in registers across its rows (where
  // its packs fit, see cuda/norm_cuda.cu) instead of adding into dweight / dbias row by row.
  bool reg_partials;
};

}  // namespace archext
