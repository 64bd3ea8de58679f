"""RoPE (fused q/k rotation) and the other position schemes against float64 references."""
import math

import pytest
import torch

from archext import ops, reference as ref
from archext.nn import (ALiBi, LearnedPositionalEmbedding, RelativePositionBias, RotaryEmbedding,
                        SinusoidalPositionalEmbedding, alibi_slopes, sinusoidal_table,
                        t5_relative_bucket)

from tolerance import assert_close, assert_within_2x_torch

LOW = (torch.float16, torch.bfloat16)


def make_qk(b, s, hq, hk, d, dtype, device, layout="bshd", requires_grad=True):
    def mk(h):
        if layout == "bshd":
            t = torch.randn(b, s, h, d)
        else:  # [B, H, S, D] storage, viewed as [B, S, H, D]
            t = torch.randn(b, h, s, d).transpose(1, 2)
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return mk(hq), mk(hk)


def check_rope(b, s, hq, hk, d, frac, interleaved, dtype, device, layout="bshd", offset=0,
               position_ids=None):
    rot = int(d * frac)
    cos, sin = ops.rope_cache(rot, 4096, device=device)
    q, k = make_qk(b, s, hq, hk, d, dtype, device, layout)
    qo, ko = ops.apply_rope(q, k, cos, sin, offset=offset, position_ids=position_ids,
                            interleaved=interleaved)
    pos = ops.rope_positions(q, offset, position_ids)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    qr = ref.rope(q64, cos.double(), sin.double(), pos, interleaved)
    kr = ref.rope(k64, cos.double(), sin.double(), pos, interleaved)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    assert_close(qo, qr.detach(), name="q")
    assert_close(ko, kr.detach(), name="k")
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    dq64, dk64 = torch.autograd.grad((qr, kr), (q64, k64), (gq.double(), gk.double()))
    assert_close(dq, dq64, grad=True, name="grad_q")
    assert_close(dk, dk64, grad=True, name="grad_k")
    if dtype in LOW:  # PyTorch's own: the same composite in the low dtype
        qt = ref.rope(q.detach(), cos, sin, pos, interleaved)
        assert_within_2x_torch(qo, qt, qr.detach(), name="q")
    return qo, ko


