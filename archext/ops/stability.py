"""Stability ops: cross-entropy with z-loss and final-logit soft-cap, the attention softmax with
soft-cap / mask / bias, a pointwise soft-cap, and QK-norm fused with RoPE.

Public signatures are final; bodies are being moved onto the archext kernels."""
from typing import Optional, Union

import torch
from torch import Tensor

from .. import reference as _ref
from .rope import rope_positions

_REDUCTIONS = ("mean", "sum", "none")


def softcap(x: Tensor, cap: float) -> Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-cap), elementwise."""
    if not cap > 0:
        raise ValueError(f"softcap: cap must be > 0, got {cap}")
    return _ref.softcap(x, cap)


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss_coef: float = 0.0,
                  softcap: Optional[float] = None,
                  reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """Fused cross-entropy over ``logits [N, V]`` and ``target [N]``.

    Per row, with ``z = cap * tanh(logits / cap)`` when ``softcap`` is given:
    ``loss = (1 - eps) * (lse - z[t]) + eps * (lse - mean(z)) + z_loss_coef * lse^2`` and
    ``z_loss = z_loss_coef * lse^2`` (PaLM's auxiliary loss, returned apart for logging; it is
    already included in ``loss``). Rows whose target is ``ignore_index`` give 0. ``"mean"``
    divides by the number of non-ignored rows (by 1 when there are none: a batch with every
    token ignored gives loss 0 and zero gradients, not NaN). No host sync.
    Returns ``(loss, z_loss)``, reduced alike."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return _ref.cross_entropy(logits.float(), target, ignore_index, label_smoothing, z_loss_coef,
                              softcap, reduction)


def softmax(scores: Tensor, *, scale: float = 1.0, softcap: Optional[float] = None,
            causal: bool = False, window: Optional[int] = None,
            bias: Optional[Tensor] = None) -> Tensor:
    """Stable softmax over the last dim of attention scores ``[..., Sq, Sk]``:
    ``s = softcap(scale * scores) + bias``; keys masked by ``causal`` / ``window`` (aligned to the
    bottom right: query i sits at key position ``i + Sk - Sq``; a window W keeps the W most recent
    keys, itself included) get probability 0; a row with every key masked gives zeros, not NaN.
    ``bias`` broadcasts to ``scores`` (ALiBi, T5 relative bias, or an additive mask)."""
    out = _ref.softmax(scores.float(), scale, softcap, causal, window,
                       None if bias is None else bias.float())
    return out.to(scores.dtype)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                 cos: Tensor, sin: Tensor, *, eps: float = 1e-6, per_head: bool = True,
                 weight_offset: float = 0.0, offset: Union[int, Tensor] = 0,
                 position_ids: Optional[Tensor] = None,
                 interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """RMSNorm of q ``[B, S, Hq, D]`` and k ``[B, S, Hk, D]`` then RoPE, in one pass.
    ``per_head=True``: each head normalised over D with a weight ``[D]`` shared by the heads
    (Qwen3 / Gemma 3); ``per_head=False``: each token normalised over all its heads, weights
    ``[Hq * D]`` and ``[Hk * D]`` (OLMo 2). cos/sin come from `rope_cache`."""
    pos = rope_positions(q, offset, position_ids)
    qo, ko = _ref.qk_norm_rope(q.float(), k.float(), q_weight, k_weight, cos, sin, pos, eps,
                               interleaved, per_head, weight_offset)
    return qo.to(q.dtype), ko.to(k.dtype)
