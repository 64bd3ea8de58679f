"""Stability ops: cross-entropy with z-loss and final-logit soft-cap, the attention softmax with
soft-cap / mask / bias, a pointwise soft-cap, and QK-norm with RoPE.

The kernels are in csrc/{cpu,cuda}/stability_*; the math in csrc/common/stability_math.h; the
float64 references in archext/reference.py. Every op here computes in float32 whatever the input
dtype, and none makes a host sync (the "mean" of the cross-entropy divides on the device).
"""
from typing import Optional, Union

import torch
from torch import Tensor

from .. import reference as _ref
from ._common import acc_dtype, empty_grad, using_reference_ops
from .norm import rms_norm
from .rope import apply_rope, rope_positions

_ops = torch.ops.archext
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("archext::cross_entropy_fwd")
def _(logits, target, ignore_index, label_smoothing, z_loss_coef, softcap):
    rows = logits.new_empty((logits.shape[0],), dtype=acc_dtype(logits.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.register_fake("archext::cross_entropy_bwd")
def _(grad_loss, grad_z_loss, logits, target, lse, ignore_index, label_smoothing, z_loss_coef,
      softcap):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("archext::softmax_fwd")
def _(x, bias, scale, softcap, causal, window):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("archext::softmax_bwd")
def _(grad_y, y, x, scale, softcap, want_grad_scores):
    dx = torch.empty_like(y, memory_format=torch.contiguous_format)
    return dx, (torch.empty_like(dx) if want_grad_scores else empty_grad(y))


@torch.library.register_fake("archext::softcap_fwd")
def _(x, cap):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("archext::softcap_bwd")
def _(grad_y, x, cap):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
def _ce_setup(ctx, inputs, output):
    logits, target, ignore_index, eps, coef, cap = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, target, output[2])
    ctx.args = (ignore_index, eps, coef, cap)


def _ce_backward(ctx, grad_loss, grad_z_loss, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    if grad_loss is None and grad_z_loss is None:
        return None, None, None, None, None, None
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    grad = _ops.cross_entropy_bwd(grad_loss.contiguous(),
                                  None if grad_z_loss is None else grad_z_loss.contiguous(),
                                  logits, target, lse, *ctx.args)
    return grad, None, None, None, None, None


torch.library.register_autograd("archext::cross_entropy_fwd", _ce_backward, setup_context=_ce_setup)


def _softmax_setup(ctx, inputs, output):
    x, bias, scale, cap, causal, window = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output, x if cap != 0 else None)
    ctx.args = (scale, cap)
    ctx.bias_shape = None if bias is None else bias.shape


def _softmax_backward(ctx, grad_y):
    y, x = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None, None
    want_bias = ctx.bias_shape is not None and ctx.needs_input_grad[1]
    dx, ds = _ops.softmax_bwd(grad_y, y, x, *ctx.args, want_bias)
    grad_bias = ds.sum_to_size(ctx.bias_shape) if want_bias else None
    return (dx if ctx.needs_input_grad[0] else None), grad_bias, None, None, None, None


torch.library.register_autograd("archext::softmax_fwd", _softmax_backward,
                                setup_context=_softmax_setup)


def _softcap_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inputs[0])
    ctx.cap = inputs[1]


def _softcap_backward(ctx, grad_y):
    if grad_y is None:
        return None, None
    (x,) = ctx.saved_tensors
    return _ops.softcap_bwd(grad_y, x, ctx.cap), None


torch.library.register_autograd("archext::softcap_fwd", _softcap_backward,
                                setup_context=_softcap_setup)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
def _check_cap(name: str, cap: Optional[float]) -> float:
    if cap is None:
        return 0.0
    if not cap > 0:
        raise ValueError(f"{name}: softcap must be > 0 (or None for no cap), got {cap}")
    return float(cap)


def softcap(x: Tensor, cap: float) -> Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-cap), elementwise; the gradient is
    ``1 - tanh^2(x / cap)``."""
    if not cap > 0:
        raise ValueError(f"softcap: cap must be > 0, got {cap}")
    if using_reference_ops():
        return _ref.softcap(x, cap)
    return _ops.softcap_fwd(x, float(cap))


def _reduce(rows: Tensor, valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp(min=1).to(rows.dtype)


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
    token ignored gives loss 0 and zero gradients, not NaN). No host sync. The results are
    float32 (float64 for float64 logits) whatever the logits' dtype.
    Returns ``(loss, z_loss)``, reduced alike."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    cap = _check_cap("cross_entropy", softcap)
    if using_reference_ops():
        return _ref.cross_entropy(logits, target, ignore_index, label_smoothing, z_loss_coef,
                                  softcap, reduction)
    loss, z, _ = _ops.cross_entropy_fwd(logits, target, ignore_index, float(label_smoothing),
                                        float(z_loss_coef), cap)
    valid = target != ignore_index
    return _reduce(loss, valid, reduction), _reduce(z, valid, reduction)


def softmax(scores: Tensor, *, scale: float = 1.0, softcap: Optional[float] = None,
            causal: bool = False, window: Optional[int] = None,
            bias: Optional[Tensor] = None) -> Tensor:
    """Stable softmax over the last dim of attention scores ``[..., Sq, Sk]`` (rank 2 to 4):
    ``s = softcap(scale * scores) + bias``; keys masked by ``causal`` / ``window`` (aligned to the
    bottom right: query i sits at key position ``i + Sk - Sq``; a window W keeps the W most recent
    keys, itself included) get probability 0; a row with every key masked gives zeros, not NaN.
    ``bias`` broadcasts to ``scores`` (ALiBi, T5 relative bias, or an additive mask with -inf);
    its gradient is summed back to its shape. The cap comes before bias and mask (Gemma 2)."""
    cap = _check_cap("softmax", softcap)
    if window is not None and window < 1:
        raise ValueError(f"softmax: window must be >= 1 (or None), got {window}")
    if using_reference_ops():
        return _ref.softmax(scores, scale, softcap, causal, window, bias)
    if bias is not None and bias.dtype != scores.dtype:
        bias = bias.to(scores.dtype)
    return _ops.softmax_fwd(scores, bias, float(scale), cap, causal, -1 if window is None else window)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                 cos: Tensor, sin: Tensor, *, eps: float = 1e-6, per_head: bool = True,
                 weight_offset: float = 0.0, offset: Union[int, Tensor] = 0,
                 position_ids: Optional[Tensor] = None,
                 interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """RMSNorm of q ``[B, S, Hq, D]`` and k ``[B, S, Hk, D]`` then RoPE.
    ``per_head=True``: each head normalised over D with a weight ``[D]`` shared by the heads
    (Qwen3 / Gemma 3); ``per_head=False``: each token normalised over all its heads, weights
    ``[Hq * D]`` and ``[Hk * D]`` (OLMo 2). cos/sin come from `rope_cache`."""
    if using_reference_ops():
        pos = rope_positions(q, offset, position_ids)
        return _ref.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, pos, eps, interleaved,
                                 per_head, weight_offset)
    if per_head:
        qn, kn = rms_norm(q, q_weight, eps, weight_offset), rms_norm(k, k_weight, eps, weight_offset)
    else:
        b, s = q.shape[:2]
        qn = rms_norm(q.reshape(b, s, -1), q_weight, eps, weight_offset).view(q.shape)
        kn = rms_norm(k.reshape(b, s, -1), k_weight, eps, weight_offset).view(k.shape)
    return apply_rope(qn, kn, cos, sin, offset=offset, position_ids=position_ids,
                      interleaved=interleaved)
