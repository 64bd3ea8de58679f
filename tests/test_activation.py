"""The activation family against float64 references: GeLU (erf, tanh), SiLU and ReLU, plain and
gated (ReGLU, GeGLU, SwiGLU) on two tensors or one packed tensor; the MLP modules; and the CPU
kernels' vectorised exp / erf / tanh against torch in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

import archext
from archext import _C, ops, reference as ref
from archext.nn import GatedMLP, MLP, hidden_width

from tolerance import assert_close, assert_within_2x_torch

LOW = (torch.float16, torch.bfloat16)
ACTS = ["relu", "gelu", "gelu_tanh", "silu"]
# How the op is called: two tensors, one packed tensor (gate half first or second), or plain.
KINDS = ["glu", "packed_gate_first", "packed_gate_second", "act"]

TORCH_ACT = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}


def make_inputs(kind: str, shape, dtype, device, requires_grad=True, scale=2.0) -> dict:
    """The op's inputs: {gate, up}, {x} packed [..., 2 * width] or {x}; N(0, scale^2)."""
    mk = lambda *s: (torch.randn(*s) * scale).to(device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    if kind == "glu":
        return {"gate": mk(*shape), "up": mk(*shape)}
    if kind.startswith("packed"):
        return {"x": mk(*shape[:-1], 2 * shape[-1])}
    return {"x": mk(*shape)}


def run(kind: str, act: str, inp: dict, impl) -> torch.Tensor:
    """The op through `impl` (archext.ops or archext.reference)."""
    if kind == "glu":
        return impl.glu(inp["gate"], inp["up"], act)
    if kind.startswith("packed"):
        return impl.glu_packed(inp["x"], act, kind == "packed_gate_first")
    return impl.act(inp["x"], act)


def run_torch_own(kind: str, act: str, inp: dict) -> torch.Tensor:
    """PyTorch's own ops in the input dtype (F.silu(g) * u etc.): the yardstick of the 2x rule."""
    f = TORCH_ACT[act]
    if kind == "glu":
        return f(inp["gate"]) * inp["up"]
    if kind.startswith("packed"):
        a, b = inp["x"].chunk(2, dim=-1)
        return f(a) * b if kind == "packed_gate_first" else f(b) * a
    return f(inp["x"])


def grads_of(out, inp: dict, gout) -> dict:
    keys = list(inp)
    return dict(zip(keys, torch.autograd.grad(out, [inp[k] for k in keys], gout)))


def upcast(inp: dict) -> dict:
    return {k: t.detach().double().requires_grad_() for k, t in inp.items()}


def check_case(kind: str, act: str, shape, dtype, device):
    inp = make_inputs(kind, shape, dtype, device)
    inp64 = upcast(inp)
    out = run(kind, act, inp, ops)
    out64 = run(kind, act, inp64, ref)
    assert out.dtype == dtype and out.shape == out64.shape and out.device.type == device
    assert out.is_contiguous()
    assert_close(out, out64.detach(), name=f"{kind} {act} y")

    gout = torch.randn_like(out)
    grads = grads_of(out, inp, gout)
    grads64 = grads_of(out64, inp64, gout.double())
    for k in inp:
        assert grads[k].dtype == dtype and grads[k].shape == inp[k].shape, k
        assert_close(grads[k], grads64[k], grad=True, name=f"{kind} {act} grad_{k}")

    if dtype in LOW:
        inp_t = {k: t.detach().clone().requires_grad_() for k, t in inp.items()}
        out_t = run_torch_own(kind, act, inp_t)
        assert_within_2x_torch(out, out_t, out64.detach(), name=f"{kind} {act} y")
        grads_t = grads_of(out_t, inp_t, gout)
        for k in inp:
            assert_within_2x_torch(grads[k], grads_t[k], grads64[k], name=f"{kind} {act} grad_{k}")


def dtypes_for(device):
    return [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if device == "cpu" else [])


@pytest.mark.parametrize("width", [1, 7, 769, 5125, 14336])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(device, kind, act, dtype, width):
    if dtype not in dtypes_for(device):
        pytest.skip("float64 kernels exist on the CPU only")
    shape = (3, width) if width > 8192 else (2, 5, width)
    check_case(kind, act, shape, dtype, device)


@pytest.mark.parametrize("width", [7, 769])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", ["glu", "packed_gate_second", "act"])
def test_every_cpu_isa(cpu_isa, kind, act, dtype, width):
    check_case(kind, act, (4, 3, width), dtype, "cpu")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", KINDS)
def test_many_elements_threads(device, kind, act):
    # Enough elements for several threads / blocks, and a length that is no multiple of a vector.
    check_case(kind, act, (4099, 97), torch.float32, device)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_range_of_magnitudes(device, act, dtype):
    # |x| from 1e-8 to ~1e2, both signs, against float64: the tails of gelu / silu / tanh and the
    # small-argument branches of erf and tanh.
    n = 20000
    mag = torch.exp(torch.empty(n).uniform_(math.log(1e-8), math.log(90.0)))
    x = (mag * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)).to(device=device, dtype=dtype)
    x.requires_grad_()
    y = ops.act(x, act)
    x64 = x.detach().double().requires_grad_()
    if act == "gelu_tanh":
        # PyTorch's 0.5 x (1 + tanh(u)) cancels even in float64 for x << 0 (to 1e-3 relative
        # at x = -6.7, to -0 past -7.5); the truth is the same function as x * sigmoid(2u).
        inner = math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)
        y64 = x64 * torch.sigmoid(2 * inner)
    else:
        y64 = ref.act(x64, act)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    # Elementwise, relative to each element's own magnitude, not to the largest element, so that
    # the tails are checked for real, with an absolute term where the formulas cancel (PyTorch's
    # own float32 does too): the erf GeLU computes 1 + erf(.) (x << 0), and every derivative
    # sums terms of size about 1 + |x| around its zeros (silu'(-1.28) = 0). The tanh GeLU, through
    # 1 / (1 + exp(-2u)), does not cancel, but its tail exp(2u) with u ~ 0.036 x^3 is as sensitive
    # to the rounding of u as it is to x (a relative condition of about 0.2 |x|^3). exp(-x)
    # overflows float32 for x < -88.7: silu(x) is then -0 where the exact value is still about
    # 1e-37, hence the absolute floor. The bfloat16 kernels take the fast erf (7 ulp against 1.2,
    # see cpu/vec.h).
    rtol = {torch.float32: 4e-6, torch.bfloat16: 8e-3}[dtype]
    if act == "gelu_tanh":
        rtol = rtol * (1 + 0.05 * x.detach().double().abs() ** 3)
    ulps = 4 if dtype == torch.float32 else 16
    ulps_of_1 = ulps * 2.0 ** -24 * (1 + x.detach().double().abs())
    cancel_y = ulps_of_1 if act == "gelu" else 0
    cancel_dx = ulps_of_1 * g.double().abs() if act != "relu" else 0
    for what, got, want, cancel in (("y", y, y64, cancel_y), ("dx", dx, dx64, cancel_dx)):
        err = (got.double() - want.detach()).abs()
        bad = err > rtol * want.detach().abs() + cancel + 1e-36
        assert not bad.any(), (
            f"{act} {what}: {int(bad.sum())} elements off, e.g. x={x[bad][0].item()!r} "
            f"got {got[bad][0].item()!r} want {want[bad][0].item()!r}")


