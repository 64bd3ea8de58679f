"""RoPE benchmark: archext's fused q/k rotation against the eager composite
(`archext.reference.rope`, Llama's rotate_half form, on q and k), `torch.compile` of it, and the
memory floor measured in the same run: an allocating copy of q and k (`q.clone(); k.clone()`,
read and write each once, as the rotation must).

    python -m archext.bench rope                 # quick: batch 1, seq 2048, 32 / 8 heads, D 128
    python -m archext.bench rope --full          # the issue's shape: batch 8
    python -m archext.bench rope --device cuda

Times are medians of repeated calls (CUDA events on the GPU); GB/s counts the minimum bytes
(read q, k; write q_out, k_out; forward+backward adds reading the two gradients and writing
two). Not a test: nothing is asserted about speed.
"""
import argparse
import time

import torch

import archext
from archext import ops, reference

from .common import median_time


def run(batch: int, seq: int, hq: int, hk: int, d: int, dtype, threads, device: str,
        compile_: bool, min_time: float) -> list[dict]:
    rows = []
    cos, sin = ops.rope_cache(d, seq, device=device)
    pos = torch.arange(seq, device=device)
    q = torch.randn(batch, seq, hq, d, device=device, dtype=dtype)
    k = torch.randn(batch, seq, hk, d, device=device, dtype=dtype)
    nbytes = (q.numel() + k.numel()) * q.element_size()

    def eager(a, b):
        return reference.rope(a, cos, sin, pos), reference.rope(b, cos, sin, pos)

    def fused(a, b):
        return ops.apply_rope(a, b, cos, sin)

    for th in threads:
        if device == "cpu":
            torch.set_num_threads(th)
        # The output must match the eager composite before it is timed (both round in the low
        # dtypes, differently: a couple of ulps apart; a broken kernel is off by O(1)).
        got, want = fused(q, k), eager(q, k)
        tol = 1e-4 if dtype == torch.float32 else 6e-2
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        torch._dynamo.reset()
        compiled = torch.compile(eager, dynamic=False) if compile_ else None
        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
        gq, gk = torch.randn_like(q), torch.randn_like(k)

        def fb(fn):
            return lambda: torch.autograd.grad(fn(qg, kg), (qg, kg), (gq, gk))

        t = {
            "floor": median_time(lambda: (q.clone(), k.clone()), device, min_time),
            "archext": median_time(lambda: fused(q, k), device, min_time),
            "eager": median_time(lambda: eager(q, k), device, min_time),
            "archext fwd+bwd": median_time(fb(fused), device, min_time),
            "eager fwd+bwd": median_time(fb(eager), device, min_time),
        }
        if compiled is not None:
            t["compile"] = median_time(lambda: compiled(q, k), device, min_time)
            t["compile fwd+bwd"] = median_time(fb(compiled), device, min_time)
        rows.append(dict(dtype=str(dtype).replace("torch.", ""), threads=th if device == "cpu" else "-",
                         shape=f"{batch}x{seq}x{hq}/{hk}x{d}", nbytes=nbytes, **t))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archext-bench rope", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="batch 8 (the issue's target shape)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--min-time", type=float, default=None)
    p.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    args = p.parse_args(argv)
    batch = 8 if args.full else 1
    min_time = args.min_time if args.min_time is not None else (2.0 if args.full else 0.5)
    threads = [int(t) for t in args.threads.split(",")]
    if args.device == "cuda":
        threads = [0]
    print(f"archext {archext.__version__} RoPE benchmark, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"device {args.device}, CPU ISA {archext._C.cpu_isa()}, torch {torch.__version__}")
    hdr = ("| dtype | shape (BxSxHq/HkxD) | threads | floor ms | archext ms | x floor | GB/s | eager ms "
           "| compile ms | vs eager | fwd+bwd ms | fwd+bwd vs eager | fwd+bwd vs compile |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for name in args.dtype.split(","):
        dtype = getattr(torch, name)
        for r in run(batch, args.seq, 32, 8, 128, dtype, threads, args.device, not args.no_compile, min_time):
            c = r.get("compile")
            cf = r.get("compile fwd+bwd")
            c_ms = "-" if c is None else f"{c * 1e3:.2f}"
            cf_x = "-" if cf is None else f"{cf / r['archext fwd+bwd']:.2f}"
            print(f"| {r['dtype']} | {r['shape']} | {r['threads']} | {r['floor'] * 1e3:.2f} | "
                  f"{r['archext'] * 1e3:.2f} | {r['floor'] / r['archext']:.2f} | "
                  f"{2 * r['nbytes'] / r['archext'] / 1e9:.1f} | {r['eager'] * 1e3:.2f} | "
                  f"{c_ms} | {r['eager'] / r['archext']:.1f} | "
                  f"{r['archext fwd+bwd'] * 1e3:.2f} | {r['eager fwd+bwd'] / r['archext fwd+bwd']:.1f} | "
                  f"{cf_x} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
