"""Stability ops: cross-entropy with z-loss and final-logit soft-cap, the attention softmax with
soft-cap / mask / bias, a pointwise soft-cap, and QK-norm with RoPE.

The kernels are in csrc/{cpu,cuda}/stability_*; the math in csrc/common/stability_math.h; the
float64 references in archext/reference.py. Every op here computes in float32 whatever the input
dtype, and none makes a host sync (the "mean" of the cross-entropy divides on the device).
"""
from typing import Optional, Union

import torch
from torch import Tensor

from .. import reference as _ref
from ._common import acc_dtype, empty_grad, using_reference_ops
from .rope import rope_positions

_ops = torch.ops.archext
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("archext::cross_entropy_fwd")
def _(logits, target, ignore_index, label_smoothing, z_loss_coef, softcap):
    rows = logits.new_empty((logits.shape[0],), dtype=acc_dtype(logits.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.register_fake("archext::cross_entropy_bwd")
def _(grad_loss, grad_z_loss, logits, target, lse, ignore_index, label_smoothing, z_loss_coef,
      softcap):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("archext::softmax_fwd")
def _(x, bias, scale, softcap, causal, window):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("archext::softmax_bwd")
def _(grad_y, y, x, scale, softcap, want_grad_scores):
    dx = torch.empty_like(y, memory_format=torch.contiguous_format)
    return dx, (torch.empty_like(dx) if want_grad_scores else empty_grad(y))


@torch.library.register_fake("archext::softcap_fwd")
def _(x, cap):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("archext::softcap_bwd")
def _(grad_y, x, cap):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("archext::qk_norm_rope_fwd")
def _(q, k, q_weight, k_weight, cos, sin, positions, eps, weight_offset, per_head, interleaved):
    acc = acc_dtype(q.dtype)
    stat = lambda x: x.new_empty(x.shape[:3] if per_head else x.shape[:2], dtype=acc)  # noqa: E731
    qo = torch.empty_like(q, memory_format=torch.contiguous_format)
    ko = torch.empty_like(k, memory_format=torch.contiguous_format)
    return qo, ko, stat(q), stat(k)


@torch.library.register_fake("archext::qk_norm_rope_bwd")
def _(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, positions, q_rstd, k_rstd,
      weight_offset, per_head, interleaved):
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dwq = torch.empty_like(q_weight) if q_weight is not None else empty_grad(q)
    dwk = torch.empty_like(k_weight) if k_weight is not None else empty_grad(k)
    return dq, dk, dwq, dwk


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
def _ce_setup(ctx, inputs, output):
    logits, target, ignore_index, eps, coef, cap = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, target, output[2])
    ctx.args = (ignore_index, eps, coef, cap)


def _ce_backward(ctx, grad_loss, grad_z_loss, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    if grad_loss is None and grad_z_loss is None:
        return None, None, None, None, None, None
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    grad = _ops.cross_entropy_bwd(grad_loss.contiguous(),
                                  None if grad_z_loss is None else grad_z_loss.contiguous(),
                                  logits, target, lse, *ctx.args)
    return grad, None, None, None, None, None


torch.library.register_autograd("archext::cross_entropy_fwd", _ce_backward, setup_context=_ce_setup)


def _softmax_setup(ctx, inputs, output):
    x, bias, scale, cap, causal, window = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output, x if cap != 0 else None)
    ctx.args = (scale, cap)
    ctx.bias_shape = None if bias is None else bias.shape


def _softmax_backward(ctx, grad_y):
    y, x = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None, None
    want_bias = ctx.bias_shape is not None and ctx.needs_input_grad[1]
    dx, ds = _ops.softmax_bwd(grad_y, y, x, *ctx.args, want_bias)
    grad_bias = ds.sum_to_size(ctx.bias_shape) if want_bias else None
    return (dx if ctx.needs_input_grad[0] else None), grad_bias, None, None, None, None


torch.library.register_autograd("archext::softmax_fwd", _softmax_backward,
                                setup_context=_softmax_setup)


def _softcap_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inputs[0])
    ctx.cap = inputs[1]


def _softcap_backward(ctx, grad_y):
    if grad_y is None:
        return None, None
    (x,) = ctx.saved_tensors
    return _ops.softcap_bwd(grad_y, x, ctx.cap), None


torch.library.register_autograd("archext::softcap_fwd", _softcap_backward,
                                setup_context=_softcap_setup)


def _qkn_setup(ctx, inputs, output):
    q, k, wq, wk, cos, sin, pos, eps, off, per_head, interleaved = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, wq, wk, cos, sin, pos, output[2], output[3])
    ctx.args = (off, per_head, interleaved)


