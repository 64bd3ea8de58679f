"""Run a set of variants (over seeds, optionally at several learning rates), one process per
core, resume from finished ones, and write the outputs: the table, the claims report, the
plots."""
import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import queue
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import claims, results
from .data import Corpus
from .progress import MultiProgress
from .speed import AA_NAME, time_variants
from .train import (SPIKE_REL, SPIKE_WINDOW, STALL_MARGIN, TrainSettings, adamw_kw, is_stalled,
                    train_variant)
from .variants import Variant, VariantError, resolve

DEFAULT_SWEEP_LRS = (3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class AblateJob:
    base: object                      # TransformerConfig
    variants: list[Variant]
    settings: TrainSettings
    out_dir: str
    data: Optional[str] = None        # None: the bundled corpus
    lrs: Optional[list[float]] = None # learning-rate sweep; None: settings.lr only
    seeds: int = 1                    # runs per variant, seeds settings.seed, +1, ...
    fresh: bool = False               # retrain runs that have a finished result
    threads: Optional[int] = None
    jobs: int = 1                     # training processes at once (each at 1 thread when > 1)
    # The stability part: these variants (those in the job) also train at these learning rates
    # with the first stability_seeds seeds, for the claims' highest stable learning rate.
    stability_variants: tuple = ()
    stability_lrs: tuple = ()
    stability_seeds: int = 0
    # Rates of the stability part at which only some of its variants train ({lr: names}); the
    # other rates train them all.
    stability_only: dict = field(default_factory=dict)
    # Interleaved timing of every variant's step for the speed claims (0 rounds: none; the claims
    # then pair the runs' own tokens/s by seed).
    speed_rounds: int = 0
    speed_steps: int = 5
    extra_meta: dict = field(default_factory=dict)


def auto_threads() -> int:
    """CPU threads for training: the cores not already busy (by the 1-minute load average), at
    least 1. On a shared machine an intra-op thread that loses its core stalls every op:
    measured on 2 loaded cores, 2 threads ran a step in 190-860 ms wall and 1 thread in 81 ms."""
    n = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(n, n - busy))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    n = torch.get_num_threads()
    return f"{cpu_name()}, {n} thread{'s' if n != 1 else ''}"


