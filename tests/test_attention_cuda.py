"""The CUDA kernels of flash_attn_fwd / flash_attn_bwd on a GPU, at sizes the emulated run of
tests/test_attention.py cannot afford (every GPU thread is a fiber there): long sequences that
take many key and query tiles, each head-dim bucket (64, 128, 256, and sizes between), decoding
(one query against a long cache), grouped heads; against the float64 reference, and twice the
error of PyTorch's own materialised attention in float16 / bfloat16. Skipped without a GPU."""
import pytest
import torch

import archext
from archext import ops
from archext import reference as ref

from tolerance import GRAD_TOL, OUT_TOL, assert_within_2x_torch

pytestmark = pytest.mark.skipif(not archext.cuda_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (b, sq, sk, hq, hk, d, options)
LARGE = [
    (2, 1024, 1024, 8, 2, 64, dict()),
    (1, 777, 1500, 4, 4, 128, dict(window=256, softcap=30.0, bias=True)),
    (2, 512, 512, 4, 1, 256, dict(causal=False, bias=True, segments=True)),
    (1, 600, 600, 6, 2, 72, dict(window=100, softcap=20.0, bias=True, segments=True)),
    (1, 300, 300, 2, 1, 200, dict(causal=False, softcap=10.0)),
    (4, 1, 2048, 8, 1, 128, dict(bias=True)),  # decoding: one query row against a long cache
]


def _inputs(device, dtype, b, sq, sk, hq, hk, d, bias, segments):
    gen = torch.Generator(device="cpu").manual_seed(b * 1_000_003 + sq * 1009 + sk * 31 + d)
    q, k, v = (torch.randn(b, n, h, d, generator=gen, dtype=torch.float64).to(device, dtype)
               for n, h in ((sq, hq), (sk, hk), (sk, hk)))
    rb = torch.randn(hq, sq + sk - 1, generator=gen, dtype=torch.float64) if bias else None
    seg = None
    if segments:
        seg = torch.sort(torch.randint(0, 8, (b, sk), generator=gen), dim=1).values
        seg = seg.to(device=device, dtype=torch.int32)
    return q, k, v, (rb.to(device, torch.float32) if bias else None), seg


def _run(q, k, v, rb, seg, opts, g):
    """o and the gradients of q, k, v (and rel_bias) of ops.flash_attention or of the reference
    (`reference` set) on copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if rb is not None:
        leaves.append(rb.detach().clone().requires_grad_())
    o = ops.flash_attention(*leaves[:3], rel_bias=leaves[3] if rb is not None else None,
                            segment_ids=seg, **opts)
    o.backward(g)
    return [o.detach()] + [t.grad for t in leaves]


def _reference(q, k, v, rb, seg, opts, g, dtype):
    """The same through reference.attention in `dtype` (float64: the reference; the inputs' own
    dtype: PyTorch's own materialised error)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if rb is not None:
        leaves.append(rb.detach().to(torch.float64 if dtype == torch.float64 else dtype)
                      .requires_grad_())
    d = q.shape[-1]
    o = ref.attention(leaves[0], leaves[1], leaves[2], opts.get("scale") or d ** -0.5,
                      opts.get("softcap"), opts.get("causal", True), opts.get("window"),
                      leaves[3] if rb is not None else None, seg)
    o.backward(g.to(dtype))
    return [o.detach()] + [t.grad for t in leaves]


def _close(actual, ref64, dtype, grad, name):
    rtol, atol = (GRAD_TOL if grad else OUT_TOL)[dtype]
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    torch.testing.assert_close(actual.double(), ref64, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{name}: {m}")


def check_large(device, dtype, case):
    b, sq, sk, hq, hk, d, opts = case
    opts = dict(opts)
    bias, segments = opts.pop("bias", False), opts.pop("segments", False)
    q, k, v, rb, seg = _inputs(device, dtype, b, sq, sk, hq, hk, d, bias, segments)
    g = torch.randn(b, sq, hq, d, device=device, dtype=torch.float64)
    got = _run(q, k, v, rb, seg, opts, g.to(dtype))
    want = _reference(q, k, v, rb, seg, opts, g, torch.float64)
    names = ["o", "grad q", "grad k", "grad v", "grad rel_bias"]
    if dtype == torch.float32:
        for name, a, r in zip(names, got, want):
            _close(a, r, dtype, name != "o", f"{name} {dtype}")
    else:
        own = _reference(q, k, v, rb, seg, opts, g, dtype)
        for name, a, t, r in zip(names, got, own, want):
            if name == "grad rel_bias":  # float32 here, from a low-precision attention
                _close(a, r, dtype, True, f"{name} {dtype}")
            else:
                assert_within_2x_torch(a, t, r, name=f"{name} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LARGE, ids=lambda c: "b{}_q{}_k{}_h{}x{}_d{}_{}".format(
    *c[:6], "_".join(f"{k}{v}" for k, v in c[6].items()) or "plain"))
def test_large_matches_reference(dtype, case):
    check_large("cuda", dtype, case)


def check_deterministic(device, b, sq, hq, hk, d):
    # No atomics: grad_k / grad_v over the group's heads, grad_bias over the batch and the
    # diagonals, summed in a fixed order, bit for bit from run to run.
    q, k, v, rb, seg = _inputs(device, torch.bfloat16, b, sq, sq, hq, hk, d, True, True)
    g = torch.randn(b, sq, hq, d, device=device, dtype=torch.bfloat16)
    opts = dict(softcap=15.0, window=sq // 3)
    first = _run(q, k, v, rb, seg, opts, g)
    second = _run(q, k, v, rb, seg, opts, g)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_deterministic():
    check_deterministic("cuda", 3, 700, 8, 2, 96)
