"""``archext profile``: where a training step's FLOPs, bytes and time go, and what the kernels buy.

One training step (forward, backward, AdamW update) of a preset model is broken down by op
class (matmul, attention, norm, activation, rope, loss, residual adds, optimizer, other): share
of FLOPs and of bytes moved,
both computed analytically from the shapes (formulas below), and share of the time measured by
``torch.profiler``. Then the same step runs several ways on the same machine: the archext kernels,
the same model on the plain-PyTorch references (``archext.ops.reference_ops()``), that plain
model under ``torch.compile`` and, on request (``--modes``), the archext kernels under
``torch.compile`` and the same model (same weights) as a Hugging Face ``LlamaForCausalLM``
patched by Liger-Kernel; each reports tokens/s and peak memory.

Analytic model, per training step, T = batch * seq tokens, e = bytes per element (4 in float32).
Backward costs twice the forward FLOPs for matmuls; bytes count each tensor read or written once
per kernel pass (the ideal a fused kernel reaches; unfused code moves more, which is the point):

  matmul      each Linear (in -> out), the LM head included:
              FLOPs 6 T in out;  bytes 3 (T in + T out + in out) e
  attention   per layer, H query / Hkv key-value heads of width D, causal (half the S x S):
              FLOPs 6 B H S^2 D + 9 B H S^2 / 2 (softmax);
              bytes 3 (q + k + v + o) e fused (SDPA), plus 12 B H S^2 e when the scores are
              materialised (soft-cap or additive bias)
  norm        per call over n elements: FLOPs RMSNorm 12 n, LayerNorm 18 n; bytes 5 n e
              (forward reads x, writes y; backward reads x and dy, writes dx)
  activation  per MLP, n = T d_ff hidden elements; FLOPs 3 c n with c = 1 (relu), 5 (silu),
              8 (gelu), +1 for the gating multiply; bytes 5 n e (plain) or 8 n e (gated)
  rope        n = elements of q and k rotated: FLOPs 6 n; bytes 4 n e
  loss        N = T V logits: FLOPs 9 N (log-sum-exp, then softmax minus one-hot); bytes 3 N e
  residual    the residual adds not fused into a norm (2 per layer, FLOPs 2 T d, bytes 6 T d e
              each: the pre-norm block fuses one of them into its second norm)
  optimizer   AdamW 14 FLOPs and 7 e bytes per parameter; gradient clipping 3 FLOPs and 3 e
              bytes per parameter
  other       embedding gather and scatter-add 4 T d e + V d e

Time: self CPU time (on a GPU: the time of the kernels it launched) of every op the profiler
records in one step, each assigned to a class by
the module it ran in (forward hooks open a profiler scope per Linear / norm / rotary / attention
/ MLP / embedding module) or, outside any, by the op's name (a bare ``aten::add`` outside every
module is a residual add); a backward op takes the class of the forward op that created its
autograd node (the profiler's sequence number links them). Python time between ops is not
counted, except in the optimizer: gradient clipping, the AdamW update and zero_grad run in one
scope whose wall time is the optimizer's (a per-tensor AdamW spends much of it in Python).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

from archext._device import fused_adamw_available, resolve_device

CLASSES = ("matmul", "attention", "norm", "activation", "rope", "loss", "residual", "optimizer",
           "other")
MODES = ("archext", "pytorch", "pytorch+compile", "archext+compile", "liger")
# What a plain run times: the modes that need nothing beyond archext and torch.
DEFAULT_MODES = ("archext", "pytorch", "pytorch+compile")
# The AdamW implementation per mode. "auto": the archext modes take the fastest one measured
# (fused: one pass over each parameter; at 1 thread on the development CPU 8 ms a step for the
# cpu preset's 7.4M parameters against 42 ms foreach and 56 ms for the default per-tensor loop),
# the plain modes keep what plain PyTorch code gets, torch's default (on the CPU the loop).
OPTIMIZERS = ("auto", "default", "foreach", "fused")
MODE_LABEL = {"archext": "archext kernels", "pytorch": "plain PyTorch (reference ops)",
              "pytorch+compile": "plain PyTorch + torch.compile",
              "archext+compile": "archext kernels + torch.compile",
              "liger": "HF Llama + Liger-Kernel"}

# Presets: the model and the step shape. Byte-sized vocabularies make the LM head and loss
# vanish, so the profile presets use a BPE-like vocabulary (token ids are random: speed does not
# depend on the text).
PRESETS = {
    "tiny": dict(model=dict(vocab_size=512, d_model=64, n_layers=2, n_heads=2, ffn_multiple_of=32),
                 batch_size=2, seq_len=32),
    "cpu": dict(model=dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=4,
                           ffn_multiple_of=64), batch_size=4, seq_len=256),
    "gpu": dict(model=dict(vocab_size=32768, d_model=1024, n_layers=8, n_heads=16,
                           ffn_multiple_of=256), batch_size=8, seq_len=1024),
}

_SCOPE = "archext.profile/"
# Module type -> class; tested in order, by isinstance or by class-name fragment.
_MODULE_RULES = (
    (lambda m: isinstance(m, nn.Linear), "matmul"),
    (lambda m: isinstance(m, nn.Embedding), "other"),
    # Norm modules (RMSNorm, AddLayerNorm, QK-norm, ...), not the blocks named after their norm
    # placement (PreNormBlock): a block's own ops are its residual adds.
    (lambda m: "Norm" in type(m).__name__ and "Block" not in type(m).__name__, "norm"),
    (lambda m: "Rotary" in type(m).__name__, "rope"),
    (lambda m: "Attention" in type(m).__name__, "attention"),
    (lambda m: "MLP" in type(m).__name__, "activation"),
)
# Op-name fragments -> class, for ops outside any tagged module.
_OP_RULES = (
    (("scaled_dot_product", "flash_attention", "archext::softmax"), "attention"),
    (("rms_norm", "layer_norm"), "norm"),
    (("rope",), "rope"),
    (("archext::glu", "archext::act", "silu", "gelu", "relu"), "activation"),
    (("cross_entropy", "nll_loss", "log_softmax", "logsumexp"), "loss"),
    (("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"), "matmul"),
    (("aten::add",), "residual"),
)
_BACKWARD_ROOT = "autograd::engine::evaluate_function"


def module_class(m: nn.Module) -> Optional[str]:
    for test, cls in _MODULE_RULES:
        if test(m):
            return cls
    return None


def op_class(name: str) -> Optional[str]:
    for fragments, cls in _OP_RULES:
        if any(f in name for f in fragments):
            return cls
    return None


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------
class Step:
    """One training step of ``model`` on ``x``: the model's own loss path (labels shifted
    inside; the LM head fused into the cross-entropy, so the ``[B, S, vocab]`` logits are never
    held whole: with the reference ops, the plain head and loss), backward, gradient clipping and
    AdamW (``optimizer``: default, foreach or fused). The update runs in its own profiler scope."""

    def __init__(self, model: nn.Module, cfg, x: torch.Tensor, compiled: bool = False,
                 optimizer: str = "default"):
        from archext.models import param_groups

        self.model, self.x, self.optimizer = model, x, optimizer

        def loss_fn(inp):
            return model(inp, labels=inp, return_logits=False).loss

        # fullgraph: a graph break would hide where the compiler cannot see through an op.
        self.loss_fn = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
        kw = {} if optimizer == "default" else {optimizer: True}
        self.opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-4, **kw)

    def __call__(self) -> None:
        loss = self.loss_fn(self.x)
        loss.backward()
        with torch.profiler.record_function(_SCOPE + "optimizer"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def mode_optimizer(mode: str, choice: str, device: torch.device) -> str:
    """The AdamW implementation ``mode`` runs with under ``--optimizer choice``."""
    if choice != "auto":
        return choice
    if mode.startswith("archext"):
        return "fused" if fused_adamw_available(device) else "foreach"
    return "default"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Analytic FLOPs and bytes
# ----------------------------------------------------------------------------------------------
_ACT_COST = {"relu": 1, "silu": 5, "gelu": 8, "gelu_tanh": 8}


def _act_cost(name: str) -> tuple[int, bool]:
    """(forward FLOPs per hidden element, gated) for a config activation name."""
    name = str(name).lower()
    gated = name.endswith("glu")
    base = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}.get(name, name)
    return _ACT_COST.get(base, 5) + (1 if gated else 0), gated


def analytic_costs(model: nn.Module, cfg, batch: int, seq: int, elem: int) -> dict:
    """Per class {"flops": ..., "bytes": ...} for one training step, from module shapes and the
    inputs each module sees in one forward (recorded by hooks)."""
    T = batch * seq
    flops = dict.fromkeys(CLASSES, 0.0)
    nbytes = dict.fromkeys(CLASSES, 0.0)
    calls = []  # (module, input numel, output numel)

    def hook(mod, args, out):
        first = args[0] if args and torch.is_tensor(args[0]) else None
        calls.append((mod, first.numel() if first is not None else 0,
                      out.numel() if torch.is_tensor(out) else 0, args))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if module_class(m) in ("norm", "rope", "attention", "activation")]
    try:
        with torch.no_grad():
            model(torch.zeros(batch, seq, dtype=torch.long, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()

    vocab_head = False
    for m in model.modules():
        if isinstance(m, nn.Linear):
            i, o = m.in_features, m.out_features
            flops["matmul"] += 6 * T * i * o
            nbytes["matmul"] += 3 * (T * i + T * o + i * o) * elem
            vocab_head |= o == cfg.vocab_size
    if not vocab_head:  # tied embeddings: the head multiplies by the embedding matrix
        d, V = cfg.d_model, cfg.vocab_size
        flops["matmul"] += 6 * T * d * V
        nbytes["matmul"] += 3 * (T * d + T * V + d * V) * elem

    act_fwd, gated = _act_cost(cfg.activation)
    for mod, n_in, n_out, args in calls:
        cls = module_class(mod)
        name = type(mod).__name__
        if cls == "norm":
            flops["norm"] += (18 if "Layer" in name else 12) * n_in
            nbytes["norm"] += 5 * n_in * elem
        elif cls == "rope":
            n = sum(a.numel() for a in args[:2] if torch.is_tensor(a))
            frac = float(getattr(cfg, "rotary_fraction", 1.0) or 1.0)
            flops["rope"] += 6 * n * frac
            nbytes["rope"] += 4 * n * frac * elem
        elif cls == "activation":
            d_ff = getattr(mod, "d_ff", None) or 4 * cfg.d_model
            n = n_in // max(1, getattr(mod, "d_model", cfg.d_model)) * d_ff
            flops["activation"] += 3 * act_fwd * n
            nbytes["activation"] += (8 if gated else 5) * n * elem
        elif cls == "attention":
            H = getattr(mod, "n_heads", cfg.n_heads)
            Hkv = getattr(mod, "n_kv_heads", H)
            D = getattr(mod, "head_dim", cfg.d_model // cfg.n_heads)
            tokens = n_in // cfg.d_model
            b = max(1, tokens // seq)
            flops["attention"] += 6 * b * H * seq * seq * D + 4.5 * b * H * seq * seq
            nbytes["attention"] += 3 * tokens * (2 * H + 2 * Hkv) * D * elem
            if getattr(mod, "softcap", None) is not None or cfg.position in ("alibi", "t5"):
                nbytes["attention"] += 12 * b * H * seq * seq * elem

    N = T * cfg.vocab_size
    flops["loss"] += 9 * N
    nbytes["loss"] += 3 * N * elem
    P = sum(p.numel() for p in model.parameters())
    d = cfg.d_model
    # Pre-norm blocks add one residual inside their second (fused add + norm) call.
    unfused_adds = 1 if cfg.norm_placement == "pre" and cfg.block == "serial" else 2
    flops["residual"] += unfused_adds * cfg.n_layers * 2 * T * d
    nbytes["residual"] += unfused_adds * cfg.n_layers * 6 * T * d * elem
    flops["optimizer"] += 17 * P
    nbytes["optimizer"] += 10 * P * elem
    flops["other"] += 2 * T * d
    nbytes["other"] += (4 * T * d + cfg.vocab_size * d) * elem
    return {c: {"flops": flops[c], "bytes": nbytes[c]} for c in CLASSES}


# ----------------------------------------------------------------------------------------------
# Measured time per class
# ----------------------------------------------------------------------------------------------
def _tag_modules(model: nn.Module) -> list:
    """Forward hooks that open a profiler scope named after each tagged module's class."""
    handles = []
    for m in model.modules():
        cls = module_class(m)
        if cls is None:
            continue

        def pre(mod, args, _cls=cls):
            rf = torch.profiler.record_function(_SCOPE + _cls)
            rf.__enter__()
            mod.__dict__.setdefault("_archext_scopes", []).append(rf)

        def post(mod, args, out):
            mod.__dict__["_archext_scopes"].pop().__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def _chain(e) -> list:
    out = []
    while e is not None:
        out.append(e)
        e = e.cpu_parent
    return out  # innermost first


