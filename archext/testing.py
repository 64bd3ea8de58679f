"""Test support: the CUDA kernels run on the CPU by the emulated CUDA execution model.

The emulated build (csrc/emu/, on by default on Linux x86-64: setup.py ARCHEXT_CUDA_EMU)
compiles csrc/cuda/*.cu as host C++ and registers the kernels under ``archext_emu``. Inside
``emulated_cuda()`` every ``archext`` op on CPU tensors runs them instead of the CPU kernels, so
the op tests, opcheck, autograd and the fake kernels of archext/ops work unchanged. float64 goes
to the CPU kernels (``archext_cpu``): the CUDA kernels have none, as on a GPU.
"""
from __future__ import annotations

import contextlib
import os

import torch

from archext import _C  # noqa: F401  (loads the ops)

SCHEDULES = ("forward", "reverse", "random", "warp_ahead")


def available() -> bool:
    """Whether this build has the emulated kernels."""
    return hasattr(torch.ops.archext_testing, "emu_configure")


def configure(schedule: str = "forward", sm_count: int = 2, seed: int = 0) -> None:
    """The thread schedule of every block, the emulated multiprocessor count and the seed."""
    torch.ops.archext_testing.emu_configure(schedule, seed, sm_count)


def set_vector_paths(on: bool) -> bool:
    """Switches the CUDA kernels' packed paths (ARCHEXT_CUDA_VECTOR); returns the former state."""
    return torch.ops.archext_testing.cuda_vector_paths(int(on))


def _routed(name: str):
    emu = getattr(torch.ops.archext_emu, name).default
    cpu = getattr(torch.ops.archext_cpu, name).default
    # Straight to the CPU kernels, as the dispatcher chose for archext's op (a stray meta or
    # CUDA argument reaches the kernel's own device check).
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

    def kernel(*args):
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
            return cpu.redispatch(keys, *args)
        return emu.redispatch(keys, *args)

    return kernel


@contextlib.contextmanager
def emulated_cuda(schedule: str = "forward", sm_count: int = 2, seed: int = 0):
    """Within it, archext's ops on CPU tensors run the emulated CUDA kernels."""
    if not available():
        raise RuntimeError("archext was built without the emulated CUDA kernels (ARCHEXT_CUDA_EMU=0)")
    configure(schedule, sm_count, seed)
    lib = torch.library.Library("archext", "IMPL")
    try:
        for name in torch.ops.archext_testing.emu_op_names():
            lib.impl(name, _routed(name), "CPU")
        yield
    finally:
        lib._destroy()


def emu_backend_from_env() -> dict | None:
    """The settings of ARCHEXT_TEST_BACKEND=cuda_emu (tests/conftest.py), else None."""
    if os.environ.get("ARCHEXT_TEST_BACKEND", "cpu") != "cuda_emu":
        return None
    return {"schedule": os.environ.get("ARCHEXT_EMU_SCHEDULE", "forward"),
            "sm_count": int(os.environ.get("ARCHEXT_EMU_SM_COUNT", "2")),
            "seed": int(os.environ.get("ARCHEXT_EMU_SEED", "0"))}
