"""The ``--device`` flag of the ``archext`` commands (``ablate``, ``profile``), and what a device
offers them."""
import functools

import torch

import archext


def resolve_device(name: str) -> str:
    """``auto`` is ``cuda`` when archext's CUDA kernels and a GPU are both there, else ``cpu``; a
    CUDA device that archext cannot use exits with the reason."""
    if name == "auto":
        return "cuda" if archext.cuda_available() else "cpu"
    if name.startswith("cuda") and not archext.cuda_available():
        raise SystemExit(f"--device {name}: archext's CUDA kernels or a GPU are not available "
                         f"({archext.build_info()})")
    return name


@functools.lru_cache(maxsize=None)
def _fused_adamw(device: str) -> bool:
    try:
        p = torch.zeros(2, device=device, requires_grad=True)
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


def fused_adamw_available(device) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` runs on ``device`` (checked once per device)."""
    return _fused_adamw(str(torch.device(device)))
