"""The benchmark CLI runs end to end (a smoke test: no timing is asserted)."""
import json

from archext import bench


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
