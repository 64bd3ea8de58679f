// Fused QK-norm + RoPE kernels compiled for the 'avx2' ISA (the body is cpu/qk_norm_rope_isa.inc).
#define ARCHEXT_ISA_SUFFIX avx2
#define ARCHEXT_ISA_ID 1
#include "cpu/qk_norm_rope_isa.inc"
