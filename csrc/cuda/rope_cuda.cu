// CUDA kernels of RoPE (math in common/rope_math.h): one launch rotates q and k together.
// rope_vec_kernel, where the layout allows: tokens in a grid-stride loop over blocks, the
// block's threads over the token's (head, pack) items, 16-byte packs of pairs (half-rotation: a
// pack of the first half and the matching pack of the second; interleaved: a pack of whole
// pairs) plus, out of place, the pass-through packs of a partial rotary. rope_kernel otherwise:
// one element pair per item of a flat grid-stride loop with 64-bit indices. Both round alike.
#include <algorithm>

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "common/rope_host.h"
#include "common/rope_math.h"
#include "common/rope_params.h"
#include "cuda/cuda_utils.cuh"

namespace archext::ARCHEXT_CUDA_NS {
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

// The packed kernel: VEC elements of T per 16 bytes. The caller checks that every pointer is
// 16-byte aligned, every head / token / batch stride and the rotated and passed-through widths
// are multiples of VEC (so every pack below is aligned), and that the block's threads are a
// multiple of 32. Rotation items first (rot_items per head), then pass-through packs.
template <typename T, int VEC>
__global__ void __launch_bounds__(512) rope_vec_kernel(const RopeParams<T> p, const int rot_items,
                                                       const int items_per_head,
                                                       const int64_t tokens, const int64_t table) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(512);
  const int hq = static_cast<int>(p.t[0].heads);
  const int total = (hq + static_cast<int>(p.t[1].heads)) * items_per_head;
  const int64_t half = p.half;
  for (int64_t tok = blockIdx.x; tok < tokens; tok += gridDim.x) {
    const int64_t b = tok / p.seq, s = tok - b * p.seq;
    const int64_t pos = p.pos[b * p.pos_bstride + s];
    CUDA_KERNEL_ASSERT(pos >= 0 && pos < table && "archext::rope: position outside the cos/sin cache");
    const float* cs = p.cos + pos * half;
    const float* sn = p.sin + pos * half;
    for (int j = threadIdx.x; j < total; j += blockDim.x) {
      const int hh = j / items_per_head, it = j - hh * items_per_head;
      const bool is_q = hh < hq;
      const int64_t h = is_q ? hh : hh - hq;
      // Selects, not p.t[is_q ? 0 : 1]: a dynamic index into the parameters goes to local memory.
      const T* x = is_q ? p.t[0].x + b * p.t[0].xs_b + s * p.t[0].xs_s + h * p.t[0].xs_h
                        : p.t[1].x + b * p.t[1].xs_b + s * p.t[1].xs_s + h * p.t[1].xs_h;
      T* y = is_q ? p.t[0].y + b * p.t[0].ys_b + s * p.t[0].ys_s + h * p.t[0].ys_h
                  : p.t[1].y + b * p.t[1].ys_b + s * p.t[1].ys_s + h * p.t[1].ys_h;
      if (it < rot_items) {
        const int64_t c = static_cast<int64_t>(it) * VEC;
        if (!p.interleaved) {  // pairs (c + e, c + e + half)
          const Pack<T, VEC> a = load_pack<T, VEC>(x + c, 0), bb = load_pack<T, VEC>(x + half + c, 0);
          Pack<T, VEC> oa, ob;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            float ao, bo;
            rope_rotate<float>(static_cast<float>(a.v[e]), static_cast<float>(bb.v[e]), cs[c + e],
                               p.sign * sn[c + e], ao, bo);
            oa.v[e] = static_cast<T>(ao);
            ob.v[e] = static_cast<T>(bo);
          }
          store_pack<T, VEC>(y + c, 0, oa);
          store_pack<T, VEC>(y + half + c, 0, ob);
        } else {  // pairs (c + 2e, c + 2e + 1), frequency c / 2 + e
          const Pack<T, VEC> a = load_pack<T, VEC>(x + c, 0);
          Pack<T, VEC> o;
#pragma unroll
          for (int e = 0; e < VEC / 2; ++e) {
            float ao, bo;
            rope_rotate<float>(static_cast<float>(a.v[2 * e]), static_cast<float>(a.v[2 * e + 1]),
                               cs[c / 2 + e], p.sign * sn[c / 2 + e], ao, bo);
            o.v[2 * e] = static_cast<T>(ao);
            o.v[2 * e + 1] = static_cast<T>(bo);
          }
          store_pack<T, VEC>(y + c, 0, o);
        }
      } else {  // partial rotary, out of place: pass through
        const int64_t c = 2 * half + static_cast<int64_t>(it - rot_items) * VEC;
        store_pack<T, VEC>(y + c, 0, load_pack<T, VEC>(x + c, 0));
      }
    }
  }
}

// Whether rope_vec_kernel<T, VEC> takes these tensors (see its comment).
template <typename T, int VEC>
bool rope_vec_ok(const RopeParams<T>& p, bool in_place) {
  const int64_t rot = p.interleaved ? 2 * p.half : p.half;
  if (!vector_paths() || rot % VEC != 0 || (!in_place && (p.head_dim - 2 * p.half) % VEC != 0)) {
    return false;
  }
  for (const RopeTensor<T>& t : p.t) {
    if (!aligned16(t.x) || !aligned16(t.y)) return false;
    const int64_t strides[] = {t.xs_b, t.xs_s, t.xs_h, t.ys_b, t.ys_s, t.ys_h};
    for (const int64_t st : strides) {
      if (st % VEC != 0) return false;
    }
  }
  return true;
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
    constexpr int kVec = 16 / sizeof(T);
    if (rope_vec_ok<T, kVec>(p, in_place)) {
      const int rot_items = static_cast<int>((interleaved ? 2 * p.half : p.half) / kVec);
      const int per_head = rot_items + static_cast<int>(in_place ? 0 : (p.head_dim - 2 * p.half) / kVec);
      const int64_t per_token = (q.size(2) + k.size(2)) * per_head;
      TORCH_CHECK(per_token <= INT32_MAX, "archext::rope: too many heads x head_dim per token");
      const int vthreads = static_cast<int>(std::clamp<int64_t>((per_token + 31) / 32 * 32, 32, 512));
      const int64_t vblocks = std::min<int64_t>(
          tokens, resident_blocks<rope_vec_kernel<T, kVec>>(vthreads, q.get_device()));
      launch<rope_vec_kernel<T, kVec>>(vblocks, vthreads, 0, stream, p, rot_items, per_head, tokens,
                                                                 cos.size(0));
    } else {
      launch<rope_kernel<T>>(blocks, threads, 0, stream, p, items, total, cos.size(0));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

ARCHEXT_CUDA_LIBRARY_IMPL(m) { register_rope_ops<rope>(m); }

}  // namespace archext::ARCHEXT_CUDA_NS