def classify_events(events, device_time: bool = False) -> dict:
    """Seconds per class over the profiler's ``events``: self CPU time, or with
    ``device_time`` the GPU time of the kernels each op launched."""
    seconds = dict.fromkeys(CLASSES, 0.0)
    by_seq: dict = {}

    def forward_class(chain) -> Optional[str]:
        for e in chain:  # the innermost tagged module decides
            if e.name.startswith(_SCOPE):
                return e.name[len(_SCOPE):]
        for e in reversed(chain):  # else the outermost op with a telling name
            cls = op_class(e.name)
            if cls:
                return cls
        return None

    def own_time(e) -> float:
        return (e.self_device_time_total if device_time else e.self_cpu_time_total) / 1e6

    opt_scope = _SCOPE + "optimizer"
    pending = []
    for e in events:
        if e.name == opt_scope and not device_time:
            seconds["optimizer"] += e.cpu_time_total / 1e6  # wall time, Python included
            continue
        if e.name.startswith(_SCOPE) or e.name.startswith("[memory]"):
            continue
        chain = _chain(e)
        if not device_time and any(c.name == opt_scope for c in chain):
            continue  # counted with its scope
        root = chain[-1]
        if root.name.startswith(_BACKWARD_ROOT):
            pending.append((e, chain, root))
            continue
        cls = forward_class(chain) or "other"
        seconds[cls] += own_time(e)
        for c in chain:
            if c.sequence_nr >= 0:
                by_seq.setdefault(c.sequence_nr, cls)
    for e, chain, root in pending:
        cls = by_seq.get(root.sequence_nr)
        if cls is None:
            cls = next((op_class(c.name) for c in reversed(chain[:-1]) if op_class(c.name)), "other")
        seconds[cls] += own_time(e)
    return seconds


