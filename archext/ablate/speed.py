"""Tokens/s of each variant's training step, timed in interleaved rounds.

The tokens/s a training run reports is its median step time, but on a shared machine a burst of
load during one run and not another makes two runs' speeds differ for no reason of their own.
Here every variant is built once and, round after round, the variants take turns one training
step (forward, backward, clipping, AdamW) at a time, in an order that rotates per round, until
each has timed a few steps: a change of load from elsewhere, which lasts seconds, then falls on
all variants of a round alike (one round of 10 variants x 5 steps takes about 3 s). The claims
compare speeds paired by round, as they compare losses paired by seed. (Timing a variant's
steps back to back instead, one round once gave a 2.2x "speedup" to the variant timed before a
compiler started on the other core.)

Two instances of one model need not time alike either: where each one's tensors sit in memory,
and the other process's load, gave two builds of base the same seed a "significant" 2.2%
difference in one 8-round timing. So base is timed twice, as base and a twin built alike
(AA_NAME), and the claims ask a variant's difference to clear that A/A difference too
(archext.ablate.claims)."""
import statistics
import time

import torch

from .data import BatchSampler, Corpus
from .train import TrainSettings, make_optimizer

AA_NAME = "base (A/A twin)"  # a second, identically built base, timed beside the first


def _step_fn(cfg, settings: TrainSettings):
    from archext.models import build

    torch.manual_seed(settings.seed)
    model = build(cfg).to(settings.device).train()
    opt = make_optimizer(model, settings)

    def step(x):
        out = model(x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def time_variants(resolved: list, settings: TrainSettings, corpus: Corpus, rounds: int,
                  steps: int, warmup: int = 3, sink=None) -> dict:
    """{"rounds": [{variant name: tokens/s}], ...}: per round, each variant's median step time
    over ``steps`` steps, as tokens/s; with base among the variants, AA_NAME too."""
    device = torch.device(settings.device)
    sampler = BatchSampler(corpus.train, settings.batch_size, settings.seq_len, settings.seed)
    x = sampler.next().to(device)
    names = [v.name for v, _ in resolved]
    fns = {v.name: _step_fn(cfg, settings) for v, cfg in resolved}
    base = [cfg for v, cfg in resolved if v.name == "base"]
    if base:  # the A/A control: base built again, timed as one more variant
        names.append(AA_NAME)
        fns[AA_NAME] = _step_fn(base[0], settings)
    for fn in fns.values():
        for _ in range(warmup):
            fn(x).item()
    out = []
    t0 = time.perf_counter()
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]  # each variant first in turn
        times: dict = {name: [] for name in order}
        for _ in range(steps):
            for name in order:
                t = time.perf_counter()
                fns[name](x).item()  # .item() syncs a GPU, so the time is the step's
                times[name].append(time.perf_counter() - t)
        out.append({name: settings.batch_size * settings.seq_len / statistics.median(ts)
                    for name, ts in times.items()})
        if sink is not None:
            sink("update", "speed", f"speed: round {r + 1}/{rounds} "
                                    f"{time.perf_counter() - t0:.0f}s")
    if sink is not None:
        sink("done", "speed", f"speed: {rounds} rounds x {steps} steps of {len(names)} models "
                              f"({time.perf_counter() - t0:.1f}s)")
    return {"rounds": out, "steps_per_round": steps, "warmup_steps": warmup,
            "threads": torch.get_num_threads(), "aa_twin": AA_NAME if base else None}
