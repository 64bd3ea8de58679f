"""Modules built on the archext kernels."""
from .attention import Attention
from .mlp import MLP, GatedMLP, hidden_width
from .norm import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm
from .positions import (ALiBi, LearnedPositionalEmbedding, RelativePositionBias, RotaryEmbedding,
                        SinusoidalPositionalEmbedding, alibi_slopes, sinusoidal_table,
                        t5_relative_bucket)

__all__ = ["RMSNorm", "LayerNorm", "AddRMSNorm", "AddLayerNorm", "RotaryEmbedding",
           "SinusoidalPositionalEmbedding", "LearnedPositionalEmbedding", "ALiBi",
           "RelativePositionBias", "alibi_slopes", "sinusoidal_table", "t5_relative_bucket",
           "MLP", "GatedMLP", "hidden_width", "Attention"]
