"""Cross-entropy, attention-softmax and fused linear cross-entropy benchmark.

    python -m archext.bench loss              # quick: 1024 x 32768 logits
    python -m archext.bench loss --full       # the issue's shape: 4096 x 32768 float32 logits

Cross-entropy forward+backward with z-loss 1e-4 and soft-cap 30 against two memory floors
measured in the same run, each reading the logits twice and writing one tensor of their size
(the bytes-moved floor: 3 x the logits): one read, ``x.sum()``, plus an allocating copy for the
gradient, ``x.clone()``, or a copy into a preallocated buffer, ``buf.copy_(x)``; against PyTorch
eager (``F.cross_entropy`` on ``30 tanh(x / 30)`` with an explicit z-loss), ``torch.compile`` of
it and, on CUDA where ``liger_kernel`` imports, Liger-Kernel's ``LigerCrossEntropyFunction``
(the same soft-cap and z-loss; it writes the gradient into the logits it is given, so it gets
its own copy, restored untimed before each call). The soft-capped causal attention softmax
against an allocating copy of the scores (``clone()``). The fused linear cross-entropy: on the
CPU its peak extra memory, measured as the peak resident-set growth of a fresh process, against
the full float32 logits; on CUDA its time and peak memory (``torch.cuda.max_memory_allocated``)
against the unfused eager head and loss, ``torch.compile`` of it and Liger-Kernel's
``LigerFusedLinearCrossEntropyFunction``.
Times are medians; not a test (nothing is asserted about speed).
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from archext import ops

from . import liger
from .common import median_time


def eager_ce(x, t, cap=30.0, coef=1e-4):
    z = cap * torch.tanh(x / cap)
    lse = torch.logsumexp(z, -1)
    return F.cross_entropy(z, t) + coef * (lse * lse).mean()


def bench_ce(n, v, threads, compile_, min_time, device="cpu", use_liger=True):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(n, v, device=device) * 4
    t = torch.randint(0, v, (n,), device=device)
    nbytes = x.numel() * x.element_size()
    buf = torch.empty_like(x)

    def floor():
        return x.sum(), x.clone()

    def copy():
        return x.sum(), buf.copy_(x)

    def ours():
        xx = x.detach().requires_grad_()
        loss, _ = ops.cross_entropy(xx, t, z_loss_coef=1e-4, softcap=30.0)
        loss.backward()
        return xx.grad

    def eager(fn=eager_ce):
        xx = x.detach().requires_grad_()
        fn(xx, t).backward()
        return xx.grad

    res = {"op": "cross_entropy fwd+bwd", "shape": f"{n}x{v}", "threads": threads,
           "floor_s": median_time(floor, device, min_time),
           "copy_s": median_time(copy, device, min_time),
           "archext_s": median_time(ours, device, min_time),
           "eager_s": median_time(eager, device, min_time)}
    if compile_:
        torch._dynamo.reset()
        comp = torch.compile(eager_ce)
        res["compile_s"] = median_time(lambda: eager(comp), device, min_time)
    why = liger.why_absent(device) if use_liger else "--no-liger"
    if why is None:
        res["liger_s"] = liger_ce_time(x, t, device, min_time)
    else:
        res["liger_note"] = why
    # Minimum bytes: read the logits twice (forward, backward), write the gradient once.
    res["archext_GBps"] = 3 * nbytes / res["archext_s"] / 1e9
    res["copy_GBps"] = 3 * nbytes / res["copy_s"] / 1e9
    return res


def liger_ce_time(x, t, device, min_time, cap=30.0, coef=1e-4) -> float:
    """Liger's cross-entropy forward+backward (its gradient is computed in the forward, into the
    logits): checked against eager, then timed on its own copy of the logits, restored before
    each call."""
    xl = x.detach().clone().requires_grad_()
    liger.cross_entropy(xl, t, z_loss_coef=coef, softcap=cap).backward()
    xe = x.detach().clone().requires_grad_()
    eager_ce(xe, t, cap, coef).backward()
    torch.testing.assert_close(xl.grad, xe.grad, rtol=1e-3, atol=1e-6)
    del xe

    def restore():
        with torch.no_grad():
            xl.copy_(x)
        xl.grad = None

    def run():
        liger.cross_entropy(xl, t, z_loss_coef=coef, softcap=cap).backward()
        return xl.grad
    return median_time(run, device, min_time, pre=restore)


def bench_linear_ce_cuda(n, d, v, dtype, compile_, min_time, device="cuda", use_liger=True,
                         cap=30.0, coef=1e-4):
    """The LM head and loss, forward+backward: time and peak memory (beyond the inputs) of
    archext.ops.linear_cross_entropy, the unfused eager ``h @ w.T`` + cross-entropy, torch.compile
    of that, and Liger's fused linear cross-entropy. A matmul-bound op: no bandwidth floor."""
    torch.manual_seed(0)
    h = (torch.randn(n, d, device=device) / d ** 0.5).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=device) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)

    def step(fn):
        def run():
            loss = fn(h, w, t)
            return torch.autograd.grad(loss, (h, w))
        return run

    def ours(h, w, t):
        return ops.linear_cross_entropy(h, w, t, z_loss_coef=coef, softcap=cap)[0]

    def eager(h, w, t):
        return eager_ce((h @ w.t()).float(), t, cap, coef)

    # archext_256: the CPU's cache-sized chunk, to show what a GPU's device-sized default gains.
    fns = {"archext": ours, "archext_256": lambda h, w, t: ops.linear_cross_entropy(
        h, w, t, z_loss_coef=coef, softcap=cap, chunk_size=256)[0], "eager": eager}
    if compile_:
        torch._dynamo.reset()
        fns["compile"] = torch.compile(eager)
    why = liger.why_absent(device) if use_liger else "--no-liger"
    if why is None:
        fns["liger"] = lambda h, w, t: liger.linear_cross_entropy(h, w, t, z_loss_coef=coef,
                                                                   softcap=cap)
    res = {"op": "linear_cross_entropy fwd+bwd", "shape": f"{n}x{d} @ {v}x{d}",
           "dtype": str(dtype).replace("torch.", ""), "threads": "-", "flops": 6 * n * d * v}
    if why is not None:
        res["liger_note"] = why
    want = step(eager)()
    for name, fn in fns.items():
        try:
            got = step(fn)()
            for a, b in zip(got, want):
                torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3)
        except Exception as e:  # noqa: BLE001  (report, do not crash)
            res[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        del got
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(fn)()
            torch.cuda.synchronize()
            res[f"{name}_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        res[f"{name}_s"] = median_time(step(fn), device, min_time)
    res["logits_bytes"] = n * v * 4
    return res


def print_linear_ce(r: dict) -> None:
    print(f"{r['op']} {r['shape']} {r['dtype']} (peak memory beyond the inputs; float32 "
          f"logits would be {r['logits_bytes'] / 2**20:.0f} MiB; archext_256: chunks of 256 "
          f"rows, the CPU's default, against the device-sized default):")
    a = r.get("archext_s")
    for name in ("archext", "archext_256", "eager", "compile", "liger"):
        if f"{name}_error" in r:
            print(f"  {name:11s} error: {r[name + '_error']}")
        elif f"{name}_s" in r:
            s = r[f"{name}_s"]
            vs = f"  {s / a:.2f}x archext's time" if a and name != "archext" else ""
            peak = r.get(name + "_peak_extra_bytes")
            peak = "-" if peak is None else f"{peak / 2**20:.0f}"
            print(f"  {name:11s} {s * 1e3:9.2f} ms  {r['flops'] / s / 1e12:6.1f} TFLOP/s  peak "
                  f"{peak:>8s} MiB{vs}")
    if "liger_note" in r:
        print(f"  no Liger-Kernel row: {r['liger_note']}")


def eager_softmax(s, cap=50.0):
    s = cap * torch.tanh(s * (s.shape[-1] ** -0.5) / cap)
    keep = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
    return s.masked_fill(~keep, float("-inf")).softmax(-1)


def bench_softmax(b, h, s, threads, compile_, min_time, device="cpu"):
    torch.set_num_threads(threads)
    x = torch.randn(b, h, s, s, device=device)
    buf = torch.empty_like(x)
    res = {"op": "softmax softcap causal fwd", "shape": f"{b}x{h}x{s}x{s}", "threads": threads,
           "floor_s": median_time(lambda: x.clone(), device, min_time),
           "copy_s": median_time(lambda: buf.copy_(x), device, min_time),
           "archext_s": median_time(
               lambda: ops.softmax(x, scale=s ** -0.5, softcap=50.0, causal=True), device, min_time),
           "eager_s": median_time(lambda: eager_softmax(x), device, min_time)}
    if compile_:
        torch._dynamo.reset()
        comp = torch.compile(eager_softmax)
        res["compile_s"] = median_time(lambda: comp(x), device, min_time)
    res["archext_GBps"] = 2 * x.numel() * 4 / res["archext_s"] / 1e9
    return res


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def linear_ce_memory_child(n: int, d: int, v: int, chunk: int, fused: bool) -> dict:
    """Runs in a fresh process: the peak RSS growth of one forward+backward, beyond the inputs
    and the gradients it returns (which the unfused path also holds). Linux only (VmHWM)."""
    # One thread: per-thread BLAS buffers and malloc arenas would add a thread-count-dependent,
    # run-to-run varying amount that is not the algorithm's.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # Warm up on a small shape first, so that one-time library buffers (the BLAS workspace, the
    # thread pool) are not counted as the op's memory.
    hw, ww = torch.randn(64, d, requires_grad=True), torch.randn(512, d, requires_grad=True)
    tw = torch.randint(0, 512, (64,))
    ops.linear_cross_entropy(hw, ww, tw, chunk_size=16)[0].backward()
    ops.cross_entropy(hw @ ww.t(), tw)[0].backward()
    del hw, ww, tw
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    t = torch.randint(0, v, (n,))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    base = _status_bytes("VmRSS")
    if fused:
        loss, _ = ops.linear_cross_entropy(h, w, t, z_loss_coef=1e-4, softcap=30.0, chunk_size=chunk)
    else:
        loss, _ = ops.cross_entropy(h @ w.t(), t, z_loss_coef=1e-4, softcap=30.0)
    loss.backward()
    peak = _status_bytes("VmHWM")
    outputs = (h.numel() + w.numel()) * 4  # the gradients, which .grad keeps
    return {"extra_bytes": max(0, peak - base - outputs), "logits_bytes": n * v * 4}


def bench_linear_ce_memory(n, d, v, chunk):
    out = {}
    for fused in (True, False):
        code = ("import json, sys; from archext.bench.loss import linear_ce_memory_child as f; "
                f"print(json.dumps(f({n}, {d}, {v}, {chunk}, {fused})))")
        # A fixed mmap threshold: every large buffer is its own mapping, returned when freed, so
        # the resident set tracks the live buffers (glibc's default moving threshold lets freed
        # chunks linger on the heap and fragment it, which varies run to run).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=env)
        out["fused" if fused else "unfused"] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="archext-bench loss", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="4096 x 32768 logits (default 1024 x 32768)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel baselines (CUDA)")
    a = ap.parse_args(argv)
    n = 4096 if a.full else 1024
    results = []
    print(f"liger_kernel {liger.version() or 'not importable'}")
    print(f"{'op':28s} {'shape':16s} thr  floor ms  copy_ ms  archext ms  x floor  x copy_  "
          f"eager x  compile x  liger x   GB/s")
    for th in a.threads:
        for r in (bench_ce(n, 32768, th, not a.no_compile, a.min_time, a.device,
                           use_liger=not a.no_liger),
                  bench_softmax(1, 16, 1024, th, not a.no_compile, a.min_time, a.device)):
            results.append(r)
            print(format_row(r), flush=True)
    for r in results:
        if r.get("liger_note") and a.device != "cpu":
            print(f"{r['op']}: no Liger-Kernel column: {r['liger_note']}")
    if a.device != "cpu":
        # The LM head of a Llama-like model: 8192 tokens, d 4096, vocab 32768 (1 GiB of float32
        # logits unfused), bfloat16 as in training.
        r = bench_linear_ce_cuda(8192 if a.full else 2048, 4096, 32768, torch.bfloat16,
                                 not a.no_compile, a.min_time, a.device, use_liger=not a.no_liger)
        results.append(r)
        print_linear_ce(r)
        _dump(results, a.json)
        return 0
    # Chunks of 1/64 of the tokens, as the default chunk (256 MiB of float32 logits, 512 rows)
    # is at 32k tokens x 128k vocab.
    mem = bench_linear_ce_memory(2048, 256, 32768, 32)
    f, u = mem["fused"], mem["unfused"]
    print(f"linear+CE 2048 tokens x 32768 vocab, d 256, chunk 32: peak extra memory fused "
          f"{f['extra_bytes'] / 2**20:.0f} MiB, unfused {u['extra_bytes'] / 2**20:.0f} MiB, "
          f"full float32 logits {f['logits_bytes'] / 2**20:.0f} MiB "
          f"(fused / logits = {f['extra_bytes'] / f['logits_bytes']:.3f})")
    results.append({"op": "linear_cross_entropy memory", **mem})
    _dump(results, a.json)
    return 0


def format_row(r: dict) -> str:
    """x floor, x copy_: the floor's time over archext's (1.00: as fast as moving the op's
    minimum bytes); eager x, compile x, liger x: their time over archext's."""
    a = r["archext_s"]

    def x(key):
        return f"{r[key] / a:9.2f}" if key in r else "        -"
    return (f"{r['op']:28s} {r['shape']:16s} {r['threads']:3d} {r['floor_s'] * 1e3:9.2f} "
            f"{r['copy_s'] * 1e3:9.2f} {a * 1e3:11.2f} "
            f"{r['floor_s'] / a:8.2f} {x('copy_s')[1:]} {x('eager_s')[1:]} {x('compile_s')[1:]} "
            f"{x('liger_s')[1:]} {r['archext_GBps']:6.1f}")


def _dump(results, path):
    if path:
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
