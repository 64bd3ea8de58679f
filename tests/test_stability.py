"""Stability family: cross-entropy (z-loss, soft-cap, smoothing, ignore_index), the attention
softmax (soft-cap, scale, causal / window mask, bias), the pointwise soft-cap, QK-norm + RoPE,
and the Attention module. Every op against its float64 reference (archext/reference.py)."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import archext
from archext import _C, ops
from archext import reference as ref
from archext.nn import Attention, RotaryEmbedding

from tolerance import GRAD_TOL, OUT_TOL, assert_close, assert_within_2x_torch

DT_CPU = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def dtypes_for(device):
    return DT_CPU if device == "cpu" else DT_CPU[:3]


# ---------------------------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------------------------
def ce_case(device, dtype, n, vocab, *, cap=None, eps=0.0, coef=0.0, reduction="mean",
            ignore_some=True, scale=3.0, logits=None):
    x = logits if logits is not None else (torch.randn(n, vocab, dtype=torch.float64) * scale)
    x = x.to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), device=device)
    if ignore_some and n > 2:
        t[1] = -100
    loss, z = ops.cross_entropy(x, t, z_loss_coef=coef, softcap=cap, label_smoothing=eps,
                                reduction=reduction)
    x64 = x.detach().double().requires_grad_()
    lr, zr = ref.cross_entropy(x64, t, -100, eps, coef, cap, reduction)
    # Both outputs carry a gradient (the logged z-loss too, as a user might add it).
    gl = torch.randn_like(lr)
    (loss * gl.to(loss.dtype) + 0.5 * z).sum().backward()
    (lr * gl + 0.5 * zr).sum().backward()
    return x, x64, loss, lr, z, zr


def check_ce(device, dtype, n, vocab, **kw):
    x, x64, loss, lr, z, zr = ce_case(device, dtype, n, vocab, **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and z.dtype == acc
    # The losses are computed in float32 from exact inputs: float32 tolerances whatever the dtype.
    assert_close(loss.cpu(), lr.cpu(), name="loss")
    assert_close(z.cpu(), zr.cpu(), name="z_loss")
    rtol, atol = GRAD_TOL[dtype]
    # Relative to the largest gradient, or to the terms of size 1/n (the one-hot and softmax
    # terms of a "mean") that cancel where the softmax is saturated (vocab 1).
    scale = max(x64.grad.abs().max().item() if x64.grad.numel() else 0.0, 1.0 / n)
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad.cpu(), rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("vocab", [1, 7, 769, 5125])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_cross_entropy_matches_reference(device, vocab, options):
    kw = {} if options == "plain" else dict(cap=30.0, eps=0.1, coef=1e-4)
    for dtype in dtypes_for(device):
        for reduction in ("mean", "sum", "none"):
            check_ce(device, dtype, 13, vocab, reduction=reduction, **kw)


@pytest.mark.parametrize("vocab", [50257, 128256])
def test_cross_entropy_big_vocab(device, vocab):
    for dtype in (torch.float32, torch.bfloat16):
        check_ce(device, dtype, 3, vocab, cap=30.0, eps=0.05, coef=1e-4)


def test_cross_entropy_every_cpu_isa(cpu_isa):
    for dtype in DT_CPU:
        check_ce("cpu", dtype, 5, 2 * 2048 + 37, cap=15.0, eps=0.1, coef=1e-3)
        check_ce("cpu", dtype, 5, 100, coef=1e-3)


def test_cross_entropy_low_precision_within_2x_torch(device):
    # The gradient in float16 / bfloat16 is at most twice PyTorch's own error in that dtype.
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(64, 3000, dtype=torch.float64) * 4).to(device, dtype)
        t = torch.randint(0, 3000, (64,), device=device)
        xa = x.clone().requires_grad_()
        ops.cross_entropy(xa, t, reduction="sum")[0].backward()
        xt = x.clone().requires_grad_()
        F.cross_entropy(xt, t, reduction="sum").backward()
        x64 = x.double().requires_grad_()
        ref.cross_entropy(x64, t, reduction="sum")[0].backward()
        assert_within_2x_torch(xa.grad, xt.grad, x64.grad, name=f"ce grad {dtype}")


def test_cross_entropy_matches_torch(device):
    x = torch.randn(37, 501, device=device, requires_grad=True)
    t = torch.randint(0, 501, (37,), device=device)
    t[::5] = -100
    for eps in (0.0, 0.2):
        ours, _ = ops.cross_entropy(x, t, label_smoothing=eps)
        theirs = F.cross_entropy(x, t, label_smoothing=eps)
        torch.testing.assert_close(ours, theirs)
        g1, = torch.autograd.grad(ours, x)
        g2, = torch.autograd.grad(theirs, x)
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_cross_entropy_overflow_safe(device, magnitude):
    # Logits of +-1e4 (float16's max is 65504): finite, correct losses and gradients.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(6, 1000, dtype=torch.float64)
        x[:, ::7] = magnitude
        x[:, 3] = -magnitude
        for cap in (None, 30.0):
            xx, x64, loss, lr, z, zr = ce_case(device, dtype, 6, 1000, logits=x, cap=cap, coef=1e-4)
            assert torch.isfinite(loss).all() and torch.isfinite(xx.grad).all()
            assert_close(loss.cpu(), lr.cpu(), name="loss")


def test_cross_entropy_masked_logits(device):
    # Logits of -inf (masked-out tokens) give PyTorch's finite loss and a zero gradient there,
    # whether they open the row, fill its whole first block of 2048 (the CPU kernel's), or lie
    # anywhere else; a row of nothing but -inf gives lse = -inf.
    x = torch.randn(5, 5000, device=device, dtype=torch.float64) * 3
    x[0, 0] = -math.inf
    x[1, :2100] = -math.inf
    x[2, ::3] = -math.inf
    x[3, 1:] = -math.inf
    x[4, 4000:] = -math.inf
    t = torch.tensor([1, 2500, 1, 0, 17], device=device)
    for dtype in (torch.float32, torch.bfloat16):
        xx = x.to(dtype).requires_grad_()
        loss, _ = ops.cross_entropy(xx, t, z_loss_coef=1e-4, reduction="none")
        want, _ = ref.cross_entropy(x.to(dtype).double(), t, z_loss_coef=1e-4, reduction="none")
        assert torch.isfinite(loss).all()
        assert_close(loss.cpu(), want.cpu(), name="loss")
        torch.testing.assert_close(loss.float(), F.cross_entropy(xx.float(), t, reduction="none")
                                   + 1e-4 * torch.logsumexp(xx.float(), -1) ** 2)
        loss.sum().backward()
        assert torch.isfinite(xx.grad).all() and (xx.grad[x == -math.inf] == 0).all()
    lse = torch.ops.archext.cross_entropy_fwd(torch.full((1, 7), -math.inf, device=device),
                                              torch.zeros(1, dtype=torch.long, device=device),
                                              -100, 0.0, 0.0, 0.0)[2]
    assert lse.item() == -math.inf


def test_cross_entropy_all_ignored_is_zero(device):
    x = torch.randn(4, 9, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    loss, z = ops.cross_entropy(x, t, z_loss_coef=1e-3)
    assert loss.item() == 0.0 and z.item() == 0.0
    loss.backward()
    assert (x.grad == 0).all()
    # The reference agrees, where F.cross_entropy gives NaN.
    assert ref.cross_entropy(x.detach(), t)[0].item() == 0.0
    loss, _ = ops.cross_entropy(x, torch.full((4,), 3, device=device), ignore_index=3)
    assert loss.item() == 0.0


def test_cross_entropy_empty_and_strided(device):
    x = torch.randn(0, 11, device=device, requires_grad=True)
    loss, z = ops.cross_entropy(x, torch.zeros(0, dtype=torch.long, device=device))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, 11)
    # Row-strided (a slice of a wider buffer) and column-strided logits.
    big = torch.randn(9, 40, device=device, dtype=torch.float64)
    t = torch.randint(0, 25, (9,), device=device)
    for view in (big[:, 5:30], big.t().contiguous().t()[:, :25]):
        v = view.float().requires_grad_() if view.dtype != torch.float32 else view
        got = ops.cross_entropy(view.float(), t, reduction="none")[0]
        want = ref.cross_entropy(view, t, reduction="none")[0]
        assert_close(got, want)


def test_cross_entropy_gradcheck():
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 12, 0, 5])
    for cap, eps, coef, red in [(None, 0.0, 0.0, "mean"), (4.0, 0.1, 1e-2, "sum"),
                                (2.0, 0.3, 0.5, "none")]:
        f = lambda x: ops.cross_entropy(x, t, softcap=cap, label_smoothing=eps,  # noqa: E731
                                        z_loss_coef=coef, reduction=red)
        assert torch.autograd.gradcheck(f, (x,))


def test_cross_entropy_no_logits_sized_buffer_beyond_the_gradient():
    # The forward saves only the inputs and a per-row lse: nothing of the logits' size.
    x = torch.randn(64, 4096, requires_grad=True)
    t = torch.randint(0, 4096, (64,))
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: sizes.append(s.numel()) or s, lambda s: s):
        loss, _ = ops.cross_entropy(x, t, softcap=30.0, z_loss_coef=1e-4)
    # target, lse, the logits themselves, and scalars of the mean.
    assert sorted(s for s in sizes if s > 1) == [64, 64, 64 * 4096]


def test_cross_entropy_thread_count_does_not_change_results():
    x = torch.randn(64, 3001)
    t = torch.randint(0, 3001, (64,))
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            xx = x.clone().requires_grad_()
            loss, _ = ops.cross_entropy(xx, t, softcap=20.0, z_loss_coef=1e-4, reduction="none")
            loss.sum().backward()
            outs.append((loss, xx.grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ---------------------------------------------------------------------------------------------
# Softmax and soft-cap
# ---------------------------------------------------------------------------------------------
def check_softmax(device, dtype, shape, *, bias_shape=None, x_scale=4.0, **kw):
    x = (torch.randn(shape, dtype=torch.float64) * x_scale).to(device, dtype).requires_grad_()
    bias = None
    if bias_shape is not None:
        bias = torch.randn(bias_shape, dtype=torch.float64).to(device, dtype).requires_grad_()
    y = ops.softmax(x, bias=bias, **kw)
    x64 = x.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    kw64 = dict(kw)
    yr = ref.softmax(x64, kw64.pop("scale", 1.0), kw64.pop("softcap", None), kw64.pop("causal", False),
                     kw64.pop("window", None), b64)
    g = torch.randn_like(yr)
    y.backward(g.to(dtype))
    yr.backward(g)
    assert_close(y.cpu(), yr.cpu(), name="y")
    assert_close(x.grad.cpu(), x64.grad.cpu(), grad=True, name="grad x")
    if bias is not None:
        assert bias.grad.shape == bias.shape
        assert_close(bias.grad.cpu(), b64.grad.cpu(), grad=True, name="grad bias")
    return y


@pytest.mark.parametrize("sk", [1, 7, 769])
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
def test_softmax_matches_reference(device, sk, mask):
    kw = {"none": {}, "causal": {"causal": True}, "window": {"causal": True, "window": 5}}[mask]
    for dtype in dtypes_for(device):
        for cap in (None, 20.0):
            check_softmax(device, dtype, (2, 3, 5, sk), scale=0.3, softcap=cap, **kw)
            check_softmax(device, dtype, (2, 3, 5, sk), bias_shape=(3, 5, sk), scale=1.0,
                          softcap=cap, **kw)


def test_softmax_every_cpu_isa(cpu_isa):
    for dtype in DT_CPU:
        check_softmax("cpu", dtype, (2, 2, 9, 37), bias_shape=(1, 2, 1, 37), scale=0.5,
                      softcap=10.0, causal=True, window=20)


def test_softmax_bounded_cap_skips_the_max(cpu_isa):
    # With 0 < cap <= 60 and no bias the CPU kernel takes exp(s) with no max subtracted (every s
    # is within [-cap, cap]: a normal float either way); just past 60 it subtracts the max. Both
    # must match the reference with the scores saturated at both ends of the cap. (Saturated by
    # large inputs, not by a large scale, which would multiply the gradient's 16-bit rounding.)
    for cap in (60.0, 60.5):
        for dtype in DT_CPU:
            check_softmax("cpu", dtype, (1, 2, 3, 5125), x_scale=400.0, softcap=cap, causal=True)
            check_softmax("cpu", dtype, (2, 1, 4, 17), x_scale=400.0, softcap=cap, window=3)
        # Every score at -cap: exp(-60) = 8.8e-27 per key, the row exactly uniform.
        n = 769
        y = ops.softmax(torch.full((2, n), -1e4), softcap=cap)
        assert torch.allclose(y, torch.full_like(y, 1.0 / n), rtol=1e-6, atol=0)
        y = ops.softmax(torch.full((2, n), 1e4), softcap=cap)
        assert torch.allclose(y, torch.full_like(y, 1.0 / n), rtol=1e-6, atol=0)


def test_softmax_ranks_and_broadcast(device):
    check_softmax(device, torch.float32, (6, 10), bias_shape=(10,), causal=True)
    check_softmax(device, torch.float32, (3, 6, 10), bias_shape=(6, 1))
    check_softmax(device, torch.float32, (2, 4, 6, 10), bias_shape=(2, 1, 6, 10), softcap=5.0)


def test_softmax_fully_masked_rows_are_zero(device):
    # More queries than keys under a causal mask: the first rows see no key.
    x = torch.randn(1, 1, 6, 3, device=device, requires_grad=True)
    y = ops.softmax(x, causal=True)
    assert (y[0, 0, :3] == 0).all() and torch.allclose(y[0, 0, 3:].sum(-1), torch.ones(3, device=device))
    # A bias of -inf on a whole row.
    bias = torch.zeros(1, 1, 6, 3, device=device)
    bias[..., 4, :] = float("-inf")
    y2 = ops.softmax(x, bias=bias)
    assert (y2[0, 0, 4] == 0).all() and not torch.isnan(y2).any()
    y2.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_softmax_gradcheck():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    for kw in [dict(), dict(softcap=2.0, scale=0.7), dict(causal=True, window=2, softcap=3.0)]:
        assert torch.autograd.gradcheck(lambda x, b: ops.softmax(x, bias=b, **kw), (x, b))


def test_softcap(device):
    for dtype in dtypes_for(device):
        x = (torch.randn(3, 1037, dtype=torch.float64) * 40).to(device, dtype).requires_grad_()
        y = ops.softcap(x, 30.0)
        x64 = x.detach().double().requires_grad_()
        yr = ref.softcap(x64, 30.0)
        g = torch.randn_like(yr)
        y.backward(g.to(dtype))
        yr.backward(g)
        assert_close(y.cpu(), yr.cpu())
        assert_close(x.grad.cpu(), x64.grad.cpu(), grad=True)
        own = ref.softcap(x.detach(), 30.0)
        assert_within_2x_torch(y.detach(), own, yr.detach(), name=f"softcap {dtype}")
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.softcap(x.t(), 1.5), (x,))


def test_softmax_and_softcap_special_values():
    x = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])
    y = ops.softmax(x)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()
    assert ops.softcap(torch.tensor([float("inf"), float("-inf"), -0.0]), 5.0).tolist() == [5.0, -5.0, -0.0]


# ---------------------------------------------------------------------------------------------
# QK-norm + RoPE
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("interleaved", [False, True])
def test_qk_norm_rope(device, per_head, interleaved):
    b, s, hq, hk, d = 2, 7, 4, 2, 16
    cos, sin = ops.rope_cache(8, 32, device=device)  # partial rotary: 8 of 16 dims
    for dtype in dtypes_for(device):
        q = torch.randn(b, s, hq, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, s, hk, d, device=device, dtype=dtype, requires_grad=True)
        wq = torch.randn(d if per_head else hq * d, device=device, dtype=dtype, requires_grad=True)
        wk = torch.randn(d if per_head else hk * d, device=device, dtype=dtype, requires_grad=True)
        qo, ko = ops.qk_norm_rope(q, k, wq, wk, cos, sin, per_head=per_head, offset=3,
                                  interleaved=interleaved, weight_offset=0.5)
        ins = [t.detach().double().requires_grad_() for t in (q, k, wq, wk)]
        pos = torch.arange(s, device=device) + 3
        qr, kr = ref.qk_norm_rope(*ins, cos.double(), sin.double(), pos, 1e-6, interleaved,
                                  per_head, 0.5)
        gq, gk = torch.randn_like(qr), torch.randn_like(kr)
        torch.autograd.backward([qo, ko], [gq.to(dtype), gk.to(dtype)])
        torch.autograd.backward([qr, kr], [gq, gk])
        assert_close(qo.cpu(), qr.cpu(), name="q")
        assert_close(ko.cpu(), kr.cpu(), name="k")
        for t, r in zip((q, k, wq, wk), ins):
            assert_close(t.grad.cpu(), r.grad.cpu(), grad=True, name="grad")


@pytest.mark.parametrize("per_head", [True, False])
def test_qk_norm_rope_many_tokens(device, per_head):
    # More tokens than the CUDA backward has blocks (4 per SM: 528 on an H200), so that each
    # block sums several tokens into its weight-gradient partial row.
    b, s, d = 3, 700, 16
    cos, sin = ops.rope_cache(d // 2, s, device=device)
    q = torch.randn(b, s, 2, d, device=device, requires_grad=True)
    k = torch.randn(b, s, 1, d, device=device, requires_grad=True)
    wq = torch.randn(d if per_head else 2 * d, device=device, requires_grad=True)
    wk = torch.randn(d, device=device, requires_grad=True)
    qo, ko = ops.qk_norm_rope(q, k, wq, wk, cos, sin, per_head=per_head)
    ins = [t.detach().double().requires_grad_() for t in (q, k, wq, wk)]
    qr, kr = ref.qk_norm_rope(*ins, cos.double(), sin.double(), torch.arange(s, device=device),
                              1e-6, False, per_head, 0.0)
    gq, gk = torch.randn_like(qr), torch.randn_like(kr)
    torch.autograd.backward([qo, ko], [gq.float(), gk.float()])
    torch.autograd.backward([qr, kr], [gq, gk])
    for t, r in zip((q, k, wq, wk), ins):
        assert_close(t.grad.cpu(), r.grad.cpu(), grad=True, name="grad")


@pytest.mark.parametrize("hq, d", [(96, 128), (48, 256), (256, 128)])
def test_qk_norm_rope_many_heads(device, hq, d):
    # heads * head_dim of 12288 to 32768 per token: on CUDA the kernel stages a token's heads in
    # 48 to 128 KiB of shared memory, past the 48 KiB a kernel gets without opting in.
    cos, sin = ops.rope_cache(d // 2, 8, device=device)
    q = torch.randn(1, 3, hq, d, device=device, requires_grad=True)
    k = torch.randn(1, 3, 8, d, device=device, requires_grad=True)
    wq = torch.randn(d, device=device, requires_grad=True)
    wk = torch.randn(d, device=device, requires_grad=True)
    qo, ko = ops.qk_norm_rope(q, k, wq, wk, cos, sin)
    ins = [t.detach().double().requires_grad_() for t in (q, k, wq, wk)]
    qr, kr = ref.qk_norm_rope(*ins, cos.double(), sin.double(), torch.arange(3, device=device),
                              1e-6, False, True, 0.0)
    gq, gk = torch.randn_like(qr), torch.randn_like(kr)
    torch.autograd.backward([qo, ko], [gq.float(), gk.float()])
    torch.autograd.backward([qr, kr], [gq, gk])
    assert_close(qo.cpu(), qr.cpu(), name="q")
    assert_close(ko.cpu(), kr.cpu(), name="k")
    for t, r in zip((q, k, wq, wk), ins):
        assert_close(t.grad.cpu(), r.grad.cpu(), grad=True, name="grad")


def test_qk_norm_rope_every_cpu_isa_and_gradcheck(cpu_isa):
    cos, sin = ops.rope_cache(6, 16)
    for per_head in (True, False):
        q = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
        k = torch.randn(2, 5, 1, 8, dtype=torch.float64, requires_grad=True)
        wq = torch.randn(8 if per_head else 24, dtype=torch.float64, requires_grad=True)
        wk = torch.randn(8, dtype=torch.float64, requires_grad=True)
        f = lambda q, k, wq, wk: ops.qk_norm_rope(q, k, wq, wk, cos, sin, per_head=per_head,  # noqa: E731
                                                  offset=torch.tensor([0, 4]), weight_offset=1.0)
        assert torch.autograd.gradcheck(f, (q, k, wq, wk))
        for dtype in (torch.float32, torch.bfloat16):
            args = [t.detach().to(dtype) for t in (q, k, wq, wk)]
            got = f(*args)
            want = f(q.detach(), k.detach(), wq.detach(), wk.detach())
            for g, w in zip(got, want):
                assert_close(g, w)


def test_qk_norm_rope_strided_and_no_weight():
    cos, sin = ops.rope_cache(16, 32)
    q = torch.randn(2, 4, 7, 16).transpose(1, 2)  # [B, S, H, D] view of a [B, H, S, D] tensor
    k = torch.randn(2, 7, 2, 16)
    qo, ko = ops.qk_norm_rope(q, k, None, None, cos, sin)
    pos = torch.arange(7)
    qr, kr = ref.qk_norm_rope(q.double(), k.double(), None, None, cos.double(), sin.double(), pos)
    assert_close(qo, qr)
    assert_close(ko, kr)
    with pytest.raises(RuntimeError, match=r"expected q_weight of shape \[16\] \(head_dim\), got \[8\]"):
        ops.qk_norm_rope(q, k, torch.ones(8), None, cos, sin)
    with pytest.raises(RuntimeError, match=r"expected k_weight of shape \[32\] \(heads \* head_dim\)"):
        ops.qk_norm_rope(q, k, None, torch.ones(16), cos, sin, per_head=False)
    with pytest.raises(RuntimeError, match=r"position 32 at index 2 is outside the cos/sin cache of 32"
                       r"|device assert failed .* position outside the cos/sin cache"):
        ops.qk_norm_rope(q, k, None, None, cos, sin, offset=30)


# ---------------------------------------------------------------------------------------------
# Attention module
# ---------------------------------------------------------------------------------------------
def eager_attention(m: Attention, x, bias=None):
    """An eager reference of Attention.forward, written from the equations (cap before mask)."""
    b, s, _ = x.shape
    q = m.q_proj(x)
    k = m.k_proj(x)
    v = m.v_proj(x).view(b, s, m.n_kv_heads, m.head_dim)
    if m.qk_norm == "proj":
        q = ref.rms_norm(q, m.q_norm.weight, m.q_norm.eps, m.q_norm.weight_offset)
        k = ref.rms_norm(k, m.k_norm.weight, m.k_norm.eps, m.k_norm.weight_offset)
    q = q.view(b, s, m.n_heads, m.head_dim)
    k = k.view(b, s, m.n_kv_heads, m.head_dim)
    if m.qk_norm == "head":
        q = ref.rms_norm(q, m.q_norm.weight, m.q_norm.eps, m.q_norm.weight_offset)
        k = ref.rms_norm(k, m.k_norm.weight, m.k_norm.eps, m.k_norm.weight_offset)
    if m.rope is not None:
        pos = torch.arange(s)
        q = ref.rope(q, m.rope.cos.to(q.dtype), m.rope.sin.to(q.dtype), pos, m.rope.interleaved)
        k = ref.rope(k, m.rope.cos.to(q.dtype), m.rope.sin.to(q.dtype), pos, m.rope.interleaved)
    g = m.n_heads // m.n_kv_heads
    q, k, v = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, 1), v.transpose(1, 2).repeat_interleave(g, 1)
    scores = (q @ k.transpose(-1, -2)) * m.scale
    if m.softcap is not None:
        scores = m.softcap * torch.tanh(scores / m.softcap)
    if bias is not None:
        scores = scores + bias
    keep = ref.attention_mask(s, s, m.causal, m.sliding_window)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    o = scores.softmax(-1) @ v
    return m.o_proj(o.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(n_kv_heads=2, qk_norm="head", rope=True),
    dict(n_kv_heads=1, qk_norm="proj", rope=True, softcap=50.0),
    dict(softcap=5.0, sliding_window=3, bias=True),
    dict(n_kv_heads=2, sliding_window=4, rope=True),
    dict(causal=False, qk_norm="head"),
])
def test_attention_matches_eager(cfg):
    cfg = dict(cfg)
    rope = RotaryEmbedding(16, theta=500.0) if cfg.pop("rope", False) else None
    m = Attention(64, 4, head_dim=16, rope=rope, **cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    torch.testing.assert_close(m(x), eager_attention(m, x), rtol=1e-9, atol=1e-9)


def test_attention_bias_and_grad():
    m = Attention(32, 4, softcap=30.0)
    alibi = archext.nn.ALiBi(4)
    x = torch.randn(2, 6, 32, requires_grad=True)
    bias = alibi(6, 6)
    out = m(x, bias=bias)
    with torch.no_grad():
        want = eager_attention(m, x, bias)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_attention_bad_config():
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be a positive multiple of n_kv_heads \(4\)"):
        Attention(48, 6, 4)
    with pytest.raises(ValueError, match="qk_norm must be None, 'head', 'each_head' or 'proj'"):
        Attention(48, 6, qk_norm="layer")
    with pytest.raises(ValueError, match="softcap must be > 0"):
        Attention(48, 6, softcap=0.0)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        Attention(48, 6, sliding_window=0)


def test_compile_fullgraph(device):
    m = Attention(64, 4, 2, qk_norm="head", rope=RotaryEmbedding(16), softcap=20.0).to(device)
    head = torch.randn(50, 64, device=device, requires_grad=True)

    def f(x, t):
        h = m(x)
        logits = ops.softcap(h @ head.t(), 30.0) + ops.softmax(h @ head.t(), causal=True)
        return ops.cross_entropy(logits.view(-1, 50), t.view(-1), z_loss_coef=1e-4, softcap=15.0)[0]

    x = torch.randn(2, 5, 64, device=device, requires_grad=True)
    t = torch.randint(0, 50, (2, 5), device=device)
    params = [x, head] + list(m.parameters())
    eager = f(x, t)
    ge = torch.autograd.grad(eager, params)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(x, t)
    gc = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# opcheck and errors
# ---------------------------------------------------------------------------------------------
def op_samples(device):
    A = torch.ops.archext
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 37, device=device, dtype=dt)
        t = torch.tensor([0, 36, -100, 5, 7], device=device)
        loss, z, lse = A.cross_entropy_fwd(x, t, -100, 0.1, 1e-3, 20.0)
        yield A.cross_entropy_fwd, (rg(x), t, -100, 0.1, 1e-3, 20.0)
        yield A.cross_entropy_fwd, (rg(x), t, -100, 0.0, 0.0, 0.0)
        yield A.cross_entropy_bwd, (torch.randn_like(loss), None, x, t, lse, -100, 0.1, 1e-3, 20.0)
        yield A.cross_entropy_bwd, (torch.randn_like(loss), torch.randn_like(loss), x, t, lse, -100,
                                    0.0, 1e-3, 0.0)
        s = torch.randn(2, 3, 4, 9, device=device, dtype=dt)
        b = torch.randn(3, 1, 9, device=device, dtype=dt)
        yield A.softmax_fwd, (rg(s), rg(b), 0.5, 10.0, True, 3)
        yield A.softmax_fwd, (rg(s), None, 1.0, 0.0, False, -1)
        y = A.softmax_fwd(s, b, 0.5, 10.0, True, 3)
        yield A.softmax_bwd, (torch.randn_like(s), y, s, 0.5, 10.0, True)
        yield A.softmax_bwd, (torch.randn_like(s), y, None, 0.5, 0.0, False)
        yield A.softcap_fwd, (rg(x), 3.0)
        yield A.softcap_bwd, (torch.randn_like(x), x, 3.0)
        q = torch.randn(2, 3, 4, 16, device=device, dtype=dt)
        k = torch.randn(2, 3, 2, 16, device=device, dtype=dt)
        cos, sin = ops.rope_cache(12, 8, device=device)
        pos = torch.tensor([[0, 1, 2], [5, 6, 7]], device=device)
        for per_head in (True, False):
            wq = torch.randn(16 if per_head else 64, device=device, dtype=dt)
            wk = torch.randn(16 if per_head else 32, device=device, dtype=dt)
            yield A.qk_norm_rope_fwd, (rg(q), rg(k), rg(wq), rg(wk), cos, sin, pos, 1e-6, 0.5,
                                       per_head, not per_head)
            qo, ko, rq, rk = A.qk_norm_rope_fwd(q, k, wq, wk, cos, sin, pos, 1e-6, 0.5, per_head, False)
            yield A.qk_norm_rope_bwd, (torch.randn_like(q), torch.randn_like(k), q, k, wq, None, cos,
                                       sin, pos, rq, rk, 0.5, per_head, False)
        # The fused LM head's chunk loop (an opaque op, so torch.compile leaves its in-place
        # weight-gradient sum alone): with and without a bias, every gradient or some.
        h = torch.randn(7, 16, device=device, dtype=dt)
        w = torch.randn(37, 16, device=device, dtype=dt)
        bias = torch.randn(37, device=device, dtype=dt)
        t7 = torch.tensor([0, 36, -100, 5, 7, 1, 2], device=device)
        yield A.linear_ce_grads, (h, w, bias, t7, -100, 0.1, 1e-3, 20.0, "mean", 3, True, True, True)
        yield A.linear_ce_grads, (h, w, None, t7, -100, 0.0, 0.0, 0.0, "sum", 4, False, True, False)


def test_opcheck(device):
    n = 0
    for op, args in op_samples(device):
        torch.library.opcheck(op, args)
        n += 1
    assert n == 2 * 16


@pytest.mark.parametrize("call, match", [
    (lambda d: ops.cross_entropy(torch.ones(2, 5, device=d), torch.ones(2, device=d)),
     r"cross_entropy_fwd: expected target of dtype Long, got Float"),
    (lambda d: ops.cross_entropy(torch.ones(2, 5, device=d), torch.ones(3, dtype=torch.long, device=d)),
     r"expected target of shape \[2\] \(one per row of logits\), got \[3\]"),
    (lambda d: ops.cross_entropy(torch.ones(2, 3, 5, device=d), torch.ones(2, dtype=torch.long, device=d)),
     r"expected logits of shape \[tokens, vocab\], got \[2, 3, 5\]"),
    (lambda d: ops.cross_entropy(torch.ones(2, 5, device=d), torch.ones(2, dtype=torch.long, device=d),
                                 label_smoothing=1.5),
     r"expected label_smoothing in \[0, 1\], got 1.5"),
    (lambda d: ops.cross_entropy(torch.ones(2, 5, device=d), torch.ones(2, dtype=torch.long, device=d),
                                 z_loss_coef=-1.0),
     r"expected z_loss_coef >= 0, got -1"),
    (lambda d: ops.cross_entropy(torch.ones(2, 5, device=d), torch.ones(2, dtype=torch.long, device=d),
                                 softcap=-3.0),
     r"softcap must be > 0 \(or None for no cap\), got -3.0"),
    (lambda d: ops.cross_entropy(torch.ones(2, 5, device=d), torch.ones(2, dtype=torch.long, device=d),
                                 reduction="avg"),
     r"reduction must be one of"),
    (lambda d: ops.cross_entropy(torch.ones(2, 5, dtype=torch.int32, device=d),
                                 torch.ones(2, dtype=torch.long, device=d)),
     r"expected logits to be float32, float16, bfloat16 .* got Int"),
    (lambda d: ops.softmax(torch.ones(2, 2, 2, 2, 2, device=d)),
     r"softmax_fwd: expected scores x of rank 2 to 4"),
    (lambda d: ops.softmax(torch.ones(2, 4, 5, device=d), bias=torch.ones(3, 5, device=d)),
     r"expected bias broadcastable to \[2, 4, 5\] \(the shape of x\), got \[3, 5\]"),
    (lambda d: ops.softmax(torch.ones(4, 5, device=d), window=0),
     r"window must be >= 1"),
    (lambda d: torch.ops.archext.softmax_fwd(torch.ones(4, 5, device=d), None, 1.0, -2.0, False, -1),
     r"expected softcap >= 0 \(0 = off\) and finite, got -2"),
    (lambda d: torch.ops.archext.softmax_bwd(torch.ones(4, 5, device=d), torch.ones(4, 5, device=d),
                                             None, 1.0, 3.0, False),
     r"x \(the scores\) is needed with a softcap"),
    (lambda d: ops.softcap(torch.ones(3, device=d), 0.0), r"softcap: cap must be > 0, got 0.0"),
    (lambda d: torch.ops.archext.softcap_fwd(torch.ones(3, device=d), float("inf")),
     r"softcap_fwd: expected cap > 0 and finite, got inf"),
    (lambda d: torch.ops.archext.softcap_bwd(torch.ones(3, device=d), torch.ones(4, device=d), 1.0),
     r"softcap_bwd: expected grad_y of shape \[4\] \(the shape of x\), got \[3\]"),
])
def test_bad_input(device, call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call(device)


def test_cross_entropy_target_out_of_range_cpu():
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match=r"target\[1\] = 5 is outside \[0, 5\) and is not ignore_index \(-100\)"):
        ops.cross_entropy(x, torch.tensor([0, 5, 1]))
    with pytest.raises(RuntimeError, match=r"target\[0\] = -1 is outside"):
        ops.cross_entropy(x, torch.tensor([-1, 0, 1]))


def test_reference_mode_routes_to_the_references():
    x = torch.randn(4, 8, dtype=torch.float64)
    t = torch.randint(0, 8, (4,))
    with ops.reference_ops():
        assert ops.using_reference_ops()
        got = ops.cross_entropy(x, t, softcap=3.0)[0]
        sm = ops.softmax(x, causal=True)
    assert not ops.using_reference_ops()
    torch.testing.assert_close(got, ref.cross_entropy(x, t, softcap_value=3.0)[0], rtol=0, atol=0)
    torch.testing.assert_close(sm, ref.softmax(x, causal=True), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_unfused(device, reduction, with_bias):
    for dtype in dtypes_for(device):
        n, d, v = 37, 24, 101
        h = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(v, d, device=device, dtype=dtype) * 0.5).requires_grad_()
        b = torch.randn(v, device=device, dtype=dtype, requires_grad=True) if with_bias else None
        t = torch.randint(0, v, (n,), device=device)
        t[::6] = -100
        kw = dict(z_loss_coef=1e-3, softcap=20.0, label_smoothing=0.1, reduction=reduction)
        params = [h, w] + ([b] if with_bias else [])
        loss, z = ops.linear_cross_entropy(h, w, t, bias=b, chunk_size=8, **kw)
        grads = torch.autograd.grad(loss * 1.7, params)
        # The unfused path in the same dtype (the matmuls round alike in both).
        lu, zu = ops.cross_entropy(F.linear(h, w, b), t, **kw)
        gu = torch.autograd.grad(lu * 1.7, params)
        assert_close(loss.cpu(), lu.double().cpu(), name="loss")
        assert_close(z.cpu(), zu.double().cpu(), name="z_loss")
        for g, r in zip(grads, gu):
            assert g.dtype == dtype and g.shape == r.shape
            assert_close(g.cpu(), r.double().cpu(), grad=True, name="grad")


def test_linear_cross_entropy_gradcheck_and_shapes():
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (2, 5))
    f = lambda h, w, b: ops.linear_cross_entropy(h, w, t, bias=b, softcap=3.0, z_loss_coef=0.1,  # noqa: E731
                                                 chunk_size=3)[0]
    assert torch.autograd.gradcheck(f, (h, w, b))
    with pytest.raises(ValueError, match=r"expected weight \[vocab, 6\], got \(9, 5\)"):
        ops.linear_cross_entropy(h, w[:, :5], t)
    with pytest.raises(ValueError, match=r"expected target of shape \(2, 5\), got \(10,\)"):
        ops.linear_cross_entropy(h, w, t.view(-1))
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'batchmean'"):
        ops.linear_cross_entropy(h, w, t, reduction="batchmean")


def test_linear_cross_entropy_default_chunk():
    # On the CPU a cache-sized chunk (8 MiB of float32 logits, at least 256 rows), whatever the
    # token count; on a GPU as many logits as the hidden states hold values, in multiples of 128
    # rows, at least 256 rows and at most all of them.
    from archext.ops.stability import default_chunk_rows
    assert default_chunk_rows(8192) == 256 and default_chunk_rows(1024) == 2048
    assert default_chunk_rows(32768, rows=8192, d_model=4096, device="cpu") == 256
    gpu = lambda v, n, d: default_chunk_rows(v, rows=n, d_model=d, device="cuda")  # noqa: E731
    assert gpu(32768, 8192, 4096) == 1024   # logits chunk [1024, 32768] = hidden [8192, 4096]
    assert gpu(128256, 32768, 4096) == 1024  # 1046 rows, rounded down to 128s
    assert gpu(128256, 2048, 2048) == 256    # at least 256 rows
    assert gpu(32000, 100, 4096) == 100 and gpu(1000, 300, 4096) == 300  # at most all rows
    for v, n, d in ((32768, 8192, 4096), (128256, 32768, 4096), (151936, 65536, 3584)):
        c = gpu(v, n, d)
        assert c % 128 == 0 and c * v <= n * d and c >= 256


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_linear_cross_entropy_peak_memory():
    # Measured in a fresh process (peak RSS growth, beyond the returned gradients): chunks of
    # 1/64 of the tokens, as the default chunk is at 32k tokens x 128k vocab, must stay under
    # 1/8 of the full float32 logits; the unfused path needs about twice the logits.
    from archext.bench.loss import bench_linear_ce_memory
    mem = bench_linear_ce_memory(2048, 128, 32768, 32)
    fused, unfused = mem["fused"], mem["unfused"]
    assert fused["extra_bytes"] < fused["logits_bytes"] / 8, mem
    assert unfused["extra_bytes"] > fused["logits_bytes"], mem
