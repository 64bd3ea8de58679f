"""archext ablate / profile end to end on a tiny model (a few seconds each on 2 CPU cores)."""
import json
import math
import os

import pytest
import torch

from archext import cli
from archext.ablate import runner, variants
from archext.ablate.train import TrainSettings, count_spikes

# A model small enough for a few steps to take a second or two.
TINY = ["--base", "d_model=32,n_layers=1,n_heads=2,ffn_multiple_of=32", "--batch-size", "8",
        "--seq-len", "32", "--eval-batches", "2", "--device", "cpu", "--lr", "1e-2"]


def ablate(tmp_path, *args, out="run"):
    return cli.main(["ablate", *TINY, "--out", str(tmp_path / out), *args])


def load(tmp_path, out="run"):
    with open(tmp_path / out / "results.json") as fh:
        return json.load(fh)


def test_end_to_end(tmp_path, capsys):
    rc = ablate(tmp_path, "--variant", "relu:activation=relu", "--steps", "40")
    assert rc == 0
    printed = capsys.readouterr().out
    for col in ("val loss", "tokens/s", "peak MB", "params", "max |logit|", "spikes", "diverged"):
        assert col in printed
    d = tmp_path / "run"
    for f in ("results.json", "results.csv", "table.md", "loss_curves.png"):
        assert (d / f).stat().st_size > 0, f
    assert (d / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = load(tmp_path)
    assert [r["run"] for r in res["runs"]] == ["base", "relu"]
    for r in res["runs"]:
        assert not r["diverged"]
        # From ln(256) = 5.5 nats/byte untrained to well below it: the models learn.
        assert r["loss_curve"][0] > 5.0
        assert r["val_loss"] < r["loss_curve"][0] - 1.0
        assert r["val_curve"][-1][1] < r["val_curve"][0][1]
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0 and r["params"] > 0
        assert math.isfinite(r["max_abs_logit"]) and r["max_abs_logit"] > 0
    csv_lines = (d / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("run,variant,lr,seed,val_loss") and len(csv_lines) == 3


def test_resume_keeps_finished_runs(tmp_path, capsys, monkeypatch):
    args = ["--variant", "gelu:activation=gelu", "--variant", "post:norm_placement=post",
            "--steps", "6"]
    # Interrupted during the third run: the first two are kept.
    real = runner.train_variant
    calls = []

    def interrupt_third(cfg, settings, corpus, **kw):
        calls.append(cfg)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cfg, settings, corpus, **kw)

    monkeypatch.setattr(runner, "train_variant", interrupt_third)
    assert ablate(tmp_path, *args) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    runs = tmp_path / "run" / "runs"
    assert sorted(os.listdir(runs)) == ["base.json", "gelu.json"]
    assert [r["run"] for r in load(tmp_path)["runs"]] == ["base", "gelu"]  # partial outputs

    # Rerun: only the unfinished one trains.
    trained = []
    monkeypatch.setattr(runner, "train_variant",
                        lambda cfg, s, c, **kw: trained.append(kw["label"]) or real(cfg, s, c, **kw))
    before = (runs / "base.json").read_text()
    assert ablate(tmp_path, *args) == 0
    assert len(trained) == 1 and "post" in trained[0]
    assert "finished earlier" in capsys.readouterr().err
    assert (runs / "base.json").read_text() == before
    assert [r["run"] for r in load(tmp_path)["runs"]] == ["base", "gelu", "post"]

    # A deleted result is retrained; a changed setting retrains everything; --fresh too.
    (runs / "gelu.json").unlink()
    trained.clear()
    assert ablate(tmp_path, *args) == 0
    assert len(trained) == 1 and "gelu" in trained[0]
    trained.clear()
    assert ablate(tmp_path, *args[:-1], "5") == 0
    assert len(trained) == 3


@pytest.mark.parametrize("spec, message", [
    ("bad:d_modle=64", "'d_modle' is not a TransformerConfig field; did you mean 'd_model'?"),
    ("bad:norm=batchnorm", "variant 'bad'"),
    ("bad name:norm=layernorm", "use letters, digits"),
    ("x=1", "variant name 'x=1'"),
])
def test_bad_variant_spec(tmp_path, capsys, spec, message):
    assert ablate(tmp_path, "--variant", spec, "--steps", "2") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "runs").exists()  # rejected before anything trains


def test_bad_variant_file(tmp_path, capsys):
    f = tmp_path / "v.toml"
    f.write_text('[[variant]]\nname = "post"\nnorm_placement = "post"\n'
                 '[[variant]]\nnorm = "layernorm"\n')
    assert ablate(tmp_path, "--variants", str(f)) == 2
    assert "[[variant]] number 2 has no name" in capsys.readouterr().err
    f.write_text('[[variant]]\nname = "a"\nactivation = "relu"\n[[variant]]\nname = "a"\n')
    assert ablate(tmp_path, "--variants", str(f)) == 2
    assert "used twice" in capsys.readouterr().err


