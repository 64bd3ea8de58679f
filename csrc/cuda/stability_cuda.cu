// CUDA kernels of the stability family: cross-entropy (forward, backward), the attention softmax
// with soft-cap / mask / bias (forward, backward) and the pointwise soft-cap. The formulas are
// those of common/stability_math.h (shared with the CPU kernels), over the CUDA math library's
// expf / tanhf / logf (no fast-math intrinsics); float32 arithmetic; 64-bit offsets.
//
// Cross-entropy: one block per row. Each thread keeps an online (max, sum of exp(z - max)) over
// its strided share of the row (16-byte packs where the rows allow), one expf per element; the
// block merges the pairs. No host sync:
// a target outside [0, V) that is not ignore_index trips a device assert, as F.cross_entropy's.
// Softmax: one block per row, three sweeps (max, sum, write) recomputing the capped score.
#include <algorithm>

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "common/stability_host.h"
#include "common/stability_math.h"
#include "common/stability_params.h"
#include "cuda/cuda_utils.cuh"

namespace archext::ARCHEXT_CUDA_NS {
namespace {

constexpr int kThreads = 256;

struct MaxSum {
  float m, s;
};

// Merges two online (max, sum) pairs; a NaN max stays NaN.
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  if (a.m != a.m || b.m != b.m) return {NAN, NAN};
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off)};
    v = merge(v, o);
  }
  return v;
}

template <typename V, typename F>
__device__ __forceinline__ V block_reduce(V v, V* smem, V identity, F f) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = f(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? smem[lane] : identity;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = f(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float capped(float x, float cap, float inv_cap) {
  return cap != 0.f ? cap * tanhf(x * inv_cap) : x;
}

// One logit z into a thread's online (max, sum of exp(z - max)) and its sum of z.
__device__ __forceinline__ void ce_update(MaxSum& ms, float& zsum, float z) {
  zsum += z;
  if (z > ms.m) {
    ms.s = ms.s * expf(ms.m - z) + 1.f;
    ms.m = z;
  } else if (z != z) {
    ms = {NAN, NAN};
  } else if (ms.m > -INFINITY) {
    // Neither NaN nor -inf: with ms.m = -inf, z is -inf too and adds exp(-inf) = 0, where
    // expf(z - ms.m) would be expf(NaN) (a thread whose first logit is masked out).
    ms.s += expf(z - ms.m);
  }
}

// VEC > 1: the row read as 16-byte packs, two in flight per thread (the caller checks that
// vocab and the row stride are multiples of VEC and the logits 16-byte aligned); VEC = 1: one
// element at a time, any stride or alignment.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) ce_fwd_kernel(const CrossEntropyParams<T, float> p) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(kThreads);
  ARCHEXT_SHARED(float, smem_m, [32]);
  ARCHEXT_SHARED(float, smem_s, [32]);
  ARCHEXT_SHARED(float, smem_z, [32]);
  const int64_t r = blockIdx.x;
  const int64_t t = p.target[r];
  if (t == p.ignore_index) {
    if (threadIdx.x == 0) p.loss[r] = p.z_loss[r] = p.lse[r] = 0.f;
    return;
  }
  CUDA_KERNEL_ASSERT(t >= 0 && t < p.vocab && "archext::cross_entropy: target out of range");
  const T* x = p.logits + r * p.stride;
  MaxSum ms{-INFINITY, 0.f};
  float zsum = 0.f;
  if constexpr (VEC > 1) {
    const int64_t packs = p.vocab / VEC;
    for (int64_t i = threadIdx.x; i < packs; i += 2 * blockDim.x) {
      const Pack<T, VEC> a = load_pack<T, VEC>(x, i);
      const bool has_b = i + blockDim.x < packs;
      Pack<T, VEC> b;
      if (has_b) b = load_pack<T, VEC>(x, i + blockDim.x);
#pragma unroll
      for (int k = 0; k < VEC; ++k) ce_update(ms, zsum, capped(static_cast<float>(a.v[k]), p.cap, p.inv_cap));
      if (has_b) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) ce_update(ms, zsum, capped(static_cast<float>(b.v[k]), p.cap, p.inv_cap));
      }
    }
  } else {
    for (int64_t j = threadIdx.x; j < p.vocab; j += blockDim.x) {
      ce_update(ms, zsum, capped(static_cast<float>(x[j]), p.cap, p.inv_cap));
    }
  }
  ms = warp_merge(ms);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    smem_m[warp] = ms.m;
    smem_s[warp] = ms.s;
  }
  zsum = block_reduce(zsum, smem_z, 0.f, [](float a, float b) { return a + b; });
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / 32;
    MaxSum v = lane < nw ? MaxSum{smem_m[lane], smem_s[lane]} : MaxSum{-INFINITY, 0.f};
    v = warp_merge(v);
    if (lane == 0) {
      const float lse = isinf(v.m) ? v.m : v.m + logf(v.s);
      const float zt = capped(static_cast<float>(x[t]), p.cap, p.inv_cap);
      p.lse[r] = lse;
      p.z_loss[r] = p.coef * lse * lse;
      p.loss[r] = ce_row_loss<float>(lse, zt, zsum, static_cast<float>(p.vocab), p.eps, p.coef);
    }
  }
}

