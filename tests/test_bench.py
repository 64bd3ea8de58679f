"""The benchmark CLIs run end to end (smoke tests: no timing is asserted)."""
import json

import pytest

from archext import bench
from archext.bench import kernels


def test_bench_cli_small(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = bench.main(["--shape", "64x256", "--threads", "1", "--no-compile", "--no-copy-bw",
                     "--min-time", "0.01", "--rounds", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for op in ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm"):
        assert op in text
    rows = json.loads(out.read_text())
    assert len(rows["results"] if isinstance(rows, dict) else rows) > 0


def test_bench_cli_activation_ops(tmp_path, capsys):
    out = tmp_path / "a.json"
    rc = bench.main(["--ops", "glu,act", "--shape", "32x200", "--threads", "1", "--no-compile",
                     "--no-copy-bw", "--min-time", "0.01", "--rounds", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for op in kernels.OP_GROUPS["activation"]:
        assert op in text
    recs = json.loads(out.read_text())["results"]
    assert len(recs) == 8 * 2 * 2 and all(r["status"] == "ok" for r in recs)
    floors = {(r["op"], r["mode"]): r["floor_expr"] for r in recs}
    assert floors[("swiglu", "fwd")] == "torch.add(gate, up)"
    assert floors[("gelu", "fwd+bwd")] == "x.clone(); torch.add(grad_y, x)"


def test_bench_cli_rejects_unknown_op(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--ops", "swiglu,foo"])
    assert "unknown op 'foo'" in capsys.readouterr().err


def test_bench_rope_subcommand_small(capsys):
    rc = bench.main(["rope", "--seq", "16", "--threads", "1", "--dtype", "float32", "--no-compile",
                     "--min-time", "0"])
    assert rc == 0
    assert "| float32 | 1x16x32/8x128 | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize("sub,prog", [(None, "archext-bench"), ("rope", "archext-bench rope"),
                                      ("loss", "archext-bench loss")])
def test_bench_subcommand_help(sub, prog, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(([sub] if sub else []) + ["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


def test_bench_loss_runs_small():
    from archext.bench import loss

    ce = loss.bench_ce(8, 300, 1, False, 0.0)
    sm = loss.bench_softmax(1, 2, 16, 1, False, 0.0)
    for r in (ce, sm):
        assert r["archext_s"] > 0 and r["floor_s"] > 0 and r["eager_s"] > 0


# ---------------------------------------------------------------------------------------------
# The Liger-Kernel baselines. Liger is Triton (GPU only), so here a stand-in `liger_kernel`
# package, injected into sys.modules, checks the arguments and layouts the glue passes and
# computes the op with archext.reference; the RoPE and SwiGLU stand-ins write into their inputs
# as Liger does, so the benchmarks' private copies are checked too.
# ---------------------------------------------------------------------------------------------
import sys
import types

import torch
import torch.nn.functional as F

from archext import reference
from archext.bench import liger


def _rms_apply(X, W, eps, offset=0.0, casting_mode="llama", in_place=True, row_mode=None):
    assert (eps, offset, casting_mode, in_place) == (1e-6, 0.0, "llama", True)
    return F.rms_norm(X, (X.shape[-1],), W, eps)


def _add_rms_apply(X, R, W, eps):
    assert eps == 1e-6
    h = X + R
    return F.rms_norm(h, (h.shape[-1],), W, eps), h


def _ln_apply(X, W, B, eps):
    assert eps == 1e-5
    return F.layer_norm(X, (X.shape[-1],), W, B, eps)


class _SiLUMul(torch.autograd.Function):
    """Liger's SwiGLU contract: the backward writes d gate and d up into gate and up."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        s = torch.sigmoid(a)
        da = dc * b * s * (1 + a * (1 - s))
        db = dc * F.silu(a)
        a.copy_(da)
        b.copy_(db)
        return a, b


def _gelu_mul_apply(a, b):
    return F.gelu(a, approximate="tanh") * b


def _rope_apply(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):
    """Liger's RoPE contract: q [B, Hq, S, D], k [B, Hk, S, D], cos / sin [S, D] duplicated
    halves, in q's dtype; rotates in place."""
    B, Hq, S, D = q.shape
    assert k.shape[0] == B and k.shape[2:] == (S, D) and cos.shape == sin.shape == (S, D)
    assert cos.dtype == q.dtype and torch.equal(cos[:, : D // 2], cos[:, D // 2:])
    half_c, half_s = cos[:, : D // 2].float(), sin[:, : D // 2].float()
    pos = torch.arange(S)
    qo = reference.rope(q.transpose(1, 2), half_c, half_s, pos)
    ko = reference.rope(k.transpose(1, 2), half_c, half_s, pos)
    with torch.no_grad():
        q.copy_(qo.transpose(1, 2))
        k.copy_(ko.transpose(1, 2))
    return qo.transpose(1, 2), ko.transpose(1, 2)


def _ce_apply(x, t, weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap,
              return_z_loss):
    assert (weight, ignore_index, label_smoothing, reduction, return_z_loss) == (
        None, -100, 0.0, "mean", False)
    from archext.bench.loss import eager_ce

    return eager_ce(x, t, softcap, lse_square_scale), None, None, None


def _flce_apply(h, w, t, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
                reduction, softcap, return_z_loss):
    assert h.shape[1] == w.shape[1] and t.shape == h.shape[:1]
    assert (bias, ce_weight, ignore_index, reduction, return_z_loss) == (
        None, None, -100, "mean", False)
    from archext.bench.loss import eager_ce

    return eager_ce((h @ w.t()).float(), t, softcap, lse_square_scale), None, None, None


@pytest.fixture
def fake_liger(monkeypatch):
    calls = []

    def fn_class(name, apply):
        def recorded(*a):
            calls.append((name, a))
            return apply(*a)
        return type(name, (), {"apply": staticmethod(recorded)})

    mods = {
        "liger_kernel": dict(__version__="0.0-fake"),
        "liger_kernel.ops": {},
        "liger_kernel.ops.rms_norm": dict(LigerRMSNormFunction=fn_class("rms", _rms_apply)),
        "liger_kernel.ops.fused_add_rms_norm": dict(
            LigerFusedAddRMSNormFunction=fn_class("add_rms", _add_rms_apply)),
        "liger_kernel.ops.layer_norm": dict(LigerLayerNormFunction=fn_class("ln", _ln_apply)),
        "liger_kernel.ops.swiglu": dict(LigerSiLUMulFunction=fn_class("swiglu", _SiLUMul.apply)),
        "liger_kernel.ops.geglu": dict(LigerGELUMulFunction=fn_class("geglu", _gelu_mul_apply)),
        "liger_kernel.ops.rope": dict(LigerRopeFunction=fn_class("rope", _rope_apply)),
        "liger_kernel.ops.cross_entropy": dict(LigerCrossEntropyFunction=fn_class("ce", _ce_apply)),
        "liger_kernel.ops.fused_linear_cross_entropy": dict(
            LigerFusedLinearCrossEntropyFunction=fn_class("flce", _flce_apply)),
    }
    for name, attrs in mods.items():
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
    # The glue runs Liger on CUDA only; here the stand-in runs on the CPU.
    monkeypatch.setattr(liger, "why_absent", lambda device: None)
    liger.version.cache_clear()
    yield calls
    liger.version.cache_clear()


def test_liger_absent_on_cpu():
    assert liger.why_absent("cpu") == "Liger-Kernel is Triton: GPU only"
    impl, why = liger.kernel_impl("rms_norm", "cpu")
    assert impl is None and "GPU only" in why


def test_bench_liger_column(fake_liger, tmp_path, capsys):
    out = tmp_path / "l.json"
    rc = bench.main(["--ops", "rms_norm,add_rms_norm,layer_norm,swiglu,geglu,geglu_tanh",
                     "--shape", "16x64", "--threads", "1", "--no-compile", "--no-copy-bw",
                     "--min-time", "0.001", "--rounds", "1", "--json", str(out)])
    assert rc == 0
    assert "vs liger" in capsys.readouterr().out
    recs = json.loads(out.read_text())["results"]
    for r in recs:
        d = r["derived"]
        assert d["x_copy"] > 0 and d["copy_gbs"] > 0 and r["copy_floor_expr"]
        if r["op"] == "geglu":  # Liger's GeGLU is the tanh one
            assert "liger" not in r["impls"] and "tanh" in r["liger"]
            continue
        assert r["impls"]["liger"]["median_ms"] > 0 and d["vs_liger"] > 0, r["op"]
        assert not any("Liger" in n for n in r["notes"]), r["notes"]
    names = {c[0] for c in fake_liger}
    assert names == {"rms", "add_rms", "ln", "swiglu", "geglu"}


def test_liger_candidate_keeps_the_inputs(fake_liger):
    """SwiGLU's backward writes into gate and up: Liger gets copies, restored before each call,
    and the tensors the other candidates use are left alone."""
    from archext.bench import kernels

    spec = kernels.OPS["swiglu"]
    x, r, w, b, g = kernels.make_inputs(spec, (8, 32), torch.float32, "cpu", "fwd+bwd", 0)
    saved = [t.detach().clone() for t in (x, r, g)]
    names, want = kernels.run_outputs(spec.eager, x, r, w, b, "fwd+bwd", g)
    args = types.SimpleNamespace(grad_api="autograd.grad", verbose=False)
    rec = {"notes": [], "impls": {}}
    cand = kernels.liger_candidate(spec, x, r, w, b, "fwd+bwd", g, torch.device("cpu"),
                                   torch.float32, 8, names, want, rec, args)
    assert cand is not None and rec["notes"] == []
    for _ in range(3):
        cand.pre()
        grads = cand.fn()
        torch.testing.assert_close(list(grads), want[1:])
    for t, s in zip((x, r, g), saved):
        assert torch.equal(t.detach(), s)


def test_bench_rope_liger(fake_liger):
    from archext.bench import rope

    (row,) = rope.run(1, 16, 4, 2, 32, torch.float32, [1], "cpu", False, 0.0)
    assert row["liger"] > 0 and row["liger fwd+bwd"] > 0 and row["copy"] > 0
    assert [c[0] for c in fake_liger].count("rope") >= 3
    cells = [c.strip() for c in rope.format_row(row).split("|")[1:-1]]
    for col in ("liger ms", "vs liger", "fwd+bwd vs liger", "copy_ ms", "x copy_"):
        assert cells[rope.COLUMNS.index(col)] not in ("-", ""), col


def test_bench_loss_liger(fake_liger):
    from archext.bench import loss

    ce = loss.bench_ce(8, 300, 1, False, 0.0)
    assert ce["liger_s"] > 0 and ce["copy_s"] > 0 and "liger_note" not in ce
    (_, args), = [c for c in fake_liger if c[0] == "ce"][:1]
    assert args[4] == 1e-4 and args[7] == 30.0  # z-loss coefficient, soft-cap
    lce = loss.bench_linear_ce_cuda(16, 8, 40, torch.float32, False, 0.0, device="cpu")
    for name in ("archext", "archext_256", "eager", "liger"):
        assert lce[f"{name}_s"] > 0 and f"{name}_error" not in lce, lce


def test_liger_signatures_match_the_glue():
    """Against the real package, where it imports: the positional arguments the glue passes are
    the parameters of the version installed."""
    import inspect

    pytest.importorskip("liger_kernel.ops.rms_norm")
    ops = "liger_kernel.ops."

    def params(mod, cls):
        f = getattr(__import__(ops + mod, fromlist=[cls]), cls).forward
        return list(inspect.signature(f).parameters)[1:]  # after ctx
    assert params("rms_norm", "LigerRMSNormFunction")[:6] == [
        "X", "W", "eps", "offset", "casting_mode", "in_place"]
    assert params("fused_add_rms_norm", "LigerFusedAddRMSNormFunction")[:4] == ["X", "R", "W", "eps"]
    assert params("layer_norm", "LigerLayerNormFunction") == ["X", "W", "B", "eps"]
    assert params("swiglu", "LigerSiLUMulFunction")[:2] == ["a", "b"]
    assert params("geglu", "LigerGELUMulFunction") == ["a", "b"]
    assert params("rope", "LigerRopeFunction")[:4] == ["q", "k", "cos", "sin"]
    assert params("cross_entropy", "LigerCrossEntropyFunction")[:9] == [
        "_input", "target", "weight", "ignore_index", "lse_square_scale", "label_smoothing",
        "reduction", "softcap", "return_z_loss"]
    assert params("fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")[:11] == [
        "_input", "weight", "target", "bias", "ce_weight", "ignore_index", "lse_square_scale",
        "label_smoothing", "reduction", "softcap", "return_z_loss"]


def test_attention_bench_runs(capsys):
    from archext.bench import main

    assert main(["attention", "--seqs", "64,96", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "materialized" in out and "tiled" in out and "mem" in out


def test_attention_bench_against_sdpa_runs():
    from archext.bench.attention import against_sdpa

    rows = against_sdpa(shapes=((2, 16, 2, 8),), rounds=1)
    assert len(rows) == 1 and set(rows[0]) == {"shape", "sdpa", "tiled", "sdpa fwd", "tiled fwd"}
    assert all(rows[0][k] > 0 for k in ("sdpa", "tiled", "sdpa fwd", "tiled fwd"))
