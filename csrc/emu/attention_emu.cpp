// The CUDA kernels of cuda/attention_cuda.cu compiled as host C++ for the emulated execution
// model (emu/cuda_emu.h), registered under archext_emu.
#include "emu/cuda_emu.h"  // first: the CUDA language for what follows

#include "cuda/attention_cuda.cu"