// VEC as for ce_fwd_kernel (the gradient is a fresh contiguous tensor: aligned whenever the
// logits' rows are).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) ce_bwd_kernel(const CrossEntropyParams<T, float> p) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(kThreads);
  const int64_t r = blockIdx.y;
  const int64_t t = p.target[r];
  T* g = p.grad_logits + r * p.vocab;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t packs = p.vocab / VEC;
  if (t == p.ignore_index) {
    Pack<T, VEC> zero;
#pragma unroll
    for (int k = 0; k < VEC; ++k) zero.v[k] = T(0.f);
    for (int64_t i = j0; i < packs; i += step) store_pack<T, VEC>(g, i, zero);
    return;
  }
  CUDA_KERNEL_ASSERT(t >= 0 && t < p.vocab && "archext::cross_entropy: target out of range");
  const T* x = p.logits + r * p.stride;
  const float gl = p.grad_loss[r];
  const float gz = p.grad_z_loss != nullptr ? p.grad_z_loss[r] : 0.f;
  const float lse = p.lse[r];
  const float a = gl + 2.f * p.coef * lse * (gl + gz);
  const float c0 = gl * p.eps / static_cast<float>(p.vocab);
  const float hot = gl * (1.f - p.eps);
  for (int64_t i = j0; i < packs; i += step) {
    const Pack<T, VEC> in = load_pack<T, VEC>(x, i);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float xv = static_cast<float>(in.v[k]);
      float z = xv, slope = 1.f;
      if (p.cap != 0.f) {
        const float th = tanhf(xv * p.inv_cap);
        z = p.cap * th;
        slope = softcap_slope(th);
      }
      const int64_t j = i * VEC + k;
      out.v[k] = static_cast<T>((expf(z - lse) * a - c0 - (j == t ? hot : 0.f)) * slope);
    }
    store_pack<T, VEC>(g, i, out);
  }
}

// The pack width of the cross-entropy kernels for these logits: 16 bytes where the rows allow it.
template <typename T>
int ce_vec(const CrossEntropyParams<T, float>& p) {
  constexpr int kVec = 16 / sizeof(T);
  const bool ok = vector_paths() && p.vocab % kVec == 0 && p.stride % kVec == 0 &&
                  aligned16(p.logits) && aligned16(p.grad_logits);
  return ok ? kVec : 1;
}