def measure_class_time(step: Step, steps: int = 2) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from archext.ablate.memory import quiet_native_stderr

    cuda = step.x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    handles = _tag_modules(step.model)
    try:
        with quiet_native_stderr(), profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            _sync(step.x.device)
    finally:
        for h in handles:
            h.remove()
    secs = classify_events(prof.events(), device_time=cuda)
    return {c: s / steps for c, s in secs.items()}


# ----------------------------------------------------------------------------------------------
# Throughput and memory per mode
# ----------------------------------------------------------------------------------------------
def setup_mode(mode: str, cfg, batch: int, seq: int, device: torch.device, warmup: int,
               seed: int, optimizer: str = "auto") -> dict:
    """Build the model (same seed, so the same weights, in every mode) and warm its step up
    (the first calls compile in the compile mode)."""
    from archext import ops
    from archext.models import build

    torch.manual_seed(seed)
    model = build(cfg).to(device).train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device,
                      generator=torch.Generator(device=device).manual_seed(seed))
    if mode == "liger":
        return setup_liger_mode(model, cfg, x, device, warmup,
                                mode_optimizer(mode, optimizer, device))
    reference = mode not in ("archext", "archext+compile")
    with ops.reference_ops(reference):
        t0 = time.perf_counter()
        step = Step(model, cfg, x, compiled=mode.endswith("+compile"),
                    optimizer=mode_optimizer(mode, optimizer, device))
        for _ in range(warmup):
            step()
        _sync(device)
    return {"mode": mode, "step": step, "model": model, "reference": reference,
            "warmup_s": time.perf_counter() - t0, "times": []}


