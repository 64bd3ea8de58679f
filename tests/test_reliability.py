"""Reliability of every op (docs/reliability.md): NaN / Inf propagation as PyTorch's own ops,
float16 inputs whose intermediate sums overflow float16, bitwise determinism (run to run and
at 1 or 2 threads), many Python threads at once, the error messages, and shapes of more than
2^31 elements. The per-op fuzzing against the references is in test_fuzz.py."""
import math
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from archext import ops
from archext import reference as ref

from tolerance import assert_close

nan, inf = math.nan, math.inf
A = torch.ops.archext

# Rows of 8 with the special values in different places (and one finite row, which must not be
# touched by its neighbours).
SPECIAL_ROWS = [
    [1.0, nan, 2.0, 3.0, -1.0, 0.5, 0.0, 2.0],
    [1.0, inf, 2.0, 3.0, -1.0, 0.5, 0.0, 2.0],
    [1.0, -inf, 2.0, 3.0, -1.0, 0.5, 0.0, 2.0],
    [inf, -inf, 1.0, 2.0, -1.0, 0.5, 0.0, 2.0],
    [inf, inf, 1.0, 2.0, -1.0, 0.5, 0.0, 2.0],
    [-inf] * 8,
    [nan] * 8,
    [1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0],
]


def special(dtype=torch.float32, width=None):
    """The special rows, widened to `width` (past one vector) by repeating the finite tail."""
    x = torch.tensor(SPECIAL_ROWS, dtype=torch.float64)
    if width is not None and width > 8:
        tail = torch.linspace(-2.0, 2.0, width - 8, dtype=torch.float64).expand(8, -1).clone()
        tail[5], tail[6] = -inf, nan  # the all -inf and all NaN rows stay so
        x = torch.cat([x, tail], dim=1)
    return x.to(dtype)


