"""Run a set of variants (optionally at several learning rates), resume from finished ones,
and write the outputs."""
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import results
from .data import Corpus
from .train import SPIKE_REL, SPIKE_WINDOW, STALL_MARGIN, TrainSettings, is_stalled, train_variant
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
                       "data": fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _load_finished(path: str, key: str) -> Optional[dict]:
    try:
        with open(path) as fh:
            stored = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None  # absent, or cut off mid-write by an interruption: train again
    return stored.get("record") if stored.get("key") == key else None


def run(job: AblateJob, stream=None, out=None) -> list[dict]:
    """Train every (variant, lr) not already finished in ``job.out_dir``; write results.json,
    results.csv, table.md and the plots; print the table. Returns the run records."""
    stream = stream or sys.stderr
    out = out or sys.stdout
    if job.threads:
        torch.set_num_threads(job.threads)
    elif job.settings.device == "cpu":
        torch.set_num_threads(auto_threads())
    resolved = resolve(job.base, job.variants)          # every spec checked before training
    corpus = Corpus.load(job.data, job.settings.seq_len)
    sweep = job.lrs is not None
    lrs = list(job.lrs) if sweep else [job.settings.lr]
    runs_dir = os.path.join(job.out_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)

    if job.seeds < 1:
        raise VariantError(f"--seeds must be >= 1, got {job.seeds}")
    seeds = [job.settings.seed + i for i in range(job.seeds)]
    plan = []
    for variant, cfg in resolved:
        for lr in lrs:
            group = f"{variant.name}@lr{lr:g}" if sweep else variant.name
            for seed in seeds:
                settings = dataclasses.replace(job.settings, lr=lr, seed=seed)
                run_id = f"{group}.seed{seed}" if job.seeds > 1 else group
                plan.append((run_id, group, variant, cfg, settings))
    stream.write(f"archext ablate: {len(plan)} runs ({len(resolved)} variants"
                 f"{f' x {len(lrs)} learning rates' if sweep else ''}"
                 f"{f' x {job.seeds} seeds' if job.seeds > 1 else ''}) on {corpus.description}, "
                 f"{job.settings.steps} steps of {job.settings.batch_size}x{job.settings.seq_len} "
                 f"tokens, device {job.settings.device} ({machine(job.settings.device)}); "
                 f"output {job.out_dir}\n")

    records, t_start = [], time.perf_counter()
    unigram = corpus.unigram_loss
    meta = {
        "command": "archext ablate",
        "data": corpus.description, "data_fingerprint": corpus.fingerprint,
        "train_bytes": len(corpus.train), "val_bytes": len(corpus.val),
        "base_config": dataclasses.asdict(job.base), "settings": job.settings.to_dict(),
        "learning_rates": lrs, "sweep": sweep, "seeds": seeds,
        "device": job.settings.device, "machine": machine(job.settings.device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "spike_rule": f"loss > (1 + {SPIKE_REL}) x median of the previous {SPIKE_WINDOW} steps; "
                      "consecutive steps count once",
        "divergence_rule": "non-finite loss, or after warm-up a training loss above the first "
                           "step's; training stops there",
        "unigram_loss": unigram,
        "stall_rule": f"not diverged, final held-out loss above the unigram baseline "
                      f"({unigram:.4f}) minus {STALL_MARGIN}: learned byte frequencies only",
        **job.extra_meta,
    }
    try:
        for i, (run_id, group, variant, cfg, settings) in enumerate(plan):
            path = os.path.join(runs_dir, run_id + ".json")
            key = run_key(cfg, settings, corpus.fingerprint)
            rec = None if job.fresh else _load_finished(path, key)
            label = f"[{i + 1}/{len(plan)}] {run_id}"
            if rec is not None:
                stream.write(f"{label}: finished earlier, kept (delete {path} to retrain)\n")
            else:
                t0 = time.perf_counter()
                rec = train_variant(cfg, settings, corpus, label=f"{label:<28}", stream=stream)
                rec.update(run=run_id, group=group, variant=variant.name, lr=settings.lr,
                           seed=settings.seed, threads=torch.get_num_threads(),
                           about=variant.describe(), overrides=variant.overrides,
                           wall_s=time.perf_counter() - t0)
                results.write_json_atomic(path, {"key": key, "record": rec})
            rec["stalled"] = is_stalled(rec["val_loss"], rec["diverged"], unigram)
            records.append(rec)
    except KeyboardInterrupt:
        stream.write(f"\ninterrupted: {len(records)} of {len(plan)} runs finished and kept in "
                     f"{runs_dir}; run the same command again to resume.\n")
        if records:
            _write_outputs(job, meta, records, sweep, time.perf_counter() - t_start, out)
        raise
    _write_outputs(job, meta, records, sweep, time.perf_counter() - t_start, out)
    return records


def _write_outputs(job, meta, records, sweep, wall_s, out) -> None:
    d = job.out_dir
    meta = {**meta, "wall_s_this_invocation": wall_s}
    results.write_json(os.path.join(d, "results.json"), meta, records)
    results.write_csv(os.path.join(d, "results.csv"), records)
    tab = results.table(records, sweep=sweep)
    with open(os.path.join(d, "table.md"), "w") as fh:
        fh.write(tab + "\n")
    title = (f"archext ablate: {meta['data']}; {job.settings.steps} steps x "
             f"{job.settings.batch_size}x{job.settings.seq_len} tokens; {meta['machine']}")
    results.plot_curves(os.path.join(d, "loss_curves.png"), records, title)
    if sweep:
        results.plot_lr(os.path.join(d, "loss_vs_lr.png"), records, title, meta["unigram_loss"])
    out.write(tab + "\n")
    out.write(f"\nspikes: {meta['spike_rule']}. diverged: {meta['divergence_rule']}. "
              f"stalled: {meta['stall_rule']}. peak memory: {records[0]['mem_method']}.\n")
    out.write(f"wrote {d}/results.json, results.csv, table.md, loss_curves.png"
              f"{', loss_vs_lr.png' if sweep else ''} ({wall_s:.0f}s)\n")
    out.flush()


__all__ = ["AblateJob", "run", "VariantError", "DEFAULT_SWEEP_LRS"]
