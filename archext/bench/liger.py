"""Liger-Kernel as a baseline in the benchmarks (``liger`` column / candidate).

Liger-Kernel is pure Python + Triton, so it runs on a CUDA device only; on the CPU, or where the
package is not importable, every function here reports it as absent and the benchmarks show
``-``. Its autograd Functions are called directly (``liger_kernel.ops.*``, the layer the
Hugging Face patches use), with the arguments of the version read for this code (0.8.5):

  RMSNorm    LigerRMSNormFunction.apply(X, W, eps, offset=0.0, casting_mode="llama",
             in_place=True)                        backward writes dX into dY
  add+RMS    LigerFusedAddRMSNormFunction.apply(X, R, W, eps) -> (Y, X + R)
  LayerNorm  LigerLayerNormFunction.apply(X, W, B, eps)
  SwiGLU     LigerSiLUMulFunction.apply(gate, up)  backward writes d gate, d up into gate, up
  GeGLU      LigerGELUMulFunction.apply(gate, up)  the tanh GeLU (archext's geglu_tanh); the
             same in-place backward
  RoPE       LigerRopeFunction.apply(q, k, cos, sin) on q [B, Hq, S, D], k [B, Hk, S, D] and
             cos, sin [S, D] (the duplicated ``cat(freqs, freqs)`` halves, Llama's layout);
             rotates in place in the forward (when q's storage is [B, S, H, D], as in HF) and
             the backward
  CE         LigerCrossEntropyFunction.apply(logits, target, weight, ignore_index,
             lse_square_scale, label_smoothing, reduction, softcap, return_z_loss)
             writes the logits' gradient into the logits in the forward
  linear+CE  LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, target, bias, ce_weight,
             ignore_index, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss)

Where Liger writes into a tensor it was given, the benchmark hands it its own copy and restores
that copy, untimed, before every call (``Clobber``), so that its inputs stay what the other
candidates see and its in-place saving (no fresh output) is kept.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

RMS_EPS = 1e-6
LN_EPS = 1e-5


@functools.lru_cache(maxsize=None)
def version() -> Optional[str]:
    """liger_kernel's version, or None when it cannot be imported."""
    try:
        mod = importlib.import_module("liger_kernel")
    except Exception:  # noqa: BLE001  (absent, or broken by a missing Triton)
        return None
    try:
        from importlib.metadata import version as dist_version

        return dist_version("liger-kernel")
    except Exception:  # noqa: BLE001
        return getattr(mod, "__version__", "unknown")


def why_absent(device) -> Optional[str]:
    """None when the Liger baselines can run on ``device``, else why not (for the notes)."""
    if torch.device(device).type != "cuda":
        return "Liger-Kernel is Triton: GPU only"
    if version() is None:
        return "liger_kernel is not importable (carry its wheel: benchmarks/gpu_wheels.sh)"
    return None


def _ops(name: str):
    return importlib.import_module(f"liger_kernel.ops.{name}")


# ---------------------------------------------------------------------------------------------
# The norms and activations (kernels.py): fn(x, r, w, b) -> tuple, as archext's candidates.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelImpl:
    fn: Callable
    # Tensors Liger overwrites in fwd+bwd, by their names in kernels.bench_config: "x", "r" (the
    # inputs: gate and up of a GLU), "g" (grad_y). The benchmark gives Liger copies of these.
    clobbers: tuple = ()
    note: str = ""


def _rms(x, r, w, b):
    f = _ops("rms_norm").LigerRMSNormFunction
    return (f.apply(x, w, RMS_EPS, 0.0, "llama", True),)


def _add_rms(x, r, w, b):
    f = _ops("fused_add_rms_norm").LigerFusedAddRMSNormFunction
    y, h = f.apply(x, r, w, RMS_EPS)
    return y, h


def _ln(x, r, w, b):
    f = _ops("layer_norm").LigerLayerNormFunction
    return (f.apply(x, w, b, LN_EPS),)


