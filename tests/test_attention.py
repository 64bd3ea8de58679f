"""Tiled attention (flash_attn_fwd / flash_attn_bwd, ops.flash_attention): outputs and the
gradients of q, k, v and rel_bias against the float64 materialised reference
(reference.attention), over dtypes, odd sizes, grouped-query heads, causal / window masks,
soft-cap, relative bias, packed documents, Sq != Sk, strided inputs, empty inputs; opcheck,
gradcheck, bitwise determinism across thread counts, and argument errors."""
import pytest
import torch
import torch.nn.functional as F

import archext
from archext import ops
from archext import reference as ref

from tolerance import GRAD_TOL, OUT_TOL, assert_within_2x_torch, max_err

DT_CPU = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
A = torch.ops.archext


def dtypes_for(device):
    return DT_CPU if device == "cpu" else DT_CPU[:3]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def close(actual, ref64, dtype, *, grad, name):
    """tolerance.py's rule, with the table of the inputs' dtype (a float32 rel_bias gradient of a
    bfloat16 attention carries the bfloat16 rounding of o through delta = rowsum(dO * o))."""
    rtol, atol = (GRAD_TOL if grad else OUT_TOL)[dtype]
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), ref64.cpu(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{name}: {m}")


def random_segments(b, s, device, *, max_docs=6):
    """Sorted document ids per row (packed sequences), with length-1 documents forced in."""
    seg = torch.sort(torch.randint(0, max_docs, (b, s)), dim=1).values
    if s >= 3:
        # A length-1 document in the middle and one at the end.
        seg[:, s // 2 + 1:] += 1
        seg[:, s // 2 + 2:] += 1
        seg[:, s - 1] += 1
    return seg.to(device=device, dtype=torch.int32)


def make_case(device, dtype, b, sq, sk, hq, hk, d, *, bias=False, segments=False, scale=1.0):
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64) * scale
               for n, h in ((sq, hq), (sk, hk), (sk, hk)))
    q, k, v = (t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
    rb = None
    if bias:
        rb = (torch.randn(hq, max(sq + sk - 1, 0), dtype=torch.float64)).to(device, acc(dtype))
        rb.requires_grad_()
    seg = random_segments(b, sk, device) if segments else None
    return q, k, v, rb, seg


def run_case(device, dtype, b, sq, sk, hq, hk, d, *, bias=False, segments=False, **kw):
    """Forward + backward of ops.flash_attention and of the float64 reference on the same
    (upcast) inputs; compares the output and every gradient."""
    q, k, v, rb, seg = make_case(device, dtype, b, sq, sk, hq, hk, d, bias=bias, segments=segments)
    o = ops.flash_attention(q, k, v, rel_bias=rb, segment_ids=seg, **kw)
    assert o.shape == (b, sq, hq, d) and o.dtype == dtype and o.is_contiguous()
    leaves = [q, k, v] + ([rb] if bias else [])
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    scale = kw.get("scale") or d ** -0.5
    r = ref.attention(l64[0], l64[1], l64[2], scale, kw.get("softcap"), kw.get("causal", True),
                      kw.get("window"), l64[3] if bias else None, seg)
    g = torch.randn_like(r)
    o.backward(g.to(dtype))
    r.backward(g)
    close(o, r, dtype, grad=False, name="o")
    for name, t, t64 in zip(("q", "k", "v", "rel_bias"), leaves, l64):
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
        close(t.grad, t64.grad, dtype, grad=True, name=f"grad {name}")
    return o, leaves


# (b, sq, sk, hq, hk, d, options)
CASES = [
    (1, 1, 1, 1, 1, 8, dict()),
    (2, 7, 7, 4, 2, 16, dict(causal=False)),
    (2, 7, 7, 4, 1, 5, dict(softcap=2.0, bias=True)),
    (1, 97, 97, 4, 2, 16, dict()),
    (2, 97, 97, 4, 1, 24, dict(causal=False, bias=True, segments=True)),
    (1, 97, 97, 2, 2, 32, dict(window=13, softcap=5.0, bias=True)),
    (1, 97, 97, 4, 2, 8, dict(window=40, causal=False, segments=True)),
    (2, 7, 97, 4, 2, 16, dict(bias=True, segments=True, softcap=3.0)),
    (1, 33, 97, 2, 1, 16, dict(window=20, causal=False)),
    (1, 97, 7, 2, 1, 16, dict()),                      # Sq > Sk: early rows see no key
    (1, 97, 7, 2, 1, 16, dict(causal=False, bias=True)),
    (1, 300, 300, 2, 1, 8, dict(window=70, softcap=30.0, bias=True, segments=True)),
    (1, 300, 300, 2, 2, 4, dict(causal=False)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_q{}_k{}_h{}x{}_d{}_{}".format(
    *c[:6], "_".join(f"{k}{v}" for k, v in c[6].items()) or "plain"))
def test_matches_reference(device, case):
    b, sq, sk, hq, hk, d, opts = case
    for dtype in dtypes_for(device):
        run_case(device, dtype, b, sq, sk, hq, hk, d, **opts)


def test_documents_skip_tiles_whatever_the_ids(device):
    # Documents of 50-200 tokens, so whole tile pairs share no document and are skipped: with
    # increasing ids (packing) and with ids in no order (a padding id -1 between documents,
    # ids repeating apart), against the reference; forward and every gradient.
    for ids in ([0] * 150 + [1] * 200 + [2] * 70 + [3] * 130,
                [7] * 130 + [-1] * 60 + [2] * 200 + [7] * 50 + [0] * 110):
        seg = torch.tensor([ids, ids[::-1]], dtype=torch.int32, device=device)
        s = seg.shape[1]
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v, _, _ = make_case(device, dtype, 2, s, s, 2, 1, 16)
            o = ops.flash_attention(q, k, v, segment_ids=seg, window=300)
            l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
            r = ref.attention(*l64, 16 ** -0.5, None, True, 300, None, seg)
            g = torch.randn_like(r)
            o.backward(g.to(dtype))
            r.backward(g)
            close(o, r, dtype, grad=False, name="o")
            for name, t, t64 in zip("qkv", (q, k, v), l64):
                close(t.grad, t64.grad, dtype, grad=True, name=f"grad {name}")


def test_every_cpu_isa(cpu_isa):
    for dtype in DT_CPU:
        run_case("cpu", dtype, 1, 70, 75, 4, 2, 19, bias=True, segments=True, softcap=4.0,
                 window=30)
        run_case("cpu", dtype, 1, 66, 66, 2, 1, 40, causal=False)


def logit_error_bound(q, k, v, scale, dtype):
    """A first-order bound on |o - o64| for non-causal attention computed in float32 from inputs
    in `dtype`. A dot product of length D in float32 errs by at most (D + 2) eps sum|q_d k_d| whatever
    its summation order (Higham's gamma_D, one more rounding for the scale), and a perturbation
    ds_ij of the logits moves o_i by sum_j p_ij ds_ij (v_j - o_i). Terms of order eps without a
    logit factor (exp, the running rescale, the P V sums) are bounded by max|v| times a small
    multiple of eps; a 16-bit output adds its own rounding."""
    q64, k64, v64 = (t.detach().double().transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    eps32 = torch.finfo(torch.float32).eps
    d = q64.shape[-1]
    s = scale * q64 @ k64.transpose(-1, -2)
    p = torch.softmax(s, dim=-1)
    o = p @ v64
    ds = (d + 2) * eps32 * scale * (q64.abs() @ k64.abs().transpose(-1, -2))
    # sum_j p_ij ds_ij |v_j - o_i|, per output element.
    spread = (v64.unsqueeze(2) - o.unsqueeze(3)).abs()                   # [B, H, Sq, Sk, D]
    first = torch.einsum("bhij,bhijd->bhid", p * ds, spread)
    vmax = v64.abs().amax(dim=(-1, -2), keepdim=True)
    bound = first + 16 * k64.shape[2] ** 0.5 * eps32 * vmax
    if dtype != torch.float32:   # half an ulp of the float32 result, rounded to `dtype`
        bound = bound + torch.finfo(dtype).eps / 2 * (o.abs() + bound)
    return bound.transpose(1, 2)                                         # [B, Sq, H, D]


def test_scale_and_large_logits(device):
    # Logits in the hundreds (exp overflows without the running max); an explicit scale. Such
    # logits are ill-conditioned (a float32 rounding of a logit of 300 moves p by 3e-5), so each
    # output element is held to a bound derived from the inputs' conditioning, not to another
    # implementation's luck with the same roundings.
    for dtype in dtypes_for(device):
        q, k, v, _, _ = make_case(device, dtype, 1, 80, 80, 2, 2, 16, scale=6.0)
        o = ops.flash_attention(q, k, v, scale=0.7, causal=False)
        r = ref.attention(q.double(), k.double(), v.double(), 0.7, causal=False)
        assert torch.isfinite(o).all()
        if dtype == torch.float64:
            close(o, r, dtype, grad=False, name="o")
            continue
        err = (o.detach().double() - r.detach()).abs().cpu()
        bound = logit_error_bound(q, k, v, 0.7, dtype).cpu()
        worst = (err / bound).max().item()
        assert worst <= 1.0, f"{dtype}: error {worst:.3g} x the conditioning bound"


def test_matches_sdpa(device):
    # PyTorch's own attention, float32: causal (Sq == Sk), and grouped heads without a mask.
    q, k, v = (torch.randn(2, 50, h, 16, device=device) for h in (4, 2, 2))
    expand = lambda t: t.repeat_interleave(2, dim=2).transpose(1, 2)  # noqa: E731
    want = F.scaled_dot_product_attention(q.transpose(1, 2), expand(k), expand(v), is_causal=True)
    got = ops.flash_attention(q, k, v)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-5)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), expand(k), expand(v), scale=0.3)
    got = ops.flash_attention(q, k, v, causal=False, scale=0.3)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_low_precision_within_2x_torch(device):
    # float16 / bfloat16: the output and gradients at most twice the error of the materialised
    # path run by PyTorch in that dtype (flash-attention's rule).
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v, rb, seg = make_case(device, dtype, 1, 130, 130, 4, 2, 32, bias=True)
        o = ops.flash_attention(q, k, v, softcap=20.0, rel_bias=rb, window=60)
        g = torch.randn_like(o)
        o.backward(g)
        qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
        ot = ref.attention(qt, kt, vt, 32 ** -0.5, 20.0, True, 60, rb.detach().to(dtype))
        ot.backward(g)
        q6, k6, v6 = (t.detach().double().requires_grad_() for t in (q, k, v))
        o6 = ref.attention(q6, k6, v6, 32 ** -0.5, 20.0, True, 60, rb.detach().double())
        o6.backward(g.double())
        assert_within_2x_torch(o, ot, o6, name=f"o {dtype}")
        for n, a, t, r in (("q", q, qt, q6), ("k", k, kt, k6), ("v", v, vt, v6)):
            assert_within_2x_torch(a.grad, t.grad, r.grad, name=f"grad {n} {dtype}")


