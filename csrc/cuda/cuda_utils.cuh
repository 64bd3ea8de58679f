// Small CUDA helpers shared by the kernel families: packed 16-byte loads, warp and block sums.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#ifdef ARCHEXT_CUDA_EMU
// cuda_runtime.h and c10/cuda's checks, guard and stream, emulated on the CPU.
#include "emu/cuda_runtime_emu.h"
#else
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "common/cuda_vector_paths.h"

// The namespace of the CUDA kernels: archext::cuda, or archext::cuda_emu in the emulated build
// (csrc/emu/cuda_emu.h), so that one library can hold both.
#ifndef ARCHEXT_CUDA_NS
#define ARCHEXT_CUDA_NS cuda
#endif

// Registers a family's CUDA kernels (`m` the torch::Library): for the CUDA key of archext, or in
// the emulated build for the CPU key of archext_emu (archext/testing.py puts them in place of
// the CPU kernels).
#ifdef ARCHEXT_CUDA_EMU
#define ARCHEXT_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(archext_emu, CPU, m)
#else
#define ARCHEXT_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(archext, CUDA, m)
#endif

// A kernel's static shared memory, `T name dims` (ARCHEXT_SHARED(float, red, [1024])); in the
// emulated build a static variable that reads as NaN at the start of each block.
#ifdef ARCHEXT_CUDA_EMU
#define ARCHEXT_SHARED(T, name, dims) \
  static T name dims;                 \
  ::archext::emu::shared_declared(name, sizeof(name))
#else
#define ARCHEXT_SHARED(T, name, dims) __shared__ T name dims
#endif

// The first statement of a kernel declared with __launch_bounds__(B...): the same arguments.
// Plain C++ carries no launch bounds, so in the emulated build each thread checks at entry that
// the block has at most B threads (a GPU refuses such a launch); under nvcc it is nothing.
// tests/test_emu.py checks that every bounded kernel starts with it, with its bounds' arguments.
#ifdef ARCHEXT_CUDA_EMU
#define ARCHEXT_LAUNCH_BOUNDS_CHECK(...) \
  ::archext::emu::check_launch_bounds(#__VA_ARGS__, __FILE__, __LINE__, __VA_ARGS__)
#else
#define ARCHEXT_LAUNCH_BOUNDS_CHECK(...) \
  do {                                   \
  } while (0)
#endif

// A kernel's dynamic shared memory: T name[] of the launch's size.
#ifdef ARCHEXT_CUDA_EMU
#define ARCHEXT_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::archext::emu::dynamic_shared())
#else
#define ARCHEXT_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace archext::ARCHEXT_CUDA_NS {

// Every kernel launch: <<<>>> under nvcc; in the emulated build a run of the grid on the CPU,
// checked (csrc/emu/emu_runtime.cpp). The caller still checks the launch error.
template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Args&... args) {
#ifdef ARCHEXT_CUDA_EMU
  (void)stream;
  emu::launch<Kernel>(grid, block, smem, args...);
#else
  Kernel<<<grid, block, smem, stream>>>(args...);
#endif
}

// VEC elements of T moved as one aligned load/store (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p, int64_t pack) {
  return reinterpret_cast<const Pack<T, VEC>*>(p)[pack];
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, int64_t pack, const Pack<T, VEC>& v) {
  reinterpret_cast<Pack<T, VEC>*>(p)[pack] = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float2 warp_sum(float2 v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, off);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, off);
  }
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `smem` holds 32 float2. Must be reached by all threads of the block.
__device__ __forceinline__ float2 block_sum(float2 v, float2* smem) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the previous call's readers are done with smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? smem[lane] : make_float2(0.f, 0.f);
  return warp_sum(v);
}

// Calls f.template operator()<T>() with T the CUDA element type of `dtype` (float32, float16,
// bfloat16; float64 is refused earlier by check_float_input).
template <typename F>
void dispatch_float(c10::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case c10::kFloat: f.template operator()<float>(); break;
    case c10::kHalf: f.template operator()<c10::Half>(); break;
    case c10::kBFloat16: f.template operator()<c10::BFloat16>(); break;
    default: TORCH_CHECK(false, op, ": no CUDA kernel for dtype ", dtype);
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The packed (16-byte) paths added to kernels after their first version, on unless
// ARCHEXT_CUDA_VECTOR=0 (common/cuda_vector_paths.h): the scalar paths they replace stay, to
// compare against.
inline bool vector_paths() { return cuda_vector_paths(); }

// The device's multiprocessor count, asked once per device (each time when emulated: the tests
// change it).
inline int sm_count(int device) {
#ifdef ARCHEXT_CUDA_EMU
  return emu::sm_count();
#endif
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) device = 0;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    v = std::max(v, 1);
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// A grid's x dimension of n blocks (one per row or token), checked: gridDim.x stops at 2^31 - 1.
inline unsigned grid_x(int64_t n, const char* op) {
  TORCH_CHECK(n <= INT32_MAX, op, ": the CUDA kernel takes at most 2^31 - 1 rows per call, got ", n);
  return static_cast<unsigned>(n);
}

// How many blocks of Kernel at `threads` threads (no dynamic shared memory) are resident on the
// whole device at once: a grid-stride kernel launched with no more than that runs in one wave,
// with no tail of partly filled SMs. Asked once per kernel, device and block size.
template <auto Kernel>
int64_t resident_blocks(int threads, int device) {
  static std::atomic<int> cache[8][33];  // [device][threads / 32]; other devices are asked anew
  const int slot = threads / 32;
  const bool cached = device >= 0 && device < 8 && threads % 32 == 0 && slot <= 32;
  int per_sm = cached ? cache[device][slot].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, threads, 0));
    per_sm = std::max(per_sm, 1);
    if (cached) cache[device][slot].store(per_sm, std::memory_order_relaxed);
  }
  return int64_t{per_sm} * sm_count(device);
}

}  // namespace archext::ARCHEXT_CUDA_NS
