"""Rotary position embedding (RoPE): fused rotation of q and k, its backward, an in-place form.

Angles come from a precomputed float32 cos/sin cache ([positions, rotary_dim / 2], built by
`rope_cache` in float64 and rounded once), not from `theta` inside the kernel: the cache is read
once per token and shared by every head of q and k, which costs less than evaluating sin and cos
per element, and the values do not depend on the kernel's dtype or device. The math is in
csrc/common/rope_math.h; the float64 references in archext/reference.py.
"""
from typing import Optional, Union

import torch
from torch import Tensor

from .. import reference as _ref
from ._common import using_reference_ops

_ops = torch.ops.archext


def _rope_like(x: Tensor) -> Tensor:
    # Mirrors rope_like in csrc/common/rope_host.h: keep a dense layout, else contiguous.
    if x.stride(3) == 1:
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("archext::rope_fwd")
def _(q, k, cos, sin, positions, interleaved):
    return _rope_like(q), _rope_like(k)


@torch.library.register_fake("archext::rope_bwd")
def _(grad_q, grad_k, cos, sin, positions, interleaved):
    return _rope_like(grad_q), _rope_like(grad_k)


@torch.library.register_fake("archext::rope_fwd_")
def _(q, k, cos, sin, positions, interleaved):
    return None


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin, positions, interleaved = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(cos, sin, positions)
    ctx.interleaved = interleaved
    ctx.shapes = (q.shape, k.shape)


def _rope_backward(ctx, grad_q, grad_k):
    # The backward is the inverse rotation. cos/sin are a fixed table: no gradient.
    cos, sin, positions = ctx.saved_tensors
    if grad_q is None and grad_k is None:
        return None, None, None, None, None, None
    like = grad_q if grad_q is not None else grad_k
    grad_q = like.new_zeros(ctx.shapes[0]) if grad_q is None else grad_q  # q (or k) unused
    grad_k = like.new_zeros(ctx.shapes[1]) if grad_k is None else grad_k
    dq, dk = _ops.rope_bwd(grad_q, grad_k, cos, sin, positions, ctx.interleaved)
    return dq, dk, None, None, None, None


torch.library.register_autograd("archext::rope_fwd", _rope_backward, setup_context=_rope_setup)


def rope_cache(rotary_dim: int, max_positions: int, theta: float = 10000.0,
               device=None) -> tuple[Tensor, Tensor]:
    """cos and sin of ``p * theta^(-2i / rotary_dim)`` for p < max_positions, i < rotary_dim / 2,
    computed in float64 and stored as float32 ``[max_positions, rotary_dim / 2]``."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rope_positions(q: Tensor, offset: Union[int, Tensor] = 0,
                   position_ids: Optional[Tensor] = None) -> Tensor:
    """The int64 positions of q's tokens: ``position_ids`` as given ([S] or [B, S]), else
    ``offset + arange(S)``, with ``offset`` an int or a per-batch tensor [B] (a KV cache)."""
    if position_ids is not None:
        return position_ids.to(device=q.device, dtype=torch.long)
    seq = torch.arange(q.shape[1], device=q.device, dtype=torch.long)
    if isinstance(offset, Tensor):
        return offset.to(device=q.device, dtype=torch.long)[:, None] + seq[None, :]
    return seq + offset


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *,
               offset: Union[int, Tensor] = 0, position_ids: Optional[Tensor] = None,
               interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotates q ``[B, S, Hq, D]`` and k ``[B, S, Hk, D]`` (any strides; pass
    ``x.transpose(1, 2)`` for a ``[B, H, S, D]`` tensor) by the cache from `rope_cache`.
    The first ``2 * cos.shape[1]`` dims of each head rotate, the rest pass through."""
    pos = rope_positions(q, offset, position_ids)
    if using_reference_ops():
        return _ref.rope(q, cos, sin, pos, interleaved), _ref.rope(k, cos, sin, pos, interleaved)
    return _ops.rope_fwd(q, k, cos, sin, pos, interleaved)


def apply_rope_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *,
                offset: Union[int, Tensor] = 0, position_ids: Optional[Tensor] = None,
                interleaved: bool = False) -> None:
    """In-place `apply_rope`, for inference (not differentiable)."""
    pos = rope_positions(q, offset, position_ids)
    _ops.rope_fwd_(q, k, cos, sin, pos, interleaved)