# ----------------------------------------------------------------------------------------------
# The Hugging Face baseline: the same model as a transformers LlamaForCausalLM, patched by Liger
# ----------------------------------------------------------------------------------------------
def liger_unavailable(device: str, cfg) -> Optional[str]:
    """None when the ``liger`` mode can run, else why not."""
    from archext.bench import liger

    why = liger.why_absent(device)
    if why is not None:
        return why
    try:
        import transformers  # noqa: F401
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: F401

        from archext.hf import config_to_hf

        config_to_hf(cfg, "llama")
    except Exception as e:  # noqa: BLE001  (the reason is the note)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


class HFStep:
    """One training step of a transformers causal LM: its own loss from ``labels`` (shifted
    inside; Liger's patch fuses the LM head into the loss, so no logits are held), AdamW grouped
    as `archext.models.param_groups` groups archext's (weight decay on the matrices, not on
    norms, biases and embedding tables), and the same gradient clipping as `Step`."""

    def __init__(self, model: nn.Module, x: torch.Tensor, optimizer: str = "default"):
        self.model, self.x, self.optimizer = model, x, optimizer
        tables = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                  for p in m.parameters(recurse=False)}
        decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in tables]
        rest = [p for p in model.parameters() if p.dim() < 2 or id(p) in tables]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                      {"params": rest, "weight_decay": 0.0}], lr=1e-4,
                                     **({} if optimizer == "default" else {optimizer: True}))

    def __call__(self) -> None:
        loss = self.model(input_ids=self.x, labels=self.x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def setup_liger_mode(model: nn.Module, cfg, x: torch.Tensor, device: torch.device,
                     warmup: int, optimizer: str = "default") -> dict:
    """archext's model (same weights) as a transformers ``LlamaForCausalLM`` with SDPA attention,
    patched by ``apply_liger_kernel_to_llama`` (RoPE, RMSNorm, SwiGLU, fused linear
    cross-entropy), then warmed up. Liger's patch also replaces transformers' Llama functions
    for the rest of the process."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    from archext.hf import to_hf

    hf = to_hf(model, "llama").train()
    hf.config._attn_implementation = "sdpa"  # as archext's attention (no soft-cap in these presets)
    apply_liger_kernel_to_llama(model=hf)
    del model
    t0 = time.perf_counter()
    step = HFStep(hf, x, optimizer)
    for _ in range(warmup):
        step()
    _sync(device)
    return {"mode": "liger", "step": step, "model": hf, "reference": False,
            "warmup_s": time.perf_counter() - t0, "times": []}


def timed_step(state: dict, device: torch.device) -> None:
    from archext import ops

    with ops.reference_ops(state["reference"]):
        t = time.perf_counter()
        state["step"]()
        _sync(device)
        state["times"].append(time.perf_counter() - t)


def finish_mode(state: dict, cfg, batch: int, seq: int, device: torch.device) -> dict:
    """Peak memory of one more step, and for the kernel run the per-class time and costs."""
    from archext import ops
    from archext.ablate import memory

    step, mode = state["step"], state["mode"]
    with ops.reference_ops(state["reference"]):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step()
            peak = torch.cuda.max_memory_allocated(device)
            method = memory.CUDA_METHOD
        else:
            peak = memory.held_bytes(state["model"], step.opt) + memory.step_peak_bytes_cpu(step)
            method = memory.CPU_METHOD
        class_time = measure_class_time(step) if mode == "archext" else None
    times = state["times"]
    med = sorted(times)[len(times) // 2]
    res = {"mode": mode, "label": MODE_LABEL[mode], "step_s_median": med,
           "step_s_all": times, "tokens_per_s": batch * seq / med, "peak_mem_bytes": peak,
           "mem_method": method, "warmup_s": state["warmup_s"], "optimizer": step.optimizer}
    if class_time is not None:
        res["class_time_s"] = class_time
        res["analytic"] = analytic_costs(state["model"], cfg, batch, seq, elem=4)
    return res


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def class_table(analytic: dict, seconds: dict) -> str:
    tf = sum(v["flops"] for v in analytic.values()) or 1
    tb = sum(v["bytes"] for v in analytic.values()) or 1
    ts = sum(seconds.values()) or 1
    lines = ["| op class | FLOPs | bytes moved | measured time | GFLOP | MB moved | ms | FLOP/byte |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in CLASSES:
        f, b, s = analytic[c]["flops"], analytic[c]["bytes"], seconds.get(c, 0.0)
        ai = f"{f / b:.1f}" if b else "-"
        lines.append(f"| {c} | {f / tf:.1%} | {b / tb:.1%} | {s / ts:.1%} | {f / 1e9:.3f} | "
                     f"{b / 2**20:.1f} | {s * 1e3:.1f} | {ai} |")
    lines.append(f"| total | 100% | 100% | 100% | {tf / 1e9:.3f} | {tb / 2**20:.1f} | "
                 f"{ts * 1e3:.1f} | {tf / tb:.1f} |")
    return "\n".join(lines)


def mode_table(modes: list[dict]) -> str:
    ref = next((m for m in modes if m["mode"] == "archext"), modes[0])
    lines = ["| run | AdamW | tokens/s | step (ms, median) | peak memory (MB) | speed vs archext |",
             "|---|---|---:|---:|---:|---:|"]
    for m in modes:
        lines.append(f"| {m['label']} | {m.get('optimizer', '-')} | {m['tokens_per_s']:,.0f} | "
                     f"{m['step_s_median'] * 1e3:.1f} | "
                     f"{m['peak_mem_bytes'] / 2**20:.1f} | "
                     f"{m['tokens_per_s'] / ref['tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def plot_classes(path: str, analytic: dict, seconds: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tf = sum(v["flops"] for v in analytic.values()) or 1
    tb = sum(v["bytes"] for v in analytic.values()) or 1
    ts = sum(seconds.values()) or 1
    shares = {
        "FLOPs": [analytic[c]["flops"] / tf * 100 for c in CLASSES],
        "bytes moved": [analytic[c]["bytes"] / tb * 100 for c in CLASSES],
        "measured time": [seconds.get(c, 0.0) / ts * 100 for c in CLASSES],
    }
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.27
    for i, (label, vals) in enumerate(shares.items()):
        xs = [j + (i - 1) * width for j in range(len(CLASSES))]
        bars = ax.bar(xs, vals, width, label=label)
        for b, v in zip(bars, vals):
            if v >= 1:
                ax.text(b.get_x() + b.get_width() / 2, v + 0.5, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_ylabel("share of the training step (%)")
    ax.set_title("FLOPs are not runtime: share per op class", fontsize=11)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=8, y=0.99)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile(cfg, batch: int, seq: int, device: str = "cpu", modes=DEFAULT_MODES, warmup: int = 3,
            steps: int = 10, seed: int = 0, out_dir: Optional[str] = None, preset: str = "",
            stream=None, out=None, optimizer: str = "auto") -> dict:
    """Profile ``cfg`` and write profile.json, profile.md and profile_classes.png to out_dir."""
    from archext.ablate.progress import Progress
    from archext.ablate.runner import machine

    stream, out = stream or sys.stderr, out or sys.stdout
    dev = torch.device(device)

    def log(msg):
        stream.write(msg + "\n")
        stream.flush()

    skipped = {}
    if "liger" in modes:
        why = liger_unavailable(device, cfg)
        if why is not None:
            skipped["liger"] = why
            modes = [m for m in modes if m != "liger"]
    if not modes:
        raise SystemExit("archext profile: no mode can run here: "
                         + "; ".join(f"{m}: {w}" for m, w in skipped.items()))
    log(f"archext profile: preset {preset or 'custom'}, batch {batch} x seq {seq}, device {device} "
        f"({machine(device)}); modes {', '.join(modes)}")
    for m, why in skipped.items():
        log(f"  {MODE_LABEL[m]:<32} skipped: {why}")
    states = []
    for m in modes:
        states.append(setup_mode(m, cfg, batch, seq, dev, warmup, seed, optimizer))
        log(f"  {MODE_LABEL[m]:<32} warmed up ({states[-1]['warmup_s']:.1f}s)")
    # Round-robin timing: on a shared machine, load from elsewhere then slows every mode alike.
    progress = Progress(steps, "  timing")
    for i in range(steps):
        for st in states:
            timed_step(st, dev)
        progress.update(i + 1)
    progress.close("done")
    results = [finish_mode(st, cfg, batch, seq, dev) for st in states]
    for r in results:
        log(f"  {r['label']:<32} {r['tokens_per_s']:>10,.0f} tokens/s  step "
            f"{r['step_s_median'] * 1e3:.1f} ms  peak {r['peak_mem_bytes'] / 2**20:.1f} MB")
    report = {"command": "archext profile", "preset": preset, "config": dataclasses.asdict(cfg),
              "batch_size": batch, "seq_len": seq, "device": device, "machine": machine(device),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "timed_steps": steps, "warmup_steps": warmup, "optimizer": optimizer,
              "modes": results,
              "skipped": skipped}
    text = []
    main = next((r for r in results if r["mode"] == "archext"), None)
    title = (f"preset {preset or 'custom'}: d_model {cfg.d_model}, {cfg.n_layers} layers, vocab "
             f"{cfg.vocab_size}, batch {batch} x seq {seq}; {machine(device)}")
    if main is not None:
        text += ["Per op class, one training step with the archext kernels "
                 "(FLOPs and bytes analytic, time measured by torch.profiler):", "",
                 class_table(main["analytic"], main["class_time_s"]), ""]
    text += [f"End to end (median of {steps} steps per mode, the modes taking turns, after "
             f"{warmup} warm-up steps; peak memory: {results[0]['mem_method']}):", "",
             mode_table(results)]
    text += [f"Skipped: {MODE_LABEL[m]} ({why})." for m, why in skipped.items()]
    text += ["", "FLOPs and bytes: the analytic model in archext/profile.py's docstring. Time: "
             "torch.profiler self time per op, classed by module scope."]
    md = "\n".join(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "profile.json"), "w") as fh:
            json.dump(report, fh, indent=1)
        with open(os.path.join(out_dir, "profile.md"), "w") as fh:
            fh.write(f"{title}\n\n{md}\n")
        if main is not None:
            plot_classes(os.path.join(out_dir, "profile_classes.png"), main["analytic"],
                         main["class_time_s"], title)
    out.write(md + "\n")
    if out_dir:
        out.write(f"\nwrote {out_dir}/profile.json, profile.md"
                  f"{', profile_classes.png' if main is not None else ''}\n")
    out.flush()
    return report


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def add_arguments(sub) -> None:
    p = sub.add_parser(
        "profile", help="FLOPs / bytes / time per op class; kernels vs plain PyTorch",
        description="Profile one training step of a preset model: per op class the share of "
                    "FLOPs and bytes moved (analytic) and of measured time; then tokens/s and "
                    "peak memory with the archext kernels, plain PyTorch, and plain PyTorch "
                    "under torch.compile.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model and step size (default: cpu, "
                   "or gpu on a GPU)")
    p.add_argument("--set", default="", metavar="K=V,...", help="override TransformerConfig fields")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated subset of {', '.join(MODES)} (archext+compile: the "
                        "archext kernels under torch.compile; liger: the same model as a Hugging "
                        "Face LlamaForCausalLM patched by Liger-Kernel, CUDA only, skipped with a "
                        "note where it cannot run); 'all' for every one")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="auto",
                   help="AdamW implementation: auto (the archext modes fused where available, "
                        "the plain modes torch's default), or one for every mode")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the idle cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="output folder (default ./ablate-out/profile)")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    from archext.ablate import variants as V

    device = resolve_device(args.device)
    preset = args.preset or ("gpu" if device.startswith("cuda") else "cpu")
    spec = PRESETS[preset]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if modes == ["all"]:
        modes = list(MODES)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SystemExit(f"archext profile: --modes: unknown {bad}; choose from {', '.join(MODES)}")
    from archext.ablate.runner import auto_threads

    if args.threads:
        torch.set_num_threads(args.threads)
    elif device == "cpu":
        torch.set_num_threads(auto_threads())
    batch = args.batch_size or spec["batch_size"]
    seq = args.seq_len or spec["seq_len"]
    over = V.parse_assignments(args.set, "--set")
    base = {**V.CPU_BASE, **spec["model"], "max_seq_len": max(seq, 128)}
    cfg = V.make_base(base, over)
    profile(cfg, batch, seq, device=device, modes=modes, warmup=args.warmup, steps=args.steps,
            seed=args.seed, out_dir=args.out or os.path.join("ablate-out", "profile"),
            preset=preset, optimizer=args.optimizer)
    return 0
