"""The hyperparameter report: a config's ratios against the consensus of current LMs (lecture
notes on architectures and hyperparameters, shared/seeds), its parameter count and FLOPs/token.

The consensus values, and where a config counts as far off (a warning):
- d_ff / d_model: 4 for a plain MLP; 8/3 (2.67) for a gated one, whose third matrix is paid for
  by a 2/3 narrower hidden layer. Warn beyond a factor 1.5 either way.
- n_heads * head_dim / d_model: about 1 (most models exactly 1). Warn beyond a factor 2.
- d_model / n_layers (the aspect ratio): about 128, most models between 100 and 200. Warn
  below 50 or above 300.
- vocab size: 30k-50k for a monolingual model, 100k-250k for a multilingual one. Warn below
  30k or above 250k.
- architecture: pre-norm, RMSNorm, no biases, a gated activation, RoPE, no dropout (weight
  decay instead) are the consensus; each difference is noted, not warned.
"""
from typing import Optional

from .config import Norm, NormPlacement, Position, TransformerConfig


def _line(name: str, value: str, consensus: str, warning: Optional[str]) -> str:
    mark = "WARNING" if warning else "ok"
    s = f"  {name:<28} {value:>12}   consensus {consensus:<28} [{mark}]"
    return s + (f"\n      -> {warning}" if warning else "")


def _fmt_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def report(cfg: TransformerConfig, seq_len: Optional[int] = None) -> str:
    """The report as text. ``seq_len`` (default ``max_seq_len``) sets the attention context of
    the FLOPs count. The model is built on the meta device: no memory, any size."""
    from .model import build

    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    lines = ["archext model report", ""]

    lines.append("Hyperparameter ratios")
    r_ff = cfg.ffn_width / cfg.d_model
    target = 8 / 3 if cfg.gated else 4.0
    kind = "gated" if cfg.gated else "plain"
    w = None
    if not target / 1.5 <= r_ff <= target * 1.5:
        w = (f"d_ff={cfg.ffn_width} is {r_ff / target:.2f}x the {kind}-MLP consensus; "
             f"d_ff ~ {round(target * cfg.d_model)} keeps the usual parameter share")
    lines.append(_line("d_ff / d_model", f"{r_ff:.3g}", f"{target:.3g} ({kind} MLP)", w))

    r_h = cfg.n_heads * cfg.head_size / cfg.d_model
    w = None
    if not 0.5 <= r_h <= 2.0:
        w = (f"n_heads * head_dim = {cfg.n_heads * cfg.head_size} vs d_model={cfg.d_model}; "
             f"most models keep it equal to d_model")
    lines.append(_line("n_heads*head_dim / d_model", f"{r_h:.3g}", "~1", w))

    r_a = cfg.d_model / cfg.n_layers
    w = None
    if r_a < 50:
        w = f"deep and narrow for its size: d_model/n_layers={r_a:.3g} (consensus ~128)"
    elif r_a > 300:
        w = f"wide and shallow for its size: d_model/n_layers={r_a:.3g} (consensus ~128)"
    lines.append(_line("d_model / n_layers", f"{r_a:.3g}", "~128 (100-200)", w))

    v = cfg.vocab_size
    w = None
    if v < 30_000:
        w = f"vocab_size={v} is below the monolingual range (30k-50k)"
    elif v > 250_000:
        w = f"vocab_size={v} is above the multilingual range (100k-250k)"
    where = ("monolingual range" if 30_000 <= v <= 50_000 else
             "multilingual range" if 100_000 <= v <= 250_000 else
             "between mono- and multilingual" if 50_000 < v < 100_000 else "out of range")
    lines.append(_line("vocab_size", f"{v}", "30k-50k mono / 100k-250k multi", w))
    lines.append(f"      ({where})")

    lines.append("")
    lines.append("Architecture choices (consensus / this config)")
    choices = [
        ("norm placement", "pre", cfg.norm_placement, cfg.norm_placement == NormPlacement.PRE),
        ("norm", "rmsnorm", cfg.norm, cfg.norm in (Norm.RMSNORM, Norm.GEMMA_RMSNORM)),
        ("bias on linears", "none", "yes" if (cfg.bias or cfg.qkv_bias or cfg.mlp_bias) else "none",
         not (cfg.bias or cfg.qkv_bias or cfg.mlp_bias)),
        ("activation", "gated (swiglu/geglu)", cfg.activation, cfg.gated),
        ("position", "rope", cfg.position, cfg.position == Position.ROPE),
        ("dropout", "0 (weight decay instead)", f"{cfg.dropout:g}", cfg.dropout == 0),
    ]
    for name, cons, val, same in choices:
        lines.append(f"  {name:<28} {str(val):>12}   consensus {cons:<28} [{'same' if same else 'differs'}]")
    extras = [n for n, on in (("qk_norm=" + str(cfg.qk_norm), cfg.qk_norm is not None),
                              (f"z_loss={cfg.z_loss_coef:g}", cfg.z_loss_coef > 0),
                              (f"attn_softcap={cfg.attn_softcap}", cfg.attn_softcap is not None),
                              (f"final_softcap={cfg.final_softcap}", cfg.final_softcap is not None))
              if on]
    lines.append(f"  stability tricks: {', '.join(extras) if extras else 'none'}")

    model = build(cfg, device="meta")
    n = model.num_parameters()
    n_body = model.num_parameters(exclude_embeddings=True)
    lines.append("")
    lines.append("Size")
    lines.append(f"  parameters                   {n:>14,}  ({_fmt_count(n)}; without embeddings {n_body:,})")
    f_train = model.flops_per_token(seq_len)
    f_fwd = model.flops_per_token(seq_len, training=False)
    lines.append(f"  FLOPs per token (seq {seq_len})  {f_train:>14,}  training (6N + 12LHQT); "
                 f"forward {f_fwd:,}")
    return "\n".join(lines)
