"""Helpers shared by the op families' Python registrations."""
import contextlib

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation / statistics dtype of an input dtype (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_stats(x: torch.Tensor) -> torch.Tensor:
    """A per-row statistic (mean, rstd) of x: shape x.shape[:-1], float32 (float64)."""
    return x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype))


def empty_grad(x: torch.Tensor) -> torch.Tensor:
    """What an op returns for a gradient that was not requested (a schema cannot return None)."""
    return x.new_empty((0,))


# --------------------------------------------------------------------------------------------
# Reference mode: every public op runs its pure-PyTorch reference (archext/reference.py) in the
# input dtype instead of the kernel. `archext profile` builds one model and times it both ways;
# torch.compile traces the reference code (the flag is read at trace time and guarded on).
# --------------------------------------------------------------------------------------------
_reference_ops = False


def set_reference_ops(flag: bool) -> None:
    """Route every archext op to its pure-PyTorch reference (True) or to the kernels (False)."""
    global _reference_ops
    _reference_ops = bool(flag)


def using_reference_ops() -> bool:
    return _reference_ops


@contextlib.contextmanager
def reference_ops(flag: bool = True):
    """``with archext.ops.reference_ops(): ...`` runs the block on the references."""
    old = _reference_ops
    set_reference_ops(flag)
    try:
        yield
    finally:
        set_reference_ops(old)
