"""The norm family against float64 references: RMSNorm, LayerNorm, the fused residual add."""
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import archext
from archext import _C, ops, reference as ref
from archext.nn import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm

from tolerance import assert_close, assert_within_2x_torch

LOW = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "rms" or "ln"
    add: bool  # fused residual add
    weight: bool
    bias: bool = False
    offset: float = 0.0  # Gemma's (1 + w)

    def __str__(self):
        return self.name


VARIANTS = [
    Variant("rms", "rms", False, True),
    Variant("rms_noweight", "rms", False, False),
    Variant("rms_gemma", "rms", False, True, offset=1.0),
    Variant("ln", "ln", False, True, True),
    Variant("ln_nobias", "ln", False, True, False),
    Variant("ln_noaffine", "ln", False, False, False),
    Variant("add_rms", "rms", True, True),
    Variant("add_rms_gemma", "rms", True, True, offset=1.0),
    Variant("add_ln", "ln", True, True, True),
    Variant("add_ln_nobias", "ln", True, True, False),
]
EPS = 1e-5


def make_inputs(v: Variant, shape, dtype, device, requires_grad=True) -> dict:
    n = shape[-1]
    mk = lambda t: t.to(device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    inp = {"x": mk(torch.randn(shape) * 2 + 0.5)}  # a mean offset, so LayerNorm centres for real
    if v.add:
        inp["residual"] = mk(torch.randn(shape))
    if v.weight:
        w = torch.randn(n) * 0.5 + (0.0 if v.offset else 1.0)
        inp["weight"] = mk(w)
    if v.bias:
        inp["bias"] = mk(torch.randn(n) * 0.2)
    return inp


def run(v: Variant, inp: dict, impl) -> list:
    """The variant through `impl` (archext.ops or archext.reference): [y] or [y, h]."""
    x, w, b = inp["x"], inp.get("weight"), inp.get("bias")
    if v.kind == "rms":
        if v.add:
            return list(impl.add_rms_norm(x, inp["residual"], w, EPS, v.offset))
        return [impl.rms_norm(x, w, EPS, v.offset)]
    if v.add:
        return list(impl.add_layer_norm(x, inp["residual"], w, b, EPS))
    return [impl.layer_norm(x, w, b, EPS)]


def run_torch_own(v: Variant, inp: dict) -> list:
    """PyTorch's own ops in the input dtype: the yardstick of the 2x rule."""
    x, w, b = inp["x"], inp.get("weight"), inp.get("bias")
    n = x.shape[-1]
    outs = []
    if v.add:
        x = x + inp["residual"]
    if v.kind == "rms":
        y = F.rms_norm(x, (n,), None if w is None else w + v.offset, EPS)
    else:
        y = F.layer_norm(x, (n,), w, b, EPS)
    outs.append(y)
    if v.add:
        outs.append(x)
    return outs


def grads_of(outs: list, inp: dict, gouts: list) -> dict:
    keys = list(inp)
    gs = torch.autograd.grad(outs, [inp[k] for k in keys], gouts, allow_unused=True)
    return dict(zip(keys, gs))


def upcast(inp: dict) -> dict:
    return {k: t.detach().double().requires_grad_() for k, t in inp.items()}


def check_variant(v: Variant, shape, dtype, device):
    inp = make_inputs(v, shape, dtype, device)
    inp64 = upcast(inp)
    outs = run(v, inp, ops)
    outs64 = run(v, inp64, ref)
    names = ["y", "h"]
    for name, o, o64 in zip(names, outs, outs64):
        assert o.dtype == dtype and o.shape == o64.shape and o.device.type == device
        assert_close(o, o64.detach(), name=f"{v} {name}")
    if v.add:
        # h is x + residual rounded once to the dtype, exactly what PyTorch's add gives.
        torch.testing.assert_close(outs[1], inp["x"] + inp["residual"], rtol=0, atol=0)

    gouts = [torch.randn_like(o) for o in outs]
    grads = grads_of(outs, inp, gouts)
    grads64 = grads_of(outs64, inp64, [g.double() for g in gouts])
    for k in inp:
        assert grads[k] is not None and grads[k].dtype == dtype, k
        assert_close(grads[k], grads64[k], grad=True, name=f"{v} grad_{k}")

    if dtype in LOW:
        inp_t = {k: t.detach().clone().requires_grad_() for k, t in inp.items()}
        outs_t = run_torch_own(v, inp_t)
        for name, o, ot, o64 in zip(names, outs, outs_t, outs64):
            assert_within_2x_torch(o, ot, o64.detach(), name=f"{v} {name}")
        grads_t = grads_of(outs_t, inp_t, gouts)
        for k in inp:
            assert_within_2x_torch(grads[k], grads_t[k], grads64[k], name=f"{v} grad_{k}")


def dtypes_for(device):
    return [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if device == "cpu" else [])


@pytest.mark.parametrize("width", [1, 7, 769, 5125, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("v", VARIANTS, ids=str)
def test_matches_reference(device, v, dtype, width):
    if dtype not in dtypes_for(device):
        pytest.skip("float64 kernels exist on the CPU only")
    shape = (3, width) if width > 8192 else (2, 5, width)
    check_variant(v, shape, dtype, device)


@pytest.mark.parametrize("width", [7, 64, 769])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("v", [VARIANTS[0], VARIANTS[2], VARIANTS[3], VARIANTS[8]], ids=str)
def test_every_cpu_isa(cpu_isa, v, dtype, width):
    check_variant(v, (4, 3, width), dtype, "cpu")


@pytest.mark.parametrize("v", VARIANTS, ids=str)
def test_many_rows_threads(device, v):
    # Enough rows for several threads / blocks, and a weight gradient summed across them.
    check_variant(v, (4099, 96), torch.float32, device)


@pytest.mark.parametrize("v", VARIANTS, ids=str)
@pytest.mark.parametrize("width", [1, 9])
def test_gradcheck(v, width):
    inp = make_inputs(v, (3, width), torch.float64, "cpu")
    keys = list(inp)

    def f(*args):
        return tuple(run(v, dict(zip(keys, args)), ops))

    assert torch.autograd.gradcheck(f, tuple(inp[k] for k in keys))


@pytest.mark.parametrize("width", [65536, 65536 + 8, 100003])
def test_huge_width(device, width):
    check_variant(VARIANTS[8], (2, width), torch.bfloat16, device)
    check_variant(VARIANTS[6], (2, width), torch.float32, device)


@pytest.mark.parametrize("v", VARIANTS, ids=str)
def test_zero_rows(device, v):
    inp = make_inputs(v, (0, 3, 64), torch.float32, device)
    outs = run(v, inp, ops)
    assert all(o.shape == (0, 3, 64) for o in outs)
    grads = grads_of(outs, inp, [torch.ones_like(o) for o in outs])
    for k, g in grads.items():
        assert g.shape == inp[k].shape
        if k in ("weight", "bias"):
            assert torch.count_nonzero(g) == 0  # a sum over no rows


@pytest.mark.parametrize("v", VARIANTS, ids=str)
def test_non_contiguous(device, v):
    inp = make_inputs(v, (6, 40, 2 * 48), torch.float32, device, requires_grad=False)
    # Strided views: every other element of the last dim, and a transposed leading pair.
    strided = {k: (t[..., ::2].transpose(0, 1) if t.dim() == 3 else t[::2]) for k, t in inp.items()}
    strided = {k: t.requires_grad_() for k, t in strided.items()}
    assert not strided["x"].is_contiguous()
    dense = {k: t.detach().contiguous().requires_grad_() for k, t in strided.items()}
    outs_s, outs_d = run(v, strided, ops), run(v, dense, ops)
    for a, b in zip(outs_s, outs_d):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    gouts = [torch.randn_like(o).transpose(0, 1).contiguous().transpose(0, 1) for o in outs_d]
    gs, gd = grads_of(outs_s, strided, gouts), grads_of(outs_d, dense, gouts)
    for k in strided:
        torch.testing.assert_close(gs[k], gd[k], rtol=0, atol=0)


@pytest.mark.parametrize("v", [VARIANTS[6], VARIANTS[8]], ids=str)
def test_incoming_gradients_not_modified(device, v):
    inp = make_inputs(v, (8, 33), torch.float32, device)
    outs = run(v, inp, ops)
    gouts = [torch.randn_like(o) for o in outs]
    keep = [g.clone() for g in gouts]
    grads = grads_of(outs, inp, gouts)
    for g, k in zip(gouts, keep):
        assert torch.equal(g, k)
    for g in grads.values():
        assert all(g.data_ptr() != go.data_ptr() for go in gouts)


def test_gradient_through_h_only(device):
    # Only the residual stream is used: grad_y is None, dx must equal grad_h.
    inp = make_inputs(VARIANTS[6], (4, 16), torch.float32, device)
    _, h = ops.add_rms_norm(inp["x"], inp["residual"], inp["weight"])
    g = torch.randn_like(h)
    dx, dr = torch.autograd.grad(h, [inp["x"], inp["residual"]], g)
    torch.testing.assert_close(dx, g)
    torch.testing.assert_close(dr, g)


def test_sandwich_norm_gradients(device):
    # Double norm (pre and post) on one branch: the second norm's backward feeds the first's.
    n = 64
    x = torch.randn(5, n, device=device, dtype=torch.float64 if device == "cpu" else torch.float32,
                    requires_grad=True)
    w1, w2 = (torch.randn(n, device=device, dtype=x.dtype, requires_grad=True) for _ in range(2))
    y = ops.rms_norm(torch.tanh(ops.rms_norm(x, w1)) * 3, w2)
    x64, w164, w264 = (t.detach().double().requires_grad_() for t in (x, w1, w2))
    y64 = ref.rms_norm(torch.tanh(ref.rms_norm(x64, w164)) * 3, w264)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, w1, w2], g)
    want = torch.autograd.grad(y64, [x64, w164, w264], g.double())
    for a, b in zip(got, want):
        assert_close(a, b, grad=True)


def test_deterministic(device):
    inp = make_inputs(VARIANTS[8], (512, 1000), torch.bfloat16, device)
    first = None
    for _ in range(3):
        outs = run(VARIANTS[8], inp, ops)
        grads = grads_of(outs, inp, [torch.ones_like(o) for o in outs])
        got = [o.detach() for o in outs] + list(grads.values())
        if first is None:
            first = got
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, got))


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels, autograd registration, AOT dispatch, on every op.
# ---------------------------------------------------------------------------------------------
def op_samples(device):
    mk = lambda *s, dt=torch.float32: torch.randn(*s, device=device, dtype=dt)  # noqa: E731
    for dt in (torch.float32, torch.bfloat16):
        x, r, w, b = mk(3, 5, 16, dt=dt), mk(3, 5, 16, dt=dt), mk(16, dt=dt), mk(16, dt=dt)
        g, gh = mk(3, 5, 16, dt=dt), mk(3, 5, 16, dt=dt)
        y, rstd = torch.ops.archext.rms_norm_fwd(x, w, 1e-6, 0.0)
        _, mean, rstd_ln = torch.ops.archext.layer_norm_fwd(x, w, b, 1e-5)
        rg = lambda t: t.clone().requires_grad_()  # noqa: E731
        yield torch.ops.archext.rms_norm_fwd, (rg(x), rg(w), 1e-6, 0.0)
        yield torch.ops.archext.rms_norm_fwd, (rg(x), None, 1e-6, 0.0)
        yield torch.ops.archext.rms_norm_fwd, (rg(x), rg(w), 1e-6, 1.0)
        yield torch.ops.archext.add_rms_norm_fwd, (rg(x), rg(r), rg(w), 1e-6, 0.0)
        yield torch.ops.archext.layer_norm_fwd, (rg(x), rg(w), rg(b), 1e-5)
        yield torch.ops.archext.layer_norm_fwd, (rg(x), None, None, 1e-5)
        yield torch.ops.archext.add_layer_norm_fwd, (rg(x), rg(r), rg(w), None, 1e-5)
        yield torch.ops.archext.rms_norm_bwd, (g, x, w, rstd, 0.0, None, True)
        yield torch.ops.archext.rms_norm_bwd, (g, x, None, rstd, 1.0, gh, False)
        yield torch.ops.archext.layer_norm_bwd, (g, x, w, mean, rstd_ln, gh, True, True)
        yield torch.ops.archext.layer_norm_bwd, (g, x, None, mean, rstd_ln, None, False, False)


