"""Property-based fuzzing of every op against its float64 reference (archext/reference.py).

Hypothesis draws the shapes (0- and 1-sized dims included), the dtype, the memory layout of
every input (transposed, strided, sliced, offset views) and every option of the op, and the CPU
ISA the kernels run at; the values come from a torch generator seeded by a drawn integer, so a
failure replays from hypothesis' report. Forward and backward are checked with the tolerances of
tests/tolerance.py. Every property runs on each device of the test run (the CPU, and CUDA where
a GPU is visible: the same draws, float64 left out there, the references computed on the device).

Budget: ARCHEXT_FUZZ_EXAMPLES examples per property (default 100, the CI budget: ~2 s; e.g. 20000 for a
long local run). The search is seeded with ARCHEXT_TEST_SEED (printed in the pytest header and
summary) and keeps no example database, so a run is reproducible. The number of cases that ran
is printed in the terminal summary (tests/conftest.py).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from archext import _C, ops
from archext import reference as ref

from conftest import FUZZ_CASES, ISAS, SEED
from tolerance import GRAD_TOL, assert_close, norm_slack

EXAMPLES = int(os.environ.get("ARCHEXT_FUZZ_EXAMPLES", "100"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DEV = "cpu"  # the device of the property running now (begin); the helpers below put tensors there

fuzz_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


def fuzz(fn):
    """A hypothesis property over st.data(), seeded from ARCHEXT_TEST_SEED."""
    return seed(SEED)(fuzz_settings(given(data=st.data())(fn)))


# ---------------------------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------------------------
def dims(draw, n_min=0, n_max=3, size_max=5):
    """A list of leading dims, each 0 to size_max (0 and 1 are drawn often)."""
    n = draw(st.integers(n_min, n_max))
    return [draw(st.sampled_from([0, 1, 1, 2, 3, size_max])) for _ in range(n)]


WIDTHS = st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 64,
                                                        100, 255, 256, 257, 769, 1024, 2049]))

LAYOUTS = ["contiguous", "transposed", "stride2", "row_padded", "offset"]


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor with t's values in the given memory layout (a leaf, so it can take .grad)."""
    t = t.detach()
    if t.dim() == 0 or layout == "contiguous":
        return t.clone()
    if layout == "transposed":
        if t.dim() < 2:
            return t.clone()
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "stride2":  # every other element of a wider last dim
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        buf[..., 1::2] = t
        return buf[..., 1::2]
    if layout == "row_padded":  # contiguous rows at a larger row stride
        buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype, device=t.device)
        buf[..., :t.shape[-1]] = t
        return buf[..., :t.shape[-1]]
    if layout == "offset":  # a storage offset
        flat = torch.zeros(t.numel() + 5, dtype=t.dtype, device=t.device)
        flat[5:] = t.reshape(-1)
        return flat[5:].view(t.shape)
    raise ValueError(layout)


def draw_layout(draw):
    return draw(st.sampled_from(LAYOUTS))


def draw_gen(draw) -> torch.Generator:
    """The generator of a case's random values, seeded by hypothesis (so a failure replays)."""
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


def randn(gen, shape, scale=1.0, shift=0.0):
    """float64 normal values on DEV, drawn on the CPU (the same values on every device)."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(DEV)


def leaf(t64: torch.Tensor, dtype, layout="contiguous") -> torch.Tensor:
    return as_layout(t64.to(dtype), layout).requires_grad_()


def up64(t: torch.Tensor) -> torch.Tensor:
    """The float64 copy of an input, holding exactly the values the kernel sees."""
    return t.detach().double().requires_grad_()


def grads(outs, ins, gouts):
    outs, gouts = list(outs), list(gouts)
    return torch.autograd.grad(outs, list(ins), gouts, allow_unused=True)


def set_isa(draw):
    isa = draw(st.sampled_from(ISAS))
    _C.set_cpu_isa(isa)
    return isa


def begin(draw, device):
    """Starts a case on `device`: draws the CPU ISA; returns the dtypes the device's kernels take."""
    global DEV
    DEV = device
    set_isa(draw)
    return DTYPES if device == "cpu" else DTYPES[:3]


@pytest.fixture(autouse=True)
def _restore_isa():
    before = _C.cpu_isa()
    yield
    _C.set_cpu_isa(before)


def count(name):
    FUZZ_CASES[name if DEV == "cpu" else f"{name} ({DEV})"] += 1


