"""The model config: every architecture choice of a decoder-only LM as one validated dataclass,
and the presets of known families as named constructors.

Rules of the config:
- Fields hold plain values (strings, numbers, None), so that a config is JSON and
  ``dataclasses.replace(cfg, field=value)`` makes a variant.
- A value that is invalid in itself, or two features that are both on and contradict each
  other, raise `ConfigError` naming the field and the fix.
- The options of a feature that is off are ignored (``rope_theta`` without RoPE,
  ``parallel_shared_norm`` in a serial block, ``full_attention_every`` without a window), so that
  a preset's variant switches a feature off with one ``replace``.
"""
import dataclasses
import enum
import json
import math
from dataclasses import dataclass
from typing import Callable, Optional

from ..nn.mlp import hidden_width
from ..ops.rope import RopeScaling


class ConfigError(ValueError):
    """An invalid `TransformerConfig`; the message names the field and what to change."""


class Norm(enum.StrEnum):
    RMSNORM = "rmsnorm"
    LAYERNORM = "layernorm"
    LAYERNORM_NOBIAS = "layernorm_nobias"  # weight only (Cohere)
    LAYERNORM_NOAFFINE = "layernorm_noaffine"  # no weight, no bias: non-parametric (OLMo)
    GEMMA_RMSNORM = "gemma_rmsnorm"  # (1 + w) weight, w stored from 0


class NormPlacement(enum.StrEnum):
    PRE = "pre"  # x + f(norm(x))
    POST = "post"  # norm(x + f(x))
    DOUBLE = "double"  # x + norm(f(norm(x))): sandwich / peri-norm (Gemma 2)
    REORDERED = "reordered"  # x + norm(f(x)): OLMo 2


class BlockKind(enum.StrEnum):
    SERIAL = "serial"
    PARALLEL = "parallel"  # x + attn(norm(x)) + mlp(norm(x)): GPT-J, GPT-NeoX, PaLM


class BlockType(enum.StrEnum):
    """The block a config builds (one class each in `blocks`): its norm placement, or parallel
    (which is pre-norm with both branches reading the same input)."""
    PRE = "pre"
    POST = "post"
    DOUBLE = "double"
    REORDERED = "reordered"
    PARALLEL = "parallel"

    @classmethod
    def of(cls, cfg: "TransformerConfig") -> "BlockType":
        if cfg.block == BlockKind.PARALLEL:
            return cls.PARALLEL
        return cls(cfg.norm_placement)


class Position(enum.StrEnum):
    ROPE = "rope"
    SINUSOIDAL = "sinusoidal"
    LEARNED = "learned"
    ALIBI = "alibi"
    T5 = "t5"  # learned bucketed relative bias
    NONE = "none"


class QKNorm(enum.StrEnum):
    HEAD = "head"  # each head over head_dim (Qwen3, Gemma 3)
    PROJ = "proj"  # the whole q / k projection (OLMo 2)
    EACH_HEAD = "each_head"  # each head over head_dim with a weight of its own (StableLM, Cohere)


#: activation -> (kernel activation name, gated)
ACTIVATIONS = {
    "relu": ("relu", False),
    "gelu": ("gelu", False),
    "gelu_tanh": ("gelu_tanh", False),
    "silu": ("silu", False),
    "reglu": ("relu", True),
    "geglu": ("gelu", True),
    "geglu_tanh": ("gelu_tanh", True),
    "swiglu": ("silu", True),
}


def _choices(values) -> str:
    return ", ".join(repr(str(v)) for v in values)