def _qkn_backward(ctx, gq, gk, _grq, _grk):
    q, k, wq, wk, cos, sin, pos, rq, rk = ctx.saved_tensors
    if gq is None and gk is None:
        return (None,) * 11
    gq = torch.zeros_like(q) if gq is None else gq
    gk = torch.zeros_like(k) if gk is None else gk
    dq, dk, dwq, dwk = _ops.qk_norm_rope_bwd(gq, gk, q, k, wq, wk, cos, sin, pos, rq, rk, *ctx.args)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None,
            dwq if wq is not None and need[2] else None, dwk if wk is not None and need[3] else None,
            None, None, None, None, None, None, None)


torch.library.register_autograd("archext::qk_norm_rope_fwd", _qkn_backward, setup_context=_qkn_setup)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
def _check_cap(name: str, cap: Optional[float]) -> float:
    if cap is None:
        return 0.0
    if not cap > 0:
        raise ValueError(f"{name}: softcap must be > 0 (or None for no cap), got {cap}")
    return float(cap)


def softcap(x: Tensor, cap: float) -> Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-cap), elementwise; the gradient is
    ``1 - tanh^2(x / cap)``."""
    if not cap > 0:
        raise ValueError(f"softcap: cap must be > 0, got {cap}")
    if using_reference_ops():
        return _ref.softcap(x, cap)
    return _ops.softcap_fwd(x, float(cap))


def _reduce(rows: Tensor, valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp(min=1).to(rows.dtype)


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss_coef: float = 0.0,
                  softcap: Optional[float] = None,
                  reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """Fused cross-entropy over ``logits [N, V]`` and ``target [N]``.

    Per row, with ``z = cap * tanh(logits / cap)`` when ``softcap`` is given:
    ``loss = (1 - eps) * (lse - z[t]) + eps * (lse - mean(z)) + z_loss_coef * lse^2`` and
    ``z_loss = z_loss_coef * lse^2`` (PaLM's auxiliary loss, returned apart for logging; it is
    already included in ``loss``). Rows whose target is ``ignore_index`` give 0. ``"mean"``
    divides by the number of non-ignored rows (by 1 when there are none: a batch with every
    token ignored gives loss 0 and zero gradients, not NaN). No host sync. The results are
    float32 (float64 for float64 logits) whatever the logits' dtype.
    Returns ``(loss, z_loss)``, reduced alike."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    cap = _check_cap("cross_entropy", softcap)
    if using_reference_ops():
        return _ref.cross_entropy(logits, target, ignore_index, label_smoothing, z_loss_coef,
                                  softcap, reduction)
    loss, z, _ = _ops.cross_entropy_fwd(logits, target, ignore_index, float(label_smoothing),
                                        float(z_loss_coef), cap)
    valid = target != ignore_index
    return _reduce(loss, valid, reduction), _reduce(z, valid, reduction)


def softmax(scores: Tensor, *, scale: float = 1.0, softcap: Optional[float] = None,
            causal: bool = False, window: Optional[int] = None,
            bias: Optional[Tensor] = None) -> Tensor:
    """Stable softmax over the last dim of attention scores ``[..., Sq, Sk]`` (rank 2 to 4):
    ``s = softcap(scale * scores) + bias``; keys masked by ``causal`` / ``window`` (aligned to the
    bottom right: query i sits at key position ``i + Sk - Sq``; a window W keeps the W most recent
    keys, itself included) get probability 0; a row with every key masked gives zeros, not NaN.
    ``bias`` broadcasts to ``scores`` (ALiBi, T5 relative bias, or an additive mask with -inf);
    its gradient is summed back to its shape. The cap comes before bias and mask (Gemma 2)."""
    cap = _check_cap("softmax", softcap)
    if window is not None and window < 1:
        raise ValueError(f"softmax: window must be >= 1 (or None), got {window}")
    if using_reference_ops():
        return _ref.softmax(scores, scale, softcap, causal, window, bias)
    if bias is not None and bias.dtype != scores.dtype:
        bias = bias.to(scores.dtype)
    return _ops.softmax_fwd(scores, bias, float(scale), cap, causal, -1 if window is None else window)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                 cos: Tensor, sin: Tensor, *, eps: float = 1e-6, per_head: bool = True,
                 weight_offset: float = 0.0, offset: Union[int, Tensor] = 0,
                 position_ids: Optional[Tensor] = None, interleaved: bool = False,
                 cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """RMSNorm of q ``[B, S, Hq, D]`` and k ``[B, S, Hk, D]`` then RoPE, fused; the tokens'
    positions as `apply_rope` takes them (``cu_seqlens`` for packed documents).
    ``per_head=True``: each head normalised over D with a weight ``[D]`` shared by the heads
    (Qwen3 / Gemma 3); ``per_head=False``: each token normalised over all its heads, weights
    ``[Hq * D]`` and ``[Hk * D]`` (OLMo 2). cos/sin come from `rope_cache`. One fused kernel,
    forward and backward: q and k are read once and written once (the backward recomputes the
    normalised values from the saved per-group rstd)."""
    pos = rope_positions(q, offset, position_ids, cu_seqlens)
    if using_reference_ops():
        return _ref.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, pos, eps, interleaved,
                                 per_head, weight_offset)
    qo, ko, _, _ = _ops.qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, pos, float(eps),
                                         float(weight_offset), per_head, interleaved)
    return qo, ko