# ---------------------------------------------------------------------------------------------
# Norms: rms_norm, add_rms_norm, layer_norm, add_layer_norm (forward + backward)
# ---------------------------------------------------------------------------------------------
@fuzz
def test_fuzz_norm(device, data):
    draw = data.draw
    dtypes = begin(draw, device)
    kind = draw(st.sampled_from(["rms", "ln"]))
    add = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    shape = dims(draw) + [draw(WIDTHS)]
    n = shape[-1]
    with_w = draw(st.booleans())
    with_b = kind == "ln" and draw(st.booleans())
    offset = draw(st.sampled_from([0.0, 1.0, 0.5])) if kind == "rms" else 0.0
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    gen = draw_gen(draw)
    scale = draw(st.sampled_from([1.0, 3.0, 100.0]))

    inp = {"x": leaf(randn(gen, shape, scale, 0.5 * scale), dtype, draw_layout(draw))}
    if add:
        inp["residual"] = leaf(randn(gen, shape, scale), dtype, draw_layout(draw))
    if with_w:
        inp["weight"] = leaf(randn(gen, [n], 0.5, 0.0 if offset else 1.0), dtype,
                             draw(st.sampled_from(["contiguous", "stride2", "offset"])))
    if with_b:
        inp["bias"] = leaf(randn(gen, [n], 0.2), dtype, "contiguous")
    inp64 = {k: up64(v) for k, v in inp.items()}

    def run(impl, d):
        x, w, b = d["x"], d.get("weight"), d.get("bias")
        if kind == "rms":
            if add:
                return list(impl.add_rms_norm(x, d["residual"], w, eps, offset))
            return [impl.rms_norm(x, w, eps, offset)]
        if add:
            return list(impl.add_layer_norm(x, d["residual"], w, b, eps))
        return [impl.layer_norm(x, w, b, eps)]

    outs, outs64 = run(ops, inp), run(ref, inp64)
    if add:
        # y is the norm of h as the op returns it, rounded to the dtype (as PyTorch's unfused
        # add then norm): the reference normalises that h, with the gradient of the exact sum
        # (straight through the rounding). A row of nearly equal values is ill-conditioned: the
        # norm of the exact sum can be far from that of the rounded one.
        assert torch.equal(outs[1], inp["x"] + inp["residual"])
        h64 = outs64[1]
        h_st = h64 + (outs[1].detach().double() - h64).detach()
        b64 = inp64.get("bias")
        outs64[0] = (ref.rms_norm(h_st, inp64.get("weight"), eps, offset) if kind == "rms"
                     else ref.layer_norm(h_st, inp64.get("weight"), b64, eps))
    # The incoming gradients, rounded to the dtype; the reference gets the same values.
    gouts = [randn(gen, o.shape).to(dtype) for o in outs]
    # What the inputs' conditioning lets a float32 kernel get wrong (a LayerNorm row of nearly
    # equal values), element by element: tolerance.norm_slack.
    w64 = inp64.get("weight")
    w_eff = None if w64 is None else (w64 + offset if kind == "rms" else w64)
    slack = norm_slack(kind, outs[1].double() if add else inp64["x"], w_eff,
                       gouts[0].double(), eps, dtype)
    for name, o, o64 in zip(["y", "h"], outs, outs64):
        assert o.dtype == dtype and o.shape == o64.shape
        assert_close(o, o64.detach(), name=f"{kind} {name}",
                     slack=slack["y"] if name == "y" else None)
    g = grads(outs, inp.values(), gouts)
    g64 = grads(outs64, inp64.values(), [t.double() for t in gouts])
    for k, a, b in zip(inp, g, g64):
        assert a is not None and a.dtype == dtype and a.shape == inp[k].shape, k
        assert_close(a, b, grad=True, name=f"{kind} grad_{k}",
                     slack={"x": slack["x"], "residual": slack["x"], "weight": slack["w"]}.get(k))
    count("norm")


# ---------------------------------------------------------------------------------------------
# Activations: glu, glu_packed, act (with the aliases)
# ---------------------------------------------------------------------------------------------
ACT_NAMES = ["relu", "gelu", "gelu_tanh", "silu", "swish", "gelu_new", "gelu_pytorch_tanh"]


