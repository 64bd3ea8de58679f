"""Hugging Face parity: from_hf / to_hf / patch against tiny random transformers models (no
downloads), float32, eager attention, eval mode, every parameter perturbed."""
import dataclasses
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from archext import hf as ahf  # noqa: E402
from archext.models import TransformerConfig, build  # noqa: E402

V, S = 101, 12  # vocab; sequence longer than the sliding windows below (5)
HF5 = int(transformers.__version__.split(".")[0]) >= 5


def rope(theta=10000.0, fraction=None, neox=False):
    """RoPE config kwargs: transformers 5's rope_parameters, or 4's separate fields."""
    if HF5:
        rp = {"rope_type": "default", "rope_theta": theta}
        if fraction is not None:
            rp["partial_rotary_factor"] = fraction
        return {"rope_parameters": rp}
    if neox:
        return {"rotary_emb_base": theta, "rotary_pct": fraction}
    return {"rope_theta": theta}


SIZES = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, initializer_range=0.1)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **SIZES, intermediate_size=96, num_key_value_heads=2, rms_norm_eps=1e-5, attention_bias=True,
        **rope(500000.0)),
    "gemma2": lambda: transformers.Gemma2Config(
        **{**SIZES, "num_hidden_layers": 3}, intermediate_size=96, num_key_value_heads=2, head_dim=24,
        query_pre_attn_scalar=20, sliding_window=5, attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0, **rope()),
    "olmo2": lambda: transformers.Olmo2Config(
        **SIZES, intermediate_size=96, num_key_value_heads=2, **rope()),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **SIZES, intermediate_size=128, hidden_act="gelu",
        **rope(fraction=0.25, neox=True)),
    "gpt_neox_serial": lambda: transformers.GPTNeoXConfig(
        **SIZES, intermediate_size=128, use_parallel_residual=False, hidden_act="gelu_new",
        tie_word_embeddings=False, **rope(fraction=0.5, neox=True)),
    "opt_post_norm": lambda: transformers.OPTConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=False, dropout=0.0,
        init_std=0.1),
    "opt_pre_norm": lambda: transformers.OPTConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=True, init_std=0.1),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1),
    "qwen2": lambda: transformers.Qwen2Config(
        **SIZES, intermediate_size=96, num_key_value_heads=2, **rope()),
    "qwen3": lambda: transformers.Qwen3Config(
        **SIZES, intermediate_size=96, num_key_value_heads=2, head_dim=16, **rope()),
    "mistral": lambda: transformers.MistralConfig(
        **SIZES, intermediate_size=96, num_key_value_heads=1, sliding_window=5, **rope()),
    "gemma": lambda: transformers.GemmaConfig(
        **SIZES, intermediate_size=96, num_key_value_heads=1, head_dim=16, **rope()),
}


def hf_model(name):
    cfg = CONFIGS[name]()
    cfg._attn_implementation = "eager"  # SDPA drops Gemma 2's soft-cap
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():  # unit norms and zero biases would hide a wrong mapping
            p.add_(0.1 * torch.randn_like(p))
    return model


def inputs():
    ids = torch.randint(0, V, (2, S))
    labels = ids.clone()
    labels[1, :3] = -100
    return ids, labels


@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_hf_logits_and_loss_match(name):
    ref = hf_model(name)
    model = ahf.from_hf(ref)
    assert not model.training
    ids, labels = inputs()
    with torch.no_grad():
        want = ref(input_ids=ids, labels=labels)
        got = model(ids, labels=labels)
    assert want.logits.abs().max() > 0.5  # not a trivially small output
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)


def test_gemma2_features_are_exercised():
    ref = hf_model("gemma2")
    cfg = ahf.config_from_hf(ref.config)
    assert (cfg.norm, cfg.norm_placement, cfg.activation) == ("gemma_rmsnorm", "double", "geglu_tanh")
    assert [cfg.layer_window(i) for i in range(3)] == [5, None, 5] and S > 5
    assert cfg.attn_scale == 20 ** -0.5 and cfg.embedding_scale == 8.0
    model = ahf.from_hf(ref)
    ids, _ = inputs()
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.abs().max() > 0.8 * 4.0  # the final cap (4) is reached: it matters
        # Each feature changes the output, so the parity test above checks it.
        for change in (dict(attn_softcap=None), dict(final_softcap=None), dict(sliding_window=None),
                       dict(attn_scale=None), dict(embedding_scale=None)):
            other = build(dataclasses.replace(cfg, **change), init=False)
            other.load_state_dict(model.state_dict())
            assert not torch.allclose(other.eval()(ids).logits, logits, atol=1e-3), change


