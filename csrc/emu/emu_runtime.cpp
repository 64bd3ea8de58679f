// The emulated CUDA execution model (see emu/cuda_emu.h): a launch's blocks run one after
// another on the calling thread; each GPU thread of a block is a fiber on a stack of its own,
// switched by a few instructions of assembly (swapcontext makes a system call per switch).
// A fiber yields only at __syncthreads, __syncwarp and the warp intrinsics, so the order in
// which threads run between two barriers is the schedule's choice: forward, reverse, random
// (seeded) or one warp running ahead as far as it can. Checked, each a c10::Error naming the
// kernel, the block, the thread and the source line:
//   - the launch: grid.x in [1, 2^31), grid.y and grid.z in [1, 65535], at most 1024 threads,
//     dynamic shared memory within 48 KiB or the kernel's opt-in;
//   - every live thread of a block reaches the same __syncthreads, and none exits while others
//     wait at one; no deadlock;
//   - warp collectives: the caller inside the mask, no exited, absent or diverging lanes in it,
//     one mask per warp at a time, no read from a lane outside the mask.
// Shared memory (static and dynamic) is filled with 0xFF bytes (NaN) before each block: the
// static variables of a kernel as they are first declared (ARCHEXT_SHARED) and at the start of
// every later block.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "emu/cuda_emu.h"
#include "common/schemas.h"
#include "emu/emu_runtime.h"

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define ARCHEXT_EMU_ASAN 1
#endif

// archext_emu_switch(save, to): saves the callee-saved registers, MXCSR and the x87 control
// word on the current stack, stores the stack pointer in *save, and resumes the context whose
// stack pointer is `to`. archext_emu_fiber_start is where a new fiber's first switch returns
// to: it calls r12(rbx), with the unwinder told that the stack ends there.
extern "C" void archext_emu_switch(void** save, void* to);
extern "C" void archext_emu_fiber_start();
asm(R"(
    .text
    .p2align 4
    .globl archext_emu_switch
    .hidden archext_emu_switch
    .type archext_emu_switch, @function
archext_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size archext_emu_switch, .-archext_emu_switch

    .p2align 4
    .globl archext_emu_fiber_start
    .hidden archext_emu_fiber_start
    .type archext_emu_fiber_start, @function
archext_emu_fiber_start:
    .cfi_startproc
    .cfi_undefined rip
    movq %rbx, %rdi
    callq *%r12
    ud2
    .cfi_endproc
    .size archext_emu_fiber_start, .-archext_emu_fiber_start
)");

