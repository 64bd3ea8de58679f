"""Position schemes: rotary (RoPE, with the archext kernel), sinusoidal and learned absolute
embeddings, and relative biases on the attention logits (ALiBi and T5's bucketed bias).

The absolute embeddings and the biases are a gather or an outer difference plus an add, which
PyTorch already does at memory speed (and `torch.compile` fuses into the consumer), so they are
plain modules; RoPE is a kernel because its eager composite moves q and k several times."""
import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.rope import RopeScaling


class RotaryEmbedding(nn.Module):
    """Owns RoPE's theta, rotary dimension and convention, and its float32 cos/sin cache.

    Args:
        head_dim: the per-head dimension D of q and k.
        rotary_dim: how many leading dims of each head rotate (even, <= head_dim); default all.
            ``rotary_fraction`` (e.g. 0.25 as GPT-NeoX / Pythia) is the alternative spelling.
        theta: the frequency base (10000 in the paper and Llama 2; 500000 in Llama 3).
        interleaved: GPT-J pairs (2i, 2i+1); default False, GPT-NeoX / Llama pairs (i, i + R/2).
        max_positions: the cache length; positions must lie below it.
        scaling: a `archext.ops.rope.RopeScaling` (linear, dynamic, yarn, llama3, longrope) or its
            dict; None is plain RoPE. Its attention factor is folded into the cache. Dynamic and
            longrope tables depend on each call's length (the largest position + 1, read from
            ``position_ids`` with a host sync): beyond ``original_max_positions`` the call gets a
            table computed for its length, as transformers recomputes its frequencies.
        layout: "bshd" for q/k of shape [batch, seq, heads, head_dim], "bhsd" for
            [batch, heads, seq, head_dim] (either may have any strides).
    """

    def __init__(self, head_dim: int, rotary_dim: Optional[int] = None,
                 rotary_fraction: Optional[float] = None, theta: float = 10000.0,
                 interleaved: bool = False, max_positions: int = 4096, layout: str = "bshd",
                 scaling=None, device=None):
        super().__init__()
        if rotary_dim is not None and rotary_fraction is not None:
            raise ValueError("give rotary_dim or rotary_fraction, not both")
        if rotary_fraction is not None:
            rotary_dim = int(head_dim * rotary_fraction)
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
        if layout not in ("bshd", "bhsd"):
            raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
        self.head_dim, self.rotary_dim, self.theta = head_dim, rotary_dim, theta
        self.interleaved, self.max_positions, self.layout = interleaved, max_positions, layout
        self.scaling = RopeScaling.coerce(scaling)
        self._long = None  # (seq_len, cos, sin) of the last call that needed its own table
        cos, sin = ops.rope_cache(rotary_dim, max_positions, theta, device=device, scaling=self.scaling)
        # Derived from the config, so not saved in the state dict.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / model.half() would cast the cache; the kernel takes a float32
        # table (the angles are the same in every dtype), so only a device move applies to it.
        cos, sin = self.cos, self.sin
        out = super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)
        return out

    def tables(self, seq_len: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """The cos/sin tables for a call over positions below ``seq_len``: the cache, or for
        dynamic / longrope scaling beyond the original context a table made for that length."""
        if self.scaling is None or not self.scaling.scaled(seq_len):
            return self.cos, self.sin
        if self._long is None or self._long[0] != seq_len or self._long[1].device != self.cos.device:
            rows = max(seq_len, self.max_positions)
            cos, sin = ops.rope_cache(self.rotary_dim, rows, self.theta, device=self.cos.device,
                                      scaling=self.scaling, seq_len=seq_len)
            self._long = (seq_len, cos, sin)
        return self._long[1], self._long[2]

    def tables_for(self, q: Tensor, offset: Union[int, Tensor] = 0,
                   position_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """`tables` for q ``[B, S, H, D]`` placed by ``offset`` / ``position_ids``."""
        if self.scaling is None or self.scaling.rope_type not in ("dynamic", "longrope"):
            return self.cos, self.sin
        if position_ids is None and isinstance(offset, int):
            seq_len = offset + q.shape[1]
        else:  # the length as transformers reads it: the largest position + 1 (a host sync)
            seq_len = int(ops.rope_positions(q, offset, position_ids).max()) + 1
        return self.tables(seq_len)

    def forward(self, q: Tensor, k: Tensor, offset: Union[int, Tensor] = 0,
                position_ids: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Rotates q and k; tokens at ``offset + arange(S)``, at ``position_ids``, or at their
        place in their document for a packed batch described by ``cu_seqlens``."""
        if self.layout == "bhsd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cu_seqlens is not None:
            position_ids = ops.rope_positions(q, offset, cu_seqlens=cu_seqlens)
        if position_ids is None and isinstance(offset, int) and offset + q.shape[1] > self.max_positions:
            raise ValueError(f"positions up to {offset + q.shape[1] - 1} exceed max_positions="
                             f"{self.max_positions} of this RotaryEmbedding")
        cos, sin = self.tables_for(q, offset, position_ids)
        q, k = ops.apply_rope(q, k, cos, sin, offset=offset, position_ids=position_ids,
                              interleaved=self.interleaved)
        if self.layout == "bhsd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q, k

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, theta={self.theta}, "
                f"interleaved={self.interleaved}, max_positions={self.max_positions}, layout={self.layout}"
                + ("" if self.scaling is None else f", scaling={self.scaling.rope_type}"))


def sinusoidal_table(max_positions: int, dim: int, base: float = 10000.0) -> Tensor:
    """The original Transformer's table (Vaswani et al. 2017, section 3.5), in float64:
    pe[p, 2i] = sin(p / base^(2i/dim)), pe[p, 2i+1] = cos(p / base^(2i/dim))."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv[None, :]
    pe = torch.empty(max_positions, dim, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = ang.sin(), ang.cos()
    return pe


class SinusoidalPositionalEmbedding(nn.Module):
    """Adds the fixed sinusoidal table to x [batch, seq, dim] at positions offset..offset+seq."""

    def __init__(self, dim: int, max_positions: int = 8192, base: float = 10000.0, device=None):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_positions, dim, base).float().to(device),
                             persistent=False)

    def forward(self, x: Tensor, offset: int = 0, position_ids: Optional[Tensor] = None) -> Tensor:
        if position_ids is not None:  # [S] or [B, S], e.g. restarting in packed documents
            return x + self.table[position_ids].to(x.dtype)
        return x + self.table[offset:offset + x.shape[1]].to(x.dtype)


class LearnedPositionalEmbedding(nn.Embedding):
    """A learned table added to x [batch, seq, dim]. ``offset`` shifts every index (OPT stores
    two extra rows and looks up position + 2)."""

    def __init__(self, max_positions: int, dim: int, offset: int = 0, device=None, dtype=None):
        super().__init__(max_positions + offset, dim, device=device, dtype=dtype)
        self.offset = offset

    def forward(self, x: Tensor, position_ids: Optional[Tensor] = None, start: int = 0) -> Tensor:
        if position_ids is None:
            position_ids = torch.arange(start, start + x.shape[1], device=x.device)
        return x + super().forward(position_ids + self.offset)


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): 2^(-8 i / n) for i = 1..n when n is a power
    of two; otherwise those of the nearest lower power of two, then every other slope of the
    next power of two (as in the paper's code)."""
    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    if n_heads & (n_heads - 1) == 0:
        slopes = pow2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = pow2(closest) + pow2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(nn.Module):
    """Relative position as a linear penalty on the attention logits: bias[h, i, j] =
    -slope_h * (i - j) for query position i, key position j (keys at or before i matter under
    a causal mask). ``forward(q_len, k_len)`` returns the [heads, q_len, k_len] bias, queries
    being the last q_len of the k_len positions (a KV cache)."""

    def __init__(self, n_heads: int, device=None):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads).to(device), persistent=False)

    def forward(self, q_len: int, k_len: int) -> Tensor:
        i = torch.arange(k_len - q_len, k_len, device=self.slopes.device)[:, None]
        j = torch.arange(k_len, device=self.slopes.device)[None, :]
        return -self.slopes[:, None, None] * (i - j).float()

    def relative(self, q_len: int, k_len: int) -> Tensor:
        """The same bias by key - query offset, ``[heads, q_len + k_len - 1]`` (entry r is the
        offset r - (k_len - 1)): what the tiled attention takes, linear in the length."""
        rel = torch.arange(-(k_len - 1), q_len, device=self.slopes.device, dtype=torch.float32)
        return self.slopes[:, None] * rel[None, :]