def test_opcheck(device):
    n = 0
    for op, args in op_samples(device):
        torch.library.opcheck(op, args)
        n += 1
    assert n == 22


def test_compile_fullgraph(device):
    n = 48
    mods = torch.nn.ModuleList([RMSNorm(n), LayerNorm(n), AddRMSNorm(n, weight_offset=1.0),
                                AddLayerNorm(n, bias=False), LayerNorm(n, elementwise_affine=False)])
    mods = mods.to(device)
    for p in mods.parameters():
        torch.nn.init.normal_(p)

    def f(x, r):
        y = mods[0](x)
        y = mods[1](y)
        y, h = mods[2](y, r)
        y, h = mods[3](y, h)
        return mods[4](y) + h

    x = torch.randn(4, 7, n, device=device, requires_grad=True)
    r = torch.randn(4, 7, n, device=device, requires_grad=True)
    eager = f(x, r)
    ge = torch.autograd.grad(eager.square().sum(), [x, r] + list(mods.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, r)
    gc = torch.autograd.grad(out.square().sum(), [x, r] + list(mods.parameters()))
    torch.testing.assert_close(out, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Modules: drop-in state_dict compatibility with torch.nn
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_state_dict_compat(bias):
    theirs = torch.nn.LayerNorm(40, bias=bias)
    for p in theirs.parameters():
        torch.nn.init.normal_(p)
    ours = LayerNorm(40, bias=bias)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 40)
    torch.testing.assert_close(ours(x), theirs(x))
    theirs.load_state_dict(ours.state_dict())  # and back


def test_rms_norm_state_dict_compat():
    theirs = torch.nn.RMSNorm(40, eps=1e-6)
    torch.nn.init.normal_(theirs.weight)
    ours = RMSNorm(40, eps=1e-6)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 40)
    torch.testing.assert_close(ours(x), theirs(x))
    assert set(ours.state_dict()) == {"weight"}
    assert set(RMSNorm(8, elementwise_affine=False).state_dict()) == set()


