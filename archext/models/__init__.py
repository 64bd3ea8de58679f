"""archext.models: a config-driven builder of decoder-only LMs on the archext modules.

    from archext.models import TransformerConfig, build, param_groups, report
    model = build(TransformerConfig.llama(d_model=256, n_layers=4))

The API contract is in README.md (Python API) and the docstrings below."""
from .blocks import (Block, BlockType, DoubleNormBlock, ParallelBlock, PostNormBlock, PreNormBlock,
                     ReorderedNormBlock)
from .config import (ACTIVATIONS, PRESETS, BlockKind, ConfigError, Norm, NormPlacement, Position,
                     QKNorm, TransformerConfig, preset)
from .model import CausalLM, CausalLMOutput, build, param_groups
from .report import report

__all__ = ["TransformerConfig", "ConfigError", "PRESETS", "preset", "build", "param_groups", "report",
           "CausalLM", "CausalLMOutput", "Block", "BlockType", "PreNormBlock", "PostNormBlock",
           "DoubleNormBlock", "ReorderedNormBlock", "ParallelBlock", "Norm", "NormPlacement",
           "BlockKind", "Position", "QKNorm", "ACTIVATIONS"]