def run_key(cfg, settings: TrainSettings, fingerprint: str) -> str:
    """What a finished result depends on; a stored result is reused only if this matches."""
    blob = json.dumps({"config": dataclasses.asdict(cfg), "settings": settings.to_dict(),
                       "data": fingerprint, "adamw": adamw_kw(settings.device)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _load_finished(path: str, key: str) -> Optional[dict]:
    try:
        with open(path) as fh:
            stored = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None  # absent, or cut off mid-write by an interruption: train again
    return stored.get("record") if stored.get("key") == key else None


# ----------------------------------------------------------------------------------------------
# Worker processes: each trains one run at a time at 1 thread and writes its result file itself,
# so that a run finished before an interruption is kept even if the parent is gone.
# ----------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _worker_init(data: Optional[str], seq_len: int, messages) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool on Ctrl-C
    torch.set_num_threads(1)
    _WORKER.update(corpus=Corpus.load(data, seq_len), messages=messages)


def _worker_run(task: tuple) -> dict:
    if task[0] == "speed":
        return _run_speed(*task[1:], corpus=_WORKER["corpus"],
                          sink=lambda kind, lab, text: _WORKER["messages"].put((kind, lab, text)))
    cfg, settings, label, path, key, fields = task
    messages = _WORKER["messages"]
    t0 = time.perf_counter()
    rec = train_variant(cfg, settings, _WORKER["corpus"], label=label,
                        sink=lambda kind, lab, text: messages.put((kind, lab, text)))
    rec.update(fields, threads=torch.get_num_threads(), wall_s=time.perf_counter() - t0)
    results.write_json_atomic(path, {"key": key, "record": rec})
    return rec


def _run_speed(resolved, settings, rounds, steps, path, key, corpus, sink=None) -> dict:
    rec = time_variants(resolved, settings, corpus, rounds, steps, sink=sink)
    results.write_json_atomic(path, {"key": key, "record": rec})
    return rec


def _run_parallel(job: AblateJob, todo: list, done: dict, display: MultiProgress) -> None:
    """Train ``todo`` [(index, task)] in job.jobs processes; finished records into ``done``."""
    ctx = multiprocessing.get_context("spawn")  # no forked copy of torch's thread pools
    messages = ctx.Queue()
    pool = ctx.Pool(min(job.jobs, len(todo)), initializer=_worker_init,
                    initargs=(job.data, job.settings.seq_len, messages))
    pending = {i: pool.apply_async(_worker_run, (task,)) for i, task in todo}
    try:
        while pending:
            try:
                display.message(*messages.get(timeout=0.2))
            except queue.Empty:
                pass
            for i in [i for i, r in pending.items() if r.ready()]:
                done[i] = pending.pop(i).get()  # a worker's exception is raised here
        while True:  # the last runs' final lines
            try:
                display.message(*messages.get(timeout=0.05))
            except queue.Empty:
                break
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        display.close()


def plan_runs(job: AblateJob, resolved: list) -> list[tuple]:
    """[(run_id, group, variant, cfg, settings)]: every variant at settings.lr (or at each lr of
    the sweep) with every seed, then the stability part."""
    sweep = job.lrs is not None
    lrs = list(job.lrs) if sweep else [job.settings.lr]
    seeds = [job.settings.seed + i for i in range(job.seeds)]
    plan = []
    for variant, cfg in resolved:
        for lr in lrs:
            group = f"{variant.name}@lr{lr:g}" if sweep else variant.name
            for seed in seeds:
                settings = dataclasses.replace(job.settings, lr=lr, seed=seed)
                run_id = f"{group}.seed{seed}" if job.seeds > 1 else group
                plan.append((run_id, group, variant, cfg, settings))
    extra_lrs = [lr for lr in job.stability_lrs if lr not in lrs]
    for variant, cfg in resolved:
        if variant.name not in job.stability_variants:
            continue
        for lr in extra_lrs:
            if lr in job.stability_only and variant.name not in job.stability_only[lr]:
                continue
            group = f"{variant.name}@lr{lr:g}"
            for seed in seeds[:job.stability_seeds]:
                settings = dataclasses.replace(job.settings, lr=lr, seed=seed)
                plan.append((f"{group}.seed{seed}", group, variant, cfg, settings))
    return plan


def run(job: AblateJob, stream=None, out=None) -> list[dict]:
    """Train every run not already finished in ``job.out_dir``; write results.json, results.csv,
    table.md, claims.md / claims.json and the plots; print the table and the claims. Returns the
    run records."""
    stream = stream or sys.stderr
    out = out or sys.stdout
    parallel = job.jobs > 1 and job.settings.device == "cpu"
    if job.threads:
        torch.set_num_threads(job.threads)
    elif parallel:
        torch.set_num_threads(1)  # each worker runs at 1 thread; the parent only evaluates
    elif job.settings.device == "cpu":
        torch.set_num_threads(auto_threads())
    resolved = resolve(job.base, job.variants)          # every spec checked before training
    corpus = Corpus.load(job.data, job.settings.seq_len)
    sweep = job.lrs is not None
    runs_dir = os.path.join(job.out_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)

    if job.seeds < 1:
        raise VariantError(f"--seeds must be >= 1, got {job.seeds}")
    seeds = [job.settings.seed + i for i in range(job.seeds)]
    plan = plan_runs(job, resolved)
    lrs = sorted({p[4].lr for p in plan})
    n_main = len(resolved) * (len(job.lrs) if sweep else 1) * job.seeds
    stability = (f" + {len(plan) - n_main} at higher learning rates for the stability claims"
                 if len(plan) > n_main else "")
    where = (f"{min(job.jobs, len(plan))} processes at 1 thread" if parallel
             else machine(job.settings.device))
    stream.write(f"archext ablate: {len(plan)} runs ({len(resolved)} variants"
                 f"{f' x {len(job.lrs)} learning rates' if sweep else ''}"
                 f"{f' x {job.seeds} seeds' if job.seeds > 1 else ''}{stability}) on "
                 f"{corpus.description}, {job.settings.steps} steps of "
                 f"{job.settings.batch_size}x{job.settings.seq_len} tokens, device "
                 f"{job.settings.device} ({where}); output {job.out_dir}\n")

    t_start = time.perf_counter()
    unigram = corpus.unigram_loss
    meta = {
        "command": "archext ablate",
        "data": corpus.description, "data_fingerprint": corpus.fingerprint,
        "train_bytes": len(corpus.train), "val_bytes": len(corpus.val),
        "base_config": dataclasses.asdict(job.base), "settings": job.settings.to_dict(),
        "learning_rates": lrs, "sweep": sweep, "seeds": seeds,
        "stability": {"variants": list(job.stability_variants), "lrs": list(job.stability_lrs),
                      "seeds": seeds[:job.stability_seeds],
                      **({"only": {f"{lr:g}": list(v) for lr, v in job.stability_only.items()}}
                         if job.stability_only else {})},
        "device": job.settings.device, "machine": machine(job.settings.device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "processes": min(job.jobs, len(plan)) if parallel else 1,
        "spike_rule": f"loss > (1 + {SPIKE_REL}) x median of the previous {SPIKE_WINDOW} steps; "
                      "consecutive steps count once",
        "divergence_rule": "non-finite loss, or after warm-up a training loss above the first "
                           "step's; training stops there",
        "unigram_loss": unigram,
        "stall_rule": f"not diverged, final held-out loss above the unigram baseline "
                      f"({unigram:.4f}) minus {STALL_MARGIN}: learned byte frequencies only",
        **job.extra_meta,
    }
    done: dict = {}
    todo = []
    display = MultiProgress(stream) if parallel else None
    speed = None
    if job.speed_rounds > 0 and len(resolved) > 1:
        speed_path = os.path.join(job.out_dir, "speed.json")
        speed_settings = job.settings
        speed_key = hashlib.sha256(json.dumps(
            {"configs": [dataclasses.asdict(c) for _, c in resolved],
             "settings": speed_settings.to_dict(), "rounds": job.speed_rounds,
             "steps": job.speed_steps, "aa_twin": AA_NAME},
            sort_keys=True, default=str).encode()).hexdigest()[:20]
        speed = None if job.fresh else _load_finished(speed_path, speed_key)
        speed_task = ("speed", resolved, speed_settings, job.speed_rounds, job.speed_steps,
                      speed_path, speed_key)
        if speed is not None:
            stream.write(f"speed: finished earlier, kept (delete {speed_path} to time again)\n")
        elif parallel:
            todo.append((-1, speed_task))  # first: the longest task
        else:
            speed = _run_speed(*speed_task[1:], corpus=corpus,
                               sink=lambda kind, lab, text: stream.write(text + "\n")
                               if kind == "done" else None)
    try:
        for i, (run_id, group, variant, cfg, settings) in enumerate(plan):
            path = os.path.join(runs_dir, run_id + ".json")
            key = run_key(cfg, settings, corpus.fingerprint)
            rec = None if job.fresh else _load_finished(path, key)
            label = f"[{i + 1}/{len(plan)}] {run_id}"
            fields = dict(run=run_id, group=group, variant=variant.name, lr=settings.lr,
                          seed=settings.seed, about=variant.describe(),
                          overrides=variant.overrides)
            if rec is not None:
                stream.write(f"{label}: finished earlier, kept (delete {path} to retrain)\n")
                done[i] = rec
            elif parallel:
                todo.append((i, (cfg, settings, f"{label:<28}", path, key, fields)))
            else:
                t0 = time.perf_counter()
                rec = train_variant(cfg, settings, corpus, label=f"{label:<28}", stream=stream)
                rec.update(fields, threads=torch.get_num_threads(),
                           wall_s=time.perf_counter() - t0)
                results.write_json_atomic(path, {"key": key, "record": rec})
                done[i] = rec
        if todo:
            _run_parallel(job, todo, done, display)
            speed = done.pop(-1, speed)
    except KeyboardInterrupt:
        done.pop(-1, None)
        records = _finished(done, unigram)
        stream.write(f"\ninterrupted: {len(records)} of {len(plan)} runs finished and kept in "
                     f"{runs_dir}; run the same command again to resume.\n")
        if records:
            _write_outputs(job, meta, records, sweep, time.perf_counter() - t_start, out, speed)
        raise
    records = _finished(done, unigram)
    _write_outputs(job, meta, records, sweep, time.perf_counter() - t_start, out, speed)
    return records


def _finished(done: dict, unigram: float) -> list[dict]:
    """The finished records in plan order, each with its stalled flag."""
    records = [done[i] for i in sorted(done)]
    for rec in records:
        rec["stalled"] = is_stalled(rec["val_loss"], rec["diverged"], unigram)
    return records


def _write_outputs(job, meta, records, sweep, wall_s, out, speed=None) -> None:
    d = job.out_dir
    meta = {**meta, "wall_s_this_invocation": wall_s}
    if speed is not None:
        meta["speed"] = speed
    several_lrs = len({r["lr"] for r in records}) > 1
    results.write_json(os.path.join(d, "results.json"), meta, records)
    results.write_csv(os.path.join(d, "results.csv"), records)
    tab = results.table(records, sweep=sweep or several_lrs)
    with open(os.path.join(d, "table.md"), "w") as fh:
        fh.write(tab + "\n")
    title = (f"archext ablate: {meta['data']}; {job.settings.steps} steps x "
             f"{job.settings.batch_size}x{job.settings.seq_len} tokens; {meta['machine']}")
    main = [r for r in records if r["lr"] == job.settings.lr] or records
    results.plot_curves(os.path.join(d, "loss_curves.png"), main, title)
    written = ["results.json", "results.csv", "table.md", "loss_curves.png"]
    if several_lrs:
        results.plot_lr(os.path.join(d, "loss_vs_lr.png"), records, title, meta["unigram_loss"])
        written.append("loss_vs_lr.png")
    rep = claims.report(records, job.settings.lr, speed=speed)
    judged = [c for c in rep["claims"] if c["verdict"] != claims.NOT_RUN]
    out.write(tab + "\n")
    out.write(f"\nspikes: {meta['spike_rule']}. diverged: {meta['divergence_rule']}. "
              f"stalled: {meta['stall_rule']}. peak memory: {records[0]['mem_method']}.\n")
    if judged:
        rep["meta"] = {k: meta[k] for k in ("data", "settings", "base_config", "seeds",
                                            "stability", "machine", "torch", "processes",
                                            "unigram_loss")}
        md = claims_markdown(rep, meta, job)
        with open(os.path.join(d, "claims.md"), "w") as fh:
            fh.write(md + "\n")
        results.write_json_atomic(os.path.join(d, "claims.json"), claims.to_json(rep))
        results.plot_claims(os.path.join(d, "claims.png"), records, job.settings.lr, rep, title,
                            speed)
        written += ["claims.md", "claims.json", "claims.png"]
    out.write(f"wrote {d}/{', '.join(written)} ({wall_s:.0f}s)\n")
    if judged:
        out.write("\n" + claims_section(rep) + "\n")
    out.flush()


def claims_section(rep: dict) -> str:
    """The last section of the output: the claims, their verdicts, the stability sweep."""
    lines = [f"The claims: each a paired comparison against base over the same seeds. {rep['rule']}",
             "", claims.markdown(rep)]
    st = claims.stability_table(rep)
    if st:
        lines += ["", "Held-out loss by learning rate (mean ± std over seeds; stable: no seed "
                  "diverged or stalled):", "", st]
    return "\n".join(lines)


def claims_markdown(rep: dict, meta: dict, job: AblateJob) -> str:
    s = job.settings
    c = job.base
    head = (f"# Claims report\n\narchext ablate on {meta['data']}: base d_model {c.d_model}, "
            f"{c.n_layers} layers, {c.n_heads} heads; {s.steps} steps of {s.batch_size} x "
            f"{s.seq_len} tokens at lr {s.lr:g}; seeds {', '.join(map(str, meta['seeds']))}; "
            f"{meta['machine']}, torch {meta['torch']}.\n")
    return head + "\n" + claims_section(rep)


__all__ = ["AblateJob", "run", "VariantError", "DEFAULT_SWEEP_LRS"]