def test_gemma_weight_offset_init():
    m = RMSNorm(16, weight_offset=1.0)
    assert torch.count_nonzero(m.weight) == 0  # (1 + w) starts at 1
    x = torch.randn(2, 16)
    torch.testing.assert_close(m(x), RMSNorm(16)(x))


def test_module_rejects_multi_dim_shape():
    with pytest.raises(ValueError, match="last dimension"):
        RMSNorm((4, 8))


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, never a crash.
# ---------------------------------------------------------------------------------------------
def cpu_kernel(op):
    """The op's CPU kernel itself, below the fake/meta layer (to feed it mixed devices)."""
    return lambda *a: op.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *a)


@pytest.mark.parametrize(
    "args_fn, match",
    [
        (lambda d: (torch.ones(2, 8, dtype=torch.int32, device=d), None, 1e-6, 0.0),
         r"expected x to be float32, float16, bfloat16 .* got Int"),
        (lambda d: (torch.ones(2, 8, device=d), torch.ones(7, device=d), 1e-6, 0.0),
         r"expected weight of shape \[8\] \(the last dimension of x\), got \[7\]"),
        (lambda d: (torch.ones(2, 8, device=d), torch.ones(2, 8, device=d), 1e-6, 0.0),
         r"expected weight of shape \[8\] .* got \[2, 8\]"),
        (lambda d: (torch.ones(2, 8, device=d), torch.ones(8, dtype=torch.bfloat16, device=d), 1e-6, 0.0),
         r"expected weight of dtype Float \(the dtype of x\), got BFloat16"),
        (lambda d: (torch.ones(2, 8, device=d), None, -1.0, 0.0), r"expected eps >= 0 and finite, got -1"),
        (lambda d: (torch.ones(2, 0, device=d), None, 1e-6, 0.0), r"non-empty last dimension of x"),
        (lambda d: (torch.tensor(1.0, device=d), None, 1e-6, 0.0), r"at least 1 dimension"),
    ],
)
def test_bad_input_rms(device, args_fn, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.archext.rms_norm_fwd(*args_fn(device))


def test_bad_input_residual_and_bias(device):
    x = torch.ones(2, 8, device=device)
    with pytest.raises(RuntimeError, match=r"expected residual of shape \[2, 8\] \(the shape of x\), got \[2, 4\]"):
        torch.ops.archext.add_rms_norm_fwd(x, torch.ones(2, 4, device=device), None, 1e-6, 0.0)
    with pytest.raises(RuntimeError, match=r"expected residual of dtype Float .* got Half"):
        torch.ops.archext.add_layer_norm_fwd(x, x.half(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"expected bias of shape \[8\]"):
        torch.ops.archext.layer_norm_fwd(x, None, torch.ones(9, device=device), 1e-5)


def test_bad_input_backward_stats(device):
    x = torch.randn(2, 8, device=device)
    _, mean, rstd = torch.ops.archext.layer_norm_fwd(x, None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"expected rstd of shape \[2\] \(x.shape\[:-1\]\), got \[3\]"):
        torch.ops.archext.layer_norm_bwd(x, x, None, mean, torch.ones(3, device=device), None, False, False)
    with pytest.raises(RuntimeError, match=r"expected mean of dtype Float, got Half"):
        torch.ops.archext.layer_norm_bwd(x, x, None, mean.half(), rstd, None, False, False)
    with pytest.raises(RuntimeError, match=r"expected grad_y of shape \[2, 8\] .* got \[2, 7\]"):
        torch.ops.archext.rms_norm_bwd(x[:, :7], x, None, rstd, 0.0, None, False)
    with pytest.raises(RuntimeError, match=r"expected grad_h of dtype Float .* got BFloat16"):
        torch.ops.archext.rms_norm_bwd(x, x, None, rstd, 0.0, x.bfloat16(), False)


def test_bad_input_device_mix_cpu_kernel():
    # The CPU kernel itself refuses a weight on another device (here the meta device).
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"expected weight on cpu \(the device of x\), got meta"):
        cpu_kernel(torch.ops.archext.rms_norm_fwd)(x, torch.ones(8, device="meta"), 1e-6, 0.0)


@pytest.mark.skipif(not archext.cuda_available(), reason="needs a CUDA device")
def test_bad_input_cuda():
    x = torch.randn(2, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"expected weight on cuda:0 \(the device of x\), got cpu"):
        torch.ops.archext.rms_norm_fwd(x, torch.ones(8), 1e-6, 0.0)
    with pytest.raises(RuntimeError, match=r"float64 is supported on the CPU only"):
        torch.ops.archext.rms_norm_fwd(x.double(), None, 1e-6, 0.0)


def test_set_cpu_isa_rejects_unknown():
    with pytest.raises(ValueError, match="unknown CPU ISA 'sse9'"):
        _C.set_cpu_isa("sse9")


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.99, 1.0, 1.01, 3.0, 1e3, 1e5])
@pytest.mark.parametrize("width", [7, 769, 4096])
def test_layer_norm_variance_with_a_large_mean(cpu_isa, ratio, width):
    # The CPU forward takes var = E[x^2] - mu^2 from its first pass while mu^2 <= E[x^2] / 2
    # (mean / std <= 1), else a second pass: both sides of the switch, and means far above the
    # spread (where E[x^2] - mu^2 would cancel to nothing in float32), match float64 closely.
    x = torch.randn(16, width)
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, correction=0, keepdim=True)
    x = x * 0.25 + 0.25 * ratio
    x64 = x.double()
    _, mean, rstd = torch.ops.archext.layer_norm_fwd(x, None, None, EPS)
    want_rstd = torch.rsqrt(x64.var(-1, correction=0) + EPS)
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=1e-6, atol=1e-7)
    # A float32 mean off by an ulp or two adds its square to the variance (second order):
    # visible only once mean / std approaches 1 / sqrt(float32 eps).
    rtol = 2e-5 + (2 * 2.0 ** -23 * ratio) ** 2
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=rtol, atol=0)