def test_strided_inputs(device):
    # q, k, v as views of one packed qkv projection, and of a [B, H, S, D] layout: the same
    # results, bit for bit, as from contiguous copies.
    b, s, hq, hk, d = 2, 45, 4, 2, 16
    for dtype in dtypes_for(device):
        qkv = torch.randn(b, s, (hq + 2 * hk) * d, device=device, dtype=dtype, requires_grad=True)
        q = qkv[..., :hq * d].view(b, s, hq, d)
        k = qkv[..., hq * d:(hq + hk) * d].view(b, s, hk, d)
        v = qkv[..., (hq + hk) * d:].view(b, s, hk, d)
        vt = torch.randn(b, hk, s, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        o = ops.flash_attention(q, k, vt, softcap=10.0, window=17)
        g = torch.randn_like(o)
        o.backward(g)
        qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, vt))
        oc = ops.flash_attention(qc, kc, vc, softcap=10.0, window=17)
        oc.backward(g)
        assert torch.equal(o, oc)
        assert torch.equal(vt.grad, vc.grad)
        assert torch.equal(qkv.grad, torch.cat([qc.grad.flatten(2), kc.grad.flatten(2),
                                                torch.zeros_like(kc.grad.flatten(2))], -1))
        # A non-contiguous incoming gradient (expanded, stride 0 on D) is taken as well.
        q2 = qc.detach().requires_grad_()
        ops.flash_attention(q2, kc.detach(), vc.detach()).sum().backward()
        r = q2.detach().double().requires_grad_()
        ref.attention(r, kc.double(), vc.double(), d ** -0.5).sum().backward()
        close(q2.grad, r.grad, dtype, grad=True, name="grad q, expanded grad_o")


