"""Scaled RoPE (linear, dynamic, yarn, llama3, longrope) against transformers' own rotary
embedding: the cos/sin tables to float32 rounding at positions beyond the original context, and
whole models through from_hf / to_hf / patch."""
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from archext import hf as ahf  # noqa: E402
from archext.models import TransformerConfig, build  # noqa: E402
from archext.nn import RotaryEmbedding  # noqa: E402
from archext.ops.rope import RopeScaling, rope_cache  # noqa: E402

HF5 = int(transformers.__version__.split(".")[0]) >= 5
HEAD, L0, MAX = 16, 16, 64  # head_dim, original context, max_position_embeddings
LONG = [1.0 + 0.37 * i for i in range(HEAD // 2)]
SHORT = [1.0 + 0.05 * i for i in range(HEAD // 2)]

# Each scaling as transformers 5 writes it (rope_theta added below). For dynamic,
# max_position_embeddings is where scaling starts, so the test config sets it to L0.
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L0},
    "yarn_deepseek": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L0,
                      "mscale": 0.8, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": L0,
                              "attention_factor": 1.3, "truncate": False},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": L0},
    "longrope": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                 "original_max_position_embeddings": L0},
}


def rope_kwargs(scaling: dict, theta: float = 1000.0) -> dict:
    """transformers 5's rope_parameters, or 4's rope_theta + rope_scaling."""
    if HF5:
        return {"rope_parameters": {**scaling, "rope_theta": theta}}
    return {"rope_theta": theta, "rope_scaling": dict(scaling)}


def llama_config(name: str, **kw):
    max_pos = L0 if name == "dynamic" else MAX
    return transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_pos, initializer_range=0.1,
        **rope_kwargs(SCALINGS[name]), **kw)


