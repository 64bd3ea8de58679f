#if ARCHEXT_X86 && ARCHEXT_ISA_ID >= 1
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
#undef ARCHEXT_VEC_BYTES
#undef ARCHEXT_ISA_ENABLED
#undef ARCHEXT_X86
