"""``python -m archext.models --report PRESET_OR_JSON [--set field=value ...] [--seq-len N]``

PRESET_OR_JSON is a preset name (``llama``, ``gemma2``, ...), a JSON file, or inline JSON of
TransformerConfig fields; a JSON object may name a ``"preset"`` to start from. ``--set`` overrides
fields (values parsed as JSON, else taken as strings)."""
import argparse
import json
import os
import sys

from .config import PRESETS, ConfigError, TransformerConfig, preset


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(spec: str, overrides: dict) -> TransformerConfig:
    """A config from a preset name, a JSON file or inline JSON, with ``overrides``."""
    if spec in PRESETS:
        return preset(spec, **overrides)
    if os.path.isfile(spec):
        with open(spec) as f:
            data = json.load(f)
    else:
        try:
            data = json.loads(spec)
        except json.JSONDecodeError:
            raise ConfigError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}), a JSON file nor "
                              f"inline JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the JSON config must be an object of TransformerConfig fields, got {data!r}")
    data = {**data, **overrides}
    base = data.pop("preset", None)
    return preset(base, **data) if base is not None else TransformerConfig.from_dict(data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m archext.models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", metavar="PRESET_OR_JSON", required=True,
                    help="print the hyperparameter report of this config")
    ap.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                    help="override a config field (repeatable)")
    ap.add_argument("--seq-len", type=int, default=None, help="context for FLOPs (default max_seq_len)")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k] = _parse_value(v)
    from .report import report
    try:
        cfg = load_config(args.report, overrides)
    except (ConfigError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(cfg, seq_len=args.seq_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
