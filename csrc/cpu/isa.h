// Run-time choice of the CPU kernel ISA, as ATen does for its own kernels: every kernel family is
// compiled for a portable baseline (x86-64 SSE2, or the compiler's default elsewhere), for AVX2
// (+FMA, F16C), for AVX-512 (F, BW, VL) and for AVX-512 with AVX512_BF16 (the same kernels; the
// float32 -> bfloat16 stores round in one instruction), and the best one the CPU supports is
// used. set_cpu_isa chooses a narrower one (the tests check every path on one machine so);
// ARCHEXT_CPU_ISA=default|avx2|avx512|avx512_bf16 in the environment caps everything as if the
// CPU had nothing wider, best_supported_isa() included (the whole suite runs so as on an
// AVX2-only or a baseline x86-64 host).
#pragma once

#include <string>

namespace archext::cpu {

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// Every ISA, narrowest first.
inline constexpr Isa kAllIsas[] = {Isa::kDefault, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16};

Isa best_supported_isa();   // what this CPU and this build support, under ARCHEXT_CPU_ISA
Isa current_isa();          // what the kernels use now
void set_cpu_isa(const std::string& name);  // "default", "avx2", "avx512", "avx512_bf16" or "best"
const char* isa_name(Isa isa);

// The kernel table of the current ISA, from a family's four per-ISA getters (the table
// getters of the ISAs not compiled for this target return null, and are never chosen).
template <typename Table>
const Table& current_table(const Table* (*def)(), const Table* (*avx2)(),
                           const Table* (*avx512)(), const Table* (*avx512_bf16)()) {
  switch (current_isa()) {
    case Isa::kAvx512Bf16: return *avx512_bf16();
    case Isa::kAvx512: return *avx512();
    case Isa::kAvx2: return *avx2();
    default: return *def();
  }
}

}  // namespace archext::cpu
