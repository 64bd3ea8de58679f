"""Every family of archext.hf.coverage (tiny random transformers models, every parameter
perturbed): from_hf logits and loss, patch (fused loss) loss and gradients, to_hf state dict
and logits, in float32."""
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from archext import hf as ahf  # noqa: E402
from archext.hf import coverage  # noqa: E402

NAMES = list(coverage.configs())


@pytest.fixture
def restore_rope():
    """patch() replaces a family's apply_rotary_pos_emb process-wide: put HF's back."""
    saved = {}

    def keep(model):
        mod = sys.modules[type(model).__module__]
        if hasattr(mod, "apply_rotary_pos_emb"):
            saved[mod] = mod.apply_rotary_pos_emb

    yield keep
    for mod, fn in saved.items():
        mod.apply_rotary_pos_emb = fn


@pytest.mark.parametrize("name", NAMES)
def test_from_hf_and_to_hf(name):
    ref = coverage.tiny_model(name)
    ids, labels = coverage.inputs()
    with torch.no_grad():
        want = ref(input_ids=ids, labels=labels)
        model = ahf.from_hf(ref)
        got = model(ids, labels=labels)
    assert want.logits.abs().max() > 0.3  # not a trivially small output
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-4)
    back = ahf.to_hf(model, ref.config.model_type)  # (without a type: the first family that fits)
    assert type(back) is type(ref)
    sd_want, sd_got = ref.state_dict(), back.state_dict()
    assert set(sd_got) == set(sd_want)
    for k in sd_want:
        torch.testing.assert_close(sd_got[k], sd_want[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_patch_fused_loss_and_gradients(name, restore_rope):
    ref = coverage.tiny_model(name)
    restore_rope(ref)
    ids, labels = coverage.inputs()
    want = ref(input_ids=ids, labels=labels)
    want.loss.backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref.zero_grad()
    done = ahf.patch(ref, loss_chunk_size=5)
    assert done["fused_loss"] == 1 and done["loss"] == 1
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, want.logits, rtol=1e-4, atol=1e-4)
    got = ref(input_ids=ids, labels=labels)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-4)
    got.loss.backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_family_features_are_exercised():
    """The options each family needs come through (so the parity above tests them)."""
    cfg = {n: ahf.config_from_hf(coverage.configs()[n]()) for n in NAMES}
    assert (cfg["phi"].block, cfg["phi"].lm_head_bias, cfg["phi"].rotary_dim, cfg["phi"].qk_norm) == \
        ("parallel", True, 8, "head")
    assert cfg["phi3"].rope_scaling.rope_type == "longrope" and cfg["phi3"].sliding_window == 5
    assert (cfg["gptj"].rope_interleaved, cfg["gptj"].rotary_dim, cfg["gptj"].lm_head_bias) == (True, 8, True)
    g3 = cfg["gemma3"]
    assert (g3.local_rope_theta, g3.rope_theta, g3.rope_scaling.rope_type, g3.full_attention_every,
            g3.qk_norm) == (1e4, 1e6, "linear", 3, "head")
    assert (cfg["cohere"].norm, cfg["cohere"].logit_scale, cfg["cohere"].qk_norm, cfg["cohere"].rope_interleaved) == \
        ("layernorm_nobias", 0.25, "each_head", True)
    assert (cfg["stablelm"].qk_norm, cfg["stablelm"].qkv_bias, cfg["stablelm_parallel"].block) == \
        ("each_head", True, "parallel")
    assert (cfg["starcoder2"].norm, cfg["starcoder2"].activation, cfg["starcoder2"].bias) == \
        ("layernorm", "gelu_tanh", True)
    gr = cfg["granite"]
    assert (gr.embedding_scale, gr.residual_scale, gr.attn_scale, gr.logit_scale) == (3.0, 0.5, 0.2, 0.25)
    assert cfg["olmo"].norm == "layernorm_noaffine"
    assert cfg["qwen2_sliding"].sliding_window == 5 and cfg["qwen2_sliding"].rope_scaling.rope_type == "yarn"


def test_what_cannot_be_expressed_raises():
    o = coverage.configs()["olmo"]()
    o.clip_qkv = 8.0
    with pytest.raises(ahf.HFConversionError, match="clip_qkv=8.0 .* archext has no q/k/v clipping"):
        ahf.config_from_hf(o)
    q = transformers.Qwen2Config(**coverage.SIZES, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    with pytest.raises(ahf.HFConversionError, match="is not 'every k-th layer global'"):
        ahf.config_from_hf(q)
