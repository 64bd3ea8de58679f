"""Transformer blocks: one small class per norm placement / block type, each overriding only
``forward``, which reads as the block's equation. `Block.__init__` builds the branches and the
norms that the placement names; the norms are archext's fused add + norm modules, so a residual
add followed by a norm is one kernel.

    pre        h = x + attn(n1(x));         y = h + mlp(n2(h))
    post       h = n1(x + attn(x));         y = n2(h + mlp(h))
    double     h = x + n1'(attn(n1(x)));    y = h + n2'(mlp(n2(h)))       (sandwich: Gemma 2)
    reordered  h = x + n1'(attn(x));        y = h + n2'(mlp(h))           (OLMo 2)
    parallel   y = x + attn(n1(x)) + mlp(n2(x))    (n2 = n1 when shared: GPT-J, PaLM)

With ``residual_dtype="float32"`` the stream x (and h) is float32 while the branches run in the
model's dtype: the norms that read the stream write their output in the branches' dtype, the
fused add + norm takes the 16-bit branch output beside the float32 stream, and every residual
add is in float32 (a 16-bit branch output promotes). Post-norm is refused by the config.

Why parallel reorders the residual (GPT-J, PaLM): both branches read the same input, so their
input projections can be one GEMM and the block is one sequential step instead of two; at scale
the quality cost is small.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from ..nn import AddLayerNorm, AddRMSNorm, Attention, GatedMLP, MLP, RotaryEmbedding
from .config import BlockType, Norm, TransformerConfig


def make_norm(cfg: TransformerConfig, dim: Optional[int] = None) -> nn.Module:
    """The config's norm as a fused add + norm module (called with one argument it is the plain
    norm). State dicts match torch.nn.RMSNorm / LayerNorm."""
    dim = cfg.d_model if dim is None else dim
    if cfg.norm == Norm.RMSNORM:
        return AddRMSNorm(dim, eps=cfg.norm_eps)
    if cfg.norm == Norm.GEMMA_RMSNORM:
        return AddRMSNorm(dim, eps=cfg.norm_eps, weight_offset=1.0)
    return AddLayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm == Norm.LAYERNORM,
                        elementwise_affine=cfg.norm != Norm.LAYERNORM_NOAFFINE)


def make_attention(cfg: TransformerConfig, layer: int, rope: Optional[RotaryEmbedding]) -> Attention:
    qk_type = "rmsnorm" if cfg.norm in (Norm.RMSNORM, Norm.GEMMA_RMSNORM) else "layernorm"
    return Attention(
        cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size,
        bias=cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias, out_bias=cfg.bias,
        qk_norm=cfg.qk_norm, qk_norm_type=qk_type, qk_norm_eps=cfg.norm_eps,
        qk_norm_offset=1.0 if cfg.norm == Norm.GEMMA_RMSNORM else 0.0,
        qk_norm_bias=cfg.norm == Norm.LAYERNORM, rope=rope,
        softcap=cfg.attn_softcap, sliding_window=cfg.layer_window(layer), scale=cfg.attn_scale,
        dropout=cfg.dropout, impl=cfg.attn_impl)


def make_mlp(cfg: TransformerConfig) -> nn.Module:
    bias = cfg.bias if cfg.mlp_bias is None else cfg.mlp_bias
    cls = GatedMLP if cfg.gated else MLP
    return cls(cfg.d_model, cfg.ffn_width, activation=cfg.kernel_activation, bias=bias)


class Block(nn.Module):
    """Builds the attention and MLP branches and the norms of its placement; subclasses give the
    forward. ``forward(x, position_ids=None, attn_bias=None, segment_ids=None)``: x
    ``[B, S, d_model]``, ``position_ids`` for RoPE, ``attn_bias`` (ALiBi / T5) added to the
    attention logits by key - query offset (``[H, 2S - 1]``, `ALiBi.relative`),
    ``segment_ids`` ``[B, S]`` keeping attention inside each packed document."""

    #: the norms this block type owns, by attribute name
    norm_names: tuple[str, ...] = ()

    def __init__(self, cfg: TransformerConfig, layer: int, rope: Optional[RotaryEmbedding] = None):
        super().__init__()
        self.attn = make_attention(cfg, layer, rope)
        self.mlp = make_mlp(cfg)
        for name in self.norms(cfg):
            setattr(self, name, make_norm(cfg))
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.residual_scale = cfg.residual_scale
        self.float32_stream = cfg.residual_dtype == "float32"

    @classmethod
    def norms(cls, cfg: TransformerConfig) -> tuple[str, ...]:
        return cls.norm_names

    def _branch_dtype(self) -> Optional[torch.dtype]:
        """With a float32 stream, the branches' dtype (what a norm reading the stream writes);
        else None (every tensor in the model's dtype)."""
        return next(self.mlp.parameters()).dtype if self.float32_stream else None

    @staticmethod
    def _to(x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
        return x if dtype is None else x.to(dtype)

    def _scaled(self, branch: Tensor) -> Tensor:
        return branch if self.residual_scale is None else branch * self.residual_scale

    def _attn(self, x: Tensor, position_ids: Optional[Tensor], attn_bias: Optional[Tensor],
              segment_ids: Optional[Tensor]) -> Tensor:
        return self._scaled(self.drop(self.attn(x, position_ids=position_ids, rel_bias=attn_bias,
                                                segment_ids=segment_ids)))

    def _mlp(self, x: Tensor) -> Tensor:
        return self._scaled(self.drop(self.mlp(x)))


class PreNormBlock(Block):
    norm_names = ("attn_norm", "mlp_norm")

    def forward(self, x, position_ids=None, attn_bias=None, segment_ids=None):
        n = self.attn_norm(x, out_dtype=self._branch_dtype())[0]
        a = self._attn(n, position_ids, attn_bias, segment_ids)
        y, h = self.mlp_norm(a, x)  # h = x + a; y = mlp_norm(h)
        return h + self._mlp(y)


class PostNormBlock(Block):
    norm_names = ("attn_norm", "mlp_norm")

    def forward(self, x, position_ids=None, attn_bias=None, segment_ids=None):
        a = self._attn(x, position_ids, attn_bias, segment_ids)
        h, _ = self.attn_norm(a, x)  # h = attn_norm(x + attn(x))
        y, _ = self.mlp_norm(self._mlp(h), h)
        return y


class DoubleNormBlock(Block):
    norm_names = ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm")

    def forward(self, x, position_ids=None, attn_bias=None, segment_ids=None):
        n = self.attn_norm(x, out_dtype=self._branch_dtype())[0]
        a = self._attn(n, position_ids, attn_bias, segment_ids)
        a = self.attn_post_norm(a)[0]
        y, h = self.mlp_norm(a, x)  # h = x + a; y = mlp_norm(h)
        return h + self.mlp_post_norm(self._mlp(y))[0]


class ReorderedNormBlock(Block):
    norm_names = ("attn_post_norm", "mlp_post_norm")

    def forward(self, x, position_ids=None, attn_bias=None, segment_ids=None):
        lo = self._branch_dtype()
        h = x + self.attn_post_norm(self._attn(self._to(x, lo), position_ids, attn_bias, segment_ids))[0]
        return h + self.mlp_post_norm(self._mlp(self._to(h, lo)))[0]


class ParallelBlock(Block):
    @classmethod
    def norms(cls, cfg):
        return ("attn_norm",) if cfg.parallel_shared_norm else ("attn_norm", "mlp_norm")

    def forward(self, x, position_ids=None, attn_bias=None, segment_ids=None):
        lo = self._branch_dtype()
        n = self.attn_norm(x, out_dtype=lo)[0]
        m = self.mlp_norm(x, out_dtype=lo)[0] if hasattr(self, "mlp_norm") else n
        return x + self._attn(n, position_ids, attn_bias, segment_ids) + self._mlp(m)


BLOCKS: dict[BlockType, type[Block]] = {
    BlockType.PRE: PreNormBlock,
    BlockType.POST: PostNormBlock,
    BlockType.DOUBLE: DoubleNormBlock,
    BlockType.REORDERED: ReorderedNormBlock,
    BlockType.PARALLEL: ParallelBlock,
}


def make_block(cfg: TransformerConfig, layer: int, rope: Optional[RotaryEmbedding] = None) -> Block:
    return BLOCKS[cfg.block_type](cfg, layer, rope)
