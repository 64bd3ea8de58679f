"""The lecture's claims, each judged by a paired comparison against base over the same seeds.

A claim names one variant, what is measured, and which side it says wins. Three kinds:

  better      the claimed side wins on the measurement (lower held-out loss, more tokens/s)
  as-good     the claimed side is not worse by more than ``EQUIV_MARGIN`` (a non-inferiority
              test: the lecture's "just as good")
  stability   the claimed side trains at a higher learning rate: the highest stable learning
              rate of each side from the sweep (a rate is stable when no seed diverged or
              stalled there, and every lower rate tried is stable too)

The verdict rule (``RULE``): with d the per-seed difference in the claim's favour (positive = the
claim holds), mean m, standard error se = std(d) / sqrt(n) and t the 97.5% quantile of Student's
t with n - 1 degrees of freedom (a paired t-test, 5% two-sided; t is 3.18 at 4 seeds, 4.30 at 3,
and tends to 1.96: "about 2 standard errors" once there are many seeds):

  better     supported if m > t se; contradicted if m < -t se; else not separable
  as-good    with w = -m, how much worse the claimed side is: supported if w + t se < margin;
             contradicted if w - t se > margin; else not separable
  stability  supported if the claimed side's highest stable learning rate is higher;
             contradicted if lower; on a tie, the held-out loss at that shared learning rate is
             judged as a "better" claim (it degrades less where both still train)

One seed gives no spread: such a comparison is never more than "not separable"."""
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Optional

SUPPORTED = "supported"
NOT_SEPARABLE = "not separable at this budget"
CONTRADICTED = "contradicted"
NOT_RUN = "not run"

# Student's t, 97.5% quantile, by degrees of freedom (1-30); 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_factor(n: int) -> float:
    """Standard errors a paired mean difference over ``n`` seeds must clear (5%, two-sided)."""
    return _T975[n - 2] if 2 <= n <= len(_T975) + 1 else 1.96

# "Just as good": the claimed side may be worse by at most this much held-out loss (nats/byte).
EQUIV_MARGIN = 0.02

RULE = (f"Paired over the seeds both sides ran: d = per-seed difference in the claim's favour, "
        f"se = std(d)/sqrt(n), t = the 97.5% quantile of Student's t with n-1 degrees of freedom "
        f"(a paired t-test at 5%, two-sided; 4.30 at 3 seeds, 3.18 at 4). 'better': supported if "
        f"mean(d) > t se, contradicted if mean(d) < -t se, else not separable. 'as good': "
        f"non-inferiority with a margin of {EQUIV_MARGIN} nats/byte: supported if the claimed side "
        f"is worse by less than the margin with mean + t se, contradicted if worse by more than "
        f"the margin with mean - t se, else not separable. Stability: the highest stable learning "
        f"rate of each side (stable: no seed diverged or stalled at it or at any lower rate "
        f"tried); higher wins; on a tie, the held-out loss at that rate, judged as 'better'. "
        f"One seed gives no spread and so no verdict beyond not separable. Speed: paired over "
        f"the rounds of the interleaved timing, with base timed twice (two instances built "
        f"alike); a speed difference must clear its t se plus the A/A difference's |mean| + "
        f"t se.")


@dataclass(frozen=True)
class Claim:
    key: str          # short id (JSON)
    text: str         # the claim, as the lecture makes it
    variant: str      # the variant compared against "base"
    metric: str       # "val_loss" | "tokens_per_s" | "stable_lr"
    winner: str       # the side the claim says wins: "base" or "variant"
    kind: str         # "better" | "as-good" | "stability"

    def measurement(self) -> str:
        return {"val_loss": "held-out loss (nats/byte)",
                "tokens_per_s": "tokens/s (relative to base)",
                "stable_lr": "highest stable learning rate"}[self.metric]


