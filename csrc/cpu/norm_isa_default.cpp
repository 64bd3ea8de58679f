// Norm kernels compiled for the 'default' ISA (the body is cpu/norm_isa.inc).
#define ARCHEXT_ISA_SUFFIX default
#define ARCHEXT_ISA_ID 0
#include "cpu/norm_isa.inc"