# --------------------------------------------------------------------------------------------
# Fused linear + cross-entropy (the LM head)
# --------------------------------------------------------------------------------------------
def default_chunk_rows(vocab: int, itemsize: int = 4, budget_bytes: int = 8 << 20,
                       min_rows: int = 256, *, rows: Optional[int] = None,
                       d_model: Optional[int] = None, device: str = "cpu") -> int:
    """Rows per chunk of the fused LM head.

    On the CPU: as many as fit ``budget_bytes`` (8 MiB, about an L2 / L3 slice) of logits, but
    at least ``min_rows`` (256), below which the chunk's GEMM re-reads the head weight for too
    few rows to stay compute-bound. So 256 rows from a vocabulary of 8192 up (8 MiB at 8k,
    128 MiB at 128k), more below.

    On a GPU a cache-sized chunk is far too small: each chunk is three GEMMs with M = its rows,
    and each adds a [vocab, d_model] product into the weight gradient, so the chunk count
    multiplies that traffic. There a chunk holds as many logits as the hidden states hold
    values (``rows * d_model``, close to Liger-Kernel's rule), so the extra memory stays the
    size of an input: rounded down to a multiple of 128 rows, at least ``min_rows``, at most
    ``rows``. Without ``rows`` and ``d_model`` the CPU rule applies. Not yet timed on a GPU."""
    if device != "cpu" and rows is not None and d_model is not None:
        per_chunk = (rows * d_model) // max(1, vocab) // 128 * 128
        return max(1, min(rows, max(min_rows, per_chunk)))
    return max(min_rows, budget_bytes // max(1, vocab * itemsize))


def _linear_ce_chunks(hidden, weight, bias, target, args, reduction, chunk, need_h, need_w,
                      need_b):
    """Chunks of rows: logits = h_c W^T (+ b), the fused cross-entropy forward and, when a
    gradient is needed, its backward at once (the loss is a mean or a sum, so each row's
    incoming gradient is known up to the final scalar): grad_h_c = dlogits W and
    grad_W += dlogits^T h_c. Only one chunk's logits and their gradient exist at a time.
    Returns (loss, z_loss, [grad_h, grad_w, grad_b]) for an incoming gradient of 1."""
    ignore_index, eps, coef, cap = args
    n, d = hidden.shape
    vocab = weight.shape[0]
    need = need_h or need_w or need_b
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    if reduction == "mean":
        denom = (target != ignore_index).sum().clamp(min=1).to(acc)
    else:
        denom = torch.ones((), dtype=acc, device=dev)
    row_grad = (1.0 / denom).expand(min(chunk, max(n, 1))).contiguous() if need else None
    loss_sum = torch.zeros((), dtype=acc, device=dev)
    z_sum = torch.zeros((), dtype=acc, device=dev)
    grad_h = torch.empty_like(hidden) if need_h else None
    # The weight gradient accumulates in float32 over the chunks (never in bfloat16).
    grad_w = torch.zeros(vocab, d, dtype=acc, device=dev) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=dev) if need_b else None
    for s in range(0, n, chunk):
        hc, tc = hidden[s:s + chunk], target[s:s + chunk]
        logits = torch.nn.functional.linear(hc, weight, bias)
        loss, z, lse = _ops.cross_entropy_fwd(logits, tc, ignore_index, eps, coef, cap)
        loss_sum += loss.sum()
        z_sum += z.sum()
        if need:
            dlogits = _ops.cross_entropy_bwd(row_grad[:hc.shape[0]], None, logits, tc, lse,
                                             ignore_index, eps, coef, cap)
            del logits
            if need_h:
                torch.mm(dlogits, weight, out=grad_h[s:s + chunk])
            if need_w:
                if grad_w.dtype == dlogits.dtype:
                    grad_w.addmm_(dlogits.t(), hc)
                else:  # float32 += the chunk's bfloat16 / float16 product, widened as it is read
                    grad_w.add_(torch.mm(dlogits.t(), hc))
            if need_b:
                grad_b += dlogits.sum(0, dtype=acc)
            del dlogits
    grads = [grad_h, None if grad_w is None else grad_w.to(weight.dtype),
             None if grad_b is None else grad_b.to(bias.dtype)]
    return loss_sum / denom, z_sum / denom, grads


