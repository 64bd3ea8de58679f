#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <iterator>

#include <c10/util/Exception.h>

#include "cpu/kernel_api.h"

namespace archext::cpu {
namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  switch (isa) {
    case Isa::kDefault: return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("fma");
    case Isa::kAvx512Bf16:
      return cpu_has(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == Isa::kDefault;
#endif
}

bool built_with(Isa isa) {
  switch (isa) {
    case Isa::kDefault: return true;
    case Isa::kAvx2: return norm_kernels_avx2() != nullptr;
    case Isa::kAvx512: return norm_kernels_avx512() != nullptr;
    case Isa::kAvx512Bf16: return norm_kernels_avx512_bf16() != nullptr;
  }
  return false;
}

Isa parse(const std::string& name) {
  if (name == "default") return Isa::kDefault;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx512_bf16") return Isa::kAvx512Bf16;
  TORCH_CHECK(false, "archext: unknown CPU ISA '", name,
              "', expected one of default, avx2, avx512, avx512_bf16, best");
}

// ARCHEXT_CPU_ISA caps the ISA as if the CPU had nothing wider: best_supported_isa(), the
// tests' list of ISAs and set_cpu_isa all stop there, so one host runs the suite as an AVX2-only
// or a baseline x86-64 host would.
Isa env_cap() {
  static const Isa cap = [] {
    const char* env = std::getenv("ARCHEXT_CPU_ISA");
    const std::string s = env ? env : "";
    return s.empty() || s == "best" ? Isa::kAvx512Bf16 : parse(s);
  }();
  return cap;
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(best_supported_isa())};
  return slot;
}

}  // namespace

Isa best_supported_isa() {
  for (auto it = std::rbegin(kAllIsas); it != std::rend(kAllIsas); ++it) {  // widest first
    if (*it <= env_cap() && cpu_has(*it) && built_with(*it)) return *it;
  }
  return Isa::kDefault;
}

Isa current_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

void set_cpu_isa(const std::string& name) {
  Isa best = best_supported_isa();
  Isa want = name == "best" ? best : parse(name);
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "archext: CPU ISA '", name,
              "' is not supported here (best is '", isa_name(best), "')");
  isa_slot().store(static_cast<int>(want), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kDefault: return "default";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512_bf16";
  }
  return "?";
}

}  // namespace archext::cpu
