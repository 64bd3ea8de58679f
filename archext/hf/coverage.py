"""Tiny random models of each supported family (transformers' config classes at small sizes,
every parameter perturbed so that a norm weight of ones or a zero bias cannot hide a mapping
error), and the family table of ``python -m archext.hf --coverage``: for each, the largest
logit error of from_hf, patch and to_hf against the HF model in float32."""
import sys
from typing import Callable, Optional

import torch

V, S = 101, 12  # vocab; sequence longer than the sliding windows (5)
SIZES = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, initializer_range=0.1)


def _rope(theta: float = 10000.0, fraction: Optional[float] = None, **scaling) -> dict:
    """RoPE config kwargs: transformers 5's rope_parameters, or 4's separate fields."""
    import transformers
    if int(transformers.__version__.split(".")[0]) >= 5:
        rp = {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": theta, **scaling}
        if fraction is not None:
            rp["partial_rotary_factor"] = fraction
        return {"rope_parameters": rp}
    out = {"rope_theta": theta}
    if fraction is not None:
        out["partial_rotary_factor"] = fraction
    if scaling:
        out["rope_scaling"] = scaling
    return out


def configs() -> dict[str, Callable]:
    """name -> a function returning a tiny HF config of that family (variants included)."""
    import transformers as t
    long_f = [1.0 + 0.3 * i for i in range(8)]
    return {
        "llama": lambda: t.LlamaConfig(**SIZES, intermediate_size=96, num_key_value_heads=2, attention_bias=True,
                                       **_rope(500000.0)),
        "llama3.1": lambda: t.LlamaConfig(**SIZES, intermediate_size=96, num_key_value_heads=2, **_rope(
            500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8)),
        "mistral": lambda: t.MistralConfig(**SIZES, intermediate_size=96, num_key_value_heads=1, sliding_window=5,
                                           **_rope()),
        "qwen2": lambda: t.Qwen2Config(**SIZES, intermediate_size=96, num_key_value_heads=2, **_rope()),
        "qwen2_sliding": lambda: t.Qwen2Config(**SIZES, intermediate_size=96, num_key_value_heads=2,
                                               use_sliding_window=True, sliding_window=5, max_window_layers=0,
                                               **_rope(rope_type="yarn", factor=4.0,
                                                       original_max_position_embeddings=8)),
        "qwen3": lambda: t.Qwen3Config(**SIZES, intermediate_size=96, num_key_value_heads=2, head_dim=16, **_rope()),
        "gemma": lambda: t.GemmaConfig(**SIZES, intermediate_size=96, num_key_value_heads=1, head_dim=16, **_rope()),
        "gemma2": lambda: t.Gemma2Config(**{**SIZES, "num_hidden_layers": 3}, intermediate_size=96,
                                         num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
                                         sliding_window=5, attn_logit_softcapping=3.0,
                                         final_logit_softcapping=4.0, **_rope()),
        "gemma3": lambda: _gemma3(t),
        "olmo": lambda: t.OlmoConfig(**SIZES, intermediate_size=96, num_key_value_heads=2, **_rope()),
        "olmo2": lambda: t.Olmo2Config(**SIZES, intermediate_size=96, num_key_value_heads=2, **_rope()),
        "gpt_neox": lambda: t.GPTNeoXConfig(**SIZES, intermediate_size=128, hidden_act="gelu",
                                            **_neox_rope(t, 0.25)),
        "opt": lambda: t.OPTConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=64,
                                   do_layer_norm_before=True, init_std=0.1),
        "gpt2": lambda: t.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     initializer_range=0.1),
        "phi": lambda: t.PhiConfig(**SIZES, intermediate_size=128, qk_layernorm=True, **_rope(fraction=0.5)),
        "phi3": lambda: t.Phi3Config(**SIZES, intermediate_size=96, num_key_value_heads=2, sliding_window=5,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     original_max_position_embeddings=8,
                                     **_rope(rope_type="longrope", short_factor=[1.0 + 0.05 * i for i in range(8)],
                                             long_factor=long_f)),
        "gptj": lambda: t.GPTJConfig(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8,
                                     initializer_range=0.1),
        "cohere": lambda: t.CohereConfig(**SIZES, intermediate_size=96, num_key_value_heads=2, use_qk_norm=True,
                                         logit_scale=0.25, **_rope()),
        "stablelm": lambda: t.StableLmConfig(**SIZES, intermediate_size=96, num_key_value_heads=2,
                                             qk_layernorm=True, use_qkv_bias=True, **_rope(fraction=0.25)),
        "stablelm_parallel": lambda: t.StableLmConfig(**SIZES, intermediate_size=96, num_key_value_heads=4,
                                                      use_parallel_residual=True, **_rope(fraction=0.5)),
        "starcoder2": lambda: t.Starcoder2Config(**SIZES, intermediate_size=128, num_key_value_heads=2,
                                                 sliding_window=5, **_rope()),
        "granite": lambda: t.GraniteConfig(**SIZES, intermediate_size=96, num_key_value_heads=2,
                                           embedding_multiplier=3.0, residual_multiplier=0.5,
                                           attention_multiplier=0.2, logits_scaling=4.0, **_rope()),
    }


