"""Mixed precision in the norm family: a float32 residual stream beside bfloat16/float16
activations (the fused add + norm with a float32 residual, the plain norm of a float32 input
into a 16-bit output, their backwards), the modules, and the builder's residual_dtype."""
import dataclasses

import pytest
import torch

from archext import ops, reference as ref
from archext.models import ConfigError, TransformerConfig, build, preset
from archext.nn import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm

from test_norm import EPS, VARIANTS, Variant, grads_of, upcast
from tolerance import assert_close

LOW = (torch.bfloat16, torch.float16)
ADD = [v for v in VARIANTS if v.add] + [Variant("add_rms_noweight", "rms", True, False),
                                        Variant("add_ln_noaffine", "ln", True, False, False)]
PLAIN = [v for v in VARIANTS if not v.add]


def make_mixed(v: Variant, shape, low, device, weight_dtype=None, requires_grad=True) -> dict:
    """x in `low` (the branch output; float32 for a plain norm, which reads the stream),
    residual float32, weight and bias in `weight_dtype` (default: low, y's dtype)."""
    n = shape[-1]
    wd = low if weight_dtype is None else weight_dtype
    mk = lambda t, dt: t.to(device=device, dtype=dt).requires_grad_(requires_grad)  # noqa: E731
    inp = {"x": mk(torch.randn(shape) * 2 + 0.5, low if v.add else torch.float32)}
    if v.add:
        inp["residual"] = mk(torch.randn(shape) * 4, torch.float32)
    if v.weight:
        inp["weight"] = mk(torch.randn(n) * 0.5 + (0.0 if v.offset else 1.0), wd)
    if v.bias:
        inp["bias"] = mk(torch.randn(n) * 0.2, wd)
    return inp


def run_mixed(v: Variant, inp: dict, low, reference=False) -> list:
    """[y] or [y, h] through archext.ops (y in `low`) or the reference (in the inputs' dtype)."""
    x, w, b = inp["x"], inp.get("weight"), inp.get("bias")
    impl = ref if reference else ops
    if v.add:
        if v.kind == "rms":
            return list(impl.add_rms_norm(x, inp["residual"], w, EPS, v.offset))
        return list(impl.add_layer_norm(x, inp["residual"], w, b, EPS))
    if reference:
        return [ref.rms_norm(x, w, EPS, v.offset) if v.kind == "rms" else ref.layer_norm(x, w, b, EPS)]
    if v.kind == "rms":
        return [ops.rms_norm(x, w, EPS, v.offset, out_dtype=low)]
    return [ops.layer_norm(x, w, b, EPS, out_dtype=low)]


def check_mixed(v: Variant, shape, low, device, weight_dtype=None):
    inp = make_mixed(v, shape, low, device, weight_dtype)
    inp64 = upcast(inp)
    outs = run_mixed(v, inp, low)
    outs64 = run_mixed(v, inp64, low, reference=True)
    y = outs[0]
    assert y.dtype == low and y.shape == tuple(shape) and y.device.type == device
    assert_close(y, outs64[0].detach(), name=f"{v} y")  # the 16-bit tolerance
    if v.add:
        h = outs[1]
        assert h.dtype == torch.float32 and h.shape == tuple(shape)
        # h is x + residual in float32, as PyTorch's promoting add gives it.
        torch.testing.assert_close(h, inp["x"] + inp["residual"], rtol=0, atol=0)
        assert_close(h, outs64[1].detach(), name=f"{v} h")

    gouts = [torch.randn_like(o) for o in outs]  # grad_y in low, grad_h in float32
    grads = grads_of(outs, inp, gouts)
    grads64 = grads_of(outs64, inp64, [g.double() for g in gouts])
    for k in inp:
        # Each gradient in its input's dtype, at that dtype's tolerance: float32 for the stream
        # (residual, the plain norm's x) and float32 parameters, 16-bit for the branch's x.
        assert grads[k] is not None and grads[k].dtype == inp[k].dtype, k
        assert_close(grads[k], grads64[k], grad=True, name=f"{v} grad_{k}")
    if v.add:
        # The float32 gradient of h, rounded once for the 16-bit x.
        torch.testing.assert_close(grads["x"], grads["residual"].to(low), rtol=0, atol=0)


@pytest.mark.parametrize("width", [1, 7, 769, 5125])
@pytest.mark.parametrize("low", LOW, ids=str)
@pytest.mark.parametrize("v", ADD + PLAIN, ids=str)
def test_mixed_matches_reference(device, v, low, width):
    check_mixed(v, (2, 5, width), low, device)


@pytest.mark.parametrize("width", [7, 64, 769])
@pytest.mark.parametrize("v", [VARIANTS[6], VARIANTS[8], VARIANTS[0], VARIANTS[5]], ids=str)
def test_mixed_every_cpu_isa(cpu_isa, v, width):
    for low in LOW:
        check_mixed(v, (4, 3, width), low, "cpu")


