"""archext ablate / profile end to end on a tiny model (a few seconds each on 2 CPU cores)."""
import json
import math
import os

import pytest
import torch

from archext import cli
from archext.ablate import runner, variants
from archext.ablate.train import TrainSettings, count_spikes

# A model small enough for a few steps to take a second or two; one process (the tests that
# replace train_variant need it in this one).
TINY = ["--base", "d_model=32,n_layers=1,n_heads=2,ffn_multiple_of=32", "--batch-size", "8",
        "--seq-len", "32", "--eval-batches", "2", "--device", "cpu", "--lr", "1e-2",
        "--jobs", "1"]


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
    """Every named variant is a valid config; gated and plain MLPs match in parameters; every
    claim's variant is in the default set."""
    from archext.ablate.claims import CLAIMS
    from archext.models import build

    base = variants.make_base(variants.CPU_BASE, {})
    named = list(variants.DEFAULT_VARIANTS + variants.MORE_VARIANTS)
    resolved = variants.resolve(base, named)
    assert len(resolved) == len(named) >= 13
    defaults = {v.name for v in variants.DEFAULT_VARIANTS}
    assert {c.variant for c in CLAIMS} | {"base"} == defaults
    assert set(variants.STABILITY_VARIANTS) <= defaults
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


# ----------------------------------------------------------------------------------------------
# The claims report
# ----------------------------------------------------------------------------------------------
def _run(variant, seed, val, lr=3e-3, tps=1000.0, diverged=False, stalled=False):
    return {"variant": variant, "seed": seed, "lr": lr, "val_loss": val, "tokens_per_s": tps,
            "diverged": diverged, "stalled": stalled}


def test_t_factor_and_paired():
    from archext.ablate import claims

    assert claims.t_factor(2) == pytest.approx(12.706)
    assert claims.t_factor(4) == pytest.approx(3.182)
    assert claims.t_factor(1000) == 1.96
    d = claims.paired([0.1, 0.2, 0.3])
    assert d["mean"] == pytest.approx(0.2) and d["std"] == pytest.approx(0.1)
    assert d["se"] == pytest.approx(0.1 / math.sqrt(3)) and d["n"] == 3


@pytest.mark.parametrize("diffs, better, as_good", [
    # Clearly in the claim's favour: better supported; as good too (never worse).
    ([0.10, 0.11, 0.09, 0.10], "supported", "supported"),
    # Clearly against it, by more than the 0.02 margin: contradicted both ways.
    ([-0.10, -0.11, -0.09, -0.10], "contradicted", "contradicted"),
    # Noise around zero: not separable as "better"; the CI reaches past the margin.
    ([0.05, -0.06, 0.04, -0.05], "not separable at this budget", "not separable at this budget"),
    # Slightly worse but tightly inside the margin: as good supported, better contradicted.
    ([-0.005, -0.006, -0.004, -0.005], "contradicted", "supported"),
    # One seed: never a verdict.
    ([0.5], "not separable at this budget", "not separable at this budget"),
])
def test_verdict_rules(diffs, better, as_good):
    from archext.ablate import claims

    d = claims.paired(diffs)
    assert claims.verdict_better(d) == better
    assert claims.verdict_as_good(d) == as_good


