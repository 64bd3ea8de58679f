// CUDA kernel of RoPE (math in common/rope_math.h): one launch rotates q and k together.
// Work items: per (token, head of q or k), R/2 pair rotations plus, out of place, the D - R
// pass-through copies of partial rotary; a grid-stride loop with 64-bit indices.
#include <algorithm>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "common/rope_host.h"
#include "common/rope_math.h"
#include "common/rope_params.h"
#include "cuda/cuda_utils.cuh"

namespace archext::cuda {
namespace {

template <typename T>
__global__ void rope_kernel(const RopeParams<T> p, const int64_t items_per_head,
                            const int64_t total, const int64_t table) {
  const int64_t hq = p.t[0].heads, heads = hq + p.t[1].heads;
  const int64_t half = p.half;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t item = idx % items_per_head;
    const int64_t head_all = idx / items_per_head;
    const int64_t hh = head_all % heads, tok = head_all / heads;
    const int64_t b = tok / p.seq, s = tok % p.seq;
    const RopeTensor<T>& rt = p.t[hh < hq ? 0 : 1];
    const int64_t h = hh < hq ? hh : hh - hq;
    const T* x = rt.x + b * rt.xs_b + s * rt.xs_s + h * rt.xs_h;
    T* y = rt.y + b * rt.ys_b + s * rt.ys_s + h * rt.ys_h;
    if (item < half) {
      const int64_t pos = p.pos[b * p.pos_bstride + s];
      CUDA_KERNEL_ASSERT(pos >= 0 && pos < table && "archext::rope: position outside the cos/sin cache");
      const float c = p.cos[pos * half + item];
      const float sn = p.sign * p.sin[pos * half + item];
      const int64_t ia = p.interleaved ? 2 * item : item;
      const int64_t ib = p.interleaved ? 2 * item + 1 : item + half;
      float ao, bo;
      rope_rotate<float>(static_cast<float>(x[ia]), static_cast<float>(x[ib]), c, sn, ao, bo);
      y[ia] = static_cast<T>(ao);
      y[ib] = static_cast<T>(bo);
    } else {
      const int64_t d = 2 * half + (item - half);  // partial rotary: pass through
      y[d] = x[d];
    }
  }
}

}  // namespace

void rope(const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& q,
          const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
          bool interleaved, float sign) {
  const int64_t tokens = q.size(0) * q.size(1);
  if (tokens == 0 || q.size(3) == 0) return;
  c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // rope_fwd_ passes q and k as their own outputs (the same tensors); comparing data pointers
  // would also call an empty q (a null pointer, as is its fresh output) in place.
  const bool in_place = q_out.is_same(q) && k_out.is_same(k);
  const int64_t items = cos.size(1) + (in_place ? 0 : q.size(3) - 2 * cos.size(1));
  const int64_t total = tokens * (q.size(2) + k.size(2)) * items;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t{1} << 20);
  dispatch_float(q.scalar_type(), "archext::rope", [&]<typename T>() {
    const auto p = rope_params<T>(q_out, k_out, q, k, cos, sin, pos, interleaved, sign);
    rope_kernel<T><<<blocks, threads, 0, stream>>>(p, items, total, cos.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(archext, CUDA, m) { register_rope_ops<rope>(m); }

}  // namespace archext::cuda
