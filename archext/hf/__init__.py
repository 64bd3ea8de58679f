"""Hugging Face interop: archext models from and to ``transformers`` causal LMs, and `patch`,
which swaps an HF model's norms, MLP activations, RoPE and loss for archext kernels in place
(with labels, the LM head and the loss run fused: the [B, S, vocab] logits are never held).

transformers is optional: it is imported inside the functions that need it.

    model = from_hf(hf_model)          # same weights, same logits (the config translated)
    cfg = config_from_hf(hf_config)    # the TransformerConfig of an HF config
    hf = to_hf(model)                  # the reverse, for the families that express the config
    patch(hf_model)                    # HF model on archext kernels, identical outputs

Families (`FAMILIES`): llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, olmo, olmo2,
phi, phi3, cohere, stablelm, starcoder2, granite (``model.layers.*`` layouts), gpt_neox, gptj,
opt and gpt2; RoPE scaled by linear, dynamic, yarn, llama3 or longrope, read from transformers
4 (``rope_theta`` + ``rope_scaling``) and 5 (``rope_parameters``). What a family cannot express
(another RoPE type, a bias pattern the config has no field for, a layer pattern of sliding
windows other than "every k-th layer global", OLMo's clip_qkv) raises `HFConversionError`
rather than converting to a different model. ``python -m archext.hf --coverage`` prints the
family table; docs/hf.md has it.

HF dropout rates are not carried over (archext has one rate, applied at the embeddings, the
attention probabilities and each branch output); the result has dropout 0: set it with
``dataclasses.replace`` and rebuild if you train with dropout.
"""
import dataclasses
import functools
import inspect
import math
import re
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..models.config import TransformerConfig
from ..models.model import CausalLM, build
from ..ops.rope import ROPE_TYPES, RopeScaling
from ..nn import GatedMLP, LayerNorm, RMSNorm
from . import families as _more_families


class HFConversionError(ValueError):
    """The Hugging Face model or config cannot be expressed exactly (or the family is unknown)."""


# ---------------------------------------------------------------------------------------------
# Activations and shared config pieces
# ---------------------------------------------------------------------------------------------
_HF_TO_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh",
                "gelu_new": "geglu_tanh", "relu": "reglu"}
_HF_TO_PLAIN = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "relu": "relu"}
_GATED_TO_HF = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh", "reglu": "relu"}
_PLAIN_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _activation(hf_act: str, gated: bool) -> str:
    table = _HF_TO_GATED if gated else _HF_TO_PLAIN
    if hf_act not in table:
        raise HFConversionError(f"the HF activation {hf_act!r} has no archext kernel; supported: "
                                f"{sorted(table)}")
    return table[hf_act]


def _transformers_major() -> int:
    """The installed transformers' major version (the layouts of 5 when there is none: the state
    dict functions below need no transformers)."""
    try:
        import transformers
    except ImportError:
        return 5
    return int(transformers.__version__.split(".")[0])


_ROPE_ALIASES = {"su": "longrope"}  # transformers 4's older Phi-3 name


def _rope_parameters(c, layer_type: Optional[str] = None) -> dict:
    """The RoPE dict of an HF config as transformers 5 spells it (rope_type, rope_theta,
    partial_rotary_factor and the scaling keys in one dict), from 5's ``rope_parameters`` (one
    dict, or one per layer type) or 4's ``rope_theta`` + ``rope_scaling``."""
    rp = getattr(c, "rope_parameters", None)
    if rp is not None and layer_type is not None and layer_type in rp:
        rp = rp[layer_type]
    if rp is None:  # transformers 4: rope_theta, rope_scaling and partial_rotary_factor apart
        rp = dict(getattr(c, "rope_scaling", None) or {})
        rp["rope_theta"] = c.rope_theta
        if getattr(c, "partial_rotary_factor", None) is not None:
            rp["partial_rotary_factor"] = c.partial_rotary_factor
    rp = dict(rp)
    rp["rope_type"] = _ROPE_ALIASES.get(rp.get("rope_type", rp.get("type", "default")),
                                        rp.get("rope_type", rp.get("type", "default")))
    return rp


def _rope_scaling(c, rp: dict) -> Optional[RopeScaling]:
    """The `RopeScaling` of an HF RoPE dict, with transformers' defaults filled in."""
    kind = rp["rope_type"]
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise HFConversionError(f"rope_type={kind!r} is not supported; supported: {list(ROPE_TYPES)}")
    max_pos = c.max_position_embeddings
    if kind == "dynamic":  # scales beyond max_position_embeddings itself
        l0 = max_pos
    elif getattr(c, "original_max_position_embeddings", None) is not None:
        l0 = c.original_max_position_embeddings  # Phi-3 keeps it outside, and it takes precedence
    else:
        l0 = rp.get("original_max_position_embeddings") or max_pos
    factor = rp.get("factor")
    if factor is None:
        if kind not in ("yarn", "longrope"):
            raise HFConversionError(f"rope_type={kind!r} without a factor")
        factor = max_pos / l0  # as transformers defaults it
    kw = dict(rope_type=kind, factor=float(factor), original_max_positions=int(l0))
    if kind == "llama3":
        kw.update(low_freq_factor=float(rp["low_freq_factor"]), high_freq_factor=float(rp["high_freq_factor"]))
    if kind == "yarn":
        kw.update(beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1),
                  truncate=bool(rp.get("truncate", True)), mscale=rp.get("mscale"),
                  mscale_all_dim=rp.get("mscale_all_dim"))
    if kind in ("yarn", "longrope") and rp.get("attention_factor") is not None:
        kw.update(attention_factor=float(rp["attention_factor"]))
    if kind == "longrope":
        kw.update(short_factor=tuple(rp["short_factor"]), long_factor=tuple(rp["long_factor"]))
    try:
        return RopeScaling(**kw)
    except ValueError as e:
        raise HFConversionError(str(e)) from None


