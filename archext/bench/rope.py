"""RoPE benchmark: archext's fused q/k rotation against the eager composite
(`archext.reference.rope`, Llama's rotate_half form, on q and k), `torch.compile` of it,
Liger-Kernel's `LigerRopeFunction` (on CUDA, where `liger_kernel` imports; it takes
[B, H, S, D] and rotates in place: it gets transposed views of its own copies of q and k, laid
out [B, S, H, D] as in HF), and two memory floors measured in the same run, each reading and
writing q and k once, as the rotation must: an allocating copy (`q.clone(); k.clone()`) and a
copy into preallocated buffers (`qo.copy_(q); ko.copy_(k)`).

    python -m archext.bench rope                 # quick: batch 1, seq 2048, 32 / 8 heads, D 128
    python -m archext.bench rope --full          # the issue's shape: batch 8 (16 on CUDA)
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

from . import liger
from .common import median_time


def run(batch: int, seq: int, hq: int, hk: int, d: int, dtype, threads, device: str,
        compile_: bool, min_time: float, use_liger: bool = True) -> list[dict]:
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
        del got
        torch._dynamo.reset()
        compiled = torch.compile(eager, dynamic=False) if compile_ else None
        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
        gq, gk = torch.randn_like(q), torch.randn_like(k)

        def fb(fn):
            return lambda: torch.autograd.grad(fn(qg, kg), (qg, kg), (gq, gk))

        qo, ko = torch.empty_like(q), torch.empty_like(k)
        t = {
            "floor": median_time(lambda: (q.clone(), k.clone()), device, min_time),
            "copy": median_time(lambda: (qo.copy_(q), ko.copy_(k)), device, min_time),
            "archext": median_time(lambda: fused(q, k), device, min_time),
            "eager": median_time(lambda: eager(q, k), device, min_time),
            "archext fwd+bwd": median_time(fb(fused), device, min_time),
            "eager fwd+bwd": median_time(fb(eager), device, min_time),
        }
        if compiled is not None:
            t["compile"] = median_time(lambda: compiled(q, k), device, min_time)
            t["compile fwd+bwd"] = median_time(fb(compiled), device, min_time)
        why = None if not use_liger else liger.why_absent(device)
        if use_liger and why is None:
            t.update(liger_times(q, k, cos, sin, seq, dtype, want, tol, device, min_time))
        rows.append(dict(dtype=str(dtype).replace("torch.", ""), threads=th if device == "cpu" else "-",
                         shape=f"{batch}x{seq}x{hq}/{hk}x{d}", nbytes=nbytes,
                         liger_note=why if use_liger else "--no-liger", **t))
    return rows


def liger_times(q, k, cos, sin, seq: int, dtype, want, tol: float, device: str,
                min_time: float) -> dict:
    """Liger's forward and forward+backward, on its own copies of q, k and of the gradients (it
    rotates them in place; a rotation keeps their norms, so repeated calls stay in range). Its
    output must match the eager composite first, as archext's does."""
    fn = liger.rope_fn(*liger.rope_tables(cos, sin, seq, dtype))
    got = fn(q.clone(), k.clone())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    del got
    ql, kl = q.clone(), k.clone()
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    return {"liger": median_time(lambda: fn(ql, kl), device, min_time),
            "liger fwd+bwd": median_time(
                lambda: torch.autograd.grad(fn(qg, kg), (qg, kg), (gq, gk)), device, min_time)}


COLUMNS = ("dtype", "shape (BxSxHq/HkxD)", "threads", "floor ms", "copy_ ms", "archext ms",
           "x floor", "x copy_", "GB/s", "eager ms", "compile ms", "liger ms", "vs eager",
           "vs compile", "vs liger", "fwd+bwd ms", "fwd+bwd GB/s", "fwd+bwd vs eager",
           "fwd+bwd vs compile", "fwd+bwd vs liger")


def format_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def format_row(r: dict) -> str:
    """One markdown row: the forward (x floor, x copy_: the floor's time over archext's; GB/s:
    read q, k and write both, over archext's time), then forward+backward (twice those bytes:
    the backward reads the two gradients and writes two)."""
    a, af = r["archext"], r["archext fwd+bwd"]

    def ms(key):
        return "-" if r.get(key) is None else f"{r[key] * 1e3:.3f}"

    def vs(key, ours):
        return "-" if r.get(key) is None else f"{r[key] / ours:.2f}"
    cells = [r["dtype"], r["shape"], str(r["threads"]), ms("floor"), ms("copy"), ms("archext"),
             f"{r['floor'] / a:.2f}", f"{r['copy'] / a:.2f}", f"{2 * r['nbytes'] / a / 1e9:.1f}",
             ms("eager"), ms("compile"), ms("liger"), vs("eager", a), vs("compile", a),
             vs("liger", a), ms("archext fwd+bwd"), f"{4 * r['nbytes'] / af / 1e9:.1f}",
             vs("eager fwd+bwd", af), vs("compile fwd+bwd", af), vs("liger fwd+bwd", af)]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archext-bench rope", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="batch 8 (the issue's target shape; 16 on CUDA: 256 MB and more)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel baseline (CUDA)")
    p.add_argument("--min-time", type=float, default=None)
    p.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    args = p.parse_args(argv)
    # --full: batch 8, and 16 on a GPU, where q and k are then 336 MB in bfloat16 (the GPU
    # targets are for 256 MB and more).
    batch = (16 if args.device == "cuda" else 8) if args.full else 1
    min_time = args.min_time if args.min_time is not None else (2.0 if args.full else 0.5)
    threads = [int(t) for t in args.threads.split(",")]
    if args.device == "cuda":
        threads = [0]
    print(f"archext {archext.__version__} RoPE benchmark, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"device {args.device}, CPU ISA {archext._C.cpu_isa()}, torch {torch.__version__}, "
          f"liger_kernel {liger.version() or 'not importable'}")
    print(format_header())
    notes = set()
    for name in args.dtype.split(","):
        dtype = getattr(torch, name)
        for r in run(batch, args.seq, 32, 8, 128, dtype, threads, args.device, not args.no_compile,
                     min_time, use_liger=not args.no_liger):
            print(format_row(r), flush=True)
            if r.get("liger_note") and args.device == "cuda":
                notes.add(f"no Liger-Kernel column: {r['liger_note']}")
    for n in sorted(notes):
        print(n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
