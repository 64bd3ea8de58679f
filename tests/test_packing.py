"""Packed sequences (cu_seqlens) through the stack: a packed batch gives the logits, loss and
gradients of its documents run one by one; RoPE and QK-norm + RoPE read positions from
cu_seqlens; every attention path keeps each document to itself; bad cu_seqlens get errors
naming it."""
import pytest
import torch

from archext import ops
from archext.models import build, preset
from archext.nn import ALiBi, Attention, RelativePositionBias, RotaryEmbedding
from archext.nn.positions import expand_relative_bias
from archext.ops import packing

TINY = dict(vocab_size=61, d_model=32, n_heads=4, n_layers=2, max_seq_len=64)
DOC_LENGTHS = [(5, 1, 7, 3), (9,), (1, 1, 2, 12)]


def docs_of(lengths, vocab=61):
    return [torch.randint(0, vocab, (n,)) for n in lengths]


# ---------------------------------------------------------------------------------------------
# cu_seqlens helpers and their checks
# ---------------------------------------------------------------------------------------------
def test_positions_and_segments():
    cu = torch.tensor([0, 3, 4, 8, 10, 16], dtype=torch.int32)  # two rows of 8
    pos = packing.positions(cu, 2, 8)
    seg = packing.segment_ids(cu, 2, 8)
    assert pos.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert seg.dtype == torch.int32
    assert seg.tolist() == [[0, 0, 0, 1, 2, 2, 2, 2], [3, 3, 4, 4, 4, 4, 4, 4]]
    back = packing.cu_seqlens_from_position_ids(pos)
    assert back.tolist() == cu.tolist()
    seg2 = packing.segments_from_position_ids(pos)
    assert (seg2[:, 1:] != seg2[:, :-1]).tolist() == (seg[:, 1:] != seg[:, :-1]).tolist()
    target = torch.arange(16).view(2, 8)
    assert packing.boundary_targets(target, seg).tolist() == [
        [0, 1, -100, -100, 4, 5, 6, 7], [8, -100, 10, 11, 12, 13, 14, 15]]  # a row end is the caller's


@pytest.mark.parametrize("cu, msg", [
    (torch.tensor([0, 3, 8], dtype=torch.float32), "cu_seqlens must be int32 or int64"),
    (torch.tensor([[0, 8]]), "cu_seqlens must be 1-D"),
    (torch.tensor([8]), "cu_seqlens must be 1-D with at least 2"),
    (torch.tensor([1, 3, 8]), "cu_seqlens must start at 0, got 1"),
    (torch.tensor([0, 5, 3, 8]), r"strictly increasing .* cu_seqlens\[2\] = 3 <= cu_seqlens\[1\] = 5"),
    (torch.tensor([0, 3, 3, 8]), "strictly increasing"),
    (torch.tensor([0, 3, 7]), "must end at the token count 1 x 8 = 8, got 7"),
])
def test_bad_cu_seqlens(cu, msg):
    x = torch.randn(1, 8, 2, 4)
    cos, sin = ops.rope_cache(4, 16)
    with pytest.raises((ValueError, TypeError), match=msg):
        ops.apply_rope(x, x, cos, sin, cu_seqlens=cu)
    model = build(preset("llama", **TINY))
    with pytest.raises((ValueError, TypeError), match=msg):
        model(torch.zeros(1, 8, dtype=torch.long), cu_seqlens=cu)


