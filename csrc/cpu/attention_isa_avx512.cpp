// Attention kernels compiled for the 'avx512' ISA (the body is cpu/attention_isa.inc).
#define ARCHEXT_ISA_SUFFIX avx512
#define ARCHEXT_ISA_ID 2
#include "cpu/attention_isa.inc"