template <typename T>
__device__ __forceinline__ float score(const SoftmaxParams<T, float>& p, const T* x, const T* bias,
                                       int64_t j) {
  float s = capped(static_cast<float>(x[j]) * p.scale, p.cap, p.inv_cap);
  if (bias != nullptr) s += static_cast<float>(bias[j * p.bias_stride[3]]);
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_fwd_kernel(const SoftmaxParams<T, float> p) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(kThreads);
  ARCHEXT_SHARED(float, smem, [32]);
  const int64_t r = blockIdx.x;
  const int64_t i = r % p.sq, bh = r / p.sq;
  const T* x = p.x + r * p.sk;
  T* y = p.y + r * p.sk;
  const T* bias = nullptr;
  if (p.bias != nullptr) {
    bias = p.bias + (bh / p.heads) * p.bias_stride[0] + (bh % p.heads) * p.bias_stride[1] +
           i * p.bias_stride[2];
  }
  int64_t lo, hi;
  softmax_key_range(i, p.sq, p.sk, p.causal, p.window, lo, hi);
  float m = -INFINITY;
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    const float s = score(p, x, bias, j);
    m = (s > m || s != s) ? s : m;
  }
  m = block_reduce(m, smem, -INFINITY,
                   [](float a, float b) { return (a != a || b != b) ? NAN : fmaxf(a, b); });
  float sum = 0.f;
  if (m != -INFINITY) {
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) sum += expf(score(p, x, bias, j) - m);
  }
  sum = block_reduce(sum, smem, 0.f, [](float a, float b) { return a + b; });
  const float inv = (m != -INFINITY && hi > lo) ? 1.f / sum : 0.f;
  for (int64_t j = threadIdx.x; j < p.sk; j += blockDim.x) {
    const bool visible = j >= lo && j < hi && m != -INFINITY;
    y[j] = static_cast<T>(visible ? expf(score(p, x, bias, j) - m) * inv : 0.f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_bwd_kernel(const SoftmaxParams<T, float> p) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(kThreads);
  ARCHEXT_SHARED(float, smem, [32]);
  const int64_t r = blockIdx.x;
  const T* dy = p.dy + r * p.sk;
  const T* y = p.y_in + r * p.sk;
  float dot = 0.f;
  for (int64_t j = threadIdx.x; j < p.sk; j += blockDim.x) {
    dot += static_cast<float>(dy[j]) * static_cast<float>(y[j]);
  }
  dot = block_reduce(dot, smem, 0.f, [](float a, float b) { return a + b; });
  for (int64_t j = threadIdx.x; j < p.sk; j += blockDim.x) {
    const float s = static_cast<float>(y[j]) * (static_cast<float>(dy[j]) - dot);
    if (p.ds != nullptr) p.ds[r * p.sk + j] = static_cast<T>(s);
    float d = s * p.scale;
    if (p.cap != 0.f) d *= softcap_slope(tanhf(static_cast<float>(p.x[r * p.sk + j]) * p.scale * p.inv_cap));
    p.dx[r * p.sk + j] = static_cast<T>(d);
  }
}

template <typename T, bool kBwd>
__global__ void softcap_kernel(const T* x, const T* dy, T* y, int64_t n, float cap, float inv_cap) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const float th = tanhf(static_cast<float>(x[i]) * inv_cap);
    y[i] = static_cast<T>(kBwd ? static_cast<float>(dy[i]) * softcap_slope(th) : cap * th);
  }
}

// Grid dimensions: rows go on x (up to 2^31 - 1) for the per-row kernels; the backward puts
// rows on y (up to 65535 per launch), so it is launched in slices of rows.
constexpr int64_t kMaxGridY = 65535;

