// Attention kernels compiled for the 'default' ISA (the body is cpu/attention_isa.inc).
#define ARCHEXT_ISA_SUFFIX default
#define ARCHEXT_ISA_ID 0
#include "cpu/attention_isa.inc"