def _rope(c, default_fraction: float = 1.0, layer_type: Optional[str] = None) -> dict:
    """TransformerConfig kwargs of an HF config's RoPE (theta, partial rotary, scaling)."""
    rp = _rope_parameters(c, layer_type)
    kw = dict(position="rope", rope_theta=float(rp["rope_theta"]),
              rotary_fraction=float(rp.get("partial_rotary_factor", default_fraction)),
              rope_scaling=_rope_scaling(c, rp))
    if kw["rope_scaling"] is not None and kw["rope_scaling"].rope_type == "dynamic":
        # transformers keeps no longest length for dynamic NTK (max_position_embeddings is where
        # the scaling starts): the archext tables reach factor times that.
        kw["max_seq_len"] = int(c.max_position_embeddings * kw["rope_scaling"].factor)
    return kw


def _scaling_to_hf(cfg: TransformerConfig) -> dict:
    """The HF RoPE dict keys of cfg's scaling (none when unscaled)."""
    sc = cfg.rope_scaling
    if sc is None:
        return {}
    d = {"rope_type": sc.rope_type, "factor": sc.factor}
    if sc.rope_type in ("yarn", "llama3", "longrope"):
        d["original_max_position_embeddings"] = sc.original_max_positions
    if sc.rope_type == "llama3":
        d.update(low_freq_factor=sc.low_freq_factor, high_freq_factor=sc.high_freq_factor)
    if sc.rope_type == "yarn":
        d.update(beta_fast=sc.beta_fast, beta_slow=sc.beta_slow, truncate=sc.truncate)
        d.update({k: getattr(sc, k) for k in ("mscale", "mscale_all_dim") if getattr(sc, k) is not None})
    if sc.rope_type in ("yarn", "longrope") and sc.attention_factor is not None:
        d["attention_factor"] = sc.attention_factor
    if sc.rope_type == "longrope":
        d.update(short_factor=list(sc.short_factor), long_factor=list(sc.long_factor))
    return d


def _rope_to_hf(cfg: TransformerConfig, neox: bool = False) -> dict:
    """HF config kwargs of cfg's RoPE (dynamic also sets max_position_embeddings: where its
    scaling starts)."""
    scaling = _scaling_to_hf(cfg)
    out = {}
    if scaling.get("rope_type") == "dynamic":
        out["max_position_embeddings"] = cfg.rope_scaling.original_max_positions
    if _transformers_major() < 5:  # GPT-NeoX's own names there; the others' rope_theta
        if neox:
            out.update(rotary_emb_base=cfg.rope_theta, rotary_pct=cfg.rotary_fraction)
        else:
            out["rope_theta"] = cfg.rope_theta
            if cfg.rotary_fraction != 1.0:
                out["partial_rotary_factor"] = cfg.rotary_fraction
        if scaling:
            out["rope_scaling"] = scaling
        return out
    rp = {"rope_type": "default", "rope_theta": cfg.rope_theta, **scaling}
    if cfg.rotary_fraction != 1.0:
        rp["partial_rotary_factor"] = cfg.rotary_fraction
    out["rope_parameters"] = rp
    return out


def _windows(c, n_layers: int) -> dict:
    """(sliding_window, full_attention_every) from an HF config's layer_types / sliding_window."""
    types = getattr(c, "layer_types", None)  # only some families have per-layer types
    window = getattr(c, "sliding_window", None)
    if types is None:
        types = ["sliding_attention" if window else "full_attention"] * n_layers
    sliding = [t == "sliding_attention" for t in types]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise HFConversionError(f"layer types {sorted(unknown)} are not supported")
    if not any(sliding):
        return dict(sliding_window=None, full_attention_every=None)
    if all(sliding):
        return dict(sliding_window=window, full_attention_every=None)
    for k in range(2, n_layers + 1):
        if all(s == ((i + 1) % k != 0) for i, s in enumerate(sliding)):
            return dict(sliding_window=window, full_attention_every=k)
    raise HFConversionError(f"the sliding-window layer pattern {types} is not 'every k-th layer "
                            f"global'; archext's config cannot express it")


def _windows_to_hf(cfg: TransformerConfig) -> list[str]:
    return ["full_attention" if cfg.layer_window(i) is None else "sliding_attention"
            for i in range(cfg.n_layers)]


def _common(c, d_model, n_layers, n_heads) -> dict:
    return dict(vocab_size=c.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                init_std=float(c.initializer_range) if hasattr(c, "initializer_range") else 0.02,
                tied_embeddings=bool(c.tie_word_embeddings))


