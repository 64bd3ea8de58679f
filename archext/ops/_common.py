"""Helpers shared by the op families' Python registrations."""
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
