"""Multi-head / grouped-query self-attention with the stability options of current LMs."""
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..reference import attention_mask
from .norm import HeadwiseNorm, LayerNorm, RMSNorm
from .positions import RotaryEmbedding

# enable_gqa arrived in torch 2.5; older versions repeat k and v.
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


class Attention(nn.Module):
    """Causal (by default) self-attention over x ``[B, S, d_model]``.

    Args:
        d_model, n_heads: model width and query heads.
        n_kv_heads: key/value heads (grouped-query attention when fewer than n_heads; 1 is MQA).
        head_dim: per-head width; default ``d_model // n_heads``.
        bias: bias on the q/k/v projections; ``out_bias`` on the output one (default: ``bias``).
        qk_norm: None, ``"head"`` (normalise each head over head_dim with one weight shared by
            the heads: Qwen3, Gemma 3), ``"each_head"`` (the same with a weight per head:
            StableLM, Cohere) or ``"proj"`` (normalise the whole q and k projections: OLMo 2).
            ``qk_norm_type`` is ``"rmsnorm"`` or ``"layernorm"``; ``qk_norm_offset=1`` is Gemma's
            ``(1 + w)`` weight; ``qk_norm_bias`` gives a LayerNorm QK-norm its bias (not
            "each_head", which has weights only).
        rope: a `RotaryEmbedding` (layout "bshd") applied to q and k, or None (absolute
            positions are added to the input by the model; relative biases come in ``bias``).
        softcap: tanh soft-cap on the attention logits (Gemma 2 uses 50), applied after the
            scale and before the mask.
        sliding_window: attend only to the W most recent keys (the query's own included).
        scale: logit scale; default ``head_dim ** -0.5``.

    Without a soft-cap or a bias it calls ``F.scaled_dot_product_attention`` (fused, no score
    matrix in memory). With either it materialises the scores ``[B, H, S, S]`` and runs the
    archext soft-capped softmax kernel: memory O(B * H * S^2), fine for training lengths of a
    few thousand, and what eager Gemma 2 does too (SDPA has no soft-cap)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, bias: bool = False,
                 out_bias: Optional[bool] = None, qk_norm: Optional[str] = None,
                 qk_norm_type: str = "rmsnorm", qk_norm_eps: float = 1e-6,
                 qk_norm_offset: float = 0.0, qk_norm_bias: bool = True, rope: Optional[RotaryEmbedding] = None,
                 softcap: Optional[float] = None, sliding_window: Optional[int] = None,
                 causal: bool = True, scale: Optional[float] = None, dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = d_model // n_heads if head_dim is None else head_dim
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(f"Attention: n_heads ({n_heads}) must be a positive multiple of "
                             f"n_kv_heads ({n_kv_heads})")
        if head_dim <= 0:
            raise ValueError(f"Attention: head_dim must be positive, got {head_dim}")
        if qk_norm not in (None, "head", "each_head", "proj"):
            raise ValueError(f"Attention: qk_norm must be None, 'head', 'each_head' or 'proj', got {qk_norm!r}")
        if qk_norm_type not in ("rmsnorm", "layernorm"):
            raise ValueError(f"Attention: qk_norm_type must be 'rmsnorm' or 'layernorm', "
                             f"got {qk_norm_type!r}")
        if rope is not None and (rope.head_dim != head_dim or rope.layout != "bshd"):
            raise ValueError(f"Attention: rope must have head_dim={head_dim} and layout 'bshd'")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"Attention: softcap must be > 0, got {softcap}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"Attention: sliding_window must be >= 1, got {sliding_window}")
        kw = dict(device=device, dtype=dtype)
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.qk_norm, self.qk_norm_type, self.softcap = qk_norm, qk_norm_type, softcap
        self.sliding_window, self.causal, self.dropout = sliding_window, causal, dropout
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias if out_bias is None else out_bias, **kw)
        if qk_norm == "each_head":
            if qk_norm_offset:
                raise ValueError("Attention: qk_norm_offset does not apply to qk_norm='each_head'")
            self.q_norm = HeadwiseNorm(n_heads, head_dim, qk_norm_type, qk_norm_eps, **kw)
            self.k_norm = HeadwiseNorm(n_kv_heads, head_dim, qk_norm_type, qk_norm_eps, **kw)
        elif qk_norm is not None:
            qd, kd = (head_dim, head_dim) if qk_norm == "head" else (n_heads * head_dim, n_kv_heads * head_dim)
            if qk_norm_type == "rmsnorm":
                self.q_norm = RMSNorm(qd, eps=qk_norm_eps, weight_offset=qk_norm_offset, **kw)
                self.k_norm = RMSNorm(kd, eps=qk_norm_eps, weight_offset=qk_norm_offset, **kw)
            else:
                if qk_norm_offset:
                    raise ValueError("Attention: qk_norm_offset applies to rmsnorm only")
                self.q_norm = LayerNorm(qd, eps=qk_norm_eps, bias=qk_norm_bias, **kw)
                self.k_norm = LayerNorm(kd, eps=qk_norm_eps, bias=qk_norm_bias, **kw)
        self.rope = rope

    def _project(self, x: Tensor, offset, position_ids) -> tuple[Tensor, Tensor, Tensor]:
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, self.n_heads, self.head_dim)
        k = k.view(b, s, self.n_kv_heads, self.head_dim)
        v = v.view(b, s, self.n_kv_heads, self.head_dim)
        fused = (self.qk_norm == "head" and self.qk_norm_type == "rmsnorm" and self.rope is not None
                 and self.q_norm.weight is not None)
        if fused:
            # One pass: per-head RMSNorm of q and k, then the rotation.
            cos, sin = self.rope.tables_for(q, offset, position_ids)
            q, k = ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin,
                                    eps=self.q_norm.eps, per_head=True,
                                    weight_offset=self.q_norm.weight_offset, offset=offset,
                                    position_ids=position_ids, interleaved=self.rope.interleaved)
        else:
            if self.qk_norm in ("head", "each_head"):
                q, k = self.q_norm(q), self.k_norm(k)
            if self.rope is not None:
                q, k = self.rope(q, k, offset=offset, position_ids=position_ids)
        return q, k, v

    def forward(self, x: Tensor, *, offset: Union[int, Tensor] = 0,
                position_ids: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
        """x ``[B, S, d_model]``; ``offset`` / ``position_ids`` place the tokens for RoPE;
        ``bias`` is added to the logits (broadcast to ``[B, H, S, S]``: ALiBi, T5 bias)."""
        b, s, _ = x.shape
        q, k, v = self._project(x, offset, position_ids)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        groups = self.n_heads // self.n_kv_heads
        p = self.dropout if self.training else 0.0
        if self.softcap is None and bias is None:
            mask = None
            if self.sliding_window is not None:
                mask = attention_mask(s, s, self.causal, self.sliding_window, x.device)
            if groups > 1 and not _SDPA_HAS_GQA:
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            extra = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=self.causal and mask is None,
                                               scale=self.scale, **extra)
        else:
            if groups > 1:
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            scores = torch.matmul(q, k.transpose(-1, -2))
            probs = ops.softmax(scores, scale=self.scale, softcap=self.softcap, causal=self.causal,
                                window=self.sliding_window, bias=bias)
            if p:
                probs = F.dropout(probs, p)
            o = torch.matmul(probs, v)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, qk_norm={self.qk_norm}, softcap={self.softcap}, "
                f"sliding_window={self.sliding_window}, causal={self.causal}")
