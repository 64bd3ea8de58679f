"""What the benchmarks share: per-call timing (wall clock on the CPU, CUDA events on the GPU),
interleaved sampling of several candidates, and the description of the machine they ran on."""
from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
class Timer:
    """Per-call wall time (CPU) or CUDA-event time (GPU) of fn(), with an untimed pre() before
    every call and the result freed after the clock stops."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def samples(self, fn: Callable, n: int, pre: Optional[Callable] = None) -> list[float]:
        out: list[float] = []
        if self.cuda:
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
            for s, e in ev:
                if pre is not None:
                    pre()
                s.record()
                res = fn()
                e.record()
                del res
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in ev]
        for _ in range(n):
            if pre is not None:
                pre()
            t0 = time.perf_counter()
            res = fn()
            t1 = time.perf_counter()
            del res
            out.append(t1 - t0)
        return out


@dataclass
class Candidate:
    name: str
    fn: Callable
    pre: Optional[Callable] = None
    samples: list = field(default_factory=list)
    block: int = 1
    # Over the timed blocks (the untimed pre() and frees included): minor page faults,
    # involuntary context switches (another process took a core), wall and process CPU seconds.
    minflt: int = 0
    nivcsw: int = 0
    wall: float = 0.0
    cpu: float = 0.0


def measure(timer: Timer, cands: list[Candidate], min_time: float, rounds: int,
            min_samples: int) -> None:
    """Warm every candidate up, then take `rounds` interleaved blocks of samples of each, sized so
    that each candidate gets about min_time seconds and at least min_samples samples in all."""
    per_round = max(1, math.ceil(min_samples / rounds))
    for c in cands:
        timer.samples(c.fn, 1, c.pre)  # first touch of fresh memory, lazy init
        est = min(timer.samples(c.fn, 2, c.pre))
        c.block = max(per_round, min(2000, math.ceil(min_time / rounds / max(est, 1e-7))))
    for i in range(rounds):
        order = cands[i % len(cands):] + cands[:i % len(cands)]
        for c in order:
            r0, w0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), \
                time.process_time()
            c.samples += timer.samples(c.fn, c.block, c.pre)
            r1, w1, c1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), \
                time.process_time()
            c.minflt += r1.ru_minflt - r0.ru_minflt
            c.nivcsw += r1.ru_nivcsw - r0.ru_nivcsw
            c.wall += w1 - w0
            c.cpu += c1 - c0


def summarize(samples: list[float]) -> dict:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return dict(median_ms=statistics.median(s) * 1e3, q1_ms=q[0] * 1e3, q3_ms=q[2] * 1e3,
                min_ms=s[0] * 1e3, n=len(s))


def median_time(fn: Callable, device: str, min_time: float,
                pre: Optional[Callable] = None) -> float:
    """Median seconds of fn() after two untimed warm-up calls, sampled call by call for at least
    min_time seconds and 5 samples; pre(), if given, runs untimed before every call."""
    timer = Timer(torch.device(device))
    for _ in range(2):
        if pre is not None:
            pre()
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(samples) < 5:
        samples += timer.samples(fn, 1, pre)
    return statistics.median(samples)


# --------------------------------------------------------------------------------------------
# Machine description and copy bandwidth
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copy_bandwidth(device, timer: Timer, nbytes: int) -> float:
    """GB/s of a non-allocating dst.copy_(src) of nbytes (counted as read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    c = Candidate("copy", lambda: dst.copy_(src))
    measure(timer, [c], min_time=0.1, rounds=1, min_samples=3)
    return 2 * nbytes / statistics.median(c.samples) / 1e9


def tune_malloc() -> str:
    """Keep freed memory for reuse instead of returning it to the kernel, so that a benchmark
    call does not page-fault its fresh outputs in. glibc serves allocations of 32 MiB and more
    (less, before its dynamic threshold has grown) with a fresh mmap and unmaps them on free;
    every call then first-touches its outputs at the kernel's page-fault rate (about 5 GB/s on
    the 2-core development machine, against 40-60 GB/s for a warm copy), which hides the
    kernels behind the allocator. Raising M_MMAP_THRESHOLD and M_TRIM_THRESHOLD to 1 GiB keeps
    the allocations on the reusable heap; it applies to every implementation and the floor."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1
        ok = ok and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
        if ok:
            return "glibc mmap and trim thresholds raised to 1 GiB (--malloc default to keep them)"
        return "glibc defaults (mallopt refused the thresholds)"
    except (OSError, AttributeError):
        return "system default (not glibc: mallopt unavailable)"


def loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
