"""Rotary position embedding (RoPE): fused rotation of q and k, its backward, an in-place form.

Angles come from a precomputed float32 cos/sin cache ([positions, rotary_dim / 2], built by
`rope_cache` in float64 and rounded once), not from `theta` inside the kernel: the cache is read
once per token and shared by every head of q and k, which costs less than evaluating sin and cos
per element, and the values do not depend on the kernel's dtype or device. The math is in
csrc/common/rope_math.h; the float64 references in archext/reference.py.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .. import reference as _ref
from . import packing as _packing
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


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE frequency scaling (context extension), with Hugging Face's semantics
    (transformers' ``modeling_rope_utils.ROPE_INIT_FUNCTIONS``; the papers are cited there):

    - ``linear``: every frequency divided by ``factor`` (position interpolation).
    - ``dynamic``: NTK-aware, the base raised to ``theta * (factor * L / L0 - (factor - 1)) **
      (R / (R - 2))`` for a sequence of length L beyond ``original_max_positions`` = L0;
      unscaled up to L0. It depends on each call's length, so the cache is recomputed then.
    - ``yarn``: frequencies blended between interpolation and extrapolation by a ramp over the
      dims whose rotations in L0 lie between ``beta_slow`` and ``beta_fast``; cos and sin
      multiplied by the attention factor (default ``0.1 ln(factor) + 1``, or the DeepSeek
      ``mscale`` / ``mscale_all_dim`` ratio).
    - ``llama3``: Llama 3.1's per-frequency rule: wavelengths above ``L0 / low_freq_factor``
      divided by ``factor``, below ``L0 / high_freq_factor`` kept, smoothly blended between.
    - ``longrope``: each frequency divided by its own factor, ``short_factor`` for sequences up
      to L0 and ``long_factor`` beyond (Phi-3); cos and sin multiplied by the attention factor
      (default ``sqrt(1 + ln(factor) / ln(L0))``, 1 when factor <= 1).
    """

    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # context extension ratio (longrope: max_positions / L0 as HF defaults it)
    original_max_positions: Optional[int] = None  # L0, the pretraining context (all but linear)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn: ramp bound in rotations (extrapolated above)
    beta_slow: float = 1.0  # yarn: ramp bound in rotations (interpolated below)
    truncate: bool = True  # yarn: round the ramp's bounds to whole dims
    mscale: Optional[float] = None  # yarn (DeepSeek): attention factor numerator's mscale
    mscale_all_dim: Optional[float] = None  # yarn (DeepSeek): attention factor denominator's mscale
    attention_factor: Optional[float] = None  # yarn, longrope: multiplies cos and sin; None = derived
    short_factor: Optional[tuple] = None  # longrope: R / 2 divisors for sequences up to L0
    long_factor: Optional[tuple] = None  # longrope: R / 2 divisors beyond L0

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"RopeScaling: {msg}")

        if self.rope_type not in ROPE_TYPES:
            fail(f"rope_type={self.rope_type!r} is unknown; choose one of {', '.join(map(repr, ROPE_TYPES))}")
        if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor) and self.factor > 0):
            fail(f"factor must be a finite number > 0, got {self.factor!r}")
        needs_l0 = self.rope_type in ("dynamic", "yarn", "llama3", "longrope")
        l0 = self.original_max_positions
        if needs_l0 and (not isinstance(l0, int) or isinstance(l0, bool) or l0 < 1):
            fail(f"rope_type={self.rope_type!r} needs original_max_positions (the pretraining "
                 f"context) as a positive int, got {l0!r}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            fail(f"llama3 needs high_freq_factor > low_freq_factor > 0, got "
                 f"{self.high_freq_factor} and {self.low_freq_factor}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            fail(f"attention_factor must be None or > 0, got {self.attention_factor}")
        for name in ("short_factor", "long_factor"):
            v = getattr(self, name)
            if v is not None:  # lists (from JSON) become tuples: the config stays hashable
                object.__setattr__(self, name, tuple(float(x) for x in v))
        if self.rope_type == "longrope" and (self.short_factor is None or self.long_factor is None
                                             or len(self.short_factor) != len(self.long_factor)):
            fail("longrope needs short_factor and long_factor of the same length (rotary_dim / 2)")

    @classmethod
    def coerce(cls, value) -> Optional["RopeScaling"]:
        """None, a RopeScaling, or its dict (a JSON config); "default" scaling becomes None."""
        if value is None or isinstance(value, RopeScaling):
            out = value
        elif isinstance(value, dict):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - fields)
            if unknown:
                raise ValueError(f"RopeScaling: unknown field(s) {unknown}; known: {sorted(fields)}")
            out = cls(**value)
        else:
            raise ValueError(f"RopeScaling: expected None, a RopeScaling or a dict, got {value!r}")
        return None if out is not None and out.rope_type == "default" else out

    def scaled(self, seq_len: Optional[int]) -> bool:
        """Whether a call over ``seq_len`` positions needs a table other than the one for short
        sequences (dynamic and longrope switch beyond ``original_max_positions``)."""
        return (self.rope_type in ("dynamic", "longrope") and seq_len is not None
                and seq_len > self.original_max_positions)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(rotary_dim: int, theta: float = 10000.0, scaling: Optional[RopeScaling] = None,
                     seq_len: Optional[int] = None) -> tuple[Tensor, float]:
    """The float64 inverse frequencies ``[rotary_dim / 2]`` of RoPE with ``scaling``, and the
    attention factor that multiplies cos and sin. ``seq_len`` is the call's length (positions
    0..seq_len-1): only dynamic and longrope read it (None: a short sequence)."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    half = rotary_dim // 2
    expo = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    kind = "default" if scaling is None else scaling.rope_type
    if kind == "dynamic" and scaling.scaled(seq_len):
        if rotary_dim <= 2:
            raise ValueError("dynamic RoPE needs rotary_dim > 2 (its exponent is R / (R - 2))")
        f, l0 = scaling.factor, scaling.original_max_positions
        theta = theta * (f * seq_len / l0 - (f - 1)) ** (rotary_dim / (rotary_dim - 2))
    inv = theta ** -expo
    attention = 1.0
    if kind == "linear":
        inv = inv / scaling.factor
    elif kind == "llama3":
        f, l0 = scaling.factor, scaling.original_max_positions
        lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > l0 / lo, inv / f, inv)
        smooth = (l0 / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wavelen >= l0 / hi) & (wavelen <= l0 / lo)
        inv = torch.where(medium, blended, scaled)
    elif kind == "yarn":
        f, l0 = scaling.factor, scaling.original_max_positions

        def dim_of(rotations):  # the dim whose wavelength fits `rotations` times into l0
            return rotary_dim * math.log(l0 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        if low == high:
            high += 0.001  # as transformers: no zero-width ramp
        ramp = ((torch.arange(half, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: the dim keeps its frequency; 0: divided by factor
        inv = inv / f * (1 - extrapolate) + inv * extrapolate
        if scaling.attention_factor is not None:
            attention = scaling.attention_factor
        elif scaling.mscale and scaling.mscale_all_dim:
            attention = yarn_mscale(f, scaling.mscale) / yarn_mscale(f, scaling.mscale_all_dim)
        else:
            attention = yarn_mscale(f)
    elif kind == "longrope":
        ext = scaling.long_factor if scaling.scaled(seq_len) else scaling.short_factor
        if len(ext) != half:
            raise ValueError(f"longrope factors have {len(ext)} entries; rotary_dim={rotary_dim} "
                             f"needs {half}")
        inv = inv / torch.tensor(ext, dtype=torch.float64)
        f, l0 = scaling.factor, scaling.original_max_positions
        if scaling.attention_factor is not None:
            attention = scaling.attention_factor
        else:
            attention = 1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(l0))
    return inv, attention


def rope_cache(rotary_dim: int, max_positions: int, theta: float = 10000.0,
               device=None, *, scaling: Optional[RopeScaling] = None,
               seq_len: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """cos and sin of ``p * inv_freq[i]`` for p < max_positions, i < rotary_dim / 2, computed in
    float64 and stored as float32 ``[max_positions, rotary_dim / 2]``. Unscaled,
    ``inv_freq[i] = theta^(-2i / rotary_dim)``; ``scaling`` (a `RopeScaling`) changes the
    frequencies as `rope_frequencies` says and folds its attention factor into cos and sin
    (as transformers multiplies them). ``seq_len``: the length of the call the table serves
    (dynamic and longrope depend on it; default: short)."""
    inv_freq, attention = rope_frequencies(rotary_dim, theta, scaling, seq_len)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos.float().to(device), sin.float().to(device)


def rope_positions(q: Tensor, offset: Union[int, Tensor] = 0,
                   position_ids: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """The int64 positions of q's tokens ``[B, S, ...]``: ``position_ids`` as given ([S] or
    [B, S]); with ``cu_seqlens`` (packed documents, `archext.ops.packing`) each token's place in
    its document, [B, S]; else ``offset + arange(S)``, with ``offset`` an int or a per-batch
    tensor [B] (a KV cache)."""
    if cu_seqlens is not None:
        if position_ids is not None or not (isinstance(offset, int) and offset == 0):
            raise ValueError("rope: give cu_seqlens or position_ids / offset, not both")
        _packing.check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], q.device)
        return _packing.positions(cu_seqlens, q.shape[0], q.shape[1])
    if position_ids is not None:
        return position_ids.to(device=q.device, dtype=torch.long)
    seq = torch.arange(q.shape[1], device=q.device, dtype=torch.long)
    if isinstance(offset, Tensor):
        return offset.to(device=q.device, dtype=torch.long)[:, None] + seq[None, :]
    return seq + offset


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *,
               offset: Union[int, Tensor] = 0, position_ids: Optional[Tensor] = None,
               interleaved: bool = False, cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Rotates q ``[B, S, Hq, D]`` and k ``[B, S, Hk, D]`` (any strides; pass
    ``x.transpose(1, 2)`` for a ``[B, H, S, D]`` tensor) by the cache from `rope_cache`.
    The first ``2 * cos.shape[1]`` dims of each head rotate, the rest pass through. Tokens sit
    at ``offset + arange(S)``, or at ``position_ids``, or, for packed documents, at their
    place in their document given by ``cu_seqlens`` (see `rope_positions`)."""
    pos = rope_positions(q, offset, position_ids, cu_seqlens)
    if using_reference_ops():
        return _ref.rope(q, cos, sin, pos, interleaved), _ref.rope(k, cos, sin, pos, interleaved)
    return _ops.rope_fwd(q, k, cos, sin, pos, interleaved)


def apply_rope_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *,
                offset: Union[int, Tensor] = 0, position_ids: Optional[Tensor] = None,
                interleaved: bool = False, cu_seqlens: Optional[Tensor] = None) -> None:
    """In-place `apply_rope`, for inference (not differentiable)."""
    pos = rope_positions(q, offset, position_ids, cu_seqlens)
    _ops.rope_fwd_(q, k, cos, sin, pos, interleaved)
