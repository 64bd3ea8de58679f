"""Variant specs: a base TransformerConfig and named variants, each changing one choice.

Sources: the default set (the lecture's comparisons), a TOML file, or ``--variant`` flags.
TOML file format::

    [base]                      # optional: overrides of the default base config
    d_model = 128

    [[variant]]
    name = "post-norm"          # letters, digits, '.', '_', '-'
    about = "post-norm (original Transformer)"   # optional, shown in the table
    norm_placement = "post"     # any TransformerConfig field

    [[variant]]
    name = "no-qk-norm"
    qk_norm = "none"            # "none" means None (TOML has no null)

A flag ``--variant "post-norm:norm_placement=post"`` adds the same; ``key=value`` pairs are
comma-separated and values are read as TOML literals (numbers, true/false), else as strings."""
import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Optional

from .data import VOCAB_SIZE


class VariantError(ValueError):
    """A variant spec that cannot be run; the message says which variant and why."""


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict = field(default_factory=dict)   # TransformerConfig field -> value
    about: str = ""                                  # the claim or choice it tests

    def describe(self) -> str:
        if self.about:
            return self.about
        return ", ".join(f"{k}={v}" for k, v in self.overrides.items()) or "base config"


# The lecture's comparisons, each one change from the base (pre-norm, RMSNorm, SwiGLU, serial
# block, RoPE, no biases, no stability tricks): the default set is what the claims report needs
# (archext.ablate.claims). ReLU/GeLU get d_ff = 4 d_model and the GLUs 8/3 d_model
# (archext.nn.hidden_width), which match parameters exactly when 8 d_model / 3 is a multiple of
# ffn_multiple_of (the default sizes are chosen so).
DEFAULT_VARIANTS = (
    Variant("base", {}, "pre-norm, RMSNorm, SwiGLU, serial, RoPE, no biases"),
    Variant("post-norm", {"norm_placement": "post"}, "norm after the residual add (original)"),
    Variant("layernorm", {"norm": "layernorm"}, "LayerNorm instead of RMSNorm"),
    Variant("relu", {"activation": "relu"}, "ReLU MLP, d_ff = 4 d_model"),
    Variant("gelu", {"activation": "gelu"}, "GeLU MLP, d_ff = 4 d_model"),
    Variant("parallel", {"block": "parallel"}, "attention and MLP in parallel"),
    Variant("z-loss", {"z_loss_coef": 1e-4}, "z-loss 1e-4 on the output softmax"),
    Variant("qk-norm", {"qk_norm": "head"}, "RMSNorm on q and k per head"),
    Variant("softcap", {"attn_softcap": 50.0, "final_softcap": 30.0},
            "tanh soft-cap: attention 50, output 30 (Gemma 2)"),
    Variant("bias", {"bias": True}, "biases on every linear layer"),
)
# More of the lecture's choices, no claim attached: pick them with --only.
MORE_VARIANTS = (
    Variant("double-norm", {"norm_placement": "double"}, "norm before and after each branch"),
    Variant("reglu", {"activation": "reglu"}, "ReGLU, d_ff = 8/3 d_model"),
    Variant("geglu", {"activation": "geglu"}, "GeGLU, d_ff = 8/3 d_model"),
)

# Variants trained at higher learning rates too, for the stability claims; and the variants the
# separate --lr-sweep trains by default.
STABILITY_VARIANTS = ("base", "post-norm", "z-loss", "qk-norm", "softcap")
SWEEP_VARIANTS = STABILITY_VARIANTS

# Base sizes (chosen by measurement: docs/ablation.md, "How the budget was chosen").
CPU_BASE = dict(vocab_size=VOCAB_SIZE, d_model=96, n_layers=3, n_heads=4, ffn_multiple_of=32,
                norm="rmsnorm", norm_placement="pre", block="serial", activation="swiglu",
                position="rope")
GPU_BASE = dict(vocab_size=VOCAB_SIZE, d_model=384, n_layers=6, n_heads=6, ffn_multiple_of=128,
                norm="rmsnorm", norm_placement="pre", block="serial", activation="swiglu",
                position="rope")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RESERVED = ("name", "about")


