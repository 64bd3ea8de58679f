"""The families beyond Llama's layout and the first three others: Phi, Phi-3, GPT-J, Gemma 3,
Cohere, StableLM, StarCoder2, Granite and OLMo. Each is a config translation both ways, the
state-dict renames, and the splits / merges of fused or per-head weights; every difference
from Llama is a `TransformerConfig` option, none a special case in a forward."""
import torch

from ..models.config import TransformerConfig


def register(fams: dict, api) -> None:
    """Adds the families to ``fams`` (model_type -> _Family); ``api`` is the archext.hf module
    (its shared helpers)."""
    F, E = api._Family, api.HFConversionError
    plain_to_hf = lambda a: api._PLAIN_TO_HF.get(a, a)  # noqa: E731
    gated_to_hf = lambda a: api._GATED_TO_HF.get(a, a)  # noqa: E731

    def none_if_one(x):
        return None if x is None or float(x) == 1.0 else float(x)

    def base(c, head_dim=None):
        """The kwargs every family here shares (sizes, heads, max length)."""
        kw = api._common(c, c.hidden_size, c.num_hidden_layers, c.num_attention_heads)
        kw.update(n_kv_heads=c.num_key_value_heads or c.num_attention_heads, d_ff=c.intermediate_size,
                  max_seq_len=c.max_position_embeddings,
                  head_dim=head_dim or getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        return kw

    def base_to_hf(cfg: TransformerConfig) -> dict:
        return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_width,
                    num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                    num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                    tie_word_embeddings=cfg.tied_embeddings, initializer_range=cfg.init_std)

    def rope_to_hf(cfg, hf: dict) -> dict:
        hf.update(api._rope_to_hf(cfg))
        return hf

    # ---- split / merge helpers ----
    def split_rows(sd, fused: str, names: list, sizes):
        for key in [k for k in sd if fused in k]:
            for name, part in zip(names, sd.pop(key).split(list(sizes), dim=0)):
                sd[key.replace(fused, name)] = part.contiguous()
        return sd

    def merge_rows(sd, fused: str, names: list):
        for key in [k for k in sd if names[0] in k]:
            sd[key.replace(names[0], fused)] = torch.cat([sd.pop(key.replace(names[0], n)) for n in names], dim=0)
        return sd

    # ---------------------------------------------------------------- Phi (phi-1, phi-1.5, phi-2)
    def phi_from(c):
        kw = base(c)
        kw.update(norm="layernorm", norm_eps=float(c.layer_norm_eps), norm_placement="pre", block="parallel",
                  parallel_shared_norm=True, activation=api._activation(c.hidden_act, gated=False), bias=True,
                  lm_head_bias=True, qk_norm="head" if c.qk_layernorm else None)
        kw.update(api._rope(c, default_fraction=0.5))
        return kw

    def phi_to(cfg):
        if cfg.block != "parallel" or not cfg.parallel_shared_norm:
            raise E("Phi is a parallel block with one input norm")
        hf = base_to_hf(cfg)
        hf.update(hidden_act=plain_to_hf(cfg.activation), layer_norm_eps=cfg.norm_eps,
                  qk_layernorm=cfg.qk_norm == "head")
        return rope_to_hf(cfg, hf)

    def phi_renames(cfg):
        L, A = "model.layers.{i}.", "layers.{i}."
        return [("model.embed_tokens.", "embed."), ("model.final_layernorm.", "norm."), ("lm_head.", "lm_head."),
                (L + "self_attn.dense.", A + "attn.o_proj."), (L + "self_attn.q_layernorm.", A + "attn.q_norm."),
                (L + "self_attn.k_layernorm.", A + "attn.k_norm."), (L + "self_attn.", A + "attn."),
                (L + "mlp.fc1.", A + "mlp.up_proj."), (L + "mlp.fc2.", A + "mlp.down_proj."),
                (L + "input_layernorm.", A + "attn_norm.")]

    fams["phi"] = F("PhiForCausalLM", "PhiConfig", phi_from, phi_to, phi_renames)

    # ---------------------------------------------------------------- Phi-3 (fused qkv, gate_up)
    def phi3_from(c):
        kw = base(c)
        kw.update(norm="rmsnorm", norm_eps=float(c.rms_norm_eps), norm_placement="pre",
                  activation=api._activation(c.hidden_act, gated=True), bias=False,
                  sliding_window=c.sliding_window)
        kw.update(api._rope(c))
        return kw

    def phi3_to(cfg):
        if cfg.full_attention_every is not None:
            raise E("Phi-3 windows every layer or none")
        hf = base_to_hf(cfg)
        hf.pop("num_key_value_heads")
        hf.update(num_key_value_heads=cfg.kv_heads, hidden_act=gated_to_hf(cfg.activation),
                  rms_norm_eps=cfg.norm_eps, sliding_window=cfg.sliding_window)
        sc = cfg.rope_scaling
        # Phi-3 keeps the pretraining context outside the RoPE dict, and it takes precedence.
        hf["original_max_position_embeddings"] = (sc.original_max_positions if sc is not None and
                                                  sc.original_max_positions else cfg.max_seq_len)
        return rope_to_hf(cfg, hf)

    def phi3_split(sd, cfg):
        d = cfg.head_size
        split_rows(sd, ".attn.qkv_proj.", [".attn.q_proj.", ".attn.k_proj.", ".attn.v_proj."],
                   (cfg.n_heads * d, cfg.kv_heads * d, cfg.kv_heads * d))
        return split_rows(sd, ".mlp.gate_up_proj.", [".mlp.gate_proj.", ".mlp.up_proj."], (cfg.ffn_width,) * 2)

    def phi3_merge(sd, cfg):
        merge_rows(sd, ".attn.qkv_proj.", [".attn.q_proj.", ".attn.k_proj.", ".attn.v_proj."])
        return merge_rows(sd, ".mlp.gate_up_proj.", [".mlp.gate_proj.", ".mlp.up_proj."])

    fams["phi3"] = F("Phi3ForCausalLM", "Phi3Config", phi3_from, phi3_to, api._llama_renames, phi3_split, phi3_merge)

    # ---------------------------------------------------------------- GPT-J (interleaved partial rotary)
    def gptj_from(c):
        kw = api._common(c, c.n_embd, c.n_layer, c.n_head)
        head = c.n_embd // c.n_head
        rot = c.rotary_dim or head
        fraction = rot / head
        if int(head * fraction) != rot:
            raise E(f"GPT-J rotary_dim={rot} of head_dim={head} is not a fraction archext rounds back")
        kw.update(d_ff=c.n_inner or 4 * c.n_embd, norm="layernorm", norm_eps=float(c.layer_norm_epsilon),
                  norm_placement="pre", block="parallel", parallel_shared_norm=True,
                  activation=api._activation(c.activation_function, gated=False), position="rope",
                  rope_theta=10000.0, rope_interleaved=True, rotary_fraction=fraction,
                  max_seq_len=c.n_positions, bias=False, mlp_bias=True, lm_head_bias=True)
        return kw

    def gptj_to(cfg):
        return dict(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                    n_head=cfg.n_heads, rotary_dim=cfg.rotary_dim, n_inner=cfg.ffn_width,
                    activation_function="gelu_new" if cfg.activation == "gelu_tanh" else cfg.activation,
                    layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tied_embeddings,
                    initializer_range=cfg.init_std)

    def gptj_renames(cfg):
        L, A = "transformer.h.{i}.", "layers.{i}."
        return [("transformer.wte.", "embed."), ("transformer.ln_f.", "norm."), ("lm_head.", "lm_head."),
                (L + "ln_1.", A + "attn_norm."), (L + "attn.out_proj.", A + "attn.o_proj."), (L + "attn.", A + "attn."),
                (L + "mlp.fc_in.", A + "mlp.up_proj."), (L + "mlp.fc_out.", A + "mlp.down_proj.")]

    fams["gptj"] = F("GPTJForCausalLM", "GPTJConfig", gptj_from, gptj_to, gptj_renames, rope_patch=None)

    # ---------------------------------------------------------------- Gemma 3 (text)
    gemma3_from_base, gemma3_to_base = api._llama_like("gemma3_text")

    def gemma3_from(c):
        kw = gemma3_from_base(c)
        kw.update(api._rope(c, layer_type="full_attention"))
        if kw["sliding_window"] is not None:
            local = api._rope_parameters(c, "sliding_attention")
            full = api._rope_parameters(c, "full_attention")
            if local["rope_type"] != "default" and local != full:
                raise E(f"Gemma 3 with a scaled RoPE ({local['rope_type']!r}) on the sliding layers that "
                        f"differs from the global layers' is not supported (local_rope_theta is unscaled)")
            if local != full:
                kw.update(local_rope_theta=float(local["rope_theta"]))
        return kw

    def gemma3_to(cfg):
        hf = gemma3_to_base(cfg)
        full = hf.pop("rope_parameters", None)
        if full is None:  # transformers 4: rope_theta + rope_scaling (global), rope_local_base_freq
            hf["rope_local_base_freq"] = cfg.local_rope_theta or cfg.rope_theta
            if cfg.local_rope_theta is None and cfg.rope_scaling is not None:
                raise E("Gemma 3 in transformers 4 cannot scale the sliding layers' RoPE")
            return hf
        local = ({"rope_type": "default", "rope_theta": cfg.local_rope_theta}
                 if cfg.local_rope_theta is not None else dict(full))
        hf["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
        return hf

    fams["gemma3_text"] = F("Gemma3ForCausalLM", "Gemma3TextConfig", gemma3_from, gemma3_to, api._llama_renames,
                            logits=lambda c: (None, c.final_logit_softcapping))

    # ---------------------------------------------------------------- Cohere (Command R)
    def cohere_from(c):
        kw = base(c, head_dim=c.hidden_size // c.num_attention_heads)
        kw.update(norm="layernorm_nobias", norm_eps=float(c.layer_norm_eps), norm_placement="pre",
                  block="parallel", parallel_shared_norm=True, activation=api._activation(c.hidden_act, gated=True),
                  bias=bool(c.attention_bias), mlp_bias=False, logit_scale=none_if_one(c.logit_scale),
                  qk_norm="each_head" if c.use_qk_norm else None, rope_interleaved=True)
        kw.update(api._rope(c))
        return kw

    def cohere_to(cfg):
        if not cfg.rope_interleaved or cfg.block != "parallel" or not cfg.parallel_shared_norm:
            raise E("Cohere is a parallel block with one input norm and interleaved RoPE")
        hf = base_to_hf(cfg)
        hf.update(hidden_act=gated_to_hf(cfg.activation), layer_norm_eps=cfg.norm_eps, attention_bias=cfg.bias,
                  logit_scale=1.0 if cfg.logit_scale is None else cfg.logit_scale,
                  use_qk_norm=cfg.qk_norm == "each_head")
        return rope_to_hf(cfg, hf)

    fams["cohere"] = F("CohereForCausalLM", "CohereConfig", cohere_from, cohere_to, api._llama_renames,
                       logits=lambda c: (none_if_one(c.logit_scale), None), rope_patch="interleaved")

    # ---------------------------------------------------------------- StableLM
    def stablelm_from(c):
        kw = base(c)
        kw.update(norm="layernorm", norm_eps=float(c.layer_norm_eps), norm_placement="pre",
                  block="parallel" if c.use_parallel_residual else "serial", parallel_shared_norm=True,
                  activation=api._activation(c.hidden_act, gated=True), bias=False,
                  qkv_bias=bool(c.use_qkv_bias), mlp_bias=False, qk_norm="each_head" if c.qk_layernorm else None)
        kw.update(api._rope(c, default_fraction=0.25))
        return kw

    def stablelm_to(cfg):
        if cfg.block == "parallel" and not cfg.parallel_shared_norm:
            raise E("StableLM's parallel block has one input norm")
        hf = base_to_hf(cfg)
        hf.update(hidden_act=gated_to_hf(cfg.activation), layer_norm_eps=cfg.norm_eps,
                  use_qkv_bias=bool(cfg.qkv_bias if cfg.qkv_bias is not None else cfg.bias),
                  qk_layernorm=cfg.qk_norm == "each_head", use_parallel_residual=cfg.block == "parallel")
        return rope_to_hf(cfg, hf)

    def stablelm_split(sd, cfg):
        for qk in "qk":
            keys = sorted((k for k in sd if f".attn.{qk}_layernorm.norms." in k),
                          key=lambda k: (k.split(".norms.")[0], int(k.split(".norms.")[1].split(".")[0])))
            groups = {}
            for k in keys:
                groups.setdefault(k.split(".norms.")[0], []).append(sd.pop(k))
            for prefix, ws in groups.items():
                sd[prefix.replace(f"{qk}_layernorm", f"{qk}_norm") + ".weight"] = torch.stack(ws)
        return sd

    def stablelm_merge(sd, cfg):
        for qk in "qk":
            for key in [k for k in sd if k.endswith(f".attn.{qk}_norm.weight")]:
                w = sd.pop(key)
                prefix = key[: -len(f"{qk}_norm.weight")] + f"{qk}_layernorm.norms."
                for h in range(w.shape[0]):
                    sd[f"{prefix}{h}.weight"] = w[h].clone()
        return sd

    fams["stablelm"] = F("StableLmForCausalLM", "StableLmConfig", stablelm_from, stablelm_to, api._llama_renames,
                         stablelm_split, stablelm_merge)

    # ---------------------------------------------------------------- StarCoder2
    def starcoder2_from(c):
        kw = base(c)
        kw.update(norm="layernorm", norm_eps=float(c.norm_epsilon), norm_placement="pre",
                  activation=api._activation(c.hidden_act, gated=False), bias=bool(c.use_bias),
                  sliding_window=c.sliding_window)
        kw.update(api._rope(c))
        return kw

    def starcoder2_to(cfg):
        if cfg.full_attention_every is not None:
            raise E("StarCoder2 windows every layer or none")
        hf = base_to_hf(cfg)
        hf.update(hidden_act=plain_to_hf(cfg.activation), norm_epsilon=cfg.norm_eps, use_bias=cfg.bias,
                  sliding_window=cfg.sliding_window)
        return rope_to_hf(cfg, hf)

    def starcoder2_renames(cfg):
        L, A = "model.layers.{i}.", "layers.{i}."
        return [(L + "mlp.c_fc.", A + "mlp.up_proj."), (L + "mlp.c_proj.", A + "mlp.down_proj.")] + \
            api._llama_renames(cfg)

    fams["starcoder2"] = F("Starcoder2ForCausalLM", "Starcoder2Config", starcoder2_from, starcoder2_to,
                           starcoder2_renames)

    # ---------------------------------------------------------------- Granite (multipliers)
    granite_from_base, granite_to_base = api._llama_like("llama")

    def granite_from(c):
        kw = granite_from_base(c)
        kw.update(embedding_scale=none_if_one(c.embedding_multiplier), residual_scale=none_if_one(c.residual_multiplier),
                  attn_scale=float(c.attention_multiplier), logit_scale=none_if_one(1.0 / c.logits_scaling))
        return kw

    def granite_to(cfg):
        hf = granite_to_base(cfg)
        hf.update(embedding_multiplier=cfg.embedding_scale or 1.0, residual_multiplier=cfg.residual_scale or 1.0,
                  attention_multiplier=cfg.head_size ** -0.5 if cfg.attn_scale is None else cfg.attn_scale,
                  logits_scaling=1.0 / (cfg.logit_scale or 1.0))
        return hf

    fams["granite"] = F("GraniteForCausalLM", "GraniteConfig", granite_from, granite_to, api._llama_renames,
                        logits=lambda c: (none_if_one(1.0 / c.logits_scaling), None))

    # ---------------------------------------------------------------- OLMo (non-parametric LayerNorm)
    olmo_from_base, olmo_to_base = api._llama_like("llama")

    def olmo_from(c):
        if c.clip_qkv is not None:
            raise E(f"OLMo with clip_qkv={c.clip_qkv} (q, k, v clamped) is not supported: archext has no "
                    f"q/k/v clipping")
        kw = base(c)
        kw.update(norm="layernorm_noaffine", norm_eps=1e-5,  # OlmoLayerNorm's fixed epsilon
                  norm_placement="pre", activation=api._activation(c.hidden_act, gated=True),
                  bias=bool(c.attention_bias), mlp_bias=False)
        kw.update(api._rope(c))
        return kw

    def olmo_to(cfg):
        if cfg.norm_eps != 1e-5:
            raise E("OLMo's LayerNorm epsilon is fixed at 1e-5")
        hf = base_to_hf(cfg)
        hf.update(hidden_act=gated_to_hf(cfg.activation), attention_bias=cfg.bias)
        return rope_to_hf(cfg, hf)

    fams["olmo"] = F("OlmoForCausalLM", "OlmoConfig", olmo_from, olmo_to, api._llama_renames)