@pytest.mark.parametrize("act", ACTS)
def test_special_values(device, act):
    # NaN, infinities and signed zeros behave as PyTorch's formulas in float64 (NaN where they
    # give NaN, e.g. silu(-inf) = -inf / inf; relu passes NaN and -0 forward and the gradient of
    # a NaN through); the finite points within the cancellation of the GeLUs' 1 + erf(.).
    vals = [math.nan, math.inf, -math.inf, 0.0, -0.0, 3.0, -3.0, 1e30, -1e30]
    x = torch.tensor(vals, device=device, requires_grad=True)
    x64 = torch.tensor(vals, dtype=torch.float64, requires_grad=True)
    y, y64 = ops.act(x, act), TORCH_ACT[act](x64)  # the float64 reference on the CPU
    torch.testing.assert_close(y.double().cpu(), y64.detach(), equal_nan=True, rtol=1e-6, atol=1e-7)
    assert torch.equal(torch.signbit(y[y == 0]), torch.signbit(y64[y64 == 0]).to(device))
    specials = slice(0, 7)  # 1e30 overflows x^2 in float32 in PyTorch's own backward formulas
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    (dx64,) = torch.autograd.grad(y64, x64, torch.ones_like(y64))
    torch.testing.assert_close(dx[specials].double().cpu(), dx64[specials], equal_nan=True,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("width", [1, 9])
def test_gradcheck(kind, act, width):
    inp = make_inputs(kind, (3, width), torch.float64, "cpu", scale=1.0)
    if act == "relu":  # keep finite differences off the kink
        with torch.no_grad():
            for t in inp.values():
                t.add_(torch.sign(t) * 0.05)
    keys = list(inp)
    assert torch.autograd.gradcheck(lambda *a: run(kind, act, dict(zip(keys, a)), ops),
                                    tuple(inp[k] for k in keys))


# ---------------------------------------------------------------------------------------------
# Layouts: packed and unpacked, views, non-contiguous, empty.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_packed_and_unpacked_identical(device, act, dtype):
    for d in (1, 7, 64, 769):
        x = (torch.randn(3, 11, 2 * d) * 2).to(device=device, dtype=dtype)
        a, b = x.chunk(2, dim=-1)  # views into x, read in place
        for gate_first in (True, False):
            gate, up = (a, b) if gate_first else (b, a)
            xp = x.clone().requires_grad_()
            yp = ops.glu_packed(xp, act, gate_first)
            g, u = gate.contiguous().requires_grad_(), up.contiguous().requires_grad_()
            y2 = ops.glu(g, u, act)
            yv = ops.glu(gate, up, act)  # the strided views themselves
            assert torch.equal(yp, y2) and torch.equal(yp, yv)
            gy = torch.randn_like(y2)
            (dxp,) = torch.autograd.grad(yp, xp, gy)
            dg, du = torch.autograd.grad(y2, (g, u), gy)
            want = torch.cat((dg, du) if gate_first else (du, dg), dim=-1)
            assert torch.equal(dxp, want)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous(device, kind, act):
    inp = make_inputs(kind, (6, 40, 48), torch.float32, device, requires_grad=False)
    # Strided views: every other element of the last dim (copied), a transposed leading pair
    # (copied), and a slice of a wider tensor (rows read in place at their own stride).
    views = [
        lambda t: torch.cat([t, t], -1)[..., ::2].transpose(0, 1),
        lambda t: t.transpose(0, 1),
        lambda t: torch.cat([t, t + 1], 0)[: t.shape[0]],
        lambda t: torch.cat([t, t], -1)[..., : t.shape[-1]],
    ]
    for view in views:
        strided = {k: view(t).requires_grad_() for k, t in inp.items()}
        dense = {k: t.detach().contiguous().requires_grad_() for k, t in strided.items()}
        ys, yd = run(kind, act, strided, ops), run(kind, act, dense, ops)
        assert torch.equal(ys, yd)
        gy = torch.randn_like(yd).transpose(0, 1).contiguous().transpose(0, 1)  # strided too
        gs, gd = grads_of(ys, strided, gy), grads_of(yd, dense, gy)
        for k in strided:
            assert torch.equal(gs[k], gd[k]), k
    x = inp[list(inp)[0]]
    assert not view(x).is_contiguous()


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", KINDS)
def test_empty_and_scalar(device, kind, act):
    for shape in ((0, 3, 64), (2, 0), (4, 1, 0)):
        inp = make_inputs(kind, shape, torch.float32, device)
        out = run(kind, act, inp, ops)
        assert out.shape == shape
        grads = grads_of(out, inp, torch.ones_like(out))
        for k, g in grads.items():
            assert g.shape == inp[k].shape
    if not kind.startswith("packed"):  # elementwise ops take 0-dim tensors, as F.gelu does
        inp = {k: v.reshape(()) for k, v in make_inputs(kind, (1,), torch.float64 if device == "cpu"
                                                        else torch.float32, device).items()}
        inp = {k: v.detach().requires_grad_() for k, v in inp.items()}
        out = run(kind, act, inp, ops)
        assert out.shape == ()
        torch.testing.assert_close(out, run(kind, act, inp, ref))


def test_thread_count_does_not_change_results():
    # Elementwise, and every float lane takes the same vector code wherever a thread's range
    # starts: bitwise the same at any thread count.
    inp = make_inputs("glu", (333, 1001), torch.bfloat16, "cpu")
    before = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y = run("glu", "gelu", inp, ops)
            outs.append([y.detach()] + list(grads_of(y, inp, torch.ones_like(y)).values()))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


@pytest.mark.parametrize("kind, saved", [("glu", 2), ("packed_gate_first", 1), ("act", 1)])
def test_backward_saves_only_the_inputs(device, kind, saved):
    inp = make_inputs(kind, (4, 16), torch.float32, device)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = run(kind, "gelu", inp, ops)
    assert len(packed) == saved
    assert all(any(p is t for t in inp.values()) for p in packed)
    gy = torch.randn_like(y)
    keep = gy.clone()
    grads = grads_of(y, inp, gy)
    assert torch.equal(gy, keep)  # the incoming gradient is only read
    assert all(g.data_ptr() != gy.data_ptr() for g in grads.values())


def test_gradient_of_one_input_only(device):
    gate, up = (torch.randn(5, 8, device=device) for _ in range(2))
    up.requires_grad_()
    y = ops.swiglu(gate, up)
    (du,) = torch.autograd.grad(y, up, torch.ones_like(y))
    torch.testing.assert_close(du, F.silu(gate))


def test_named_wrappers():
    g, u = torch.randn(4, 33), torch.randn(4, 33)
    assert torch.equal(ops.swiglu(g, u), ops.glu(g, u, "silu"))
    assert torch.equal(ops.glu(g, u, "swish"), ops.glu(g, u, "silu"))
    assert torch.equal(ops.geglu(g, u), ops.glu(g, u, "gelu"))
    assert torch.equal(ops.geglu(g, u, approximate="tanh"), ops.glu(g, u, "gelu_tanh"))
    assert torch.equal(ops.glu(g, u, "gelu_pytorch_tanh"), ops.glu(g, u, "gelu_tanh"))
    assert torch.equal(ops.reglu(g, u), ops.glu(g, u, "relu"))
    assert torch.equal(ops.gelu(g, "tanh"), ops.act(g, "gelu_tanh"))
    assert torch.equal(ops.silu(g), ops.act(g, "silu"))
    assert torch.equal(ops.relu(g), F.relu(g))
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        ops.gelu(g, approximate="erf")


# ---------------------------------------------------------------------------------------------
# The vectorised exp / erf / tanh of the CPU kernels, on every ISA, against torch in float64.
# ---------------------------------------------------------------------------------------------
# Max error in float32 ulps (measured: exp 1.0, erf 1.2 with FMA and 2.2 without, tanh 1.3; the
# fast erf of the float16 / bfloat16 kernels 5.6 / 6.8).
VEC_MATH_ULPS = {"exp": 1.5, "erf": 2.5, "tanh": 2.0, "erf_fast": 7.5}
VEC_MATH_REF = {"exp": torch.exp, "erf": torch.erf, "tanh": torch.tanh, "erf_fast": torch.erf}


def vec_math_points() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    n = 300_000
    mag = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(1e-38), math.log(3e38),
                                                                   generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    edges = torch.tensor([0.625, 1.0, 4.0, 44.0, 87.3, 88.72, 89.0, 103.9, 104.0, 150.0])
    near = (edges[:, None] * (1 + torch.linspace(-1e-3, 1e-3, 201))).flatten()
    return torch.cat([
        (mag * sign).float(),
        torch.linspace(-110, 110, 200_001),
        torch.linspace(-6, 6, 120_001),
        near, -near,
        torch.tensor([1e-45, -1e-45, 1e-40, -1e-40, 1.17e-38, -1.17e-38]),  # subnormal, tiny
    ]).float()


def ulp_errors(y: torch.Tensor, want64: torch.Tensor) -> torch.Tensor:
    """|y - want| in units of the float32 spacing at want (want finite in float32)."""
    a = want64.abs().clamp_min(2.0 ** -126)
    spacing = torch.ldexp(torch.ones_like(a), torch.frexp(a)[1] - 24).clamp_min(2.0 ** -149)
    return (y.double() - want64).abs() / spacing


@pytest.mark.parametrize("fn", list(VEC_MATH_ULPS))
def test_vec_math_accuracy(cpu_isa, fn):
    x = vec_math_points()
    y = torch.ops.archext_testing.vec_math(x, fn)
    want = VEC_MATH_REF[fn](x.double())
    fmax = torch.finfo(torch.float32).max
    finite = want.abs() <= fmax
    err = ulp_errors(y[finite], want[finite])
    worst = int(err.argmax())
    assert err.max() <= VEC_MATH_ULPS[fn], (
        f"{fn} on {cpu_isa}: {err.max().item():.3f} ulp at x={x[finite][worst].item()!r}: "
        f"{y[finite][worst].item()!r}, want {want[finite][worst].item()!r}")
    # Beyond the float32 range: exp overflows to +inf.
    assert torch.all(y[~finite] == math.inf)
    if fn != "exp":  # odd, and within [-1, 1]
        assert torch.equal(torch.ops.archext_testing.vec_math(-x, fn), -y)
        assert y.abs().max() <= 1


@pytest.mark.parametrize("fn", list(VEC_MATH_ULPS))
def test_vec_math_special_values(cpu_isa, fn):
    x = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30, 3e38,
                      -3e38, 100.0, -100.0, 88.8, -87.5, -103.0])
    y = torch.ops.archext_testing.vec_math(x, fn)
    want = VEC_MATH_REF[fn](x.double()).float()  # rounded to float32 (inf beyond its range)
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    ok = ~torch.isnan(want)
    torch.testing.assert_close(y[ok], want[ok], rtol=3e-7, atol=0)
    assert torch.equal(torch.signbit(y[ok]), torch.signbit(want[ok]))  # erf(-0) = -0, ...
    if fn == "exp":  # subnormal results, to within one subnormal spacing
        sub = torch.tensor([-88.0, -95.0, -100.0, -103.0, -103.9])
        torch.testing.assert_close(torch.ops.archext_testing.vec_math(sub, fn).double(),
                                   torch.exp(sub.double()), rtol=0, atol=2.0 ** -149)


