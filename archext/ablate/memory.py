"""Peak memory of a training step, measured.

CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's own peak).
CPU: no allocator peak counter exists, so it is rebuilt from the allocator's events: the bytes
held before the step (parameters, buffers, gradients, optimizer state: summed over their
storages) plus the highest point of the running sum of every allocation and free during one
step, as recorded by ``torch.profiler`` with ``profile_memory=True`` (c10's CPU allocator
reports each one). Not seen: scratch that oneDNN/MKL or the OS allocate outside c10, and the
process's fixed cost (libraries, Python)."""
import contextlib
import os
import sys
from typing import Callable

import torch

CPU_METHOD = "held tensors + profiler allocation timeline of one step"
CUDA_METHOD = "torch.cuda.max_memory_allocated"


def held_bytes(model: torch.nn.Module, optimizer=None) -> int:
    """Bytes of the distinct storages behind parameters, their gradients, buffers and the
    optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [t for t in state.values() if torch.is_tensor(t)]
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence file descriptor 2 while torch.profiler runs: Kineto prints its stages (and, with
    no GPU, a spurious 'gpuGetDeviceCount failed') from C++ unless KINETO_LOG_LEVEL was set
    before torch loaded, which `python -m archext` cannot do."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (an embedding host): leave it alone
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def step_peak_bytes_cpu(step: Callable[[], None]) -> int:
    """The highest net allocation (bytes) reached while ``step()`` runs on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak
