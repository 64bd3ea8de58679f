"""archext.models: config validation, presets, blocks, loss, init, parameter groups, report, compile."""
import dataclasses
import io
import json
import math
import re
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F

from archext.models import (PRESETS, BlockType, ConfigError, TransformerConfig, build, param_groups,
                            preset, report)
from archext.models.__main__ import main as cli_main

TINY = dict(vocab_size=97, d_model=32, n_heads=4, n_layers=2, max_seq_len=64)


def tiny(name: str, **kw) -> TransformerConfig:
    extra = {"sliding_window": 5} if name in ("gemma2", "mistral") else {}
    if name in ("mistral",):
        extra["n_kv_heads"] = 2
    return preset(name, **{**TINY, **extra, **kw})


def ids(b=2, s=12, v=97):
    return torch.randint(0, v, (b, s))


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
INVALID = [
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(d_model=32.0), "d_model must be a positive int"),
    (dict(n_layers=-1), "n_layers must be a positive int"),
    (dict(n_heads=True), "n_heads must be a positive int"),
    (dict(ffn_multiple_of=0), "ffn_multiple_of must be a positive int"),
    (dict(max_seq_len=0), "max_seq_len must be a positive int"),
    (dict(t5_num_buckets=0), "t5_num_buckets must be a positive int"),
    (dict(t5_max_distance=0), "t5_max_distance must be a positive int"),
    (dict(n_kv_heads=0), "n_kv_heads must be None or a positive int"),
    (dict(head_dim=0), "head_dim must be None or a positive int"),
    (dict(d_ff=-4), "d_ff must be None or a positive int"),
    (dict(sliding_window=0), "sliding_window must be None or a positive int"),
    (dict(full_attention_every=0), "full_attention_every must be None or a positive int"),
    (dict(norm="batchnorm"), "norm='batchnorm' is unknown; choose one of 'rmsnorm'"),
    (dict(norm_placement="sandwich"), "norm_placement='sandwich' is unknown; choose one of 'pre'"),
    (dict(block="moe"), "block='moe' is unknown; choose one of 'serial', 'parallel'"),
    (dict(position="xpos"), "position='xpos' is unknown; choose one of 'rope'"),
    (dict(activation="gelu_new"), "activation='gelu_new' is unknown; choose one of 'relu'"),
    (dict(qk_norm="layer"), "qk_norm='layer' is unknown; choose None or one of 'head', 'proj'"),
    (dict(n_kv_heads=3), r"n_heads=4 must be a multiple of n_kv_heads=3; pick n_kv_heads among"),
    (dict(d_model=30), r"d_model=30 is not divisible by n_heads=4; change one, or set head_dim"),
    (dict(block="parallel", norm_placement="post"),
     r"block='parallel' .* supports norm_placement='pre' only, got 'post'; use block='serial'"),
    (dict(qk_norm="head", norm="layernorm_noaffine"), r"qk_norm='head' with norm='layernorm_noaffine' is not supported"),
    (dict(qk_norm="each_head", norm="gemma_rmsnorm"), r"qk_norm='each_head' stores plain weights"),
    (dict(residual_scale=0.5, norm_placement="post"), r"residual_scale applies to norm_placement='pre'"),
    (dict(logit_scale=0.0), "logit_scale must be None or a finite number > 0"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling: RopeScaling: rope_type='yarn' needs original_max_positions"),
    (dict(rope_scaling={"rope_type": "ntk"}), r"rope_scaling: RopeScaling: rope_type='ntk' is unknown"),
    (dict(rope_scaling={"rope_type": "linear", "factr": 2.0}), r"unknown field\(s\) \['factr'\]"),
    (dict(rope_scaling={"rope_type": "longrope", "original_max_positions": 16, "short_factor": [1.0] * 3,
                        "long_factor": [2.0] * 3}), r"longrope has 3 factors per table; the rotary dim 8 needs 4"),
    (dict(local_rope_theta=10000.0), r"local_rope_theta is the RoPE base of the sliding-window layers"),
    (dict(rotary_fraction=0.0), r"rotary_fraction must be in \(0, 1\]"),
    (dict(rotary_fraction=1.5), r"rotary_fraction must be in \(0, 1\]"),
    (dict(rotary_fraction=0.1), r"rotary_fraction=0.1 of head_dim=8 gives 0 rotating dims \(int\(head_dim"),
    (dict(rotary_fraction=0.375), r"rotary_fraction=0.375 of head_dim=8 gives 3 rotating dims .* must be even"),
    (dict(rope_theta=0.0), "rope_theta must be > 0"),
    (dict(position="sinusoidal", d_model=35, n_heads=5), "position='sinusoidal' needs an even d_model"),
    (dict(position="learned", learned_pos_offset=-1), "learned_pos_offset must be >= 0"),
    (dict(norm_eps=0.0), "norm_eps must be > 0"),
    (dict(attn_scale=-1.0), "attn_scale must be None or a finite number > 0"),
    (dict(attn_softcap=0.0), "attn_softcap must be None or a finite number > 0"),
    (dict(final_softcap=float("inf")), "final_softcap must be None or a finite number > 0"),
    (dict(embedding_scale="sqrt"), "embedding_scale must be None or a finite number > 0"),
    (dict(z_loss_coef=-1e-4), "z_loss_coef must be >= 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(init_std=0.0), "init_std must be > 0"),
]


@pytest.mark.parametrize("kwargs,message", INVALID, ids=[re.sub(r"\W+", "-", str(k)) for k, _ in INVALID])
def test_invalid_config_raises_named_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TransformerConfig(**{**TINY, "d_model": 32, **kwargs})


def test_config_error_is_value_error_and_replace_validates():
    cfg = TransformerConfig(**TINY)
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match="n_kv_heads=3"):
        dataclasses.replace(cfg, n_kv_heads=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 64  # variants go through replace, which validates


def test_unknown_preset_and_unknown_field():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'; choose one of 'llama'"):
        preset("gpt5")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['d_modle'\]"):
        TransformerConfig.from_dict({"d_modle": 64})


def test_options_of_a_feature_that_is_off_are_ignored():
    # A preset's variant switches a feature off with one replace.
    neox = tiny("gpt_neox")
    assert dataclasses.replace(neox, position="alibi").position == "alibi"  # rotary_fraction stays
    assert dataclasses.replace(neox, block="serial").block_type == BlockType.PRE
    g = tiny("gemma2")
    assert [dataclasses.replace(g, sliding_window=None).layer_window(i) for i in range(2)] == [None, None]


def test_json_roundtrip_and_derived_values():
    cfg = tiny("gemma2", n_kv_heads=2, head_dim=16)
    assert TransformerConfig.from_json(cfg.to_json()) == cfg
    assert (cfg.kv_heads, cfg.head_size, cfg.gated, cfg.kernel_activation) == (2, 16, True, "gelu_tanh")
    assert [cfg.layer_window(i) for i in range(4)] == [5, None, 5, None]
    c = TransformerConfig(**TINY)
    assert c.ffn_width == 128 and c.rotary_dim == 8  # 8/3 * 32 = 85 -> 128 (multiple of 64)
    assert dataclasses.replace(c, activation="gelu").ffn_width == 128  # 4 * 32
    assert dataclasses.replace(c, d_ff=40).ffn_width == 40


def test_block_types_of_presets():
    kinds = {name: tiny(name).block_type for name in PRESETS}
    assert kinds["llama"] == BlockType.PRE and kinds["gemma2"] == BlockType.DOUBLE
    assert kinds["olmo2"] == BlockType.REORDERED and kinds["gpt_neox"] == BlockType.PARALLEL
    assert kinds["opt_post_norm"] == BlockType.POST and kinds["gpt2"] == BlockType.PRE
    m = build(tiny("opt_post_norm"))
    assert m.norm is None  # post-norm ends on a norm already
    assert set(dict(m.layers[0].named_children())) >= {"attn", "mlp", "attn_norm", "mlp_norm"}
    assert {"attn_post_norm", "mlp_post_norm"} <= set(dict(build(tiny("olmo2")).layers[0].named_children()))
    assert not hasattr(build(tiny("olmo2")).layers[0], "attn_norm")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
VARIANTS = {
    **{name: None for name in PRESETS},
    "sinusoidal": dict(position="sinusoidal"),
    "alibi": dict(position="alibi", attn_softcap=20.0),
    "t5": dict(position="t5", qk_norm="proj"),
    "nopos_gqa_interleaved": dict(position="none", n_kv_heads=1),
    "rope_interleaved_partial": dict(rope_interleaved=True, rotary_fraction=0.5, qk_norm="head"),
    "parallel_shared_reglu": dict(block="parallel", activation="reglu", norm="layernorm_nobias"),
    "double_geglu_zloss": dict(norm_placement="double", activation="geglu", z_loss_coef=1e-3),
    "post_silu_bias_tied": dict(norm_placement="post", activation="silu", bias=True, tied_embeddings=True),
}


def variant(name) -> TransformerConfig:
    return tiny(name) if VARIANTS[name] is None else TransformerConfig(**TINY, **VARIANTS[name])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_backward(name):
    cfg = variant(name)
    model = build(cfg)
    x = ids()
    out = model(x, labels=x)
    assert out.logits.shape == (2, 12, cfg.vocab_size) and out.logits.dtype == torch.float32
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if "rel_bias" not in pname:  # T5 buckets beyond the sequence get no gradient
            assert p.grad.abs().sum() > 0, pname
    assert model(x).loss is None


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    cfg = TransformerConfig(**TINY)
    model = build(cfg)
    x = ids()
    labels = x.clone()
    labels[0, 3:6] = -100
    out = model(x, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    assert out.z_loss.item() == 0.0


def test_final_softcap_and_z_loss():
    cfg = TransformerConfig(**TINY, final_softcap=2.0, z_loss_coef=1e-2)
    model = build(cfg)
    x = ids()
    out = model(x, labels=x)
    assert out.logits.abs().max() < 2.0
    raw = model.lm_head(model.norm(_hidden(model, x))[0])
    torch.testing.assert_close(out.logits, 2.0 * torch.tanh(raw / 2.0), rtol=1e-6, atol=1e-6)
    lse = torch.logsumexp(out.logits[:, :-1], -1)
    z = 1e-2 * (lse ** 2).mean()
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.z_loss, z, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, ce + z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_fused_head_and_loss_without_logits(name):
    # return_logits=False runs the LM head and the loss as one chunked linear cross-entropy:
    # the same loss (soft-cap and z-loss included where the preset has them, tied weights in
    # gemma2 and gpt2) and the same gradients for every parameter, and no logits.
    model = build(tiny(name, z_loss_coef=1e-3)).double()
    x = ids()
    labels = x.clone()
    labels[1, 2:5] = -100
    full = model(x, labels=labels)
    grads = torch.autograd.grad(full.loss, list(model.parameters()), allow_unused=True)
    fused = model(x, labels=labels, return_logits=False)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, full.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.z_loss, full.z_loss, rtol=1e-10, atol=1e-12)
    fused_grads = torch.autograd.grad(fused.loss, list(model.parameters()), allow_unused=True)
    for (pname, _), g, f in zip(model.named_parameters(), grads, fused_grads):
        assert (g is None) == (f is None), pname
        if g is not None:
            torch.testing.assert_close(f, g, rtol=1e-9, atol=1e-12, msg=pname)


def _hidden(model, x):
    h = model.embed(x)
    for layer in model.layers:
        h = layer(h)
    return h


def test_embedding_scale_and_position_ids():
    cfg = TransformerConfig(**TINY, embedding_scale=3.0)
    model = build(cfg)
    x = ids(1, 10)
    out = model(x).logits
    torch.testing.assert_close(model(x, position_ids=torch.arange(10)[None]).logits, out)
    # RoPE is relative: a shift of every position changes nothing, a gap does.
    torch.testing.assert_close(model(x, position_ids=torch.arange(5, 15)[None]).logits, out,
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(model(x, position_ids=2 * torch.arange(10)[None]).logits, out)
    model.config = dataclasses.replace(cfg, embedding_scale=None)
    assert not torch.allclose(model(x).logits, out)


def test_sequence_longer_than_position_table():
    for position in ("rope", "learned", "sinusoidal"):
        model = build(TransformerConfig(**{**TINY, "max_seq_len": 8}, position=position))
        with pytest.raises(ValueError, match="sequence length 9 exceeds max_seq_len=8"):
            model(ids(1, 9))
    build(TransformerConfig(**{**TINY, "max_seq_len": 8}, position="alibi"))(ids(1, 9))  # no table


def test_sliding_window_changes_only_far_context():
    cfg = TransformerConfig(**TINY, sliding_window=4)
    model = build(cfg).eval()
    x = ids(1, 12)
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % 97
    # Window 4, two layers: token 0 reaches positions <= 3 after one layer, <= 6 after two.
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[0, 7:], b[0, 7:])
    assert not torch.allclose(a[0, :4], b[0, :4])


def test_dropout_only_in_training():
    model = build(TransformerConfig(**TINY, dropout=0.5))
    x = ids()
    model.eval()
    torch.testing.assert_close(model(x).logits, model(x).logits)
    model.train()
    assert not torch.allclose(model(x).logits, model(x).logits)


def test_bfloat16_model():
    model = build(tiny("gemma2"), dtype=torch.bfloat16)
    x = ids()
    out = model(x, labels=x)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------
# Init, parameter groups, counts
# ---------------------------------------------------------------------------------------------
def test_init_weights():
    cfg = TransformerConfig(**{**TINY, "d_model": 256, "n_heads": 4}, bias=True, init_std=0.05)
    model = build(cfg, init=False)
    torch.manual_seed(0)
    model.init_weights()
    w = model.layers[0].attn.q_proj.weight
    assert abs(w.std().item() - 0.05) < 0.005
    o = model.layers[0].attn.o_proj.weight
    assert abs(o.std().item() - 0.05 / math.sqrt(4)) < 0.003
    assert abs(model.layers[1].mlp.down_proj.weight.std().item() - 0.025) < 0.003
    assert (model.layers[0].attn.q_proj.bias == 0).all()
    assert (model.layers[0].attn_norm.weight == 1).all()
    g = build(tiny("gemma2"))
    assert (g.layers[0].attn_norm.weight == 0).all() and (g.norm.weight == 0).all()  # (1 + w)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    model.init_weights()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)


def test_param_groups():
    for name in ("gpt2", "llama", "gemma2", "gpt_neox"):
        model = build(tiny(name))
        groups = param_groups(model, weight_decay=0.1)
        decay, no_decay = groups
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        ids_d, ids_n = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
        assert not ids_d & ids_n and ids_d | ids_n == {id(p) for p in model.parameters()}
        names = {id(p): n for n, p in model.named_parameters()}
        for p in decay["params"]:
            n = names[id(p)]
            assert p.ndim == 2 and "norm" not in n and "embed" not in n, n
        assert id(model.embed.weight) in ids_n
        if model.config.tied_embeddings:
            assert model.lm_head.weight is model.embed.weight
        else:
            assert id(model.lm_head.weight) in ids_d
        torch.optim.AdamW(groups, lr=1e-3).step()


def test_num_parameters_and_flops():
    cfg = TransformerConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4, d_ff=96, max_seq_len=32)
    model = build(cfg)
    per_layer = 4 * 64 * 64 + 3 * 64 * 96 + 2 * 64  # q k v o, gate up down, two norms
    n = 100 * 64 * 2 + 2 * per_layer + 64
    assert model.num_parameters() == n == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(exclude_embeddings=True) == n - 100 * 64
    tied = build(dataclasses.replace(cfg, tied_embeddings=True))
    assert tied.num_parameters() == n - 100 * 64
    n_matmul = 2 * (4 * 64 * 64 + 3 * 64 * 96) + 100 * 64
    assert model.flops_per_token(32, training=False) == 2 * n_matmul + 2 * 4 * 4 * 16 * 32
    assert model.flops_per_token(32) == 3 * model.flops_per_token(32, training=False)
    assert tied.flops_per_token(32) == model.flops_per_token(32)  # the tied head still multiplies
    windowed = build(dataclasses.replace(cfg, sliding_window=8, full_attention_every=2))
    assert windowed.flops_per_token(32, False) == 2 * n_matmul + 4 * 4 * 16 * (8 + 32)
    meta = build(cfg, device="meta")
    assert meta.num_parameters() == n and meta.flops_per_token(32) == model.flops_per_token(32)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def test_report_states_values_consensus_and_warnings():
    llama7b = TransformerConfig.llama(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                                      ffn_multiple_of=256, max_seq_len=4096)
    text = report(llama7b)
    assert "6,738,415,616" in text  # Llama 2 7B, exactly (built on the meta device)
    assert "WARNING" not in text
    assert re.search(r"d_ff / d_model\s+2\.69\s+consensus 2\.67 \(gated MLP\)", text)
    assert re.search(r"d_model / n_layers\s+128", text)
    assert "monolingual range" in text and "FLOPs per token (seq 4096)" in text
    off = dataclasses.replace(llama7b, d_ff=4096 * 8, n_layers=2, vocab_size=300_000,
                              head_dim=512, activation="gelu", norm_placement="post", dropout=0.1)
    text = report(off)
    assert text.count("WARNING") == 4
    for needle in ("d_ff=32768 is 2.00x the plain-MLP consensus", "n_heads * head_dim = 16384",
                   "wide and shallow", "above the multilingual range", "[differs]"):
        assert needle in text, needle


