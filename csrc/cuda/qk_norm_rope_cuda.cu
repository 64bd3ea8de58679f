// CUDA kernels of the fused QK-norm + RoPE (math: common/qk_norm_rope_params.h). One block per
// (token, tensor): the token's heads are staged in shared memory as float32, each head's (or the
// whole row's) sum of squares is reduced by a warp (or the block), then every rotation pair is
// written once. The backward stages dn = R^T dy the same way; weight gradients go through
// float32 partial rows, one per block, summed afterwards (deterministic, no atomics).
#include <algorithm>

#include <ATen/core/Tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "common/qk_norm_rope_host.h"
#include "common/rope_math.h"
#include "cuda/cuda_utils.cuh"

namespace archext::ARCHEXT_CUDA_NS {
namespace {

constexpr int kThreads = 256;
// H * D staged in shared memory as float32: up to 128 KB (past 48 KB the kernel opts in to the
// larger dynamic shared memory of sm_80+ / sm_90).
constexpr int64_t kMaxRow = 32768;

__device__ __forceinline__ void pair_of(bool interleaved, int64_t half, int64_t r, int64_t& a,
                                        int64_t& b) {
  a = interleaved ? 2 * r : r;
  b = interleaved ? 2 * r + 1 : r + half;
}

// Per-group rstd-like reductions: one warp per head (per_head) or the whole block (one group).
// Returns in red[g] the sum over group g of f(j), j the element index in the row.
template <typename F>
__device__ __forceinline__ void group_sums(int64_t H, int64_t D, bool per_head, float* red,
                                           float2* scratch, F f) {
  if (per_head) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    for (int64_t h = warp; h < H; h += nw) {
      float acc = 0.f;
      for (int64_t d = lane; d < D; d += 32) acc += f(h * D + d);
      acc = warp_sum(acc);
      if (lane == 0) red[h] = acc;
    }
  } else {
    float acc = 0.f;
    for (int64_t j = threadIdx.x; j < H * D; j += blockDim.x) acc += f(j);
    const float2 s = block_sum(make_float2(acc, 0.f), scratch);
    if (threadIdx.x == 0) red[0] = s.x;
  }
  __syncthreads();
}

// The token's position in the cos/sin cache. The CPU checks positions on the host; here an
// out-of-cache one is a device assert (as rope_fwd's), not a read past cos/sin.
template <typename T>
__device__ __forceinline__ int64_t position_of(const QkNormRopeParams<T, float>& p, int64_t tok) {
  const int64_t pos = p.pos[(tok / p.seq) * p.pos_bstride + tok % p.seq];
  CUDA_KERNEL_ASSERT(pos >= 0 && pos < p.table && "archext::qk_norm_rope: position outside the cos/sin cache");
  return pos;
}

// Rotates every pair of a token's H heads of width D by the angles at cos/sin row (c, s), sign
// +1 (forward) or -1 (the inverse, for the backward), reading src(j) and writing dst(j, value);
// the partial-rotary dims pass through. The block's threads share the (head, item) list.
template <typename Src, typename Dst>
__device__ __forceinline__ void rotate_token(int64_t H, int64_t D, int64_t half, bool interleaved,
                                             const float* c, const float* s, float sign, Src src,
                                             Dst dst) {
  const int64_t items = D - half;  // per head: the half pairs, then the D - 2 half pass-through dims
  for (int64_t it = threadIdx.x; it < H * items; it += blockDim.x) {
    const int64_t h = it / items, r = it - h * items;
    if (r < half) {
      int64_t a, b;
      pair_of(interleaved, half, r, a, b);
      float ao, bo;
      rope_rotate<float>(src(h * D + a), src(h * D + b), c[r], sign * s[r], ao, bo);
      dst(h * D + a, ao);
      dst(h * D + b, bo);
    } else {
      const int64_t d = 2 * half + (r - half);
      dst(h * D + d, src(h * D + d));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_fwd_kernel(QkNormRopeParams<T, float> p) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(kThreads);
  ARCHEXT_DYNAMIC_SHARED(float, smem);
  ARCHEXT_SHARED(float, red, [1024]);
  ARCHEXT_SHARED(float2, scratch, [32]);
  const int64_t tok = blockIdx.x;
  const int i = blockIdx.y;
  const int64_t H = p.heads[i], D = p.head_dim, row = H * D;
  const T* x = p.x[i] + tok * row;
  T* y = p.y[i] + tok * row;
  const int64_t pos = position_of(p, tok);
  for (int64_t j = threadIdx.x; j < row; j += blockDim.x) smem[j] = static_cast<float>(x[j]);
  __syncthreads();
  group_sums(H, D, p.per_head, red, scratch, [&](int64_t j) { return smem[j] * smem[j]; });
  const int64_t groups = p.per_head ? H : 1, G = p.per_head ? D : row;
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
    const float rstd = rsqrtf(red[g] / static_cast<float>(G) + p.eps);
    red[g] = rstd;
    p.rstd[i][tok * groups + g] = rstd;
  }
  __syncthreads();
  auto n_at = [&](int64_t j) {
    const int64_t h = j / D;
    const float rstd = red[p.per_head ? h : 0];
    const int64_t widx = p.per_head ? j - h * D : j;
    const float wv = p.w[i] != nullptr ? static_cast<float>(p.w[i][widx]) + p.weight_offset : 1.f;
    return smem[j] * rstd * wv;
  };
  rotate_token(H, D, p.half, p.interleaved, p.cos + pos * p.half, p.sin + pos * p.half, 1.f, n_at,
               [&](int64_t j, float v) { y[j] = static_cast<T>(v); });
}

// Tokens in a grid-stride loop: block b accumulates its tokens' weight-gradient partials in row b
// of p.dw (gridDim.x rows, a few per SM, instead of one per token: 8 MB rather than 512 MB for
// 32k tokens of OLMo 2's 4096-wide q norm).
// At least 3 blocks resident per SM: 80 registers a thread. ptxas held __launch_bounds__(256)
// alone to 64 registers and spilled 8-12 bytes at sm_80 / sm_90; at 2 blocks it takes 112-116.
template <typename T>
__global__ void __launch_bounds__(kThreads, 3) qk_norm_rope_bwd_kernel(QkNormRopeParams<T, float> p) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(kThreads, 3);
  ARCHEXT_DYNAMIC_SHARED(float, dn);
  ARCHEXT_SHARED(float, red, [1024]);
  ARCHEXT_SHARED(float2, scratch, [32]);
  const int i = blockIdx.y;
  const int64_t H = p.heads[i], D = p.head_dim, row = H * D;
  const int64_t groups = p.per_head ? H : 1, G = p.per_head ? D : row;
  const T* w = p.w[i];
  auto wv = [&](int64_t j) {
    const int64_t widx = p.per_head ? j % D : j;
    return w != nullptr ? static_cast<float>(w[widx]) + p.weight_offset : 1.f;
  };
  for (int64_t tok = blockIdx.x; tok < p.tokens; tok += gridDim.x) {
    __syncthreads();  // the previous token's readers of dn and red are done
    const T* x = p.x[i] + tok * row;
    const T* dy = p.dy[i] + tok * row;
    T* dx = p.dx[i] + tok * row;
    const int64_t pos = position_of(p, tok);
    rotate_token(H, D, p.half, p.interleaved, p.cos + pos * p.half, p.sin + pos * p.half, -1.f,
                 [&](int64_t j) { return static_cast<float>(dy[j]); },
                 [&](int64_t j, float v) { dn[j] = v; });
    __syncthreads();
    group_sums(H, D, p.per_head, red, scratch,
               [&](int64_t j) { return dn[j] * wv(j) * static_cast<float>(x[j]); });
    const float* rstd = p.rstd[i] + tok * groups;
    for (int64_t j = threadIdx.x; j < row; j += blockDim.x) {
      const int64_t g = p.per_head ? j / D : 0;
      const float r = rstd[g];
      const float k = r * r * red[g] / static_cast<float>(G);
      dx[j] = static_cast<T>(r * (dn[j] * wv(j) - static_cast<float>(x[j]) * k));
    }
    if (p.dw[i] != nullptr) {
      float* part = p.dw[i] + blockIdx.x * G;
      const bool first = tok == blockIdx.x;  // the row is uninitialised until then
      for (int64_t j = threadIdx.x; j < G; j += blockDim.x) {
        float acc = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t e = g * G + j;
          acc += dn[e] * static_cast<float>(x[e]) * rstd[g];
        }
        part[j] = first ? acc : part[j] + acc;
      }
    }
  }
}

