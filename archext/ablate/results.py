"""The outputs of an ablation: the table, results.json / results.csv, and the plots."""
import csv
import json
import math
import os

import statistics
from typing import Optional

from .claims import aa_diffs

CSV_FIELDS = ("run", "variant", "lr", "seed", "val_loss", "delta_vs_base", "tokens_per_s", "peak_mem_mb",
              "params", "max_abs_logit", "loss_spikes", "diverged", "diverged_at_step", "stalled",
              "train_loss", "steps_run", "max_grad_norm", "flops_per_token", "wall_s", "about",
              "overrides")


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "nan" if isinstance(x, float) else "-"
    return format(x, spec)


def rows(runs: list[dict]) -> list[dict]:
    """Runs with the derived columns; Δ is against the run named "base" at the same lr and
    seed (else the first variant's)."""
    def key(r):
        return r["lr"], r.get("seed")

    ref = {key(r): r["val_loss"] for r in runs if r["variant"] == "base"}
    if not ref and runs:
        ref = {key(r): r["val_loss"] for r in runs if r["variant"] == runs[0]["variant"]}
    out = []
    for r in runs:
        base = ref.get(key(r))
        delta = r["val_loss"] - base if base is not None else None
        out.append({**r, "delta_vs_base": delta, "peak_mem_mb": r["peak_mem_bytes"] / 2**20,
                    "overrides": json.dumps(r["overrides"], sort_keys=True)})
    return out


