"""archext's attention as a transformers attention implementation ("archext").

`patch` registers it and switches the model to it: the tiled kernel (``ops.flash_attention``),
which applies the soft-cap (Gemma 2), sliding windows and packed documents without holding the
``[B, H, S, S]`` scores that eager attention builds. A packed batch is read from restarting
``position_ids`` (as transformers' flash-attention path does), a padded one from the 2-D mask.
What the kernel does not cover (attention dropout, weights requested back, a key/value length
other than the query's beyond a KV cache) goes to transformers' own eager or SDPA code.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..nn.attention import same_document
from ..reference import attention_mask as attention_mask_of

NAME = "archext"
_registered = False


def archext_attention_forward(module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Optional[Tensor], dropout: float = 0.0,
                              scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                              softcap: Optional[float] = None, position_ids: Optional[Tensor] = None,
                              **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """transformers' attention-function signature: query ``[B, Hq, Sq, D]``, key / value
    ``[B, Hk, Sk, D]``, ``attention_mask`` the 2-D padding mask ``[B, Sk]`` or None (the mask
    function `register` installs); returns ``([B, Sq, Hq, D], None)``."""
    b, _, sq, d = query.shape
    sk = key.shape[2]
    causal = getattr(module, "is_causal", True)
    segments = None
    if position_ids is not None and sq == sk and position_ids.shape[-1] == sk:
        segments = ops.packing.segments_from_position_ids(position_ids).expand(b, sk)
    if attention_mask is not None and attention_mask.dim() == 2:
        # Padded keys get a segment of their own, which no real token sees.
        base = segments if segments is not None else torch.zeros(b, sk, dtype=torch.int32, device=query.device)
        segments = base.masked_fill(~attention_mask[:, -sk:].bool(), -1)
    if segments is not None:
        segments = segments.to(device=query.device, dtype=torch.int32).contiguous()
    if (dropout and module.training) or kwargs.get("output_attentions") or d > ops.attention.MAX_HEAD_DIM \
            or sq > sk \
            or (attention_mask is not None and attention_mask.dim() != 2):
        return _eager(module, query, key, value, attention_mask, segments, causal, dropout, scaling,
                      sliding_window, softcap, **kwargs)
    scale = d ** -0.5 if scaling is None else scaling
    o = ops.flash_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                            scale=scale, softcap=softcap, causal=causal, window=sliding_window,
                            segment_ids=segments)
    return o, None


def _eager(module, query, key, value, attention_mask, segments, causal, dropout, scaling,
           sliding_window, softcap, **kwargs):
    """transformers' eager attention of the module's family, with the additive mask it wants."""
    import importlib

    eager = importlib.import_module(type(module).__module__).eager_attention_forward
    if attention_mask is None or attention_mask.dim() == 2:
        sq, sk = query.shape[2], key.shape[2]
        keep = attention_mask_of(sq, sk, causal, sliding_window, query.device)
        keep = torch.ones(sq, sk, dtype=torch.bool, device=query.device) if keep is None else keep
        keep = keep[None, None]
        if segments is not None:
            keep = keep & same_document(segments, sq)
        attention_mask = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~keep, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                 sliding_window=sliding_window, softcap=softcap, **kwargs)


def register() -> str:
    """Register "archext" with transformers' attention and mask interfaces (once); its mask
    is the 2-D padding mask, or None, as for flash-attention."""
    global _registered
    if not _registered:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(NAME, archext_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
        _registered = True
    return NAME