def test_vec_math_every_length():
    # The last partial vector goes through a zero-padded buffer: every length, every offset.
    base = torch.randn(200) * 3
    full = torch.ops.archext_testing.vec_math(base, "erf")
    for n in range(0, 40):
        for off in (0, 1, 5):
            assert torch.equal(torch.ops.archext_testing.vec_math(base[off:off + n], "erf"),
                               full[off:off + n])


def test_vec_math_bad_input():
    with pytest.raises(RuntimeError, match="unknown function 'log', expected one of exp, erf, tanh, "
                                           "erf_fast"):
        torch.ops.archext_testing.vec_math(torch.ones(3), "log")
    with pytest.raises(RuntimeError, match="expected a float32 CPU tensor, got Double"):
        torch.ops.archext_testing.vec_math(torch.ones(3, dtype=torch.float64), "exp")


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels, autograd registration, AOT dispatch, on every op.
# ---------------------------------------------------------------------------------------------
def op_samples(device):
    mk = lambda *s, dt: torch.randn(*s, device=device, dtype=dt)  # noqa: E731
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
    for dt in (torch.float32, torch.bfloat16):
        for act in ACTS:
            g, u, gy = mk(3, 5, 16, dt=dt), mk(3, 5, 16, dt=dt), mk(3, 5, 16, dt=dt)
            x = mk(3, 5, 32, dt=dt)
            yield torch.ops.archext.glu_fwd, (rg(g), rg(u), act)
            yield torch.ops.archext.glu_bwd, (gy, g, u, act)
            for gate_first in (True, False):
                yield torch.ops.archext.glu_packed_fwd, (rg(x), act, gate_first)
                yield torch.ops.archext.glu_packed_bwd, (gy, x, act, gate_first)
            yield torch.ops.archext.act_fwd, (rg(g), act)
            yield torch.ops.archext.act_bwd, (gy, g, act)
    # Views read in place, and odd widths.
    x = mk(4, 2 * 7, dt=torch.float32)
    a, b = x.chunk(2, dim=-1)
    yield torch.ops.archext.glu_fwd, (rg(a), rg(b), "silu")
    yield torch.ops.archext.glu_bwd, (mk(4, 7, dt=torch.float32), a, b, "gelu")
    yield torch.ops.archext.act_fwd, (rg(x.t()), "gelu_tanh")


