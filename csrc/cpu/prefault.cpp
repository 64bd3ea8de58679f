#include "cpu/prefault.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace archext::cpu {
namespace {

constexpr int64_t kMinBytes = int64_t{1} << 20;     // smaller outputs: heap memory, mostly warm
constexpr int64_t kBlockBytes = int64_t{256} << 10;  // per block, all outputs together
constexpr uintptr_t kPage = 4096;

std::atomic<int64_t> g_blocks{0};

uintptr_t page_up(uintptr_t a) { return (a + kPage - 1) & ~(kPage - 1); }

#if defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; an older kernel answers EINVAL: nothing happens
#endif

bool enabled() {
  static const bool on = [] {
    const char* v = std::getenv("ARCHEXT_PREFAULT");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

// Whether the first whole page of [base, base + bytes) is not resident (false on any error).
bool fresh(void* base, int64_t bytes) {
  const uintptr_t first = page_up(reinterpret_cast<uintptr_t>(base));
  if (first + kPage > reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(bytes)) return false;
  unsigned char resident = 1;
  if (mincore(reinterpret_cast<void*>(first), kPage, &resident) != 0) return false;
  return (resident & 1) == 0;
}
#endif

}  // namespace

int64_t prefault_blocks() { return g_blocks.load(std::memory_order_relaxed); }

void Prefault::add(void* base, int64_t bytes, int64_t unit_bytes) {
#if defined(__linux__)
  if (n_ == 3 || base == nullptr || unit_bytes <= 0 || bytes < kMinBytes || !enabled() ||
      !fresh(base, bytes)) {
    return;
  }
  outs_[n_++] = {base, bytes, unit_bytes};
#else
  (void)base;
  (void)bytes;
  (void)unit_bytes;
#endif
}

int64_t Prefault::block_units(int64_t align) const {
  int64_t per_unit = 0;
  for (int i = 0; i < n_; ++i) per_unit += outs_[i].unit_bytes;
  const int64_t units = std::max<int64_t>(1, kBlockBytes / per_unit);
  return (units + align - 1) / align * align;
}

// The whole pages of the output whose first byte falls in units [b, e): over any split of the
// units into ranges, each page of the output is populated exactly once.
void Prefault::populate(const Out& o, int64_t b, int64_t e) {
#if defined(__linux__)
  const uintptr_t base = reinterpret_cast<uintptr_t>(o.base);
  const uintptr_t lo = page_up(base);
  const uintptr_t hi = (base + static_cast<uintptr_t>(o.bytes)) & ~(kPage - 1);
  const uintptr_t s = std::max(lo, page_up(base + static_cast<uintptr_t>(b * o.unit_bytes)));
  const uintptr_t t = std::min(hi, page_up(base + static_cast<uintptr_t>(e * o.unit_bytes)));
  if (t > s && madvise(reinterpret_cast<void*>(s), t - s, MADV_POPULATE_WRITE) == 0) {
    g_blocks.fetch_add(1, std::memory_order_relaxed);
  }
#else
  (void)o;
  (void)b;
  (void)e;
#endif
}

}  // namespace archext::cpu