def test_fully_masked_rows(device):
    # Rows with no visible key (Sq > Sk under a causal mask: positions before the first key):
    # o = 0, lse = -inf, and no gradient reaches q, k or v through them.
    for dtype in dtypes_for(device):
        q, k, v, rb, _ = make_case(device, dtype, 2, 9, 4, 2, 1, 8, bias=True)
        o, lse = A.flash_attn_fwd(q, k, v, rb, None, 0.5, 0.0, True, -1)
        assert torch.all(o[:, :5] == 0) and torch.all(o[:, 5:] != 0)
        assert torch.all(lse[:, :, :5] == float("-inf")) and torch.isfinite(lse[:, :, 5:]).all()
        go = torch.zeros_like(o)
        go[:, :5] = 1.0  # gradient only on the masked rows
        dq, dk, dv, db = A.flash_attn_bwd(go, q, k, v, o, lse, rb, None, 0.5, 0.0, True, -1, True)
        for t in (dq, dk, dv, db):
            assert torch.all(t == 0)
        # Segment masks: a query whose key position's document has no visible key (window 1
        # and a different document at p) still sees itself; check the whole op instead.
        run_case(device, dtype, 1, 12, 12, 2, 1, 8, segments=True, window=2)


def test_nan_propagates_and_huge_window(device):
    # A NaN in q makes its row NaN (not a masked row of zeros); a window longer than the
    # sequences hides nothing.
    for dtype in dtypes_for(device):
        q, k, v, _, _ = make_case(device, dtype, 1, 40, 40, 2, 1, 16)
        q = q.detach().clone()
        q[0, 30, 1, 3] = float("nan")
        o = ops.flash_attention(q, k.detach(), v.detach(), causal=False)
        assert torch.isnan(o[0, 30, 1]).all()
        assert not torch.isnan(o[0, :30]).any() and not torch.isnan(o[0, 30, 0]).any()
        full = ops.flash_attention(q, k.detach(), v.detach(), causal=True)
        for w in (40, 80, 2 ** 62):
            got = ops.flash_attention(q, k.detach(), v.detach(), window=w)
            torch.testing.assert_close(got, full, equal_nan=True, rtol=0, atol=0)