def hf_tables(config, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos/sin [seq_len, R/2] for positions 0..seq_len-1 (a fresh rotary module:
    dynamic and longrope keep state between calls)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    rot = LlamaRotaryEmbedding(config)
    pos = torch.arange(seq_len)[None]
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    r = cos.shape[-1] // 2
    return cos[0, :, :r], sin[0, :, :r]


def f32_tol(seq_len: int) -> float:
    # transformers computes the angles in float32: position p carries an error of a few ulp of p.
    return 4 * seq_len * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("seq_len", [L0 - 4, 3 * L0])  # within, and beyond, the original context
def test_tables_match_transformers(name, seq_len):
    hf_cfg = llama_config(name)
    cfg = ahf.config_from_hf(hf_cfg)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == SCALINGS[name]["rope_type"]
    rope = RotaryEmbedding(cfg.head_size, theta=cfg.rope_theta, max_positions=cfg.max_seq_len,
                           scaling=cfg.rope_scaling)
    cos, sin = rope.tables(seq_len)
    want_cos, want_sin = hf_tables(hf_cfg, seq_len)
    tol = f32_tol(seq_len)
    torch.testing.assert_close(cos[:seq_len], want_cos, rtol=0, atol=tol)
    torch.testing.assert_close(sin[:seq_len], want_sin, rtol=0, atol=tol)
    plain_cos, _ = rope_cache(cfg.rotary_dim, seq_len, cfg.rope_theta)
    scaled = name != "dynamic" or seq_len > L0
    assert (cos[:seq_len] - plain_cos).abs().max() > (1e-3 if scaled else -1), "the scaling is exercised"
    if not scaled:
        torch.testing.assert_close(cos[:seq_len], plain_cos, rtol=0, atol=0)


def test_attention_factor_is_folded_into_the_tables():
    sc = RopeScaling("yarn", factor=4.0, original_max_positions=L0)
    cos, sin = rope_cache(HEAD, 8, 1000.0, scaling=sc)
    mscale = 0.1 * torch.log(torch.tensor(4.0, dtype=torch.float64)) + 1
    torch.testing.assert_close((cos.double() ** 2 + sin.double() ** 2).sqrt(),
                               mscale.expand(8, HEAD // 2), rtol=1e-6, atol=0)
    lr = RopeScaling("longrope", factor=4.0, original_max_positions=L0, short_factor=SHORT, long_factor=LONG)
    c_short, _ = rope_cache(HEAD, 8, 1000.0, scaling=lr, seq_len=L0)
    c_long, _ = rope_cache(HEAD, 8, 1000.0, scaling=lr, seq_len=L0 + 1)
    assert not torch.allclose(c_short, c_long)


def test_transformers_4_fields_are_read():
    """transformers 4 keeps rope_theta and rope_scaling apart (and Phi-3's
    original_max_position_embeddings outside rope_scaling; 'su' is longrope's old name)."""
    v4 = types.SimpleNamespace(rope_theta=5e5, max_position_embeddings=MAX, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": L0})
    kw = ahf._rope(v4)
    assert kw["rope_theta"] == 5e5 and kw["rope_scaling"] == RopeScaling(
        "llama3", factor=8.0, original_max_positions=L0, low_freq_factor=1.0, high_freq_factor=4.0)
    phi3 = types.SimpleNamespace(rope_theta=1e4, max_position_embeddings=MAX, original_max_position_embeddings=L0,
                                 rope_scaling={"type": "su", "short_factor": SHORT, "long_factor": LONG})
    sc = ahf._rope(phi3)["rope_scaling"]
    assert (sc.rope_type, sc.factor, sc.original_max_positions) == ("longrope", MAX / L0, L0)
    dyn = types.SimpleNamespace(rope_theta=1e4, max_position_embeddings=L0,
                                rope_scaling={"type": "dynamic", "factor": 2.0})
    kw = ahf._rope(dyn)
    assert kw["rope_scaling"].original_max_positions == L0 and kw["max_seq_len"] == 2 * L0


def hf_model(config):
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(SCALINGS))
def test_from_hf_to_hf_and_patch_with_scaled_rope(name, monkeypatch):
    ref = hf_model(llama_config(name))
    ids = torch.randint(0, 101, (2, 3 * L0))  # beyond the original context
    labels = ids.clone()
    with torch.no_grad():
        want = ref(input_ids=ids, labels=labels)
    model = ahf.from_hf(ref)
    with torch.no_grad():
        got = model(ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-4)
    back = ahf.to_hf(model)
    assert back.config.rope_parameters["rope_type"] == SCALINGS[name]["rope_type"] if HF5 else True
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want.logits, rtol=1e-5, atol=1e-5)
    mod = sys.modules[type(ref).__module__]
    monkeypatch.setattr(mod, "apply_rotary_pos_emb", mod.apply_rotary_pos_emb)
    ahf.patch(ref)
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, want.logits, rtol=1e-4, atol=1e-4)


def test_dynamic_depends_on_the_call_length():
    """Dynamic NTK: a prefix of a long call is rotated with the long call's base, not the one
    for its own length (as transformers recomputes from the largest position)."""
    cfg = ahf.config_from_hf(llama_config("dynamic"))
    model = build(cfg).eval()
    ids = torch.randint(0, 101, (1, 3 * L0))
    with torch.no_grad():
        long = model(ids).logits
        short = model(ids[:, : 2 * L0]).logits
        by_ids = model(ids[:, : 2 * L0], position_ids=torch.arange(2 * L0)[None]).logits
    assert not torch.allclose(long[:, : 2 * L0], short, atol=1e-4)
    torch.testing.assert_close(by_ids, short, rtol=0, atol=0)


def test_config_json_round_trip_and_validation():
    cfg = TransformerConfig.llama(rope_scaling={"rope_type": "longrope", "original_max_positions": 16,
                                                "factor": 4.0, "short_factor": [1.0] * 16,
                                                "long_factor": [2.0] * 16})
    assert isinstance(cfg.rope_scaling, RopeScaling)
    assert TransformerConfig.from_json(cfg.to_json()) == cfg
    assert TransformerConfig.llama(rope_scaling={"rope_type": "default"}).rope_scaling is None
