"""Modules built on the archext kernels."""
from .norm import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm

__all__ = ["RMSNorm", "LayerNorm", "AddRMSNorm", "AddLayerNorm"]
