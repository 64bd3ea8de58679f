// Fresh outputs, faulted in blocks instead of page by page (Linux).
//
// A large tensor that an op allocates is usually a fresh anonymous mapping: the first store to
// each 4 KiB page traps into the OS, which zeroes the page. Here that costs several times the
// op's own work (an allocating copy of 128 MiB runs at about a quarter of the speed of a copy
// into an existing buffer, the rest is page faults). madvise(MADV_POPULATE_WRITE) does the same
// zeroing for a whole range in one call, without a trap per page. Done in blocks of about
// 256 KiB, each just before the rows that write it, the zeroed lines are still in the cache when
// the kernel overwrites them, and each thread faults in its own rows, in parallel, as it would
// have. Memory use is unchanged: every byte of an output is written anyway. The effect on every
// result is none (populating never changes memory contents); the tests check that bitwise.
//
// Populating a range that is already resident costs about as much as faulting it in, so an
// output is only prefaulted when its first whole page is not resident (one mincore call per
// output per op): a reused buffer (glibc's heap, a preallocated output) is left alone.
// ARCHEXT_PREFAULT=0 in the environment turns it off.
//
// The other case, a large output into a buffer that is already resident (a preallocated `out`,
// a reused heap block), gets streaming stores where the kernel supports them (the norm
// forwards): at least half the last-level cache, so that it would evict its own input, and
// 64-byte aligned rows. They skip the read of each line before its write (as memcpy does at
// such sizes). Not for a fresh output: its lines are in the cache already, just zeroed, and a
// streaming store would write them a second time (measured: 10% slower). ARCHEXT_STREAM_STORES=0
// turns it off.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

namespace archext::cpu {

// How many blocks have been populated in this process (a test hook: the tests check that the
// path runs and changes no result).
int64_t prefault_blocks();

// Whether the kernel should write this output with streaming stores (above), and the number of
// outputs it said so for (a test hook).
bool stream_output(const void* base, int64_t bytes, int64_t row_bytes);
int64_t streamed_outputs();

class Prefault {
 public:
  // An output that the kernel writes in order of a unit index (a row, a token, an element):
  // unit u's bytes start near base + u * unit_bytes. Kept only if it is large, fresh and the
  // switch is on.
  void add(void* base, int64_t bytes, int64_t unit_bytes);

  // fn(b, e) over [begin, end) in blocks, each block's part of every kept output populated first;
  // block boundaries are multiples of `align` units (a kernel's vector boundary), as `begin` is.
  template <typename F>
  void run(int64_t begin, int64_t end, F&& fn, int64_t align = 1) const {
    if (n_ == 0) {
      fn(begin, end);
      return;
    }
    const int64_t step = block_units(align);
    for (int64_t b = begin; b < end; b += step) {
      const int64_t e = end - b > step ? b + step : end;
      for (int i = 0; i < n_; ++i) populate(outs_[i], b, e);
      fn(b, e);
    }
  }

 private:
  struct Out {
    void* base;
    int64_t bytes, unit_bytes;
  };
  static void populate(const Out& o, int64_t b, int64_t e);
  int64_t block_units(int64_t align) const;

  Out outs_[3] = {};
  int n_ = 0;
};

// at::parallel_for over `units` (rows, tokens) of fn(b, e), each of `outs` populated block by
// block: the outputs that are contiguous with the unit index outermost (undefined or empty ones,
// and strided ones, whose units are not one run of bytes each, are skipped).
template <typename F>
void parallel_units(int64_t units, int64_t grain, std::initializer_list<const at::Tensor*> outs,
                    F&& fn) {
  Prefault pf;
  for (const at::Tensor* o : outs) {
    if (units > 0 && o->defined() && o->numel() > 0 && o->is_contiguous()) {
      pf.add(o->data_ptr(), o->nbytes(), o->nbytes() / units);
    }
  }
  at::parallel_for(0, units, grain, [&](int64_t b, int64_t e) { pf.run(b, e, fn); });
}

}  // namespace archext::cpu
