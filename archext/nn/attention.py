"""Multi-head / grouped-query self-attention with the stability options of current LMs."""
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..reference import attention_mask
from .norm import HeadwiseNorm, LayerNorm, RMSNorm
from .positions import RotaryEmbedding, expand_relative_bias

ATTENTION_IMPLS = ("auto", "sdpa", "tiled", "flex", "materialized")

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
            positions are added to the input by the model; relative biases come in the
            forward's ``rel_bias``).
        softcap: tanh soft-cap on the attention logits (Gemma 2 uses 50), applied after the
            scale and before the mask.
        sliding_window: attend only to the W most recent keys (the query's own included).
        scale: logit scale; default ``head_dim ** -0.5``.
        impl: the attention engine; ``"auto"`` (default) picks per call (`path`):
            ``"sdpa"``: ``F.scaled_dot_product_attention``, fused, when no score is modified;
            ``"tiled"``: archext's flash-style kernel (``ops.flash_attention``): soft-cap,
            windows, relative biases and packed documents with memory linear in S, on the CPU
            and CUDA; ``"flex"``: PyTorch's FlexAttention, compiled (CUDA; on the CPU this torch
            has no FlexAttention backward); ``"materialized"``: the scores ``[B, H, S, S]`` and
            archext's softmax kernel, the reference path (and the one for a full ``bias`` or
            attention dropout).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, bias: bool = False,
                 out_bias: Optional[bool] = None, qk_norm: Optional[str] = None,
                 qk_norm_type: str = "rmsnorm", qk_norm_eps: float = 1e-6,
                 qk_norm_offset: float = 0.0, qk_norm_bias: bool = True, rope: Optional[RotaryEmbedding] = None,
                 softcap: Optional[float] = None, sliding_window: Optional[int] = None,
                 causal: bool = True, scale: Optional[float] = None, dropout: float = 0.0,
                 impl: str = "auto", device=None, dtype=None):
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
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"Attention: impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"Attention: sliding_window must be >= 1, got {sliding_window}")
        kw = dict(device=device, dtype=dtype)
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.qk_norm, self.qk_norm_type, self.softcap = qk_norm, qk_norm_type, softcap
        self.sliding_window, self.causal, self.dropout = sliding_window, causal, dropout
        self.impl = impl
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
                position_ids: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                rel_bias: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """x ``[B, S, d_model]``; ``offset`` / ``position_ids`` place the tokens for RoPE.
        Logit biases: ``rel_bias`` ``[H, 2S - 1]`` by key - query offset (`ALiBi.relative`,
        `RelativePositionBias.relative`: linear memory), or ``bias`` broadcast to
        ``[B, H, S, S]`` (any bias; the materialised path). Packed documents: ``cu_seqlens``
        (`archext.ops.packing`; positions restart and attention stays in each document), or
        the same as ``segment_ids`` ``[B, S]`` int32 with the positions in ``position_ids``."""
        b, s, _ = x.shape
        if cu_seqlens is not None:
            if position_ids is not None or segment_ids is not None:
                raise ValueError("Attention: give cu_seqlens, or position_ids and segment_ids, not both")
            position_ids, segment_ids = ops.packing.unpack(cu_seqlens, b, s, x.device)
        q, k, v = self._project(x, offset, position_ids)  # [B, S, H, D]
        o = self.attend(q, k, v, bias=bias, rel_bias=rel_bias, segment_ids=segment_ids)
        return self.o_proj(o.reshape(b, s, self.n_heads * self.head_dim))

    def path(self, q: Tensor, *, bias: Optional[Tensor] = None, rel_bias: Optional[Tensor] = None,
             segment_ids: Optional[Tensor] = None) -> str:
        """The engine ``impl="auto"`` picks for a call: ``"sdpa"`` (PyTorch's fused attention)
        when no score is modified, but for a training step on the CPU (q requires grad) archext's
        tiled kernel, which is faster there; else the materialised scores for a full ``bias`` or for
        dropout (the fused paths have neither); FlexAttention on CUDA where this torch has it;
        else archext's tiled kernel (``"tiled"``: CPU, or CUDA without FlexAttention)."""
        if self.impl != "auto":
            return self.impl
        dropout = self.dropout > 0 and self.training
        modified = (self.softcap is not None or bias is not None or rel_bias is not None
                    or self.sliding_window is not None or segment_ids is not None)
        if not modified:
            # A training step on the CPU: the tiled kernel's forward + backward takes 0.53-0.87x
            # SDPA's time at 128-2048 tokens, 1-2 threads (benchmarks/RESULTS.md); a forward
            # alone is within 0.68-1.09x of SDPA's, which keeps it. (Under reference_ops the
            # model is plain PyTorch: SDPA.)
            if (q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad
                    and not dropout and self.head_dim <= ops.attention.MAX_HEAD_DIM
                    and not ops.using_reference_ops()):
                return "tiled"
            return "sdpa"
        if bias is not None or dropout or self.head_dim > ops.attention.MAX_HEAD_DIM:
            return "materialized"
        if q.device.type == "cuda" and _flex_available():
            return "flex"
        return "tiled"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, bias: Optional[Tensor] = None,
               rel_bias: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None) -> Tensor:
        """Attention of q ``[B, S, Hq, D]`` over k, v ``[B, S, Hk, D]`` (projected, rotated) with
        this module's mask, cap and scale; returns ``[B, S, Hq, D]``."""
        path = self.path(q, bias=bias, rel_bias=rel_bias, segment_ids=segment_ids)
        if path in ("tiled", "flex") and self.dropout > 0 and self.training:
            raise ValueError(f"Attention: impl={path!r} has no attention dropout (dropout="
                             f"{self.dropout}); use impl='auto' or 'materialized', or eval()")
        if path in ("tiled", "flex") and bias is not None:
            raise ValueError(f"Attention: impl={path!r} takes a relative bias (rel_bias), not a full "
                             f"bias tensor; use impl='auto' or 'materialized'")
        if path == "tiled":
            return ops.flash_attention(q, k, v, scale=self.scale, softcap=self.softcap,
                                       causal=self.causal, window=self.sliding_window,
                                       rel_bias=rel_bias, segment_ids=segment_ids)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        if path == "flex":
            o = _flex_attention(q, k, v, self.scale, self.softcap, self.causal, self.sliding_window,
                                rel_bias, segment_ids)
            return o.transpose(1, 2)
        groups = self.n_heads // self.n_kv_heads
        p = self.dropout if self.training else 0.0
        s = q.shape[2]
        if path == "sdpa":
            mask = None
            if self.sliding_window is not None or segment_ids is not None:
                mask = _keep_mask(s, self.causal, self.sliding_window, segment_ids, q.device)
            if bias is not None or rel_bias is not None or self.softcap is not None:
                raise ValueError("Attention: impl='sdpa' cannot apply a soft-cap or a bias")
            if groups > 1 and not _SDPA_HAS_GQA:
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            extra = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=self.causal and mask is None,
                                               scale=self.scale, **extra)
            return o.transpose(1, 2)
        # The materialised scores [B, H, S, S]: the reference path, and the one for a full
        # bias or dropout.
        if rel_bias is not None:
            full = expand_relative_bias(rel_bias, s, s)
            bias = full if bias is None else bias + full
        if segment_ids is not None:
            same = same_document(segment_ids)
            doc = torch.zeros(same.shape, dtype=q.dtype, device=q.device).masked_fill(~same, float("-inf"))
            bias = doc if bias is None else bias + doc
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = torch.matmul(q, k.transpose(-1, -2))
        probs = ops.softmax(scores, scale=self.scale, softcap=self.softcap, causal=self.causal,
                            window=self.sliding_window, bias=bias)
        if p:
            probs = F.dropout(probs, p)
        return torch.matmul(probs, v).transpose(1, 2)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, qk_norm={self.qk_norm}, softcap={self.softcap}, "
                f"sliding_window={self.sliding_window}, causal={self.causal}, impl={self.impl}")