def test_opcheck(device):
    n = 0
    for op, args in op_samples(device):
        torch.library.opcheck(op, args)
        n += 1
    assert n == 2 * 4 * 8 + 3


def test_compile_fullgraph(device):
    d = 48
    mods = torch.nn.ModuleList([
        GatedMLP(d, 64, "silu"), GatedMLP(d, 64, "gelu_tanh", fused=True),
        GatedMLP(d, 32, "relu", bias=True, fused=True, gate_first=False), MLP(d, 96, "gelu"),
        MLP(d, activation="silu", bias=True),
    ]).to(device)

    def f(x):
        for m in mods:
            x = x + m(x)
        return x

    x = torch.randn(4, 7, d, device=device, requires_grad=True)
    eager = f(x)
    params = [x] + list(mods.parameters())
    ge = torch.autograd.grad(eager.square().sum(), params)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x)
    gc = torch.autograd.grad(out.square().sum(), params)
    torch.testing.assert_close(out, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
def test_hidden_width():
    assert hidden_width(4096) == 11008  # Llama 7B
    assert hidden_width(4096, gated=False) == 16384
    assert hidden_width(768, gated=False) == 3072
    assert hidden_width(2048, multiple_of=64) == 5504
    assert hidden_width(5120, multiple_of=256) == 13824  # Llama 13B
    for d in (64, 1000, 4096):
        w = hidden_width(d, multiple_of=64)
        assert w % 64 == 0 and 8 * d / 3 <= w < 8 * d / 3 + 64
        # About the parameter count of the 4d non-gated MLP.
        assert abs(3 * w - 2 * 4 * d) <= 3 * 64
    with pytest.raises(ValueError, match="multiple_of must be positive"):
        hidden_width(64, multiple_of=0)
    assert GatedMLP(4096, device="meta").d_ff == 11008
    assert MLP(64, device="meta").d_ff == 256


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fused", [False, True])
def test_gated_mlp_loads_llama_state_dict(fused, dtype):
    # A Llama MLP (transformers' LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)), act_fn
    # silu, no biases) is three Linear weights; written here as the formula, from its state_dict.
    d, d_ff = 64, 176
    sd = {
        "gate_proj.weight": torch.randn(d_ff, d) * d ** -0.5,
        "up_proj.weight": torch.randn(d_ff, d) * d ** -0.5,
        "down_proj.weight": torch.randn(d, d_ff) * d_ff ** -0.5,
    }
    sd = {k: v.to(dtype) for k, v in sd.items()}
    m = GatedMLP(d, d_ff, activation="silu", fused=fused, dtype=dtype)
    result = m.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(sd) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}  # not consumed
    x = torch.randn(2, 9, d, dtype=dtype)
    want = F.linear(F.silu(F.linear(x, sd["gate_proj.weight"])) * F.linear(x, sd["up_proj.weight"]),
                    sd["down_proj.weight"])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(m(x), want, **tol)
    if not fused:
        assert set(m.state_dict()) == set(sd)
    else:
        assert set(m.state_dict()) == {"gate_up_proj.weight", "down_proj.weight"}