# ---------------------------------------------------------------------------------------------
# Families: config translation both ways, and the state-dict key renames (+ fixes) both ways
# ---------------------------------------------------------------------------------------------
@dataclass
class _Family:
    hf_class: str  # transformers class of the causal LM
    config_class: str
    from_config: Callable  # HF config -> TransformerConfig kwargs
    to_config: Optional[Callable]  # TransformerConfig -> HF config kwargs (None: no to_hf)
    renames: Callable  # TransformerConfig -> [(hf prefix, archext prefix)], "{i}" = layer index
    fix_to_archext: Callable = lambda sd, cfg: sd  # split / transpose after renaming
    fix_to_hf: Callable = lambda sd, cfg: sd
    ignore: tuple = ()  # HF state-dict keys (regex) with no archext counterpart
    # HF config -> (logit scale, final soft-cap): how the family's CausalLM turns the head's
    # output into logits (patch's fused loss does the same)
    logits: Callable = lambda c: (None, None)
    # patch's RoPE: "half" (Llama's apply_rotary_pos_emb), "interleaved" (Cohere's), None (the
    # family's own signature: left as is)
    rope_patch: Optional[str] = "half"


_NORM_NAMES = {  # HF decoder-layer norm -> archext block norm, per placement
    "pre": {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"},
    "double": {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_post_norm",
               "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_post_norm"},
    "reordered": {"post_attention_layernorm": "attn_post_norm",
                  "post_feedforward_layernorm": "mlp_post_norm"},
}


def _llama_renames(cfg):
    r = [("model.embed_tokens.", "embed."), ("model.norm.", "norm."), ("lm_head.", "lm_head."),
         ("model.layers.{i}.self_attn.", "layers.{i}.attn."), ("model.layers.{i}.mlp.", "layers.{i}.mlp.")]
    return r + [(f"model.layers.{{i}}.{h}.", f"layers.{{i}}.{a}.")
                for h, a in _NORM_NAMES[cfg.norm_placement].items()]


def _llama_like(model_type: str):
    """from_config for the families with Llama's layout (and their differences)."""
    def from_config(c):
        kw = _common(c, c.hidden_size, c.num_hidden_layers, c.num_attention_heads)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        act = c.hidden_activation if model_type in ("gemma2", "gemma3_text") else c.hidden_act
        kw.update(n_kv_heads=c.num_key_value_heads, head_dim=head_dim, d_ff=c.intermediate_size,
                  norm="rmsnorm", norm_eps=float(c.rms_norm_eps), norm_placement="pre",
                  activation=_activation(act, gated=True), max_seq_len=c.max_position_embeddings)
        kw.update(_rope(c, layer_type="full_attention" if model_type == "gemma3_text" else None))
        attn_bias = bool(getattr(c, "attention_bias", False))  # absent in Mistral / Qwen2
        kw.update(bias=attn_bias, mlp_bias=bool(getattr(c, "mlp_bias", False)))
        if model_type == "qwen2":
            kw.update(bias=False, qkv_bias=True, mlp_bias=False)
        if model_type in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"):
            kw.update(_windows(c, c.num_hidden_layers))
        if model_type in ("qwen3", "gemma3_text"):
            kw.update(qk_norm="head")
        if model_type in ("gemma", "gemma2", "gemma3_text"):
            kw.update(norm="gemma_rmsnorm", embedding_scale=math.sqrt(c.hidden_size))
            if getattr(c, "use_bidirectional_attention", None):
                raise HFConversionError("use_bidirectional_attention is not supported (causal LMs only)")
        if model_type in ("gemma2", "gemma3_text"):
            kw.update(norm_placement="double", attn_scale=float(c.query_pre_attn_scalar) ** -0.5,
                      attn_softcap=c.attn_logit_softcapping, final_softcap=c.final_logit_softcapping)
        if model_type == "olmo2":
            kw.update(norm_placement="reordered", qk_norm="proj")
        return kw

    def to_config(cfg: TransformerConfig):
        hf = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_width,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                  tie_word_embeddings=cfg.tied_embeddings, initializer_range=cfg.init_std)
        hf.update(_rope_to_hf(cfg))
        act = _GATED_TO_HF.get(cfg.activation, cfg.activation)
        hf["hidden_activation" if model_type in ("gemma2", "gemma3_text") else "hidden_act"] = act
        if model_type in ("llama",):
            hf.update(attention_bias=cfg.bias, mlp_bias=cfg.mlp_bias if cfg.mlp_bias is not None else cfg.bias)
        elif model_type in ("qwen3", "gemma", "gemma2", "gemma3_text", "olmo2"):
            hf.update(attention_bias=cfg.bias)
        if model_type in ("mistral",):
            hf.update(sliding_window=cfg.sliding_window)
        if model_type in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
            hf.update(sliding_window=cfg.sliding_window, layer_types=_windows_to_hf(cfg))
            if model_type in ("qwen2", "qwen3") and cfg.sliding_window is not None:
                hf.update(use_sliding_window=True, max_window_layers=0)
        if model_type in ("gemma2", "gemma3_text"):
            q = (cfg.head_size ** -0.5 if cfg.attn_scale is None else cfg.attn_scale) ** -2
            if abs(q - round(q)) > 1e-6 * q:
                raise HFConversionError(f"Gemma 2 stores the attention scale as an integer "
                                        f"query_pre_attn_scalar (scale ** -2); {q:g} is not one")
            hf.update(query_pre_attn_scalar=round(q),
                      attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)
        return hf

    return from_config, to_config


