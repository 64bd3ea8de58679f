"""Feed-forward blocks on the archext activation kernels.

``MLP`` is the non-gated block ``down(act(up(x)))`` (GPT-2, BERT); ``GatedMLP`` the gated one
``down(act(gate(x)) * up(x))`` (Llama, Mistral, Qwen: SwiGLU; Gemma: GeGLU with the tanh GeLU),
with the gate and up projections either separate (``gate_proj``, ``up_proj``: a Llama MLP's
state_dict loads as is) or fused into one ``gate_up_proj`` whose output is split in the kernel
(Phi-3's layout, the gate half first by default; a Llama state_dict loads into it too).
"""
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.activation import ACTIVATIONS, ALIASES, canonical_activation


def hidden_width(d_model: int, gated: bool = True, multiple_of: int = 256) -> int:
    """The conventional feed-forward width: ``4 * d_model`` for a non-gated MLP, and for a gated
    one ``8/3 * d_model`` rounded up to a multiple of ``multiple_of`` (Llama's rule: 4096 ->
    11008 with 256).

    Why 8/3: a gated MLP has three d_model x d_ff matrices instead of two, so 2/3 of 4 * d_model
    keeps its parameter count (and FLOPs) equal to the non-gated 4 * d_model MLP's.
    """
    if d_model < 1:
        raise ValueError(f"d_model must be positive, got {d_model}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be positive, got {multiple_of}")
    if not gated:
        return 4 * d_model
    width = 8 * d_model // 3
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


def _check_activation(activation: str) -> str:
    name = canonical_activation(activation)
    if name not in ACTIVATIONS:
        choices = ", ".join(ACTIVATIONS + tuple(ALIASES))
        raise ValueError(f"unknown activation {activation!r}; choose one of {choices}")
    return name


def _fuse_gate_up(module: "GatedMLP", state_dict: dict, prefix: str) -> None:
    """On loading into a fused GatedMLP: a Llama-style state_dict (``gate_proj.*``,
    ``up_proj.*``) becomes ``gate_up_proj.*``, the halves in the module's order."""
    for suffix in ("weight", "bias"):
        g, u = f"{prefix}gate_proj.{suffix}", f"{prefix}up_proj.{suffix}"
        fused = f"{prefix}gate_up_proj.{suffix}"
        if g in state_dict and u in state_dict and fused not in state_dict:
            gate, up = state_dict.pop(g), state_dict.pop(u)
            state_dict[fused] = torch.cat((gate, up) if module.gate_first else (up, gate), dim=0)


class MLP(nn.Module):
    """Non-gated feed-forward block: ``down_proj(act(up_proj(x)))``.

    Args:
        d_model: input and output width.
        d_ff: hidden width; default ``hidden_width(d_model, gated=False)`` = 4 * d_model.
        activation: ``"gelu"`` (default), ``"gelu_tanh"``, ``"relu"``, ``"silu"`` or an alias.
        bias: biases on both projections (default off, as most modern models).
    """

    def __init__(self, d_model: int, d_ff: Optional[int] = None, activation: str = "gelu",
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.activation = _check_activation(activation)
        self.d_model = d_model
        self.d_ff = hidden_width(d_model, gated=False) if d_ff is None else d_ff
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(d_model, self.d_ff, **kw)
        self.down_proj = nn.Linear(self.d_ff, d_model, **kw)

    def reset_parameters(self) -> None:
        self.up_proj.reset_parameters()
        self.down_proj.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.act(self.up_proj(x), self.activation))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}"


class GatedMLP(nn.Module):
    """Gated feed-forward block: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (SwiGLU with
    ``"silu"``, GeGLU with ``"gelu"`` / ``"gelu_tanh"``, ReGLU with ``"relu"``).

    Args:
        d_model: input and output width.
        d_ff: hidden width; default ``hidden_width(d_model, gated=True, multiple_of)``.
        activation: ``"silu"`` (default), ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or an alias.
        bias: biases on every projection (default off, as most modern models).
        fused: one ``gate_up_proj`` (d_model -> 2 * d_ff) instead of ``gate_proj`` and
            ``up_proj``: one GEMM, and the kernel reads the gate and up halves of its output in
            place. A state_dict with separate ``gate_proj`` / ``up_proj`` loads into it (they are
            concatenated on load).
        gate_first: with ``fused``, whether the gate is the first half of ``gate_up_proj``'s
            output (Phi-3, vLLM) or the second.
        multiple_of: the rounding of the default d_ff.
    """

    def __init__(self, d_model: int, d_ff: Optional[int] = None, activation: str = "silu",
                 bias: bool = False, fused: bool = False, gate_first: bool = True,
                 multiple_of: int = 256, device=None, dtype=None):
        super().__init__()
        self.activation = _check_activation(activation)
        self.d_model = d_model
        self.d_ff = hidden_width(d_model, True, multiple_of) if d_ff is None else d_ff
        self.fused = fused
        self.gate_first = gate_first
        kw = dict(bias=bias, device=device, dtype=dtype)
        if fused:
            self.gate_up_proj = nn.Linear(d_model, 2 * self.d_ff, **kw)
        else:
            self.gate_proj = nn.Linear(d_model, self.d_ff, **kw)
            self.up_proj = nn.Linear(d_model, self.d_ff, **kw)
        self.down_proj = nn.Linear(self.d_ff, d_model, **kw)

    def reset_parameters(self) -> None:
        for m in self.children():
            m.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs before the children load their keys (where BatchNorm upgrades old state dicts);
        # Module.register_load_state_dict_pre_hook would do as well but is new in torch 2.5.
        if self.fused:
            _fuse_gate_up(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            h = ops.glu_packed(self.gate_up_proj(x), self.activation, self.gate_first)
        else:
            h = ops.glu(self.gate_proj(x), self.up_proj(x), self.activation)
        return self.down_proj(h)

    def extra_repr(self) -> str:
        s = f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}"
        if self.fused:
            s += f", fused=True, gate_first={self.gate_first}"
        return s