# The base is pre-norm, RMSNorm, SwiGLU, serial, no biases, no stability tricks; each claim is
# read as "the lecture's choice beats the alternative" with the lecture's choice on the side it
# names.
CLAIMS = (
    Claim("prenorm-stability", "pre-norm trains stably at higher learning rates than post-norm",
          "post-norm", "stable_lr", "base", "stability"),
    Claim("prenorm-quality", "pre-norm is at least as good as post-norm at the base learning rate",
          "post-norm", "val_loss", "base", "as-good"),
    Claim("rmsnorm-quality", "RMSNorm is just as good as LayerNorm", "layernorm", "val_loss",
          "base", "as-good"),
    Claim("rmsnorm-speed", "RMSNorm is faster than LayerNorm (less data movement)", "layernorm",
          "tokens_per_s", "base", "better"),
    Claim("glu-vs-relu", "a gated MLP (SwiGLU, d_ff 8/3 d) beats a plain ReLU MLP (4 d) at equal "
          "parameters", "relu", "val_loss", "base", "better"),
    Claim("glu-vs-gelu", "a gated MLP (SwiGLU, d_ff 8/3 d) beats a plain GeLU MLP (4 d) at equal "
          "parameters", "gelu", "val_loss", "base", "better"),
    Claim("parallel-speed", "parallel blocks are faster than serial ones", "parallel",
          "tokens_per_s", "variant", "better"),
    Claim("parallel-quality", "parallel blocks are about as good as serial ones", "parallel",
          "val_loss", "variant", "as-good"),
    Claim("zloss-stability", "z-loss lets training run at higher learning rates", "z-loss",
          "stable_lr", "variant", "stability"),
    Claim("qknorm-stability", "QK-norm lets training run at higher learning rates", "qk-norm",
          "stable_lr", "variant", "stability"),
    Claim("softcap-stability", "logit soft-capping lets training run at higher learning rates",
          "softcap", "stable_lr", "variant", "stability"),
    Claim("nobias-speed", "no biases is faster (less memory movement)", "bias", "tokens_per_s",
          "base", "better"),
    Claim("nobias-quality", "no biases is as good as biases", "bias", "val_loss", "base",
          "as-good"),
)


def _mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs) if xs else float("nan"),
            "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def paired(diffs: list[float]) -> dict:
    """Mean, std and standard error of per-seed differences."""
    n = len(diffs)
    m = statistics.fmean(diffs) if n else float("nan")
    sd = statistics.stdev(diffs) if n > 1 else None
    return {"mean": m, "std": sd, "se": sd / math.sqrt(n) if sd is not None else None, "n": n,
            "t": t_factor(n) if n > 1 else None}


def aa_diffs(rounds: list[dict], twin: Optional[str]) -> list[float]:
    """The A/A twin's relative difference from base (tokens/s ratio - 1), per timing round
    that has both; none without a twin."""
    return [r[twin] / r["base"] - 1 for r in rounds if twin and twin in r and "base" in r]


def verdict_better(d: dict, margin: float = 0.0) -> str:
    """``d``: paired() of differences in the claim's favour (positive = the claim holds).
    ``margin``: what the difference must clear beyond t se (the A/A difference of two instances
    of one model, for the speed claims)."""
    if d["n"] < 2 or d["se"] is None or not math.isfinite(d["mean"]) or not math.isfinite(margin):
        return NOT_SEPARABLE
    t = t_factor(d["n"])
    if d["mean"] > t * d["se"] + margin:
        return SUPPORTED
    if d["mean"] < -(t * d["se"] + margin):
        return CONTRADICTED
    return NOT_SEPARABLE


def verdict_as_good(d: dict, margin: float = EQUIV_MARGIN) -> str:
    """Non-inferiority; ``d`` as for verdict_better (so -d is how much worse the claimed side is)."""
    if d["n"] < 2 or d["se"] is None or not math.isfinite(d["mean"]):
        return NOT_SEPARABLE
    worse, t = -d["mean"], t_factor(d["n"])
    if worse + t * d["se"] < margin:
        return SUPPORTED
    if worse - t * d["se"] > margin:
        return CONTRADICTED
    return NOT_SEPARABLE


def _stable(r: dict) -> bool:
    return not r["diverged"] and not r.get("stalled")


def stable_lr(runs: list[dict], variant: str) -> tuple[Optional[float], list[dict]]:
    """(highest stable learning rate or None when even the lowest fails, the per-lr rows)."""
    by_lr: dict = {}
    for r in runs:
        if r["variant"] == variant:
            by_lr.setdefault(r["lr"], []).append(r)
    rows, best, ok = [], None, True
    for lr in sorted(by_lr):
        rs = by_lr[lr]
        n_ok = sum(_stable(r) for r in rs)
        ok = ok and n_ok == len(rs)
        if ok:
            best = lr
        rows.append({"lr": lr, "seeds": sorted(r["seed"] for r in rs), "stable_runs": n_ok,
                     "diverged": sum(bool(r["diverged"]) for r in rs),
                     "stalled": sum(bool(r.get("stalled")) for r in rs),
                     "val_loss": _mean_std([r["val_loss"] for r in rs])})
    return best, rows


def _by_seed(runs: list[dict], variant: str, lr: float, metric: str) -> dict:
    return {r["seed"]: r[metric] for r in runs if r["variant"] == variant and r["lr"] == lr}