# ---- GPT-NeoX: fused query_key_value with a per-head [q | k | v] layout ----
def _neox_from_config(c):
    kw = _common(c, c.hidden_size, c.num_hidden_layers, c.num_attention_heads)
    kw.update(d_ff=c.intermediate_size, norm="layernorm", norm_eps=float(c.layer_norm_eps),
              norm_placement="pre", block="parallel" if c.use_parallel_residual else "serial",
              parallel_shared_norm=False, activation=_activation(c.hidden_act, gated=False),
              max_seq_len=c.max_position_embeddings, bias=bool(c.attention_bias), mlp_bias=True)
    kw.update(_rope(c, default_fraction=1.0))
    return kw


def _neox_to_config(cfg):
    return {**dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, intermediate_size=cfg.ffn_width,
                hidden_act=_PLAIN_TO_HF.get(cfg.activation, cfg.activation),
                layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.block == "parallel",
                max_position_embeddings=cfg.max_seq_len, attention_bias=cfg.bias,
                tie_word_embeddings=cfg.tied_embeddings, initializer_range=cfg.init_std),
            **_rope_to_hf(cfg, neox=True)}


def _neox_renames(cfg):
    L = "gpt_neox.layers.{i}."
    # transformers 5 names the head lm_head, 4 embed_out: both load; to_hf writes the installed
    # version's (the first of the two).
    heads = ("lm_head.", "embed_out.") if _transformers_major() >= 5 else ("embed_out.", "lm_head.")
    return [("gpt_neox.embed_in.", "embed."), ("gpt_neox.final_layer_norm.", "norm."),
            (heads[0], "lm_head."), (heads[1], "lm_head."),
            (L + "input_layernorm.", "layers.{i}.attn_norm."),
            (L + "post_attention_layernorm.", "layers.{i}.mlp_norm."),
            (L + "attention.query_key_value.", "layers.{i}.attn.qkv."),
            (L + "attention.dense.", "layers.{i}.attn.o_proj."),
            (L + "mlp.dense_h_to_4h.", "layers.{i}.mlp.up_proj."),
            (L + "mlp.dense_4h_to_h.", "layers.{i}.mlp.down_proj.")]


def _neox_split(sd, cfg):
    h, d = cfg.n_heads, cfg.head_size
    for key in [k for k in sd if ".attn.qkv." in k]:
        t = sd.pop(key)
        t = t.view(h, 3, d, *t.shape[1:])  # per head: q, k, v rows
        for j, name in enumerate("qkv"):
            sd[key.replace(".qkv.", f".{name}_proj.")] = t[:, j].reshape(h * d, *t.shape[3:]).clone()
    return sd


def _neox_merge(sd, cfg):
    h, d = cfg.n_heads, cfg.head_size
    for key in [k for k in sd if ".attn.q_proj." in k]:
        parts = [sd.pop(key.replace(".q_proj.", f".{n}_proj.")) for n in "qkv"]
        t = torch.stack([p.view(h, d, *p.shape[1:]) for p in parts], dim=1)
        sd[key.replace(".q_proj.", ".qkv.")] = t.reshape(3 * h * d, *parts[0].shape[1:])
    return sd


# ---- OPT ----
def _opt_from_config(c):
    if c.word_embed_proj_dim != c.hidden_size:
        raise HFConversionError(f"OPT with word_embed_proj_dim={c.word_embed_proj_dim} != hidden_size="
                                f"{c.hidden_size} (project_in/out) is not supported")
    if not c.layer_norm_elementwise_affine:
        raise HFConversionError("OPT with layer_norm_elementwise_affine=False is not supported")
    if c.do_layer_norm_before and c._remove_final_layer_norm:
        raise HFConversionError("OPT with _remove_final_layer_norm=True is not supported")
    kw = _common(c, c.hidden_size, c.num_hidden_layers, c.num_attention_heads)
    kw.update(d_ff=c.ffn_dim, norm="layernorm", norm_eps=1e-5,  # nn.LayerNorm's default, as OPT
              norm_placement="pre" if c.do_layer_norm_before else "post",
              activation=_activation(c.activation_function, gated=False), position="learned",
              learned_pos_offset=2, max_seq_len=c.max_position_embeddings, bias=bool(c.enable_bias),
              init_std=float(c.init_std))
    return kw


def _opt_to_config(cfg):
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, word_embed_proj_dim=cfg.d_model,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, ffn_dim=cfg.ffn_width,
                do_layer_norm_before=cfg.norm_placement == "pre",
                activation_function=_PLAIN_TO_HF.get(cfg.activation, cfg.activation),
                max_position_embeddings=cfg.max_seq_len, enable_bias=cfg.bias,
                tie_word_embeddings=cfg.tied_embeddings, init_std=cfg.init_std)


def _opt_renames(cfg):
    L = "model.decoder.layers.{i}."
    return [("model.decoder.embed_tokens.", "embed."), ("model.decoder.embed_positions.", "pos_embed."),
            ("model.decoder.final_layer_norm.", "norm."), ("lm_head.", "lm_head."),
            (L + "self_attn.out_proj.", "layers.{i}.attn.o_proj."), (L + "self_attn.", "layers.{i}.attn."),
            (L + "self_attn_layer_norm.", "layers.{i}.attn_norm."),
            (L + "final_layer_norm.", "layers.{i}.mlp_norm."),
            (L + "fc1.", "layers.{i}.mlp.up_proj."), (L + "fc2.", "layers.{i}.mlp.down_proj.")]


