"""Pure-PyTorch references of every archext op, shared by the tests and the benchmarks.

They compute in the dtype they are given: the tests call them on float64 copies of the inputs
(the ground truth), the benchmarks on the benchmark dtype (the "PyTorch eager" and
"torch.compile" baselines). Written for clarity, as the equations read.
"""
import math
from typing import Optional

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6,
             weight_offset: float = 0.0) -> Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * (weight + weight_offset)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)  # biased, as F.layer_norm
    y = (x - mu) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6,
                 weight_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    h = x + residual
    return rms_norm(h, weight, eps, weight_offset), h


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    h = x + residual
    return layer_norm(h, weight, bias, eps), h


def rope_rotate_half(x: Tensor) -> Tensor:
    """Hugging Face Llama's rotate_half: (-x2, x1) for the halves x1, x2 of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
         interleaved: bool = False) -> Tensor:
    """RoPE on x [B, S, H, D] with cache cos/sin [P, R/2] at positions [S] or [B, S]: the first
    R dims rotate (Llama's rotate_half pairs, or GPT-J's interleaved pairs), the rest pass."""
    rot = 2 * cos.shape[-1]
    c = cos[positions].to(x.dtype)  # [S or B,S, R/2]
    s = sin[positions].to(x.dtype)
    if c.dim() == 2:
        c, s = c[None], s[None]
    c, s = c[:, :, None, :], s[:, :, None, :]  # broadcast over heads
    xr, xp = x[..., :rot], x[..., rot:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        y = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        c2, s2 = torch.cat((c, c), -1), torch.cat((s, s), -1)
        y = xr * c2 + rope_rotate_half(xr) * s2
    return torch.cat((y, xp), dim=-1)


# ---- activation family ------------------------------------------------------------------------
# PyTorch's formulas (F.gelu with approximate="none" / "tanh", F.silu, F.relu), written out.
def act(x: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return x * 0.5 * (1.0 + torch.erf(x * math.sqrt(0.5)))
    if activation == "gelu_tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + torch.tanh(inner))
    if activation == "silu":
        return x * torch.sigmoid(x)
    if activation == "relu":
        return torch.relu(x)
    raise ValueError(f"unknown activation {activation!r}")


def glu(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """The gated activation act(gate) * up: ReGLU, GeGLU, SwiGLU."""
    return act(gate, activation) * up


def glu_packed(x: Tensor, activation: str, gate_first: bool = True) -> Tensor:
    """glu of the two halves of a packed [..., 2 * d] tensor."""
    a, b = x.chunk(2, dim=-1)
    return glu(a, b, activation) if gate_first else glu(b, a, activation)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return glu(gate, up, "silu")


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    return glu(gate, up, "gelu" if approximate == "none" else "gelu_tanh")


def reglu(gate: Tensor, up: Tensor) -> Tensor:
    return glu(gate, up, "relu")


# ---- stability family -------------------------------------------------------------------------
def softcap(x: Tensor, cap: float) -> Tensor:
    """Gemma 2's logit soft-cap: cap * tanh(x / cap)."""
    return cap * torch.tanh(x / cap)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss_coef: float = 0.0,
                  softcap_value: Optional[float] = None,
                  reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """Cross-entropy over logits [N, V] with PaLM's z-loss and Gemma 2's final-logit soft-cap,
    as archext defines it: per row, with z = softcap(logits) (or the logits),
        lse = logsumexp(z); ce = (1 - eps) * (lse - z[t]) + eps * (lse - mean(z))
        z_loss = z_loss_coef * lse^2;  loss = ce + z_loss
    (eps = label_smoothing, PyTorch's definition). Ignored rows give 0 for both; "mean" divides
    by the number of non-ignored rows, or by 1 when every row is ignored (so the result is 0,
    not NaN). Returns (loss, z_loss), reduced alike."""
    z = logits if softcap_value is None else softcap(logits, softcap_value)
    lse = torch.logsumexp(z, dim=-1)
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    zt = z.gather(-1, t[:, None])[:, 0]
    ce = (1.0 - label_smoothing) * (lse - zt)
    if label_smoothing != 0.0:  # not 0 * inf: masked (-inf) logits leave mean(z) at -inf
        ce = ce + label_smoothing * (lse - z.mean(-1))
    zl = z_loss_coef * lse * lse
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    loss = torch.where(valid, ce + zl, zero)
    zl = torch.where(valid, zl, zero)
    if reduction == "none":
        return loss, zl
    if reduction == "sum":
        return loss.sum(), zl.sum()
    n = valid.sum().clamp(min=1).to(z.dtype)
    return loss.sum() / n, zl.sum() / n


