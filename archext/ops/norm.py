"""The norm family: RMSNorm, LayerNorm and their fused residual-add variants.

Functional API over the `torch.ops.archext.*_norm_*` kernels, with their fake (meta) kernels for
torch.compile and their autograd formulas. The math, and its backward, is written out in
csrc/common/norm_math.h; the float64 references are in archext/reference.py.

Mixed precision (a float32 residual stream beside bfloat16/float16 activations, as Megatron's
fp32 residual connection): the add variants take a 16-bit ``x`` (the branch output) and a float32
``residual``, and return ``h`` in float32 and ``y`` in ``x``'s dtype; the plain norms take a
float32 ``x`` and ``out_dtype=torch.bfloat16`` (or float16) for ``y``. The weight and bias are
then in ``y``'s dtype or float32; their gradients are summed in float32. Backward: ``grad_y`` in
the 16-bit dtype, ``grad_h`` and the kernel's ``grad_x`` in float32; the gradient of the 16-bit
``x`` is that float32 gradient rounded once.
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


def _like_as(x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


def _param_grad(x: Tensor, wanted: bool) -> Tensor:
    # A weight / bias gradient comes in x's dtype (float32 in mixed precision: summed in float32).
    return x.new_empty(x.shape[-1:]) if wanted else empty_grad(x)


@torch.library.register_fake("archext::rms_norm_fwd")
def _(x, weight, eps, weight_offset, out_dtype=None):
    return _like_as(x, out_dtype), empty_stats(x)


@torch.library.register_fake("archext::add_rms_norm_fwd")
def _(x, residual, weight, eps, weight_offset):
    return _like(x), _like_as(x, residual.dtype), empty_stats(x)


@torch.library.register_fake("archext::rms_norm_bwd")
def _(grad_y, x, weight, rstd, weight_offset, grad_h, compute_dweight):
    return _like(x), _param_grad(x, compute_dweight and weight is not None)


@torch.library.register_fake("archext::layer_norm_fwd")
def _(x, weight, bias, eps, out_dtype=None):
    return _like_as(x, out_dtype), empty_stats(x), empty_stats(x)


@torch.library.register_fake("archext::add_layer_norm_fwd")
def _(x, residual, weight, bias, eps):
    return _like(x), _like_as(x, residual.dtype), empty_stats(x), empty_stats(x)


@torch.library.register_fake("archext::layer_norm_bwd")
def _(grad_y, x, weight, mean, rstd, grad_h, compute_dweight, compute_dbias):
    return (_like(x), _param_grad(x, compute_dweight and weight is not None),
            _param_grad(x, compute_dbias))


# --------------------------------------------------------------------------------------------
# Autograd. Forwards save x (or h) and the float32 per-row statistics; backwards recompute
# xhat from them. The incoming gradients are only read, never written; a gradient that does not
# arrive (h unused after the add, or y unused) is passed as None, never materialised as zeros.
# --------------------------------------------------------------------------------------------
def _grad_or_zeros(g: Optional[Tensor], like: Tensor, dtype: torch.dtype) -> Tensor:
    # grad_y in y's dtype (16-bit beside a float32 x in mixed precision).
    return torch.zeros_like(like, dtype=dtype) if g is None else g


def _as(g: Optional[Tensor], t: Optional[Tensor]) -> Optional[Tensor]:
    # A gradient in its input's dtype: the float32 gradient of a 16-bit tensor rounded once.
    return g if (g is None or g.dtype == t.dtype) else g.to(t.dtype)


def _rms_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
    x, weight, eps, weight_offset = inputs[:4]
    y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)
    ctx.weight_offset = weight_offset
    ctx.y_dtype = y.dtype


def _rms_backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    need_w = weight is not None and ctx.needs_input_grad[1]
    dx, dw = _ops.rms_norm_bwd(
        _grad_or_zeros(grad_y, x, ctx.y_dtype), x, weight, rstd, ctx.weight_offset, None, need_w
    )
    return dx, (_as(dw, weight) if need_w else None), None, None, None


torch.library.register_autograd("archext::rms_norm_fwd", _rms_backward, setup_context=_rms_setup)


def _add_rms_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
    x, residual, weight, eps, weight_offset = inputs
    _, h, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(h, weight, rstd)
    ctx.weight_offset = weight_offset
    ctx.x_dtype = x.dtype  # also y's


def _add_rms_backward(ctx, grad_y, grad_h, _grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    need_w = weight is not None and ctx.needs_input_grad[2]
    dx, dw = _ops.rms_norm_bwd(
        _grad_or_zeros(grad_y, h, ctx.x_dtype), h, weight, rstd, ctx.weight_offset, grad_h, need_w
    )
    # h = x + residual: both receive the same gradient (x's rounded to x's dtype).
    dx_x = dx if dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype)
    return dx_x, dx, (_as(dw, weight) if need_w else None), None, None


torch.library.register_autograd(
    "archext::add_rms_norm_fwd", _add_rms_backward, setup_context=_add_rms_setup
)


def _ln_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
    x, weight, bias, eps = inputs[:4]
    y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.y_dtype = y.dtype


def _bias_grad(ctx, db: Tensor) -> Tensor:
    return db if db.dtype == ctx.bias_dtype else db.to(ctx.bias_dtype)


def _ln_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_w = weight is not None and ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dw, db = _ops.layer_norm_bwd(
        _grad_or_zeros(grad_y, x, ctx.y_dtype), x, weight, mean, rstd, None, need_w, need_b
    )
    return (dx, (_as(dw, weight) if need_w else None), (_bias_grad(ctx, db) if need_b else None),
            None, None)


torch.library.register_autograd("archext::layer_norm_fwd", _ln_backward, setup_context=_ln_setup)


def _add_ln_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
    x, residual, weight, bias, eps = inputs
    _, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.x_dtype = x.dtype  # also y's


def _add_ln_backward(ctx, grad_y, grad_h, _grad_mean, _grad_rstd):
    h, weight, mean, rstd = ctx.saved_tensors
    need_w = weight is not None and ctx.needs_input_grad[2]
    need_b = ctx.has_bias and ctx.needs_input_grad[3]
    dx, dw, db = _ops.layer_norm_bwd(
        _grad_or_zeros(grad_y, h, ctx.x_dtype), h, weight, mean, rstd, grad_h, need_w, need_b
    )
    dx_x = dx if dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype)
    return (dx_x, dx, (_as(dw, weight) if need_w else None),
            (_bias_grad(ctx, db) if need_b else None), None)


torch.library.register_autograd(
    "archext::add_layer_norm_fwd", _add_ln_backward, setup_context=_add_ln_setup
)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
def _ref_out(y: Tensor, dtype: torch.dtype) -> Tensor:
    return y if y.dtype == dtype else y.to(dtype)


def rms_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """RMSNorm over the last dimension: ``x * rsqrt(mean(x^2) + eps) * (weight + weight_offset)``.

    ``weight_offset=1.0`` reads ``weight`` the way Gemma stores it, as ``(1 + w)``.
    ``out_dtype`` (bfloat16 / float16, for a float32 ``x``): y's dtype; None is x's.
    """
    if using_reference_ops():
        return _ref_out(_ref.rms_norm(x, weight, eps, weight_offset), out_dtype or x.dtype)
    return _ops.rms_norm_fwd(x, weight, eps, weight_offset, out_dtype)[0]


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Fused ``h = x + residual; y = rms_norm(h)``. Returns ``(y, h)``: h in residual's dtype
    (float32 beside a bfloat16/float16 x), y in x's dtype."""
    if using_reference_ops():
        y, h = _ref.add_rms_norm(x, residual, weight, eps, weight_offset)
        return _ref_out(y, x.dtype), h
    y, h, _ = _ops.add_rms_norm_fwd(x, residual, weight, eps, weight_offset)
    return y, h


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """LayerNorm over the last dimension, with weight and bias each optional. ``out_dtype`` as
    for `rms_norm`."""
    if using_reference_ops():
        return _ref_out(_ref.layer_norm(x, weight, bias, eps), out_dtype or x.dtype)
    return _ops.layer_norm_fwd(x, weight, bias, eps, out_dtype)[0]


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Fused ``h = x + residual; y = layer_norm(h)``. Returns ``(y, h)``, dtypes as
    `add_rms_norm`'s."""
    if using_reference_ops():
        y, h = _ref.add_layer_norm(x, residual, weight, bias, eps)
        return _ref_out(y, x.dtype), h
    y, h, _, _ = _ops.add_layer_norm_fwd(x, residual, weight, bias, eps)
    return y, h
