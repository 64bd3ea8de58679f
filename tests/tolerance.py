"""The tolerance rules every op test applies.

1. Against a float64 reference computed from the same (upcast) inputs, with a per-dtype table.
2. In float16/bfloat16, the kernel's max error is at most twice PyTorch's own max error in the
   same dtype (flash-attention's rule), plus a floor: half an ulp of the output's largest
   magnitude (the rounding error of a correctly rounded result, so a tie at zero error does not
   fail), or 8 float32 ulps at unit scale, whichever is larger (the kernels accumulate in float32:
   a result that is tiny by cancellation, such as RMSNorm's input gradient at width 1, carries
   that much absolute error from terms of unit size).
"""
import torch

# (rtol, atol) for outputs, and for gradients (which add a reduction over rows or the width).
OUT_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (8e-3, 1.6e-2),
}
GRAD_TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (5e-5, 5e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 3.2e-2),
}


def assert_close(actual: torch.Tensor, ref64: torch.Tensor, *, grad: bool = False, name: str = ""):
    rtol, atol = (GRAD_TOL if grad else OUT_TOL)[actual.dtype]
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), ref64, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}"
    )


def max_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    return (a.double() - ref64).abs().max().item() if a.numel() else 0.0


def assert_within_2x_torch(actual: torch.Tensor, torch_own: torch.Tensor, ref64: torch.Tensor,
                           name: str = ""):
    if actual.dtype not in (torch.float16, torch.bfloat16) or actual.numel() == 0:
        return
    largest = ref64.abs().max().item()
    floor = max(torch.finfo(actual.dtype).eps / 2 * largest,
                8 * torch.finfo(torch.float32).eps * max(1.0, largest))
    ours, theirs = max_err(actual, ref64), max_err(torch_own, ref64)
    assert ours <= 2 * theirs + floor, (
        f"{name}: archext error {ours:.3g} > 2 x PyTorch's own {theirs:.3g} + floor {floor:.3g}"
    )
