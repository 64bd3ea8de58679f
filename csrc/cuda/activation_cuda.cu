// CUDA kernels of the activation family (plain and gated, forward and backward). The formulas
// are those of common/activation_math.h (shared with the CPU kernels), here over the CUDA math
// library's expf / erff (max error 2 ulp each, no fast-math intrinsics); the checks and
// op entry points are in common/activation_host.h.
//
// Layout: every tensor is `rows` rows of `n` contiguous elements at its own row stride (see
// common/activation_params.h); contiguous tensors come folded into one row. Each thread moves
// 16-byte packs (VEC elements) when n, every row stride and every pointer allow it, else single
// elements; a grid-stride loop over packs, 64-bit offsets, float32 arithmetic. A folded row
// whose length is not a multiple of VEC runs its last few elements in a second, scalar launch.
#include <algorithm>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/activation_host.h"
#include "common/activation_math.h"
#include "common/activation_params.h"
#include "cuda/cuda_utils.cuh"

namespace archext::ARCHEXT_CUDA_NS {
namespace {

// The math provider of common/activation_math.h on the GPU.
struct CudaMath {
  using V = float;
  using S = float;
  ARCHEXT_HD static float exp(float x) { return ::expf(x); }
  ARCHEXT_HD static float erf(float x) { return ::erff(x); }
  ARCHEXT_HD static float select_le0(float x, float a, float b) { return x <= 0.f ? a : b; }
  ARCHEXT_HD static float select_lt0(float x, float a, float b) { return x < 0.f ? a : b; }
};

constexpr int kThreads = 256;

// (row, pack in the row) of a grid-stride loop's pack i over a [rows, n] grid of VEC-element
// packs, advanced without a division per step (two per thread, at the start).
struct PackCursor {
  int64_t row, col, drow, dcol, ppr;
  __device__ PackCursor(int64_t i, int64_t stride, int64_t packs_per_row, int64_t rows)
      : ppr(packs_per_row) {
    if (rows == 1) {  // a folded single row: no division at all
      row = 0, col = i, drow = 0, dcol = stride;
    } else {
      row = i / ppr, col = i - row * ppr;
      drow = stride / ppr, dcol = stride - drow * ppr;
    }
  }
  // To pack i + stride (dcol < ppr, or the single row's loop ends before col is read again).
  __device__ void advance() {
    col += dcol;
    row += drow;
    if (col >= ppr) {
      col -= ppr;
      ++row;
    }
  }
};

// The grid-stride loop over a [rows, n] grid of VEC-element packs: f(row, pack in the row) for
// each of this thread's packs.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_pack(int64_t rows, int64_t n, F&& f) {
  const int64_t ppr = n / VEC;
  const int64_t total = rows * ppr;
  if (total == 0) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  PackCursor at(i0, stride, ppr, rows);
  for (int64_t i = i0; i < total; i += stride, at.advance()) f(at.row, at.col);
}

template <typename T, int VEC, Activation A, bool kGated>
__global__ void act_fwd_kernel(const ActFwdParams<T> p) {
  for_each_pack<VEC>(p.rows, p.n, [&](int64_t row, int64_t pack) {
    const auto xv = load_pack<T, VEC>(p.x + row * p.x_stride, pack);
    Pack<T, VEC> uv, out;
    if constexpr (kGated) uv = load_pack<T, VEC>(p.up + row * p.up_stride, pack);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float y = act_forward<A, CudaMath>(static_cast<float>(xv.v[k]));
      if constexpr (kGated) y *= static_cast<float>(uv.v[k]);
      out.v[k] = static_cast<T>(y);
    }
    store_pack<T, VEC>(p.y + row * p.y_stride, pack, out);
  });
}

template <typename T, int VEC, Activation A, bool kGated>
__global__ void act_bwd_kernel(const ActBwdParams<T> p) {
  for_each_pack<VEC>(p.rows, p.n, [&](int64_t row, int64_t pack) {
    const auto dv = load_pack<T, VEC>(p.dy + row * p.dy_stride, pack);
    const auto xv = load_pack<T, VEC>(p.x + row * p.x_stride, pack);
    Pack<T, VEC> uv, dx, du;
    if constexpr (kGated) uv = load_pack<T, VEC>(p.up + row * p.up_stride, pack);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = static_cast<float>(dv.v[k]);
      float y;
      if constexpr (kGated) {
        dx.v[k] = static_cast<T>(act_backward<A, CudaMath>(static_cast<float>(xv.v[k]),
                                                           d * static_cast<float>(uv.v[k]), y));
        du.v[k] = static_cast<T>(d * y);
      } else {
        dx.v[k] = static_cast<T>(act_backward<A, CudaMath>(static_cast<float>(xv.v[k]), d, y));
      }
    }
    store_pack<T, VEC>(p.dx + row * p.dx_stride, pack, dx);
    if constexpr (kGated) store_pack<T, VEC>(p.dup + row * p.dup_stride, pack, du);
  });
}