def test_empty_inputs(device):
    for dtype in dtypes_for(device):
        for b, sq, sk in ((0, 5, 5), (2, 0, 5), (2, 5, 0), (1, 0, 0)):
            q, k, v, rb, _ = make_case(device, dtype, b, sq, sk, 2, 1, 8, bias=True)
            o, lse = A.flash_attn_fwd(q, k, v, rb, None, 0.5, 3.0, True, 4)
            assert o.shape == (b, sq, 2, 8) and lse.shape == (b, 2, sq)
            assert lse.dtype == acc(dtype)
            assert torch.all(o == 0) and torch.all(lse == float("-inf"))
            dq, dk, dv, db = A.flash_attn_bwd(torch.ones_like(o), q, k, v, o, lse, rb, None, 0.5,
                                              3.0, True, 4, True)
            assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
            assert db.shape == rb.shape and db.dtype == rb.dtype
            for t in (dq, dk, dv, db):
                assert torch.all(t == 0)
            out = ops.flash_attention(q, k, v, rel_bias=rb)
            out.sum().backward()
            assert q.grad.shape == q.shape and rb.grad.shape == rb.shape


def test_no_bias_gradient_when_not_asked(device):
    q, k, v, rb, _ = make_case(device, torch.float32, 1, 6, 6, 2, 2, 4, bias=True)
    o, lse = A.flash_attn_fwd(q, k, v, rb, None, 0.5, 0.0, True, -1)
    *_, db = A.flash_attn_bwd(torch.ones_like(o), q, k, v, o, lse, rb, None, 0.5, 0.0, True, -1,
                              False)
    assert db.shape == (0,)
    rb.requires_grad_(False)
    ops.flash_attention(q, k, v, rel_bias=rb).sum().backward()
    assert rb.grad is None and q.grad is not None


