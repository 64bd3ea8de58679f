"""Tiled attention (archext.ops.flash_attention) against the materialised path on the CPU.

The Gemma-2-like shape by default: B=1, Hq=Hk=4, D=32, S=8192, causal, window 4096, soft-cap 50,
float32; forward + backward, 1 and 2 threads. The materialised path is q k^T (matmul), the
archext attention softmax (soft-cap, causal, window) and p v. Each (path, threads) runs in its
own process, so that its peak RSS (getrusage) is its own.

    python benchmarks/attention_cpu.py [--seq 8192] [--repeat 3]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time


def run_one(path: str, threads: int, args) -> dict:
    import torch

    import archext
    from archext.ops import flash_attention, softmax

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    b, s, h, d = 1, args.seq, args.heads, args.head_dim
    q, k, v = (torch.randn(b, s, h, d, requires_grad=True) for _ in range(3))
    g = torch.randn(b, s, h, d)
    scale = d ** -0.5

    def step():
        if path == "tiled":
            o = flash_attention(q, k, v, scale=scale, softcap=args.softcap, causal=True,
                                window=args.window)
        else:
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            scores = torch.matmul(qh, kh.transpose(-1, -2))
            p = softmax(scores, scale=scale, softcap=args.softcap, causal=True, window=args.window)
            o = torch.matmul(p, vh).transpose(1, 2)
        o.backward(g)
        for t in (q, k, v):
            t.grad = None

    step()  # warm-up
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    del archext
    return {"path": path, "threads": threads, "best_s": min(times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--softcap", type=float, default=50.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=["tiled", "materialised"])
    ap.add_argument("--one", nargs=2, metavar=("PATH", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args)))
        return
    print(f"B=1 S={args.seq} Hq=Hk={args.heads} D={args.head_dim} causal window={args.window} "
          f"softcap={args.softcap} float32, fwd+bwd, best of {args.repeat}")
    print(f"{'path':<14}{'threads':>8}{'time (s)':>11}{'peak RSS (MiB)':>16}")
    base = [a for a in sys.argv[1:]]
    for threads in args.threads:
        for path in args.paths:
            out = subprocess.run([sys.executable, __file__, *base, "--one", path, str(threads)],
                                 capture_output=True, text=True, env=dict(os.environ))
            if out.returncode != 0:
                print(f"{path:<14}{threads:>8}  failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{path:<14}{threads:>8}{r['best_s']:>11.3f}{r['peak_rss_mib']:>16.0f}")


if __name__ == "__main__":
    main()