def test_claims_on_synthetic_runs():
    from archext.ablate import claims

    base = [1.70, 1.66, 1.68, 1.72]
    runs = [_run("base", s, v, tps=1000 + s) for s, v in enumerate(base)]
    # ReLU is worse by 0.05 +- 0.005 on every seed: the gated MLP wins.
    runs += [_run("relu", s, v + 0.05 + 0.005 * (-1) ** s) for s, v in enumerate(base)]
    # LayerNorm: the same loss within 0.002; 10% slower.
    runs += [_run("layernorm", s, v + 0.002 * (-1) ** s, tps=0.9 * (1000 + s))
             for s, v in enumerate(base)]
    # Stability: post-norm stalls at 3e-2, base stable to 1e-1 (2 seeds at the higher rates).
    # QK-norm is stable as far as base, with a lower loss there on both seeds.
    runs += [_run("post-norm", s, v) for s, v in enumerate(base)]
    for lr, b in ((3e-2, 2.4), (1e-1, 2.7)):
        for s in (0, 1):
            runs.append(_run("base", s, b + 0.01 * s, lr=lr))
            runs.append(_run("post-norm", s, 3.3, lr=lr, stalled=True))
            runs.append(_run("qk-norm", s, b - 0.5 + 0.003 * s, lr=lr))
    runs += [_run("qk-norm", s, v - 0.05) for s, v in enumerate(base)]
    rep = claims.report(runs, 3e-3)
    by = {c["key"]: c for c in rep["claims"]}
    assert by["glu-vs-relu"]["verdict"] == claims.SUPPORTED
    assert by["glu-vs-relu"]["diff"]["mean"] == pytest.approx(0.05)
    assert by["glu-vs-relu"]["seeds"] == [0, 1, 2, 3]
    assert by["rmsnorm-quality"]["verdict"] == claims.SUPPORTED
    assert by["rmsnorm-speed"]["verdict"] == claims.SUPPORTED
    assert by["rmsnorm-speed"]["diff"]["mean"] == pytest.approx(1 / 0.9 - 1)
    st = by["prenorm-stability"]
    assert (st["base"]["stable_lr"], st["other"]["stable_lr"]) == (1e-1, 3e-3)
    assert st["verdict"] == claims.SUPPORTED and st["lrs"] == [3e-3, 3e-2, 1e-1]
    qk = by["qknorm-stability"]
    assert qk["base"]["stable_lr"] == qk["other"]["stable_lr"] == 1e-1
    assert qk["tie_lr"] == 1e-1 and qk["tie_seeds"] == [0, 1]
    assert qk["verdict"] == claims.SUPPORTED and "same highest stable" in qk["note"]
    for key in ("parallel-speed", "zloss-stability", "nobias-quality"):
        assert by[key]["verdict"] == claims.NOT_RUN
    # The interleaved timing replaces the runs' tokens/s for the speed claims, paired by round.
    speed = {"rounds": [{"base": 100.0 + i, "layernorm": 100.0 + i} for i in range(4)]}
    sp = claims.report(runs, 3e-3, speed=speed)["claims"]
    sp = {c["key"]: c for c in sp}["rmsnorm-speed"]
    assert sp["rounds"] == 4 and sp["verdict"] == claims.NOT_SEPARABLE
    # With base's A/A twin timed too, a speed difference must clear the twin's difference: the
    # same 3% (+-0.1%) that is supported alone is not separable beside a twin 3% (+-0.1%) off,
    # and a 10% one still is supported.
    twin = "base (A/A twin)"
    jit = [0.001, -0.001, 0.0005, -0.0005]
    for gain, twin_off, want in ((0.03, None, claims.SUPPORTED),
                                 (0.03, 0.03, claims.NOT_SEPARABLE),
                                 (0.10, 0.03, claims.SUPPORTED),
                                 (-0.10, 0.03, claims.CONTRADICTED)):
        rounds = []
        for i, j in enumerate(jit):
            r = {"base": 100.0 + i, "layernorm": (100.0 + i) / (1 + gain + j)}
            if twin_off is not None:
                r[twin] = (100.0 + i) * (1 + twin_off - j)
            rounds.append(r)
        sp = {c["key"]: c for c in claims.report(
            runs, 3e-3, speed={"rounds": rounds, "aa_twin": twin if twin_off is not None else None}
        )["claims"]}["rmsnorm-speed"]
        assert sp["verdict"] == want, (gain, twin_off, sp)
        assert ("aa_margin" in sp) == (twin_off is not None)
        if twin_off is not None:
            assert sp["aa_margin"] > 0.03 and "A/A" in sp["note"]
    # A variant unstable at the base learning rate: no stable rate at all.
    assert claims.stable_lr([_run("x", 0, 9.0, diverged=True)], "x")[0] is None
    md = claims.markdown(rep)
    assert md.count("\n") == 1 + len(claims.CLAIMS)
    assert "**supported**" in md and "0-3" in md
    st_lines = claims.stability_table(rep).splitlines()
    assert st_lines[0].endswith("| highest stable |") and len(st_lines) == 2 + 3
    assert st_lines[3].startswith("| post-norm |")
    assert "(2 stalled)" in st_lines[3] and st_lines[3].endswith("| 0.003 |")
    json.dumps(claims.to_json(rep))  # JSON-ready