def test_gradcheck():
    for causal, window, cap, segments in ((True, None, 3.0, False), (False, 3, None, True),
                                          (True, 2, 1.5, True)):
        q, k, v, rb, seg = make_case("cpu", torch.float64, 2, 5, 6, 2, 1, 3, bias=True,
                                     segments=segments)
        f = lambda q, k, v, rb: ops.flash_attention(  # noqa: E731
            q, k, v, rel_bias=rb, segment_ids=seg, softcap=cap, causal=causal, window=window)
        assert torch.autograd.gradcheck(f, (q, k, v, rb))


def test_bitwise_across_threads():
    # Tasks write disjoint outputs and sum in a fixed order: 1 and 2 threads agree bit for bit.
    q, k, v, rb, seg = make_case("cpu", torch.float32, 2, 150, 150, 4, 2, 24, bias=True,
                                 segments=True)
    g = torch.randn(2, 150, 4, 24)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for t in (q, k, v, rb):
                t.grad = None
            o = ops.flash_attention(q, k, v, rel_bias=rb, segment_ids=seg, softcap=20.0, window=90)
            o.backward(g)
            outs.append([o.detach()] + [t.grad.clone() for t in (q, k, v, rb)])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fused_backward_same_bits_as_two_passes(dtype):
    # Without a bias gradient the backward runs in one pass over key tiles (grad_q summed per
    # (b, kv head)) when each thread gets at least two (b, kv head) tasks, else in two passes.
    # B * Hk = 2: one thread takes the fused pass, two threads the two passes; the results must
    # agree bit for bit (odd sizes, Sq != Sk both ways, windows, documents, soft-cap, GQA).
    cases = [(1, 150, 150, 4, 2, 24, dict(softcap=20.0, window=90), True),
             (2, 97, 97, 2, 1, 16, dict(), False),
             (1, 7, 97, 4, 2, 16, dict(softcap=3.0), True),
             (1, 97, 7, 2, 2, 16, dict(), False),
             (1, 300, 300, 4, 2, 8, dict(window=70, causal=False), False),
             (1, 33, 97, 2, 2, 16, dict(window=20, causal=False), True),
             (1, 260, 260, 2, 2, 64, dict(), False)]
    before = torch.get_num_threads()
    try:
        for b, sq, sk, hq, hk, d, kw, segments in cases:
            q, k, v, _, seg = make_case("cpu", dtype, b, sq, sk, hq, hk, d, segments=segments)
            g = torch.randn(b, sq, hq, d, dtype=torch.float64).to(dtype)
            grads = []
            for n in (1, 2):
                torch.set_num_threads(n)
                for t in (q, k, v):
                    t.grad = None
                ops.flash_attention(q, k, v, segment_ids=seg, **kw).backward(g)
                grads.append([t.grad.clone() for t in (q, k, v)])
            for name, x, y in zip("qkv", *grads):
                assert torch.equal(x, y), f"grad {name} differs: {(sq, sk, hq, hk, d, kw)}"
    finally:
        torch.set_num_threads(before)