def test_report_cli(tmp_path):
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli_main(["--report", "gemma2", "--set", "d_model=256", "--seq-len", "128"]) == 0
    assert "FLOPs per token (seq 128)" in buf.getvalue() and "attn_softcap=50.0" in buf.getvalue()
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"preset": "gpt2", "vocab_size": 50257}))
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli_main(["--report", str(path)]) == 0
    assert "vocab_size" in buf.getvalue() and "learned" in buf.getvalue()
    assert cli_main(["--report", '{"n_kv_heads": 3}']) == 2


# ---------------------------------------------------------------------------------------------
# torch.compile: every preset, fullgraph (no graph break from archext ops), forward + backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS) + ["alibi", "t5"])
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    cfg = variant(name) if name in PRESETS else TransformerConfig(**{**TINY, "n_layers": 1}, **VARIANTS[name])
    if name in PRESETS and name != "gemma2":
        cfg = dataclasses.replace(cfg, n_layers=1)
    model = build(cfg)
    x = ids()
    ref = model(x, labels=x)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # Inductor for the most involved preset; AOT eager (the same Dynamo graph capture and AOT
    # backward, without code generation) for the rest, to keep the suite fast on 2 cores.
    backend = "inductor" if name == "gemma2" else "aot_eager"
    out = torch.compile(model, fullgraph=True, backend=backend)(x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_family_options_build_and_the_fused_head_matches():
    """The options from_hf needs for Phi, Cohere, Granite, OLMo, StableLM, Gemma 3: each changes
    the output, and the fused head + loss (return_logits=False) agrees with the plain one."""
    base = TransformerConfig.llama(**TINY, sliding_window=4, full_attention_every=2)
    x = ids(s=10)
    variants = [dict(logit_scale=0.5, lm_head_bias=True), dict(residual_scale=0.5), dict(norm="layernorm_noaffine"),
                dict(norm="layernorm", qk_norm="each_head"), dict(local_rope_theta=100.0),
                dict(rope_scaling={"rope_type": "linear", "factor": 4.0})]
    torch.manual_seed(0)
    ref = build(base).eval()
    with torch.no_grad():
        want = ref(x).logits
    for change in variants:
        m = build(dataclasses.replace(base, **change)).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
            common = {k: v for k, v in ref.state_dict().items() if k in m.state_dict()
                      and m.state_dict()[k].shape == v.shape and "norm" not in k and "lm_head.bias" not in k}
            m.load_state_dict(common, strict=False)
            out = m(x, labels=x)
            fused = m(x, labels=x, return_logits=False)
        assert not torch.allclose(out.logits, want, atol=1e-3), change
        torch.testing.assert_close(fused.loss, out.loss, rtol=1e-5, atol=1e-5, msg=str(change))
