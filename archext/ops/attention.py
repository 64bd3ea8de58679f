"""Tiled (flash-style) attention with soft-cap, relative bias, sliding windows and packed
documents: ``flash_attention``.

The kernels are in csrc/cpu/attention_* (and csrc/cuda/); the per-element math in
csrc/common/attention_math.h; the materialised float64-capable reference is
archext/reference.py's ``attention``. The [Sq, Sk] scores are never held: the forward keeps each
row's logsumexp, the backward recomputes the probabilities from it.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import reference as _ref
from ._common import acc_dtype, using_reference_ops

_ops = torch.ops.archext


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("archext::flash_attn_fwd")
def _(q, k, v, rel_bias, segment_ids, scale, softcap, causal, window):
    b, sq, hq, d = q.shape
    o = q.new_empty((b, sq, hq, d))
    lse = q.new_empty((b, hq, sq), dtype=acc_dtype(q.dtype))
    return o, lse


@torch.library.register_fake("archext::flash_attn_bwd")
def _(grad_o, q, k, v, o, lse, rel_bias, segment_ids, scale, softcap, causal, window,
      want_grad_bias):
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    acc = acc_dtype(q.dtype)
    grad_bias = (q.new_empty((hq, max(sq + sk - 1, 0)), dtype=acc)
                 if want_grad_bias and rel_bias is not None else q.new_empty((0,), dtype=acc))
    return (q.new_empty((b, sq, hq, d)), q.new_empty((b, sk, hk, d)), q.new_empty((b, sk, hk, d)),
            grad_bias)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
def _setup(ctx, inputs, output):
    q, k, v, rel_bias, segment_ids, scale, softcap, causal, window = inputs
    o, lse = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, o, lse, rel_bias, segment_ids)
    ctx.args = (scale, softcap, causal, window)


def _backward(ctx, grad_o, _grad_lse):
    if grad_o is None:
        return (None,) * 9
    q, k, v, o, lse, rel_bias, segment_ids = ctx.saved_tensors
    need = ctx.needs_input_grad
    want_bias = rel_bias is not None and need[3]
    dq, dk, dv, dbias = _ops.flash_attn_bwd(grad_o, q, k, v, o, lse, rel_bias, segment_ids,
                                            *ctx.args, want_bias)
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            dbias if want_bias else None, None, None, None, None, None)


torch.library.register_autograd("archext::flash_attn_fwd", _backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
def _unit_last(x: Tensor) -> Tensor:
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


# The tiled kernel's head-dim limit (kFlashAttnMaxHeadDim, csrc/common/attention_host.h).
MAX_HEAD_DIM = 256


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                    softcap: Optional[float] = None, causal: bool = True,
                    window: Optional[int] = None, rel_bias: Optional[Tensor] = None,
                    segment_ids: Optional[Tensor] = None) -> Tensor:
    """Attention over ``q [B, Sq, Hq, D]``, ``k`` and ``v [B, Sk, Hk, D]`` (any strides; Hq a
    multiple of Hk: grouped-query, query head h reads kv head ``h // (Hq // Hk)``), returning
    ``o [B, Sq, Hq, D]`` in q's dtype, without holding the [Sq, Sk] scores (FlashAttention-2).

    Query i sits at key position ``p = i + Sk - Sq`` (bottom-right, as with a KV cache). Its
    logit for key j is ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2; no cap by default)
    plus ``rel_bias[h, j - p + Sk - 1]`` (``rel_bias [Hq, Sq + Sk - 1]``: ALiBi slopes, T5
    buckets; float32, float64 for float64 q; it gets a gradient when it requires one). Key j is
    visible when ``j <= p`` (``causal``), ``p - j < window`` (a sliding window of ``window``
    keys, itself included) and, with ``segment_ids [B, Sk]`` (int32 document ids of packed
    sequences; needs Sq <= Sk), when it lies in the segment of position p. A query with no
    visible key gets o = 0 and zero gradients. ``scale`` defaults to ``D ** -0.5``."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"flash_attention: softcap must be > 0 (or None for no cap), got {softcap}")
    if window is not None and window < 1:
        raise ValueError(f"flash_attention: window must be >= 1 (or None), got {window}")
    if rel_bias is not None:  # a T5 table's transpose, a bf16 model's bias: as the kernel takes it
        rel_bias = rel_bias.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    if segment_ids is not None and segment_ids.dtype in (torch.int64, torch.int16, torch.uint8):
        segment_ids = segment_ids.to(torch.int32)
    if using_reference_ops():
        return _ref.attention(q, k, v, scale, softcap, causal, window, rel_bias, segment_ids)
    o, _ = _ops.flash_attn_fwd(_unit_last(q), _unit_last(k), _unit_last(v), rel_bias, segment_ids,
                               scale, 0.0 if softcap is None else float(softcap), causal,
                               -1 if window is None else int(window))
    return o
