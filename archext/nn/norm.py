"""Norm modules. State dicts match torch.nn.RMSNorm / torch.nn.LayerNorm (a `weight` and, for
LayerNorm with bias, a `bias` of shape [dim]), so either loads the other's checkpoint.

Mixed precision (a float32 residual stream beside bfloat16/float16 activations, see
archext/ops/norm.py): the fused add modules take a 16-bit ``x`` with a float32 ``residual`` and
return ``(y in x's dtype, h in float32)``; a norm of a float32 input writes y in ``out_dtype``,
which defaults to the weight's dtype when that is 16-bit (else to x's)."""
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import ops


_LOW = (torch.float16, torch.bfloat16)


def _plain_out_dtype(x: Tensor, weight: Optional[Tensor], out_dtype: Optional[torch.dtype]):
    """y's dtype for a norm without an add: out_dtype, or a 16-bit weight's for a float32 x."""
    if out_dtype is None and weight is not None and x.dtype == torch.float32 and weight.dtype in _LOW:
        return weight.dtype
    return out_dtype


def _check_add_out_dtype(x: Tensor, out_dtype: Optional[torch.dtype]) -> None:
    if out_dtype is not None and out_dtype != x.dtype:
        raise ValueError(f"a fused add + norm writes y in x's dtype ({x.dtype}); got out_dtype={out_dtype}")


def _last_dim(normalized_shape: Union[int, Sequence[int]]) -> int:
    if isinstance(normalized_shape, int):
        return normalized_shape
    shape = tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(
            f"archext norms normalise over the last dimension only: expected an int or a 1-tuple "
            f"for normalized_shape, got {shape}"
        )
    return shape[0]


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: ``x * rsqrt(mean(x^2) + eps) * (weight + weight_offset)``.

    ``weight_offset=1.0`` is Gemma's convention: the stored weight ``w`` scales by ``(1 + w)``
    and starts at zero.
    """

    def __init__(
        self,
        normalized_shape: Union[int, Sequence[int]],
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        weight_offset: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.normalized_shape = (_last_dim(normalized_shape),)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.weight_offset = weight_offset
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            # The effective scale (weight + offset) starts at 1.
            nn.init.constant_(self.weight, 1.0 - self.weight_offset)

    def forward(self, x: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.weight_offset,
                            _plain_out_dtype(x, self.weight, out_dtype))

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
                + (f", weight_offset={self.weight_offset}" if self.weight_offset else ""))


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension, with bias (``bias=True``), weight only (``bias=False``),
    or no affine parameters (``elementwise_affine=False``)."""

    def __init__(
        self,
        normalized_shape: Union[int, Sequence[int]],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.normalized_shape = (_last_dim(normalized_shape),)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = dict(device=device, dtype=dtype)
        affine = lambda on: nn.Parameter(torch.empty(self.normalized_shape, **kw)) if on else None  # noqa: E731
        self.register_parameter("weight", affine(elementwise_affine))
        self.register_parameter("bias", affine(elementwise_affine and bias))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps,
                              _plain_out_dtype(x, self.weight, out_dtype))

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")


class AddRMSNorm(RMSNorm):
    """Fused residual add + RMSNorm: ``forward(x, residual) -> (rms_norm(x + residual), x + residual)``.

    The second output is the new residual stream; its gradient is summed into the backward.
    Without ``residual`` it is the plain norm (``out_dtype`` as `RMSNorm`'s) and returns x as h.
    """

    def forward(self, x: Tensor, residual: Optional[Tensor] = None,
                out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        if residual is None:
            return super().forward(x, out_dtype), x
        _check_add_out_dtype(x, out_dtype)
        return ops.add_rms_norm(x, residual, self.weight, self.eps, self.weight_offset)


class AddLayerNorm(LayerNorm):
    """Fused residual add + LayerNorm: ``forward(x, residual) -> (layer_norm(x + residual), x + residual)``."""

    def forward(self, x: Tensor, residual: Optional[Tensor] = None,
                out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        if residual is None:
            return super().forward(x, out_dtype), x
        _check_add_out_dtype(x, out_dtype)
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class HeadwiseNorm(nn.Module):
    """A norm over the last dimension of x ``[..., n_heads, head_dim]`` with a weight (and, for
    LayerNorm with ``bias``, a bias) of its own per head, ``[n_heads, head_dim]``: the
    per-head QK-norm of StableLM and Cohere. The normalisation runs on the kernel without
    affine parameters; the per-head affine is one broadcast multiply-add."""

    def __init__(self, n_heads: int, head_dim: int, kind: str = "layernorm", eps: float = 1e-5,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        if kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"HeadwiseNorm: kind must be 'layernorm' or 'rmsnorm', got {kind!r}")
        if kind == "rmsnorm" and bias:
            raise ValueError("HeadwiseNorm: an RMSNorm has no bias")
        self.kind, self.eps, self.shape = kind, eps, (n_heads, head_dim)
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(self.shape, **kw))
        self.bias = nn.Parameter(torch.empty(self.shape, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = ops.layer_norm(x, None, None, self.eps) if self.kind == "layernorm" else ops.rms_norm(x, None, self.eps)
        y = y * self.weight
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.shape}, kind={self.kind!r}, eps={self.eps}, bias={self.bias is not None}"
