// Portability macros shared by the C++ (CPU) and CUDA translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ARCHEXT_HD __host__ __device__ __forceinline__
#define ARCHEXT_DEVICE __device__ __forceinline__
#else
#define ARCHEXT_HD inline
#define ARCHEXT_DEVICE inline
#endif