def test_cu_seqlens_errors_for_rows_device_and_mixing():
    with pytest.raises(ValueError, match="a document crosses from row 0 to row 1"):
        packing.check_cu_seqlens(torch.tensor([0, 5, 16]), 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens is on meta"):
        packing.check_cu_seqlens(torch.tensor([0, 8], device="meta"), 1, 8, "cpu")
    x = torch.randn(1, 8, 2, 4)
    cos, sin = ops.rope_cache(4, 16)
    with pytest.raises(ValueError, match="give cu_seqlens or position_ids"):
        ops.apply_rope(x, x, cos, sin, cu_seqlens=torch.tensor([0, 8]), position_ids=torch.arange(8))
    model = build(preset("llama", **TINY))
    with pytest.raises(ValueError, match="give cu_seqlens or position_ids"):
        model(torch.zeros(1, 8, dtype=torch.long), cu_seqlens=torch.tensor([0, 8]),
              position_ids=torch.arange(8))


# ---------------------------------------------------------------------------------------------
# Kernels: positions from cu_seqlens
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_and_qk_norm_rope_take_positions_from_cu_seqlens(interleaved):
    cu = torch.tensor([0, 3, 4, 11, 14, 20, 28])  # two rows of 14
    b, s, d = 2, 14, 16
    q, k = torch.randn(b, s, 4, d), torch.randn(b, s, 2, d)
    cos, sin = ops.rope_cache(d, 32)
    pos = packing.positions(cu, b, s)
    want = ops.apply_rope(q, k, cos, sin, position_ids=pos, interleaved=interleaved)
    got = ops.apply_rope(q, k, cos, sin, cu_seqlens=cu, interleaved=interleaved)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    wq, wk = torch.randn(d) + 1, torch.randn(d) + 1
    want = ops.qk_norm_rope(q, k, wq, wk, cos, sin, position_ids=pos, interleaved=interleaved)
    got = ops.qk_norm_rope(q, k, wq, wk, cos, sin, cu_seqlens=cu.to(torch.int32), interleaved=interleaved)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    rope = RotaryEmbedding(d, interleaved=interleaved, max_positions=32)
    for g, w in zip(rope(q, k, cu_seqlens=cu), ops.apply_rope(q, k, rope.cos, rope.sin, position_ids=pos,
                                                             interleaved=interleaved)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Attention: every path keeps each document to itself
# ---------------------------------------------------------------------------------------------
def test_relative_bias_vectors_expand_to_the_full_bias():
    for m in (ALiBi(6), RelativePositionBias(6)):
        for sq, sk in ((5, 5), (3, 9), (1, 1)):
            torch.testing.assert_close(expand_relative_bias(m.relative(sq, sk), sq, sk), m(sq, sk))


ATTN_CASES = {
    "plain": dict(),
    "window": dict(sliding_window=3),
    "softcap": dict(softcap=5.0),
    "gqa_window_softcap": dict(n_kv_heads=2, sliding_window=4, softcap=3.0),
    "qk_norm_rope": dict(qk_norm="head", rope=True),
}


@pytest.mark.parametrize("impl", ["materialized", "sdpa", "tiled", "auto"])
@pytest.mark.parametrize("case", list(ATTN_CASES))
@pytest.mark.parametrize("bias", [None, "alibi"])
def test_attention_packed_equals_documents_one_by_one(impl, case, bias):
    kw = dict(ATTN_CASES[case])
    if impl == "sdpa" and ("softcap" in kw or bias):
        pytest.skip("SDPA applies no soft-cap or bias (the auto path never sends those to it)")
    rope = RotaryEmbedding(8, max_positions=32) if kw.pop("rope", False) else None
    attn = Attention(32, 4, head_dim=8, rope=rope, impl=impl, **kw)
    x = torch.randn(2, 16, 32, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 13, 16, 25, 27, 32], dtype=torch.int32)  # rows: 5 1 7 3 | 9 2 5
    rel = ALiBi(4).relative(16, 16) if bias else None
    out = attn(x, cu_seqlens=cu, rel_bias=rel)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    gx, gw = x.grad.clone(), attn.q_proj.weight.grad.clone()
    x.grad = None
    attn.zero_grad()
    flat, gflat, pieces = x.reshape(-1, 32), g.reshape(-1, 32), []
    starts = cu.tolist()
    for s0, s1 in zip(starts[:-1], starts[1:]):
        n = s1 - s0
        r = None if rel is None else ALiBi(4).relative(n, n)
        o = attn(flat[s0:s1][None], rel_bias=r)[0]
        (o * gflat[s0:s1]).sum().backward()
        pieces.append(o)
    want = torch.cat(pieces).view(2, 16, 32)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, attn.q_proj.weight.grad, rtol=1e-4, atol=1e-5)


