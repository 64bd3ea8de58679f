"""Modules built on the archext kernels."""
from .mlp import MLP, GatedMLP, hidden_width
from .norm import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm

__all__ = ["RMSNorm", "LayerNorm", "AddRMSNorm", "AddLayerNorm", "MLP", "GatedMLP", "hidden_width"]
