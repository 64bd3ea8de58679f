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
    for cls in ("matmul", "attention", "norm", "activation", "rope", "loss"):
        assert analytic[cls]["flops"] > 0 and analytic[cls]["bytes"] > 0, cls
        assert times[cls] > 0, cls
    # Matmuls do most of the arithmetic; norms and pointwise ops far less per byte moved.
    assert max(analytic, key=lambda c: analytic[c]["flops"]) == "matmul"
    ai = {c: analytic[c]["flops"] / analytic[c]["bytes"] for c in analytic}
    assert ai["matmul"] > 3 * ai["norm"]
    for m in rep["modes"]:
        assert m["tokens_per_s"] > 0 and m["peak_mem_bytes"] > 0
    assert (out / "profile_classes.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_profile_compile_mode(tmp_path):
    """The torch.compile column (compiling takes ~15 s on 2 cores, hence slow)."""
    rc = cli.main(["profile", "--preset", "tiny", "--steps", "2", "--warmup", "1",
                   "--modes", "pytorch+compile", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    (mode,) = json.loads((tmp_path / "profile.json").read_text())["modes"]
    assert mode["mode"] == "pytorch+compile" and mode["tokens_per_s"] > 0
