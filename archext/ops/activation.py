"""The activation family: GeLU (erf and tanh), SiLU, ReLU, and their gated forms ReGLU, GeGLU and
SwiGLU (``act(gate) * up``, Shazeer 2020), on two tensors or on one packed ``[..., 2 * d]``.

Functional API over the ``torch.ops.archext.{glu,glu_packed,act}_{fwd,bwd}`` kernels, with their
fake (meta) kernels for torch.compile and their autograd formulas. The math is written out in
csrc/common/activation_math.h (PyTorch's formulas, so that the results match ``F.gelu``,
``F.silu`` and ``F.relu``); the pure-PyTorch references are in archext/reference.py.

The backwards save only the inputs and recompute the activation: a GLU's backward reads
grad_y, gate and up once and writes both gradients in one pass.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import reference as _ref
from ._common import using_reference_ops

_ops = torch.ops.archext

#: The activation names the kernels take.
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")

#: Other names for them (Hugging Face's ``hidden_act`` spellings among them).
ALIASES = {
    "swish": "silu",
    "gelu_erf": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",  # Gemma, GPT-NeoX-style configs
    "gelu_new": "gelu_tanh",  # GPT-2's tanh approximation, the same formula
}


def canonical_activation(name: str) -> str:
    """The kernels' name for an activation or one of its aliases. An unknown name is returned
    as is; the op then raises an error that lists the choices."""
    return ALIASES.get(name, name)


def _gelu_name(approximate: str) -> str:
    if approximate == "none":
        return "gelu"
    if approximate == "tanh":
        return "gelu_tanh"
    raise ValueError(f"approximate must be 'none' or 'tanh' (as in F.gelu), got {approximate!r}")


# --------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only (used by torch.compile, FakeTensor, opcheck).
# --------------------------------------------------------------------------------------------
def _like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("archext::glu_fwd")
def _(gate, up, activation):
    return _like(gate)


@torch.library.register_fake("archext::glu_bwd")
def _(grad_y, gate, up, activation):
    return _like(gate), _like(gate)


@torch.library.register_fake("archext::glu_packed_fwd")
def _(x, activation, gate_first):
    torch._check(x.dim() >= 1, lambda: "archext::glu_packed_fwd: expected x with at least 1 "
                 "dimension (the packed [..., 2 * d] gate and up), got a scalar")
    torch._check(x.shape[-1] % 2 == 0, lambda: "archext::glu_packed_fwd: expected an even last "
                 f"dimension of x (the gate and up halves, [..., 2 * d]), got shape {list(x.shape)}")
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.register_fake("archext::glu_packed_bwd")
def _(grad_y, x, activation, gate_first):
    return _like(x)


@torch.library.register_fake("archext::act_fwd")
def _(x, activation):
    return _like(x)


@torch.library.register_fake("archext::act_bwd")
def _(grad_y, x, activation):
    return _like(x)


# --------------------------------------------------------------------------------------------
# Autograd. The forwards save their inputs only; the incoming gradient is only read. A
# gradient that does not arrive is passed as None, never materialised as zeros.
# --------------------------------------------------------------------------------------------
def _glu_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _glu_backward(ctx, grad_y: Optional[Tensor]):
    if grad_y is None:
        return None, None, None
    gate, up = ctx.saved_tensors
    dgate, dup = _ops.glu_bwd(grad_y, gate, up, ctx.activation)
    return (dgate if ctx.needs_input_grad[0] else None,
            dup if ctx.needs_input_grad[1] else None, None)


torch.library.register_autograd("archext::glu_fwd", _glu_backward, setup_context=_glu_setup)


def _glu_packed_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    x, activation, gate_first = inputs
    ctx.save_for_backward(x)
    ctx.activation = activation
    ctx.gate_first = gate_first


def _glu_packed_backward(ctx, grad_y: Optional[Tensor]):
    if grad_y is None:
        return None, None, None
    (x,) = ctx.saved_tensors
    return _ops.glu_packed_bwd(grad_y, x, ctx.activation, ctx.gate_first), None, None


torch.library.register_autograd(
    "archext::glu_packed_fwd", _glu_packed_backward, setup_context=_glu_packed_setup
)


def _act_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    x, activation = inputs
    ctx.save_for_backward(x)
    ctx.activation = activation


def _act_backward(ctx, grad_y: Optional[Tensor]):
    if grad_y is None:
        return None, None
    (x,) = ctx.saved_tensors
    return _ops.act_bwd(grad_y, x, ctx.activation), None


torch.library.register_autograd("archext::act_fwd", _act_backward, setup_context=_act_setup)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
def glu(gate: Tensor, up: Tensor, activation: str = "silu") -> Tensor:
    """Gated activation ``act(gate) * up`` (``activation`` one of :data:`ACTIVATIONS` or an
    alias): ReGLU for ``"relu"``, GeGLU for ``"gelu"`` / ``"gelu_tanh"``, SwiGLU for ``"silu"``.

    ``gate`` and ``up`` may be any views (e.g. ``x.chunk(2, -1)``): rows of contiguous elements
    are read in place. For one packed tensor, :func:`glu_packed` also gives its gradient as one
    tensor.
    """
    if using_reference_ops():
        return _ref.glu(gate, up, canonical_activation(activation))
    return _ops.glu_fwd(gate, up, canonical_activation(activation))


def glu_packed(x: Tensor, activation: str = "silu", gate_first: bool = True) -> Tensor:
    """Gated activation of a packed ``[..., 2 * d]`` tensor, the output of one fused gate+up
    projection: ``act(x[..., :d]) * x[..., d:]`` when ``gate_first`` (the vLLM / Phi-3 layout),
    else ``act(x[..., d:]) * x[..., :d]``. Returns ``[..., d]``."""
    if using_reference_ops():
        return _ref.glu_packed(x, canonical_activation(activation), gate_first)
    return _ops.glu_packed_fwd(x, canonical_activation(activation), gate_first)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU: ``F.silu(gate) * up``."""
    return glu(gate, up, "silu")


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """GeGLU: ``F.gelu(gate, approximate=approximate) * up`` (``"tanh"`` as Gemma uses it)."""
    return glu(gate, up, _gelu_name(approximate))


def reglu(gate: Tensor, up: Tensor) -> Tensor:
    """ReGLU: ``F.relu(gate) * up``."""
    return glu(gate, up, "relu")


def act(x: Tensor, name: str) -> Tensor:
    """``act(x)`` for an activation of :data:`ACTIVATIONS` (or an alias)."""
    if using_reference_ops():
        return _ref.act(x, canonical_activation(name))
    return _ops.act_fwd(x, canonical_activation(name))


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GeLU, as ``F.gelu(x, approximate=approximate)``."""
    return act(x, _gelu_name(approximate))


def silu(x: Tensor) -> Tensor:
    """SiLU, as ``F.silu(x)``."""
    return act(x, "silu")


def relu(x: Tensor) -> Tensor:
    """ReLU, as ``F.relu(x)``."""
    return act(x, "relu")
