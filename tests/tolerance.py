"""The tolerance rules every op test applies.

1. Against a float64 reference computed from the same (upcast) inputs, with a per-dtype table.
2. In float16/bfloat16, the kernel's max error is at most twice PyTorch's own max error in the
   same dtype (flash-attention's rule), plus a floor: half an ulp of the output's largest
   magnitude (the rounding error of a correctly rounded result, so a tie at zero error does not
   fail), or 8 float32 ulps at unit scale, whichever is larger (the kernels accumulate in float32:
   a result that is tiny by cancellation, such as RMSNorm's input gradient at width 1, carries
   that much absolute error from terms of unit size).
"""
import math

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


def assert_close(actual: torch.Tensor, ref64: torch.Tensor, *, grad: bool = False, name: str = "",
                 slack: torch.Tensor | None = None):
    """actual within the dtype's (rtol, atol) of ref64, atol scaled by ref64's largest magnitude.

    slack (float64, broadcastable to ref64) widens the bound element by element, by an error
    that the inputs' conditioning allows a float32 computation (see norm_slack)."""
    rtol, atol = (GRAD_TOL if grad else OUT_TOL)[actual.dtype]
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    if slack is None:
        torch.testing.assert_close(
            actual.double(), ref64, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}"
        )
        return
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    err = (actual.double() - ref64).abs()
    bound = rtol * ref64.abs() + atol * scale + slack
    bad = ~(err <= bound)  # a NaN error fails too
    if bad.any():
        i = int(torch.nonzero(bad.reshape(-1))[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} / {err.numel()} elements outside the bound; first at flat "
            f"index {i}: actual {actual.reshape(-1)[i].item():.8g}, reference "
            f"{ref64.reshape(-1)[i].item():.8g}, error {err.reshape(-1)[i].item():.3g} > bound "
            f"{bound.reshape(-1)[i].item():.3g} (of which conditioning slack "
            f"{slack.expand_as(ref64).reshape(-1)[i].item():.3g})"
        )


def norm_slack(kind: str, h: torch.Tensor, w: torch.Tensor | None, g: torch.Tensor, eps: float,
               dtype: torch.dtype, factor: float = 4.0) -> dict:
    """Per-element error slack of a normalisation computed in float32 (float64 for float64 inputs)
    from its inputs' conditioning: {"y", "x", "w"} for the output and the input / weight gradients.

    h is the normalised input as the kernel sees it, w the effective weight (None: ones), g the
    output's incoming gradient, all float64. A LayerNorm row of nearly equal values is
    ill-conditioned: the row mean is rounded at the scale of the values, u * max|h|, and x_hat =
    (h - mean) * rstd carries that error times rstd; the input gradient, itself a difference of
    terms of size rstd * |g w|, carries it times rstd * |g w|. RMSNorm has no mean, and x_hat is
    relatively accurate. The bound is first order, with a row sum's error growth of 1 + log2(n)
    (blocked and tree sums) and a safety `factor`: on rows of n = 1 to 2049 values at spreads of
    1e-4 to 1 around means of 0 to 100, every dtype, the CPU and the emulated CUDA kernels, the
    error beyond the dtype's table stays under 0.83 of the slack with factor 1. PyTorch's own
    float32 LayerNorm backward makes errors of the same size on such rows."""
    u = (2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24) * (1.0 + math.log2(h.shape[-1] or 1))
    h = h.detach()
    if kind == "ln":
        c = h - h.mean(-1, keepdim=True)
        rstd = (c.square().mean(-1, keepdim=True) + eps).rsqrt()
        xhat = c * rstd
        e = u * rstd * h.abs().amax(-1, keepdim=True)  # absolute error of x_hat in a row
    else:
        rstd = (h.square().mean(-1, keepdim=True) + eps).rsqrt()
        xhat = h * rstd
        e = u * (xhat.abs().amax(-1, keepdim=True) + 1.0)
    w1 = torch.ones(h.shape[-1], dtype=h.dtype, device=h.device) if w is None else w.detach().abs()
    gw = (g.detach() * w1).abs().amax(-1, keepdim=True)
    xmax = xhat.abs().amax(-1, keepdim=True)
    return {
        "y": factor * e * w1,
        "x": factor * rstd * (e * gw * (1.0 + xmax) + u * gw),
        "w": factor * (g.detach().abs() * e).reshape(-1, h.shape[-1]).sum(0),
    }


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
