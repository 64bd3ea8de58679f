"""Pure-PyTorch references of every archext op, shared by the tests and the benchmarks.

They compute in the dtype they are given: the tests call them on float64 copies of the inputs
(the ground truth), the benchmarks on the benchmark dtype (the "PyTorch eager" and
"torch.compile" baselines). Written for clarity, as the equations read.
"""
import math
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


def rope_rotate_half(x: Tensor) -> Tensor:
    """Hugging Face Llama's rotate_half: (-x2, x1) for the halves x1, x2 of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
         interleaved: bool = False) -> Tensor:
    """RoPE on x [B, S, H, D] with cache cos/sin [P, R/2] at positions [S] or [B, S]: the first
    R dims rotate (Llama's rotate_half pairs, or GPT-J's interleaved pairs), the rest pass."""
    rot = 2 * cos.shape[-1]
    c = cos[positions].to(x.dtype)  # [S or B,S, R/2]
    s = sin[positions].to(x.dtype)
    if c.dim() == 2:
        c, s = c[None], s[None]
    c, s = c[:, :, None, :], s[:, :, None, :]  # broadcast over heads
    xr, xp = x[..., :rot], x[..., rot:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        y = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        c2, s2 = torch.cat((c, c), -1), torch.cat((s, s), -1)
        y = xr * c2 + rope_rotate_half(xr) * s2
    return torch.cat((y, xp), dim=-1)


# ---- activation family ------------------------------------------------------------------------
# PyTorch's formulas (F.gelu with approximate="none" / "tanh", F.silu, F.relu), written out.
def act(x: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return x * 0.5 * (1.0 + torch.erf(x * math.sqrt(0.5)))
    if activation == "gelu_tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + torch.tanh(inner))
    if activation == "silu":
        return x * torch.sigmoid(x)
    if activation == "relu":
        return torch.relu(x)
    raise ValueError(f"unknown activation {activation!r}")


def glu(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """The gated activation act(gate) * up: ReGLU, GeGLU, SwiGLU."""
    return act(gate, activation) * up


def glu_packed(x: Tensor, activation: str, gate_first: bool = True) -> Tensor:
    """glu of the two halves of a packed [..., 2 * d] tensor."""
    a, b = x.chunk(2, dim=-1)
    return glu(a, b, activation) if gate_first else glu(b, a, activation)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return glu(gate, up, "silu")


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    return glu(gate, up, "gelu" if approximate == "none" else "gelu_tanh")


def reglu(gate: Tensor, up: Tensor) -> Tensor:
    return glu(gate, up, "relu")