@dataclass(frozen=True)
class TransformerConfig:
    """A decoder-only causal LM. Sizes default to a tiny model; presets fix the architecture."""

    # sizes
    vocab_size: int = 256  # token embedding rows and output logits
    d_model: int = 128  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: Optional[int] = None  # key/value heads (GQA when fewer; 1 is MQA); None = n_heads
    head_dim: Optional[int] = None  # per-head width; None = d_model // n_heads
    d_ff: Optional[int] = None  # MLP hidden width; None = hidden_width(d_model, gated, ffn_multiple_of)
    ffn_multiple_of: int = 64  # rounding of the default gated d_ff (8/3 d_model keeps the params of 4 d_model)
    # norms and residual structure
    norm: str = "rmsnorm"  # Norm: rmsnorm | layernorm | layernorm_nobias | layernorm_noaffine | gemma_rmsnorm
    norm_eps: float = 1e-6  # every norm's epsilon
    norm_placement: str = "pre"  # NormPlacement: pre | post | double | reordered
    block: str = "serial"  # BlockKind: serial | parallel (parallel needs pre-norm)
    parallel_shared_norm: bool = True  # parallel block: one input norm for attention and MLP, or two
    residual_dtype: Optional[str] = None  # "float32": keep the residual stream in float32 while the model runs in bf16/fp16 (Megatron's fp32 residual); None = the model's dtype
    # feed-forward
    activation: str = "swiglu"  # relu | gelu | gelu_tanh | silu (plain MLP); reglu | geglu | geglu_tanh | swiglu (gated)
    # positions
    position: str = "rope"  # Position: rope | sinusoidal | learned | alibi | t5 | none
    rope_theta: float = 10000.0  # RoPE frequency base (Llama 3: 500000)
    rope_interleaved: bool = False  # GPT-J pairs (2i, 2i+1) instead of GPT-NeoX / Llama halves
    rotary_fraction: float = 1.0  # share of each head that rotates (GPT-NeoX / Pythia: 0.25)
    rope_scaling: Optional[RopeScaling] = None  # context extension (linear, dynamic, yarn, llama3, longrope) or its dict
    local_rope_theta: Optional[float] = None  # RoPE base of the windowed layers, unscaled (Gemma 3: 10000); None = one RoPE for all
    max_seq_len: int = 2048  # longest sequence: RoPE cache, learned / sinusoidal tables
    learned_pos_offset: int = 0  # learned positions look up row position + offset (OPT: 2)
    t5_num_buckets: int = 32  # relative-bias buckets (T5)
    t5_max_distance: int = 128  # distance beyond which all offsets share the last bucket (T5)
    # attention
    qk_norm: Optional[str] = None  # QKNorm: None | head | each_head | proj; the norm type follows `norm` (each_head: no bias)
    attn_scale: Optional[float] = None  # logit scale; None = head_dim ** -0.5 (Gemma 2: query_pre_attn_scalar ** -0.5)
    attn_softcap: Optional[float] = None  # tanh cap on attention logits (Gemma 2: 50)
    sliding_window: Optional[int] = None  # attend to the W most recent keys, the query's own included
    full_attention_every: Optional[int] = None  # with a window: layers i with (i + 1) % k == 0 attend fully (Gemma 2: 2); None = all windowed
    attn_impl: str = "auto"  # auto | sdpa | tiled | flex | materialized: the engine (nn.Attention's impl); auto never holds S x S scores unless dropout needs them
    # output and loss
    final_softcap: Optional[float] = None  # tanh cap on the output logits (Gemma 2: 30)
    logit_scale: Optional[float] = None  # multiplies the output logits, before the cap (Cohere: 0.0625; Granite: 1 / logits_scaling)
    z_loss_coef: float = 0.0  # PaLM's z-loss, coef * logsumexp^2, added to the loss
    # parameters
    bias: bool = False  # bias on every linear layer (GPT-2, OPT, GPT-NeoX)
    qkv_bias: Optional[bool] = None  # bias on q/k/v only; None = bias (Qwen2: True with bias=False)
    mlp_bias: Optional[bool] = None  # bias on the MLP's linears; None = bias
    tied_embeddings: bool = False  # the output head reuses the token embedding matrix
    embedding_scale: Optional[float] = None  # multiplies the token embeddings (Gemma: sqrt(d_model); Granite: embedding_multiplier)
    residual_scale: Optional[float] = None  # multiplies each branch output as it joins the residual (Granite: residual_multiplier)
    lm_head_bias: bool = False  # bias on the output head (Phi, GPT-J)
    dropout: float = 0.0  # on embeddings, attention probabilities and each branch output
    init_std: float = 0.02  # init_weights: normal std; output projections get std / sqrt(2 n_layers)

    def __post_init__(self):
        from ..nn.attention import ATTENTION_IMPLS

        def fail(msg):
            raise ConfigError(f"TransformerConfig: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_multiple_of", "max_seq_len",
                     "t5_num_buckets", "t5_max_distance"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(f"{name} must be a positive int, got {v!r}")
        for name in ("n_kv_heads", "head_dim", "d_ff", "sliding_window", "full_attention_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                fail(f"{name} must be None or a positive int, got {v!r}")
        for name, enum_cls in (("norm", Norm), ("norm_placement", NormPlacement), ("block", BlockKind),
                               ("position", Position)):
            if getattr(self, name) not in set(enum_cls):
                fail(f"{name}={getattr(self, name)!r} is unknown; choose one of {_choices(enum_cls)}")
        if self.activation not in ACTIVATIONS:
            fail(f"activation={self.activation!r} is unknown; choose one of {_choices(ACTIVATIONS)}")
        if self.qk_norm is not None and self.qk_norm not in set(QKNorm):
            fail(f"qk_norm={self.qk_norm!r} is unknown; choose None or one of {_choices(QKNorm)}")

        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            fail(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}; "
                 f"pick n_kv_heads among the divisors of n_heads")
        if self.head_dim is None and self.d_model % self.n_heads:
            fail(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; change one, "
                 f"or set head_dim explicitly")
        if self.block == BlockKind.PARALLEL and self.norm_placement != NormPlacement.PRE:
            fail(f"block='parallel' sums both branches onto the residual and supports "
                 f"norm_placement='pre' only, got {self.norm_placement!r}; use block='serial' "
                 f"or norm_placement='pre'")
        if self.qk_norm in (QKNorm.HEAD, QKNorm.PROJ) and self.norm == Norm.LAYERNORM_NOAFFINE:
            fail(f"qk_norm={self.qk_norm!r} with norm='layernorm_noaffine' is not supported (the "
                 f"QK-norm follows the norm type, and has a weight); use qk_norm='each_head' or None")
        if self.qk_norm == QKNorm.EACH_HEAD and self.norm == Norm.GEMMA_RMSNORM:
            fail("qk_norm='each_head' stores plain weights; with norm='gemma_rmsnorm' use qk_norm='head'")
        if self.residual_dtype not in (None, "float32"):
            fail(f"residual_dtype={self.residual_dtype!r} is unknown; choose None (the model's "
                 f"dtype) or 'float32'")
        if self.residual_dtype is not None and self.norm_placement == NormPlacement.POST:
            fail("residual_dtype='float32' keeps the stream that the blocks add into apart from the "
                 "norm outputs; a post-norm block's stream is its norm output: drop residual_dtype "
                 "or use norm_placement 'pre', 'double' or 'reordered'")
        if self.residual_scale is not None and (self.norm_placement != NormPlacement.PRE):
            fail(f"residual_scale applies to norm_placement='pre' blocks (serial or parallel), got "
                 f"{self.norm_placement!r}; drop residual_scale or use norm_placement='pre'")
        try:  # a dict (JSON) becomes a RopeScaling; "default" scaling is None
            object.__setattr__(self, "rope_scaling", RopeScaling.coerce(self.rope_scaling))
        except ValueError as e:
            fail(f"rope_scaling: {e}")
        if self.position == Position.ROPE:
            if not 0.0 < self.rotary_fraction <= 1.0:
                fail(f"rotary_fraction must be in (0, 1], got {self.rotary_fraction}")
            rd = self.rotary_dim
            if rd < 2 or rd % 2:
                fail(f"rotary_fraction={self.rotary_fraction} of head_dim={self.head_size} gives "
                     f"{rd} rotating dims (int(head_dim * rotary_fraction), as Hugging Face "
                     f"rounds); it must be even and >= 2: change rotary_fraction or head_dim")
            if not self.rope_theta > 0:
                fail(f"rope_theta must be > 0, got {self.rope_theta}")
            sc = self.rope_scaling
            if sc is not None and sc.rope_type == "longrope" and len(sc.short_factor) != rd // 2:
                fail(f"rope_scaling: longrope has {len(sc.short_factor)} factors per table; the "
                     f"rotary dim {rd} needs {rd // 2}")
            if sc is not None and sc.rope_type == "dynamic" and rd <= 2:
                fail("rope_scaling: dynamic needs more than 2 rotating dims (its exponent is R / (R - 2))")
            if self.local_rope_theta is not None:
                if not (isinstance(self.local_rope_theta, (int, float)) and self.local_rope_theta > 0):
                    fail(f"local_rope_theta must be None or > 0, got {self.local_rope_theta!r}")
                if self.sliding_window is None:
                    fail("local_rope_theta is the RoPE base of the sliding-window layers; set "
                         "sliding_window (and full_attention_every), or drop local_rope_theta")
        if self.position == Position.SINUSOIDAL and self.d_model % 2:
            fail(f"position='sinusoidal' needs an even d_model, got {self.d_model}")
        if self.position == Position.LEARNED and self.learned_pos_offset < 0:
            fail(f"learned_pos_offset must be >= 0, got {self.learned_pos_offset}")
        if not self.norm_eps > 0:
            fail(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.attn_impl not in ATTENTION_IMPLS:
            fail(f"attn_impl={self.attn_impl!r} is unknown; choose one of {', '.join(ATTENTION_IMPLS)}")
        for name in ("attn_scale", "attn_softcap", "final_softcap", "embedding_scale", "logit_scale",
                     "residual_scale"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                fail(f"{name} must be None or a finite number > 0, got {v!r}")
        if not 0.0 <= self.z_loss_coef < math.inf:
            fail(f"z_loss_coef must be >= 0, got {self.z_loss_coef}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.init_std > 0:
            fail(f"init_std must be > 0, got {self.init_std}")

    # ---- derived values (the None defaults resolved) ----
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def gated(self) -> bool:
        return ACTIVATIONS[self.activation][1]

    @property
    def kernel_activation(self) -> str:
        return ACTIVATIONS[self.activation][0]

    @property
    def ffn_width(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return hidden_width(self.d_model, self.gated, self.ffn_multiple_of)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.rotary_fraction)

    @property
    def block_type(self) -> BlockType:
        return BlockType.of(self)

    @property
    def has_final_norm(self) -> bool:
        # A post-norm stack already ends on a norm (the original Transformer, OPT-350m).
        return self.norm_placement != NormPlacement.POST

    def layer_window(self, layer: int) -> Optional[int]:
        """The sliding window of layer ``layer`` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.full_attention_every is not None and (layer + 1) % self.full_attention_every == 0:
            return None
        return self.sliding_window

    # ---- serialisation ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"TransformerConfig: unknown field(s) {unknown}; known: {sorted(fields)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TransformerConfig":
        return cls.from_dict(json.loads(text))

    # ---- presets: the architecture of each family; sizes stay the (tiny) defaults unless given ----
    @classmethod
    def llama(cls, **overrides) -> "TransformerConfig":
        """Llama 2/3: pre-RMSNorm, SwiGLU, RoPE (half rotation), no biases, untied head."""
        return cls(**{**dict(norm="rmsnorm", norm_eps=1e-5, norm_placement="pre", activation="swiglu",
                             position="rope", rope_theta=10000.0, bias=False,
                             tied_embeddings=False), **overrides})

    @classmethod
    def mistral(cls, **overrides) -> "TransformerConfig":
        """Mistral 7B: Llama with grouped-query attention and a sliding window on every layer."""
        return cls.llama(**{**dict(n_kv_heads=1, sliding_window=4096), **overrides})

    @classmethod
    def qwen2(cls, **overrides) -> "TransformerConfig":
        """Qwen2: Llama with biases on q/k/v only and theta 1e6."""
        return cls.llama(**{**dict(norm_eps=1e-6, qkv_bias=True, rope_theta=1e6), **overrides})

    @classmethod
    def qwen3(cls, **overrides) -> "TransformerConfig":
        """Qwen3: Llama with per-head RMS QK-norm, theta 1e6."""
        return cls.llama(**{**dict(norm_eps=1e-6, qk_norm="head", rope_theta=1e6), **overrides})

    @classmethod
    def gemma(cls, **overrides) -> "TransformerConfig":
        """Gemma: (1 + w) RMSNorm, GeGLU (tanh), embeddings scaled by sqrt(d_model), tied head.
        ``embedding_scale`` is a number: sqrt of the d_model given here (a later
        ``replace(d_model=...)`` must set it again)."""
        d_model = overrides.get("d_model", cls.d_model)
        return cls(**{**dict(norm="gemma_rmsnorm", norm_eps=1e-6, norm_placement="pre",
                             activation="geglu_tanh", position="rope", tied_embeddings=True,
                             embedding_scale=math.sqrt(d_model)), **overrides})

    @classmethod
    def gemma2(cls, **overrides) -> "TransformerConfig":
        """Gemma 2: Gemma with sandwich norms, attention (50) and final (30) soft-caps, and a
        sliding window on every other layer."""
        return cls.gemma(**{**dict(norm_placement="double", attn_softcap=50.0, final_softcap=30.0,
                                   sliding_window=4096, full_attention_every=2), **overrides})

    @classmethod
    def olmo2(cls, **overrides) -> "TransformerConfig":
        """OLMo 2: norms on the branch outputs (reordered), RMS QK-norm over the whole
        projections, SwiGLU, RoPE theta 5e5."""
        return cls.llama(**{**dict(norm_placement="reordered", qk_norm="proj", rope_theta=500000.0),
                            **overrides})

    @classmethod
    def gpt_neox(cls, **overrides) -> "TransformerConfig":
        """GPT-NeoX / Pythia: parallel attention + MLP with two input LayerNorms, RoPE on a
        quarter of each head, GeLU, biases."""
        return cls(**{**dict(norm="layernorm", norm_eps=1e-5, norm_placement="pre", block="parallel",
                             parallel_shared_norm=False, activation="gelu", position="rope",
                             rotary_fraction=0.25, bias=True, tied_embeddings=False), **overrides})

    @classmethod
    def gpt2(cls, **overrides) -> "TransformerConfig":
        """GPT-2: pre-LayerNorm, tanh GeLU, learned absolute positions, biases, tied head."""
        return cls(**{**dict(norm="layernorm", norm_eps=1e-5, norm_placement="pre", activation="gelu_tanh",
                             position="learned", bias=True, tied_embeddings=True, max_seq_len=1024),
                      **overrides})

    @classmethod
    def opt_post_norm(cls, **overrides) -> "TransformerConfig":
        """OPT-350m (do_layer_norm_before=False): post-LayerNorm, ReLU, learned positions with
        OPT's offset 2, biases, tied head, no final norm."""
        return cls(**{**dict(norm="layernorm", norm_eps=1e-5, norm_placement="post", activation="relu",
                             position="learned", learned_pos_offset=2, bias=True, tied_embeddings=True),
                      **overrides})


#: preset name -> named constructor (``PRESETS["llama"](d_model=256)``)
PRESETS: dict[str, Callable[..., TransformerConfig]] = {
    name: getattr(TransformerConfig, name)
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2", "gpt_neox", "gpt2",
                 "opt_post_norm")
}


def preset(name: str, **overrides) -> TransformerConfig:
    """The preset ``name`` with ``overrides``; an unknown name raises `ConfigError`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {_choices(PRESETS)}")
    return PRESETS[name](**overrides)