def test_opcheck(device):
    n = 0
    for dt in (torch.float32, torch.bfloat16):
        q, k, v, rb, seg = make_case(device, dt, 2, 9, 11, 4, 2, 8, bias=True, segments=True)
        for args in ((q, k, v, rb, seg, 0.4, 5.0, True, 4), (q, k, v, None, None, 0.4, 0.0, False, -1)):
            torch.library.opcheck(A.flash_attn_fwd, args)
            o, lse = (t.detach() for t in A.flash_attn_fwd(*args))
            plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
            bwd = (torch.randn_like(o), *plain[:3], o, lse, *plain[3:])
            torch.library.opcheck(A.flash_attn_bwd, (*bwd, True))
            torch.library.opcheck(A.flash_attn_bwd, (*bwd, False))
            n += 3
    assert n == 12


def test_reference_mode_routes_to_the_reference():
    q, k, v, rb, seg = make_case("cpu", torch.float64, 1, 6, 6, 2, 1, 4, bias=True, segments=True)
    with ops.reference_ops():
        got = ops.flash_attention(q, k, v, rel_bias=rb, segment_ids=seg, softcap=2.0, window=3)
    want = ref.attention(q, k, v, 0.5, 2.0, True, 3, rb, seg)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("call, match", [
    (lambda d: ops.flash_attention(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                   segment_ids=torch.zeros(1, 4, dtype=torch.float32, device=d)),
     r"expected segment_ids of dtype Int \(int32\), got Float"),
    (lambda d: ops.flash_attention(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                   segment_ids=torch.zeros(1, 5, dtype=torch.int32, device=d)),
     r"expected segment_ids of shape \[1, 4\] \(\[batch, k_len\]\), got \[1, 5\]"),
    (lambda d: ops.flash_attention(_t(1, 6, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                   segment_ids=torch.zeros(1, 4, dtype=torch.int32, device=d)),
     r"segment_ids need q_len <= k_len"),
    (lambda d: ops.flash_attention(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                   rel_bias=_t(2, 8, device=d)),
     r"expected rel_bias of shape \[2, 7\] \(\[q_heads, q_len \+ k_len - 1\]\), got \[2, 8\]"),
    # The op itself (ops.flash_attention converts a bias of another layout or dtype).
    (lambda d: A.flash_attn_fwd(_t(1, 4, 2, 8, dtype=torch.bfloat16, device=d),
                                _t(1, 4, 2, 8, dtype=torch.bfloat16, device=d),
                                _t(1, 4, 2, 8, dtype=torch.bfloat16, device=d),
                                _t(2, 7, dtype=torch.bfloat16, device=d), None, 0.3, 0.0, True, -1),
     r"expected rel_bias of dtype Float \(for q of BFloat16\), got BFloat16"),
    (lambda d: A.flash_attn_fwd(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                _t(2, 7, 2, device=d)[..., 0], None, 0.3, 0.0, True, -1),
     r"expected a contiguous rel_bias"),
    (lambda d: ops.flash_attention(_t(1, 4, 3, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d)),
     r"expected the q heads \(3\) to be a multiple of the k/v heads \(2\)"),
    (lambda d: ops.flash_attention(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 4, device=d), _t(1, 4, 2, 4, device=d)),
     r"expected k with head_dim 8 \(the head_dim of q\), got k of shape \[1, 4, 2, 4\]"),
    (lambda d: ops.flash_attention(_t(2, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d)),
     r"expected k with batch 2 \(the batch of q\)"),
    (lambda d: ops.flash_attention(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 5, 2, 8, device=d)),
     r"expected v of shape \[1, 4, 2, 8\] \(the shape of k\), got \[1, 5, 2, 8\]"),
    (lambda d: ops.flash_attention(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                   _t(1, 4, 2, 8, dtype=torch.float16, device=d)),
     r"expected v of dtype Float \(the dtype of q\), got Half"),
    (lambda d: ops.flash_attention(_t(4, 2, 8, device=d), _t(4, 2, 8, device=d), _t(4, 2, 8, device=d)),
     r"expected q of shape \[batch, q_len, q_heads, head_dim\], got \[4, 2, 8\]"),
    (lambda d: ops.flash_attention(_t(1, 4, 2, 300, device=d), _t(1, 4, 2, 300, device=d), _t(1, 4, 2, 300, device=d)),
     r"expected head_dim between 1 and 256, got 300"),
    (lambda d: ops.flash_attention(_t(1, 4, 2, 8, dtype=torch.int32, device=d), _t(1, 4, 2, 8, device=d),
                                   _t(1, 4, 2, 8, device=d)),
     r"expected q to be float32, float16, bfloat16 .* got Int"),
    (lambda d: ops.flash_attention(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                   window=0),
     r"flash_attention: window must be >= 1 \(or None\), got 0"),
    (lambda d: ops.flash_attention(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                   softcap=-1.0),
     r"flash_attention: softcap must be > 0"),
    (lambda d: A.flash_attn_fwd(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                None, None, 1.0, -2.0, True, -1),
     r"flash_attn_fwd: expected softcap >= 0 \(0 = off\) and finite, got -2"),
    (lambda d: A.flash_attn_fwd(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                None, None, float("nan"), 0.0, True, -1),
     r"flash_attn_fwd: expected a finite scale, got nan"),
    (lambda d: A.flash_attn_fwd(_t(1, 4, 2, 16, device=d)[..., ::2], _t(1, 4, 2, 8, device=d),
                                _t(1, 4, 2, 8, device=d), None, None, 1.0, 0.0, True, -1),
     r"expected q with unit stride on head_dim"),
    (lambda d: A.flash_attn_bwd(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, device=d),
                                None, None, 1.0, 0.0, True, -1, False),
     r"flash_attn_bwd: expected lse of shape \[1, 2, 4\] \(\[batch, q_heads, q_len\]\), got \[1, 4, 2\]"),
    (lambda d: A.flash_attn_bwd(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                _t(1, 4, 2, 8, device=d), _t(1, 3, 2, 8, device=d), _t(1, 2, 4, device=d),
                                None, None, 1.0, 0.0, True, -1, False),
     r"flash_attn_bwd: expected o of shape \[1, 4, 2, 8\] \(the shape of q\), got \[1, 3, 2, 8\]"),
    (lambda d: A.flash_attn_bwd(_t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                _t(1, 4, 2, 8, device=d), _t(1, 4, 2, 8, device=d),
                                _t(1, 2, 4, dtype=torch.float16, device=d),
                                None, None, 1.0, 0.0, True, -1, False),
     r"flash_attn_bwd: expected lse of dtype Float, got Half"),
])
def test_bad_input(device, call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call(device)


@pytest.mark.skipif(not archext.cuda_available(), reason="needs the CUDA kernels and a GPU")
def test_device_mismatch():
    q = _t(1, 4, 2, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"expected k on cuda:0 \(the device of q\), got cpu"):
        ops.flash_attention(q, _t(1, 4, 2, 8), _t(1, 4, 2, 8))
    with pytest.raises(RuntimeError, match=r"expected segment_ids on cuda:0 \(the device of q\), got cpu"):
        ops.flash_attention(q, q, q, segment_ids=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"expected rel_bias on cuda:0 \(the device of q\), got cpu"):
        ops.flash_attention(q, q, q, rel_bias=_t(2, 7))