// Opts the kernel in to `bytes` of dynamic shared memory where its static shared memory plus
// `bytes` pass the 48 KiB that every kernel may use without asking.
template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (bytes + attr.sharedSizeBytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

void check_sizes(const at::Tensor& q, const at::Tensor& k) {
  const int64_t row = std::max(q.size(2), k.size(2)) * q.size(3);
  TORCH_CHECK(row <= kMaxRow && std::max(q.size(2), k.size(2)) <= 1024,
              "archext::qk_norm_rope: the CUDA kernel stages heads * head_dim <= ", kMaxRow,
              " (and heads <= 1024) per token, got ", row);
}

struct Cuda {
  static void fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& wq,
                  const at::Tensor& wk, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& pos, double eps, double off, bool per_head, bool interleaved,
                  const at::Tensor& qo, const at::Tensor& ko, const at::Tensor& rq,
                  const at::Tensor& rk) {
    check_sizes(q, k);
    c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_float(q.scalar_type(), "archext::qk_norm_rope", [&]<typename T>() {
      auto p = qk_norm_rope_params<T, float>(q, k, wq, wk, cos, sin, pos, eps, off, per_head, interleaved);
      p.y[0] = reinterpret_cast<T*>(qo.data_ptr());
      p.y[1] = reinterpret_cast<T*>(ko.data_ptr());
      p.rstd[0] = rq.data_ptr<float>();
      p.rstd[1] = rk.data_ptr<float>();
      const size_t shm = std::max(q.size(2), k.size(2)) * q.size(3) * sizeof(float);
      allow_shared(qk_norm_rope_fwd_kernel<T>, shm);
      launch<qk_norm_rope_fwd_kernel<T>>(dim3(grid_x(p.tokens, "archext::qk_norm_rope"), 2), kThreads, shm, stream, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void bwd(const at::Tensor& gq, const at::Tensor& gk, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& wq, const at::Tensor& wk,
                  const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
                  const at::Tensor& rq, const at::Tensor& rk, double off, bool per_head,
                  bool interleaved, const at::Tensor& dq, const at::Tensor& dk,
                  const at::Tensor& dwq, const at::Tensor& dwk) {
    check_sizes(q, k);
    c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_float(q.scalar_type(), "archext::qk_norm_rope", [&]<typename T>() {
      auto p = qk_norm_rope_params<T, float>(q, k, wq, wk, cos, sin, pos, 0.0, off, per_head, interleaved);
      p.dy[0] = reinterpret_cast<const T*>(gq.data_ptr());
      p.dy[1] = reinterpret_cast<const T*>(gk.data_ptr());
      p.dx[0] = reinterpret_cast<T*>(dq.data_ptr());
      p.dx[1] = reinterpret_cast<T*>(dk.data_ptr());
      p.rstd[0] = const_cast<float*>(rq.data_ptr<float>());
      p.rstd[1] = const_cast<float*>(rk.data_ptr<float>());
      // A few blocks per SM, each looping over its share of the tokens (see the kernel).
      const int64_t blocks = std::min<int64_t>(p.tokens, int64_t{4} * sm_count(q.get_device()));
      at::Tensor part[2];
      const at::Tensor* dws[2] = {&dwq, &dwk};
      for (int i = 0; i < 2; ++i) {
        if (p.w[i] == nullptr) continue;
        part[i] = at::empty({blocks, dws[i]->numel()}, q.options().dtype(at::kFloat));
        p.dw[i] = part[i].data_ptr<float>();
      }
      const size_t shm = std::max(q.size(2), k.size(2)) * q.size(3) * sizeof(float);
      allow_shared(qk_norm_rope_bwd_kernel<T>, shm);
      launch<qk_norm_rope_bwd_kernel<T>>(dim3(static_cast<unsigned>(blocks), 2), kThreads, shm, stream, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      for (int i = 0; i < 2; ++i) {
        if (p.w[i] != nullptr) dws[i]->copy_(part[i].sum(0));
      }
    });
  }
};

}  // namespace

ARCHEXT_CUDA_LIBRARY_IMPL(m) { register_qk_norm_rope_ops<Cuda>(m); }

}  // namespace archext::ARCHEXT_CUDA_NS