@fuzz
def test_fuzz_activation(device, data):
    draw = data.draw
    dtypes = begin(draw, device)
    kind = draw(st.sampled_from(["glu", "packed", "act"]))
    name = draw(st.sampled_from(ACT_NAMES))
    canon = ops.canonical_activation(name)
    dtype = draw(st.sampled_from(dtypes))
    gen = draw_gen(draw)
    scale = draw(st.sampled_from([1.0, 3.0, 20.0]))
    if kind == "act" and draw(st.booleans()):
        shape = dims(draw, 0, 3)  # any shape, 0-dim included
    else:
        shape = dims(draw) + [draw(WIDTHS)]
    if kind == "glu":
        inp = {"gate": leaf(randn(gen, shape, scale), dtype, draw_layout(draw)),
               "up": leaf(randn(gen, shape, scale), dtype, draw_layout(draw))}
        run = lambda impl, d: impl.glu(d["gate"], d["up"], canon)  # noqa: E731
    elif kind == "packed":
        gate_first = draw(st.booleans())
        shape = shape[:-1] + [2 * shape[-1]]
        inp = {"x": leaf(randn(gen, shape, scale), dtype, draw_layout(draw))}
        run = lambda impl, d: impl.glu_packed(d["x"], canon, gate_first)  # noqa: E731
    else:
        inp = {"x": leaf(randn(gen, shape, scale), dtype, draw_layout(draw))}
        run = lambda impl, d: impl.act(d["x"], canon)  # noqa: E731
    inp64 = {k: up64(v) for k, v in inp.items()}
    y, y64 = run(ops, inp), run(ref, inp64)
    assert y.dtype == dtype and y.shape == y64.shape
    assert_close(y, y64.detach(), name=f"{kind} {name} y")
    gy = randn(gen, y.shape).to(dtype)
    g = grads([y], inp.values(), [gy])
    g64 = grads([y64], inp64.values(), [gy.double()])
    for k, a, b in zip(inp, g, g64):
        assert a.shape == inp[k].shape
        assert_close(a, b, grad=True, name=f"{kind} {name} grad_{k}")
    count("activation")


# ---------------------------------------------------------------------------------------------
# RoPE: interleaved or not, partial rotary, offsets (int, per batch), position ids, GQA,
# [B, S, H, D] and [B, H, S, D] storage; out of place (forward + backward) and in place.
# ---------------------------------------------------------------------------------------------
def draw_positions(draw, gen, b, s, max_pos):
    """(offset, position_ids) for rope_positions, every position < max_pos."""
    how = draw(st.sampled_from(["none", "int", "per_batch", "ids_1d", "ids_2d"]))
    if how == "int":
        return draw(st.integers(0, max_pos - s)), None
    if how == "per_batch":
        return torch.randint(0, max_pos - s + 1, (b,), generator=gen).to(DEV), None
    if how == "ids_1d":
        return 0, torch.randint(0, max_pos, (s,), generator=gen).to(DEV)
    if how == "ids_2d":
        return 0, torch.randint(0, max_pos, (b, s), generator=gen).to(DEV)
    return 0, None


def qk_layout(t64, dtype, layout):
    """[B, S, H, D] values stored as given: bshd, bhsd (a transposed view), or strided."""
    if layout == "bhsd":
        t = t64.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "stride2":
        t = as_layout(t64.to(dtype), "stride2")
    elif layout == "head_slice":  # heads of a wider tensor
        buf = torch.zeros(*t64.shape[:2], t64.shape[2] + 1, t64.shape[3], dtype=dtype, device=t64.device)
        buf[:, :, 1:] = t64.to(dtype)
        t = buf[:, :, 1:]
    else:
        t = t64.to(dtype)
    return t.detach().requires_grad_()


QK_LAYOUTS = ["bshd", "bhsd", "stride2", "head_slice"]