def _paired_values(runs, variant, lr, metric) -> tuple[list[int], list[float], list[float]]:
    b = _by_seed(runs, "base", lr, metric)
    v = _by_seed(runs, variant, lr, metric)
    seeds = sorted(set(b) & set(v))
    return seeds, [b[s] for s in seeds], [v[s] for s in seeds]


def _favour(claim: Claim, base: list[float], var: list[float]) -> list[float]:
    """Per-seed difference in the claim's favour: for the loss, the loser's loss minus the
    winner's; for tokens/s, the winner's over the loser's, minus 1."""
    win, lose = (base, var) if claim.winner == "base" else (var, base)
    if claim.metric == "tokens_per_s":
        return [w / l - 1 for w, l in zip(win, lose)]
    return [l - w for w, l in zip(win, lose)]


def judge(claim: Claim, runs: list[dict], main_lr: float, speed: Optional[dict] = None) -> dict:
    """One claim's row: measurement, seeds, each side's mean ± std, the paired difference in the
    claim's favour and the verdict. ``speed``: archext.ablate.speed's interleaved timing; when
    given, the speed claims are paired by its rounds instead of by the runs' seeds."""
    out = {"key": claim.key, "claim": claim.text, "variant": claim.variant, "kind": claim.kind,
           "winner": claim.winner, "measurement": claim.measurement(), "note": ""}
    have = {r["variant"] for r in runs}
    if "base" not in have or claim.variant not in have:
        return {**out, "verdict": NOT_RUN, "seeds": [], "lr": main_lr}
    if claim.kind == "stability":
        return _judge_stability(claim, runs, out)
    rounds = [r for r in (speed or {}).get("rounds", []) if "base" in r and claim.variant in r]
    if claim.metric == "tokens_per_s" and rounds:
        b = [r["base"] for r in rounds]
        v = [r[claim.variant] for r in rounds]
        d = paired(_favour(claim, b, v))
        out["measurement"] = "tokens/s of the training step, interleaved timing"
        row = {**out, "seeds": [], "rounds": len(rounds), "lr": main_lr, "base": _mean_std(b),
               "other": _mean_std(v), "diff": d}
        aa_d = aa_diffs(rounds, speed.get("aa_twin"))
        if len(aa_d) < 2:
            return {**row, "verdict": verdict_better(d)}
        aa = paired(aa_d)
        margin = abs(aa["mean"]) + aa["t"] * aa["se"]
        row.update(aa=aa, aa_margin=margin, verdict=verdict_better(d, margin),
                   note=f"A/A: a second base instance timed {aa['mean']:+.1%} ± {aa['se']:.1%} "
                        f"against base; a difference must clear {margin:.1%} beyond its own "
                        f"t se")
        return row
    seeds, b, v = _paired_values(runs, claim.variant, main_lr, claim.metric)
    if not seeds:
        return {**out, "verdict": NOT_RUN, "seeds": [], "lr": main_lr,
                "note": f"no paired runs at lr {main_lr:g}"}
    d = paired(_favour(claim, b, v))
    rule = verdict_better if claim.kind == "better" else verdict_as_good
    out.update(seeds=seeds, lr=main_lr, base=_mean_std(b), other=_mean_std(v), diff=d,
               verdict=rule(d))
    if any(not math.isfinite(x) for x in b + v):
        out["note"] = "a run diverged at the base learning rate"
    return out


def _judge_stability(claim: Claim, runs: list[dict], out: dict) -> dict:
    lr_b, rows_b = stable_lr(runs, "base")
    lr_v, rows_v = stable_lr(runs, claim.variant)
    lrs = sorted({row["lr"] for row in rows_b} & {row["lr"] for row in rows_v})
    seeds = sorted({s for row in rows_b + rows_v for s in row["seeds"]})
    out.update(seeds=seeds, lrs=lrs, base={"stable_lr": lr_b, "by_lr": rows_b},
               other={"stable_lr": lr_v, "by_lr": rows_v})
    win_lr, lose_lr = (lr_b, lr_v) if claim.winner == "base" else (lr_v, lr_b)
    key = lambda x: -math.inf if x is None else x  # noqa: E731  (None: not even the lowest)
    if len(lrs) < 2:
        out.update(verdict=NOT_SEPARABLE, note="fewer than two learning rates tried")
        return out
    if key(win_lr) != key(lose_lr):
        out["verdict"] = SUPPORTED if key(win_lr) > key(lose_lr) else CONTRADICTED
        return out
    if win_lr is None:
        out.update(verdict=NOT_SEPARABLE, note="neither side is stable at any learning rate tried")
        return out
    seeds_t, b, v = _paired_values(runs, claim.variant, win_lr, "val_loss")
    d = paired(_favour(claim, b, v))
    out.update(tie_lr=win_lr, tie_seeds=seeds_t, diff=d, verdict=verdict_better(d),
               note=f"same highest stable learning rate ({win_lr:g}); judged on the held-out "
                    f"loss there")
    return out