def assert_same_specials(got, want, name=""):
    """NaN exactly where want is NaN, the same infinities, the finite values close."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN pattern\n{got}\n{want}"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{name}: +inf pattern"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{name}: -inf pattern"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# NaN and Inf: as PyTorch's own ops (the rules are listed per op in docs/reliability.md)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [8, 67])
def test_special_values_norms(cpu_isa, width):
    x = special(width=width)
    w = torch.linspace(0.5, 2.0, width)
    b = torch.linspace(-1.0, 1.0, width)
    assert_same_specials(ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (width,), w, 1e-6), "rms_norm")
    assert_same_specials(ops.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (width,), w, b, 1e-5),
                         "layer_norm")
    # The residual add: h = x + r as torch adds (inf + -inf = NaN), then the norm of h.
    r = special(width=width).flip(0)
    y, h = ops.add_rms_norm(x, r, w, 1e-6)
    assert_same_specials(h, x + r, "h")
    assert_same_specials(y, F.rms_norm(x + r, (width,), w, 1e-6), "add_rms_norm")
    # Backward: a special value reaches its own row only (dx) and, through the sum over rows,
    # the weight gradient, as in PyTorch.
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(x.shape)
    ops.rms_norm(xs, ws, 1e-6).backward(g)
    F.rms_norm(xt, (width,), wt, 1e-6).backward(g)
    assert_same_specials(xs.grad, xt.grad, "rms_norm dx")
    assert torch.isfinite(xs.grad[-1]).all()
    assert torch.equal(torch.isnan(ws.grad), torch.isnan(wt.grad))


def test_special_values_softmax(cpu_isa):
    x = special(width=40)
    # As torch.softmax: a NaN or +inf in the row gives NaN over the row; -inf entries get 0.
    # The one deviation: a row with every key at -inf (or masked) gives zeros, not NaN
    # (documented: a fully masked attention row contributes nothing).
    want = torch.softmax(x, -1)
    want[5] = 0.0
    assert_same_specials(ops.softmax(x), want, "softmax")
    # With a soft-cap, +-inf scores become +-cap first (Gemma 2 order): finite rows.
    want = torch.softmax(10.0 * torch.tanh(x / 10.0), -1)
    assert_same_specials(ops.softmax(x, softcap=10.0), want, "softmax capped")
    # A -inf additive mask in the bias, as PyTorch's masked attention: 0 there.
    xb = torch.randn(8, 40)
    bias = torch.zeros(8, 40)
    bias[:, ::3] = -inf
    assert_same_specials(ops.softmax(xb, bias=bias), torch.softmax(xb + bias, -1), "bias mask")
    # The backward keeps each row's specials in that row.
    xs = x.clone().requires_grad_()
    ops.softmax(xs).backward(torch.ones(8, 40))
    assert torch.isfinite(xs.grad[-1]).all() and torch.isnan(xs.grad[0]).all()


@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("coef", [0.0, 1e-2])
def test_special_values_cross_entropy(cpu_isa, cap, smoothing, coef):
    x = special(width=70)
    for t in (torch.zeros(8, dtype=torch.long), torch.full((8,), 1), torch.full((8,), 7)):
        loss, z = ops.cross_entropy(x, t, softcap=cap, label_smoothing=smoothing, z_loss_coef=coef,
                                    reduction="none")
        logits = x if cap is None else cap * torch.tanh(x / cap)
        lse = torch.logsumexp(logits, -1)
        want = F.cross_entropy(logits, t, label_smoothing=smoothing, reduction="none")
        want = want + coef * lse * lse
        assert_same_specials(loss, want, f"loss t={t[0].item()}")
        assert_same_specials(z, coef * lse * lse, "z_loss")
    # An ignored row is 0 whatever it holds, and adds nothing to the mean or the gradient.
    t = torch.full((8,), 2)
    t[:7] = -100
    xs = x.clone().requires_grad_()
    loss, _ = ops.cross_entropy(xs, t, softcap=cap, label_smoothing=smoothing, z_loss_coef=coef)
    want = F.cross_entropy(x[7:], t[7:], label_smoothing=smoothing)
    if cap is None and coef == 0.0:
        torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xs.grad).all() and (xs.grad[:7] == 0).all()


def test_cross_entropy_inf_logit_with_z_loss_is_nan():
    # Regression: a +inf logit (no cap) gave loss NaN without z-loss but +inf with it (the
    # z-loss term coef * lse^2 = +inf was added to the NaN-free (lse - z_t) = +inf). Now NaN,
    # as F.cross_entropy, whatever the coefficient; the logged z-loss stays +inf.
    x = torch.tensor([[1.0, inf, 2.0], [1.0, 2.0, 3.0]])
    t = torch.tensor([0, 0])
    for coef in (0.0, 1e-4, 1.0):
        loss, z = ops.cross_entropy(x, t, z_loss_coef=coef, reduction="none")
        assert math.isnan(loss[0].item()) and math.isfinite(loss[1].item()), coef
        if coef:
            assert z[0].item() == inf


def test_special_values_rope(cpu_isa):
    # Each output is x1 c -+ x2 s of a pair: a special value reaches its pair partner only
    # (inf * 0 = NaN where sin or cos is 0, as the same formula in PyTorch gives).
    cos, sin = ops.rope_cache(16, 8)
    q = torch.randn(2, 3, 2, 16)
    q[0, 0, 0, 1] = nan
    q[0, 1, 1, 3] = inf
    q[1, 2, 0, 9] = -inf
    k = q[:, :, :1].clone()
    for interleaved in (False, True):
        qo, ko = ops.apply_rope(q, k, cos, sin, interleaved=interleaved)
        pos = torch.arange(3)
        assert_same_specials(qo, ref.rope(q, cos, sin, pos, interleaved), "rope q")
        assert_same_specials(ko, ref.rope(k, cos, sin, pos, interleaved), "rope k")
        assert torch.isfinite(qo[1, :2]).all()


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu"])
def test_special_values_glu_and_softcap(cpu_isa, act):
    torch_act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu,
                 "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[act]
    # PyTorch's formulas evaluated in float64 (its float32 vectorised F.gelu gives NaN at +inf,
    # where the formula, and archext, give +inf).
    vals = torch.tensor([nan, inf, -inf, 0.0, -0.0, 3.0, -3.0, 1.0])
    gate = vals.repeat_interleave(8)  # every pair of special gate and up values
    up = vals.repeat(8)
    want = torch_act(gate.double()) * up.double()
    assert_same_specials(ops.glu(gate, up, act), want, f"glu {act}")
    packed = torch.cat([gate, up])[None]
    assert_same_specials(ops.glu_packed(packed, act)[0], want, "glu_packed")
    v64 = vals.double()
    assert_same_specials(ops.softcap(vals, 2.0), 2.0 * torch.tanh(v64 / 2.0), "softcap")


def test_special_values_qk_norm_rope():
    # RMSNorm of each head then RoPE: a NaN poisons its head (per_head) or its token (not).
    cos, sin = ops.rope_cache(16, 8)
    q = torch.randn(1, 2, 3, 16)
    q[0, 0, 1, 4] = nan
    k = torch.randn(1, 2, 1, 16)
    for per_head in (True, False):
        qo, _ = ops.qk_norm_rope(q, k, None, None, cos, sin, per_head=per_head)
        want, _ = ref.qk_norm_rope(q, k, None, None, cos, sin, torch.arange(2), per_head=per_head)
        assert_same_specials(qo, want, f"per_head={per_head}")
        assert torch.isnan(qo[0, 0, 1]).all() and torch.isfinite(qo[0, 1]).all()
        assert torch.isnan(qo[0, 0]).all() != per_head


# ---------------------------------------------------------------------------------------------
# float16: intermediate sums that overflow float16 are accumulated in float32
# ---------------------------------------------------------------------------------------------
def test_float16_overflow_in_sums(cpu_isa):
    # Values near float16's max (65504): x^2 ~ 3.6e9 and the row sums overflow float16, not
    # float32. Every op must give the float64 reference's answer.
    gen = torch.Generator().manual_seed(0)
    x = ((torch.rand(4, 4096, generator=gen, dtype=torch.float64) * 2 - 1) * 60000).half()
    x[0] = 60000.0
    x64 = x.double()
    w = torch.rand(4096, generator=gen).half() + 0.5
    y = ops.rms_norm(x, w)
    assert torch.isfinite(y).all()
    assert_close(y, ref.rms_norm(x64, w.double(), 1e-6))
    yl = ops.layer_norm(x, w, None)
    assert_close(yl, ref.layer_norm(x64, w.double(), None, 1e-5))
    # The residual add itself rounds to float16 (as torch's add: inf past 65504), the norm not.
    yr, h = ops.add_rms_norm(x * 0.5, x * 0.25, w)
    assert torch.equal(h, x * 0.5 + x * 0.25)
    assert_close(yr, ref.rms_norm(h.double(), w.double(), 1e-6))
    # The backward's row sums (sum of dy * x * w over 4096 values of ~6e4) too.
    xs = x.clone().requires_grad_()
    x64r = x64.clone().requires_grad_()
    gy = torch.ones(4, 4096, dtype=torch.float16)
    ops.rms_norm(xs, None).backward(gy)
    ref.rms_norm(x64r, None, 1e-6).backward(gy.double())
    assert torch.isfinite(xs.grad).all()
    assert_close(xs.grad, x64r.grad, grad=True)
    # Logits of ~6e4: exp of the differences, lse ~ 6e4, in float32.
    t = torch.tensor([0, 1, 2, 3])
    loss, _ = ops.cross_entropy(x, t, reduction="none")
    lr, _ = ref.cross_entropy(x64, t, reduction="none")
    assert torch.isfinite(loss).all()
    assert_close(loss, lr)
    ys = ops.softmax(x[None], scale=1.0)
    assert_close(ys[0], ref.softmax(x64))
    # QK-norm of float16 heads of ~6e4 (the sum of squares over head_dim overflows float16).
    cos, sin = ops.rope_cache(64, 8)
    q = x.reshape(1, 4, 64, 64)
    qo, _ = ops.qk_norm_rope(q, q[:, :, :2], None, None, cos, sin)
    qr, _ = ref.qk_norm_rope(q.double(), q[:, :, :2].double(), None, None, cos.double(),
                             sin.double(), torch.arange(4))
    assert_close(qo, qr)


def test_float32_sum_of_squares_overflow_as_pytorch():
    # float32 input beyond ~1.8e19: x^2 overflows float32 itself; RMSNorm then gives what
    # PyTorch's float32 F.rms_norm gives (zeros where the row's rstd underflows to 0).
    x = torch.tensor([[3e19, 1.0, -2.0, 4.0]])
    assert_same_specials(ops.rms_norm(x), F.rms_norm(x, (4,), None, 1e-6), "rms_norm")


# ---------------------------------------------------------------------------------------------
# Determinism: bitwise the same outputs and gradients, run to run and at 1 or 2 threads
# ---------------------------------------------------------------------------------------------
def _every_op(gen_seed: int = 0):
    """One call of every op (forward and backward) on inputs large enough to be split across
    threads; returns every output and gradient."""
    g = torch.Generator().manual_seed(gen_seed)
    rn = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=g).to(dt).requires_grad_()  # noqa: E731
    out = []

    def fb(outs, ins):
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        gs = [torch.ones_like(o) * 0.37 for o in outs]
        grads = torch.autograd.grad(outs, ins, gs, allow_unused=True)
        out.extend([o.detach() for o in outs] + [x for x in grads if x is not None])

    x, r, w, b = rn(1024, 768), rn(1024, 768), rn(768), rn(768)
    fb(ops.rms_norm(x, w), [x, w])
    fb(ops.add_rms_norm(x, r, w, weight_offset=1.0), [x, r, w])
    fb(ops.layer_norm(x, w, b), [x, w, b])
    fb(ops.add_layer_norm(x, r, w, b), [x, r, w, b])
    # float32 weights too: a bfloat16 weight gradient's final rounding can hide a difference in
    # the order of its float32 sum.
    xf, wf, bf = rn(300, 1000, dt=torch.float32), rn(1000, dt=torch.float32), rn(1000, dt=torch.float32)
    fb(ops.rms_norm(xf, None), [xf])
    fb(ops.rms_norm(xf, wf), [xf, wf])
    fb(ops.layer_norm(xf, wf, bf), [xf, wf, bf])
    fb(ops.glu(x, r, "silu"), [x, r])
    fb(ops.glu_packed(x, "gelu_tanh", False), [x])
    fb(ops.act(x, "gelu"), [x])
    cos, sin = ops.rope_cache(64, 512)
    q, k = rn(4, 256, 8, 128), rn(4, 256, 2, 128)
    fb(ops.apply_rope(q, k, cos, sin, offset=7), [q, k])
    wq, wk = rn(128), rn(128)
    fb(ops.qk_norm_rope(q, k, wq, wk, cos, sin), [q, k, wq, wk])
    wq2, wk2 = rn(8 * 128), rn(2 * 128)
    fb(ops.qk_norm_rope(q, k, wq2, wk2, cos, sin, per_head=False, interleaved=True), [q, k, wq2, wk2])
    logits = rn(512, 3000)
    t = torch.randint(0, 3000, (512,), generator=g)
    t[::5] = -100
    fb(ops.cross_entropy(logits, t, softcap=30.0, z_loss_coef=1e-4, label_smoothing=0.1,
                         reduction="none"), [logits])
    s, bias = rn(2, 4, 256, 600), rn(4, 1, 600)
    fb(ops.softmax(s, scale=0.1, softcap=20.0, causal=True, window=100, bias=bias), [s, bias])
    fb(ops.softcap(s, 5.0), [s])
    # Last: the outputs that pass through torch's matmuls (_N_MATMUL_OUTPUTS of them).
    hid, head = rn(300, 64, dt=torch.float32), rn(1000, 64, dt=torch.float32)
    t2 = torch.randint(0, 1000, (300,), generator=g)
    fb(ops.linear_cross_entropy(hid, head, t2, softcap=10.0, chunk_size=64)[0], [hid, head])
    return out


_N_MATMUL_OUTPUTS = 3  # linear_cross_entropy: the loss, d hidden, d head


def _at_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_deterministic_run_to_run_and_across_threads():
    # Regression: the norm weight/bias gradients were summed over one partial row per thread,
    # so they changed (in the last bits) with the thread count; the chunks now depend on the
    # shape only.
    # What archext guarantees: its own kernels give the same bits at any thread count. The
    # matmuls of linear_cross_entropy are torch's (BLAS / oneDNN), whose summation order may
    # depend on the thread count on some CPUs (seen: 2.6e-9 in its hidden-state gradient on an
    # AVX-512 + AMX Xeon): those outputs are held to run-to-run equality at each thread count,
    # and to float32 rounding across thread counts.
    first = _at_threads(1, _every_op)
    again = _at_threads(1, _every_op)
    two = _at_threads(2, _every_op)
    two_again = _at_threads(2, _every_op)
    assert len(first) == len(again) == len(two) == len(two_again) > 40
    n_kernel = len(first) - _N_MATMUL_OUTPUTS
    for i, (a, b, c, d) in enumerate(zip(first, again, two, two_again)):
        assert torch.equal(a, b), f"output {i} differs run to run (1 thread)"
        assert torch.equal(c, d), f"output {i} differs run to run (2 threads)"
        if i < n_kernel:
            assert torch.equal(a, c), f"output {i} differs between 1 and 2 threads"
        else:
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


# The memory paths of cpu/prefault.h: fresh outputs populated a block at a time, large resident
# outputs written with streaming stores. Each must change no bit: the same calls run in two
# processes, the path on and off, under malloc settings that make it run (the test-hook
# counters show it did).
_PREFAULT_RUN = '''
import sys, torch
import test_reliability as t
torch.set_num_threads(2)
outs = t._every_op()
torch.save({"outs": outs, "count": torch.ops.archext_testing.prefault_blocks()}, sys.argv[1])
'''

_STREAM_RUN = '''
import sys, torch
from archext import ops
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
outs = []
for dt in (torch.float32, torch.bfloat16, torch.float16):
    x, r = (torch.randn(8192, 1024, generator=g).to(dt) for _ in range(2))
    w, b = (torch.randn(1024, generator=g).to(dt) for _ in range(2))
    for _ in range(2):  # the second call reuses the first's freed, resident buffers
        for y in [ops.rms_norm(x, w), ops.layer_norm(x, w, b), ops.layer_norm(x, None, None),
                  *ops.add_rms_norm(x, r, w, weight_offset=1.0), *ops.add_layer_norm(x, r, w, b)]:
            outs.append(y.clone())
            del y
torch.save({"outs": outs, "count": torch.ops.archext_testing.streamed_outputs()}, sys.argv[1])
'''


def _on_and_off(tmp_path, script, switch, malloc_env, asan_options=""):
    here = os.path.dirname(os.path.abspath(__file__))
    runs = {}
    for flag in ("1", "0"):
        env = dict(os.environ, **malloc_env, **{switch: flag},
                   PYTHONPATH=os.pathsep.join([here] + [p for p in sys.path if p]))
        if "ASAN_OPTIONS" in env:  # under scripts/sanitize.sh
            env["ASAN_OPTIONS"] += asan_options
        path = tmp_path / f"{switch}{flag}.pt"
        subprocess.run([sys.executable, "-c", script, str(path)], env=env, cwd=here,
                       check=True, timeout=300)
        runs[flag] = torch.load(path, weights_only=True)
    assert runs["0"]["count"] == 0
    assert len(runs["1"]["outs"]) == len(runs["0"]["outs"]) > 40
    for i, (a, b) in enumerate(zip(runs["1"]["outs"], runs["0"]["outs"])):
        assert torch.equal(a, b), f"output {i} differs with {switch}=0"
    return runs["1"]["count"]


def test_prefault_changes_no_result(tmp_path):
    # A fixed mmap threshold: every large buffer is a fresh mapping.
    # Under ASan, whose malloc fills the first 4 KiB of every block (so that each output looks
    # resident), the fill is turned off. (ASan's quarantine also keeps freed blocks from being
    # reused: its outputs are fresh.)
    blocks = _on_and_off(tmp_path, _PREFAULT_RUN, "ARCHEXT_PREFAULT",
                         {"MALLOC_MMAP_THRESHOLD_": "131072"}, ":max_malloc_fill_size=0")
    assert blocks > 100


def test_streaming_stores_change_no_result(tmp_path):
    # No mmap and no trimming: freed buffers stay on the heap, resident, and are reused (under
    # ASan, without its quarantine). The path's own threshold is half of one L3 instance, which
    # differs from host to host (32 MiB outputs are below it where an L3 reads as 480 MiB):
    # ARCHEXT_STREAM_MIN_BYTES forces it, so the test checks the path on any host.
    streamed = _on_and_off(tmp_path, _STREAM_RUN, "ARCHEXT_STREAM_STORES",
                           {"MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                            "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
                            "ARCHEXT_STREAM_MIN_BYTES": str(1 << 20)}, ":quarantine_size_mb=0")
    assert streamed > 0


# The CUDA kernels' packed paths against the scalar ones they stand beside (ARCHEXT_CUDA_VECTOR=0):
# one workload and one comparison, run on a GPU below and on the emulated kernels in
# tests/test_emu.py (at smaller sizes).
VECTOR_PATH_SIZES = {  # on a GPU: sizes that fill it; emulated: sizes the CPU runs in seconds
    "gpu": dict(seq=257, heads=12, k_heads=4, head_dim=128, rot=128, table=300, vocab=50304,
                masked=3000, rows=37, ignored=5, norm_rows=300, widths=(8192, 4096, 200, 1000)),
    "emu": dict(seq=17, heads=3, k_heads=2, head_dim=64, rot=64, table=40, vocab=2048, masked=300,
                rows=5, ignored=3, norm_rows=6, widths=(4096, 2048, 200, 1000)),
}


def vector_path_outputs(device, seq, heads, k_heads, head_dim, rot, table, vocab, masked, rows,
                        ignored, norm_rows, widths):
    """RoPE (out of place, backward, in place; k a head slice of a [B, H, S, D] tensor),
    cross-entropy with masked logits opening a row, LayerNorm forward and backward and the fused
    add + RMSNorm: the outputs of the kernels whose packed and scalar paths are compared."""
    torch.manual_seed(0)
    rope, ce, norm = [], [], []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for interleaved in (False, True):
            for r, in_place in ((rot, False), (rot // 2, False), (rot // 2, True), (rot // 4, True)):
                cos, sin = ops.rope_cache(r, table, device=device)
                q = torch.randn(2, seq, heads, head_dim, device=device, dtype=dtype)
                # k: k_heads of the heads of a [B, H, S, D] tensor
                k = torch.randn(2, heads, seq, head_dim, device=device, dtype=dtype).transpose(1, 2)
                k = k[:, :, :k_heads]
                if in_place:
                    ops.apply_rope_(q, k, cos, sin, offset=3, interleaved=interleaved)
                    rope += [q, k]
                else:
                    pos = torch.arange(seq, device=device) + 3
                    rope += list(torch.ops.archext.rope_fwd(q, k, cos, sin, pos, interleaved))
                    rope += list(torch.ops.archext.rope_bwd(q, k, cos, sin, pos, interleaved))
        x = torch.randn(rows, vocab, device=device, dtype=dtype) * 4
        x[0, :masked] = float("-inf")  # masked logits opening a row
        t = torch.randint(0, vocab, (rows,), device=device)
        t[0] = torch.randint(masked, vocab, ()).item()  # not a masked logit (its loss would be +inf)
        t[ignored] = -100
        for cap in (0.0, 30.0):
            loss, z, lse = torch.ops.archext.cross_entropy_fwd(x, t, -100, 0.0, 1e-4, cap)
            g = torch.ops.archext.cross_entropy_bwd(torch.rand_like(loss), torch.rand_like(z), x, t,
                                                    lse, -100, 0.0, 1e-4, cap)
            ce += [loss, z, lse, g]
    for dtype in (torch.float32, torch.bfloat16):
        for n in widths:
            x = torch.randn(norm_rows, n, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            y = ops.layer_norm(x, w, b, 1e-5)
            norm += [y.detach()] + list(torch.autograd.grad(y, (x, w, b), torch.randn_like(y)))
            r = torch.randn_like(x)
            norm += [t.detach() for t in ops.add_rms_norm(x, r, w, 1e-6, 1.0)]
    return {"rope": rope, "ce": ce, "norm": norm}


def assert_vector_paths_agree(on, off):
    """RoPE bitwise (the same float ops per pair), the cross-entropy and the norms to rounding
    (their row sums run in another order or over other thread counts)."""
    assert len(on["rope"]) == len(off["rope"]) == 3 * 2 * 12
    for i, (a, b) in enumerate(zip(on["rope"], off["rope"])):
        assert torch.equal(a, b), f"RoPE output {i} differs from the scalar kernel's"
    assert len(on["ce"]) == len(off["ce"]) == 3 * 2 * 4
    # The gradient in its dtype may round the other way: one ulp of it.
    rtol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
    for i, (a, b) in enumerate(zip(on["ce"], off["ce"])):
        assert torch.isfinite(a).all(), f"cross-entropy output {i}"
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol[a.dtype], atol=1e-7,
                                   msg=lambda m, i=i: f"cross-entropy output {i}: {m}")
    assert len(on["norm"]) == len(off["norm"]) == 2 * 4 * 6
    for i, (a, b) in enumerate(zip(on["norm"], off["norm"])):
        scale = b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol[a.dtype], atol=1e-5 * scale,
                                   msg=lambda m, i=i: f"norm output or gradient {i}: {m}")


_CUDA_VECTOR_RUN = """
import sys, torch
import test_reliability as t
outs = t.vector_path_outputs("cuda", **t.VECTOR_PATH_SIZES["gpu"])
torch.save({k: [o.cpu() for o in v] for k, v in outs.items()}, sys.argv[1])
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_vector_paths_match_scalar(tmp_path):
    # The packed RoPE and cross-entropy kernels, the norm forward's rows in registers and the
    # norm backward's register partial sums against the paths they stand beside
    # (ARCHEXT_CUDA_VECTOR=0, read once per process: one subprocess each).
    here = os.path.dirname(os.path.abspath(__file__))
    runs = {}
    for flag in ("1", "0"):
        env = dict(os.environ, ARCHEXT_CUDA_VECTOR=flag,
                   PYTHONPATH=os.pathsep.join([here] + [p for p in sys.path if p]))
        path = tmp_path / f"vector{flag}.pt"
        subprocess.run([sys.executable, "-c", _CUDA_VECTOR_RUN, str(path)], env=env, cwd=here,
                       check=True, timeout=300)
        runs[flag] = torch.load(path, weights_only=True)
    assert_vector_paths_agree(runs["1"], runs["0"])


