"""``python -m archext.hf --coverage``: the family table (from_hf, patch, to_hf and the largest
logit error measured on a tiny random model of each family).
``python -m archext.hf --memory``: peak memory of one training step (forward + backward) of a
Llama-like model at a 128k vocabulary, unpatched against patched, each in a fresh process.
"""
import argparse
import json
import os
import subprocess
import sys

MEMORY_SHAPE = dict(vocab_size=128256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, batch=2, seq=1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_step(mode: str) -> dict:
    """One forward + backward in this (fresh) process; peak RSS (VmHWM) and its growth over
    the RSS before the step (the model, its inputs, the allocator's state)."""
    import torch
    import transformers

    from . import patch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    shape = dict(MEMORY_SHAPE)
    b, s = shape.pop("batch"), shape.pop("seq")
    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=s, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).float().train()
    if mode != "hf":
        patch(model, fused_loss=mode == "patched")
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    before = _status_kib("VmRSS")
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    peak = _status_kib("VmHWM")
    logits_mib = b * s * cfg.vocab_size * 4 / 2 ** 20
    return dict(mode=mode, loss=float(out.loss), rss_before_mib=before / 1024, peak_rss_mib=peak / 1024,
                step_growth_mib=(peak - before) / 1024, logits_mib=logits_mib)


def memory_report() -> list[dict]:
    rows = []
    for mode in ("hf", "patched_unfused", "patched"):
        res = subprocess.run([sys.executable, "-m", "archext.hf", "--memory-step", mode],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m archext.hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coverage", action="store_true", help="print the family table")
    p.add_argument("--memory", action="store_true", help="measure a training step's peak memory")
    p.add_argument("--memory-step", choices=("hf", "patched_unfused", "patched"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_step:
        print(json.dumps(_memory_step(args.memory_step)))
        return 0
    if args.memory:
        print(f"shape: {MEMORY_SHAPE}")
        print(f"{'mode':<16} {'loss':>8} {'RSS before':>11} {'peak RSS':>9} {'step growth':>12} {'logits':>8}")
        for r in memory_report():
            print(f"{r['mode']:<16} {r['loss']:>8.4f} {r['rss_before_mib']:>8.0f} MiB {r['peak_rss_mib']:>5.0f} MiB "
                  f"{r['step_growth_mib']:>8.0f} MiB {r['logits_mib']:>4.0f} MiB")
        return 0
    if args.coverage:
        from .coverage import coverage_table
        print(coverage_table())
        return 0
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