@pytest.mark.parametrize("v", [VARIANTS[7], VARIANTS[8], VARIANTS[2], VARIANTS[3]], ids=str)
def test_mixed_float32_weights(device, v):
    # Weight and bias in float32 beside a bfloat16 y: their gradients stay float32.
    check_mixed(v, (3, 96), torch.bfloat16, device, weight_dtype=torch.float32)


@pytest.mark.parametrize("v", [VARIANTS[6], VARIANTS[8], VARIANTS[3]], ids=str)
def test_mixed_many_rows(device, v):
    # Several threads / blocks, and weight gradients summed across them in float32.
    check_mixed(v, (2049, 96), torch.bfloat16, device)


@pytest.mark.parametrize("v", ADD + PLAIN, ids=str)
def test_mixed_zero_rows(device, v):
    inp = make_mixed(v, (0, 3, 64), torch.bfloat16, device)
    outs = run_mixed(v, inp, torch.bfloat16)
    assert outs[0].shape == (0, 3, 64) and outs[0].dtype == torch.bfloat16
    if v.add:
        assert outs[1].dtype == torch.float32
    grads = grads_of(outs, inp, [torch.ones_like(o) for o in outs])
    for k, g in grads.items():
        assert g.shape == inp[k].shape and g.dtype == inp[k].dtype
        if k in ("weight", "bias"):
            assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("v", [VARIANTS[6], VARIANTS[9], VARIANTS[2], VARIANTS[3]], ids=str)
def test_mixed_non_contiguous(device, v):
    inp = make_mixed(v, (6, 40, 2 * 48), torch.bfloat16, device, requires_grad=False)
    strided = {k: (t[..., ::2].transpose(0, 1) if t.dim() == 3 else t[::2]) for k, t in inp.items()}
    strided = {k: t.requires_grad_() for k, t in strided.items()}
    assert not strided["x"].is_contiguous()
    dense = {k: t.detach().contiguous().requires_grad_() for k, t in strided.items()}
    outs_s, outs_d = run_mixed(v, strided, torch.bfloat16), run_mixed(v, dense, torch.bfloat16)
    for a, b in zip(outs_s, outs_d):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    gouts = [torch.randn_like(o).transpose(0, 1).contiguous().transpose(0, 1) for o in outs_d]
    gs, gd = grads_of(outs_s, strided, gouts), grads_of(outs_d, dense, gouts)
    for k in strided:
        torch.testing.assert_close(gs[k], gd[k], rtol=0, atol=0)