def _neox_rope(t, fraction):
    if int(t.__version__.split(".")[0]) >= 5:
        return _rope(fraction=fraction)
    return {"rotary_emb_base": 10000.0, "rotary_pct": fraction}


def _gemma3(t):
    """Gemma 3: every 3rd layer global with a linearly scaled theta 1e6, the others windowed with
    an unscaled theta 1e4 (transformers 5 nests rope_parameters per layer type)."""
    kw = dict(**{**SIZES, "num_hidden_layers": 3}, intermediate_size=96, num_key_value_heads=2, head_dim=24,
              query_pre_attn_scalar=20, sliding_window=5,
              layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    if int(t.__version__.split(".")[0]) >= 5:
        kw["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    else:
        kw.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    return t.Gemma3TextConfig(**kw)


def tiny_model(name: str, seed: int = 0):
    """The tiny HF model ``name`` in float32, eval mode, eager attention, parameters perturbed."""
    import transformers
    cfg = configs()[name]()
    cfg._attn_implementation = "eager"  # SDPA drops Gemma 2's soft-cap
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, S), generator=g)
    labels = ids.clone()
    labels[1, :3] = -100
    return ids, labels


def measure(name: str) -> dict:
    """The largest |logit error| (and loss error) of from_hf, patch and to_hf on family ``name``;
    to_hf is None where no family expresses the config exactly (the error message instead)."""
    from . import HFConversionError, from_hf, patch, to_hf

    ref = tiny_model(name)
    ids, labels = inputs()
    with torch.no_grad():
        want = ref(input_ids=ids, labels=labels)
        model = from_hf(ref)
        got = model(ids, labels=labels)
        row = dict(name=name, model_type=ref.config.model_type,
                   from_hf=float((got.logits - want.logits).abs().max()),
                   from_hf_loss=float((got.loss - want.loss).abs()))
        try:
            back = to_hf(model)
            row["to_hf"] = float((back(input_ids=ids).logits - want.logits).abs().max())
        except HFConversionError as e:
            row["to_hf"], row["to_hf_error"] = None, str(e).splitlines()[0]
        mod = sys.modules[type(ref).__module__]
        saved = getattr(mod, "apply_rotary_pos_emb", None)
        try:
            patch(ref)
            row["patch"] = float((ref(input_ids=ids).logits - want.logits).abs().max())
            row["patch_loss"] = float((ref(input_ids=ids, labels=labels).loss - want.loss).abs())
        finally:  # patch replaces the family's RoPE function process-wide
            if saved is not None:
                mod.apply_rotary_pos_emb = saved
    return row


def coverage_table() -> str:
    rows = [measure(name) for name in configs()]
    lines = ["| family | model_type | from_hf | patch | to_hf | largest error (logits / loss) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        err = max(r["from_hf"], r["patch"], r["to_hf"] or 0.0)
        loss = max(r["from_hf_loss"], r["patch_loss"])
        lines.append(f"| {r['name']} | {r['model_type']} | yes | yes (fused loss) | "
                     f"{'yes' if r['to_hf'] is not None else 'no'} | {err:.1e} / {loss:.1e} |")
    return "\n".join(lines)