# ---------------------------------------------------------------------------------------------
# Concurrency: many Python threads calling the ops at once
# ---------------------------------------------------------------------------------------------
def test_many_python_threads():
    n_threads, rounds = 8, 2
    want = [_every_op(seed) for seed in range(n_threads)]
    got = [None] * n_threads
    errors = []
    barrier = threading.Barrier(n_threads)

    def work(i):
        try:
            barrier.wait()
            for _ in range(rounds):  # every round must give the same answer
                res = _every_op(i)
                if got[i] is None:
                    got[i] = res
                else:
                    assert all(torch.equal(a, b) for a, b in zip(got[i], res))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    for i in range(n_threads):
        assert len(got[i]) == len(want[i])
        n_kernel = len(want[i]) - _N_MATMUL_OUTPUTS
        for j, (a, b) in enumerate(zip(got[i], want[i])):
            if j < n_kernel:
                assert torch.equal(a, b), f"thread {i}, output {j} differs from the single-threaded run"
            else:  # torch's matmul (see test_deterministic_run_to_run_and_across_threads)
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Error quality: every message names the op, the argument, what was expected and what was given
# (the existing bad-input tests cover the checks not listed here; docs/errors.md has them all)
# ---------------------------------------------------------------------------------------------
def _qk(per_head=True):
    q, k = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 2, 16)
    cos, sin = ops.rope_cache(16, 8)
    pos = torch.arange(3)
    _, _, rq, rk = A.qk_norm_rope_fwd(q, k, None, None, cos, sin, pos, 1e-6, 0.0, per_head, False)
    return q, k, cos, sin, pos, rq, rk


