// Fused QK-norm + RoPE kernels compiled for the 'default' ISA (the body is cpu/qk_norm_rope_isa.inc).
#define ARCHEXT_ISA_SUFFIX default
#define ARCHEXT_ISA_ID 0
#include "cpu/qk_norm_rope_isa.inc"
