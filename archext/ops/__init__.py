"""Functional API of the archext kernels (autograd- and torch.compile-ready)."""
from .activation import (
    ACTIVATIONS,
    act,
    canonical_activation,
    geglu,
    gelu,
    glu,
    glu_packed,
    reglu,
    relu,
    silu,
    swiglu,
)
from .attention import flash_attention
from ._common import reference_ops, set_reference_ops, using_reference_ops
from .norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .stability import cross_entropy, linear_cross_entropy, qk_norm_rope, softcap, softmax
from .rope import ROPE_TYPES, RopeScaling, apply_rope, apply_rope_, rope_cache, rope_frequencies, rope_positions

__all__ = [
    "rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm",
    "apply_rope", "apply_rope_", "rope_cache", "rope_positions", "RopeScaling", "rope_frequencies",
    "ROPE_TYPES",
    "glu", "glu_packed", "swiglu", "geglu", "reglu", "act", "gelu", "silu", "relu",
    "ACTIVATIONS", "canonical_activation",
    "reference_ops", "set_reference_ops", "using_reference_ops",
    "cross_entropy", "linear_cross_entropy", "softmax", "softcap", "qk_norm_rope",
    "flash_attention",
]