def test_config_translation():
    neox = ahf.config_from_hf(CONFIGS["gpt_neox"]())
    assert (neox.block, neox.parallel_shared_norm, neox.rotary_dim, neox.norm, neox.bias) == \
        ("parallel", False, 4, "layernorm", True)
    opt = ahf.config_from_hf(CONFIGS["opt_post_norm"]())
    assert (opt.norm_placement, opt.position, opt.learned_pos_offset, opt.activation) == ("post", "learned", 2, "relu")
    assert not opt.has_final_norm
    gpt2 = ahf.config_from_hf(CONFIGS["gpt2"]())
    assert (gpt2.activation, gpt2.position, gpt2.tied_embeddings, gpt2.ffn_width) == ("gelu_tanh", "learned", True, 256)
    olmo = ahf.config_from_hf(CONFIGS["olmo2"]())
    assert (olmo.norm_placement, olmo.qk_norm) == ("reordered", "proj")
    q2 = ahf.config_from_hf(CONFIGS["qwen2"]())
    assert (q2.bias, q2.qkv_bias, q2.mlp_bias) == (False, True, False)
    m = ahf.from_hf(CONFIGS["llama"]())  # a config alone: a fresh archext model
    assert m.config.n_kv_heads == 2 and m.config.rope_theta == 500000.0


@pytest.mark.parametrize("name", ["llama", "gemma2", "olmo2", "gpt_neox", "opt_post_norm", "gpt2", "qwen2"])
def test_to_hf_round_trip(name):
    ref = hf_model(name)
    model = ahf.from_hf(ref)
    back = ahf.to_hf(model)
    assert type(back) is type(ref) and not back.training
    want = ref.state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    ids, labels = inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, labels=labels).logits, ref(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_to_hf_of_built_models_and_what_no_family_expresses():
    llama = build(TransformerConfig.llama(vocab_size=V, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)).eval()
    hf = ahf.to_hf(llama)
    assert hf.config.model_type == "llama"
    ids, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
    assert ahf.config_to_hf(TransformerConfig.olmo2(vocab_size=V)).model_type == "olmo2"
    assert ahf.config_to_hf(TransformerConfig.gpt2(vocab_size=V)).model_type == "gpt2"
    with pytest.raises(ahf.HFConversionError, match=r"no Hugging Face family expresses this config exactly"):
        ahf.to_hf(build(TransformerConfig(vocab_size=V, d_model=32, n_layers=1, position="alibi")))
    with pytest.raises(ahf.HFConversionError, match=r"mistral: differs in .*full_attention_every"):
        ahf.config_to_hf(TransformerConfig.gemma2(vocab_size=V), "mistral")


def test_unsupported_hf_configs_raise():
    c = CONFIGS["llama"]()
    if HF5:
        c.rope_parameters = {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0}
    else:
        c.rope_scaling = {"rope_type": "proportional", "factor": 2.0}
    with pytest.raises(ahf.HFConversionError, match=r"rope_type='proportional' is not supported; supported: \['default', 'linear'"):
        ahf.config_from_hf(c)
    g = CONFIGS["gemma2"]()
    g.layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
    with pytest.raises(ahf.HFConversionError, match="is not 'every k-th layer global'"):
        ahf.config_from_hf(g)
    o = CONFIGS["opt_post_norm"]()
    o.word_embed_proj_dim = 32
    with pytest.raises(ahf.HFConversionError, match="word_embed_proj_dim=32 != hidden_size=64"):
        ahf.config_from_hf(o)
    n = CONFIGS["gpt_neox"]()
    n.hidden_act = "gelu_fast"
    with pytest.raises(ahf.HFConversionError, match="'gelu_fast' has no archext kernel"):
        ahf.config_from_hf(n)
    with pytest.raises(ahf.HFConversionError, match="model_type 'bert' is not supported"):
        ahf.config_from_hf(transformers.BertConfig())


# patch() replaces the family module's apply_rotary_pos_emb process-wide: the tests restore it
# (monkeypatch) so the parity tests above always compare against HF's own code.
@pytest.mark.parametrize("name", ["llama", "gemma2", "olmo2", "gpt_neox", "opt_post_norm", "gpt2", "qwen3"])
def test_patch_keeps_outputs(name, monkeypatch):
    ref = hf_model(name)
    mod = sys.modules[type(ref).__module__]
    if hasattr(mod, "apply_rotary_pos_emb"):
        monkeypatch.setattr(mod, "apply_rotary_pos_emb", mod.apply_rotary_pos_emb)
    ids, labels = inputs()
    want = ref(input_ids=ids, labels=labels)
    want.loss.backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref.zero_grad()
    keys = set(ref.state_dict())
    done = ahf.patch(ref, loss_chunk_size=5)
    assert done["norms"] > 0 and done["loss"] == 1 and done["mlps"] + done["activations"] > 0
    assert done["rope"] == (name not in ("opt_post_norm", "gpt2")) and done["fused_loss"] == 1
    assert set(ref.state_dict()) == keys  # weights shared, names unchanged
    names = {type(m).__module__ for m in ref.modules()}
    assert "archext.nn.norm" in names
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, want.logits, rtol=1e-5, atol=1e-5)
    got = ref(input_ids=ids, labels=labels)
    assert got.logits is None  # the head ran inside the fused loss
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    got.loss.backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_patch_loss_with_num_items_in_batch():
    logits = torch.randn(2, 5, V)
    labels = torch.randint(0, V, (2, 5))
    from transformers.loss.loss_utils import ForCausalLMLoss
    for n in (None, torch.tensor(7)):
        torch.testing.assert_close(ahf.causal_lm_loss(logits, labels, V, num_items_in_batch=n),
                                   ForCausalLMLoss(logits, labels, V, num_items_in_batch=n))