def attention_mask(sq: int, sk: int, causal: bool, window: Optional[int],
                   device=None) -> Optional[Tensor]:
    """The boolean keep-mask [Sq, Sk] of a causal / sliding-window attention, aligned to the
    bottom right (query i sits at key position i + Sk - Sq, as with a KV cache): key j is kept
    when j <= i + Sk - Sq and, with a window W, when (i + Sk - Sq) - j < W."""
    if not causal and window is None:
        return None
    qpos = torch.arange(sq, device=device)[:, None] + (sk - sq)
    kpos = torch.arange(sk, device=device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        keep &= kpos <= qpos
    if window is not None:
        keep &= (qpos - kpos) < window
    return keep


def softmax(x: Tensor, scale: float = 1.0, softcap_value: Optional[float] = None,
            causal: bool = False, window: Optional[int] = None,
            bias: Optional[Tensor] = None) -> Tensor:
    """Attention softmax over the last dim of scores [..., Sq, Sk]:
    s = softcap(scale * x) + bias, masked (causal / window) to -inf, then a stable softmax;
    a row with every key masked gives zeros. The cap comes before the mask, as Gemma 2 does."""
    s = x * scale
    if softcap_value is not None:
        s = softcap(s, softcap_value)
    if bias is not None:
        s = s + bias
    keep = attention_mask(x.shape[-2], x.shape[-1], causal, window, x.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    if s.shape[-1] == 0:  # no keys: an empty result (amax of an empty dim is an error)
        return s * 0
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    d = e.sum(-1, keepdim=True)
    return torch.where(d > 0, e / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(e))


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: Optional[float] = None,
              causal: bool = True, window: Optional[int] = None,
              rel_bias: Optional[Tensor] = None,
              segment_ids: Optional[Tensor] = None) -> Tensor:
    """Materialised attention over q [B, Sq, Hq, D], k and v [B, Sk, Hk, D] (Hq a multiple of Hk;
    query head h reads kv head h // (Hq // Hk)), in the inputs' dtype (pass float64 for a
    reference); returns o [B, Sq, Hq, D]. The scores go through `softmax` (soft-cap, then the
    bias, then the bottom-right causal / window mask); ``rel_bias [Hq, Sq + Sk - 1]`` adds
    ``rel_bias[h, j - p + Sk - 1]`` at query position p = i + Sk - Sq and key j;
    ``segment_ids [B, Sk]`` also hides every key of another segment than the query's position.
    A row with no visible key gives o = 0."""
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    group = hq // hk
    qh = q.transpose(1, 2)                                         # [B, Hq, Sq, D]
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)         # [B, Hq, Sk, D]
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    x = qh @ kh.transpose(-1, -2)                                  # [B, Hq, Sq, Sk]
    pos = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    key = torch.arange(sk, device=q.device)[None, :]
    bias = None
    if rel_bias is not None:
        bias = rel_bias[:, (key - pos + sk - 1).clamp(0, max(sq + sk - 2, 0))].to(x.dtype)[None]
    if segment_ids is not None:
        qseg = segment_ids[:, pos[:, 0].clamp(min=0)]              # [B, Sq]
        same = qseg[:, :, None] == segment_ids[:, None, :]         # [B, Sq, Sk]
        hide = torch.zeros(same.shape, dtype=x.dtype, device=x.device)
        hide = hide.masked_fill(~same, float("-inf"))[:, None]
        bias = hide if bias is None else bias + hide
    p = softmax(x, scale, softcap, causal, window, bias)
    return (p @ vh).transpose(1, 2)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                 cos: Tensor, sin: Tensor, positions: Tensor, eps: float = 1e-6,
                 interleaved: bool = False, per_head: bool = True,
                 weight_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """QK-norm then RoPE on q [B, S, Hq, D] and k [B, S, Hk, D]: RMSNorm over each head's D
    (Qwen3 / Gemma 3, weights [D]) or over all of a token's heads (OLMo 2, weights [H * D]),
    then the rotation of `rope`."""
    def norm(x, w):
        if per_head:
            return rms_norm(x, w, eps, weight_offset)
        b, s, h, d = x.shape
        return rms_norm(x.reshape(b, s, h * d), w, eps, weight_offset).reshape(b, s, h, d)
    return (rope(norm(q, q_weight), cos, sin, positions, interleaved),
            rope(norm(k, k_weight), cos, sin, positions, interleaved))