def _ce():
    x = torch.randn(3, 5)
    t = torch.tensor([0, 1, 2])
    loss, z, lse = A.cross_entropy_fwd(x, t, -100, 0.0, 0.0, 0.0)
    return x, t, loss, lse


X8 = lambda: torch.randn(2, 8)  # noqa: E731
ERROR_CASES = [
    # norms
    ("rms_bwd_weight", lambda: A.rms_norm_bwd(X8(), X8(), torch.ones(7), torch.ones(2), 0.0, None, True),
     r"archext::rms_norm_bwd: expected weight of shape \[8\] \(the last dimension of x\), got \[7\]"),
    ("rms_bwd_rstd_dtype", lambda: A.rms_norm_bwd(X8(), X8(), None, torch.ones(2).double(), 0.0, None, False),
     r"archext::rms_norm_bwd: expected rstd of dtype Float, got Double"),
    ("rms_bwd_rstd_device", lambda: A.rms_norm_bwd.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), X8(), X8(), None,
        torch.ones(2, device="meta"), 0.0, None, False),
     r"archext::rms_norm_bwd: expected rstd on cpu, got meta"),
    ("ln_bwd_mean_shape", lambda: A.layer_norm_bwd(X8(), X8(), None, torch.ones(2, 1), torch.ones(2), None, False, False),
     r"archext::layer_norm_bwd: expected mean of shape \[2\] \(x.shape\[:-1\]\), got \[2, 1\]"),
    ("ln_bwd_grad_h_shape", lambda: A.layer_norm_bwd(X8(), X8(), None, torch.ones(2), torch.ones(2), torch.ones(8), False, False),
     r"archext::layer_norm_bwd: expected grad_h of shape \[2, 8\] \(the shape of x\), got \[8\]"),
    ("ln_eps_nan", lambda: A.layer_norm_fwd(X8(), None, None, nan),
     r"archext::layer_norm_fwd: expected eps >= 0 and finite, got nan"),
    ("add_ln_bias_dtype", lambda: A.add_layer_norm_fwd(X8(), X8(), None, torch.ones(8).half(), 1e-5),
     r"archext::add_layer_norm_fwd: expected bias of dtype Float \(the dtype of x\), got Half"),
    ("ln_bwd_x_empty", lambda: A.layer_norm_bwd(torch.ones(2, 0), torch.ones(2, 0), None, torch.ones(2), torch.ones(2), None, False, False),
     r"archext::layer_norm_bwd: expected x with a non-empty last dimension, got shape \[2, 0\]"),
    # activations
    ("glu_gate_scalar_type", lambda: A.glu_bwd(X8().half(), X8(), X8(), "silu"),
     r"archext::glu_bwd: expected grad_y of dtype Float \(the dtype of gate\), got Half"),
    ("act_bwd_dtype", lambda: A.act_bwd(torch.ones(3).double(), torch.ones(3), "relu"),
     r"archext::act_bwd: expected grad_y of dtype Float \(the dtype of x\), got Double"),
    # rope
    ("rope_sin_shape", lambda: A.rope_fwd(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8), torch.ones(4, 2), torch.ones(4, 3), torch.arange(2), False),
     r"archext::rope_fwd: expected sin of dtype Float and shape \[4, 2\] \(that of cos\), got Float of shape \[4, 3\]"),
    ("rope_cos_device", lambda: A.rope_fwd.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8),
        torch.ones(4, 2, device="meta"), torch.ones(4, 2, device="meta"), torch.arange(2), False),
     r"archext::rope_fwd: expected cos and sin on cpu \(the device of q\), got meta and meta"),
    ("rope_bwd_names", lambda: A.rope_bwd(torch.ones(1, 2, 1, 8), torch.ones(1, 3, 1, 8), torch.ones(4, 2), torch.ones(4, 2), torch.arange(2), False),
     r"archext::rope_bwd: expected grad_k of shape \[1, 2, heads, 8\] \(batch, seq and head_dim of grad_q\), got \[1, 3, 1, 8\]"),
    ("rope_inplace_same", lambda: (lambda t: A.rope_fwd_(t, t, torch.ones(4, 2), torch.ones(4, 2), torch.arange(2), False))(torch.ones(1, 2, 1, 8)),
     r"archext::rope_fwd_: q and k must not be the same memory"),
    # qk_norm_rope (new checks)
    ("qk_rstd_shape", lambda: (lambda q, k, c, s, p, rq, rk: A.qk_norm_rope_bwd(q, k, q, k, None, None, c, s, p, rq[:1].clone(), rk, 0.0, True, False))(*_qk()),
     r"archext::qk_norm_rope_bwd: expected q_rstd of shape \[2, 3, 4\] \(batch, seq, heads of q\), got \[1, 3, 4\]"),
    ("qk_rstd_shape_per_token", lambda: (lambda q, k, c, s, p, rq, rk: A.qk_norm_rope_bwd(q, k, q, k, None, None, c, s, p, rq, rk[:, :2].clone(), 0.0, False, False))(*_qk(False)),
     r"archext::qk_norm_rope_bwd: expected k_rstd of shape \[2, 3\] \(batch, seq of k\), got \[2, 2\]"),
    ("qk_rstd_dtype", lambda: (lambda q, k, c, s, p, rq, rk: A.qk_norm_rope_bwd(q, k, q, k, None, None, c, s, p, rq.half(), rk, 0.0, True, False))(*_qk()),
     r"archext::qk_norm_rope_bwd: expected q_rstd of dtype Float, got Half"),
    ("qk_eps", lambda: (lambda q, k, c, s, p, rq, rk: A.qk_norm_rope_fwd(q, k, None, None, c, s, p, -1e-6, 0.0, True, False))(*_qk()),
     r"archext::qk_norm_rope_fwd: expected eps >= 0 and finite, got -1e-06"),
    ("qk_weight_dtype", lambda: (lambda q, k, c, s, p, rq, rk: A.qk_norm_rope_fwd(q, k, None, torch.ones(16).half(), c, s, p, 1e-6, 0.0, True, False))(*_qk()),
     r"archext::qk_norm_rope_fwd: expected k_weight of dtype Float \(the dtype of q\), got Half"),
    ("qk_grad_k_shape", lambda: (lambda q, k, c, s, p, rq, rk: A.qk_norm_rope_bwd(q, q, q, k, None, None, c, s, p, rq, rk, 0.0, True, False))(*_qk()),
     r"archext::qk_norm_rope_bwd: expected grad_k of shape \[2, 3, 2, 16\] \(the shape of k\), got \[2, 3, 4, 16\]"),
    # cross-entropy
    ("ce_bwd_grad_loss", lambda: (lambda x, t, l, lse: A.cross_entropy_bwd(l.half(), None, x, t, lse, -100, 0.0, 0.0, 0.0))(*_ce()),
     r"archext::cross_entropy_bwd: expected grad_loss of dtype Float and shape \[3\] on cpu, got Half of shape \[3\] on cpu"),
    ("ce_bwd_lse_shape", lambda: (lambda x, t, l, lse: A.cross_entropy_bwd(l, None, x, t, lse[:2], -100, 0.0, 0.0, 0.0))(*_ce()),
     r"archext::cross_entropy_bwd: expected lse of dtype Float and shape \[3\] on cpu, got Float of shape \[2\] on cpu"),
    ("ce_bwd_grad_z", lambda: (lambda x, t, l, lse: A.cross_entropy_bwd(l, l[None], x, t, lse, -100, 0.0, 0.0, 0.0))(*_ce()),
     r"expected grad_z_loss of dtype Float and shape \[3\] on cpu, got Float of shape \[1, 3\]"),
    ("ce_vocab_0", lambda: A.cross_entropy_fwd(torch.ones(2, 0), torch.zeros(2, dtype=torch.long), -100, 0.0, 0.0, 0.0),
     r"archext::cross_entropy_fwd: expected a vocab of at least 1 entry, got logits of shape \[2, 0\]"),
    ("ce_smoothing_nan", lambda: A.cross_entropy_fwd(torch.ones(2, 3), torch.zeros(2, dtype=torch.long), -100, nan, 0.0, 0.0),
     r"expected label_smoothing in \[0, 1\], got nan"),
    ("ce_z_inf", lambda: A.cross_entropy_fwd(torch.ones(2, 3), torch.zeros(2, dtype=torch.long), -100, 0.0, inf, 0.0),
     r"expected z_loss_coef >= 0, got inf"),
    ("ce_cap_nan", lambda: A.cross_entropy_fwd(torch.ones(2, 3), torch.zeros(2, dtype=torch.long), -100, 0.0, 0.0, nan),
     r"archext::cross_entropy_fwd: expected softcap >= 0 \(0 = off\) and finite, got nan"),
    ("ce_target_device", lambda: A.cross_entropy_fwd.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), torch.ones(2, 3),
        torch.zeros(2, dtype=torch.long, device="meta"), -100, 0.0, 0.0, 0.0),
     r"archext::cross_entropy_fwd: expected target on cpu \(the device of logits\), got meta"),
    # softmax / softcap
    ("softmax_scale_inf", lambda: A.softmax_fwd(torch.ones(2, 3), None, inf, 0.0, False, -1),
     r"archext::softmax_fwd: expected a finite scale, got inf"),
    ("softmax_window", lambda: A.softmax_fwd(torch.ones(2, 3), None, 1.0, 0.0, True, 0),
     r"archext::softmax_fwd: expected window >= 1 \(or -1 for none\), got 0"),
    ("softmax_rank1", lambda: A.softmax_fwd(torch.ones(3), None, 1.0, 0.0, False, -1),
     r"archext::softmax_fwd: expected scores x of rank 2 to 4 \(\[batch, heads, q_len, k_len\] or fewer\), got \[3\]"),
    ("softmax_bias_dtype", lambda: A.softmax_fwd(torch.ones(2, 3), torch.ones(3).half(), 1.0, 0.0, False, -1),
     r"archext::softmax_fwd: expected bias of dtype Float \(the dtype of x\), got Half"),
    ("softmax_bwd_grad_y", lambda: A.softmax_bwd(torch.ones(2, 4), torch.ones(2, 3), None, 1.0, 0.0, False),
     r"archext::softmax_bwd: expected grad_y of shape \[2, 3\] \(the shape of y\), got \[2, 4\]"),
    ("softmax_bwd_x", lambda: A.softmax_bwd(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3, 3), 1.0, 2.0, False),
     r"archext::softmax_bwd: expected x of shape \[2, 3\] \(the shape of y\), got \[3, 3\]"),
    ("softcap_bwd_cap", lambda: A.softcap_bwd(torch.ones(3), torch.ones(3), -1.0),
     r"archext::softcap_bwd: expected cap > 0 and finite, got -1"),
    ("softcap_dtype", lambda: A.softcap_fwd(torch.ones(3, dtype=torch.int64), 1.0),
     r"archext::softcap_fwd: expected x to be float32, float16, bfloat16 \(or float64 on the CPU\), got Long"),
]