def _config_fields() -> dict:
    from archext.models import TransformerConfig

    return {f.name: f for f in dataclasses.fields(TransformerConfig)}


def parse_value(text: str) -> Any:
    """A flag value: a TOML literal (1e-4, 50, true, "x"), ``none`` for None, else the string."""
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _none(value: Any) -> Any:
    return None if isinstance(value, str) and value.lower() in ("none", "null") else value


def parse_assignments(text: str, where: str) -> dict:
    """``"k=v,k2=v2"`` -> dict. ``where`` names the flag in error messages."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise VariantError(f"{where}: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def parse_variant_flag(text: str) -> Variant:
    """``"name:key=value,key=value"`` (``"name"`` alone is the base config under that name)."""
    name, _, rest = text.partition(":")
    return Variant(name.strip(), parse_assignments(rest, f"--variant {text!r}"))


def load_toml(path: str) -> tuple[dict, list[Variant]]:
    """The ``[base]`` overrides and the ``[[variant]]`` list of a TOML variant file."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise VariantError(f"variant file {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise VariantError(f"variant file {path}: not valid TOML: {e}") from None
    unknown = set(doc) - {"base", "variant"}
    if unknown:
        raise VariantError(f"variant file {path}: unknown table(s) {sorted(unknown)}; "
                           "expected [base] and [[variant]]")
    base = {k: _none(v) for k, v in doc.get("base", {}).items()}
    specs = doc.get("variant", [])
    if not isinstance(specs, list) or not specs:
        raise VariantError(f"variant file {path}: no [[variant]] entries")
    variants = []
    for i, spec in enumerate(specs):
        if "name" not in spec:
            raise VariantError(f"variant file {path}: [[variant]] number {i + 1} has no name")
        overrides = {k: _none(v) for k, v in spec.items() if k not in _RESERVED}
        variants.append(Variant(str(spec["name"]), overrides, str(spec.get("about", ""))))
    return base, variants


def _check_keys(keys, where: str, fields: dict) -> None:
    for k in keys:
        if k not in fields:
            near = difflib.get_close_matches(k, fields, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise VariantError(f"{where}: {k!r} is not a TransformerConfig field{hint} "
                               f"(fields: {', '.join(fields)})")


def make_base(defaults: dict, overrides: dict):
    """The base TransformerConfig: the size defaults with ``overrides`` applied."""
    from archext.models import TransformerConfig

    fields = _config_fields()
    _check_keys(overrides, "base config", fields)
    try:
        return TransformerConfig(**{**defaults, **overrides})
    except (ValueError, TypeError) as e:
        raise VariantError(f"base config {overrides or defaults}: {e}") from None


def resolve(base, variants: list[Variant]) -> list[tuple[Variant, Any]]:
    """Each variant with its TransformerConfig, all checked before anything trains: names
    unique and file-safe, keys real fields, values accepted by the builder."""
    fields = _config_fields()
    seen, out = set(), []
    for v in variants:
        if not _NAME.match(v.name):
            raise VariantError(f"variant name {v.name!r}: use letters, digits, '.', '_' or '-' "
                               "(it names the result file)")
        if v.name in seen:
            raise VariantError(f"variant name {v.name!r} is used twice")
        seen.add(v.name)
        _check_keys(v.overrides, f"variant {v.name!r}", fields)
        try:
            cfg = dataclasses.replace(base, **v.overrides)
        except (ValueError, TypeError) as e:  # archext.models.ConfigError is a ValueError
            raise VariantError(f"variant {v.name!r} ({v.describe()}): {e}") from None
        out.append((v, cfg))
    return out


def select(names: Optional[str]) -> list[Variant]:
    """Named variants (the default set and MORE_VARIANTS) by a comma-separated list of names
    (the default set when None)."""
    if not names:
        return list(DEFAULT_VARIANTS)
    by_name = {v.name: v for v in DEFAULT_VARIANTS + MORE_VARIANTS}
    out = []
    for n in filter(None, (s.strip() for s in names.split(","))):
        if n not in by_name:
            raise VariantError(f"--only {n!r}: no default variant of that name "
                               f"(defaults: {', '.join(by_name)})")
        out.append(by_name[n])
    return out
