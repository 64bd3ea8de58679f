// The interface between the CPU launchers of the tiled attention and their per-ISA kernels (see
// cpu/kernel_api.h for the pattern). A kernel takes task indices from a shared counter until
// none is left (each task writes its own outputs, so the result does not depend on which thread
// ran which task); the launcher owns threads and allocation.
#pragma once

#include <atomic>
#include <cstdint>

#include "common/attention_math.h"
#include "cpu/dtype_table.h"

namespace archext::cpu {

// Query rows and keys per tile (128 keys: 18% faster forward than 64 at D = 32, measured;
// 128 query rows was slower).
constexpr int64_t kAttnQueryTile = 64;
constexpr int64_t kAttnKeyTile = 128;
// The fused backward's grad_q scratch per worker, at most (beyond it: the two passes).
constexpr int64_t kAttnFusedBwdMaxScratch = int64_t{32} << 20;

// The backward's extra per-row inputs and scratch (float32, or float64 for float64).
template <typename acc_t>
struct AttnBwdScratch {
  const acc_t* delta;     // [B, Hq, Sq]: rowsum(grad_o * o)
  acc_t* bias_partial;    // [B, Hq, L] zeroed, or null: each (b, h) row written by one task
};

template <typename T>
using AttnFwdFn = void (*)(const FlashAttnParams<T, acc_of<T>>&, std::atomic<int64_t>* next,
                           int64_t tasks);
template <typename T>
using AttnBwdFn = void (*)(const FlashAttnParams<T, acc_of<T>>&,
                           const AttnBwdScratch<acc_of<T>>&, std::atomic<int64_t>* next,
                           int64_t tasks);

struct AttentionKernels {
  // Tasks (query tile, b, h), the latest query tiles first (the most keys under a causal mask).
  ByDtype<AttnFwdFn> fwd;
  // Tasks (key tile, b, kv head): grad_k and grad_v of the tile, over the group's query heads.
  ByDtype<AttnBwdFn> bwd_kv;
  // Tasks (query tile, b, h), or (b, h) with all its query tiles when bias_partial is set:
  // grad_q (and the relative-bias partial of (b, h)).
  ByDtype<AttnBwdFn> bwd_q;
  // Tasks (b, kv head), every key tile: grad_k, grad_v and grad_q at once (never with the bias
  // gradient), the same bits as bwd_kv then bwd_q with 3 tile products instead of 6 and one
  // exp per logit instead of two; each worker holds a [group, Sq, Dp] grad_q scratch.
  ByDtype<AttnBwdFn> bwd_fused;
};

const AttentionKernels* attention_kernels_default();
const AttentionKernels* attention_kernels_avx2();
const AttentionKernels* attention_kernels_avx512();
const AttentionKernels* attention_kernels_avx512_bf16();

}  // namespace archext::cpu
