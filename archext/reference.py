"""Pure-PyTorch references of every archext op, shared by the tests and the benchmarks.

They compute in the dtype they are given: the tests call them on float64 copies of the inputs
(the ground truth), the benchmarks on the benchmark dtype (the "PyTorch eager" and
"torch.compile" baselines). Written for clarity, as the equations read.
"""
from typing import Optional

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6,
             weight_offset: float = 0.0) -> Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * (weight + weight_offset)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)  # biased, as F.layer_norm
    y = (x - mu) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6,
                 weight_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    h = x + residual
    return rms_norm(h, weight, eps, weight_offset), h


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    h = x + residual
    return layer_norm(h, weight, bias, eps), h