struct Cuda {
  static void ce_fwd(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                     double eps, double coef, double cap, const at::Tensor& loss,
                     const at::Tensor& z_loss, const at::Tensor& lse) {
    c10::cuda::CUDAGuard guard(logits.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_float(logits.scalar_type(), "archext::cross_entropy_fwd", [&]<typename T>() {
      auto p = ce_params<T, float>(logits, target, ignore_index, eps, coef, cap);
      p.loss = loss.data_ptr<float>();
      p.z_loss = z_loss.data_ptr<float>();
      p.lse = lse.data_ptr<float>();
      const unsigned grid = grid_x(p.rows, "archext::cross_entropy_fwd");
      if (ce_vec(p) > 1) {
        launch<ce_fwd_kernel<T, 16 / sizeof(T)>>(grid, kThreads, 0, stream, p);
      } else {
        launch<ce_fwd_kernel<T, 1>>(grid, kThreads, 0, stream, p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void ce_bwd(const at::Tensor& grad_loss, const at::Tensor& grad_z_loss,
                     const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                     int64_t ignore_index, double eps, double coef, double cap,
                     const at::Tensor& grad) {
    c10::cuda::CUDAGuard guard(logits.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_float(logits.scalar_type(), "archext::cross_entropy_bwd", [&]<typename T>() {
      auto p = ce_params<T, float>(logits, target, ignore_index, eps, coef, cap);
      p.grad_loss = grad_loss.data_ptr<float>();
      p.grad_z_loss = grad_z_loss.defined() ? grad_z_loss.data_ptr<float>() : nullptr;
      p.grad_logits = reinterpret_cast<T*>(grad.data_ptr());
      const int vec = ce_vec(p);
      const unsigned bx = static_cast<unsigned>(
          std::min<int64_t>((p.vocab / vec + kThreads - 1) / kThreads, 64));
      for (int64_t r0 = 0; r0 < p.rows; r0 += kMaxGridY) {
        auto q = p;
        const int64_t n = std::min(kMaxGridY, p.rows - r0);
        q.logits = p.logits + r0 * p.stride;
        q.target = p.target + r0;
        q.grad_loss = p.grad_loss + r0;
        q.grad_z_loss = p.grad_z_loss != nullptr ? p.grad_z_loss + r0 : nullptr;
        q.lse = const_cast<float*>(lse.data_ptr<float>()) + r0;
        q.grad_logits = p.grad_logits + r0 * p.vocab;
        const dim3 grid(bx, static_cast<unsigned>(n));
        if (vec > 1) {
          launch<ce_bwd_kernel<T, 16 / sizeof(T)>>(grid, kThreads, 0, stream, q);
        } else {
          launch<ce_bwd_kernel<T, 1>>(grid, kThreads, 0, stream, q);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }

  static void softmax_fwd(const at::Tensor& x, const at::Tensor& bias, double scale, double cap,
                          bool causal, int64_t window, const at::Tensor& y) {
    c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_float(x.scalar_type(), "archext::softmax_fwd", [&]<typename T>() {
      const auto p = softmax_fwd_params<T, float>(x, bias, scale, cap, causal, window, y);
      launch<softmax_fwd_kernel<T>>(grid_x(p.rows, "archext::softmax_fwd"), kThreads, 0, stream, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void softmax_bwd(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& x,
                          double scale, double cap, const at::Tensor& dx, const at::Tensor& ds) {
    c10::cuda::CUDAGuard guard(y.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_float(y.scalar_type(), "archext::softmax_bwd", [&]<typename T>() {
      const auto p = softmax_bwd_params<T, float>(dy, y, x, scale, cap, dx, ds);
      launch<softmax_bwd_kernel<T>>(grid_x(p.rows, "archext::softmax_bwd"), kThreads, 0, stream, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  template <bool kBwd>
  static void softcap(const at::Tensor& dy, const at::Tensor& x, double cap, const at::Tensor& y) {
    c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_float(x.scalar_type(), "archext::softcap", [&]<typename T>() {
      const int64_t n = x.numel();
      const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 20);
      launch<softcap_kernel<T, kBwd>>(
          blocks, kThreads, 0, stream,
          reinterpret_cast<const T*>(x.data_ptr()),
          kBwd ? reinterpret_cast<const T*>(dy.data_ptr()) : nullptr,
          reinterpret_cast<T*>(y.data_ptr()), n, static_cast<float>(cap),
          static_cast<float>(1.0 / cap));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  static void softcap_fwd(const at::Tensor& x, double cap, const at::Tensor& y) {
    softcap<false>(at::Tensor(), x, cap, y);
  }
  static void softcap_bwd(const at::Tensor& dy, const at::Tensor& x, double cap, const at::Tensor& dx) {
    softcap<true>(dy, x, cap, dx);
  }
};

}  // namespace

ARCHEXT_CUDA_LIBRARY_IMPL(m) { register_stability_ops<Cuda>(m); }

}  // namespace archext::ARCHEXT_CUDA_NS
