// The CUDA language and runtime on the CPU: the emulated build of csrc/cuda/*.cu. Each
// csrc/emu/<family>_emu.cpp includes this header first, then its .cu file, which so compiles as
// host C++ (the headers of csrc/emu/shim stand in for cuda_runtime.h and c10/cuda). The runtime
// (emu_runtime.cpp) runs a launch's blocks one after another and each GPU thread of a block as a
// fiber that yields only at __syncthreads, __syncwarp and the warp intrinsics; it checks the
// launch, the barriers and the warp masks, and raises a c10::Error naming the kernel, the block,
// the thread and the source line of any violation. docs/reliability.md says what it can and
// cannot show.
#pragma once

#define ARCHEXT_CUDA_EMU 1
// The kernels' namespace: archext::cuda_emu, so that a build with nvcc links both.
#define ARCHEXT_CUDA_NS cuda_emu

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>

#include <c10/macros/Macros.h>

// ---- qualifiers ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Not checked against the launch (plain C++ has no place for it): see docs/reliability.md.
#define __launch_bounds__(...)
// Static shared memory is declared with ARCHEXT_SHARED (cuda/cuda_utils.cuh), which registers
// it with the runtime: filled with 0xFF bytes (NaN) before each block, a read before a write
// shows. (GCC drops a section attribute from the statics of a template, so a plain
// `static __attribute__((section))` cannot stand for __shared__.)
#define __shared__ __shared___is_declared_with_ARCHEXT_SHARED

// ---- vector types -------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// The running thread's coordinates: rewritten by the runtime at every switch between fibers.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

// ---- device math: the host's libm (docs/reliability.md: device math is not emulated) -----
using std::isinf;
using std::isnan;
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

namespace archext::emu {

// The runtime's entry points (emu_runtime.cpp).
enum class WarpOp : int { kSync, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };
void sync_threads(const char* file, int line);
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file,
                 int line);
[[noreturn]] void device_assert_failed(const char* cond, const char* file, int line);
[[noreturn]] void launch_bounds_exceeded(const char* bounds, int max_threads, const char* file,
                                         int line);
// ARCHEXT_LAUNCH_BOUNDS_CHECK: the block within the kernel's __launch_bounds__(max_threads, ...).
inline void check_launch_bounds(const char* bounds, const char* file, int line, int max_threads,
                                int /*min_blocks_per_sm*/ = 0) {
  if (static_cast<int64_t>(blockDim.x) * blockDim.y * blockDim.z > max_threads) {
    launch_bounds_exceeded(bounds, max_threads, file, line);
  }
}
void* dynamic_shared();
// A static shared variable's first execution in a launch (ARCHEXT_SHARED).
void shared_declared(void* p, size_t bytes);
int sm_count();

struct FuncAttributes {
  int max_dynamic_shared;  // the opt-in of cudaFuncSetAttribute; 0: not opted in
};
FuncAttributes& func_attributes(const void* kernel);

using KernelBody = void (*)(const void* args);
void run_grid(const char* kernel_name, const void* kernel, dim3 grid, dim3 block, size_t smem,
              KernelBody body, const void* args);

// "archext::cuda_emu::{anonymous}::norm_fwd_kernel<float, 4, true>" from GCC's and Clang's
// __PRETTY_FUNCTION__ of kernel_name<Kernel>.
std::string kernel_name_from_signature(const char* pretty);

template <auto Kernel>
const char* kernel_name() {
  static const std::string name = kernel_name_from_signature(__PRETTY_FUNCTION__);
  return name.c_str();
}

// The kernel run on every thread of the grid; each thread calls it with its own copies of the
// arguments, converted to the kernel's parameter types as <<<>>> does.
template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, const Args&... args) {
  using Pack = std::tuple<const Args&...>;
  const Pack pack(args...);
  const KernelBody body = [](const void* p) {
    std::apply([](const Args&... a) { Kernel(a...); }, *static_cast<const Pack*>(p));
  };
  run_grid(kernel_name<Kernel>(), reinterpret_cast<const void*>(Kernel), grid, block, smem, body,
           &pack);
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "a warp shuffle moves 4 or 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace archext::emu

// ---- barriers and warp intrinsics: real 32-lane exchanges (emu_runtime.cpp) ---------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  archext::emu::sync_threads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  archext::emu::warp_op(archext::emu::WarpOp::kSync, mask, 0, 0, 32, file, line);
}

#define ARCHEXT_EMU_SHUFFLE(name, op)                                                         \
  template <typename T>                                                                       \
  inline T name(unsigned mask, T v, int arg, int width = 32, const char* file = __builtin_FILE(), \
                int line = __builtin_LINE()) {                                                \
    return archext::emu::from_bits<T>(archext::emu::warp_op(                                  \
        archext::emu::WarpOp::op, mask, archext::emu::to_bits(v), arg, width, file, line));   \
  }
ARCHEXT_EMU_SHUFFLE(__shfl_sync, kShflIdx)
ARCHEXT_EMU_SHUFFLE(__shfl_up_sync, kShflUp)
ARCHEXT_EMU_SHUFFLE(__shfl_down_sync, kShflDown)
ARCHEXT_EMU_SHUFFLE(__shfl_xor_sync, kShflXor)
#undef ARCHEXT_EMU_SHUFFLE

inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(archext::emu::warp_op(archext::emu::WarpOp::kBallot, mask,
                                                     pred != 0, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(
      archext::emu::warp_op(archext::emu::WarpOp::kAny, mask, pred != 0, 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(
      archext::emu::warp_op(archext::emu::WarpOp::kAll, mask, pred != 0, 0, 32, file, line));
}

// A failed device assert ends the launch with an error naming the thread (the GPU's would
// poison the context).
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (C10_UNLIKELY(!(cond))) ::archext::emu::device_assert_failed(#cond, __FILE__, __LINE__)
