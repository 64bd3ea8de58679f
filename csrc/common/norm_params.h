// Kernel parameters of the norm family, shared by the CPU and CUDA kernels (plain structs of
// pointers, passed by value to a CUDA kernel).
#pragma once

#include <cstdint>

namespace archext {

// Mixed precision: TS, the type of the residual stream, may be float32 beside a bfloat16/float16
// T (the branch activations): h = x + residual is then formed, stored and normalised in float32
// and only y is rounded to T. With TS == T every pointer is T.

// Norm forward over rows of width n (all pointers row-contiguous).
template <typename T, typename acc_t, typename TS = T>
struct NormFwdParams {
  const T* x;          // [rows, n]; null when TS != T and there is no add (the input is `residual`)
  const TS* residual;  // [rows, n] or null: h = x + residual is normalised and stored in h; when
                       // TS != T and x is null, the norm's (float32) input itself
  const TS* weight;    // [n] or null (CUDA reads it; the CPU kernels read weight_acc)
  const TS* bias;      // [n] or null
  T* y;                // [rows, n]
  TS* h;               // [rows, n], non-null iff there is an add
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

// Mixed precision (TS float32, T bfloat16/float16): dy is the gradient of the T output y; the
// normalised input, dh and dx are TS.
template <typename T, typename acc_t, typename TS = T>
struct NormBwdParams {
  const T* dy;        // [rows, n]
  const TS* x;        // [rows, n]: the normalised input (h for the fused add variants)
  const TS* weight;   // [n] or null (CUDA reads it; the CPU kernels read weight_acc)
  const acc_t* mean;  // [rows] or null (RMSNorm)
  const acc_t* rstd;  // [rows]
  const TS* dh;       // [rows, n] or null: gradient arriving on h, summed into dx
  TS* dx;             // [rows, n]
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