# ---- GPT-2: Conv1D stores weights as [in, out] ----
def _gpt2_from_config(c):
    if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
        raise HFConversionError("GPT-2 needs scale_attn_weights=True and scale_attn_by_inverse_layer_idx=False")
    kw = _common(c, c.n_embd, c.n_layer, c.n_head)
    kw.update(d_ff=c.n_inner or 4 * c.n_embd, norm="layernorm", norm_eps=float(c.layer_norm_epsilon),
              norm_placement="pre", activation=_activation(c.activation_function, gated=False),
              position="learned", max_seq_len=c.n_positions, bias=True)
    return kw


def _gpt2_to_config(cfg):
    return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                n_inner=cfg.ffn_width, activation_function="gelu_new" if cfg.activation == "gelu_tanh" else cfg.activation,
                layer_norm_epsilon=cfg.norm_eps, n_positions=cfg.max_seq_len,
                tie_word_embeddings=cfg.tied_embeddings, initializer_range=cfg.init_std)


def _gpt2_renames(cfg):
    L = "transformer.h.{i}."
    return [("transformer.wte.", "embed."), ("transformer.wpe.", "pos_embed."), ("transformer.ln_f.", "norm."),
            ("lm_head.", "lm_head."), (L + "ln_1.", "layers.{i}.attn_norm."), (L + "ln_2.", "layers.{i}.mlp_norm."),
            (L + "attn.c_attn.", "layers.{i}.attn.qkv."), (L + "attn.c_proj.", "layers.{i}.attn.o_proj."),
            (L + "mlp.c_fc.", "layers.{i}.mlp.up_proj."), (L + "mlp.c_proj.", "layers.{i}.mlp.down_proj.")]


_CONV1D = re.compile(r"\.(attn\.qkv|attn\.o_proj|mlp\.up_proj|mlp\.down_proj)\.weight$")


def _gpt2_split(sd, cfg):
    for key in [k for k in sd if _CONV1D.search(k)]:
        sd[key] = sd[key].t().contiguous()
    for key in [k for k in sd if ".attn.qkv." in k]:
        for name, part in zip("qkv", sd.pop(key).chunk(3, dim=0)):
            sd[key.replace(".qkv.", f".{name}_proj.")] = part.contiguous()
    return sd


def _gpt2_merge(sd, cfg):
    for key in [k for k in sd if ".attn.q_proj." in k]:
        sd[key.replace(".q_proj.", ".qkv.")] = torch.cat([sd.pop(key.replace(".q_proj.", f".{n}_proj."))
                                                          for n in "qkv"], dim=0)
    for key in [k for k in sd if _CONV1D.search(k)]:
        sd[key] = sd[key].t().contiguous()
    return sd


def _families() -> dict[str, _Family]:
    fams = {}
    for mt, cls, ccls in (("llama", "LlamaForCausalLM", "LlamaConfig"),
                          ("mistral", "MistralForCausalLM", "MistralConfig"),
                          ("qwen2", "Qwen2ForCausalLM", "Qwen2Config"),
                          ("qwen3", "Qwen3ForCausalLM", "Qwen3Config"),
                          ("gemma", "GemmaForCausalLM", "GemmaConfig"),
                          ("gemma2", "Gemma2ForCausalLM", "Gemma2Config"),
                          ("olmo2", "Olmo2ForCausalLM", "Olmo2Config")):
        fc, tc = _llama_like(mt)
        fams[mt] = _Family(cls, ccls, fc, tc, _llama_renames)
    fams["gemma2"].logits = lambda c: (None, c.final_logit_softcapping)
    fams["gpt_neox"] = _Family("GPTNeoXForCausalLM", "GPTNeoXConfig", _neox_from_config, _neox_to_config,
                               _neox_renames, _neox_split, _neox_merge)
    fams["opt"] = _Family("OPTForCausalLM", "OPTConfig", _opt_from_config, _opt_to_config, _opt_renames)
    fams["gpt2"] = _Family("GPT2LMHeadModel", "GPT2Config", _gpt2_from_config, _gpt2_to_config,
                           _gpt2_renames, _gpt2_split, _gpt2_merge)
    _more_families.register(fams, sys.modules[__name__])
    return fams


FAMILIES = _families()


def _family(model_type: str) -> _Family:
    if model_type not in FAMILIES:
        raise HFConversionError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def config_from_hf(hf_config) -> TransformerConfig:
    """The `TransformerConfig` of a transformers config (``hf_model.config``)."""
    return TransformerConfig(**_family(hf_config.model_type).from_config(hf_config))