def _keep_mask(s: int, causal: bool, window: Optional[int], segment_ids: Optional[Tensor],
               device) -> Optional[Tensor]:
    """The boolean keep-mask, [S, S] or with documents [B, 1, S, S] (S^2 memory: SDPA only)."""
    keep = attention_mask(s, s, causal, window, device)
    if segment_ids is not None:
        same = same_document(segment_ids)
        keep = same if keep is None else same & keep
    return keep


def same_document(segment_ids: Tensor, q_len: Optional[int] = None) -> Tensor:
    """``[B, 1, Sq, Sk]``: whether query i and key j lie in one document, for segment ids
    ``[B, Sk]`` whose last ``q_len`` (default all) positions are the queries'."""
    q_seg = segment_ids if q_len is None else segment_ids[:, segment_ids.shape[1] - q_len:]
    return q_seg[:, None, :, None] == segment_ids[:, None, None, :]


_FLEX = None


def _flex_available() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5; it compiles through Triton on CUDA)."""
    global _FLEX
    if _FLEX is None:
        try:
            from torch.nn.attention import flex_attention as fa
            # Shapes dynamic after the first recompile: a new length must not exhaust the
            # compile cache, past which torch.compile runs flex_attention eagerly (S^2 memory).
            _FLEX = (fa.flex_attention, fa.create_block_mask, torch.compile(fa.flex_attention),
                     torch.compile(fa.create_block_mask))
        except Exception:  # noqa: BLE001 - an old torch, or no compiler
            _FLEX = False
    return _FLEX is not False


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: Optional[float],
                    causal: bool, window: Optional[int], rel_bias: Optional[Tensor],
                    segment_ids: Optional[Tensor]) -> Tensor:
    """FlexAttention over q ``[B, Hq, S, D]``, k, v ``[B, Hk, S, D]``: the soft-cap and the
    relative bias as a score_mod, the causal / window / document masks as a block mask (whole
    blocks outside them are skipped). Eagerly it runs the compiled kernel; inside a compiled
    region the plain call, which the compiler lowers the same way."""
    if not _flex_available():
        raise RuntimeError("Attention: impl='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
    flex, create_block_mask, compiled, compiled_mask = _FLEX
    eager = not torch.compiler.is_compiling()
    s_k = k.shape[2]

    def score_mod(score, b, h, qi, kj):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if rel_bias is not None:
            score = score + rel_bias[h, kj - qi + s_k - 1].to(score.dtype)
        return score

    def mask_mod(b, h, qi, kj):
        keep = qi >= 0  # all True, of the index's shape
        if causal:
            keep = keep & (kj <= qi)
        if window is not None:
            keep = keep & (qi - kj < window)
        if segment_ids is not None:
            keep = keep & (segment_ids[b, qi] == segment_ids[b, kj])
        return keep

    block_mask = None
    if causal or window is not None or segment_ids is not None:
        batch = None if segment_ids is None else q.shape[0]
        # Compiled, the mask is built block by block, never as an [S, S] grid.
        block_mask = (compiled_mask if eager else create_block_mask)(
            mask_mod, batch, None, q.shape[2], s_k, device=q.device)
    fn = compiled if eager else flex
    mod = score_mod if softcap is not None or rel_bias is not None else None
    return fn(q, k, v, score_mod=mod, block_mask=block_mask, scale=scale,
              enable_gqa=q.shape[1] != k.shape[1])