namespace archext::emu {
namespace {

#ifdef ARCHEXT_EMU_ASAN
constexpr size_t kStackBytes = 512 * 1024;  // ASan's redzones and unoptimised frames
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif
constexpr size_t kGuardBytes = 4096;  // a PROT_NONE page below each stack: overflow faults
constexpr int kMaxThreads = 1024;

enum class State { kReady, kBarrier, kWarp, kExited };

struct Fiber {
  void* sp = nullptr;  // saved while switched out
  char* stack_lo = nullptr;
  uint3 tid{};
  int linear = 0;
  State state = State::kReady;
  const char* wait_file = nullptr;
  int wait_line = 0;
  int barriers = 0;  // __syncthreads passed
  // The warp collective it waits in.
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
#ifdef ARCHEXT_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

Settings g_settings;

// A warp's lanes as bit masks, for the checks of its collectives.
struct Warp {
  uint32_t present = 0;  // lanes that exist (the block may end mid-warp)
  uint32_t exited = 0;
  uint32_t waiting = 0;  // lanes waiting in the collective now open, with this mask and op
  uint32_t mask = 0;
  WarpOp op = WarpOp::kSync;
};

// The state of the running launch (one at a time: g_launch_mutex).
struct Run {
  const char* kernel = "";
  dim3 grid, block;
  KernelBody body = nullptr;
  const void* args = nullptr;
  char* dynamic_smem = nullptr;
  std::vector<std::pair<void*, size_t>>* static_smem = nullptr;  // the kernel's, so far
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  int threads = 0, live = 0;
  int at_barrier = 0;  // threads waiting at the current __syncthreads
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  int first_exit = -1;           // the first thread to exit, and the barriers it had passed
  int first_exit_barriers = INT32_MAX;
  bool failed = false;
  std::string error;
#ifdef ARCHEXT_EMU_ASAN
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};
Run g_run;
std::mutex g_launch_mutex;

char* g_stacks = nullptr;  // kMaxThreads stacks, each above a guard page, mapped once

char* stack_of(int i) {
  if (g_stacks == nullptr) {
    const size_t per = kStackBytes + kGuardBytes;
    void* p = mmap(nullptr, per * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "archext emulated CUDA: cannot map the fiber stacks");
    for (int k = 0; k < kMaxThreads; ++k) mprotect(static_cast<char*>(p) + k * per, kGuardBytes, PROT_NONE);
    g_stacks = static_cast<char*>(p);
  }
  return g_stacks + i * (kStackBytes + kGuardBytes) + kGuardBytes;
}

// "csrc/cuda/norm_cuda.cu:123" from a compiler's path of the file.
std::string where(const char* file, int line) {
  std::string f = file ? file : "?";
  const auto at = f.rfind("csrc/");
  if (at != std::string::npos) f = f.substr(at);
  return f + ":" + std::to_string(line);
}

std::string coords(const uint3& v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

std::string dims(const dim3& v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

std::string prefix() {
  return std::string("archext emulated CUDA: kernel ") + g_run.kernel + " <<<" + dims(g_run.grid) +
         ", " + dims(g_run.block) + ">>>, block " + coords(blockIdx);
}

std::string thread_prefix(const Fiber& f) { return prefix() + ", thread " + coords(f.tid); }

// Switches from the running fiber back to the scheduler; `exiting`: never to be resumed.
void yield_to_scheduler(bool exiting) {
  Fiber* f = g_run.current;
#ifdef ARCHEXT_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->fake_stack, g_run.scheduler_stack_bottom,
                                 g_run.scheduler_stack_size);
#else
  (void)exiting;
#endif
  archext_emu_switch(&f->sp, g_run.scheduler_sp);
#ifdef ARCHEXT_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
}

// Ends the block with an error raised from inside a fiber: the fiber is abandoned.
[[noreturn]] void fail_in_fiber(const std::string& what) {
  if (!g_run.failed) {
    g_run.failed = true;
    g_run.error = what;
  }
  yield_to_scheduler(true);
  std::abort();  // not resumed
}

void block_here(State s, const char* file, int line) {
  Fiber* f = g_run.current;
  f->state = s;
  f->wait_file = file;
  f->wait_line = line;
  yield_to_scheduler(false);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
  }
  return "?";
}

void on_exit(Fiber& f) {
  f.state = State::kExited;
  --g_run.live;
  if (g_run.first_exit < 0) {
    g_run.first_exit = f.linear;
    g_run.first_exit_barriers = f.barriers;
  }
  if (g_run.at_barrier > 0) {
    fail_in_fiber(thread_prefix(f) + ": exited while " + std::to_string(g_run.at_barrier) +
                  " threads wait at __syncthreads (" + where(g_run.barrier_file, g_run.barrier_line) +
                  "): every live thread must reach it");
  }
  // A lane waiting in a warp collective whose mask holds this one would wait forever.
  Warp& w = g_run.warps[f.linear / 32];
  const uint32_t bit = 1u << (f.linear % 32);
  w.exited |= bit;
  if (w.waiting != 0 && (w.mask & bit)) {
    const int l = __builtin_ctz(w.waiting);
    const Fiber& o = g_run.fibers[f.linear / 32 * 32 + l];
    fail_in_fiber(thread_prefix(f) + ": exited while lane " + std::to_string(l) +
                  " of its warp waits for it in " + op_name(o.op) + " (" +
                  where(o.wait_file, o.wait_line) + ")");
  }
}

extern "C" void fiber_main(Fiber* f) {
#ifdef ARCHEXT_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_run.scheduler_stack_bottom, &g_run.scheduler_stack_size);
#endif
  try {
    g_run.body(g_run.args);
  } catch (const std::exception& e) {
    fail_in_fiber(thread_prefix(*f) + ": " + e.what());
  }
  on_exit(*f);
  yield_to_scheduler(true);
  std::abort();  // an exited fiber is not resumed
}

void start_fiber(Fiber& f, int i) {
  f.stack_lo = stack_of(i);
#ifdef ARCHEXT_EMU_ASAN
  // A fiber that ended never returned from fiber_main, so the redzones of the frames at the top
  // of its stack are still poisoned; the words written below would be reported as an overflow.
  // (A new frame sets its own shadow on entry; only these plain writes need it cleared.)
  ASAN_UNPOISON_MEMORY_REGION(f.stack_lo + kStackBytes - 4096, 4096);
#endif
  auto* top = reinterpret_cast<uint64_t*>(f.stack_lo + kStackBytes - 64);
  // What archext_emu_switch pops: MXCSR and x87 control word, r15, r14, r13, r12, rbx, rbp,
  // return address.
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  uint64_t* sp = top - 8;
  sp[0] = mxcsr | (uint64_t{fpucw} << 32);
  sp[1] = sp[2] = sp[3] = 0;
  sp[4] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[5] = reinterpret_cast<uint64_t>(&f);
  sp[6] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&archext_emu_fiber_start);
  f.sp = sp;
  f.state = State::kReady;
  f.barriers = 0;
#ifdef ARCHEXT_EMU_ASAN
  f.fake_stack = nullptr;
#endif
}

void resume(Fiber& f) {
  g_run.current = &f;
  threadIdx = f.tid;
#ifdef ARCHEXT_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack_lo, kStackBytes);
#endif
  archext_emu_switch(&g_run.scheduler_sp, f.sp);
#ifdef ARCHEXT_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_run.current = nullptr;
}

[[noreturn]] void fail_in_scheduler(const std::string& what) {
#ifdef ARCHEXT_EMU_ASAN
  // Abandoned fibers leave their frames' redzones poisoned: clear them for the next launch.
  for (int i = 0; i < g_run.threads; ++i) ASAN_UNPOISON_MEMORY_REGION(stack_of(i), kStackBytes);
#endif
  TORCH_CHECK(false, what);
}

std::string deadlock_report() {
  std::ostringstream s;
  s << prefix() << ": deadlock: no thread can run; waiting:";
  int shown = 0;
  for (const Fiber& f : g_run.fibers) {
    if (f.state == State::kExited || f.state == State::kReady) continue;
    if (shown++ == 8) {
      s << " ...";
      break;
    }
    s << " thread " << coords(f.tid) << " in "
      << (f.state == State::kBarrier ? "__syncthreads" : op_name(f.op)) << " ("
      << where(f.wait_file, f.wait_line) << ");";
  }
  return s.str();
}

// The order of one round over the block's threads.
void round_order(std::vector<int>& order, std::mt19937_64& rng) {
  const int n = g_run.threads;
  order.resize(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  switch (g_settings.schedule) {
    case Schedule::kForward: case Schedule::kWarpAhead: break;
    case Schedule::kReverse: std::reverse(order.begin(), order.end()); break;
    case Schedule::kRandom: std::shuffle(order.begin(), order.end(), rng); break;
  }
}

void run_block(std::mt19937_64& rng) {
  const int n = g_run.threads;
  g_run.live = n;
  g_run.at_barrier = 0;
  g_run.first_exit = -1;
  g_run.first_exit_barriers = INT32_MAX;
  g_run.failed = false;
  g_run.warps.assign((n + 31) / 32, Warp{});
  for (int w = 0; w < (n + 31) / 32; ++w) {
    const int lanes = std::min(32, n - 32 * w);
    g_run.warps[w].present = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  }
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_run.fibers[i];
    f.linear = i;
    f.tid = {i % g_run.block.x, i / g_run.block.x % g_run.block.y, i / (g_run.block.x * g_run.block.y)};
    start_fiber(f, i);
  }
  // Shared memory reads as NaN (0xFF bytes) until written.
  for (const auto& [p, bytes] : *g_run.static_smem) std::memset(p, 0xFF, bytes);
  // The warp that runs ahead: a different one in each block.
  const int warps = (n + 31) / 32;
  const int lead = static_cast<int>((blockIdx.x + blockIdx.y * 7 + g_settings.seed) % warps);
  std::vector<int> order;
  auto run_lead = [&] {
    bool ran = true;
    while (ran && !g_run.failed) {
      ran = false;
      for (int i = lead * 32; i < std::min(n, lead * 32 + 32); ++i) {
        if (g_run.fibers[i].state != State::kReady) continue;
        resume(g_run.fibers[i]);
        ran = true;
        if (g_run.failed) return;
      }
    }
  };
  while (g_run.live > 0) {
    bool ran = false;
    round_order(order, rng);
    if (g_settings.schedule == Schedule::kWarpAhead) run_lead();
    for (int i : order) {
      if (g_run.failed) break;
      Fiber& f = g_run.fibers[i];
      if (f.state != State::kReady) continue;
      resume(f);
      ran = true;
      if (g_settings.schedule == Schedule::kWarpAhead) run_lead();
    }
    if (g_run.failed) fail_in_scheduler(g_run.error);
    if (!ran && g_run.live > 0) fail_in_scheduler(deadlock_report());
  }
}

void check_launch() {
  const dim3 g = g_run.grid, b = g_run.block;
  TORCH_CHECK(g.x >= 1 && g.y >= 1 && g.z >= 1 && b.x >= 1 && b.y >= 1 && b.z >= 1, prefix(),
              ": a zero grid or block dimension");
  TORCH_CHECK(g.x < (1u << 31), prefix(), ": grid.x = ", g.x, " exceeds 2^31 - 1");
  TORCH_CHECK(g.y <= 65535 && g.z <= 65535, prefix(), ": grid.y = ", g.y, ", grid.z = ", g.z,
              " (at most 65535 each)");
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  TORCH_CHECK(b.x <= 1024 && b.y <= 1024 && b.z <= 64 && threads <= 1024, prefix(), ": ", threads,
              " threads per block (at most 1024; block.z at most 64)");
}

std::unordered_map<const void*, FuncAttributes>& attributes() {
  static std::unordered_map<const void*, FuncAttributes> m;
  return m;
}

Schedule parse_schedule(const std::string& s) {
  if (s == "forward") return Schedule::kForward;
  if (s == "reverse") return Schedule::kReverse;
  if (s == "random") return Schedule::kRandom;
  if (s == "warp_ahead") return Schedule::kWarpAhead;
  TORCH_CHECK(false, "archext emulated CUDA: schedule must be forward, reverse, random or warp_ahead, got '", s, "'");
}

}  // namespace

Settings& settings() { return g_settings; }

FuncAttributes& func_attributes(const void* kernel) {
  static std::mutex m;
  std::lock_guard<std::mutex> lock(m);
  return attributes()[kernel];
}

int sm_count() { return g_settings.sm_count; }

void* dynamic_shared() { return g_run.dynamic_smem; }

void shared_declared(void* p, size_t bytes) {
  for (const auto& [q, n] : *g_run.static_smem) {
    if (q == p) return;
  }
  g_run.static_smem->emplace_back(p, bytes);  // the first thread to declare it: none wrote it yet
  std::memset(p, 0xFF, bytes);
}

std::string kernel_name_from_signature(const char* pretty) {
  std::string s = pretty;
  const auto at = s.find("Kernel = ");
  if (at == std::string::npos) return s;
  s = s.substr(at + 9);
  const auto end = s.find_first_of(";]");
  if (end != std::string::npos) s = s.substr(0, end);
  if (!s.empty() && s[0] == '&') s = s.substr(1);
  for (const char* ns : {"archext::cuda_emu::", "{anonymous}::", "(anonymous namespace)::", "<unnamed>::"}) {
    for (auto p = s.find(ns); p != std::string::npos; p = s.find(ns)) s.erase(p, std::strlen(ns));
  }
  return s;
}

void sync_threads(const char* file, int line) {
  Fiber& f = *g_run.current;
  if (g_run.first_exit >= 0 && g_run.first_exit_barriers <= f.barriers) {
    const Fiber& e = g_run.fibers[g_run.first_exit];
    fail_in_fiber(thread_prefix(f) + ": __syncthreads (" + where(file, line) + ") after thread " +
                  coords(e.tid) + " exited without reaching it: every live thread must reach it");
  }
  if (g_run.at_barrier == 0) {
    g_run.barrier_file = file;
    g_run.barrier_line = line;
  } else if (line != g_run.barrier_line || std::strcmp(file, g_run.barrier_file) != 0) {
    fail_in_fiber(thread_prefix(f) + ": reached __syncthreads at " + where(file, line) +
                  " while other threads wait at the one at " +
                  where(g_run.barrier_file, g_run.barrier_line));
  }
  ++f.barriers;
  if (++g_run.at_barrier == g_run.live) {
    g_run.at_barrier = 0;
    for (Fiber& o : g_run.fibers) {
      if (o.state == State::kBarrier) o.state = State::kReady;
    }
    return;
  }
  block_here(State::kBarrier, file, line);
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file,
                 int line) {
  Fiber& f = *g_run.current;
  const int warp0 = f.linear / 32 * 32, lane = f.linear - warp0;
  Warp& w = g_run.warps[f.linear / 32];
  auto fail = [&](const std::string& what) {
    fail_in_fiber(thread_prefix(f) + " (lane " + std::to_string(lane) + "): " + op_name(op) + " (" +
                  where(file, line) + "): " + what);
  };
  if (!(mask >> lane & 1u)) fail("the calling lane is not in the mask " + std::to_string(mask));
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("width must be a power of 2 up to 32");
  if (mask & ~w.present) {
    fail("lane " + std::to_string(__builtin_ctz(mask & ~w.present)) +
         " of the mask does not exist (the block has " + std::to_string(g_run.threads) + " threads)");
  }
  if (mask & w.exited) fail("lane " + std::to_string(__builtin_ctz(mask & w.exited)) + " of the mask has exited");
  if (w.waiting != 0 && (w.mask != mask || w.op != op)) {
    const Fiber& o = g_run.fibers[warp0 + __builtin_ctz(w.waiting)];
    fail("lane " + std::to_string(__builtin_ctz(w.waiting)) + " waits in " + op_name(o.op) + " (" +
         where(o.wait_file, o.wait_line) + ") with mask " + std::to_string(w.mask) +
         ": one collective and mask per warp at a time");
  }
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  w.waiting |= 1u << lane;
  w.mask = mask;
  w.op = op;
  if (w.waiting != mask) {
    block_here(State::kWarp, file, line);
    return f.result;
  }
  // The last lane in: every lane's result, then all run on.
  w.waiting = 0;
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) && g_run.fibers[warp0 + l].value != 0) ballot |= uint64_t{1} << l;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& o = g_run.fibers[warp0 + l];
    const int base = l & ~(o.width - 1);
    int src = l;
    switch (op) {
      case WarpOp::kShflIdx: src = base + (o.arg & (o.width - 1)); break;
      case WarpOp::kShflUp: src = l - o.arg >= base ? l - o.arg : l; break;
      case WarpOp::kShflDown: src = l + o.arg < base + o.width ? l + o.arg : l; break;
      case WarpOp::kShflXor: src = (l ^ o.arg) >= base && (l ^ o.arg) < base + o.width ? l ^ o.arg : l; break;
      default: break;
    }
    switch (op) {
      case WarpOp::kSync: o.result = 0; break;
      case WarpOp::kBallot: o.result = ballot; break;
      case WarpOp::kAny: o.result = ballot != 0; break;
      case WarpOp::kAll: o.result = ballot == (mask & 0xffffffffull); break;
      default:
        if (!(mask >> src & 1u)) {
          fail("lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
               ", which is not in the mask " + std::to_string(mask));
        }
        o.result = g_run.fibers[warp0 + src].value;
    }
    if (&o != &f) o.state = State::kReady;
  }
  return f.result;
}