def _rename(sd: dict, rules: list, to_archext: bool) -> tuple[dict, list]:
    src_dst = [(h, a) if to_archext else (a, h) for h, a in rules]
    compiled = [(re.compile("^" + re.escape(s).replace(re.escape("{i}"), r"(\d+)")), d) for s, d in src_dst]
    out, unmatched = {}, []
    for key, value in sd.items():
        for pat, dst in compiled:
            m = pat.match(key)
            if m:
                new = dst.replace("{i}", m.group(1)) if m.groups() else dst
                out[new + key[m.end():]] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def state_dict_from_hf(hf_state_dict: dict, cfg: TransformerConfig, model_type: str) -> dict:
    """An HF causal LM's state dict as archext's (renamed, split, transposed)."""
    fam = _family(model_type)
    sd = {k: v for k, v in hf_state_dict.items() if not any(re.search(p, k) for p in fam.ignore)}
    sd, unmatched = _rename(sd, fam.renames(cfg), to_archext=True)
    if unmatched:
        raise HFConversionError(f"HF weights with no archext counterpart (the model would differ): "
                                f"{unmatched[:8]}{' ...' if len(unmatched) > 8 else ''}")
    sd = fam.fix_to_archext(sd, cfg)
    if cfg.tied_embeddings:
        sd.setdefault("lm_head.weight", sd["embed.weight"])
    return sd


def state_dict_to_hf(state_dict: dict, cfg: TransformerConfig, model_type: str) -> dict:
    """archext's state dict in the layout of the HF family ``model_type``."""
    fam = _family(model_type)
    sd = fam.fix_to_hf(dict(state_dict), cfg)
    sd, unmatched = _rename(sd, fam.renames(cfg), to_archext=False)
    if unmatched:
        raise HFConversionError(f"archext weights with no {model_type} counterpart: {unmatched[:8]}")
    return sd


def from_hf(hf_model_or_config) -> CausalLM:
    """An archext model equal to a transformers causal LM: given a model, with its weights, dtype,
    device and train/eval mode (its logits match the HF model's); given a config, freshly
    initialised."""
    if not hasattr(hf_model_or_config, "state_dict"):  # a config
        return build(config_from_hf(hf_model_or_config))
    hf = hf_model_or_config
    cfg = config_from_hf(hf.config)
    p = next(hf.parameters())
    model = build(cfg, init=False, device=p.device, dtype=p.dtype)
    sd = state_dict_from_hf(hf.state_dict(), cfg, hf.config.model_type)
    model.load_state_dict(sd, strict=True)
    return model.train(hf.training)


def _canonical(cfg: TransformerConfig) -> TransformerConfig:
    """cfg with its defaults resolved and the options of features that are off reset, so that two
    configs of the same model compare equal."""
    d = TransformerConfig()
    kw = dict(n_kv_heads=cfg.kv_heads, head_dim=cfg.head_size, d_ff=cfg.ffn_width,
              ffn_multiple_of=d.ffn_multiple_of, dropout=0.0,
              residual_dtype=None,  # numerics, not architecture: every family runs either way
              qkv_bias=cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias,
              mlp_bias=cfg.bias if cfg.mlp_bias is None else cfg.mlp_bias,
              # 12 digits: Gemma 2 stores the scale as query_pre_attn_scalar = scale ** -2
              attn_scale=float(f"{cfg.head_size ** -0.5 if cfg.attn_scale is None else cfg.attn_scale:.12g}"))
    if cfg.position != "rope":
        kw.update(rope_theta=d.rope_theta, rope_interleaved=d.rope_interleaved, rotary_fraction=d.rotary_fraction,
                  rope_scaling=None, local_rope_theta=None)
    elif cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "dynamic":
        kw.update(max_seq_len=d.max_seq_len)  # HF stores no longest length for dynamic NTK
    if cfg.position != "learned":
        kw.update(learned_pos_offset=d.learned_pos_offset)
    if cfg.position != "t5":
        kw.update(t5_num_buckets=d.t5_num_buckets, t5_max_distance=d.t5_max_distance)
    if cfg.block != "parallel":
        kw.update(parallel_shared_norm=d.parallel_shared_norm)
    if cfg.sliding_window is None:
        kw.update(full_attention_every=None)
    return dataclasses.replace(cfg, **kw)


def config_to_hf(cfg: TransformerConfig, model_type: Optional[str] = None):
    """A transformers config of family ``model_type`` (default: the first family that expresses
    ``cfg`` exactly) for ``cfg``; `HFConversionError` when the family cannot express it."""
    import transformers

    want = _canonical(cfg)
    tried = []
    for mt in [model_type] if model_type is not None else list(FAMILIES):
        fam = _family(mt)
        try:
            hf_cfg = getattr(transformers, fam.config_class)(**fam.to_config(cfg))
            back = _canonical(config_from_hf(hf_cfg))
        except (HFConversionError, ValueError, TypeError, KeyError, AttributeError) as e:
            tried.append(f"{mt}: {e}")
            continue
        if back == want:
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                # A family's default token ids (Phi-3's pad 32000) may lie outside a small vocab.
                tok = getattr(hf_cfg, name, None)
                if isinstance(tok, int) and tok >= cfg.vocab_size:
                    setattr(hf_cfg, name, None)
            return hf_cfg
        diff = {f.name: (getattr(want, f.name), getattr(back, f.name)) for f in dataclasses.fields(want)
                if getattr(want, f.name) != getattr(back, f.name)}
        tried.append(f"{mt}: differs in {diff}")
    raise HFConversionError("no Hugging Face family expresses this config exactly:\n  " + "\n  ".join(tried))


