// Whether the CUDA kernels take their packed (16-byte) paths: on unless ARCHEXT_CUDA_VECTOR=0
// (read at the first launch), switched at run time by the tests
// (torch.ops.archext_testing.cuda_vector_paths), which compare the paths bitwise.
#pragma once

#include <atomic>
#include <cstdlib>
#include <string>

namespace archext {

// -1: not read yet; else 0 or 1. One variable for the nvcc and the emulated kernels alike.
inline std::atomic<int> cuda_vector_paths_state{-1};

inline bool cuda_vector_paths() {
  int v = cuda_vector_paths_state.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* e = std::getenv("ARCHEXT_CUDA_VECTOR");
    v = (e == nullptr || std::string(e) != "0") ? 1 : 0;
    int expected = -1;
    if (!cuda_vector_paths_state.compare_exchange_strong(expected, v)) v = expected;
  }
  return v != 0;
}

}  // namespace archext
