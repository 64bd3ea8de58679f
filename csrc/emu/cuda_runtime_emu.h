// The CUDA runtime API and c10/cuda pieces that csrc/cuda/*.cu use (cuda_runtime.h,
// c10/cuda/CUDAException.h, CUDAGuard.h, CUDAStream.h), for the emulated build: included by
// cuda/cuda_utils.cuh in place of those headers when ARCHEXT_CUDA_EMU is defined.
#pragma once

#include <cstddef>

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include "emu/cuda_emu.h"

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid argument";
}
// Launch errors are raised by the launch itself (a c10::Error): nothing is left to report.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = archext::emu::sm_count();
  return cudaSuccess;
}

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;  // static shared memory: not known to the emulation, reported as 0
  int maxDynamicSharedSizeBytes;
  int maxThreadsPerBlock;
};

template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, Kernel kernel) {
  attr->sharedSizeBytes = 0;
  attr->maxDynamicSharedSizeBytes =
      archext::emu::func_attributes(reinterpret_cast<const void*>(kernel)).max_dynamic_shared;
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  // sm_90's limit: 227 KiB of shared memory per block.
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 227 * 1024) {
    return cudaErrorInvalidValue;
  }
  archext::emu::func_attributes(reinterpret_cast<const void*>(kernel)).max_dynamic_shared = value;
  return cudaSuccess;
}

// An H100's: 2048 resident threads and at most 32 blocks per SM (registers and shared memory
// are not modelled).
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int threads,
                                                          size_t /*dynamic_smem*/) {
  if (threads <= 0) return cudaErrorInvalidValue;
  *blocks = threads > 2048 ? 0 : (2048 / threads < 32 ? 2048 / threads : 32);
  return cudaSuccess;
}


#define C10_CUDA_CHECK(EXPR)                                                   \
  do {                                                                         \
    const cudaError_t archext_emu_err = (EXPR);                                \
    TORCH_CHECK(archext_emu_err == cudaSuccess, "CUDA error (emulated): ",     \
                cudaGetErrorString(archext_emu_err), " from ", #EXPR);          \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())

namespace c10::cuda {
// One device: nothing to switch.
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
// Launches run at once, in order.
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
