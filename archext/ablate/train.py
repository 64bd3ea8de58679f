"""Train one variant: AdamW on the builder's parameter groups, warmup + cosine schedule,
gradient clipping; loss curve, held-out loss, throughput, peak memory and stability signals."""
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .._device import fused_adamw_available
from . import memory
from .data import BatchSampler, Corpus, PackedSampler, val_batches
from .progress import Progress

# A loss spike: a step whose training loss exceeds the median of the previous SPIKE_WINDOW
# steps by more than SPIKE_REL (relative); consecutive such steps count as one spike.
SPIKE_WINDOW = 20
SPIKE_REL = 0.15


# Stalled: not diverged, but the final held-out loss is within STALL_MARGIN nats of (or above)
# the unigram baseline: the model learned byte frequencies and nothing else.
STALL_MARGIN = 0.05


def is_stalled(val_loss: float, diverged: bool, unigram_loss: float) -> bool:
    return not diverged and not val_loss < unigram_loss - STALL_MARGIN


@dataclass
class TrainSettings:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio
    warmup_frac: float = 0.1      # linear warm-up over this fraction of the steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 0           # 0: five evaluations over the run (the last, at the end, on
                                  # the whole held-out split; the others on eval_batches)
    eval_batches: int = 8         # per evaluation during training; the final one uses all
    seed: int = 0
    device: str = "cpu"
    pack: bool = False            # train on whole documents packed into each row (cu_seqlens)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (one next-byte prediction), got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_frac * self.steps))

    def lr_at(self, step: int) -> float:
        """Learning rate multiplier at ``step`` (0-based): linear warm-up, then cosine."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["pack"]:  # absent when off: the result keys of unpacked runs stay as they were
            del d["pack"]
        return d


def count_spikes(losses: list[float], window: int = SPIKE_WINDOW, rel: float = SPIKE_REL) -> int:
    spikes, inside = 0, False
    for i in range(window, len(losses)):
        ref = statistics.median(losses[i - window:i])
        high = math.isfinite(losses[i]) and losses[i] > ref * (1 + rel)
        if high and not inside:
            spikes += 1
        inside = high
    return spikes


def _median(xs: list[float]) -> float:
    """Median of the last 50 (the progress bar's running figure)."""
    return statistics.median(xs[-50:]) if len(xs) > 50 else statistics.median(xs)


def _ce(out) -> torch.Tensor:
    """The cross-entropy part of the model's loss (``out.loss`` includes the z-loss)."""
    z = getattr(out, "z_loss", None)
    return out.loss if z is None else out.loss - z


@torch.no_grad()
def evaluate(model, batches, device) -> tuple[float, float]:
    """(mean held-out cross-entropy in nats per byte, max |logit|)."""
    was_training = model.training
    model.eval()
    total, max_logit = 0.0, 0.0
    for x in batches:
        x = x.to(device)
        out = model(x, labels=x)
        total += _ce(out).item()
        max_logit = max(max_logit, out.logits.detach().abs().max().item())
    model.train(was_training)
    return total / len(batches), max_logit


def adamw_kw(device) -> dict:
    """The fused AdamW where the device has it (one kernel over all tensors; on the CPU the
    default per-tensor loop took 1.8 ms of a 67 ms step)."""
    return {"fused": True} if fused_adamw_available(device) else {}


def make_optimizer(model, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW on the builder's parameter groups with ``s``'s rate, betas and weight decay (the
    training runs and the speed timing take the same one)."""
    from archext.models import param_groups

    return torch.optim.AdamW(param_groups(model, weight_decay=s.weight_decay), lr=s.lr,
                             betas=(s.beta1, s.beta2), **adamw_kw(s.device))


def train_variant(cfg, settings: TrainSettings, corpus: Corpus, label: str = "",
                  stream=None, sink=None) -> dict:
    """Train ``cfg`` under ``settings``; returns the JSON-ready result record."""
    from archext.models import build

    s = settings
    device = torch.device(s.device)
    torch.manual_seed(s.seed)  # same initial weights for every variant with the same shapes
    model = build(cfg).to(device)
    model.train()
    opt = make_optimizer(model, s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, s.lr_at)
    sampler = (PackedSampler if s.pack else BatchSampler)(corpus.train, s.batch_size, s.seq_len, s.seed)
    vbatches = val_batches(corpus.val, s.batch_size, s.seq_len, s.eval_batches)
    eval_every = s.eval_every or max(1, math.ceil(s.steps / 5))
    tokens_per_step = s.batch_size * s.seq_len
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    losses, val_curve, grad_norms = [], [], []
    diverged_at: Optional[int] = None
    step_times = []
    skip_timing = min(3, s.steps - 1)        # first steps warm caches; not timed
    mem_step = min(2, s.steps - 1)           # the step whose allocations are recorded (CPU)
    peak_bytes = 0
    progress = Progress(s.steps, label, stream, sink=sink)

    def one_step(x, cu_seqlens=None):
        out = model(x, labels=x, cu_seqlens=cu_seqlens)
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return _ce(out).detach(), gn.detach()

    for step in range(s.steps):
        x, cu = sampler.next() if s.pack else (sampler.next(), None)
        x, cu = x.to(device), None if cu is None else cu.to(device)
        if step == mem_step and not cuda:
            held = memory.held_bytes(model, opt)
            result = {}
            transient = memory.step_peak_bytes_cpu(lambda: result.update(r=one_step(x, cu)))
            peak_bytes = held + transient
            ce, gn = result["r"]
        else:
            t0 = time.perf_counter()
            ce, gn = one_step(x, cu)
            loss = ce.item()  # syncs the device, so the timing below is real
            if step >= skip_timing:
                step_times.append(time.perf_counter() - t0)
        loss, gnorm = ce.item(), gn.item()
        losses.append(loss)
        grad_norms.append(gnorm)
        # Diverged: a non-finite loss, or after warm-up a loss above the first step's (worse
        # than the untrained model). Training stops there.
        if not math.isfinite(loss) or (step >= s.warmup_steps and loss > losses[0]):
            diverged_at = step
        if diverged_at is None and (step + 1) % eval_every == 0 and step + 1 < s.steps:
            val_curve.append([step + 1, evaluate(model, vbatches, device)[0]])
        tps = tokens_per_step / _median(step_times) if step_times else 0.0
        progress.update(step + 1, f"loss {loss:.3f} lr {opt.param_groups[0]['lr']:.1e} "
                        f"{tps:,.0f} tok/s")
        if diverged_at is not None:
            break

    # The final figure on the whole held-out split.
    all_val = val_batches(corpus.val, s.batch_size, s.seq_len, max_batches=1 << 30)
    val_loss, max_logit = evaluate(model, all_val, device)
    val_curve.append([len(losses), val_loss])
    if cuda:
        peak_bytes = torch.cuda.max_memory_allocated(device)
    # Median step time: robust to bursts of load from other processes on a shared machine.
    tps = tokens_per_step / statistics.median(step_times) if step_times else float("nan")
    diverged = diverged_at is not None
    progress.close(f"val {val_loss:.4f}" + (f"  DIVERGED at step {diverged_at}" if diverged else ""))
    return {
        "val_loss": val_loss,
        "train_loss": losses[-1],
        "tokens_per_s": tps,
        "peak_mem_bytes": peak_bytes,
        "mem_method": memory.CUDA_METHOD if cuda else memory.CPU_METHOD,
        "params": model.num_parameters(),
        "flops_per_token": model.flops_per_token(s.seq_len),
        "max_abs_logit": max_logit,
        "loss_spikes": count_spikes(losses),
        "diverged": diverged,
        "diverged_at_step": diverged_at,
        "steps_run": len(losses),
        "max_grad_norm": max(grad_norms),
        "loss_curve": losses,
        "val_curve": val_curve,
    }