def t5_relative_bucket(relative_position: Tensor, bidirectional: bool = True,
                       num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5's bucketing of key - query offsets (Raffel et al. 2020): exact buckets for small
    distances, logarithmic ones up to max_distance, and one last bucket beyond."""
    bucket = torch.zeros_like(relative_position)
    n = num_buckets
    if bidirectional:
        n //= 2
        bucket = bucket + (relative_position > 0).long() * n
        rel = relative_position.abs()
    else:
        rel = -torch.clamp(relative_position, max=0)
    max_exact = n // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)
    ).long()
    large = torch.clamp(large, max=n - 1)
    return bucket + torch.where(is_small, rel, large)


class RelativePositionBias(nn.Module):
    """T5's learned, bucketed relative position bias on the attention logits: one scalar per
    (bucket, head). ``forward(q_len, k_len)`` returns the [heads, q_len, k_len] bias."""

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = False, device=None, dtype=None):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.bias = nn.Embedding(num_buckets, n_heads, device=device, dtype=dtype)

    def forward(self, q_len: int, k_len: int) -> Tensor:
        dev = self.bias.weight.device
        q = torch.arange(k_len - q_len, k_len, device=dev)[:, None]
        k = torch.arange(k_len, device=dev)[None, :]
        buckets = t5_relative_bucket(k - q, self.bidirectional, self.num_buckets, self.max_distance)
        return self.bias(buckets).permute(2, 0, 1)

    def relative(self, q_len: int, k_len: int) -> Tensor:
        """The same bias by key - query offset, ``[heads, q_len + k_len - 1]`` (entry r is the
        offset r - (k_len - 1)), differentiable in the table: linear in the length."""
        rel = torch.arange(-(k_len - 1), q_len, device=self.bias.weight.device)
        buckets = t5_relative_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return self.bias(buckets).t()


def expand_relative_bias(rel_bias: Tensor, q_len: int, k_len: int) -> Tensor:
    """``[H, q_len + k_len - 1]`` by offset (`ALiBi.relative`) to the full ``[H, q_len, k_len]``
    bias, queries being the last q_len of the k_len positions (for the materialised path)."""
    i = torch.arange(k_len - q_len, k_len, device=rel_bias.device)[:, None]
    j = torch.arange(k_len, device=rel_bias.device)[None, :]
    return rel_bias[:, j - i + k_len - 1]