def summary(runs: list[dict]) -> list[dict]:
    """One row per (variant, lr): the runs over seeds combined. Val loss mean and sample std
    (diverged runs included: a diverged seed is part of the answer), Δ of the means against
    "base" (else the first variant) at the same lr, tokens/s mean, the worst peak memory and
    max |logit|, spikes summed, diverged and stalled runs counted."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["variant"], r["lr"]), []).append(r)
    out = []
    for (variant, lr), rs in groups.items():
        vals = [r["val_loss"] for r in rs]
        fin = [v for v in vals if math.isfinite(v)]
        out.append({
            "variant": variant, "lr": lr, "about": rs[0]["about"], "n": len(rs),
            "val_loss": statistics.fmean(vals) if len(fin) == len(vals) else float("nan"),
            "val_std": statistics.stdev(vals) if len(fin) == len(vals) > 1 else None,
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rs),
            "peak_mem_mb": max(r["peak_mem_bytes"] for r in rs) / 2**20,
            "params": rs[0]["params"],
            "max_abs_logit": max(r["max_abs_logit"] for r in rs),
            "loss_spikes": sum(r["loss_spikes"] for r in rs),
            "diverged": sum(bool(r["diverged"]) for r in rs),
            "stalled": sum(bool(r.get("stalled")) for r in rs),
            "diverged_at": [r["diverged_at_step"] for r in rs if r["diverged"]],
        })
    ref = {g["lr"]: g["val_loss"] for g in out if g["variant"] == "base"}
    if not ref and out:
        ref = {g["lr"]: g["val_loss"] for g in out if g["variant"] == out[0]["variant"]}
    for g in out:
        base = ref.get(g["lr"])
        g["delta_vs_base"] = g["val_loss"] - base if base is not None else None
    return out


def table(runs: list[dict], sweep: bool = False) -> str:
    """A Markdown table, one row per variant (and lr); with several seeds, val loss is
    mean ± std and diverged counts the seeds."""
    groups = summary(runs)
    seeds = max((g["n"] for g in groups), default=1)
    head = ["variant"] + (["lr"] if sweep else []) + [
        "val loss" + (f" (mean ± std, {seeds} seeds)" if seeds > 1 else ""), "Δ vs base",
        "tokens/s", "peak MB", "params", "max |logit|", "spikes", "diverged", "change"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if h in ("variant", "change") else "---:" for h in head) + "|"]
    for g in groups:
        if seeds > 1:
            parts = [f"{g['diverged']}/{g['n']}"] if g["diverged"] else []
            parts += [f"stalled {g['stalled']}/{g['n']}"] if g["stalled"] else []
            div = ", ".join(parts) or "no"
            val = _fmt(g["val_loss"], ".4f") + (f" ± {g['val_std']:.4f}" if g["val_std"] is not None else "")
        else:
            div = (f"yes (step {g['diverged_at'][0]})" if g["diverged"]
                   else "stalled" if g["stalled"] else "no")
            val = _fmt(g["val_loss"], ".4f")
        cells = [g["variant"]] + ([_fmt(g["lr"], ".0e")] if sweep else []) + [
            val, "" if g["delta_vs_base"] is None else _fmt(g["delta_vs_base"], "+.4f"),
            _fmt(g["tokens_per_s"], ",.0f"), _fmt(g["peak_mem_mb"], ".1f"),
            _fmt(g["params"], ","), _fmt(g["max_abs_logit"], ".1f"), str(g["loss_spikes"]), div,
            g["about"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: dict) -> None:
    _atomic_write(path, json.dumps(obj, indent=1, allow_nan=True) + "\n")


def write_json(path: str, meta: dict, runs: list[dict]) -> None:
    _atomic_write(path, json.dumps({**meta, "runs": runs}, indent=1, allow_nan=True) + "\n")


def write_csv(path: str, runs: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows(runs):
            w.writerow({k: r.get(k) for k in CSV_FIELDS})
    os.replace(tmp, path)


def _ema(xs: list[float], alpha: float) -> list[float]:
    out, m = [], None
    for x in xs:
        if not math.isfinite(x):
            out.append(float("nan"))
            continue
        m = x if m is None else alpha * m + (1 - alpha) * x
        out.append(m)
    return out


def _group(r: dict) -> str:
    return r.get("group", r["run"])


def _style(i: int) -> dict:
    import matplotlib.pyplot as plt

    # Ten distinct colours, then the same ones dashed.
    return dict(color=plt.get_cmap("tab10")(i % 10), lw=1.5, ls="-" if i < 10 else "--")


def plot_curves(path: str, runs: list[dict], title: str) -> None:
    """Training loss (EMA-smoothed) and held-out loss against step, one line per run; the axes
    zoom on the last three quarters of training, where the variants differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(13, 5.2))
    smooth = {r["run"]: _ema(r["loss_curve"], 0.9) for r in runs}
    ok = [r for r in runs if not r["diverged"] and r["loss_curve"]]
    colour = {v: i for i, v in enumerate(dict.fromkeys(_group(r) for r in runs))}
    groups: dict = {}
    for r in runs:
        groups.setdefault(_group(r), []).append(r)
    for key, rs in groups.items():
        # Seeds of one variant: the mean curve, and the band from the lowest to the highest seed.
        style = _style(colour[key])
        # At each step, the seeds still training (a diverged run stops early).
        n = max(len(r["loss_curve"]) for r in rs)
        label = key if len(rs) == 1 else f"{key} (mean of {len(rs)}, band: min-max)"
        cols = [[smooth[r["run"]][i] for r in rs
                 if i < len(r["loss_curve"]) and math.isfinite(smooth[r["run"]][i])] or [math.nan]
                for i in range(n)]
        ax_t.plot(range(1, n + 1), [statistics.fmean(c) for c in cols], label=label, **style)
        if len(rs) > 1:
            ax_t.fill_between(range(1, n + 1), [min(c) for c in cols], [max(c) for c in cols],
                              color=style["color"], alpha=0.15, lw=0)
        vcurves = [dict(map(tuple, r["val_curve"])) for r in rs if r["val_curve"]]
        steps = sorted(set().union(*(set(v) for v in vcurves))) if vcurves else []
        if steps:
            vals = [[v[st] for v in vcurves if st in v] for st in steps]
            mean = [statistics.fmean(x) for x in vals]
            err = [statistics.stdev(x) if len(x) > 1 else 0.0 for x in vals]
            ax_v.errorbar(steps, mean, yerr=err, marker="o", ms=3, capsize=2, label=label, **style)
    if ok:
        fin = [v for r in ok for v in smooth[r["run"]] if math.isfinite(v)]
        lo = min(fin) - 0.05
        hi = max(smooth[r["run"]][len(r["loss_curve"]) // 4] for r in ok)
        if math.isfinite(hi) and hi > lo:
            ax_t.set_ylim(lo, hi)
        vals = [v for r in ok for st, v in r["val_curve"]
                if st >= len(r["loss_curve"]) * 0.4 and math.isfinite(v)]
        if vals:
            ax_v.set_ylim(min(vals) - 0.05, max(vals) + 0.05)
    top = ax_t.get_ylim()[1]
    for r in runs:
        if r["diverged"]:
            ys = smooth[r["run"]]
            y = ys[-1] if math.isfinite(ys[-1]) else top
            ax_t.plot(len(ys), min(y, top), "x", color=_style(colour[_group(r)])["color"],
                      ms=10, mew=2, clip_on=False)
    ax_t.set(xlabel="step", ylabel="training loss (nats/byte, EMA 0.9)",
             title="training (x: diverged, stopped)")
    ax_v.set(xlabel="step", ylabel="held-out loss (nats/byte)",
             title="held-out, mean ± std over seeds (last point: whole held-out split)")
    for ax in (ax_t, ax_v):
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8, ncol=2, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr(path: str, runs: list[dict], title: str, unigram: Optional[float] = None) -> None:
    """Final held-out loss against learning rate per variant (mean over seeds, std as error
    bar); a learning rate where any seed diverged is an x at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    groups = summary(runs)
    variants = list(dict.fromkeys(g["variant"] for g in groups))
    ok = [g["val_loss"] for g in groups if not g["diverged"] and math.isfinite(g["val_loss"])]
    top = (max(ok) + 0.3) if ok else 6.0
    for i, v in enumerate(variants):
        gs = sorted((g for g in groups if g["variant"] == v), key=lambda g: g["lr"])
        color = _style(i)["color"]
        good = [g for g in gs if not g["diverged"]]
        ax.errorbar([g["lr"] for g in good], [g["val_loss"] for g in good],
                    yerr=[g["val_std"] or 0 for g in good], fmt="o-", color=color, label=v,
                    capsize=3)
        bad = [g["lr"] for g in gs if g["diverged"]]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=color, ms=10, mew=2)
    if unigram is not None:
        ax.axhline(unigram, color="grey", ls=":", lw=1)
        ax.annotate("unigram baseline (stalled)", (0.01, unigram), xycoords=("axes fraction", "data"),
                    va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set(xlabel="peak learning rate", ylabel="held-out loss (nats/byte)",
           title="loss vs learning rate (x at the top: diverged)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_claims(path: str, runs: list[dict], main_lr: float, rep: dict, title: str,
                speed: Optional[dict] = None) -> None:
    """Three panels: held-out loss per variant at the main learning rate (a dot per seed, the mean
    ± std as a bar), tokens/s relative to base (mean ± std of the per-round ratios of the
    interleaved timing, else of the per-seed ratios of the runs), and held-out loss against
    learning rate for the stability variants (mean ± std; x: a seed diverged or stalled
    there, drawn at the top when its loss is off the chart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in runs if r["lr"] == main_lr]
    variants = list(dict.fromkeys(r["variant"] for r in main))
    fig, (ax_l, ax_s, ax_r) = plt.subplots(1, 3, figsize=(16, 5.2),
                                           gridspec_kw={"width_ratios": [1.3, 1.0, 1.1]})
    base_by_seed = {r["seed"]: r for r in main if r["variant"] == "base"}
    for i, v in enumerate(variants):
        rs = [r for r in main if r["variant"] == v]
        vals = [r["val_loss"] for r in rs if math.isfinite(r["val_loss"])]
        color = _style(i)["color"]
        ax_l.plot(vals, [i] * len(vals), "o", color=color, alpha=0.45, ms=5)
        if vals:
            m = statistics.fmean(vals)
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax_l.errorbar([m], [i], xerr=[sd], fmt="s", color=color, ms=7, capsize=4, lw=2)
        if speed and speed.get("rounds"):
            ratios = [rd[v] / rd["base"] for rd in speed["rounds"] if v in rd and "base" in rd]
        else:
            ratios = [r["tokens_per_s"] / base_by_seed[r["seed"]]["tokens_per_s"] for r in rs
                      if r["seed"] in base_by_seed and base_by_seed[r["seed"]]["tokens_per_s"] > 0]
        if ratios:
            m = statistics.fmean(ratios)
            sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
            ax_s.barh([i], [m - 1], xerr=[sd], color=color, alpha=0.7, capsize=3)
    for ax in (ax_l, ax_s):
        ax.set_yticks(range(len(variants)), variants)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    base_vals = [r["val_loss"] for r in base_by_seed.values() if math.isfinite(r["val_loss"])]
    if base_vals:
        ax_l.axvline(statistics.fmean(base_vals), color="grey", ls=":", lw=1)
    ax_l.set(xlabel="held-out loss (nats/byte); dots: seeds, square: mean ± std",
             title=f"quality at lr {main_lr:g}")
    ax_s.axvline(0, color="grey", lw=1)
    aa = aa_diffs((speed or {}).get("rounds") or [], (speed or {}).get("aa_twin"))
    if len(aa) > 1:  # the A/A twin: how far two builds of base time apart
        m, sd = statistics.fmean(aa), statistics.stdev(aa)
        ax_s.axvspan(m - sd, m + sd, color="grey", alpha=0.2, label="A/A twin of base (mean ± std)")
        ax_s.legend(loc="lower right", fontsize=8)
    ax_s.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax_s.set(xlabel="tokens/s vs base (mean ± std)" + (
        ", interleaved timing" if speed and speed.get("rounds") else ", same seed"), title="speed")
    stab = [c for c in rep["claims"] if c["kind"] == "stability" and "base" in c
            and isinstance(c["base"], dict) and "by_lr" in c["base"]]
    sides = {}
    for c in stab:
        sides.setdefault("base", c["base"])
        sides.setdefault(c["variant"], c["other"])
    order = list(dict.fromkeys(variants + list(sides)))
    ok_means = [x["val_loss"]["mean"] for side in sides.values() for x in side["by_lr"]
                if x["stable_runs"] == len(x["seeds"]) and math.isfinite(x["val_loss"]["mean"])]
    top = max(ok_means) + 0.5 if ok_means else 6.0
    for name, side in sides.items():
        color = _style(order.index(name))["color"]
        rows = side["by_lr"]
        ok = [x for x in rows if x["stable_runs"] == len(x["seeds"])]
        ax_r.errorbar([x["lr"] for x in ok], [x["val_loss"]["mean"] for x in ok],
                      yerr=[x["val_loss"]["std"] or 0 for x in ok], fmt="o-", color=color,
                      capsize=3, label=f"{name} (stable to {side['stable_lr'] or 'none'})")
        bad = [x for x in rows if x["stable_runs"] < len(x["seeds"])]
        if bad:
            ys = [min(x["val_loss"]["mean"], top) if math.isfinite(x["val_loss"]["mean"]) else top
                  for x in bad]
            ax_r.plot([x["lr"] for x in bad], ys, "x", color=color, ms=10, mew=2)
    ax_r.set_xscale("log")
    ax_r.set(xlabel="peak learning rate", ylabel="held-out loss (nats/byte)",
             title="stability: loss vs lr (x: a seed diverged or stalled)")
    ax_r.grid(alpha=0.3, which="both")
    if sides:
        ax_r.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
