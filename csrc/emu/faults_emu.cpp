// Deliberately faulty kernels, compiled only into the emulated build: tests/test_emu.py shows
// that the emulation catches each fault (an error at the launch, or a wrong or NaN result),
// under every schedule. Each sums x (float32, one block of x.numel() <= 1024 threads, a
// multiple of 32) into out[0], as cuda_utils.cuh's block_sum does, with one thing broken.
#include "emu/cuda_emu.h"  // first: the CUDA language for what follows

#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"

namespace archext::cuda_emu {
namespace {

enum class Fault {
  kNone,               // the correct sum
  kMissingBarrier,     // no __syncthreads between the warps' writes to shared memory and the read
  kDroppedShuffle,     // the warp sum's last step (offset 1) left out
  kOffByOne,           // the final loop reads one slot of shared memory past the warps'
  kDivergentBarrier,   // __syncthreads inside a branch taken by half the block
  kExitedLane,         // half a warp returns, the other half shuffles with the full mask
  kDeviceAssert,       // CUDA_KERNEL_ASSERT that fails
  kOverBound,          // __launch_bounds__(128), launched with more threads
};

template <Fault F>
__global__ void __launch_bounds__(F == Fault::kOverBound ? 128 : 1024) faulty_sum_kernel(const float* x, float* out) {
  ARCHEXT_LAUNCH_BOUNDS_CHECK(F == Fault::kOverBound ? 128 : 1024);
  ARCHEXT_SHARED(float, partial, [32]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float v = x[threadIdx.x];
  if constexpr (F == Fault::kExitedLane) {
    if (lane >= 16) return;
  }
  if constexpr (F == Fault::kDeviceAssert) {
    CUDA_KERNEL_ASSERT(v < 0.f && "every x negative");
  }
  for (int off = 16; off > (F == Fault::kDroppedShuffle ? 1 : 0); off >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  if (lane == 0) partial[warp] = v;
  if constexpr (F == Fault::kDivergentBarrier) {
    if (threadIdx.x < blockDim.x / 2) __syncthreads();
  } else if constexpr (F != Fault::kMissingBarrier) {
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float s = 0.f;
    const int warps = blockDim.x / 32 + (F == Fault::kOffByOne ? 1 : 0);
    for (int w = 0; w < warps; ++w) s += partial[w];
    out[0] = s;
  }
}

template <Fault F>
void run(const at::Tensor& x, const at::Tensor& out, int64_t threads, int64_t smem) {
  launch<faulty_sum_kernel<F>>(1, static_cast<unsigned>(threads), static_cast<size_t>(smem),
                               nullptr, x.data_ptr<float>(), out.data_ptr<float>());
}

// kind: a fault above ("missing_barrier", ...) or "none"; threads: the block size (x.numel()
// unless testing the launch checks); smem: dynamic shared memory bytes.
at::Tensor faulty_sum(const at::Tensor& x, const std::string& kind, int64_t threads, int64_t smem) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.numel() >= threads && threads >= 1,
              "emu_faulty_sum: expected x a contiguous float32 vector of at least `threads` (",
              threads, ") elements, got ", x.sizes(), " ", x.scalar_type());
  const auto out = at::empty({1}, x.options());
  if (kind == "none") run<Fault::kNone>(x, out, threads, smem);
  else if (kind == "missing_barrier") run<Fault::kMissingBarrier>(x, out, threads, smem);
  else if (kind == "dropped_shuffle") run<Fault::kDroppedShuffle>(x, out, threads, smem);
  else if (kind == "off_by_one") run<Fault::kOffByOne>(x, out, threads, smem);
  else if (kind == "divergent_barrier") run<Fault::kDivergentBarrier>(x, out, threads, smem);
  else if (kind == "exited_lane") run<Fault::kExitedLane>(x, out, threads, smem);
  else if (kind == "device_assert") run<Fault::kDeviceAssert>(x, out, threads, smem);
  else if (kind == "over_bound") run<Fault::kOverBound>(x, out, threads, smem);
  else TORCH_CHECK(false, "emu_faulty_sum: unknown kind '", kind, "'");
  return out;
}

}  // namespace
}  // namespace archext::cuda_emu

TORCH_LIBRARY_FRAGMENT(archext_testing, m) {
  m.def("emu_faulty_sum(Tensor x, str kind, int threads, int smem) -> Tensor",
        &archext::cuda_emu::faulty_sum);
}