@fuzz
def test_fuzz_rope(device, data):
    draw = data.draw
    dtypes = begin(draw, device)
    dtype = draw(st.sampled_from(dtypes))
    b, s = draw(st.sampled_from([0, 1, 2, 3])), draw(st.sampled_from([0, 1, 2, 5, 9]))
    hk = draw(st.sampled_from([0, 1, 2]))
    hq = hk * draw(st.sampled_from([1, 2, 3])) if hk else draw(st.sampled_from([0, 1, 4]))
    d = draw(st.sampled_from([2, 4, 6, 8, 16, 18, 32, 64, 80, 128]))
    rot = 2 * draw(st.integers(1, d // 2))
    interleaved = draw(st.booleans())
    gen = draw_gen(draw)
    max_pos = draw(st.sampled_from([16, 64, 4096]))
    cos, sin = ops.rope_cache(rot, max_pos, theta=draw(st.sampled_from([10000.0, 1e6, 10.0])),
                              device=DEV)
    offset, pids = draw_positions(draw, gen, b, s, max_pos)
    q = qk_layout(randn(gen, [b, s, hq, d]), dtype, draw(st.sampled_from(QK_LAYOUTS)))
    k = qk_layout(randn(gen, [b, s, hk, d]), dtype, draw(st.sampled_from(QK_LAYOUTS)))
    qo, ko = ops.apply_rope(q, k, cos, sin, offset=offset, position_ids=pids,
                            interleaved=interleaved)
    pos = ops.rope_positions(q, offset, pids)
    q64, k64 = up64(q), up64(k)
    qr = ref.rope(q64, cos.double(), sin.double(), pos, interleaved)
    kr = ref.rope(k64, cos.double(), sin.double(), pos, interleaved)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    assert_close(qo, qr.detach(), name="q")
    assert_close(ko, kr.detach(), name="k")
    gq, gk = randn(gen, qo.shape).to(dtype), randn(gen, ko.shape).to(dtype)
    dq, dk = grads([qo, ko], [q, k], [gq, gk])
    dq64, dk64 = grads([qr, kr], [q64, k64], [gq.double(), gk.double()])
    assert_close(dq, dq64, grad=True, name="grad_q")
    assert_close(dk, dk64, grad=True, name="grad_k")
    # In place on unit-stride views: bitwise what the out-of-place op gives.
    if q.stride(3) == 1 and k.stride(3) == 1:
        qi, ki = q.detach().clone(), k.detach().clone()
        ops.apply_rope_(qi, ki, cos, sin, offset=offset, position_ids=pids, interleaved=interleaved)
        assert torch.equal(qi, qo.detach()) and torch.equal(ki, ko.detach())
    count("rope")


# ---------------------------------------------------------------------------------------------
# Cross-entropy (ignore_index, smoothing, z-loss, soft-cap, reductions) and linear CE
# ---------------------------------------------------------------------------------------------
CE_LAYOUTS = ["contiguous", "row_padded", "transposed", "offset"]


@fuzz
def test_fuzz_cross_entropy(device, data):
    draw = data.draw
    dtypes = begin(draw, device)
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.sampled_from([0, 1, 2, 3, 8, 33]))
    vocab = draw(st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 255, 1000, 4099])))
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    eps = draw(st.sampled_from([0.0, 0.1, 1.0]))
    coef = draw(st.sampled_from([0.0, 1e-4, 0.1]))
    cap = draw(st.sampled_from([None, None, 1.0, 30.0]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    scale = draw(st.sampled_from([1.0, 5.0, 50.0]))
    gen = draw_gen(draw)
    x = leaf(randn(gen, [n, vocab], scale), dtype, draw(st.sampled_from(CE_LAYOUTS)))
    t = torch.randint(0, vocab, (n,), generator=gen)
    if n:  # some rows ignored, maybe all
        drop = torch.rand(n, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
        t[drop] = ignore_index
    t = t.to(DEV)
    loss, z = ops.cross_entropy(x, t, ignore_index=ignore_index, label_smoothing=eps,
                                z_loss_coef=coef, softcap=cap, reduction=reduction)
    x64 = up64(x)
    lr, zr = ref.cross_entropy(x64, t, ignore_index, eps, coef, cap, reduction)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and z.dtype == acc and loss.shape == lr.shape
    assert not torch.isnan(loss).any()
    # Computed in float32 from the exact inputs: float32 tolerances whatever the logits' dtype.
    assert_close(loss, lr.detach(), name="loss")
    assert_close(z, zr.detach(), name="z_loss")
    gl, gz = randn(gen, lr.shape).to(acc), randn(gen, zr.shape).to(acc)
    (dx,) = torch.autograd.grad([loss, z], [x], [gl, gz])
    (dx64,) = torch.autograd.grad([lr, zr], [x64], [gl.double(), gz.double()])
    assert dx.dtype == dtype and dx.shape == x.shape
    rtol, atol = GRAD_TOL[dtype]
    # Relative to the largest gradient, or to the one-hot and softmax terms (of the size of the
    # incoming gradient) that cancel where a row's softmax is saturated.
    big = max(dx64.abs().max().item() if dx64.numel() else 0.0,
              gl.abs().max().item() if gl.numel() else 0.0, 1e-3)
    torch.testing.assert_close(dx.double(), dx64, rtol=rtol, atol=atol * big)
    count("cross_entropy")


@fuzz
def test_fuzz_linear_cross_entropy(device, data):
    draw = data.draw
    dtype = draw(st.sampled_from([t for t in begin(draw, device) if t in (torch.float32, torch.float64)]))
    lead = dims(draw, 1, 2, 5)
    d = draw(st.sampled_from([1, 3, 16, 33]))
    vocab = draw(st.sampled_from([1, 5, 64, 257]))
    with_bias = draw(st.booleans())
    reduction = draw(st.sampled_from(["mean", "sum"]))
    cap = draw(st.sampled_from([None, 5.0]))
    coef = draw(st.sampled_from([0.0, 1e-3]))
    eps = draw(st.sampled_from([0.0, 0.1]))
    chunk = draw(st.sampled_from([None, 1, 2, 7]))
    gen = draw_gen(draw)
    h = leaf(randn(gen, lead + [d]), dtype, draw(st.sampled_from(["contiguous", "transposed"])))
    w = leaf(randn(gen, [vocab, d], d ** -0.5), dtype)
    b = leaf(randn(gen, [vocab]), dtype) if with_bias else None
    t = torch.randint(0, vocab, lead, generator=gen)
    if t.numel():
        t.view(-1)[torch.rand(t.numel(), generator=gen) < 0.3] = -100
    t = t.to(DEV)
    loss, z = ops.linear_cross_entropy(h, w, t, bias=b, label_smoothing=eps, z_loss_coef=coef,
                                       softcap=cap, reduction=reduction, chunk_size=chunk)
    ins = [h, w] + ([b] if with_bias else [])
    ins64 = [up64(v) for v in ins]
    logits64 = torch.nn.functional.linear(ins64[0].reshape(-1, d), ins64[1],
                                          ins64[2] if with_bias else None)
    lr, zr = ref.cross_entropy(logits64, t.reshape(-1), -100, eps, coef, cap, reduction)
    assert_close(loss, lr.detach(), name="loss")
    assert_close(z, zr.detach(), name="z_loss")
    g = grads([loss], ins, [torch.tensor(0.7, dtype=loss.dtype, device=DEV)])
    g64 = grads([lr], ins64, [torch.tensor(0.7, dtype=torch.float64, device=DEV)])
    for name, a, r in zip(["hidden", "weight", "bias"], g, g64):
        assert a.shape == r.shape and a.dtype == dtype
        assert_close(a, r, grad=True, name=f"grad_{name}")
    count("linear_cross_entropy")


# ---------------------------------------------------------------------------------------------
# Softmax (scale, soft-cap, causal, window, bias broadcast) and soft-cap
# ---------------------------------------------------------------------------------------------
@fuzz
def test_fuzz_softmax(device, data):
    draw = data.draw
    dtypes = begin(draw, device)
    dtype = draw(st.sampled_from(dtypes))
    rank = draw(st.integers(2, 4))
    lead = [draw(st.sampled_from([0, 1, 2, 3])) for _ in range(rank - 2)]
    sq = draw(st.sampled_from([0, 1, 2, 5, 9]))
    sk = draw(st.one_of(st.integers(0, 40), st.sampled_from([1, 16, 17, 64, 255, 1000])))
    shape = lead + [sq, sk]
    scale = draw(st.sampled_from([1.0, 0.125, 2.0, -1.0]))
    cap = draw(st.sampled_from([None, None, 0.5, 30.0]))
    causal = draw(st.booleans())
    window = draw(st.sampled_from([None, None, 1, 2, 5, 100]))
    gen = draw_gen(draw)
    x = leaf(randn(gen, shape, draw(st.sampled_from([1.0, 4.0, 30.0]))), dtype,
             draw_layout(draw))
    bias = None
    if draw(st.booleans()):
        # A shape that broadcasts to x: some dims 1, maybe fewer leading dims.
        bshape = [1 if draw(st.booleans()) else s for s in shape]
        bshape = bshape[draw(st.integers(0, len(bshape) - 1)):]
        b64 = randn(gen, bshape, 2.0)
        if draw(st.booleans()) and b64.numel():  # an additive mask with -inf entries
            b64[(torch.rand(bshape, generator=gen) < 0.2).to(DEV)] = float("-inf")
        bias = leaf(b64, dtype)
    y = ops.softmax(x, scale=scale, softcap=cap, causal=causal, window=window, bias=bias)
    x64 = up64(x)
    b64 = None if bias is None else up64(bias)
    yr = ref.softmax(x64, scale, cap, causal, window, b64)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, yr.detach(), name="y")
    gy = randn(gen, y.shape).to(dtype)
    ins, ins64 = [x] + ([bias] if bias is not None else []), [x64] + ([b64] if b64 is not None else [])
    g = grads([y], ins, [gy])
    g64 = grads([yr], ins64, [gy.double()])
    for name, a, r in zip(["x", "bias"], g, g64):
        assert a.shape == r.shape
        assert not torch.isnan(a).any(), name
        assert_close(a, r, grad=True, name=f"grad_{name}")
    count("softmax")


@fuzz
def test_fuzz_softcap(device, data):
    draw = data.draw
    dtypes = begin(draw, device)
    dtype = draw(st.sampled_from(dtypes))
    shape = dims(draw, 0, 3) + ([draw(WIDTHS)] if draw(st.booleans()) else [])
    cap = draw(st.sampled_from([0.5, 5.0, 30.0, 1e4]))
    gen = draw_gen(draw)
    x = leaf(randn(gen, shape, draw(st.sampled_from([1.0, 10.0, 100.0]))), dtype,
             draw_layout(draw))
    y = ops.softcap(x, cap)
    x64 = up64(x)
    yr = ref.softcap(x64, cap)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, yr.detach(), name="y")
    gy = randn(gen, y.shape).to(dtype)
    (g,), (g64,) = grads([y], [x], [gy]), grads([yr], [x64], [gy.double()])
    assert_close(g, g64, grad=True, name="grad_x")
    count("softcap")


# ---------------------------------------------------------------------------------------------
# QK-norm + RoPE (per head or per token, weights or not, offsets, GQA, layouts)
# ---------------------------------------------------------------------------------------------
@fuzz
def test_fuzz_qk_norm_rope(device, data):
    draw = data.draw
    dtypes = begin(draw, device)
    dtype = draw(st.sampled_from(dtypes))
    per_head = draw(st.booleans())
    interleaved = draw(st.booleans())
    b, s = draw(st.sampled_from([0, 1, 2, 3])), draw(st.sampled_from([0, 1, 2, 7]))
    hk = draw(st.sampled_from([1, 2]))
    hq = hk * draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([2, 4, 8, 16, 18, 64, 128]))
    rot = 2 * draw(st.integers(1, d // 2))
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    off = draw(st.sampled_from([0.0, 1.0, 0.5]))
    gen = draw_gen(draw)
    max_pos = 64
    cos, sin = ops.rope_cache(rot, max_pos, device=DEV)
    offset, pids = draw_positions(draw, gen, b, s, max_pos)
    q = qk_layout(randn(gen, [b, s, hq, d], 2.0), dtype, draw(st.sampled_from(QK_LAYOUTS)))
    k = qk_layout(randn(gen, [b, s, hk, d], 2.0), dtype, draw(st.sampled_from(QK_LAYOUTS)))
    wn = lambda h: d if per_head else h * d  # noqa: E731
    wq = leaf(randn(gen, [wn(hq)], 0.5, 1.0 - off), dtype) if draw(st.booleans()) else None
    wk = leaf(randn(gen, [wn(hk)], 0.5, 1.0 - off), dtype) if draw(st.booleans()) else None
    qo, ko = ops.qk_norm_rope(q, k, wq, wk, cos, sin, eps=eps, per_head=per_head,
                              weight_offset=off, offset=offset, position_ids=pids,
                              interleaved=interleaved)
    pos = ops.rope_positions(q, offset, pids)
    ins = [t for t in (q, k, wq, wk) if t is not None]
    q64, k64 = up64(q), up64(k)
    wq64 = None if wq is None else up64(wq)
    wk64 = None if wk is None else up64(wk)
    ins64 = [t for t in (q64, k64, wq64, wk64) if t is not None]
    qr, kr = ref.qk_norm_rope(q64, k64, wq64, wk64, cos.double(), sin.double(), pos, eps,
                              interleaved, per_head, off)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    assert_close(qo, qr.detach(), name="q")
    assert_close(ko, kr.detach(), name="k")
    gq, gk = randn(gen, qo.shape).to(dtype), randn(gen, ko.shape).to(dtype)
    g = grads([qo, ko], ins, [gq, gk])
    g64 = grads([qr, kr], ins64, [gq.double(), gk.double()])
    for i, (a, r) in enumerate(zip(g, g64)):
        assert a.shape == r.shape
        assert_close(a, r, grad=True, name=f"grad {i}")
    count("qk_norm_rope")
