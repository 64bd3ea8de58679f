"""The norm family: RMSNorm, LayerNorm and their fused residual-add variants.

Functional API over the `torch.ops.archext.*_norm_*` kernels, with their fake (meta) kernels for
torch.compile and their autograd formulas. The math, and its backward, is written out in
csrc/common/norm_math.h; the float64 references are in archext/reference.py.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import reference as _ref
from ._common import empty_grad, empty_stats, using_reference_ops

_ops = torch.ops.archext


# --------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only (used by torch.compile, FakeTensor, opcheck).
# --------------------------------------------------------------------------------------------
def _like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("archext::rms_norm_fwd")
def _(x, weight, eps, weight_offset):
    return _like(x), empty_stats(x)


@torch.library.register_fake("archext::add_rms_norm_fwd")
def _(x, residual, weight, eps, weight_offset):
    return _like(x), _like(x), empty_stats(x)


@torch.library.register_fake("archext::rms_norm_bwd")
def _(grad_y, x, weight, rstd, weight_offset, grad_h, compute_dweight):
    dw = _like(weight) if (compute_dweight and weight is not None) else empty_grad(x)
    return _like(x), dw


@torch.library.register_fake("archext::layer_norm_fwd")
def _(x, weight, bias, eps):
    return _like(x), empty_stats(x), empty_stats(x)


@torch.library.register_fake("archext::add_layer_norm_fwd")
def _(x, residual, weight, bias, eps):
    return _like(x), _like(x), empty_stats(x), empty_stats(x)


@torch.library.register_fake("archext::layer_norm_bwd")
def _(grad_y, x, weight, mean, rstd, grad_h, compute_dweight, compute_dbias):
    dw = _like(weight) if (compute_dweight and weight is not None) else empty_grad(x)
    db = x.new_empty(x.shape[-1:]) if compute_dbias else empty_grad(x)
    return _like(x), dw, db


# --------------------------------------------------------------------------------------------
# Autograd. Forwards save x (or h) and the float32 per-row statistics; backwards recompute
# xhat from them. The incoming gradients are only read, never written; a gradient that does not
# arrive (h unused after the add, or y unused) is passed as None, never materialised as zeros.
# --------------------------------------------------------------------------------------------
def _grad_or_zeros(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _rms_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
    x, weight, eps, weight_offset = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)
    ctx.weight_offset = weight_offset


def _rms_backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    need_w = weight is not None and ctx.needs_input_grad[1]
    dx, dw = _ops.rms_norm_bwd(
        _grad_or_zeros(grad_y, x), x, weight, rstd, ctx.weight_offset, None, need_w
    )
    return dx, (dw if need_w else None), None, None


torch.library.register_autograd("archext::rms_norm_fwd", _rms_backward, setup_context=_rms_setup)


def _add_rms_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
    x, residual, weight, eps, weight_offset = inputs
    _, h, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(h, weight, rstd)
    ctx.weight_offset = weight_offset


def _add_rms_backward(ctx, grad_y, grad_h, _grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    need_w = weight is not None and ctx.needs_input_grad[2]
    dx, dw = _ops.rms_norm_bwd(
        _grad_or_zeros(grad_y, h), h, weight, rstd, ctx.weight_offset, grad_h, need_w
    )
    # h = x + residual: both receive the same gradient.
    return dx, dx, (dw if need_w else None), None, None


torch.library.register_autograd(
    "archext::add_rms_norm_fwd", _add_rms_backward, setup_context=_add_rms_setup
)


def _ln_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _ln_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_w = weight is not None and ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dw, db = _ops.layer_norm_bwd(
        _grad_or_zeros(grad_y, x), x, weight, mean, rstd, None, need_w, need_b
    )
    return dx, (dw if need_w else None), (db if need_b else None), None


torch.library.register_autograd("archext::layer_norm_fwd", _ln_backward, setup_context=_ln_setup)


def _add_ln_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
    x, residual, weight, bias, eps = inputs
    _, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _add_ln_backward(ctx, grad_y, grad_h, _grad_mean, _grad_rstd):
    h, weight, mean, rstd = ctx.saved_tensors
    need_w = weight is not None and ctx.needs_input_grad[2]
    need_b = ctx.has_bias and ctx.needs_input_grad[3]
    dx, dw, db = _ops.layer_norm_bwd(
        _grad_or_zeros(grad_y, h), h, weight, mean, rstd, grad_h, need_w, need_b
    )
    return dx, dx, (dw if need_w else None), (db if need_b else None), None


torch.library.register_autograd(
    "archext::add_layer_norm_fwd", _add_ln_backward, setup_context=_add_ln_setup
)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
def rms_norm(
    x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, weight_offset: float = 0.0
) -> Tensor:
    """RMSNorm over the last dimension: ``x * rsqrt(mean(x^2) + eps) * (weight + weight_offset)``.

    ``weight_offset=1.0`` reads ``weight`` the way Gemma stores it, as ``(1 + w)``.
    """
    if using_reference_ops():
        return _ref.rms_norm(x, weight, eps, weight_offset)
    return _ops.rms_norm_fwd(x, weight, eps, weight_offset)[0]


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Fused ``h = x + residual; y = rms_norm(h)``. Returns ``(y, h)``."""
    if using_reference_ops():
        return _ref.add_rms_norm(x, residual, weight, eps, weight_offset)
    y, h, _ = _ops.add_rms_norm_fwd(x, residual, weight, eps, weight_offset)
    return y, h


def layer_norm(
    x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5
) -> Tensor:
    """LayerNorm over the last dimension, with weight and bias each optional."""
    if using_reference_ops():
        return _ref.layer_norm(x, weight, bias, eps)
    return _ops.layer_norm_fwd(x, weight, bias, eps)[0]


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Fused ``h = x + residual; y = layer_norm(h)``. Returns ``(y, h)``."""
    if using_reference_ops():
        return _ref.add_layer_norm(x, residual, weight, bias, eps)
    y, h, _, _ = _ops.add_layer_norm_fwd(x, residual, weight, bias, eps)
    return y, h