// Enough blocks to fill the GPU and no more (what is resident at once: one wave, no tail of
// partly filled SMs); the grid-stride loop covers the rest.
template <auto Kernel>
int64_t grid_for(int64_t packs, int device) {
  const int64_t want = (packs + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min(want, resident_blocks<Kernel>(kThreads, device)));
}

// Calls f.template operator()<A, kGated>() for the runtime activation and gating.
template <typename F>
void dispatch_act(Activation act, bool gated, F&& f) {
  auto with = [&]<Activation A>() {
    if (gated) {
      f.template operator()<A, true>();
    } else {
      f.template operator()<A, false>();
    }
  };
  switch (act) {
    case Activation::kRelu: with.template operator()<Activation::kRelu>(); break;
    case Activation::kGelu: with.template operator()<Activation::kGelu>(); break;
    case Activation::kGeluTanh: with.template operator()<Activation::kGeluTanh>(); break;
    case Activation::kSilu: with.template operator()<Activation::kSilu>(); break;
  }
}

// The widest pack (16 bytes, or 1 element) that every row of every operand allows: n and every
// row stride a multiple of it (so that rows stay aligned), every pointer 16-byte aligned. A
// folded single row only needs the pointers aligned (its tail runs separately).
template <typename T>
int pack_width(int64_t rows, int64_t n,
               std::initializer_list<std::pair<const void*, int64_t>> ops) {
  constexpr int kVec = 16 / sizeof(T);
  if (rows > 1 && n % kVec != 0) return 1;
  for (const auto& [ptr, stride] : ops) {
    if (ptr == nullptr) continue;
    if (!aligned16(ptr) || (rows > 1 && stride % kVec != 0)) return 1;
  }
  return kVec;
}

template <typename T, int VEC, Activation A, bool kGated>
void launch_fwd(const ActFwdParams<T>& p, int device, cudaStream_t stream) {
  const int64_t packs = p.rows * (p.n / VEC);
  if (packs > 0) {
    launch<act_fwd_kernel<T, VEC, A, kGated>>(
        grid_for<act_fwd_kernel<T, VEC, A, kGated>>(packs, device), kThreads, 0, stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if constexpr (VEC > 1) {
    const int64_t done = (p.n / VEC) * VEC;  // a folded row's tail (rows == 1 here)
    if (done < p.n) {
      ActFwdParams<T> t = p;
      t.x += done;
      if constexpr (kGated) t.up += done;
      t.y += done;
      t.n = p.n - done;
      launch<act_fwd_kernel<T, 1, A, kGated>>(1, kThreads, 0, stream, t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

template <typename T, int VEC, Activation A, bool kGated>
void launch_bwd(const ActBwdParams<T>& p, int device, cudaStream_t stream) {
  const int64_t packs = p.rows * (p.n / VEC);
  if (packs > 0) {
    launch<act_bwd_kernel<T, VEC, A, kGated>>(
        grid_for<act_bwd_kernel<T, VEC, A, kGated>>(packs, device), kThreads, 0, stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if constexpr (VEC > 1) {
    const int64_t done = (p.n / VEC) * VEC;
    if (done < p.n) {
      ActBwdParams<T> t = p;
      t.dy += done;
      t.x += done;
      t.dx += done;
      if constexpr (kGated) {
        t.up += done;
        t.dup += done;
      }
      t.n = p.n - done;
      launch<act_bwd_kernel<T, 1, A, kGated>>(1, kThreads, 0, stream, t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

}  // namespace

void act_fwd(const ActFwdArgs& a) {
  c10::cuda::CUDAGuard guard(a.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = a.device.index();
  dispatch_float(a.dtype, "archext act_fwd", [&]<typename T>() {
    const auto p = typed_params<T>(a);
    const int vec = pack_width<T>(a.rows, a.n, {{a.x, a.x_stride}, {a.up, a.up_stride},
                                                {a.y, a.y_stride}});
    dispatch_act(a.act, a.up != nullptr, [&]<Activation A, bool kGated>() {
      if (vec == 1) {
        launch_fwd<T, 1, A, kGated>(p, device, stream);
      } else {
        launch_fwd<T, 16 / sizeof(T), A, kGated>(p, device, stream);
      }
    });
  });
}

void act_bwd(const ActBwdArgs& a) {
  c10::cuda::CUDAGuard guard(a.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = a.device.index();
  dispatch_float(a.dtype, "archext act_bwd", [&]<typename T>() {
    const auto p = typed_params<T>(a);
    const int vec = pack_width<T>(a.rows, a.n, {{a.dy, a.dy_stride}, {a.x, a.x_stride},
                                                {a.up, a.up_stride}, {a.dx, a.dx_stride},
                                                {a.dup, a.dup_stride}});
    dispatch_act(a.act, a.up != nullptr, [&]<Activation A, bool kGated>() {
      if (vec == 1) {
        launch_bwd<T, 1, A, kGated>(p, device, stream);
      } else {
        launch_bwd<T, 16 / sizeof(T), A, kGated>(p, device, stream);
      }
    });
  });
}

ARCHEXT_CUDA_LIBRARY_IMPL(m) { register_activation_ops<act_fwd, act_bwd>(m); }

}  // namespace archext::ARCHEXT_CUDA_NS
