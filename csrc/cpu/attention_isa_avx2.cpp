// Attention kernels compiled for the 'avx2' ISA (the body is cpu/attention_isa.inc).
#define ARCHEXT_ISA_SUFFIX avx2
#define ARCHEXT_ISA_ID 1
#include "cpu/attention_isa.inc"