def to_hf(model: CausalLM, model_type: Optional[str] = None):
    """A transformers causal LM (eager attention) with ``model``'s weights, dtype, device and
    mode; the family is ``model_type`` or the first that expresses the config exactly."""
    import transformers

    cfg = model.config
    hf_cfg = config_to_hf(cfg, model_type)
    hf_cfg._attn_implementation = "eager"  # SDPA would drop Gemma 2's soft-cap
    fam = _family(hf_cfg.model_type)
    p = next(model.parameters())
    hf = getattr(transformers, fam.hf_class)(hf_cfg).to(device=p.device, dtype=p.dtype)
    sd = state_dict_to_hf(model.state_dict(), cfg, hf_cfg.model_type)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if cfg.tied_embeddings else set()
    if set(missing) - tied or unexpected:
        raise HFConversionError(f"to_hf: missing {missing}, unexpected {unexpected}")
    return hf.train(model.training)


# ---------------------------------------------------------------------------------------------
# patch: archext kernels inside an HF model
# ---------------------------------------------------------------------------------------------
class Activation(nn.Module):
    """An archext activation kernel as a module (replaces HF's ``ACT2FN[...]`` modules)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return ops.act(x, self.name)

    def extra_repr(self) -> str:
        return self.name


def archext_apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1,
                                 interleaved: bool = False):
    """Drop-in for transformers' ``apply_rotary_pos_emb`` (half-rotation convention, cos/sin
    ``[B, S, R]`` with duplicated halves, partial rotary when R < head_dim) on the archext RoPE
    kernel. Each (batch, token) row of cos/sin becomes one row of the kernel's cache (cos/sin of
    batch 1 serve every sequence of the batch)."""
    b, s, r = cos.shape
    table_cos = cos[..., : r // 2].reshape(b * s, r // 2).float().contiguous()
    table_sin = sin[..., : r // 2].reshape(b * s, r // 2).float().contiguous()
    pos = torch.arange(b * s, device=q.device).view(b, s)
    if b == 1:
        pos = pos[0]
    if unsqueeze_dim == 1:  # q, k [B, H, S, D]: the kernel takes [B, S, H, D] views
        q2, k2 = ops.apply_rope(q.transpose(1, 2), k.transpose(1, 2), table_cos, table_sin, position_ids=pos,
                                interleaved=interleaved)
        return q2.transpose(1, 2), k2.transpose(1, 2)
    return ops.apply_rope(q, k, table_cos, table_sin, position_ids=pos, interleaved=interleaved)


def archext_apply_rotary_pos_emb_interleaved(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                                             unsqueeze_dim: int = 1):
    """`archext_apply_rotary_pos_emb` for the GPT-J pairing (2i, 2i+1) with cos/sin whose
    entries come in equal pairs (Cohere's ``repeat_interleave``)."""
    return archext_apply_rotary_pos_emb(q, k, _pairs_to_halves(cos), _pairs_to_halves(sin), unsqueeze_dim,
                                        interleaved=True)


def _pairs_to_halves(t: Tensor) -> Tensor:
    half = t[..., ::2]
    return torch.cat([half, half], dim=-1)


_HF_ACT_ATTRS = ("act_fn", "act", "activation_fn")


def _hf_activation_name(config) -> str:
    for attr in ("hidden_activation", "hidden_act", "activation_function"):
        if attr in config.to_dict() and config.to_dict()[attr] is not None:
            return config.to_dict()[attr]
    raise HFConversionError("patch: the HF config names no activation")


def patch(hf_model, *, norms: bool = True, mlp: bool = True, rope: bool = True, loss: bool = True,
          fused_loss: bool = True, loss_chunk_size: Optional[int] = None,
          attention: bool = True) -> dict:
    """Swap ``hf_model``'s norms (RMSNorm / Gemma's (1 + w) / nn.LayerNorm), MLP activations
    (a gated Llama-style MLP becomes `archext.nn.GatedMLP` on the same Linear modules; other
    activation modules become archext's), RoPE and loss for archext kernels, in place. Weights
    are shared, not copied, so the state dict and an optimizer over the model stay valid.

    RoPE is patched the way kernel libraries do it: ``apply_rotary_pos_emb`` of the model's
    transformers module is replaced, for every model of that family in this process.

    ``fused_loss`` (with ``loss``): a forward given ``labels`` runs the base model and then the
    LM head and the loss as one `archext.ops.linear_cross_entropy` (``loss_chunk_size`` rows of
    logits at a time), so the ``[B, S, vocab]`` logits are never held: the output's ``logits``
    is None then. The family's logit scale (Cohere, Granite) and final soft-cap (Gemma 2 / 3)
    are applied inside; families whose logits this module does not know keep HF's head and
    archext's cross-entropy. Without labels the forward is HF's.

    ``attention``: the model's attention implementation becomes "archext" (`archext.hf.attention`):
    the tiled kernel with the family's soft-cap and sliding windows, never holding the
    ``[B, H, S, S]`` scores. A packed batch (position ids restarting at each document, no
    attention mask) then attends within each document, and with labels no target crosses
    into the next document. Returns what was swapped (counts)."""
    import transformers  # noqa: F401  (the caller has it: it holds an HF model)

    done = {"norms": 0, "mlps": 0, "activations": 0, "rope": 0, "loss": 0, "fused_loss": 0, "attention": 0}
    act_hf = _hf_activation_name(hf_model.config)
    act = _HF_TO_PLAIN.get(act_hf)
    if mlp and act is None:
        raise HFConversionError(f"patch: the activation {act_hf!r} has no archext kernel")
    for parent in list(hf_model.modules()):
        for name, child in list(parent.named_children()):
            new = None
            cls = type(child).__name__
            if norms and cls.endswith("RMSNorm") and hasattr(child, "weight") and child.weight is not None:
                eps = child.variance_epsilon if hasattr(child, "variance_epsilon") else child.eps
                offset = 1.0 if cls.startswith("Gemma") else 0.0
                new = RMSNorm(child.weight.shape[0], eps=eps, weight_offset=offset)
                new.weight = child.weight
                done["norms"] += 1
            elif norms and type(child) is nn.LayerNorm and len(child.normalized_shape) == 1:
                new = LayerNorm(child.normalized_shape[0], eps=child.eps,
                                elementwise_affine=child.elementwise_affine, bias=child.bias is not None)
                new.weight, new.bias = child.weight, child.bias
                done["norms"] += 1
            elif mlp and all(hasattr(child, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) \
                    and all(type(getattr(child, a)) is nn.Linear for a in ("gate_proj", "up_proj", "down_proj")):
                g, d = child.gate_proj, child.down_proj
                new = GatedMLP(g.in_features, g.out_features, activation=act, bias=g.bias is not None,
                               device="meta")
                new.gate_proj, new.up_proj, new.down_proj = g, child.up_proj, d
                done["mlps"] += 1
            elif mlp and name in _HF_ACT_ATTRS and type(child).__module__.startswith(
                    ("transformers.activations", "torch.nn.modules.activation")):
                new = Activation(act)
                done["activations"] += 1
            if new is not None:
                setattr(parent, name, new)
    mt = hf_model.config.model_type
    rope_kind = FAMILIES[mt].rope_patch if mt in FAMILIES else "half"
    if rope and rope_kind is not None:
        mod = sys.modules[type(hf_model).__module__]
        if hasattr(mod, "apply_rotary_pos_emb"):
            mod.apply_rotary_pos_emb = (archext_apply_rotary_pos_emb if rope_kind == "half"
                                        else archext_apply_rotary_pos_emb_interleaved)
            done["rope"] = 1
    if attention and mt in FAMILIES:
        from . import attention as _attention

        name = _attention.register()
        if hasattr(hf_model, "set_attn_implementation"):
            hf_model.set_attn_implementation(name)
        else:
            hf_model.config._attn_implementation = name
        done["attention"] = 1
    if loss:
        hf_model.loss_function = causal_lm_loss
        done["loss"] = 1
        if fused_loss and hf_model.config.model_type in FAMILIES and hf_model.get_output_embeddings() is not None:
            hf_model.forward = _fused_loss_forward(hf_model, hf_model.forward, loss_chunk_size)
            done["fused_loss"] = 1
    return done


def _fused_loss_forward(model, original: Callable, chunk_size: Optional[int]) -> Callable:
    """``model.forward`` with labels on the fused head + loss (see `patch`)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    signature = inspect.signature(original)
    base = model.base_model
    base_params = inspect.signature(base.forward).parameters
    base_takes_any = any(p.kind == p.VAR_KEYWORD for p in base_params.values())
    head = model.get_output_embeddings()
    scale, cap = FAMILIES[model.config.model_type].logits(model.config)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        call = dict(bound.arguments)
        call.update(call.pop(next((n for n, p in signature.parameters.items() if p.kind == p.VAR_KEYWORD),
                                  "kwargs"), {}))
        labels = call.pop("labels", None)
        if labels is None:
            return original(*args, **kwargs)
        shift_labels = call.pop("shift_labels", None)
        n_items = call.pop("num_items_in_batch", None)
        for name in ("logits_to_keep", "return_dict"):
            call.pop(name, None)
        if not base_takes_any:
            call = {k: v for k, v in call.items() if k in base_params}
        out = base(**call)
        hidden = out[0]
        if shift_labels is None:  # position t predicts label t + 1, as ForCausalLMLoss
            shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
            position_ids = call.get("position_ids")
            if position_ids is not None and position_ids.shape[-1] == labels.shape[-1]:
                # A packed batch: the last token of a document does not predict the next one's
                # first (transformers' flattening collator marks those labels; this also covers
                # a batch packed without it).
                segments = ops.packing.segments_from_position_ids(position_ids).expand(labels.shape)
                shift_labels = ops.packing.boundary_targets(shift_labels, segments.to(labels.device))
        weight, bias = head.weight, head.bias
        if scale is not None:  # (h W^T + b) s = (s h) W^T + s b
            hidden = hidden * scale
            bias = None if bias is None else bias * scale
        loss, _ = ops.linear_cross_entropy(
            hidden, weight, shift_labels.to(hidden.device), bias=bias, softcap=cap,
            reduction="mean" if n_items is None else "sum", chunk_size=chunk_size)
        if n_items is not None:
            loss = loss / (n_items.to(loss.device) if torch.is_tensor(n_items) else n_items)
        return CausalLMOutputWithPast(loss=loss, logits=None,
                                      past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))

    return forward


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """transformers' ``ForCausalLMLoss`` on archext's fused cross-entropy (same shift, same
    ignore index, same normalisation by ``num_items_in_batch`` when given)."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    target = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return ops.cross_entropy(logits, target, ignore_index=ignore_index)[0]
    total = ops.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")[0]
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
