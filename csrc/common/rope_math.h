// Rotary position embedding (RoPE; Su et al. 2021, "RoFormer"), shared by the CPU and CUDA
// kernels. A pair (a, b) of a head vector at position p, with frequency index i:
//   angle = p * base^(-2i / rotary_dim)      (cos/sin come from a float32 cache, see below)
//   forward:   a' = a cos - b sin,   b' = b cos + a sin
//   backward:  the inverse rotation, i.e. the same with sin -> -sin (rotations are orthogonal)
// Pairs: half-rotation (GPT-NeoX / Llama `rotate_half`): (i, i + R/2), i < R/2;
//        interleaved (GPT-J): (2i, 2i + 1).
// Dimensions R..D-1 (partial rotary) pass through unchanged.
#pragma once

#include "common/macros.h"

namespace archext {

template <typename acc_t>
ARCHEXT_HD void rope_rotate(acc_t a, acc_t b, acc_t c, acc_t s, acc_t& a_out, acc_t& b_out) {
#if defined(__CUDA_ARCH__)
  // Each product rounded, then the sum: nvcc would otherwise fuse one product or the other into
  // an FMA, differently in the packed and scalar kernels. So every CUDA path rounds as the CPU
  // kernels do (built with -ffp-contract=off): the same bits everywhere.
  a_out = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
  b_out = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
#else
  a_out = a * c - b * s;
  b_out = b * c + a * s;
#endif
}

}  // namespace archext