def test_variant_file_and_flags(tmp_path):
    f = tmp_path / "v.toml"
    f.write_text('[base]\nn_layers = 1\n[[variant]]\nname = "qk"\nqk_norm = "head"\n'
                 'about = "QK-norm"\n[[variant]]\nname = "base"\nqk_norm = "none"\n')
    base, vs = variants.load_toml(str(f))
    assert base == {"n_layers": 1}
    assert vs[0].overrides == {"qk_norm": "head"} and vs[0].describe() == "QK-norm"
    assert vs[1].overrides == {"qk_norm": None}
    v = variants.parse_variant_flag("zl:z_loss_coef=1e-4,final_softcap=30,tied_embeddings=true")
    assert v.overrides == {"z_loss_coef": 1e-4, "final_softcap": 30, "tied_embeddings": True}


def test_default_variants_resolve():
    """Every default variant is a valid config; gated and plain MLPs match in parameters."""
    from archext.models import build

    base = variants.make_base(variants.CPU_BASE, {})
    resolved = variants.resolve(base, list(variants.DEFAULT_VARIANTS))
    assert len(resolved) == len(variants.DEFAULT_VARIANTS) >= 12
    params = {v.name: build(c).num_parameters() for v, c in resolved
              if v.name in ("base", "relu", "gelu", "reglu", "geglu")}
    assert len(set(params.values())) == 1, params


def test_lr_sweep(tmp_path):
    # lr 10 blows up (the divergence rule must catch it); 1e-2 trains.
    rc = ablate(tmp_path, "--lr-sweep", "1e-2,10", "--only", "base", "--steps", "12",
                out="sweep")
    assert rc == 0
    res = load(tmp_path, "sweep")
    by_lr = {r["lr"]: r for r in res["runs"]}
    assert set(by_lr) == {1e-2, 10.0} and res["sweep"]
    assert not by_lr[1e-2]["diverged"]
    assert by_lr[10.0]["diverged"] and by_lr[10.0]["steps_run"] <= 12
    assert (tmp_path / "sweep" / "loss_vs_lr.png").stat().st_size > 0
    assert (tmp_path / "sweep" / "runs" / "base@lr0.01.json").exists()


def test_spike_rule_and_schedule():
    flat = [3.0] * 30
    assert count_spikes(flat) == 0
    assert count_spikes(flat[:25] + [3.6, 3.7] + flat[:5] + [4.0] + flat[:5]) == 2
    assert count_spikes(flat[:25] + [3.3] + flat[:5]) == 0  # +10%: noise, not a spike
    s = TrainSettings(steps=100, lr=1.0, warmup_frac=0.1, min_lr_ratio=0.1)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(99) == pytest.approx(0.1, abs=1e-3)
    assert all(s.lr_at(i) >= s.lr_at(i + 1) for i in range(10, 99))


def test_report_passes_through(capsys):
    assert cli.main(["report", "llama", "--set", "n_layers=2"]) == 0
    assert "parameters" in capsys.readouterr().out
    assert cli.main(["report", "no-such-preset"]) == 2


def test_seeds(tmp_path, capsys):
    assert ablate(tmp_path, "--only", "base,relu", "--seeds", "2", "--steps", "4") == 0
    printed = capsys.readouterr().out
    assert "mean ± std, 2 seeds" in printed and " ± " in printed.splitlines()[2]
    res = load(tmp_path)
    assert [(r["run"], r["seed"]) for r in res["runs"]] == [
        ("base.seed0", 0), ("base.seed1", 1), ("relu.seed0", 0), ("relu.seed1", 1)]
    # Different seeds, different batches and weights: different losses.
    assert res["runs"][0]["loss_curve"] != res["runs"][1]["loss_curve"]
    assert (tmp_path / "run" / "results.csv").read_text().count("\n") == 5


def test_data_file_and_folder(tmp_path, capsys):
    text = "the quick brown fox jumps over the lazy dog. " * 120
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(text)
    (tmp_path / "corpus" / "b.txt").write_text(text.upper())
    for i, path in enumerate([tmp_path / "corpus" / "a.txt", tmp_path / "corpus"]):
        assert ablate(tmp_path, "--only", "base", "--steps", "3", "--data", str(path),
                      out=f"d{i}") == 0
        assert str(path) in load(tmp_path, f"d{i}")["data"]
    assert load(tmp_path, "d1")["data"].startswith("2 .txt files")
    capsys.readouterr()
    assert ablate(tmp_path, "--only", "base", "--data", str(tmp_path / "missing")) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_stalled_rule():
    from archext.ablate.train import is_stalled

    assert is_stalled(3.25, False, 3.2467) and is_stalled(3.21, False, 3.2467)
    assert not is_stalled(3.0, False, 3.2467) and not is_stalled(3.3, True, 3.2467)
