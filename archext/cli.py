"""The ``archext`` command: ``ablate``, ``profile`` and ``report``."""
import os

# Kineto (torch.profiler's backend) logs its stages on stderr unless told otherwise; it reads
# this when torch loads, so it is set before the import.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import argparse  # noqa: E402
import sys  # noqa: E402
from typing import Optional  # noqa: E402

from archext._device import resolve_device  # noqa: E402

# Sizes per device: CPU small enough for ~5 minutes for the default set on 2 cores.
CPU_TRAIN = dict(steps=300, batch_size=12, seq_len=128, lr=3e-3)
GPU_TRAIN = dict(steps=1000, batch_size=32, seq_len=256, lr=3e-3)


def _lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates, got {text!r}")
    if not lrs or any(not lr > 0 for lr in lrs):
        raise argparse.ArgumentTypeError(f"learning rates must be > 0, got {text!r}")
    return lrs


def _add_ablate(sub) -> None:
    p = sub.add_parser(
        "ablate", help="train variants of one base config side by side",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train small variants of one base config, each changing one choice, on the "
                    "same data, seed and token budget; report validation loss, tokens/s, peak "
                    "memory, parameters, max |logit|, loss spikes and divergence.",
        epilog="Variants: the default set is the lecture's comparisons (see --list). --variants "
               "FILE.toml and --variant SPEC replace it (a 'base' run with no change is added "
               "when none is named so); --only picks from the defaults. SPEC is "
               "'name:key=value,key=value' with TransformerConfig fields, e.g. "
               "--variant post:norm_placement=post --variant zl:z_loss_coef=1e-4.\n"
               "Resume: finished runs are stored under OUT/runs/ and kept when the command is "
               "run again with the same settings; --fresh retrains them.")
    g = p.add_argument_group("variants")
    g.add_argument("--variants", metavar="FILE", help="TOML file with [base] and [[variant]] tables")
    g.add_argument("--variant", action="append", default=[], metavar="SPEC",
                   help="add a variant 'name:key=value,...' (repeatable)")
    g.add_argument("--only", metavar="NAMES", help="comma-separated default variants to run")
    g.add_argument("--base", metavar="K=V,...", default="",
                   help="override base config fields, e.g. d_model=128,n_layers=4")
    g.add_argument("--list", action="store_true", help="print the default variants and exit")
    t = p.add_argument_group("training (defaults depend on the device)")
    t.add_argument("--steps", type=int, help="optimizer steps per run (CPU 300, GPU 1000)")
    t.add_argument("--batch-size", type=int, help="sequences per step (CPU 12, GPU 32)")
    t.add_argument("--seq-len", type=int, help="bytes per sequence (CPU 128, GPU 256)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    t.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--eval-batches", type=int, default=8,
                   help="held-out batches per evaluation during training (the final "
                        "evaluation uses the whole held-out split)")
    t.add_argument("--seed", type=int, default=0, help="data order and initialisation seed")
    t.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train each variant N times (seeds SEED..SEED+N-1); the table shows the "
                        "mean ± std of the val loss, which tells a real difference from noise")
    t.add_argument("--lr-sweep", nargs="?", const="default", metavar="LRS",
                   help="train every variant at each learning rate (comma-separated; default "
                        "3e-3,1e-2,3e-2,1e-1) and plot loss vs lr; without --variant/--only "
                        "the variants are the stability ones (base, post-norm, z-loss, qk-norm, "
                        "softcap)")
    r = p.add_argument_group("data, device, output")
    r.add_argument("--data", metavar="PATH", help="a text file or a folder of .txt files "
                   "(default: Python's bundled help text, pydoc_data.topics)")
    r.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    r.add_argument("--threads", type=int, help="torch CPU threads (default: the cores the load "
                   "average shows idle, at least 1)")
    r.add_argument("--out", metavar="DIR", help="output folder (default ./ablate-out/NAME)")
    r.add_argument("--name", help="run name (default 'default', or 'lr-sweep')")
    r.add_argument("--fresh", action="store_true", help="retrain runs that finished earlier")
    r.add_argument("--resume", action="store_true",
                   help="keep finished runs (the default; accepted for clarity)")
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args) -> int:
    from archext import ablate
    from archext.ablate import variants as V

    if args.list:
        for v in V.DEFAULT_VARIANTS:
            print(f"{v.name:<12} {v.describe():<48} {v.overrides}")
        return 0
    if args.fresh and args.resume:
        raise SystemExit("--fresh and --resume contradict each other")
    device = resolve_device(args.device)
    train_defaults = GPU_TRAIN if device.startswith("cuda") else CPU_TRAIN
    size = V.GPU_BASE if device.startswith("cuda") else V.CPU_BASE
    sweep = args.lr_sweep is not None
    lrs = None
    if sweep:
        lrs = list(ablate.DEFAULT_SWEEP_LRS) if args.lr_sweep == "default" else _lrs(args.lr_sweep)

    base_over = V.parse_assignments(args.base, "--base")
    variants: list = []
    if args.variants:
        file_base, file_variants = V.load_toml(args.variants)
        base_over = {**file_base, **base_over}
        variants += file_variants
    variants += [V.parse_variant_flag(s) for s in args.variant]
    if variants and args.only:
        raise SystemExit("--only picks from the default variants; it cannot be combined with "
                         "--variants/--variant")
    if variants:
        if not any(v.name == "base" for v in variants):
            variants.insert(0, V.Variant("base", {}, "base config"))
    elif sweep and not args.only:
        variants = V.select(",".join(V.SWEEP_VARIANTS))
    else:
        variants = V.select(args.only)

    seq_len = args.seq_len or train_defaults["seq_len"]
    # The model must hold a training sequence.
    size = {**size, "max_seq_len": max(seq_len, 128)}
    base = V.make_base(size, base_over)
    try:
        settings = ablate.TrainSettings(
            steps=args.steps or train_defaults["steps"],
            batch_size=args.batch_size or train_defaults["batch_size"], seq_len=seq_len,
            lr=args.lr or train_defaults["lr"], warmup_frac=args.warmup,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip,
            eval_batches=args.eval_batches, seed=args.seed, device=device)
    except ValueError as e:
        raise SystemExit(f"archext ablate: {e}")
    name = args.name or ("lr-sweep" if sweep else "default")
    out_dir = args.out or os.path.join("ablate-out", name)
    job = ablate.AblateJob(base=base, variants=variants, settings=settings, out_dir=out_dir,
                           data=args.data, lrs=lrs, fresh=args.fresh, threads=args.threads,
                           seeds=args.seeds)
    try:
        ablate.run(job)
    except KeyboardInterrupt:
        return 130
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="hyperparameter ratios, parameters and FLOPs of a config",
                       description="archext.models' hyperparameter report (the same as "
                                   "`python -m archext.models --report`): PRESET_OR_JSON is a "
                                   "preset name (llama, gemma2, ...), a JSON file or inline JSON.")
    p.add_argument("spec", metavar="PRESET_OR_JSON")
    p.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                   help="override a config field (repeatable)")
    p.add_argument("--seq-len", type=int, help="context for FLOPs (default max_seq_len)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from archext.models.__main__ import main as models_main

    argv = ["--report", args.spec] + [a for kv in args.set for a in ("--set", kv)]
    if args.seq_len:
        argv += ["--seq-len", str(args.seq_len)]
    return models_main(argv)


def _add_profile(sub) -> None:
    from archext import profile

    profile.add_arguments(sub)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="archext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_ablate(sub)
    _add_profile(sub)
    _add_report(sub)
    args = parser.parse_args(argv)
    from archext.ablate.data import DataError
    from archext.ablate.variants import VariantError

    try:
        return args.func(args)
    except (VariantError, DataError) as e:
        print(f"archext {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
