"""archext profile on a tiny model: the per-class table, the JSON and the chart."""
import json

import pytest

from archext import cli


def test_profile_smoke(tmp_path, capsys):
    out = tmp_path / "prof"
    rc = cli.main(["profile", "--preset", "tiny", "--steps", "2", "--warmup", "1",
                   "--modes", "archext,pytorch", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| matmul |" in printed and "plain PyTorch (reference ops)" in printed
    rep = json.loads((out / "profile.json").read_text())
    main, plain = rep["modes"]
    assert main["mode"] == "archext" and plain["mode"] == "pytorch"
    times, analytic = main["class_time_s"], main["analytic"]
    assert sum(times.values()) > 0
    for cls in ("matmul", "attention", "norm", "activation", "rope", "loss", "residual",
                "optimizer"):
        assert analytic[cls]["flops"] > 0 and analytic[cls]["bytes"] > 0, cls
        assert times[cls] > 0, cls
    # The archext modes take the fused AdamW (the fastest measured), plain PyTorch its default.
    assert (main["optimizer"], plain["optimizer"]) == ("fused", "default")
    assert "| AdamW |" in printed
    # Matmuls do most of the arithmetic; norms and pointwise ops far less per byte moved.
    assert max(analytic, key=lambda c: analytic[c]["flops"]) == "matmul"
    ai = {c: analytic[c]["flops"] / analytic[c]["bytes"] for c in analytic}
    assert ai["matmul"] > 3 * ai["norm"]
    for m in rep["modes"]:
        assert m["tokens_per_s"] > 0 and m["peak_mem_bytes"] > 0
    assert (out / "profile_classes.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_profile_compile_mode(tmp_path):
    """The torch.compile columns, plain PyTorch and the archext kernels under it (compiling
    takes ~15 s each on 2 cores, hence slow)."""
    rc = cli.main(["profile", "--preset", "tiny", "--steps", "2", "--warmup", "1",
                   "--modes", "pytorch+compile,archext+compile", "--device", "cpu",
                   "--out", str(tmp_path)])
    assert rc == 0
    modes = json.loads((tmp_path / "profile.json").read_text())["modes"]
    assert [m["mode"] for m in modes] == ["pytorch+compile", "archext+compile"]
    assert all(m["tokens_per_s"] > 0 for m in modes)


def test_profile_liger_mode_skipped_on_cpu(tmp_path, capsys):
    """Liger-Kernel is Triton: on the CPU the HF + Liger run is skipped with a note."""
    rc = cli.main(["profile", "--preset", "tiny", "--steps", "1", "--warmup", "1",
                   "--modes", "archext,liger", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    rep = json.loads((tmp_path / "profile.json").read_text())
    assert [m["mode"] for m in rep["modes"]] == ["archext"]
    assert "GPU only" in rep["skipped"]["liger"]
    assert "Skipped: HF Llama + Liger-Kernel" in capsys.readouterr().out


def test_profile_liger_mode_glue(tmp_path, monkeypatch):
    """The HF baseline's own path, on the CPU with a stand-in for Liger's patch: the same model
    as a transformers LlamaForCausalLM, patched, trained a step at a time."""
    import sys
    import types

    pytest.importorskip("transformers")
    from archext import profile

    patched = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = lambda model=None, **kw: patched.append(model)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setattr(profile, "liger_unavailable", lambda device, cfg: None)
    rc = cli.main(["profile", "--preset", "tiny", "--steps", "2", "--warmup", "1",
                   "--modes", "archext,liger", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    (hf,) = patched
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config._attn_implementation == "sdpa"
    modes = json.loads((tmp_path / "profile.json").read_text())["modes"]
    assert [m["mode"] for m in modes] == ["archext", "liger"]
    assert modes[1]["tokens_per_s"] > 0 and modes[1]["peak_mem_bytes"] > 0


def test_profile_optimizer_choice(tmp_path):
    """--optimizer gives every mode the same AdamW implementation."""
    rc = cli.main(["profile", "--preset", "tiny", "--steps", "1", "--warmup", "1",
                   "--modes", "archext,pytorch", "--optimizer", "foreach", "--device", "cpu",
                   "--out", str(tmp_path)])
    assert rc == 0
    modes = json.loads((tmp_path / "profile.json").read_text())["modes"]
    assert [m["optimizer"] for m in modes] == ["foreach", "foreach"]


def test_step_classes_residual_and_optimizer():
    """A bare add outside every module is a residual add; the optimizer's scope is its own."""
    from archext import profile

    from archext.models import build
    from archext.ablate import variants as V

    assert profile.op_class("aten::add") == "residual"
    model = build(V.make_base(V.CPU_BASE, {"n_layers": 1}))
    tagged = {type(m).__name__: profile.module_class(m) for m in model.modules()}
    assert tagged["PreNormBlock"] is None and tagged["AddRMSNorm"] == "norm"
    assert profile.op_class("aten::mm") == "matmul"
    assert "residual" in profile.CLASSES and "optimizer" in profile.CLASSES
