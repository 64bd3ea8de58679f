// Attention kernels compiled for the 'avx512_bf16' ISA, AVX-512 with its BF16 conversion
// instructions (the body is cpu/attention_isa.inc).
#define ARCHEXT_ISA_SUFFIX avx512_bf16
#define ARCHEXT_ISA_ID 3
#include "cpu/attention_isa.inc"
