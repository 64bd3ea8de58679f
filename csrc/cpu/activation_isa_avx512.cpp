// Activation kernels compiled for the 'avx512' ISA (the body is cpu/activation_isa.inc).
#define ARCHEXT_ISA_SUFFIX avx512
#define ARCHEXT_ISA_ID 2
#include "cpu/activation_isa.inc"