def test_default_run_parallel_resume(tmp_path, capsys):
    """The default run at tiny size: two worker processes, the stability part, the speed timing,
    the claims report last; rerun, only a deleted run trains again."""
    args = ["--jobs", "2", "--steps", "6", "--seeds", "2", "--stability-lrs", "1e-1",
            "--stability-seeds", "2", "--speed-rounds", "2"]
    assert ablate(tmp_path, *args) == 0
    cap = capsys.readouterr()
    printed = cap.out
    last = printed[printed.index("The claims:"):]
    assert "| claim |" in last and "highest stable" in last
    d = tmp_path / "run"
    for f in ("claims.md", "claims.json", "claims.png", "loss_curves.png", "loss_vs_lr.png",
              "speed.json"):
        assert (d / f).stat().st_size > 0, f
    rep = json.loads((d / "claims.json").read_text())
    assert len(rep["claims"]) == 13 and rep["rule"].startswith("Paired")
    assert all(c["verdict"] in ("supported", "not separable at this budget", "contradicted")
               for c in rep["claims"])
    res = load(tmp_path)
    assert res["processes"] == 2 and len(res["runs"]) == 10 * 2 + 5 * 2
    assert {r["threads"] for r in res["runs"]} == {1}
    speed = json.loads((d / "speed.json").read_text())["record"]
    assert len(speed["rounds"]) == 2 and speed["aa_twin"] == "base (A/A twin)"
    assert all(speed["aa_twin"] in r and "base" in r for r in speed["rounds"])
    # Each speed claim is judged against the A/A twin's difference too.
    for c in rep["claims"]:
        if c["key"].endswith("-speed"):
            assert c["aa_margin"] >= 0 and c["note"].startswith("A/A"), c
    before = {p.name: p.read_text() for p in (d / "runs").iterdir()}
    (d / "runs" / "qk-norm@lr0.1.seed1.json").unlink()
    assert ablate(tmp_path, *args) == 0
    err = capsys.readouterr().err
    assert err.count("finished earlier") == 30  # 29 runs and the speed timing
    assert "qk-norm@lr0.1.seed1: finished earlier" not in err
    after = {p.name: p.read_text() for p in (d / "runs").iterdir()}
    assert after.keys() == before.keys()
    # Deterministic given the seed: the retrained run gives the same record but its timings.
    old = json.loads(before["qk-norm@lr0.1.seed1.json"])["record"]
    new = json.loads(after["qk-norm@lr0.1.seed1.json"])["record"]
    assert new["loss_curve"] == old["loss_curve"] and new["val_loss"] == old["val_loss"]


def test_pack_trains_on_packed_documents(tmp_path, monkeypatch):
    """--pack: every step's batch is whole documents packed into rows with their cu_seqlens, and
    the model learns as it does unpacked; the setting is part of the run's key."""
    from archext.ablate import train
    from archext.ops import packing

    seen = []
    real = train.PackedSampler.next

    def spy(self):
        x, cu = real(self)
        packing.check_cu_seqlens(cu, *x.shape)
        seen.append(len(cu) - 1 - x.shape[0])  # documents beyond one per row
        return x, cu

    monkeypatch.setattr(train.PackedSampler, "next", spy)
    assert ablate(tmp_path, "--pack", "--variant", "relu:activation=relu", "--steps", "30") == 0
    assert len(seen) == 60 and sum(seen) > 0  # rows do hold several documents
    for r in load(tmp_path)["runs"]:
        assert not r["diverged"] and r["val_loss"] < r["loss_curve"][0] - 1.0
    packed = TrainSettings(pack=True).to_dict()
    assert packed["pack"] is True and "pack" not in TrainSettings().to_dict()


def test_default_plan_runs_the_middle_rate_where_it_decides():
    """The CPU preset's plan: 10 variants x 4 seeds; at 1e-1 the 5 stability variants, at 3e-2
    only base and post-norm (the pair whose claim the rate tells apart), 3 seeds each."""
    p = cli.PRESETS["cpu"]
    base = variants.make_base(variants.CPU_BASE, {})
    job = runner.AblateJob(base=base, variants=variants.select(None),
                           settings=TrainSettings(lr=p["lr"]), out_dir="unused", seeds=p["seeds"],
                           stability_variants=variants.STABILITY_VARIANTS,
                           stability_lrs=p["stability_lrs"], stability_seeds=p["stability_seeds"],
                           stability_only=p["stability_only"])
    plan = runner.plan_runs(job, variants.resolve(base, job.variants))
    groups = {}
    for _, group, *_ in plan:
        groups[group] = groups.get(group, 0) + 1
    assert len(plan) == 40 + 15 + 6
    assert {g for g in groups if "@lr0.03" in g} == {"base@lr0.03", "post-norm@lr0.03"}
    assert sum(1 for g in groups if "@lr0.1" in g) == 5
    assert all(n == 3 for g, n in groups.items() if "@" in g)


def test_gpu_preset_plumbing_on_the_cpu(tmp_path, capsys):
    """--preset gpu (the default on a GPU) builds its larger model and gives the same report;
    here on the CPU, on a small text, at a token budget, with two variants."""
    data = tmp_path / "text.txt"
    data.write_text("A small corpus for a token budget. " * 120)
    out = tmp_path / "gpu"
    assert cli.main(["ablate", "--preset", "gpu", "--device", "cpu", "--jobs", "1", "--steps", "2",
                     "--seeds", "2", "--stability-lrs", "1e-1", "--stability-seeds", "2",
                     "--speed-rounds", "0", "--batch-size", "2", "--seq-len", "32",
                     "--eval-batches", "1", "--only", "base,post-norm", "--data", str(data),
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "The claims:" in printed
    with open(out / "results.json") as fh:
        res = json.load(fh)
    assert res["preset"] == "gpu"
    assert res["base_config"]["d_model"] == 384 and res["base_config"]["n_layers"] == 6
    assert len(res["runs"]) == 2 * 2 + 2 * 2  # 2 variants x 2 seeds, again at 1e-1
    assert (out / "claims.md").stat().st_size > 0
