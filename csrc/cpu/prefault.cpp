#include "cpu/prefault.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdio>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace archext::cpu {
namespace {

constexpr int64_t kMinBytes = int64_t{1} << 20;     // smaller outputs: heap memory, mostly warm
constexpr int64_t kBlockBytes = int64_t{256} << 10;  // per block, all outputs together
constexpr uintptr_t kPage = 4096;

std::atomic<int64_t> g_blocks{0}, g_streamed{0};

uintptr_t page_up(uintptr_t a) { return (a + kPage - 1) & ~(kPage - 1); }

#if defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; an older kernel answers EINVAL: nothing happens
#endif

bool switch_on(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

bool enabled() {
  static const bool on = switch_on("ARCHEXT_PREFAULT");
  return on;
}

bool stream_enabled() {
  static const bool on = switch_on("ARCHEXT_STREAM_STORES");
  return on;
}

// Whether the first whole page of [base, base + bytes) is resident (1), not (0), or unknown (-1).
int resident(const void* base, int64_t bytes) {
  const uintptr_t first = page_up(reinterpret_cast<uintptr_t>(base));
  if (first + kPage > reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(bytes)) return -1;
  unsigned char vec = 0;
  if (mincore(reinterpret_cast<void*>(first), kPage, &vec) != 0) return -1;
  return vec & 1;
}

bool fresh(const void* base, int64_t bytes) { return resident(base, bytes) == 0; }

// The last-level cache that one core's data can occupy: the size of one L3 instance as sysfs
// gives it (a CCX's 32 MiB on AMD EPYC, where sysconf answers the whole package's, 384 MiB on
// this machine's host), else sysconf's, else 32 MiB.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      long kib = 0;
      char unit = 0;
      const int got = std::fscanf(f, "%ld%c", &kib, &unit);
      std::fclose(f);
      if (got == 2 && unit == 'K' && kib > 0) return static_cast<int64_t>(kib) << 10;
      if (got == 2 && unit == 'M' && kib > 0) return static_cast<int64_t>(kib) << 20;
    }
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return static_cast<int64_t>(l3 > 0 ? l3 : 32L << 20);
  }();
  return bytes;
}

// The smallest output written with streaming stores: half of one L3 instance (smaller ones are
// better left in the cache for their reader), or ARCHEXT_STREAM_MIN_BYTES when set (a test
// forces the path on any host with it; the cache size differs from host to host).
int64_t stream_min_bytes() {
  static const int64_t bytes = [] {
    if (const char* v = std::getenv("ARCHEXT_STREAM_MIN_BYTES")) {
      char* end = nullptr;
      const long long n = std::strtoll(v, &end, 10);
      if (end != v && *end == '\0' && n >= 0) return static_cast<int64_t>(n);
      std::fprintf(stderr, "archext: ignoring ARCHEXT_STREAM_MIN_BYTES=%s (not a byte count)\n", v);
    }
    return last_level_cache_bytes() / 2;
  }();
  return bytes;
}
#endif

}  // namespace

int64_t prefault_blocks() { return g_blocks.load(std::memory_order_relaxed); }
int64_t streamed_outputs() { return g_streamed.load(std::memory_order_relaxed); }

bool stream_output(const void* base, int64_t bytes, int64_t row_bytes) {
#if defined(__linux__) && (defined(__x86_64__) || defined(__i386__))
  if (!stream_enabled() || bytes < stream_min_bytes()) return false;
  if (reinterpret_cast<uintptr_t>(base) % 64 != 0 || row_bytes % 64 != 0) return false;
  if (resident(base, bytes) != 1) return false;
  g_streamed.fetch_add(1, std::memory_order_relaxed);
  return true;
#else
  (void)base;
  (void)bytes;
  (void)row_bytes;
  return false;
#endif
}

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
