"""The causal LM that `build` returns: token embedding (scaled), absolute positions or a
relative bias, the blocks, the final norm, the output head (tied or not, soft-capped), and the
loss through archext's fused cross-entropy with z-loss."""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..nn import (ALiBi, LearnedPositionalEmbedding, RelativePositionBias, RotaryEmbedding,
                  SinusoidalPositionalEmbedding)
from ..nn.norm import HeadwiseNorm, LayerNorm, RMSNorm
from .blocks import make_block, make_norm
from .config import Position, TransformerConfig


# Position schemes with a table of max_seq_len rows.
_TABLED = (Position.ROPE, Position.LEARNED, Position.SINUSOIDAL)


class CausalLMOutput(NamedTuple):
    logits: Optional[Tensor]  # [B, S, vocab], soft-capped when the config says so (or None)
    loss: Optional[Tensor] = None  # scalar mean over non-ignored tokens, z-loss included
    z_loss: Optional[Tensor] = None  # the z-loss part of `loss`, for logging


class CausalLM(nn.Module):
    """``forward(input_ids [B, S], labels=None, position_ids=None, cu_seqlens=None,
    return_logits=True) -> CausalLMOutput``.

    ``cu_seqlens`` packs documents into the rows (`archext.ops.packing`): each document's
    positions restart at 0, its tokens attend only within it, and no target crosses into the
    next one, so a packed batch computes what its documents would one by one.

    Labels are shifted inside (position t predicts label t + 1, as Hugging Face does); -100 is
    ignored. With labels and ``return_logits=False`` the LM head and the loss run as one fused
    ``ops.linear_cross_entropy``: the ``[B, S, vocab]`` logits are never held whole (a chunk of
    rows at a time), and ``logits`` is None. Construction leaves PyTorch's default init;
    `init_weights` gives the LM init."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed: Optional[nn.Module] = None
        self.rel_bias: Optional[nn.Module] = None
        rope = local_rope = None
        if cfg.position == Position.ROPE:
            # One module (and one cos/sin cache) shared by every layer; with local_rope_theta a
            # second, unscaled one for the sliding-window layers (Gemma 3).
            rope = RotaryEmbedding(cfg.head_size, rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta,
                                   interleaved=cfg.rope_interleaved, max_positions=cfg.max_seq_len,
                                   scaling=cfg.rope_scaling)
            local_rope = rope
            if cfg.local_rope_theta is not None:
                local_rope = RotaryEmbedding(cfg.head_size, rotary_dim=cfg.rotary_dim,
                                             theta=cfg.local_rope_theta, interleaved=cfg.rope_interleaved,
                                             max_positions=cfg.max_seq_len)
        elif cfg.position == Position.LEARNED:
            self.pos_embed = LearnedPositionalEmbedding(cfg.max_seq_len, cfg.d_model,
                                                        offset=cfg.learned_pos_offset)
        elif cfg.position == Position.SINUSOIDAL:
            self.pos_embed = SinusoidalPositionalEmbedding(cfg.d_model, max_positions=cfg.max_seq_len)
        elif cfg.position == Position.ALIBI:
            self.rel_bias = ALiBi(cfg.n_heads)
        elif cfg.position == Position.T5:
            # One bias table shared by every layer, as T5 does.
            self.rel_bias = RelativePositionBias(cfg.n_heads, cfg.t5_num_buckets, cfg.t5_max_distance,
                                                 bidirectional=False)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.layers = nn.ModuleList(make_block(cfg, i, rope if cfg.layer_window(i) is None else local_rope)
                                    for i in range(cfg.n_layers))
        self.norm = make_norm(cfg) if cfg.has_final_norm else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tied_embeddings:
            self.lm_head.weight = self.embed.weight

    # ---------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, *,
                position_ids: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                return_logits: bool = True) -> CausalLMOutput:
        cfg = self.config
        b, s = input_ids.shape
        segments = None
        if cu_seqlens is not None:
            # Packed documents: positions restart in each, attention stays inside each, and the
            # last token of a document predicts nothing (its next token starts another).
            if position_ids is not None:
                raise ValueError("CausalLM: give cu_seqlens or position_ids, not both")
            position_ids, segments = ops.packing.unpack(cu_seqlens, b, s, input_ids.device)
        if position_ids is None and s > cfg.max_seq_len and cfg.position in _TABLED:
            raise ValueError(f"sequence length {s} exceeds max_seq_len={cfg.max_seq_len} of this "
                             f"model's {cfg.position} positions; build it with a larger max_seq_len")
        x = self.embed(input_ids)
        if cfg.embedding_scale is not None:
            x = x * cfg.embedding_scale
        if self.pos_embed is not None:
            x = self.pos_embed(x, position_ids=position_ids)
        # ALiBi / T5 by key - query offset, [H, 2S - 1]: linear in S for the tiled attention.
        attn_bias = None if self.rel_bias is None else self.rel_bias.relative(s, s).float()
        x = self.drop(x)
        # residual_dtype: the stream in float32 from here; the final norm writes the head's dtype.
        low = None
        if cfg.residual_dtype is not None:
            low = self.lm_head.weight.dtype
            x = x.to(getattr(torch, cfg.residual_dtype))
        for layer in self.layers:
            x = layer(x, position_ids, attn_bias, segments)
        if self.norm is not None:
            x = self.norm(x, out_dtype=low)[0]
        if low is not None:
            x = x.to(low)
        if labels is not None:
            # Position t predicts label t + 1 (the last position predicts nothing: ignored), so
            # the logits are read in place, not copied by a shifted slice; the soft-cap is fused
            # into the loss kernel.
            target = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
            if segments is not None:
                target = ops.packing.boundary_targets(target, segments)
            if not return_logits:
                bias = self.lm_head.bias
                if cfg.logit_scale is not None:  # (x W^T + b) s = (s x) W^T + s b
                    x = x * cfg.logit_scale
                    bias = None if bias is None else bias * cfg.logit_scale
                loss, z_loss = ops.linear_cross_entropy(
                    x, self.lm_head.weight, target, bias=bias, z_loss_coef=cfg.z_loss_coef,
                    softcap=cfg.final_softcap)
                return CausalLMOutput(None, loss, z_loss)
        raw = self.lm_head(x)
        if cfg.logit_scale is not None:
            raw = raw * cfg.logit_scale
        logits = raw if cfg.final_softcap is None else ops.softcap(raw, cfg.final_softcap)
        if labels is None:
            return CausalLMOutput(logits)
        loss, z_loss = ops.cross_entropy(raw.reshape(-1, raw.shape[-1]), target.reshape(-1),
                                         z_loss_coef=cfg.z_loss_coef, softcap=cfg.final_softcap)
        return CausalLMOutput(logits, loss, z_loss)

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> "CausalLM":
        """The LM init: linears and embeddings N(0, init_std), the output projections of each
        branch (o_proj, down_proj) N(0, init_std / sqrt(2 n_layers)) so that the residual stream's
        variance does not grow with depth (GPT-2), biases 0, norms to an effective scale of 1
        (Gemma's (1 + w) weights to 0), the T5 bias table N(0, init_std)."""
        cfg = self.config
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                is_out = name.endswith(("attn.o_proj", "mlp.down_proj"))
                nn.init.normal_(m.weight, 0.0, out_std if is_out else std, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
            elif isinstance(m, (RMSNorm, LayerNorm, HeadwiseNorm)):
                m.reset_parameters()
        # A tied head is the embedding matrix: drawn above with the embedding's std.
        return self

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head counted once); ``exclude_embeddings`` leaves out the
        token and position tables (the head stays when it is not tied)."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for m in self.modules():
                if isinstance(m, nn.Embedding):
                    params.pop(id(m.weight), None)
        return sum(p.numel() for p in params.values())

    def flops_per_token(self, seq_len: int, training: bool = True) -> int:
        """Matmul FLOPs per token of a sequence of ``seq_len`` tokens: ``2 N`` forward for the N
        weights of every linear layer (the output head included, tied or not; lookups are free),
        plus ``4 * n_heads * head_dim * context`` per layer for q k^T and p v, where context is
        seq_len, or the window on a sliding-window layer (counted in full, as the PaLM paper's
        appendix B does, not halved for the causal mask). ``training`` multiplies by 3 (the
        backward costs twice the forward): 6N + 12 L H Q T."""
        cfg = self.config
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attn = 0
        for i in range(cfg.n_layers):
            w = cfg.layer_window(i)
            context = seq_len if w is None else min(seq_len, w)
            attn += 4 * cfg.n_heads * cfg.head_size * context
        fwd = 2 * n_matmul + attn
        return 3 * fwd if training else fwd


def build(cfg: TransformerConfig, *, device=None, dtype=None, init: bool = True) -> CausalLM:
    """The causal LM of ``cfg``, initialised with `CausalLM.init_weights` (``init=False`` keeps
    PyTorch's default init, e.g. before loading a checkpoint). On the meta device nothing is
    initialised (use it to count parameters and FLOPs without memory)."""
    if not isinstance(cfg, TransformerConfig):
        raise TypeError(f"build: expected a TransformerConfig, got {type(cfg).__name__}")
    meta = device is not None and torch.device(device).type == "meta"
    if meta:
        with torch.device("meta"):
            model = CausalLM(cfg)
    else:
        model = CausalLM(cfg)
        if init:
            model.init_weights()
    if device is not None and not meta:
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model


def param_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """Two groups for torch.optim.AdamW: matrices with ``weight_decay``; norms, biases and
    embedding tables (token, learned positions, relative bias; a tied head with them) with
    none, the consensus practice. Empty groups are left out."""
    no_decay: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, (RMSNorm, LayerNorm, HeadwiseNorm, nn.Embedding)):
            no_decay.update((id(p), p) for p in m.parameters(recurse=False))
    for name, p in model.named_parameters():
        if name.endswith("bias") or p.ndim < 2:
            no_decay[id(p)] = p
    decay = [p for p in model.parameters() if id(p) not in no_decay]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": list(no_decay.values()), "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
