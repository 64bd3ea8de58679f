"""The ``archext`` command: ``ablate``, ``profile`` and ``report``."""
import os

# Kineto (torch.profiler's backend) logs its stages on stderr unless told otherwise; it reads
# this when torch loads, so it is set before the import.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import argparse  # noqa: E402
import sys  # noqa: E402
from typing import Optional  # noqa: E402

from archext._device import resolve_device  # noqa: E402

# The default run's budget per preset: the model (archext.ablate.variants), the steps, the
# seeds per variant and the stability part (higher learning rates for the stability variants,
# with fewer seeds). CPU: about 10 minutes on the 2-core development machine, two processes at
# 1 thread; how it was chosen: docs/ablation.md.
PRESETS = {
    "cpu": dict(steps=250, batch_size=12, seq_len=128, lr=3e-3, seeds=4,
                stability_lrs=(3e-2, 1e-1), stability_seeds=3, speed_rounds=8,
                # 3e-2 only where it tells a claim apart: post-norm stalls there, pre-norm not.
                stability_only={3e-2: ("base", "post-norm")}),
    "gpu": dict(steps=1000, batch_size=32, seq_len=256, lr=3e-3, seeds=4,
                stability_lrs=(1e-2, 3e-2, 1e-1), stability_seeds=3, speed_rounds=8),
}


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
                    "same data, seeds and token budget; report validation loss, tokens/s, peak "
                    "memory, parameters, max |logit|, loss spikes and divergence, and judge the "
                    "lecture's claims: each a paired comparison against base over the same seeds "
                    "(supported, not separable at this budget, or contradicted); the stability "
                    "claims on the highest stable learning rate of each variant.",
        epilog="The default run: the default variants, each with the preset's seeds, and the "
               "stability variants again at higher learning rates with fewer seeds; two training "
               "processes at 1 thread on a 2-core CPU (--jobs). Variants: the default set is the "
               "lecture's comparisons (see --list). --variants "
               "FILE.toml and --variant SPEC replace it (a 'base' run with no change is added "
               "when none is named so); --only picks from the named ones. SPEC is "
               "'name:key=value,key=value' with TransformerConfig fields, e.g. "
               "--variant post:norm_placement=post --variant zl:z_loss_coef=1e-4.\n"
               "Resume: finished runs are stored under OUT/runs/ and kept when the command is "
               "run again with the same settings; --fresh retrains them.")
    g = p.add_argument_group("variants")
    g.add_argument("--variants", metavar="FILE", help="TOML file with [base] and [[variant]] tables")
    g.add_argument("--variant", action="append", default=[], metavar="SPEC",
                   help="add a variant 'name:key=value,...' (repeatable)")
    g.add_argument("--only", metavar="NAMES", help="comma-separated named variants to run "
                   "(--list shows them)")
    g.add_argument("--base", metavar="K=V,...", default="",
                   help="override base config fields, e.g. d_model=128,n_layers=4")
    g.add_argument("--list", action="store_true", help="print the default variants and exit")
    t = p.add_argument_group("training (defaults from the preset)")
    t.add_argument("--preset", choices=sorted(PRESETS), help="model size and budget (default: "
                   "gpu on a GPU, else cpu)")
    t.add_argument("--steps", type=int, help="optimizer steps per run (cpu 250, gpu 1000)")
    t.add_argument("--batch-size", type=int, help="sequences per step (cpu 12, gpu 32)")
    t.add_argument("--seq-len", type=int, help="bytes per sequence (cpu 128, gpu 256)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    t.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--eval-batches", type=int, default=8,
                   help="held-out batches per evaluation during training (the final "
                        "evaluation uses the whole held-out split)")
    t.add_argument("--seed", type=int, default=0, help="data order and initialisation seed")
    t.add_argument("--pack", action="store_true",
                   help="train on whole documents (the corpus split at blank lines) packed into "
                        "each sequence: positions restart and attention stays in each document")
    t.add_argument("--seeds", type=int, metavar="N",
                   help="train each variant N times (seeds SEED..SEED+N-1); the table shows the "
                        "mean ± std of the val loss, the claims the paired differences (default: "
                        "the preset's, cpu 4, gpu 4; 1 with --variant/--variants)")
    t.add_argument("--stability-lrs", metavar="LRS",
                   help="higher learning rates at which the stability variants train again "
                        "(comma-separated, or 'none'; default: the preset's, cpu 3e-2,1e-1, in "
                        "the default run, none with --only/--variant)")
    t.add_argument("--stability-seeds", type=int, metavar="N",
                   help="seeds per stability run (default: the preset's, 3)")
    t.add_argument("--speed-rounds", type=int, metavar="N",
                   help="rounds of interleaved step timing of every variant for the speed claims "
                        "(default: the preset's, 8, in the default run; 0: none, the claims then "
                        "pair the runs' own tokens/s)")
    t.add_argument("--lr-sweep", nargs="?", const="default", metavar="LRS",
                   help="train every variant at each learning rate (comma-separated; default "
                        "3e-3,1e-2,3e-2,1e-1) and plot loss vs lr; without --variant/--only "
                        "the variants are the stability ones (base, post-norm, z-loss, qk-norm, "
                        "softcap)")
    r = p.add_argument_group("data, device, output")
    r.add_argument("--data", metavar="PATH", help="a text file or a folder of .txt files "
                   "(default: Python's bundled help text, pydoc_data.topics)")
    r.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    r.add_argument("--jobs", type=int, help="training processes at once, each at 1 thread "
                   "(default: the CPU cores; 1 on a GPU)")
    r.add_argument("--threads", type=int, help="torch CPU threads with --jobs 1 (default: the "
                   "cores the load average shows idle, at least 1)")
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
        for v in V.DEFAULT_VARIANTS + V.MORE_VARIANTS:
            tag = "default" if v in V.DEFAULT_VARIANTS else "--only"
            print(f"{v.name:<12} {tag:<8} {v.describe():<52} {v.overrides}")
        return 0
    if args.fresh and args.resume:
        raise SystemExit("--fresh and --resume contradict each other")
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    preset = args.preset or ("gpu" if cuda else "cpu")
    train_defaults = PRESETS[preset]
    size = V.GPU_BASE if preset == "gpu" else V.CPU_BASE
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
        raise SystemExit("--only picks from the named variants; it cannot be combined with "
                         "--variants/--variant")
    default_run = not variants and not args.only and not sweep
    custom = bool(variants)
    if variants:
        if not any(v.name == "base" for v in variants):
            variants.insert(0, V.Variant("base", {}, "base config"))
    elif sweep and not args.only:
        variants = V.select(",".join(V.SWEEP_VARIANTS))
    else:
        variants = V.select(args.only)

    seeds = args.seeds or (1 if custom or sweep else train_defaults["seeds"])
    if args.stability_lrs is not None:
        stab_lrs = [] if args.stability_lrs.strip().lower() == "none" else _lrs(args.stability_lrs)
        stab_only = {}
    else:
        stab_lrs = list(train_defaults["stability_lrs"]) if default_run else []
        stab_only = dict(train_defaults.get("stability_only", {})) if default_run else {}
    if sweep and stab_lrs:
        raise SystemExit("--lr-sweep trains every variant at every learning rate; "
                         "--stability-lrs adds rates to the others")
    stab_seeds = min(seeds, args.stability_seeds or train_defaults["stability_seeds"])
    jobs = args.jobs or (1 if cuda or args.threads else (os.cpu_count() or 1))
    if jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {jobs}")

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
            eval_batches=args.eval_batches, seed=args.seed, device=device, pack=args.pack)
    except ValueError as e:
        raise SystemExit(f"archext ablate: {e}")
    name = args.name or ("lr-sweep" if sweep else "default")
    out_dir = args.out or os.path.join("ablate-out", name)
    job = ablate.AblateJob(base=base, variants=variants, settings=settings, out_dir=out_dir,
                           data=args.data, lrs=lrs, fresh=args.fresh, threads=args.threads,
                           seeds=seeds, jobs=jobs,
                           stability_variants=tuple(V.STABILITY_VARIANTS) if stab_lrs else (),
                           stability_lrs=tuple(stab_lrs), stability_seeds=stab_seeds,
                           stability_only=stab_only,
                           speed_rounds=(args.speed_rounds if args.speed_rounds is not None
                                         else train_defaults["speed_rounds"] if default_run else 0),
                           extra_meta={"preset": preset})
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