def _linear_ce_rows(hidden, weight, bias, target, args, chunk):
    """reduction="none", forward: per-row loss, z-loss and logsumexp, a chunk of logits at a
    time. The gradient waits for the backward, which knows each row's incoming gradient."""
    ignore_index, eps, coef, cap = args
    n = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    loss = torch.empty(n, dtype=acc, device=hidden.device)
    z = torch.empty_like(loss)
    lse = torch.empty_like(loss)
    for s in range(0, n, chunk):
        logits = torch.nn.functional.linear(hidden[s:s + chunk], weight, bias)
        lc, zc, lsec = _ops.cross_entropy_fwd(logits, target[s:s + chunk], ignore_index, eps, coef, cap)
        loss[s:s + chunk], z[s:s + chunk], lse[s:s + chunk] = lc, zc, lsec
    return loss, z, lse


def _linear_ce_rows_backward(hidden, weight, bias, target, lse, grad_rows, args, chunk, need_h,
                             need_w, need_b):
    """reduction="none", backward: the logits of each chunk recomputed, their gradient for the
    rows' incoming gradients ``grad_rows [N]``, folded into the gradients of hidden, weight and
    bias (the weight's and bias's accumulated in float32)."""
    ignore_index, eps, coef, cap = args
    n, d = hidden.shape
    acc = acc_dtype(hidden.dtype)
    grad_rows = grad_rows.to(acc).contiguous()
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape[0], d, dtype=acc, device=hidden.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=hidden.device) if need_b else None
    for s in range(0, n, chunk):
        hc, tc = hidden[s:s + chunk], target[s:s + chunk]
        logits = torch.nn.functional.linear(hc, weight, bias)
        dlogits = _ops.cross_entropy_bwd(grad_rows[s:s + chunk], None, logits, tc, lse[s:s + chunk],
                                         ignore_index, eps, coef, cap)
        del logits
        if need_h:
            torch.mm(dlogits, weight, out=grad_h[s:s + chunk])
        if need_w:
            grad_w += torch.mm(dlogits.t(), hc).to(acc)
        if need_b:
            grad_b += dlogits.sum(0, dtype=acc)
        del dlogits
    return [grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype)]


class _LinearCrossEntropyRows(torch.autograd.Function):
    """reduction="none": per-row losses. The forward keeps only the rows' logsumexp; the backward
    recomputes each chunk's logits (one more matmul than the reduced forms, whose gradients come
    out of the forward because every row's incoming gradient is the same scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, eps, coef, cap, chunk):
        ctx.args, ctx.chunk = (ignore_index, eps, coef, cap), chunk
        loss, z, lse = _linear_ce_rows(hidden, weight, bias, target, ctx.args, chunk)
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.mark_non_differentiable(z)
        return loss, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        grads = _linear_ce_rows_backward(hidden, weight, bias, target, lse, grad_loss, ctx.args,
                                         ctx.chunk, *ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None, None)


# The chunk loop as one opaque op: under torch.compile the compiler would otherwise trace it and,
# functionalising the in-place weight-gradient sum, give each chunk a fresh [vocab, d] output
# and a copy of the running sum into it (5 copies of 8 MiB per step of the profile preset at
# vocab 8k). Opaque, it runs as in eager: one accumulator, summed in place.
@torch.library.custom_op("archext::linear_ce_grads", mutates_args=())
def _linear_ce_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                     ignore_index: int, label_smoothing: float, z_loss_coef: float,
                     softcap: float, reduction: str, chunk: int, need_h: bool, need_w: bool,
                     need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, z_loss, grad_hidden, grad_weight, grad_bias) for an incoming gradient of 1; a
    gradient not asked for is an empty tensor (`_linear_ce_chunks`)."""
    args = (ignore_index, label_smoothing, z_loss_coef, softcap)
    loss, z, grads = _linear_ce_chunks(hidden, weight, bias, target, args, reduction, chunk,
                                       need_h, need_w, need_b)
    return (loss, z, *(g if g is not None else empty_grad(hidden) for g in grads))