def test_attention_paths_agree_and_auto_never_materialises():
    """The same module on every path; auto's choice per call."""
    torch.manual_seed(0)
    attn = Attention(32, 4, n_kv_heads=2, softcap=20.0, sliding_window=6)
    x = torch.randn(2, 19, 32)
    seg = torch.tensor([[0] * 7 + [1] * 12, [0] * 19], dtype=torch.int32)
    rel = RelativePositionBias(4).relative(19, 19)
    outs = {}
    for impl in ("materialized", "tiled"):
        attn.impl = impl
        outs[impl] = attn(x, segment_ids=seg, position_ids=torch.arange(19), rel_bias=rel)
    torch.testing.assert_close(outs["tiled"], outs["materialized"], rtol=1e-5, atol=1e-5)
    attn.impl = "auto"
    q = torch.randn(2, 19, 4, 8)
    assert attn.path(q) == "tiled"
    assert attn.path(q, bias=torch.zeros(19, 19)) == "materialized"
    plain = Attention(32, 4)
    assert plain.path(q) == "sdpa" and plain.path(q, segment_ids=seg) == "tiled"
    # A training step on the CPU takes the tiled kernel even with no score modified (faster
    # there); no grad (or grad disabled) keeps SDPA.
    qg = q.clone().requires_grad_()
    assert plain.path(qg) == "tiled"
    with torch.no_grad():
        assert plain.path(qg) == "sdpa"
    assert Attention(32, 4, dropout=0.1).train().path(qg) == "sdpa"
    dropped = Attention(32, 4, softcap=5.0, dropout=0.1)
    assert dropped.eval().path(q) == "tiled"  # dropout is off in eval
    assert dropped.train().path(q) == "materialized"
    # A forced engine that cannot do what is asked says so instead of skipping it.
    forced = Attention(32, 4, softcap=5.0, dropout=0.1, impl="tiled").train()
    with pytest.raises(ValueError, match="impl='tiled' has no attention dropout"):
        forced(torch.randn(1, 5, 32))
    forced.eval()(torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="takes a relative bias"):
        forced(torch.randn(1, 5, 32), bias=torch.zeros(5, 5))