void device_assert_failed(const char* cond, const char* file, int line) {
  fail_in_fiber(thread_prefix(*g_run.current) + ": device assert failed at " + where(file, line) +
                ": " + cond);
}

void launch_bounds_exceeded(const char* bounds, int max_threads, const char* file, int line) {
  fail_in_fiber(thread_prefix(*g_run.current) + ": a block of " +
                std::to_string(int64_t{g_run.block.x} * g_run.block.y * g_run.block.z) +
                " threads exceeds the kernel's __launch_bounds__(" + bounds + ") of " +
                std::to_string(max_threads) + " threads (" + where(file, line) + ")");
}

void run_grid(const char* kernel_name, const void* kernel, dim3 grid, dim3 block, size_t smem,
              KernelBody body, const void* args) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_run.kernel = kernel_name;
  g_run.grid = grid;
  g_run.block = block;
  blockIdx = {0, 0, 0};
  check_launch();
  const int opt_in = func_attributes(kernel).max_dynamic_shared;
  TORCH_CHECK(smem <= 48 * 1024 || opt_in > 0, prefix(), ": ", smem,
              " bytes of dynamic shared memory, over 48 KiB without the opt-in "
              "(cudaFuncSetAttribute MaxDynamicSharedMemorySize)");
  TORCH_CHECK(opt_in == 0 || smem <= static_cast<size_t>(opt_in), prefix(), ": ", smem,
              " bytes of dynamic shared memory, over the kernel's opt-in of ", opt_in);
  g_run.threads = static_cast<int>(block.x * block.y * block.z);
  if (g_run.fibers.size() < static_cast<size_t>(g_run.threads)) g_run.fibers.resize(g_run.threads);
  g_run.body = body;
  g_run.args = args;
  static std::unordered_map<const void*, std::vector<std::pair<void*, size_t>>> static_smem;
  g_run.static_smem = &static_smem[kernel];
  // Exactly `smem` bytes (AddressSanitizer sees a read past them).
  std::unique_ptr<char[]> dyn(smem > 0 ? new char[smem] : nullptr);
  g_run.dynamic_smem = dyn.get();
  gridDim = grid;
  blockDim = block;
  std::mt19937_64 rng(g_settings.seed);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        if (smem > 0) std::memset(dyn.get(), 0xFF, smem);
        run_block(rng);
      }
    }
  }
  g_run.dynamic_smem = nullptr;
}

}  // namespace archext::emu