@_linear_ce_grads.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss_coef, softcap,
      reduction, chunk, need_h, need_w, need_b):
    acc = acc_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((), dtype=acc),
            torch.empty_like(hidden) if need_h else empty_grad(hidden),
            torch.empty_like(weight) if need_w else empty_grad(hidden),
            torch.empty_like(bias) if need_b else empty_grad(hidden))


def _ce_grads(hidden, weight, bias, target, args, reduction, chunk, need_h, need_w, need_b):
    loss, zl, gh, gw, gb = _ops.linear_ce_grads(hidden, weight, bias, target, *args, reduction,
                                                chunk, need_h, need_w, need_b)
    return loss, zl, [gh if need_h else None, gw if need_w else None, gb if need_b else None]


class _LinearCrossEntropy(torch.autograd.Function):
    """The gradients come out of the forward (`_linear_ce_chunks`). The first backward hands
    them over, scaled in place and no longer referenced here, so that autograd can take them as
    the .grad buffers without a copy (a copy would double the weight gradient's memory at its
    peak). A later backward on a retained graph recomputes them from the saved inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, eps, coef, cap, reduction, chunk):
        ctx.args = (ignore_index, eps, coef, cap)
        ctx.reduction, ctx.chunk = reduction, chunk
        ctx.save_for_backward(hidden, weight, bias, target)
        loss, zl, grads = _ce_grads(hidden, weight, bias, target, ctx.args, reduction, chunk,
                                    *ctx.needs_input_grad[:3])
        ctx.grads = grads
        ctx.mark_non_differentiable(zl)
        return loss, zl

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
        else:
            hidden, weight, bias, target = ctx.saved_tensors
            grads = _ce_grads(hidden, weight, bias, target, ctx.args, ctx.reduction, ctx.chunk,
                              *ctx.needs_input_grad[:3])[2]
        for g in grads:
            if g is not None:
                g.mul_(grad_loss.to(g.dtype))
        return (*grads, None, None, None, None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *,
                         bias: Optional[Tensor] = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss_coef: float = 0.0,
                         softcap: Optional[float] = None, reduction: str = "mean",
                         chunk_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """`cross_entropy` of ``hidden @ weight.T (+ bias)`` without the full logits in memory.

    ``hidden [..., d_model]``, ``weight [vocab, d_model]`` (the LM head or the tied embedding),
    ``target [...]``. Rows are processed ``chunk_size`` at a time (default `default_chunk_rows`:
    on the CPU 256 rows from a vocabulary of 8k up, up to 8 MiB of logits below; on a GPU as
    many logits as the hidden states hold values); each chunk's logits gradient is computed in the forward and folded at
    once into the gradients of hidden, weight and bias, so the peak extra memory is one chunk
    of logits and its gradient (plus a float32 weight-gradient accumulator when the weight is
    not float32), whatever the token count. ``reduction`` is ``"mean"``, ``"sum"`` or
    ``"none"`` (per-token losses of shape ``target.shape``, 0 where ignored; their backward takes
    any per-token upstream gradient, at the cost of recomputing each chunk's logits there). The
    returned ``z_loss`` is for logging (it is inside ``loss``, and not differentiable itself)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    cap = _check_cap("linear_cross_entropy", softcap)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected weight [vocab, {hidden.shape[-1]}], got "
                         f"{tuple(weight.shape)}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: expected target of shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    h2, t1 = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    if using_reference_ops():
        logits = torch.nn.functional.linear(h2, weight, bias)
        loss, z = _ref.cross_entropy(logits, t1, ignore_index, label_smoothing, z_loss_coef, softcap,
                                     reduction)
        return (loss.view(target.shape), z.view(target.shape)) if reduction == "none" else (loss, z)
    chunk = chunk_size or default_chunk_rows(weight.shape[0], rows=h2.shape[0],
                                             d_model=h2.shape[1], device=h2.device.type)
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk}")
    if reduction == "none":
        loss, z = _LinearCrossEntropyRows.apply(h2, weight, bias, t1, ignore_index, float(label_smoothing),
                                                float(z_loss_coef), cap, int(chunk))
        return loss.view(target.shape), z.view(target.shape)
    return _LinearCrossEntropy.apply(h2, weight, bias, t1, ignore_index, float(label_smoothing),
                                     float(z_loss_coef), cap, reduction, int(chunk))