def test_gated_mlp_fused_matches_unfused():
    for gate_first in (True, False):
        for act in ACTS:
            a = GatedMLP(32, 80, act, bias=True)
            b = GatedMLP(32, 80, act, bias=True, fused=True, gate_first=gate_first)
            b.load_state_dict(a.state_dict())
            x = torch.randn(5, 32)
            torch.testing.assert_close(b(x), a(x))
            # The fused weight's halves, in the module's order.
            w = b.gate_up_proj.weight
            gate_w, up_w = (w[:80], w[80:]) if gate_first else (w[80:], w[:80])
            assert torch.equal(gate_w, a.gate_proj.weight) and torch.equal(up_w, a.up_proj.weight)


@pytest.mark.parametrize("act", ACTS)
def test_mlp_matches_formula(act):
    m = MLP(24, 40, act, bias=True)
    x = torch.randn(3, 24)
    want = m.down_proj(TORCH_ACT[act](m.up_proj(x)))
    torch.testing.assert_close(m(x), want)
    assert set(m.state_dict()) == {"up_proj.weight", "up_proj.bias", "down_proj.weight",
                                   "down_proj.bias"}
    assert set(MLP(24, 40, act).state_dict()) == {"up_proj.weight", "down_proj.weight"}


def test_modules_reject_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'swiglu'; choose one of relu, gelu, "
                                         r"gelu_tanh, silu, swish"):
        GatedMLP(8, activation="swiglu")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        MLP(8, activation="tanh")
    assert GatedMLP(8, 16, activation="gelu_pytorch_tanh").activation == "gelu_tanh"


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, never a crash.
# ---------------------------------------------------------------------------------------------
def cpu_kernel(op):
    """The op's CPU kernel itself, below the fake/meta layer (to feed it mixed devices)."""
    return lambda *a: op.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *a)