def report(runs: list[dict], main_lr: float, claims=CLAIMS, speed: Optional[dict] = None) -> dict:
    rows = [judge(c, runs, main_lr, speed) for c in claims]
    return {"rule": RULE, "equivalence_margin": EQUIV_MARGIN,
            "main_lr": main_lr, "claims": rows}


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
def _ms(s: dict, spec: str) -> str:
    if not s or s.get("n", 0) == 0:
        return "-"
    m = format(s["mean"], spec) if math.isfinite(s["mean"]) else "nan"
    return m + (f" ± {format(s['std'], spec)}" if s.get("std") is not None else "")


def _lr(x: Optional[float]) -> str:
    return "none" if x is None else f"{x:g}"


def _sides(row: dict) -> tuple[str, str]:
    if row["kind"] == "stability":
        return _lr(row["base"]["stable_lr"]), _lr(row["other"]["stable_lr"])
    spec = ",.0f" if row["measurement"].startswith("tokens") else ".4f"
    return _ms(row["base"], spec), _ms(row["other"], spec)


def _diff(row: dict) -> str:
    d = row.get("diff")
    if not d or d["n"] == 0:
        return "-"
    pct = row["measurement"].startswith("tokens")
    f = (lambda x: f"{x * 100:+.1f}%") if pct else (lambda x: f"{x:+.4f}")
    se = "" if d["se"] is None else " ± " + (f"{d['se'] * 100:.1f}%" if pct else f"{d['se']:.4f}")
    return f"{f(d['mean'])}{se} (n={d['n']})"


def markdown(rep: dict) -> str:
    """The claims table as Markdown: one row per claim."""
    head = ["claim", "variant", "measurement", "seeds", "base", "variant value",
            "paired Δ in the claim's favour (mean ± se)", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---|---:|---:|---:|---|"]
    for row in rep["claims"]:
        if row["verdict"] == NOT_RUN:
            lines.append(f"| {row['claim']} | {row['variant']} | {row['measurement']} | - | - | - "
                         f"| - | {NOT_RUN} |")
            continue
        b, v = _sides(row)
        seeds = f"{row['rounds']} rounds" if row.get("rounds") else _seeds(row["seeds"])
        meas = row["measurement"]
        if row["kind"] == "stability":
            meas += f" of {', '.join(_lr(x) for x in row['lrs'])}"
        else:
            meas += f" at lr {row['lr']:g}"
        verdict = f"**{row['verdict']}**" + (f" ({row['note']})" if row["note"] else "")
        lines.append(f"| {row['claim']} | {row['variant']} | {meas} | {seeds} | {b} | {v} | "
                     f"{_diff(row)} | {verdict} |")
    return "\n".join(lines)


def _seeds(seeds: list[int]) -> str:
    if not seeds:
        return "-"
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def stability_table(rep: dict) -> str:
    """Per variant in the sweep: at each learning rate, stable seeds / seeds and the mean loss."""
    rows = {}
    for row in rep["claims"]:
        if row["kind"] != "stability" or row["verdict"] == NOT_RUN:
            continue
        rows.setdefault("base", row["base"])
        rows.setdefault(row["variant"], row["other"])
    if not rows:
        return ""
    lrs = sorted({r["lr"] for side in rows.values() for r in side["by_lr"]})
    lines = ["| variant | " + " | ".join(f"lr {x:g}" for x in lrs) + " | highest stable |",
             "|---|" + "---:|" * (len(lrs) + 1)]
    for name, side in rows.items():
        by = {r["lr"]: r for r in side["by_lr"]}
        cells = []
        for x in lrs:
            r = by.get(x)
            if r is None:
                cells.append("-")
                continue
            n = len(r["seeds"])
            tag = "" if r["stable_runs"] == n else (
                f" ({r['diverged']} diverged" * bool(r["diverged"]) +
                (", " if r["diverged"] and r["stalled"] else (" (" if r["stalled"] and not r["diverged"] else "")) +
                (f"{r['stalled']} stalled" if r["stalled"] else "") + ")")
            cells.append(_ms(r["val_loss"], ".3f") + tag)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_lr(side['stable_lr'])} |")
    return "\n".join(lines)


def to_json(rep: dict) -> dict:
    return {**rep, "claims_defined": [asdict(c) for c in CLAIMS]}
