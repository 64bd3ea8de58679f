// Stability-family kernels compiled for the 'avx512' ISA (the body is cpu/stability_isa.inc).
#define ARCHEXT_ISA_SUFFIX avx512
#define ARCHEXT_ISA_ID 2
#include "cpu/stability_isa.inc"