# ---------------------------------------------------------------------------------------------
# The builder's model
# ---------------------------------------------------------------------------------------------
MODEL_CASES = {
    "llama": ("llama", {}),
    "gemma2": ("gemma2", dict(sliding_window=4)),
    "qwen3": ("qwen3", {}),
    "gpt2_learned": ("gpt2", {}),
    "alibi": ("llama", dict(position="alibi")),
    "t5_bias": ("llama", dict(position="t5")),
    "sinusoidal": ("llama", dict(position="sinusoidal")),
    "mistral_gqa": ("mistral", dict(n_kv_heads=2, sliding_window=5)),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
@pytest.mark.parametrize("impl", ["auto", "materialized"])
def test_model_packed_batch_equals_documents_one_by_one(case, impl):
    name, kw = MODEL_CASES[case]
    torch.manual_seed(0)
    model = build(preset(name, **{**TINY, **kw, "attn_impl": impl}))
    rows = [docs_of(lengths) for lengths in ((5, 1, 7, 3), (4, 12))]
    ids = torch.stack([torch.cat(r) for r in rows])
    cu = torch.tensor([0, 5, 6, 13, 16, 20, 32], dtype=torch.int32)
    out = model(ids, ids, cu_seqlens=cu)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total, count, logits = 0.0, 0, []
    for doc in (d for r in rows for d in r):
        o = model(doc[None], doc[None])
        logits.append(o.logits[0])
        if len(doc) > 1:
            total = total + o.loss * (len(doc) - 1)
            count += len(doc) - 1
    (total / count).backward()
    torch.testing.assert_close(out.logits.reshape(-1, out.logits.shape[-1]), torch.cat(logits),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, total / count, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_model_packed_fused_head_and_compile_fullgraph():
    torch.manual_seed(0)
    model = build(preset("gemma2", **{**TINY, "sliding_window": 4, "n_layers": 1}))
    docs = docs_of((6, 1, 9))
    ids, cu = packing.pack_documents(docs, seq_len=20)
    want = model(ids, ids, cu_seqlens=cu)
    fused = model(ids, ids, cu_seqlens=cu, return_logits=False)
    torch.testing.assert_close(fused.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(ids, ids, cu_seqlens=cu)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    got.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_pack_documents():
    ids, cu = packing.pack_documents([[1, 2, 3], [4], [5, 6]], seq_len=8, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 0, 0]] and cu.tolist() == [0, 3, 4, 6, 8]
    with pytest.raises(ValueError, match="do not fit"):
        packing.pack_documents([[1, 2, 3]], seq_len=2)
    with pytest.raises(ValueError, match="empty document"):
        packing.pack_documents([[1], []])


def test_packed_sampler_rows():
    from archext.ablate.data import PackedSampler, document_starts

    text = b"one doc\n\nsecond one is longer\n\nx\n\n" * 20
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    starts = document_starts(data)
    assert starts[:4].tolist() == [0, 9, 31, 34]
    sampler = PackedSampler(data, batch_size=3, seq_len=16, seed=0)
    x, cu = sampler.next()
    assert x.shape == (3, 16) and cu.dtype == torch.int32
    packing.check_cu_seqlens(cu, 3, 16)  # rows end on boundaries, strictly increasing
    seg = packing.segment_ids(cu, 3, 16)
    flat = x.flatten()
    for d in seg.flatten().unique().tolist():  # each document is a piece of the text
        piece = bytes(flat[(seg.flatten() == d)].tolist())
        assert piece in text


def test_flex_path_matches_the_materialised_scores():
    """The FlexAttention path (what auto takes on CUDA): its score_mod (soft-cap, relative bias)
    and block mask (causal, window, documents) against the materialised path. Forward only and
    on the CPU here: this torch's CPU FlexAttention has no backward."""
    from archext.nn.attention import _flex_available

    if not _flex_available():
        pytest.skip("this torch has no FlexAttention")
    torch.manual_seed(0)
    attn = Attention(32, 4, n_kv_heads=2, softcap=20.0, sliding_window=6).eval()
    x = torch.randn(2, 19, 32)
    seg = torch.tensor([[0] * 7 + [1] * 12, [0] * 19], dtype=torch.int32)
    rel = ALiBi(4).relative(19, 19)
    with torch.no_grad():
        attn.impl = "materialized"
        want = attn(x, segment_ids=seg, position_ids=torch.arange(19), rel_bias=rel)
        attn.impl = "flex"
        got = attn(x, segment_ids=seg, position_ids=torch.arange(19), rel_bias=rel)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # Other documents and another length: the compiled mask is not a stale one.
        seg2 = torch.tensor([[0] * 3 + [1] * 20, [0] * 11 + [1] * 12], dtype=torch.int32)
        x2, rel2 = torch.randn(2, 23, 32), ALiBi(4).relative(23, 23)
        got = attn(x2, segment_ids=seg2, position_ids=torch.arange(23), rel_bias=rel2)
        attn.impl = "materialized"
        want = attn(x2, segment_ids=seg2, position_ids=torch.arange(23), rel_bias=rel2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("impl", ["flex", "tiled"])
def test_cuda_paths_packed_forward_and_backward(impl):
    """On a GPU: FlexAttention (auto's choice there) and archext's CUDA kernel against the
    materialised path, forward and backward, on a packed, soft-capped, windowed, ALiBi batch."""
    torch.manual_seed(0)
    attn = Attention(64, 4, n_kv_heads=2, softcap=20.0, sliding_window=40, device="cuda")
    x = torch.randn(2, 200, 64, device="cuda", requires_grad=True)
    cu = torch.tensor([0, 50, 51, 200, 330, 400], dtype=torch.int32, device="cuda")
    rel = ALiBi(4).to("cuda").relative(200, 200)
    outs = {}
    for path in ("materialized", impl):
        attn.impl = path
        x.grad = None
        o = attn(x, cu_seqlens=cu, rel_bias=rel)
        o.square().sum().backward()
        outs[path] = (o.detach(), x.grad.clone())
    torch.testing.assert_close(outs[impl][0], outs["materialized"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[impl][1], outs["materialized"][1], rtol=1e-3, atol=1e-3)