@pytest.mark.parametrize("call, match", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_error_messages(call, match):
    with pytest.raises(RuntimeError, match=match) as info:
        call()
    msg = str(info.value).splitlines()[0]
    # Every message: the op, then "expected ..." (or the rule broken), then what was given.
    assert msg.startswith("archext::"), msg


# ---------------------------------------------------------------------------------------------
# More than 2^31 elements: no 32-bit index overflow
# ---------------------------------------------------------------------------------------------
def _mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


HUGE_SKIP = os.environ.get("ARCHEXT_SANITIZED") == "1"


@pytest.mark.slow
@pytest.mark.skipif(HUGE_SKIP, reason="not under the sanitizers (shadow memory)")
def test_huge_rms_norm_and_cross_entropy():
    """bfloat16 RMSNorm over [2^31 / 4096 + 1, 4096] (2^31 + 4096 elements: the last row starts
    at element 2^31) and cross-entropy over [2^14 + 1, 2^17] logits (2^31 + 2^17), forward and
    the cross-entropy backward; sampled rows against the float64 reference, the rows on both
    sides of element 2^31 included. Peak ~8.1 GiB (two 4 GiB bfloat16 tensors at a time)."""
    if _mem_available_gib() < 10:
        pytest.skip(f"needs ~10 GiB free, {_mem_available_gib():.1f} GiB available")
    n = 4096
    rows = 2**31 // n + 1
    gen = torch.Generator().manual_seed(0)
    block = torch.randn(61, n, generator=gen).bfloat16()  # 61: rows repeat at a prime period
    x = torch.empty(rows, n, dtype=torch.bfloat16)
    full = rows // 61 * 61
    x[:full].view(-1, 61, n).copy_(block.expand(rows // 61, 61, n))
    x[full:] = block[: rows - full]
    # A shift per row (period 97), so that no two rows 2^31 elements apart are alike.
    x += ((torch.arange(rows) % 97).float() * 0.05 - 2.4).bfloat16()[:, None]
    w = (torch.rand(n, generator=gen) + 0.5).bfloat16()
    y, rstd = A.rms_norm_fwd(x, w, 1e-6, 0.0)
    assert y.shape == x.shape and x.numel() > 2**31
    check = [0, 1, rows // 2, rows - 3, rows - 2, rows - 1]  # rows - 1 starts at 2^31
    x64 = x[check].double()
    want = ref.rms_norm(x64, w.double(), 1e-6)
    assert_close(y[check], want, name="huge rms_norm")
    torch.testing.assert_close(rstd[check].double(), torch.rsqrt(x64.pow(2).mean(-1) + 1e-6),
                               rtol=1e-5, atol=0)
    del x, y, rstd

    vocab = 2**17
    n_rows = 2**14 + 1
    logits = torch.empty(n_rows, vocab, dtype=torch.bfloat16)
    lb = (torch.randn(7, vocab, generator=gen) * 3).bfloat16()
    full = n_rows // 7 * 7
    logits[:full].view(-1, 7, vocab).copy_(lb.expand(n_rows // 7, 7, vocab))
    logits[full:] = lb[: n_rows - full]
    logits += ((torch.arange(n_rows) % 13).float() * 0.5).bfloat16()[:, None]
    t = (torch.arange(n_rows) * 7919) % vocab
    loss, z, lse = A.cross_entropy_fwd(logits, t, -100, 0.0, 1e-4, 30.0)
    check = [0, 1, n_rows // 2, n_rows - 2, n_rows - 1]  # the last row starts at 2^31
    l64, z64 = ref.cross_entropy(logits[check].double(), t[check], -100, 0.0, 1e-4, 30.0, "none")
    assert_close(loss[check], l64, name="huge cross_entropy loss")
    grad = A.cross_entropy_bwd(torch.ones_like(loss), None, logits, t, lse, -100, 0.0, 1e-4, 30.0)
    x64 = logits[check].double().requires_grad_()
    ref.cross_entropy(x64, t[check], -100, 0.0, 1e-4, 30.0, "none")[0].sum().backward()
    assert_close(grad[check], x64.grad, grad=True, name="huge cross_entropy grad")