def test_bad_activation_name(device):
    x = torch.ones(2, 8, device=device)
    msg = r"unknown activation 'swiglu', expected one of relu, gelu \(erf\), gelu_tanh, silu"
    with pytest.raises(RuntimeError, match=r"archext::glu_fwd: " + msg):
        torch.ops.archext.glu_fwd(x, x, "swiglu")
    with pytest.raises(RuntimeError, match=r"archext::glu_packed_bwd: " + msg):
        torch.ops.archext.glu_packed_bwd(x[:, :4], x, "swiglu", True)
    with pytest.raises(RuntimeError, match=r"archext::act_fwd: unknown activation 'GELU'"):
        ops.act(x, "GELU")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d: torch.ops.archext.glu_fwd(torch.ones(2, 8, dtype=torch.int32, device=d),
                                             torch.ones(2, 8, device=d), "silu"),
         r"expected gate to be float32, float16, bfloat16 .* got Int"),
        (lambda d: torch.ops.archext.glu_fwd(torch.ones(2, 8, device=d),
                                             torch.ones(2, 7, device=d), "silu"),
         r"glu_fwd: expected up of shape \[2, 8\] \(the shape of gate\), got \[2, 7\]"),
        (lambda d: torch.ops.archext.glu_fwd(torch.ones(2, 8, device=d),
                                             torch.ones(2, 8, device=d, dtype=torch.bfloat16), "gelu"),
         r"expected up of dtype Float \(the dtype of gate\), got BFloat16"),
        (lambda d: torch.ops.archext.glu_bwd(torch.ones(2, 7, device=d), torch.ones(2, 8, device=d),
                                             torch.ones(2, 8, device=d), "gelu"),
         r"glu_bwd: expected grad_y of shape \[2, 8\] \(the shape of gate\), got \[2, 7\]"),
        (lambda d: torch.ops.archext.glu_packed_fwd(torch.ones(2, 7, device=d), "silu", True),
         r"expected an even last dimension of x \(the gate and up halves, \[\.\.\., 2 \* d\]\), "
         r"got shape \[2, 7\]"),
        (lambda d: torch.ops.archext.glu_packed_fwd(torch.tensor(1.0, device=d), "silu", True),
         r"expected x with at least 1 dimension"),
        (lambda d: torch.ops.archext.glu_packed_bwd(torch.ones(2, 8, device=d),
                                                    torch.ones(2, 8, device=d), "silu", True),
         r"expected grad_y of shape \[2, 4\] \(x.shape\[:-1\] \+ \[x.shape\[-1\] / 2\]\), "
         r"got \[2, 8\]"),
        (lambda d: torch.ops.archext.glu_packed_bwd(torch.ones(2, 4, device=d, dtype=torch.half),
                                                    torch.ones(2, 8, device=d), "silu", True),
         r"expected grad_y of dtype Float \(the dtype of x\), got Half"),
        (lambda d: torch.ops.archext.act_fwd(torch.ones(3, dtype=torch.int64, device=d), "relu"),
         r"act_fwd: expected x to be float32, float16, bfloat16 .* got Long"),
        (lambda d: torch.ops.archext.act_bwd(torch.ones(3, device=d), torch.ones(4, device=d), "relu"),
         r"act_bwd: expected grad_y of shape \[4\] \(the shape of x\), got \[3\]"),
    ],
)
def test_bad_input(device, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(device)


def test_bad_input_device_mix_cpu_kernel():
    # The CPU kernels themselves refuse an operand on another device (here the meta device).
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"expected up on cpu \(the device of gate\), got meta"):
        cpu_kernel(torch.ops.archext.glu_fwd)(x, torch.ones(2, 8, device="meta"), "silu")
    with pytest.raises(RuntimeError, match=r"expected grad_y on cpu \(the device of x\), got meta"):
        cpu_kernel(torch.ops.archext.act_bwd)(torch.ones(2, 8, device="meta"), x, "gelu")