class _LargestLogits(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements of any tensor of logits shape ([..., vocab]) an op returns."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = lambda x: [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]  # noqa: E731
        inputs = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs))}
        for t in leaves(out):  # new tensors only (a view of the head's weight is not logits)
            if t.dim() >= 2 and t.shape[-1] == self.vocab and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_patched_training_step_never_holds_the_logits(monkeypatch):
    """Structural check of the fused loss: in a patched forward + backward no op returns a
    tensor as large as the [B, S, vocab] logits (the unpatched step does)."""
    ref = hf_model("llama")
    mod = sys.modules[type(ref).__module__]
    monkeypatch.setattr(mod, "apply_rotary_pos_emb", mod.apply_rotary_pos_emb)
    ids, labels = inputs()
    logits_numel = ids.numel() * V
    sizes = {}
    for patched in (False, True):
        if patched:
            ahf.patch(ref, loss_chunk_size=4)
        with _LargestLogits(V) as mode:
            ref(input_ids=ids, labels=labels).loss.backward()
        sizes[patched] = mode.largest
    assert sizes[False] >= logits_numel > sizes[True], sizes


def test_patched_loss_with_num_items_and_shift_labels(monkeypatch):
    ref = hf_model("gemma2")  # a final soft-cap inside the fused loss
    mod = sys.modules[type(ref).__module__]
    monkeypatch.setattr(mod, "apply_rotary_pos_emb", mod.apply_rotary_pos_emb)
    ids, labels = inputs()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    with torch.no_grad():
        want = ref(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(9)).loss
        want_shift = ref(input_ids=ids, labels=labels, shift_labels=shifted).loss
    ahf.patch(ref, loss_chunk_size=7)
    with torch.no_grad():
        got = ref(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(9))
        got_shift = ref(input_ids=ids, labels=labels, shift_labels=shifted).loss
    assert got.logits is None
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_shift, want_shift, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen3", "mistral"])
def test_patch_handles_a_packed_batch(name, monkeypatch):
    """A patched model given a packed row (position ids restarting at each document, no mask):
    the logits, loss and gradients of its documents run one by one through HF's own model. The
    patched attention ("archext", the tiled kernel) applies Gemma 2's soft-cap and the windows
    and keeps each document to itself."""
    ref = hf_model(name)
    mod = sys.modules[type(ref).__module__]
    if hasattr(mod, "apply_rotary_pos_emb"):
        monkeypatch.setattr(mod, "apply_rotary_pos_emb", mod.apply_rotary_pos_emb)
    lengths = (7, 1, 9, 3)
    docs = [torch.randint(0, V, (n,)) for n in lengths]
    total, count, logits = 0.0, 0, []
    for doc in docs:
        o = ref(input_ids=doc[None], labels=doc[None], use_cache=False)
        logits.append(o.logits[0])
        if len(doc) > 1:
            total = total + o.loss * (len(doc) - 1)
            count += len(doc) - 1
    want_loss = total / count
    want_loss.backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref.zero_grad()
    want_logits = torch.cat(logits).detach()

    done = ahf.patch(ref)
    assert done["attention"] == 1 and ref.config._attn_implementation == "archext"
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = ref(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    torch.testing.assert_close(got, want_logits, rtol=1e-4, atol=1e-4)
    out = ref(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5, msg=n)
