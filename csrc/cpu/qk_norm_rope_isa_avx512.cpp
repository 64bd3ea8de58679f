// Fused QK-norm + RoPE kernels compiled for the 'avx512' ISA (the body is cpu/qk_norm_rope_isa.inc).
#define ARCHEXT_ISA_SUFFIX avx512
#define ARCHEXT_ISA_ID 2
#include "cpu/qk_norm_rope_isa.inc"