// The emulated kernels under archext_emu (the schemas of archext, registered by the
// csrc/emu/*_emu.cpp files for the CPU key), and the hooks archext/testing.py sets them up with.
TORCH_LIBRARY(archext_emu, m) { archext::define_ops(m); }

TORCH_LIBRARY_FRAGMENT(archext_testing, m) {
  m.def("emu_configure(str schedule, int seed, int sm_count) -> ()",
        [](const std::string& schedule, int64_t seed, int64_t sm_count) {
          TORCH_CHECK(sm_count >= 1 && sm_count <= 1024, "archext emulated CUDA: sm_count must be in [1, 1024], got ", sm_count);
          auto& s = archext::emu::settings();
          s.schedule = archext::emu::parse_schedule(schedule);
          s.seed = static_cast<uint64_t>(seed);
          s.sm_count = static_cast<int>(sm_count);
        });
  // The archext ops the emulation provides: every one of archext_emu.
  m.def("emu_op_names() -> str[]", [] {
    std::vector<std::string> names;
    for (const auto& op : c10::Dispatcher::singleton().getAllOpNames()) {
      if (op.name.rfind("archext_emu::", 0) == 0) names.push_back(op.name.substr(13));
    }
    std::sort(names.begin(), names.end());
    return names;
  });
}