def dtypes_for(device):
    return [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if device == "cpu" else [])


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("frac", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("d", [8, 64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_matches_reference(device, dtype, d, frac, interleaved):
    if dtype not in dtypes_for(device):
        pytest.skip("float64 kernels exist on the CPU only")
    if int(d * frac) % 2:
        pytest.skip("odd rotary dim")
    check_rope(2, 7, 4, 2, d, frac, interleaved, dtype, device)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_cpu_isa(cpu_isa, dtype, interleaved):
    for d, frac in [(64, 1.0), (80, 0.5), (128, 0.25), (40, 1.0)]:
        check_rope(2, 5, 3, 1, d, frac, interleaved, dtype, "cpu")


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_layouts_offsets_positions(device, interleaved):
    # [B, H, S, D] storage; an int offset; a per-batch offset (KV cache); explicit position ids.
    qo, _ = check_rope(3, 6, 4, 2, 64, 0.5, interleaved, torch.float32, device, layout="bhsd")
    assert qo.transpose(1, 2).is_contiguous()  # the output keeps the [B, H, S, D] layout
    check_rope(3, 6, 4, 2, 64, 1.0, interleaved, torch.float32, device, offset=17)
    check_rope(3, 6, 4, 2, 64, 1.0, interleaved, torch.float32, device,
               offset=torch.tensor([0, 5, 100], device=device))
    pid = torch.randint(0, 4096, (3, 6), device=device)
    check_rope(3, 6, 4, 2, 64, 1.0, interleaved, torch.float32, device, position_ids=pid)
    check_rope(3, 6, 4, 2, 64, 1.0, interleaved, torch.float32, device, position_ids=pid[0])


def test_non_contiguous_head_dim(device):
    # Unit stride on head_dim is not required: a strided view is copied first.
    cos, sin = ops.rope_cache(32, 64, device=device)
    base = torch.randn(2, 5, 3, 64, device=device)
    q = base[..., ::2]
    k = base[:, :, :1, 1::2]
    qo, ko = ops.apply_rope(q, k, cos, sin)
    qc, kc = ops.apply_rope(q.contiguous(), k.contiguous(), cos, sin)
    torch.testing.assert_close(qo, qc, rtol=0, atol=0)
    torch.testing.assert_close(ko, kc, rtol=0, atol=0)


def test_matches_hf_llama_and_gptj(device):
    """The Hugging Face Llama rotate_half formula and GPT-J's rotate_every_two, in float32,
    written as those libraries write them (angles from inv_freq = 1 / base^(arange(0, R, 2)/R))."""
    b, s, h, d, base = 2, 9, 4, 64, 10000.0
    q, k = make_qk(b, s, h, 2, d, torch.float32, device, requires_grad=False)
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float().to(device) / d))
    pos = torch.arange(s, device=device).float()
    freqs = torch.outer(pos, inv_freq)
    # Llama: emb = cat(freqs, freqs); q * cos + rotate_half(q) * sin, q as [B, H, S, D]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos_l, sin_l = emb.cos()[None, None], emb.sin()[None, None]
    rot_half = lambda x: torch.cat((-x[..., d // 2:], x[..., : d // 2]), dim=-1)  # noqa: E731
    q_hf = q.transpose(1, 2) * cos_l + rot_half(q.transpose(1, 2)) * sin_l
    cos, sin = ops.rope_cache(d, 64, base, device=device)
    qo, _ = ops.apply_rope(q, k, cos, sin)
    torch.testing.assert_close(qo.transpose(1, 2), q_hf, rtol=1e-5, atol=1e-5)
    # GPT-J: sincos duplicated per pair; rotate_every_two(x) = stack(-x[1::2], x[::2]).flatten
    sin_j = freqs.sin().repeat_interleave(2, -1)[None, :, None, :]
    cos_j = freqs.cos().repeat_interleave(2, -1)[None, :, None, :]
    rot2 = lambda x: torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)  # noqa: E731
    q_gptj = q * cos_j + rot2(q) * sin_j
    qo, _ = ops.apply_rope(q, k, cos, sin, interleaved=True)
    torch.testing.assert_close(qo, q_gptj, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_relative_position_property(device, interleaved):
    """<rope(q, i), rope(k, j)> depends only on i - j: RoPE encodes relative position."""
    d = 64
    cos, sin = ops.rope_cache(d, 4096, device=device)
    q, k = (torch.randn(1, 1, 1, d, device=device, dtype=torch.float64 if device == "cpu" else torch.float32)
            for _ in range(2))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        i, j, shift = (int(v) for v in torch.randint(0, 1500, (3,), generator=gen))
        def score(a, b):
            qa, _ = ops.apply_rope(q, k, cos, sin, offset=a, interleaved=interleaved)
            _, kb = ops.apply_rope(q, k, cos, sin, offset=b, interleaved=interleaved)
            return (qa * kb).sum().item()
        s1, s2 = score(i, j), score(i + shift, j + shift)
        assert math.isclose(s1, s2, rel_tol=1e-4, abs_tol=1e-4), (i, j, shift, s1, s2)


def test_in_place_matches(device):
    cos, sin = ops.rope_cache(48, 128, device=device)
    for interleaved in (False, True):
        q, k = make_qk(2, 5, 4, 2, 64, torch.bfloat16, device, layout="bhsd", requires_grad=False)
        want = ops.apply_rope(q, k, cos, sin, offset=3, interleaved=interleaved)
        ops.apply_rope_(q, k, cos, sin, offset=3, interleaved=interleaved)
        torch.testing.assert_close(q, want[0], rtol=0, atol=0)
        torch.testing.assert_close(k, want[1], rtol=0, atol=0)


def test_empty(device):
    cos, sin = ops.rope_cache(16, 32, device=device)
    for shape_q, shape_k in [((0, 4, 2, 16), (0, 4, 1, 16)), ((2, 0, 2, 16), (2, 0, 1, 16)),
                             ((2, 3, 0, 16), (2, 3, 1, 16))]:
        q = torch.randn(shape_q, device=device, requires_grad=True)
        k = torch.randn(shape_k, device=device, requires_grad=True)
        qo, ko = ops.apply_rope(q, k, cos, sin)
        assert qo.shape == shape_q and ko.shape == shape_k
        (qo.sum() + ko.sum()).backward()
        assert q.grad.shape == shape_q
    # An empty q beside a k with pass-through dims (partial rotary): k's outputs are whole, in
    # the forward and in the backward (the inverse rotation).
    cos, sin = ops.rope_cache(8, 32, device=device)
    q = torch.randn(2, 3, 0, 16, device=device)
    k = torch.randn(2, 3, 1, 16, device=device)
    pos = torch.arange(3, device=device)
    for op, sign in ((torch.ops.archext.rope_fwd, 1.0), (torch.ops.archext.rope_bwd, -1.0)):
        qo, ko = op(q, k, cos, sin, pos, False)
        want = ref.rope(k.double(), cos.double(), sign * sin.double(), pos)
        assert qo.shape == q.shape
        assert_close(ko.cpu(), want.cpu())


def test_gradcheck():
    cos, sin = ops.rope_cache(6, 16)
    for interleaved in (False, True):
        q = torch.randn(2, 3, 2, 10, dtype=torch.float64, requires_grad=True)
        k = torch.randn(2, 3, 1, 10, dtype=torch.float64, requires_grad=True)
        f = lambda a, b: ops.apply_rope(a, b, cos, sin, offset=2, interleaved=interleaved)  # noqa: E731
        assert torch.autograd.gradcheck(f, (q, k))


def test_opcheck(device):
    cos, sin = ops.rope_cache(32, 64, device=device)
    n = 0
    for dtype in (torch.float32, torch.bfloat16):
        for interleaved in (False, True):
            q, k = make_qk(2, 5, 4, 2, 64, dtype, device)
            pos = torch.arange(5, device=device) + 1
            pos2 = torch.randint(0, 64, (2, 5), device=device)
            torch.library.opcheck(torch.ops.archext.rope_fwd, (q, k, cos, sin, pos, interleaved))
            torch.library.opcheck(torch.ops.archext.rope_fwd, (q, k, cos, sin, pos2, interleaved))
            g1, g2 = q.detach().clone(), k.detach().clone()
            torch.library.opcheck(torch.ops.archext.rope_bwd, (g1, g2, cos, sin, pos, interleaved))
            torch.library.opcheck(torch.ops.archext.rope_fwd_, (g1, g2, cos, sin, pos, interleaved))
            n += 4
    assert n == 16


def test_compile_fullgraph(device):
    rope = RotaryEmbedding(64, rotary_fraction=0.5, layout="bhsd").to(device)
    q = torch.randn(2, 4, 7, 64, device=device, requires_grad=True)
    k = torch.randn(2, 2, 7, 64, device=device, requires_grad=True)

    def f(q, k):
        qo, ko = rope(q, k, offset=3)
        return qo * 2, ko  # the same kernel eager and compiled: outputs compare exactly

    gq, gk = torch.randn_like(q), torch.randn_like(k)
    eager = f(q, k)
    ge = torch.autograd.grad(eager, (q, k), (gq, gk))
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(q, k)
    gc = torch.autograd.grad(out, (q, k), (gq, gk))
    for a, b in zip(out + gc, eager + ge):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rotary_module_options():
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        RotaryEmbedding(64, rotary_dim=31)
    with pytest.raises(ValueError, match="not both"):
        RotaryEmbedding(64, rotary_dim=32, rotary_fraction=0.5)
    m = RotaryEmbedding(64, max_positions=8)
    q = torch.randn(1, 6, 2, 64)
    with pytest.raises(ValueError, match="exceed max_positions=8"):
        m(q, q, offset=4)
    assert m.state_dict() == {}


def test_bad_input(device):
    cos, sin = ops.rope_cache(16, 32, device=device)
    q = torch.randn(2, 3, 4, 32, device=device)
    k = torch.randn(2, 3, 2, 32, device=device)
    pos = torch.arange(3, device=device)
    R = torch.ops.archext.rope_fwd
    with pytest.raises(RuntimeError, match=r"expected q of shape \[batch, seq, heads, head_dim\], got \[2, 3, 128\]"):
        R(q.flatten(2), k, cos, sin, pos, False)
    with pytest.raises(RuntimeError, match=r"expected k of shape \[2, 3, heads, 32\] .* got \[2, 3, 2, 16\]"):
        R(q, k[..., :16], cos, sin, pos, False)
    with pytest.raises(RuntimeError, match=r"expected k of dtype Float \(the dtype of q\), got BFloat16"):
        R(q, k.bfloat16(), cos, sin, pos, False)
    with pytest.raises(RuntimeError, match=r"expected cos to be a float32 \[positions, rotary_dim / 2\] table, got Half"):
        R(q, k, cos.half(), sin, pos, False)
    with pytest.raises(RuntimeError, match=r"rotary_dim = 2 \* cos.size\(1\) between 2 and head_dim = 32, got 34"):
        c2, s2 = ops.rope_cache(34, 8, device=device)
        R(q, k, c2, s2, pos, False)
    with pytest.raises(RuntimeError, match=r"expected positions of dtype Long, got Int"):
        R(q, k, cos, sin, pos.int(), False)
    with pytest.raises(RuntimeError, match=r"expected positions of shape \[3\] or \[2, 3\], got \[4\]"):
        R(q, k, cos, sin, torch.arange(4, device=device), False)
    with pytest.raises(RuntimeError, match=r"expected q to be float32, float16, bfloat16 .* got Long"):
        R(q.long(), k.long(), cos, sin, pos, False)
    with pytest.raises(RuntimeError, match=r"in place needs q and k with unit stride"):
        torch.ops.archext.rope_fwd_(q[..., ::2], k[..., ::2], cos[:, :8], sin[:, :8], pos, False)


def test_in_place_refuses_overlapping_memory(device):
    # As PyTorch's in-place ops: a written tensor whose elements share memory, or q and k that
    # share memory in part, is an error, not a race (two rows rotating one location).
    cos, sin = ops.rope_cache(32, 8, device=device)
    pos = torch.arange(3, device=device)
    I = torch.ops.archext.rope_fwd_  # noqa: E741
    k = torch.randn(2, 3, 2, 32, device=device)
    q_expanded = torch.randn(1, 3, 4, 32, device=device).expand(2, 3, 4, 32)
    with pytest.raises(RuntimeError, match=r"rope_fwd_: q is written but has elements that share memory"):
        I(q_expanded, k, cos, sin, pos, False)
    with pytest.raises(RuntimeError, match=r"rope_fwd_: k is written but has elements that share memory"):
        I(torch.randn(2, 3, 4, 32, device=device), torch.randn(2, 3, 1, 32, device=device).expand(2, 3, 2, 32),
          cos, sin, pos, False)
    buf = torch.randn(2 * 3 * 4 * 32 + 32, device=device)
    q, k_over = buf[:768].view(2, 3, 4, 32), buf[32:32 + 384].view(2, 3, 2, 32)  # k inside q
    with pytest.raises(RuntimeError, match=r"rope_fwd_: q and k share memory in part"):
        I(q, k_over, cos, sin, pos, False)
    # Views of one fused qkv projection that do not overlap are fine: the same result as copies.
    qkv = torch.randn(2, 3, 8, 32, device=device)
    qv, kv = qkv[:, :, :4], qkv[:, :, 4:6]
    want_q, want_k = ops.apply_rope(qv.clone(), kv.clone(), cos, sin)
    I(qv, kv, cos, sin, pos, False)
    assert torch.equal(qv, want_q) and torch.equal(kv, want_k)


def test_position_out_of_cache_cpu():
    cos, sin = ops.rope_cache(16, 8)
    q = torch.randn(1, 3, 1, 16)
    with pytest.raises(RuntimeError, match=r"position 9 at index 2 is outside the cos/sin cache of 8 positions"):
        torch.ops.archext.rope_fwd(q, q, cos, sin, torch.tensor([0, 1, 9]), False)
    with pytest.raises(RuntimeError, match=r"position -1"):
        torch.ops.archext.rope_fwd(q, q, cos, sin, torch.tensor([0, -1, 2]), False)


# ---------------------------------------------------------------------------------------------
# The other position schemes
# ---------------------------------------------------------------------------------------------
def test_sinusoidal_matches_formula():
    d, n = 16, 50
    pe = sinusoidal_table(n, d)
    for p in (0, 1, 7, 49):
        for i in range(d // 2):
            w = 1.0 / 10000 ** (2 * i / d)
            assert math.isclose(pe[p, 2 * i].item(), math.sin(p * w), abs_tol=1e-12)
            assert math.isclose(pe[p, 2 * i + 1].item(), math.cos(p * w), abs_tol=1e-12)
    m = SinusoidalPositionalEmbedding(d, max_positions=n)
    x = torch.randn(2, 5, d)
    torch.testing.assert_close(m(x, offset=3), x + pe[3:8].float())


def test_learned_with_offset():
    m = LearnedPositionalEmbedding(10, 8, offset=2)  # OPT's +2
    assert m.weight.shape == (12, 8)
    x = torch.zeros(1, 3, 8)
    torch.testing.assert_close(m(x, start=4), m.weight[6:9][None])


def test_alibi():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s12 = alibi_slopes(12)  # 8 from the power of two, then every other of the 16-head slopes
    assert s12.shape == (12,)
    torch.testing.assert_close(s12[8:], torch.tensor([2.0 ** -(0.5 * (2 * i + 1)) for i in range(4)]))
    bias = ALiBi(4)(3, 5)  # queries at positions 2, 3, 4 of 5
    assert bias.shape == (4, 3, 5)
    torch.testing.assert_close(bias[0, 2], -0.25 * torch.tensor([4.0, 3, 2, 1, 0]))  # slope 2^-2


def _t5_bucket_ref(rel, bidirectional, num_buckets, max_distance):
    # T5's _relative_position_bucket, one scalar at a time; rel = key - query.
    ret, n = 0, -rel
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0) * num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_t5_buckets_match_scalar_reference(bidirectional):
    rel = torch.arange(-300, 301)
    got = t5_relative_bucket(rel, bidirectional, 32, 128)
    want = torch.tensor([_t5_bucket_ref(int(r), bidirectional, 32, 128) for r in rel])
    torch.testing.assert_close(got, want)
    m = RelativePositionBias(4, bidirectional=bidirectional)
    assert m(3, 7).shape == (4, 3, 7)
