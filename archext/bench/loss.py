"""Cross-entropy, attention-softmax and fused linear cross-entropy benchmark.

    python -m archext.bench loss              # quick: 1024 x 32768 logits
    python -m archext.bench loss --full       # the issue's shape: 4096 x 32768 float32 logits

Cross-entropy forward+backward with z-loss 1e-4 and soft-cap 30 against the memory floor
measured in the same run (one read of the logits, ``x.sum()``, plus one allocating copy for the
gradient, ``x.clone()``), PyTorch eager (``F.cross_entropy`` on ``30 tanh(x / 30)`` with an
explicit z-loss) and ``torch.compile`` of it. The soft-capped causal attention softmax against an
allocating copy of the scores (``clone()``). The fused linear cross-entropy's peak extra memory,
measured as the peak resident-set growth of a fresh process, against the full float32 logits.
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

from .common import median_time


def eager_ce(x, t, cap=30.0, coef=1e-4):
    z = cap * torch.tanh(x / cap)
    lse = torch.logsumexp(z, -1)
    return F.cross_entropy(z, t) + coef * (lse * lse).mean()


def bench_ce(n, v, threads, compile_, min_time, device="cpu"):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(n, v, device=device) * 4
    t = torch.randint(0, v, (n,), device=device)
    nbytes = x.numel() * x.element_size()

    def floor():
        return x.sum(), x.clone()

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
           "archext_s": median_time(ours, device, min_time),
           "eager_s": median_time(eager, device, min_time)}
    if compile_:
        torch._dynamo.reset()
        comp = torch.compile(eager_ce)
        res["compile_s"] = median_time(lambda: eager(comp), device, min_time)
    # Minimum bytes: read the logits twice (forward, backward), write the gradient once.
    res["archext_GBps"] = 3 * nbytes / res["archext_s"] / 1e9
    return res


def eager_softmax(s, cap=50.0):
    s = cap * torch.tanh(s * (s.shape[-1] ** -0.5) / cap)
    keep = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
    return s.masked_fill(~keep, float("-inf")).softmax(-1)


def bench_softmax(b, h, s, threads, compile_, min_time, device="cpu"):
    torch.set_num_threads(threads)
    x = torch.randn(b, h, s, s, device=device)
    res = {"op": "softmax softcap causal fwd", "shape": f"{b}x{h}x{s}x{s}", "threads": threads,
           "floor_s": median_time(lambda: x.clone(), device, min_time),
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
    a = ap.parse_args(argv)
    n = 4096 if a.full else 1024
    results = []
    for th in a.threads:
        results.append(bench_ce(n, 32768, th, not a.no_compile, a.min_time, a.device))
        results.append(bench_softmax(1, 16, 1024, th, not a.no_compile, a.min_time, a.device))
    print(f"{'op':28s} {'shape':16s} thr  floor ms  archext ms  vs floor  eager x  compile x  GB/s")
    for r in results:
        comp = f"{r['compile_s'] / r['archext_s']:9.2f}" if "compile_s" in r else "        -"
        print(f"{r['op']:28s} {r['shape']:16s} {r['threads']:3d} {r['floor_s'] * 1e3:9.1f} "
              f"{r['archext_s'] * 1e3:11.1f} {r['floor_s'] / r['archext_s']:9.2f} "
              f"{r['eager_s'] / r['archext_s']:8.2f} {comp}  {r['archext_GBps']:5.1f}")
    if a.device != "cpu":
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


def _dump(results, path):
    if path:
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
