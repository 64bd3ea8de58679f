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