@pytest.mark.skipif(not archext.cuda_available(), reason="needs a CUDA device")
def test_bad_input_cuda():
    x = torch.randn(2, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"expected up on cuda:0 \(the device of gate\), got cpu"):
        torch.ops.archext.glu_fwd(x, torch.ones(2, 8), "silu")
    with pytest.raises(RuntimeError, match=r"float64 is supported on the CPU only"):
        torch.ops.archext.act_fwd(x.double(), "gelu")


def test_bfloat16_store_rounding_every_isa(cpu_isa):
    # The vector bfloat16 stores round to nearest even on every ISA (ties included). The
    # avx512_bf16 ISA uses vcvtneps2bf16, which also flushes float32 subnormals to a zero of the
    # same sign and keeps a NaN's sign: pinned here, and documented in cpu/vec.h. relu(x) * up
    # with up = 1 + 2^-8 (exact in bfloat16) makes float32 products that need rounding.
    n = 4096
    gate = torch.randn(n).to(torch.bfloat16).abs()
    up = torch.full((n,), 1 + 2 ** -8, dtype=torch.bfloat16)
    y = ops.glu(gate, up, "relu")
    expected = (gate.float() * up.float()).to(torch.bfloat16)  # c10's round to nearest even
    assert torch.equal(y, expected), cpu_isa

    tiny = torch.full((64,), 2.0 ** -130, dtype=torch.bfloat16)  # a bfloat16 subnormal
    special = torch.cat([tiny, -tiny, torch.full((64,), float("nan"), dtype=torch.bfloat16)])
    y = ops.glu(special, torch.ones_like(special), "relu")
    if cpu_isa == "avx512_bf16":
        assert torch.equal(y[:128], torch.zeros(128, dtype=torch.bfloat16))  # flushed
    else:
        assert torch.equal(y[:64], tiny)
        assert torch.equal(y[64:128], torch.zeros(64, dtype=torch.bfloat16))
    assert y[128:].isnan().all()