def _swiglu(x, r, w, b):
    return (_ops("swiglu").LigerSiLUMulFunction.apply(x, r),)


def _geglu_tanh(x, r, w, b):
    return (_ops("geglu").LigerGELUMulFunction.apply(x, r),)


KERNELS = {
    "rms_norm": KernelImpl(_rms, clobbers=("g",),
                           note="Liger's RMSNorm (casting_mode llama, in_place=True as its HF "
                                "module): dX written into grad_y"),
    "add_rms_norm": KernelImpl(_add_rms, note="Liger's fused add + RMSNorm; h gets no gradient "
                                               "here, so autograd hands it zeros"),
    "layer_norm": KernelImpl(_ln),
    "swiglu": KernelImpl(_swiglu, clobbers=("x", "r"),
                         note="Liger's SwiGLU backward writes the gradients into gate and up"),
    "geglu_tanh": KernelImpl(_geglu_tanh, clobbers=("x", "r"),
                             note="Liger's GeGLU (tanh GeLU) backward writes the gradients into "
                                  "gate and up"),
}
# Ops that Liger has not got: why the column is empty.
KERNELS_MISSING = {
    "geglu": "Liger's GeGLU is the tanh approximation: see geglu_tanh",
}


def kernel_impl(op: str, device) -> tuple[Optional[KernelImpl], Optional[str]]:
    """(impl, None), or (None, why there is none) for op on device."""
    why = why_absent(device)
    if why is not None:
        return None, why
    if op in KERNELS:
        return KERNELS[op], None
    return None, KERNELS_MISSING.get(op, f"Liger-Kernel has no {op}")


# ---------------------------------------------------------------------------------------------
# RoPE (rope.py)
# ---------------------------------------------------------------------------------------------
def rope_tables(cos: torch.Tensor, sin: torch.Tensor, seq: int, dtype) -> tuple:
    """archext's cache (cos, sin [P, D/2] float32) as Liger takes it: [S, D], the halves
    duplicated (HF Llama's ``cat(freqs, freqs)``), in the activations' dtype (HF casts so)."""
    c, s = cos[:seq], sin[:seq]
    return torch.cat((c, c), -1).to(dtype), torch.cat((s, s), -1).to(dtype)


def rope_fn(cos2: torch.Tensor, sin2: torch.Tensor) -> Callable:
    """fn(q, k) on archext's layout ([B, S, H, D]) -> (q_out, k_out) in that layout. Liger takes
    [B, H, S, D]: the transposed views, whose storage is [B, S, H, D] as in HF after its
    ``view(...).transpose(1, 2)``, so that Liger rotates them in place (q and k are overwritten,
    and so are the gradients in the backward)."""
    f = _ops("rope").LigerRopeFunction

    def fn(q, k):
        qo, ko = f.apply(q.transpose(1, 2), k.transpose(1, 2), cos2, sin2)
        return qo.transpose(1, 2), ko.transpose(1, 2)
    return fn


# ---------------------------------------------------------------------------------------------
# Losses (loss.py)
# ---------------------------------------------------------------------------------------------
def cross_entropy(logits, target, z_loss_coef: float = 0.0, softcap: Optional[float] = None,
                  ignore_index: int = -100):
    """Mean loss (z-loss included, as archext's); Liger writes the gradient into ``logits``."""
    f = _ops("cross_entropy").LigerCrossEntropyFunction
    out = f.apply(logits, target, None, ignore_index, float(z_loss_coef), 0.0, "mean", softcap,
                  False)
    return out[0]


def linear_cross_entropy(hidden, weight, target, z_loss_coef: float = 0.0,
                         softcap: Optional[float] = None, ignore_index: int = -100):
    f = _ops("fused_linear_cross_entropy").LigerFusedLinearCrossEntropyFunction
    out = f.apply(hidden, weight, target, None, None, ignore_index, float(z_loss_coef), 0.0,
                  "mean", softcap, False)
    return out[0]
