"""Attention memory and time: the tiled kernel against the materialised ``[B, H, S, S]`` scores.

One forward + backward of the gemma2 preset's attention layer (a windowed one: soft-cap 50,
window 4096, its default width and heads) over one sequence of S tokens, for each path of
`archext.nn.Attention`: ``materialized`` (q k^T, archext's soft-capped softmax kernel, p v: the
S^2 path, what eager Gemma 2 does) and ``tiled`` (``ops.flash_attention``: memory linear in S).

    python -m archext.bench attention                       # S = 1k, 4k, 8k at 1 thread
    python -m archext.bench attention --seqs 1024,2048 --threads 2
    python -m archext.bench attention --sdpa [--threads 2]  # plain causal: tiled vs SDPA

Peak memory is the highest net allocation during the step (torch.profiler's allocation
timeline on the CPU, `archext.ablate.memory`; ``max_memory_allocated`` on CUDA), beyond the
inputs and weights that exist before it. Times are the median of ``--repeats`` steps after one
warm-up. Not a test: nothing is asserted.
"""
import argparse
import statistics
import time

import torch

from ..ablate import memory
from ..models import preset
from ..models.blocks import make_attention
from .common import cpu_model, median_time


def _step(attn, x, grad):
    out = attn(x)
    out.backward(grad)


def measure(seq: int, impl: str, device: str, repeats: int, dtype=torch.float32) -> dict:
    cfg = preset("gemma2", max_seq_len=seq, attn_impl=impl)
    layer = next(i for i in range(cfg.n_layers) if cfg.layer_window(i) is not None)
    from ..nn import RotaryEmbedding

    rope = RotaryEmbedding(cfg.head_size, theta=cfg.rope_theta, max_positions=seq)
    torch.manual_seed(0)
    attn = make_attention(cfg, layer, rope).to(device=device, dtype=dtype)
    x = torch.randn(1, seq, cfg.d_model, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    _step(attn, x, grad)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(attn, x, grad)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = memory.step_peak_bytes_cpu(lambda: _step(attn, x, grad))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(attn, x, grad)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"seq": seq, "impl": impl, "time_s": statistics.median(times), "peak_bytes": peak,
            "heads": cfg.n_heads, "head_dim": cfg.head_size, "window": cfg.layer_window(layer),
            "softcap": cfg.attn_softcap}


# (B, S, H, D): the ablation's model (12 x 128, 4 heads x 24), the profile preset (4 x 256,
# 4 x 64), and longer rows.
SDPA_SHAPES = ((12, 128, 4, 24), (4, 256, 4, 64), (8, 256, 4, 32), (2, 512, 4, 64),
               (1, 1024, 8, 64), (1, 2048, 4, 64), (1, 1024, 4, 128))


def against_sdpa(shapes=SDPA_SHAPES, rounds: int = 3, min_time: float = 0.25) -> list[dict]:
    """Plain causal attention (nothing modified), float32 on the CPU: the tiled kernel
    (``ops.flash_attention``) against ``F.scaled_dot_product_attention``, forward + backward
    and forward alone; per shape the best of ``rounds`` medians, the engines taking turns."""
    import torch.nn.functional as F

    from .. import ops

    rows = []
    for b, s, h, d in shapes:
        q, k, v = (torch.randn(b, s, h, d, requires_grad=True) for _ in range(3))
        g = torch.randn(b, s, h, d)
        t = lambda x: x.transpose(1, 2)  # noqa: E731

        def sdpa():
            return F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True).transpose(1, 2)

        def tiled():
            return ops.flash_attention(q, k, v)

        fns = {"sdpa": lambda: sdpa().backward(g), "tiled": lambda: tiled().backward(g)}
        for name, f in (("sdpa", sdpa), ("tiled", tiled)):
            fns[name + " fwd"] = lambda f=f: torch.no_grad()(f)()
        best = {key: min(median_time(fn, "cpu", min_time) for _ in range(rounds)) * 1e3
                for key, fn in fns.items()}
        rows.append({"shape": (b, s, h, d), **best})
    return rows


def main_sdpa(threads: int) -> int:
    rows = against_sdpa()
    print(f"plain causal attention, float32, {cpu_model()}, {threads} thread(s): the tiled kernel "
          f"against F.scaled_dot_product_attention (ms, best of 3 medians)")
    print(f"{'B x S, H x D':>18}  {'fwd+bwd sdpa':>12} {'tiled':>8} {'ratio':>6}  "
          f"{'fwd sdpa':>9} {'tiled':>8} {'ratio':>6}")
    for r in rows:
        b, s, h, d = r["shape"]
        print(f"{f'{b} x {s}, {h} x {d}':>18}  {r['sdpa']:12.2f} {r['tiled']:8.2f} "
              f"{r['tiled'] / r['sdpa']:5.2f}x  {r['sdpa fwd']:9.2f} {r['tiled fwd']:8.2f} "
              f"{r['tiled fwd'] / r['sdpa fwd']:5.2f}x")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archext-bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", default="1024,4096,8192", help="comma-separated sequence lengths")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--impls", help="comma-separated Attention paths to time (default: "
                   "materialized,tiled; on CUDA also flex)")
    p.add_argument("--sdpa", action="store_true",
                   help="instead: plain causal attention, the tiled kernel against SDPA (CPU)")
    args = p.parse_args(argv)
    if args.sdpa:
        torch.set_num_threads(args.threads)
        return main_sdpa(args.threads)
    impls = (args.impls or ("materialized,tiled,flex" if args.device == "cuda" else "materialized,tiled")).split(",")
    if "materialized" not in impls:
        impls.insert(0, "materialized")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    seqs = [int(s) for s in args.seqs.split(",")]
    rows = []
    for seq in seqs:
        for impl in impls:
            rows.append(measure(seq, impl, args.device, args.repeats))
    r0 = rows[0]
    print(f"gemma2 preset attention, one forward + backward, batch 1, {r0['heads']} heads x "
          f"{r0['head_dim']}, window {r0['window']}, soft-cap {r0['softcap']:g}, float32; "
          f"{args.device} ({cpu_model() if args.device == 'cpu' else torch.cuda.get_device_name()}), "
          f"{args.threads} thread(s)")
    print(f"{'S':>6}  {'path':<13} {'time ms':>9} {'peak MiB':>9}  {'vs materialized':>18}")
    by = {(r["seq"], r["impl"]): r for r in rows}
    for r in rows:
        ratio = ""
        if r["impl"] != "materialized":
            m = by[(r["seq"], "materialized")]
            ratio = (f"mem {r['peak_bytes'] / m['peak_bytes']:6.1%}  "
                     f"time {r['time_s'] / m['time_s']:.2f}x")
        print(f"{r['seq']:>6}  {r['impl']:<13} {r['time_s'] * 1e3:9.1f} {r['peak_bytes'] / 2**20:9.1f}  {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