def test_mixed_gradient_through_h_only(device):
    inp = make_mixed(VARIANTS[6], (4, 16), torch.bfloat16, device)
    _, h = ops.add_rms_norm(inp["x"], inp["residual"], inp["weight"])
    g = torch.randn_like(h)
    dx, dr = torch.autograd.grad(h, [inp["x"], inp["residual"]], g)
    assert dx.dtype == torch.bfloat16 and dr.dtype == torch.float32
    torch.testing.assert_close(dr, g, rtol=0, atol=0)
    torch.testing.assert_close(dx, g.bfloat16(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# opcheck: the mixed calls of every norm op (schema, fake kernels, autograd, AOT dispatch).
# ---------------------------------------------------------------------------------------------
def mixed_samples(device):
    A = torch.ops.archext
    f32 = torch.float32
    for low in LOW:
        mk = lambda *s, dt=low: torch.randn(*s, device=device, dtype=dt)  # noqa: E731
        rg = lambda t: t.clone().requires_grad_()  # noqa: E731
        x, r, xs = mk(3, 5, 16), mk(3, 5, 16, dt=f32), mk(3, 5, 16, dt=f32)
        w, b, w32 = mk(16), mk(16), mk(16, dt=f32)
        g, gh = mk(3, 5, 16), mk(3, 5, 16, dt=f32)
        _, rstd = A.rms_norm_fwd(xs, w, 1e-6, 0.0, low)
        _, mean, rstd_ln = A.layer_norm_fwd(xs, w, b, 1e-5, low)
        yield A.rms_norm_fwd, (rg(xs), rg(w), 1e-6, 0.0, low)
        yield A.rms_norm_fwd, (rg(xs), None, 1e-6, 0.0, low)
        yield A.rms_norm_fwd, (rg(xs), rg(w32), 1e-6, 1.0, low)
        yield A.add_rms_norm_fwd, (rg(x), rg(r), rg(w), 1e-6, 0.0)
        yield A.add_rms_norm_fwd, (rg(x), rg(r), rg(w32), 1e-6, 1.0)
        yield A.layer_norm_fwd, (rg(xs), rg(w), rg(b), 1e-5, low)
        yield A.layer_norm_fwd, (rg(xs), None, None, 1e-5, low)
        yield A.add_layer_norm_fwd, (rg(x), rg(r), rg(w), rg(b), 1e-5)
        yield A.add_layer_norm_fwd, (rg(x), rg(r), None, None, 1e-5)
        yield A.rms_norm_bwd, (g, xs, w, rstd, 0.0, gh, True)
        yield A.rms_norm_bwd, (g, xs, w32, rstd, 1.0, None, True)
        yield A.layer_norm_bwd, (g, xs, w, mean, rstd_ln, gh, True, True)
        yield A.layer_norm_bwd, (g, xs, None, mean, rstd_ln, None, False, True)


def test_mixed_opcheck(device):
    n = 0
    for op, args in mixed_samples(device):
        torch.library.opcheck(op, args)
        n += 1
    assert n == 26


def test_out_dtype_of_x_is_the_plain_call(device):
    x = torch.randn(4, 24, device=device)
    w = torch.randn(24, device=device)
    y0, r0 = torch.ops.archext.rms_norm_fwd(x, w, 1e-6, 0.0)
    y1, r1 = torch.ops.archext.rms_norm_fwd(x, w, 1e-6, 0.0, torch.float32)
    assert torch.equal(y0, y1) and torch.equal(r0, r1)


# ---------------------------------------------------------------------------------------------
# Bad dtype combinations: a clear error naming the argument.
# ---------------------------------------------------------------------------------------------
def test_mixed_bad_dtypes(device):
    A = torch.ops.archext
    bf, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    x = lambda dt: torch.ones(2, 8, device=device, dtype=dt)  # noqa: E731
    w = lambda dt, n=8: torch.ones(n, device=device, dtype=dt)  # noqa: E731
    cases = [
        (lambda: A.add_rms_norm_fwd(x(f32), x(bf), None, 1e-6, 0.0),
         r"expected residual of dtype Float \(the dtype of x; or Float beside a BFloat16/Half x.*got BFloat16"),
        (lambda: A.add_layer_norm_fwd(x(bf), x(f16), None, None, 1e-5),
         r"expected residual of dtype BFloat16 .* got Half"),
        (lambda: A.rms_norm_fwd(x(bf), None, 1e-6, 0.0, f32),
         r"expected out_dtype None, the dtype of x \(BFloat16\), or BFloat16 / Half for a Float x.*got Float"),
        (lambda: A.layer_norm_fwd(x(f32), None, None, 1e-5, torch.float64),
         r"expected out_dtype .* got Double"),
        (lambda: A.rms_norm_fwd(x(f32), w(f16), 1e-6, 0.0, bf),
         r"expected weight of dtype BFloat16 \(the dtype of y\) or Float, got Half"),
        (lambda: A.add_layer_norm_fwd(x(bf), x(f32), w(bf), w(f16), 1e-5),
         r"expected bias of dtype BFloat16 \(the dtype of y\) or Float, got Half"),
        (lambda: A.add_rms_norm_fwd(x(bf), x(f32), w(f32, 7), 1e-6, 0.0),
         r"expected weight of shape \[8\]"),
        (lambda: A.rms_norm_bwd(x(f32), x(bf), None, torch.ones(2, device=device), 0.0, None, False),
         r"expected grad_y of dtype BFloat16 \(the dtype of x; or BFloat16 / Half for a Float x.*got Float"),
        (lambda: A.rms_norm_bwd(x(bf), x(f32), None, torch.ones(2, device=device), 0.0, x(bf), False),
         r"expected grad_h of dtype Float \(the dtype of x\), got BFloat16"),
        (lambda: A.layer_norm_bwd(x(bf), x(f32), w(f16), torch.ones(2, device=device),
                                  torch.ones(2, device=device), None, True, False),
         r"expected weight of dtype BFloat16 \(the dtype of y\) or Float, got Half"),
    ]
    for fn, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fn()


def test_modules_mixed(device):
    n = 40
    xs = torch.randn(3, n, device=device)  # the float32 stream
    xb = torch.randn(3, n, device=device, dtype=torch.bfloat16)  # a branch output
    for m in (RMSNorm(n), LayerNorm(n), AddRMSNorm(n, weight_offset=1.0), AddLayerNorm(n, bias=False)):
        m = m.to(device=device, dtype=torch.bfloat16)
        y = m(xs)
        y = y[0] if isinstance(y, tuple) else y
        assert y.dtype == torch.bfloat16  # y in the 16-bit weight's dtype
        if isinstance(m, (AddRMSNorm, AddLayerNorm)):
            y, h = m(xb, xs)
            assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
            with pytest.raises(ValueError, match="writes y in x's dtype"):
                m(xb, xs, out_dtype=torch.float32)
    noaffine = AddLayerNorm(n, elementwise_affine=False).to(device)
    assert noaffine(xs)[0].dtype == torch.float32  # no weight to read a dtype from
    assert noaffine(xs, out_dtype=torch.float16)[0].dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# The builder: residual_dtype="float32"
# ---------------------------------------------------------------------------------------------
TINY = dict(vocab_size=97, d_model=64, n_heads=4, n_layers=2, max_seq_len=64)
STREAM_CASES = {
    "pre_rms": dict(),
    "pre_gemma": dict(norm="gemma_rmsnorm", embedding_scale=8.0),
    "double_ln": dict(norm_placement="double", norm="layernorm"),
    "reordered_noaffine": dict(norm_placement="reordered", norm="layernorm_noaffine"),
    "parallel_two_norms": dict(block="parallel", parallel_shared_norm=False, norm="layernorm_nobias"),
}


@pytest.mark.parametrize("name", list(STREAM_CASES))
def test_float32_stream_model(name):
    cfg = TransformerConfig(**TINY, **STREAM_CASES[name], residual_dtype="float32")
    model = build(cfg, dtype=torch.bfloat16)
    # Parameters are as the dtype says, norms included: the option changes activations only.
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append((a[0].dtype, out.dtype)))
             for layer in model.layers]
    x = torch.randint(0, 97, (2, 12))
    out = model(x, labels=x)
    for h in hooks:
        h.remove()
    assert seen == [(torch.float32, torch.float32)] * cfg.n_layers  # the stream is float32
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, pname
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    fused = model(x, labels=x, return_logits=False)
    torch.testing.assert_close(fused.loss, out.loss, rtol=2e-2, atol=2e-2)


def test_float32_stream_tracks_float32_model():
    # The same weights in float32, in bfloat16, and in bfloat16 with a float32 stream: the
    # float32 stream removes the rounding of every residual add to 8 bits, so its logits and
    # loss stay closer to the float32 model's. Deterministic (fixed seeds, deterministic
    # kernels); measured over four seeds on the CPU: the mean logit error 0.58-0.60 x, the loss
    # error 0.3-0.5 x that of the plain bfloat16 model.
    torch.manual_seed(1234)
    cfg = TransformerConfig(vocab_size=256, d_model=128, n_heads=4, n_layers=8, max_seq_len=128)
    ref32 = build(cfg)
    state = ref32.state_dict()
    low = build(cfg, dtype=torch.bfloat16)
    low.load_state_dict(state)
    mixed = build(dataclasses.replace(cfg, residual_dtype="float32"), dtype=torch.bfloat16)
    mixed.load_state_dict(state)
    gen = torch.Generator().manual_seed(99)
    x = torch.randint(0, 256, (4, 96), generator=gen)
    with torch.no_grad():
        o32, olow, omix = ref32(x, labels=x), low(x, labels=x), mixed(x, labels=x)
    err_low = (olow.logits.float() - o32.logits).abs().mean().item()
    err_mix = (omix.logits.float() - o32.logits).abs().mean().item()
    assert err_mix < 0.8 * err_low, (err_mix, err_low)
    loss_low = abs(olow.loss.item() - o32.loss.item())
    loss_mix = abs(omix.loss.item() - o32.loss.item())
    assert loss_mix < loss_low, (loss_mix, loss_low)


def test_float32_stream_state_dict_interchangeable():
    cfg = TransformerConfig(**TINY)
    mixed = build(dataclasses.replace(cfg, residual_dtype="float32"), dtype=torch.bfloat16)
    plain = build(cfg, dtype=torch.bfloat16, init=False)
    plain.load_state_dict(mixed.state_dict())  # strict: the same keys, shapes and dtypes
    mixed.load_state_dict(plain.state_dict())
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        a, b = mixed(x).logits.float(), plain(x).logits.float()
    torch.testing.assert_close(a, b, rtol=0.1, atol=0.1)  # the same model, rounded differently


@pytest.mark.parametrize("kw, match", [
    (dict(residual_dtype="bfloat16"), r"residual_dtype='bfloat16' is unknown; choose None"),
    (dict(residual_dtype="float32", norm_placement="post"), r"post-norm block's stream is its norm output"),
])
def test_residual_dtype_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        TransformerConfig(**TINY, **kw)


def test_float32_stream_model_compiles_fullgraph():
    """A bf16 model with the float32 stream under torch.compile(fullgraph=True): the same loss
    and gradients as eager (the mixed-dtype norms trace through their fake kernels)."""
    torch.manual_seed(0)
    model = build(preset("llama", vocab_size=64, d_model=32, n_heads=4, n_layers=2,
                         residual_dtype="float32"), dtype=torch.bfloat16)
    x = torch.randint(0, 64, (2, 16))
    ref = model(x, labels=x)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0, msg=n)
